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
