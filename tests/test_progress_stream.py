"""The creator's progress bar (drawn on a terminal only) and its result streams:
``project.as_completed()`` and ``async for item, value in project``, on the embedded default
and on a real server."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import WorkerProcess

from dcproto import Distribute, TaskFailed
from dcproto.creator.run import FeedPaused
from dcproto.users import User

pytestmark = pytest.mark.timeout(90)

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")

SCRIPT = """
import asyncio, sys, time
from dcproto import Distribute

mode = sys.argv[1]

@Distribute(iterator=range(30), local_workers=2, progress=mode != "off-class")
class Squares:
    @staticmethod
    def parallel_func(x):
        time.sleep(0.01)
        return x * x

project = Squares()
if mode == "async":
    results = asyncio.run(project.results())
elif mode == "off-call":
    results = project.get_results(progress=False)
else:
    results = project.get_results()
assert results == {x: x * x for x in range(30)}, results
print("got", len(results))
"""


def run_script(tmp_path: Path, mode: str, *, tty: bool) -> tuple[str, bytes]:
    """Run SCRIPT in ``mode`` with stderr on a pseudo-terminal (or a pipe); its stdout and
    everything written to its stderr."""
    script = tmp_path / "squares.py"
    script.write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "160"}
    command = [sys.executable, str(script), mode]
    if not tty:
        done = subprocess.run(command, capture_output=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.decode(), done.stderr
    master, slave = os.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # the bar must never block on a full terminal
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every end of the slave is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=slave, env=env)
    finally:
        os.close(slave)
    reader.start()
    out, _ = proc.communicate(timeout=60)
    reader.join(timeout=10)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks)
    return out.decode(), b"".join(chunks)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_bar_is_drawn_on_a_terminal(tmp_path: Path, mode: str) -> None:
    out, terminal = run_script(tmp_path, mode, tty=True)
    assert out == "got 30\n"
    text = ANSI.sub(b"", terminal).decode("utf-8", "replace")
    # the last frame stays: the project, its items done of the total, rate, time, workers
    assert "Squares done" in text
    assert "30/30" in text
    assert "items/s" in text
    assert "took " in text
    assert "workers busy" in text
    assert "0 failures" in text


def test_nothing_is_printed_without_a_terminal(tmp_path: Path) -> None:
    out, err = run_script(tmp_path, "sync", tty=False)
    assert out == "got 30\n"
    assert err == b""


@pytest.mark.parametrize("mode", ["off-class", "off-call"])
def test_progress_false_draws_nothing_even_on_a_terminal(tmp_path: Path, mode: str) -> None:
    out, terminal = run_script(tmp_path, mode, tty=True)
    assert out == "got 30\n"
    assert terminal == b""


# ---- streams -------------------------------------------------------------------------------------


class Gate:
    """The items 0..9, with a pause after 0..4 until :meth:`open`: till then the project
    cannot end (its creator has not sent all its items), yet the first results come. It
    pauses the way ``dcproto.Executor`` feeds its project (FeedPaused, on the creator's
    background loop), so nothing depends on timing nor on a file the workers could see."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened = False
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._next = 0

    def __iter__(self) -> Gate:
        return self

    def __next__(self) -> int:
        if self._next == 10:
            raise StopIteration
        if self._next == 5:
            with self._lock:
                if not self._opened:
                    loop = asyncio.get_running_loop()  # the creator's background loop
                    future = loop.create_future()
                    self._waiter = (loop, future)
                    raise FeedPaused(future)
        self._next += 1
        return self._next - 1

    def open(self) -> None:
        with self._lock:
            self._opened = True
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))


def gated(gate: Gate, **options: Any) -> type:
    """A project of the 10 items of ``gate``."""

    @Distribute(iterator=lambda: gate, **options)
    class Gated:
        @staticmethod
        def parallel_func(number: int) -> int:
            return number * 10

    return Gated


EXPECTED = {i: i * 10 for i in range(10)}


def test_as_completed_yields_results_before_the_project_ends() -> None:
    gate = Gate()
    project = gated(gate, local_workers=2)()
    stream = project.as_completed(timeout=60)
    first = next(stream)
    assert not project.done()  # items 5..9 wait for the gate: the stream did not wait
    gate.open()
    pairs = [first, *stream]
    assert len(pairs) == 10  # every item once
    assert dict(pairs) == EXPECTED
    # started after the end: everything that arrived, then the end
    assert dict(project.as_completed()) == EXPECTED
    assert project.get_results() == dict(pairs)


async def test_async_for_streams_on_the_embedded_default() -> None:
    gate = Gate()
    project = gated(gate, local_workers=2)()
    pairs = []
    async for item, value in project:
        pairs.append((item, value))
        if len(pairs) == 1:
            assert not project.done()
            gate.open()
    assert len(pairs) == 10
    assert dict(pairs) == EXPECTED
    assert await project.results() == dict(pairs)


def test_as_completed_raises_the_projects_error_after_its_results() -> None:
    @Distribute(iterator=range(6), local_workers=1)
    class Fails:
        @staticmethod
        def parallel_func(x: int) -> int:
            if x == 5:
                raise ValueError("five")
            return x

    project = Fails()
    seen = []
    with pytest.raises(TaskFailed, match="five"):
        for item, value in project.as_completed(timeout=60):
            seen.append((item, value))
    assert all(item == value and item != 5 for item, value in seen)
    with pytest.raises(TaskFailed):
        project.get_results(progress=False)


def test_as_completed_includes_the_stopping_value() -> None:
    @Distribute(iterator=range(1000), local_workers=1, stop_func="stop")
    class Stops:
        @staticmethod
        def parallel_func(x: int) -> int:
            return x

        @staticmethod
        def stop(value: int) -> bool:
            return value == 3

    project = Stops()
    pairs = dict(project.as_completed(timeout=60))
    assert project.get_results() == {3: 3}
    assert pairs[3] == 3 and all(item == value for item, value in pairs.items())


def test_several_streams_at_once_and_a_stream_left_early() -> None:
    gate = Gate()
    project = gated(gate, local_workers=2)()
    left = project.as_completed(timeout=60)
    next(left)
    del left  # dropped before its end: it unsubscribes, the others go on
    results: list[dict[Any, Any]] = []
    threads = [
        threading.Thread(target=lambda: results.append(dict(project.as_completed(timeout=60))))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    gate.open()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [EXPECTED] * 3


# ---- on a real server ----------------------------------------------------------------------------


def test_streams_on_a_real_server(start_worker: Callable[..., WorkerProcess], user: User) -> None:
    start_worker()
    gate = Gate()
    project = gated(gate, user_name="home")()
    stream = project.as_completed(timeout=60)
    first = next(stream)
    assert not project.done()
    gate.open()
    pairs = [first, *stream]
    assert len(pairs) == 10 and dict(pairs) == EXPECTED

    @Distribute(user_name="home", iterator=range(40), task_size=3)
    class Cubes:
        @staticmethod
        def parallel_func(x: int) -> int:
            return x**3

    async def collect() -> list[tuple[Any, Any]]:
        return [pair async for pair in Cubes()]

    cubes = asyncio.run(collect())
    assert len(cubes) == 40 and dict(cubes) == {x: x**3 for x in range(40)}
