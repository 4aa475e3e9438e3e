"""The progress bar ``get_results()`` and ``await project.results()`` draw on a terminal.

Drawn with rich on stderr, only when stderr is a terminal (and ``progress`` is not False):
items done of the total (once the iterator is used up), the rate, the time left, how many
workers answered lately and how many attempts failed. rich is imported only when a bar is
drawn, so ``import dcproto`` does not pay for it. The bar is refreshed by whoever waits (every
``REFRESH`` seconds): no thread of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from .creator import ProjectHandle

REFRESH = 0.2  # seconds between redraws
BUSY_WINDOW = 5.0  # a worker that sent a result within this (or two task times) is busy


def bar_wanted(progress: bool) -> bool:
    """Whether to draw a bar: asked for, and stderr is a terminal that can redraw a line."""
    if not progress or os.environ.get("TERM") == "dumb" or not _isatty(sys.stderr):
        return False
    return importlib.util.find_spec("rich") is not None  # a dependency, but one may remove it


def workers_busy(handle: ProjectHandle, now: float | None = None) -> int:
    """Distinct workers that sent a result lately: within ``BUSY_WINDOW`` seconds, or two of
    the project's mean round trips per task if that is longer (slow tasks answer seldom)."""
    run = handle._run
    window = BUSY_WINDOW
    if run.tasks_done:
        window = max(window, 2 * run.round_trip_total / run.tasks_done)
    now = time.monotonic() if now is None else now
    return sum(now - seen <= window for seen in run.worker_seen.copy().values())


def failures(handle: ProjectHandle) -> int:
    """Attempts that did not succeed (tasks retried or re-issued), and items skipped under
    ``errors="skip"``."""
    return handle._run.retried + len(handle.errors)


class ProgressBar:
    """One project's bar on stderr: ``with ProgressBar(handle) as bar: ... bar.update()``.
    If another rich display is live already (two projects awaited at once), it draws nothing.
    """

    def __init__(self, handle: ProjectHandle) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            SpinnerColumn,
            TextColumn,
        )
        from rich.text import Text

        class Details(ProgressColumn):
            """``12.5 items/s  ETA 0:01:10  3 workers busy  0 failures``."""

            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                rate = "? items/s" if speed is None else f"{speed:,.1f} items/s"
                left = task.time_remaining
                if task.finished:
                    eta = f"took {_clock(task.finished_time or task.elapsed or 0)}"
                elif task.total is None or left is None:
                    eta = "ETA ?"
                else:
                    eta = f"ETA {_clock(left)}"
                busy = task.fields.get("busy", 0)
                failed = task.fields.get("failures", 0)
                text = Text(
                    f"{rate}  {eta}  {busy} worker{'s' * (busy != 1)} busy  ",
                    no_wrap=True,
                    overflow="ellipsis",
                )
                text.append(
                    f"{failed} failure{'s' * (failed != 1)}", style="red" if failed else "dim"
                )
                return text

        self.handle = handle
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("items"),
            Details(),
            console=Console(file=sys.stderr),
            auto_refresh=False,  # the waiter redraws it: no thread
            transient=False,  # the last state stays on screen
            # prints go above the bar; stdout only if it is the terminal too (not a pipe)
            redirect_stdout=_isatty(sys.stdout),
            redirect_stderr=True,
        )
        self._task = self._progress.add_task(str(handle.name), total=None, busy=0, failures=0)
        self._live = False

    def __enter__(self) -> Self:
        from rich.errors import LiveError

        try:
            self._progress.start()
            self._live = True
        except LiveError:  # another bar is up: let it be
            pass
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live:
            self._live = False
            self._progress.stop()

    def update(self) -> None:
        if not self._live:
            return
        handle = self.handle
        run = handle._run
        done = handle.done()
        description = handle.name if not done else f"{handle.name} {run.status}"
        total = run.total_items
        if done and run.status == "done":
            total = run.items_done if total is None else total
        self._progress.update(
            self._task,
            description=description,
            completed=run.items_done,
            total=total,
            busy=0 if done else workers_busy(handle),
            failures=failures(handle),
        )
        if done and total is not None and run.items_done < total:
            self._progress.stop_task(self._task)  # ended short (failed, stopped): freeze time
        self._progress.refresh()


def wait_showing(handle: ProjectHandle, timeout: float | None) -> None:
    """Wait for the project with a bar; raises TimeoutError after ``timeout`` seconds."""
    future = handle._future
    deadline = None if timeout is None else time.monotonic() + timeout
    with ProgressBar(handle) as bar:
        while True:
            bar.update()
            wait = REFRESH if deadline is None else min(REFRESH, deadline - time.monotonic())
            concurrent.futures.wait([future], timeout=max(0.0, wait))
            if future.done():
                bar.update()
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise concurrent.futures.TimeoutError


async def wait_showing_async(handle: ProjectHandle, future: asyncio.Future[Any]) -> None:
    """Await ``future`` (the project's, wrapped for this loop) with a bar."""
    with ProgressBar(handle) as bar:
        while not future.done():
            bar.update()
            await asyncio.wait({future}, timeout=REFRESH)
        bar.update()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _isatty(stream: Any) -> bool:
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
