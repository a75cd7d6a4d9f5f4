"""Progress bars for long work (calibration, training helpers), quiet when not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any


def progress(items: Iterable[Any], total: int | None = None, description: str = "",
             enabled: bool = True) -> Iterator[Any]:
    """Iterate ``items`` with a rich progress bar on an interactive stderr."""
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


class Steps:
    """A progress bar advanced by hand, for work whose steps are decided as it goes (a search);
    ``total`` may be re-estimated. Quiet when stderr is not a terminal."""

    def __init__(self, total: int | None, description: str = "", enabled: bool = True) -> None:
        self.total, self.description = total, description
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None

    def __enter__(self) -> Steps:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, total: int | None = None, description: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, total=total,
                             description=description or self.description)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
