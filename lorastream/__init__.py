"""lorastream's face: settings from flags and environment, the CLI, the local broker, the demo.

The stages themselves live in ``schemas`` (the contract), ``streams`` (scoring)
and ``trainer`` (training); this package builds typed settings and hands them
down. Only :mod:`lorastream.settings` reads the environment.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorastream")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0+unknown"

__all__ = ["__version__"]
