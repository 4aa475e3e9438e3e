"""A project's results as they arrive: ``project.as_completed()`` and ``async for``.

A :class:`ResultStream` is one consumer's queue of ``(item, value)`` pairs. The project's run
(on the background loop) pushes into it: first every result that arrived before the stream
was subscribed, then each task's as it comes, then closes it when the project ends. The
consumer takes them from any thread (:meth:`ResultStream.take`) or any event loop
(:meth:`ResultStream.take_async`); a stream nobody holds any more unsubscribes itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .creator import ProjectHandle

Pair = tuple[Any, Any]


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ResultStream:
    """``(item, value)`` pairs for one consumer, pushed by the background loop."""

    def __init__(self) -> None:
        self._ready = threading.Condition(threading.Lock())
        self._pending: collections.deque[Pair] = collections.deque()
        self._closed = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # ---- the producer: the project's run, on the background loop ---------------------------

    def push(self, pairs: Iterable[Pair]) -> None:
        with self._ready:
            before = len(self._pending)
            self._pending.extend(pairs)
            if len(self._pending) > before:
                self._wake()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._wake()

    def _wake(self) -> None:  # with the lock held
        self._ready.notify_all()
        for loop, future in self._waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, future)
        self._waiters.clear()

    # ---- the consumer ----------------------------------------------------------------------

    def _taken(self) -> tuple[list[Pair], bool] | None:  # with the lock held
        if self._pending or self._closed:
            pairs = list(self._pending)
            self._pending.clear()
            return pairs, self._closed
        return None

    def take(self, timeout: float | None = None) -> tuple[list[Pair], bool]:
        """What arrived (waiting for something, or the end), and whether the stream ended.
        Raises TimeoutError after ``timeout`` seconds without either."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while (taken := self._taken()) is None:
                # in slices: a wait on a lock is not interrupted by Ctrl-C everywhere
                wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError
                self._ready.wait(wait)
            return taken

    async def take_async(self) -> tuple[list[Pair], bool]:
        """:meth:`take`, awaited on the caller's event loop."""
        loop = asyncio.get_running_loop()
        while True:
            with self._ready:
                taken = self._taken()
                if taken is not None:
                    return taken
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, future))
            await future


class _Completed:
    """What ``as_completed()`` and ``async for`` iterate over: the pairs of one stream, then
    the project's error if it failed (as ``get_results()`` raises it)."""

    def __init__(self, handle: ProjectHandle, timeout: float | None = None) -> None:
        from .client import background_loop

        self._handle = handle
        self._stream = stream = ResultStream()
        self._batch: collections.deque[Pair] = collections.deque()
        self._ended = False
        self._over = False
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        run, loop = handle._run, background_loop()
        loop.call_soon_threadsafe(run.subscribe, stream)
        # dropped before its end (a break out of the loop): stop filling the stream
        self._unsubscribe: Callable[[], Any] = weakref.finalize(
            self, _unsubscribe, loop, run, stream
        )

    def _next_pair(self) -> Pair | None:
        """The next pair taken already; None once the stream ended and all were given.
        At the end, raises the project's error (if any)."""
        if self._batch:
            return self._batch.popleft()
        if not self._ended:
            return None
        if not self._over:
            self._over = True
            self._unsubscribe()
            # the project has ended: its outcome is there (a failure raises, like get_results)
            self._handle._future.result()
        raise StopIteration

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return self._deadline - time.monotonic()

    def _timed_out(self) -> TimeoutError:
        return TimeoutError(
            f"project {self._handle.name} not finished after {self._timeout} s "
            "(it goes on: iterate again, or call get_results())"
        )

    # ---- sync -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Pair]:
        return self

    def __next__(self) -> Pair:
        from .creator import _mark_interrupt

        while True:
            pair = self._next_pair()
            if pair is not None:
                return pair
            remaining = self._remaining()
            try:
                pairs, self._ended = self._stream.take(
                    None if remaining is None else max(0.0, remaining)
                )
            except TimeoutError:
                raise self._timed_out() from None
            except KeyboardInterrupt as exc:
                _mark_interrupt(exc, self._handle._interrupted_text())
                raise
            self._batch.extend(pairs)

    # ---- async ------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Pair]:
        return self

    async def __anext__(self) -> Pair:
        while True:
            try:
                pair = self._next_pair()
            except StopIteration:
                raise StopAsyncIteration from None
            if pair is not None:
                return pair
            remaining = self._remaining()
            try:
                pairs, self._ended = await asyncio.wait_for(
                    self._stream.take_async(), None if remaining is None else max(0.0, remaining)
                )
            except TimeoutError:
                raise self._timed_out() from None
            self._batch.extend(pairs)


def _unsubscribe(loop: asyncio.AbstractEventLoop, run: Any, stream: ResultStream) -> None:
    # the loop may close meanwhile (at exit): nothing to unsubscribe from then
    with contextlib.suppress(RuntimeError):
        if not loop.is_closed():
            loop.call_soon_threadsafe(run.unsubscribe, stream)
