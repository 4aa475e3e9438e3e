"""Runs tasks in reusable child processes, so user code can raise, crash or hang safely.

Each slot is one ``python -m dcproto.child`` process. A task waits for an idle child, which is
loaded with the project's code the first time it runs one of that project's tasks. A child that
dies mid-task yields outcome ``crash`` and is replaced; a task over its time limit or abandoned
gets SIGUSR1 (the child answers at once if user code is in Python) and, if the child does not
answer within ``KILL_GRACE`` seconds, SIGKILL and a fresh child.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from . import protocol as p
from .child import MAX_LOADED_PROJECTS, OUTPUT_DIR_ENV

log = logging.getLogger("dcproto.runner")

KILL_GRACE = 1.0  # seconds a child gets to give up a task before it is killed
SPAWN_TIMEOUT = 30.0


@dataclass(slots=True)
class Outcome:
    """What a task attempt produced; maps one to one onto :class:`protocol.Result` fields."""

    outcome: str
    payload: bytes = b""
    n_items: int = 0
    n_kept: int = 0
    error: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    files: list[Any] = field(default_factory=list)


class Child:
    """One child process and its command channel."""

    _ids = itertools.count(1)

    def __init__(self, workdir: Path) -> None:
        self.number = next(self._ids)
        self.workdir = workdir
        self.process: asyncio.subprocess.Process | None = None
        # the projects the child holds, in the child's own LRU order (see child.main)
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.running: tuple[int, int] | None = None  # (task_id, attempt) in the child now
        self.answer: asyncio.Future[list[Any]] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.generation = 0
        self.output_dir: Path | None = None  # the child's $DCPROTO_OUTPUT_DIR

    async def start(self) -> None:
        if self.output_dir is not None:
            shutil.rmtree(self.output_dir, ignore_errors=True)  # what a dead child left
        self.generation += 1
        self.output_dir = self.workdir / f"child-{self.number}-{self.generation}"
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from dcproto.child import main; main()",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=p.DEFAULT_MAX_FRAME * 2,
            env={**os.environ, OUTPUT_DIR_ENV: str(self.output_dir)},
        )
        self.loaded.clear()
        self._reader = asyncio.create_task(self._read_answers(self.process))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def _read_answers(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        try:
            while True:
                header = await process.stdout.readexactly(p.HEADER.size)
                (size,) = p.HEADER.unpack(header)
                body = await process.stdout.readexactly(size)
                answer = msgpack.unpackb(body, raw=False)
                if self.answer is not None and not self.answer.done():
                    self.answer.set_result(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await process.wait()
        if self.process is process and self.answer is not None and not self.answer.done():
            self.answer.set_exception(ChildDied(code))

    def send(self, command: list[Any]) -> None:
        assert self.process is not None and self.process.stdin is not None
        body = msgpack.packb(command, use_bin_type=True)
        self.process.stdin.write(p.HEADER.pack(len(body)) + body)

    def signal(self, signum: int) -> None:
        if self.alive:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.alive:
            self.signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader


class ChildDied(Exception):
    def __init__(self, returncode: int) -> None:
        if returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
        else:
            how = f"exited with code {returncode}"
        super().__init__(f"the child process running the task {how}")
        self.returncode = returncode


class Runner:
    """A pool of ``slots`` child processes. ``await run(project, task)`` gives an Outcome."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self._tmp = tempfile.TemporaryDirectory(prefix="dcproto-worker-")
        self.workdir = Path(self._tmp.name)
        self._children = [Child(self.workdir) for _ in range(slots)]
        self._idle: asyncio.Queue[Child] = asyncio.Queue()
        # keyed by (task_id, attempt): a re-sent task may overlap its abandoned attempt
        self._abandoned: set[tuple[int, int]] = set()
        self._running: dict[tuple[int, int], Child] = {}

    async def start(self) -> None:
        await asyncio.gather(*(child.start() for child in self._children))
        for child in self._children:
            self._idle.put_nowait(child)

    async def close(self) -> None:
        await asyncio.gather(*(child.stop() for child in self._children))
        self._tmp.cleanup()

    def abandon(self, task_id: int) -> bool:
        """Ask the children running ``task_id`` (any attempt) to give it up. False if none is."""
        keys = [key for key in self._running if key[0] == task_id]
        for key in keys:
            self._abandoned.add(key)
            self._give_up(self._running[key], key)
        return bool(keys)

    def is_running(self, task_id: int, attempt: int) -> bool:
        return (task_id, attempt) in self._running

    async def run(self, project: p.Project, task: p.Task) -> Outcome:
        """Run ``task`` in an idle child. Cancelling this coroutine while it waits for a child
        is safe; once running, abandon it with :meth:`abandon` instead."""
        child = await self._idle.get()
        try:
            if not child.alive:
                await child.start()
            return await self._run_in(child, project, task)
        finally:
            self._running.pop((task.task_id, task.attempt), None)
            self._abandoned.discard((task.task_id, task.attempt))
            child.running = None
            self._idle.put_nowait(child)

    async def _run_in(self, child: Child, project: p.Project, task: p.Task) -> Outcome:
        if project.project_id not in child.loaded:
            child.send(
                [
                    "load",
                    project.project_id,
                    project.code,
                    project.modules,
                    project.parallel,
                    project.stop,
                    project.only_if,
                    project.options.get("errors", "raise"),
                ]
            )
            child.loaded[project.project_id] = None
            while len(child.loaded) > MAX_LOADED_PROJECTS:
                child.loaded.popitem(last=False)
        child.loaded.move_to_end(project.project_id)
        loop = asyncio.get_running_loop()
        child.answer = loop.create_future()
        key = child.running = (task.task_id, task.attempt)
        self._running[key] = child
        child.send(["run", task.task_id, task.project_id, task.items])
        outcome = await self._answer(child, project, task)
        if not child.alive and child.output_dir is not None:
            shutil.rmtree(child.output_dir, ignore_errors=True)  # it died before emptying it
        return outcome

    async def _answer(self, child: Child, project: p.Project, task: p.Task) -> Outcome:
        timeout = project.options.get("task_timeout")
        timed_out = False
        answer: list[Any] | None
        try:
            answer = await asyncio.wait_for(asyncio.shield(child.answer), timeout)
        except TimeoutError:
            timed_out = True
            self._give_up(child, (task.task_id, task.attempt))
            try:
                answer = await child.answer
            except ChildDied:
                answer = None
        except ChildDied as exc:
            if (task.task_id, task.attempt) in self._abandoned:
                return Outcome("abandoned")
            return Outcome("crash", error={"message": str(exc), "returncode": exc.returncode})
        if timed_out:
            return Outcome(
                "timeout",
                error={"message": f"the task ran longer than its time limit of {timeout} s"},
            )
        if (task.task_id, task.attempt) in self._abandoned or answer is None:
            return Outcome("abandoned")  # even a late "ok" is not wanted any more
        _, _, outcome, payload, n_items, n_kept, error, stats, files = answer
        if outcome == "abandoned":
            outcome = "crash"  # a stray signal; count it as a failed attempt, not a success
        return Outcome(outcome, payload, n_items, n_kept, error, stats, files)

    def _give_up(self, child: Child, key: tuple[int, int]) -> None:
        """SIGUSR1 now; SIGKILL if the child is still on this task after KILL_GRACE."""
        child.signal(signal.SIGUSR1)
        answer = child.answer

        def escalate() -> None:
            if child.running == key and answer is not None and not answer.done():
                log.warning("child %d did not give up task %s; killing it", child.number, key)
                child.signal(signal.SIGKILL)

        asyncio.get_running_loop().call_later(KILL_GRACE, escalate)


def default_slots() -> int:
    return os.cpu_count() or 1
