"""Terminal output for the CLI: stage headers, progress lines and tables on stderr (stdout stays for JSON)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table


class UI:
    def __init__(self, quiet: bool = False) -> None:
        self.console = Console(stderr=True, quiet=quiet, highlight=False)
        if not self.console.is_terminal:  # logs and CI: no wrapping at 80 columns
            self.console.width = 132
        self._t0 = time.perf_counter()

    def info(self, message: str) -> None:
        self.console.print(f"  {message}")

    def warn(self, message: str) -> None:
        self.console.print(f"  [yellow]warning:[/] {message}")

    @contextmanager
    def stage(self, title: str):
        start = time.perf_counter()
        self.console.print(f"[bold cyan]▶ {title}[/]")
        yield
        self.console.print(f"  [dim]done in {time.perf_counter() - start:.1f} s[/]")

    def table(self, title: str, columns: list[str], rows: list[list[Any]], styles: list[str | None] | None = None):
        t = Table(title=title, title_justify="left", show_lines=False)
        for c in columns:
            t.add_column(c, justify="left" if c in (columns[0],) else "right")
        for i, row in enumerate(rows):
            t.add_row(*[str(v) for v in row], style=(styles[i] if styles else None))
        self.console.print(t)
