"""Progress for the long host steps (fit, evaluate): a rich bar on a terminal, plain lines otherwise.

Logs, CI and pipes get one line when a step starts, one every ``PLAIN_EVERY_S`` seconds
while it runs (units done so far, so a long coreset visibly moves) and one when it ends
(with its duration), never carriage-return noise.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

PLAIN_EVERY_S = 10.0  # plain-line mode: at most one progress line this often


@contextmanager
def step(description: str, total: int, enabled: bool = True, stream=None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)`` for a step of ``total`` units.

    Args:
        description: what the step does ("features", "coreset", …).
        total: units of work (images, points).
        enabled: False silences the step (library use).
        stream: where to report (default stderr; stdout stays machine-readable).

    Returns:
        (yields) a callable that advances the step by ``n`` units.
    """
    stream = stream or sys.stderr
    if not enabled:
        yield lambda n=1: None
        return
    start = time.perf_counter()
    if stream.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(file=stream), transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.update(task, advance=n)
        return
    print(f"{description}: {total} …", file=stream, flush=True)
    done, last = 0, start

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.perf_counter()
        if now - last >= PLAIN_EVERY_S and done < total:
            print(f"{description}: {done}/{total} ({now - start:.0f} s)", file=stream, flush=True)
            last = now

    yield advance
    print(f"{description}: done in {time.perf_counter() - start:.1f} s", file=stream, flush=True)
