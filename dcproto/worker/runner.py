"""Runs tasks in reusable child processes, so user code can raise, crash or hang safely.

Each slot is one ``python -m dcproto.child`` process. A task goes to the child with the fewest
tasks, which is loaded with the project's code the first time it runs one of that project's
tasks. A child holds one task at a time, except for short tasks with no time limit: then it is
sent up to ``PIPELINE_DEPTH`` at once and runs them back to back, never waiting for the worker
between two of them (and one write carries several). A child that dies mid-task yields outcome
``crash`` and is replaced (the tasks queued behind it are handed back as ``abandoned``).

To abandon a task (or end one over its time limit) the runner writes its (task_id, attempt) to
the child's abandon pipe, then sends SIGUSR1. The child reads the pipe whenever the signal
comes and before it starts each task, so the request is never lost: the running task is
interrupted if it is the one named (at once, if user code is in Python), a queued one is
answered ``abandoned`` without running, and a signal that lands between two tasks harms
neither. A child still on the task ``KILL_GRACE`` seconds later gets SIGKILL and is replaced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from .. import protocol as p
from ..paths import OUTPUT_DIR_ENV
from .child import MAX_LOADED_PROJECTS

log = logging.getLogger("dcproto.runner")

KILL_GRACE = 1.0  # seconds a child gets to give up a task before it is killed
ABANDON_RECORD = struct.Struct(">QI")  # (task_id, attempt) on the abandon pipe
SPAWN_TIMEOUT = 30.0
PIPELINE_DEPTH = 4  # tasks a child may hold at once, when they are short
SHORT_TASK = 0.002  # seconds: a project whose tasks average less is pipelined
MAX_TIMED_PROJECTS = 256  # projects whose task times are remembered


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
        # tasks sent and not answered, in the order the child runs them: the first is running
        self.queue: OrderedDict[tuple[int, int], asyncio.Future[tuple[list[Any], float]]] = (
            OrderedDict()
        )
        self.reserved = 0  # tasks given to this child (sent or about to be)
        self.busy_since = 0.0  # when the child began its current task (see ``service``)
        self._abandon_fd: int | None = None  # write end of the child's abandon pipe
        self._reader: asyncio.Task[None] | None = None
        self._starting: asyncio.Future[None] | None = None
        self.generation = 0
        self.output_dir: Path | None = None  # the child's $DCPROTO_OUTPUT_DIR

    @property
    def running(self) -> tuple[int, int] | None:
        """The (task_id, attempt) the child is on now, if any."""
        return next(iter(self.queue), None)

    async def ensure_started(self) -> None:
        """Start the process if it is not running; tasks sharing the child start it once."""
        if self.alive:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self.start())
        await asyncio.shield(self._starting)

    async def start(self) -> None:
        if self.output_dir is not None:
            shutil.rmtree(self.output_dir, ignore_errors=True)  # what a dead child left
        self.generation += 1
        self.output_dir = self.workdir / f"child-{self.number}-{self.generation}"
        self._close_abandon_pipe()
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)  # a record is 12 bytes: a full pipe drops it
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "from dcproto.worker.child import main; main()",
                str(read_end),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=p.DEFAULT_MAX_FRAME * 2,
                env={**child_environment(), OUTPUT_DIR_ENV: str(self.output_dir)},
                pass_fds=(read_end,),
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._abandon_fd = write_end
        self.loaded.clear()
        # a queue per process: whatever was sent to a process that died is failed by that
        # process's reader, even once a task has started the next process
        self.queue = OrderedDict()
        self._reader = asyncio.create_task(self._read_answers(self.process, self.queue))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def _close_abandon_pipe(self) -> None:
        if self._abandon_fd is not None:
            os.close(self._abandon_fd)
            self._abandon_fd = None

    def abandon(self, key: tuple[int, int]) -> None:
        """Tell the child to give up ``key``, running or queued (see the module docstring)."""
        if self._abandon_fd is None or not self.alive:
            return
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._abandon_fd, ABANDON_RECORD.pack(*key))
        self.signal(signal.SIGUSR1)

    async def _read_answers(
        self,
        process: asyncio.subprocess.Process,
        queue: OrderedDict[tuple[int, int], asyncio.Future[tuple[list[Any], float]]],
    ) -> None:
        assert process.stdout is not None
        try:
            while True:
                header = await process.stdout.readexactly(p.HEADER.size)
                (size,) = p.HEADER.unpack(header)
                body = await process.stdout.readexactly(size)
                answer = msgpack.unpackb(body, raw=False)
                if queue:  # answers come in the order the tasks were sent
                    _, future = queue.popitem(last=False)
                    now = time.monotonic()
                    # the child's time on this task: from when it could start it to its answer
                    service, self.busy_since = now - self.busy_since, now
                    if not future.done():
                        future.set_result((answer, service))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await process.wait()
        lost = list(queue.values())
        queue.clear()
        for index, future in enumerate(lost):
            if not future.done():  # the first was running; the others never started
                future.set_exception(ChildDied(code) if index == 0 else ChildGone())

    def run(self, key: tuple[int, int], command: list[Any]) -> asyncio.Future[Any]:
        """Send a run command; the future gets (answer, service seconds)."""
        future: asyncio.Future[tuple[list[Any], float]] = asyncio.get_running_loop().create_future()
        if not self.queue:
            self.busy_since = time.monotonic()
        self.queue[key] = future
        self.send(command)
        return future

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
        self._close_abandon_pipe()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader


class ChildGone(Exception):
    """The child died before it started this task (another one crashed it)."""


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
        # tasks waiting for a place in a child, oldest first: (depth allowed, where it goes)
        self._waiting: collections.deque[tuple[int, asyncio.Future[Child]]] = collections.deque()
        # keyed by (task_id, attempt): a re-sent task may overlap its abandoned attempt
        self._abandoned: set[tuple[int, int]] = set()
        self._running: dict[tuple[int, int], Child] = {}
        # per project (the latest MAX_TIMED_PROJECTS): the average time one of its tasks takes
        self._task_seconds: OrderedDict[str, float] = OrderedDict()

    async def start(self) -> None:
        """Start every child (a task that needs one meanwhile waits for the same start)."""
        await asyncio.gather(*(child.ensure_started() for child in self._children))

    async def close(self) -> None:
        await asyncio.gather(*(child.stop() for child in self._children))
        self._tmp.cleanup()

    def abandon(self, task_id: int, *, started: bool = True) -> bool:
        """Ask the children holding ``task_id`` (any attempt) to give it up: a queued one is
        answered ``abandoned`` without running, a running one is interrupted. With
        ``started=False`` (a recall) a task the child is already running is left to finish.
        False if no child holds it."""
        keys = [key for key in self._running if key[0] == task_id]
        for key in keys:
            child = self._running[key]
            if child.running == key:
                if not started:
                    continue
                self._abandoned.add(key)
                self._give_up(child, key)
            else:
                self._abandoned.add(key)
                child.abandon(key)
        return bool(keys)

    def is_running(self, task_id: int, attempt: int) -> bool:
        return (task_id, attempt) in self._running

    def _depth(self, project: p.Project) -> int:
        """How many tasks of ``project`` a child may hold at once."""
        if project.options.get("task_timeout") is not None:
            return 1  # its clock starts when it is sent
        seconds = self._task_seconds.get(project.project_id)
        return PIPELINE_DEPTH if seconds is not None and seconds < SHORT_TASK else 1

    def _least_loaded(self, depth: int) -> Child | None:
        """The child with the fewest tasks, if it has fewer than ``depth``."""
        child = min(self._children, key=lambda c: c.reserved)
        return child if child.reserved < depth else None

    async def _child_for(self, depth: int) -> Child:
        """A child for one more task, reserved. Waiting tasks are served in arrival order,
        one per freed place (waking every waiter at each answer cost more than the task)."""
        child = None if self._waiting else self._least_loaded(depth)
        if child is not None:
            child.reserved += 1
            return child
        handed: asyncio.Future[Child] = asyncio.get_running_loop().create_future()
        self._waiting.append((depth, handed))
        try:
            return await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():  # a child came just as we left
                handed.result().reserved -= 1
            else:  # gone from the line, which must not stay blocked by a task that left it
                with contextlib.suppress(ValueError):
                    self._waiting.remove((depth, handed))
            self._hand_out()
            raise

    def _hand_out(self) -> None:
        """Give freed places to the tasks waiting longest."""
        while self._waiting:
            depth, handed = self._waiting[0]
            if handed.done():  # its task was cancelled
                self._waiting.popleft()
                continue
            child = self._least_loaded(depth)
            if child is None:
                return
            self._waiting.popleft()
            child.reserved += 1
            handed.set_result(child)

    async def run(self, project: p.Project, task: p.Task) -> Outcome:
        """Run ``task`` in a child. Cancelling this coroutine while it waits for a child is
        safe; once running, abandon it with :meth:`abandon` instead."""
        child = await self._child_for(self._depth(project))
        key = (task.task_id, task.attempt)
        try:
            await child.ensure_started()
            outcome = await self._run_in(child, project, task)
        finally:
            self._running.pop(key, None)
            self._abandoned.discard(key)
            child.reserved -= 1
            self._hand_out()
        spent = outcome.stats.get("exec")
        if outcome.outcome == "ok" and isinstance(spent, float):
            previous = self._task_seconds.pop(project.project_id, spent)
            self._task_seconds[project.project_id] = 0.8 * previous + 0.2 * spent
            if len(self._task_seconds) > MAX_TIMED_PROJECTS:
                self._task_seconds.popitem(last=False)
        return outcome

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
                    project.options.get("trust_workers", False) is True,
                ]
            )
            child.loaded[project.project_id] = None
            while len(child.loaded) > MAX_LOADED_PROJECTS:
                child.loaded.popitem(last=False)
        child.loaded.move_to_end(project.project_id)
        key = (task.task_id, task.attempt)
        self._running[key] = child
        answer = child.run(key, ["run", task.task_id, task.attempt, task.project_id, task.items])
        outcome = await self._answer(child, project, task, answer)
        if not child.alive and child.output_dir is not None:
            shutil.rmtree(child.output_dir, ignore_errors=True)  # it died before emptying it
        return outcome

    async def _answer(
        self,
        child: Child,
        project: p.Project,
        task: p.Task,
        future: asyncio.Future[tuple[list[Any], float]],
    ) -> Outcome:
        key = (task.task_id, task.attempt)
        timeout = project.options.get("task_timeout")
        timed_out = False
        answer: tuple[list[Any], float] | None
        try:
            if timeout is None:
                answer = await future
            else:  # the task is alone in its child (see _depth): its clock starts now
                answer = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            timed_out = True
            self._give_up(child, key)
            try:
                answer = await future
            except (ChildDied, ChildGone):
                answer = None
        except ChildGone:
            return Outcome("abandoned")  # never started: hand it back, not a failed attempt
        except ChildDied as exc:
            if key in self._abandoned:
                return Outcome("abandoned")
            return Outcome("crash", error={"message": str(exc), "returncode": exc.returncode})
        if timed_out:
            return Outcome(
                "timeout",
                error={"message": f"the task ran longer than its time limit of {timeout} s"},
            )
        if answer is None:
            return Outcome("abandoned")
        (_, _, outcome, payload, n_items, n_kept, error, stats, files), service = answer
        if key in self._abandoned:
            return Outcome("abandoned")  # even a late "ok" is not wanted any more
        if outcome == "abandoned":  # the child gives a task up only when told to
            outcome = "crash"
            error = {"message": "the child gave up a task nobody abandoned"}
        if isinstance(stats, dict):
            stats["service"] = service
        return Outcome(outcome, payload, n_items, n_kept, error, stats, files)

    def _give_up(self, child: Child, key: tuple[int, int]) -> None:
        """Tell the child to give up ``key`` now; SIGKILL if it is still on it after
        KILL_GRACE (user code stuck outside Python)."""
        child.abandon(key)
        answer = child.queue.get(key)

        def escalate() -> None:
            if child.running == key and answer is not None and not answer.done():
                log.warning("child %d did not give up task %s; killing it", child.number, key)
                child.signal(signal.SIGKILL)

        asyncio.get_running_loop().call_later(KILL_GRACE, escalate)


def default_slots() -> int:
    return os.cpu_count() or 1


def child_environment() -> dict[str, str]:
    """The worker's environment without its credentials: user code never sees a token."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("DCPROTO_") or name == OUTPUT_DIR_ENV
    }
