"""lorastream's face: settings from flags and environment, the CLI, the local broker, the demo.

The stages themselves live in ``schemas`` (the contract), ``streams`` (scoring)
and ``trainer`` (training); this package builds typed settings and hands them
down. Only :mod:`lorastream.settings` reads the environment.

Importing it imports nothing else: the ``lorastream`` script's first step
(:mod:`lorastream.entry`) must come before any slow import.
"""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("lorastream")
        except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
            return "0+unknown"
    raise AttributeError(f"module 'lorastream' has no attribute {name!r}")
