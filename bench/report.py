"""A benchmark's results as one JSON object, for the runner that renders BENCHMARKS.md.

The object (``--json PATH`` on each benchmark)::

    {"title": str, "command": str,
     "rows": [{"figure": str, "value": str, "goal": str, "reference": str,
               "met": true | false | null}],
     "notes": [str, ...]}

``value`` is the measured figure with its unit; ``reference`` the same-run figure it
is compared to ("" when none); ``goal`` the project's goal for it ("" when none);
``met`` is computed from the numbers where there is a goal, else null.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Row", "add_json_option", "command_line", "write_json"]


@dataclass(frozen=True)
class Row:
    figure: str
    value: str
    goal: str = ""
    reference: str = ""
    met: bool | None = None

    def __post_init__(self) -> None:
        if not self.goal and self.met is not None:
            raise ValueError(f"{self.figure}: 'met' without a goal")


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON"
    )


def _relative(path: str) -> str:
    """``path`` relative to the working directory when it lies under it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def command_line(argv: list[str] | None = None, python: str | None = None) -> str:
    """The command that ran this benchmark, without its ``--json PATH`` part."""
    argv = list(sys.argv if argv is None else argv)
    args: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            args.append(arg)
    python = _relative(sys.executable if python is None else python)
    return shlex.join([python, _relative(argv[0]), *args])


def write_json(
    path: Path | str,
    title: str,
    rows: list[Row],
    notes: list[str],
    command: str | None = None,
) -> None:
    """Write the benchmark's one JSON object to ``path``."""
    document = {
        "title": title,
        "command": command_line() if command is None else command,
        "rows": [asdict(row) for row in rows],
        "notes": list(notes),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
