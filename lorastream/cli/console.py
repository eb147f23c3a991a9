"""Tables on a console: fitted to a terminal, never cut when piped.

Rich lays a table out in the console's width, 80 columns when the output is
not a terminal: piped into ``grep`` or a file, the columns were squeezed to
"adapt…" and "2026-…". Piped, a table is printed at its natural width.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

__all__ = ["print_table"]

_UNBOUNDED = 100_000


def print_table(console: Console, table: Table) -> None:
    if console.is_terminal:
        console.print(table)
    else:  # rich caps a print's width at the console's: a console of its own, as wide as needed
        Console(file=console.file, width=_UNBOUNDED, color_system=None).print(table)
