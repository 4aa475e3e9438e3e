"""Runs tasks in reusable child processes, so user code can raise, crash or hang safely.

One creator per child process: a child is bound to the owner (creator) of the first project it
is given and only ever runs that owner's projects, so no creator's code shares a process
(patched builtins, modules, state) with another's. A project whose owner is unknown gets a
child of its own. A child keeps up to ``MAX_LOADED`` projects loaded (the least recently used
is unloaded), so a creator's one-item projects in a row reuse a warm process. At most
``slots`` children run tasks at once. A task goes to an idle child of its owner; else to a
clean child (never loaded), which is then bound; else, if the project's tasks are short, it
queues in a busy child of its owner; else, if a slot is free, the idle child used longest ago
is replaced by a fresh process for the owner. Clean
children are started ahead of need: when the last clean one is bound, one more ("spare") is
started in the background, up to ``slots + SPARES`` processes in all, so a new project rarely
waits for a spawn. A child holds one task at a time, except for short tasks with no time
limit: then it is sent up to ``PIPELINE_DEPTH`` at once and runs them back to back, never
waiting for the worker between two of them (and one write carries several). A child that dies
mid-task yields outcome ``crash`` and is replaced (the tasks queued behind it are handed back
as ``abandoned``).

To abandon a task (or end one over its time limit) the runner writes its (task_id, attempt) to
the child's abandon pipe, then sends SIGUSR1. The child reads the pipe whenever the signal
comes and before it starts each task, so the request is never lost: the running task is
interrupted if it is the one named (at once, if user code is in Python), a queued one is
answered ``abandoned`` without running, and a signal that lands between two tasks harms
neither. A child still on the task ``KILL_GRACE`` seconds later gets SIGKILL and is replaced.

Whenever the runner kills a child (that escalation, a cap, ``close``) it kills every process
under it too, found by walking /proc (sessions and double forks do not hide them): see
:func:`child.kill_tree`. The child does the same after each task itself.

Caps the volunteer sets (:class:`TaskLimits`, see :meth:`Runner.set_limits`) go to each child
before its project's code: the child enforces them (see :mod:`dcproto.worker.child`) and answers
``memory``, ``cpu_time`` or ``disk``. As user code can lift a soft limit or ignore SIGXCPU, and
RLIMIT_AS caps one process, not what it starts, the runner also looks at the process trees of
running tasks every ``WATCH_INTERVAL`` seconds and kills a child whose task has used
``CPU_GRACE`` CPU seconds more than ``max_task_seconds``, or whose tree holds more than
``max_memory``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from .. import protocol as p
from .child import MAX_LOADED, cap_error, kill_tree, tree_usage
from .sandbox import Sandbox, SandboxOptions, launch

log = logging.getLogger("dcproto.runner")

KILL_GRACE = 1.0  # seconds a child gets to give up a task before it is killed
ABANDON_RECORD = struct.Struct(">QI")  # (task_id, attempt) on the abandon pipe
SPAWN_TIMEOUT = 30.0  # seconds a new child may take to say it is ready
PIPELINE_DEPTH = 16  # tasks a child may hold at once, when they are short
SHORT_TASK = 0.002  # seconds: a project whose tasks average less is pipelined
MAX_TIMED_PROJECTS = 256  # projects whose task times are remembered
SPARES = 1  # clean children started ahead of need, beyond the slots
WATCH_INTERVAL = 0.5  # seconds between two looks at the processes of running tasks
CPU_GRACE = 2.0  # CPU seconds past max_task_seconds before the runner kills the child


@dataclass(frozen=True, slots=True)
class TaskLimits:
    """Caps the volunteer sets on every task; None is no cap."""

    max_memory: int | None = None  # bytes per slot: address space of the child and each process
    max_task_seconds: float | None = None  # CPU seconds per task (its processes' included)
    max_disk: int | None = None  # bytes one task may leave in its output dir (and per file)

    def __post_init__(self) -> None:
        for name in ("max_memory", "max_task_seconds", "max_disk"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, or None for no cap")

    def command(self) -> list[Any]:
        """The child's ``limits`` command."""
        return [
            "limits",
            None if self.max_memory is None else int(self.max_memory),
            None if self.max_task_seconds is None else float(self.max_task_seconds),
            None if self.max_disk is None else int(self.max_disk),
        ]


NO_LIMITS = TaskLimits()

# why the runner killed a child process (read by its reader, for the task it was on)
_kill_reasons: weakref.WeakKeyDictionary[asyncio.subprocess.Process, str] = (
    weakref.WeakKeyDictionary()
)
# set when a child process has said it is ready (see _read_answers)
_ready: weakref.WeakKeyDictionary[asyncio.subprocess.Process, asyncio.Future[None]] = (
    weakref.WeakKeyDictionary()
)
_background: set[asyncio.Future[Any]] = set()


def _ready_future(process: asyncio.subprocess.Process) -> asyncio.Future[None]:
    future = _ready.get(process)
    if future is None:
        future = _ready[process] = asyncio.get_running_loop().create_future()
    return future


def _in_background(work: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
    """Run ``work`` without waiting for it; a failure is logged."""
    future = asyncio.ensure_future(work)
    _background.add(future)

    def done(future: asyncio.Future[Any]) -> None:
        _background.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.error("child process management failed: %s", exc, exc_info=exc)

    future.add_done_callback(done)
    return future


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

    # Set by the runner (see Runner._pick): whose projects this child's process serves (see
    # binding), or will once loaded (None: a clean child), and the caps it got or will get.
    bound: str | None = None
    bound_limits: TaskLimits | None = None
    last_used = 0.0  # when it last finished a task (monotonic): the oldest idle one is replaced
    # (pid, task, CPU seconds of its tree when the runner first saw it running the task)
    watched: tuple[int, tuple[int, int], float] | None = None

    def __init__(self, workdir: Path, sandbox: Sandbox | None = None) -> None:
        self.number = next(self._ids)
        self.workdir = workdir
        # how the process is started (None: no namespaces, no drop, scrubbed environment)
        self.sandbox = sandbox if sandbox is not None else Sandbox(SandboxOptions(mode="off"))
        self.child_dir: Path | None = None  # the process's private HOME, cwd and TMPDIR
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
        # frames for the child not written yet: everything sent in one loop turn goes in one
        # write, so the child is woken once for several commands
        self._unsent: list[bytes] = []
        self.output_dir: Path | None = None  # the child's $DCPROTO_OUTPUT_DIR

    @property
    def running(self) -> tuple[int, int] | None:
        """The (task_id, attempt) the child is on now, if any."""
        return next(iter(self.queue), None)

    async def ensure_started(self) -> None:
        """Start the process if it is not running (or wait for the start or replacement in
        progress) and until it is ready; tasks sharing the child start it once."""
        if self._starting is not None and not self._starting.done():
            await asyncio.shield(self._starting)
        if not self.alive:
            if self._starting is None or self._starting.done():
                self._starting = asyncio.ensure_future(self._start_ready())
            await asyncio.shield(self._starting)

    async def _start_ready(self) -> None:
        """Start the process and wait until it has said it is ready, so that no task's
        clock counts an interpreter starting up."""
        await self.start()
        process = self.process
        assert process is not None
        try:
            await asyncio.wait_for(asyncio.shield(_ready_future(process)), SPAWN_TIMEOUT)
        except TimeoutError:
            log.warning("child %d not ready after %s s; killing it", self.number, SPAWN_TIMEOUT)
            await _kill_process_tree(process, "runner")

    def start_soon(self) -> None:
        """Start the process in the background (a spare): a task given the child meanwhile
        waits for it in :meth:`ensure_started`."""
        if not self.alive and (self._starting is None or self._starting.done()):
            self._starting = _in_background(self._start_ready())

    def replace(self) -> None:
        """Swap the process for a fresh one, in the background (as :meth:`start_soon`)."""
        previous = self._starting

        async def swap() -> None:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            await self.stop()
            await self._start_ready()

        self._starting = _in_background(swap())

    async def shutdown(self) -> None:
        """Stop the process for good, after any start in progress."""
        if self._starting is not None and not self._starting.done():
            await asyncio.wait([self._starting])
        await self.stop()

    async def start(self) -> None:
        if self.output_dir is not None:
            shutil.rmtree(self.output_dir, ignore_errors=True)  # what a dead child left
        if self.child_dir is not None:
            shutil.rmtree(self.child_dir, ignore_errors=True)  # the last process's home
        self.generation += 1
        self.output_dir = self.workdir / f"child-{self.number}-{self.generation}"
        self.child_dir = self.workdir / f"home-{self.number}-{self.generation}"
        self._close_abandon_pipe()
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)  # a record is 12 bytes: a full pipe drops it
        try:
            how = launch(
                self.sandbox,
                child_dir=self.child_dir,
                output_dir=self.output_dir,
                argv=[
                    sys.executable,
                    "-c",
                    "from dcproto.worker.child import main; main()",
                    str(read_end),
                ],
                pass_fds=(read_end,),
            )
            self.process = await asyncio.create_subprocess_exec(
                *how.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=p.DEFAULT_MAX_FRAME * 2,
                env=how.env,
                cwd=how.cwd,
                pass_fds=how.pass_fds,
                preexec_fn=how.preexec_fn,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._abandon_fd = write_end
        self._unsent = []  # what was meant for an earlier process is not for this one
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
                if answer[0] == "ready":
                    if not (ready := _ready_future(process)).done():
                        ready.set_result(None)
                    continue
                if queue:  # answers come in the order the tasks were sent
                    _, future = queue.popitem(last=False)
                    now = time.monotonic()
                    # the child's time on this task: from when it could start it to its answer
                    service, self.busy_since = now - self.busy_since, now
                    if not future.done():
                        future.set_result((answer, service))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as exc:  # user code wrote on the answer channel: end the child
            log.warning("child %d sent a bad answer (%s); killing it", self.number, exc)
            await _kill_process_tree(process, "runner")
        code = await process.wait()
        if not (ready := _ready_future(process)).done():
            ready.set_result(None)  # never will be: its tasks fail as it is gone
        reason = _kill_reasons.pop(process, None)
        lost = list(queue.values())
        queue.clear()
        for index, future in enumerate(lost):
            if not future.done():  # the first was running; the others never started
                future.set_exception(ChildDied(code, reason) if index == 0 else ChildGone())

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
        if not self._unsent:
            self._unsent = []  # a list of its own for each write (and each process)
            asyncio.get_running_loop().call_soon(self._write_unsent, self.process, self._unsent)
        self._unsent += (p.HEADER.pack(len(body)), body)

    def _write_unsent(self, process: asyncio.subprocess.Process, frames: list[bytes]) -> None:
        if frames is self._unsent:
            self._unsent = []
        if process is self.process and process.stdin is not None and self.alive:
            process.stdin.writelines(frames)

    def signal(self, signum: int) -> None:
        if self.alive:
            assert self.process is not None
            _signal_process(self.process, signum)

    def kill(self, reason: str) -> None:
        """SIGKILL the child and every process under it (see :func:`child.kill_tree`; the
        /proc walk runs in a thread). ``reason`` goes with the task's :class:`ChildDied`."""
        if self.alive:
            assert self.process is not None
            _in_background(_kill_process_tree(self.process, reason))

    async def stop(self) -> None:
        if self.process is None:
            return
        await _kill_process_tree(self.process, "runner")
        with contextlib.suppress(Exception):
            await self.process.wait()
        self._close_abandon_pipe()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader


def _signal_process(process: asyncio.subprocess.Process, signum: int) -> None:
    """Signal a child process by pid: not ``send_signal``, which first polls (waitpid) and
    so may reap a child that just died before asyncio's watcher does, which then reports
    returncode 255 for it. Until asyncio has seen it exit, the pid is still ours."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


async def _kill_process_tree(process: asyncio.subprocess.Process, reason: str) -> None:
    """SIGKILL ``process`` and all under it; ``reason`` goes with its :class:`ChildDied`."""
    if process.returncode is None:
        _kill_reasons.setdefault(process, reason)
        if not await asyncio.to_thread(kill_tree, process.pid, include_root=True):
            _signal_process(process, signal.SIGKILL)  # a /proc not to be trusted: itself only


class ChildGone(Exception):
    """The child died before it started this task (another one crashed it)."""


class ChildDied(Exception):
    """The child died while on this task; ``reason`` says why if the runner killed it
    (``runner``: abandon, time limit or stop; ``cpu_time`` or ``memory``: a cap)."""

    def __init__(self, returncode: int, reason: str | None = None) -> None:
        if returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
        else:
            how = f"exited with code {returncode}"
        super().__init__(f"the child process running the task {how}")
        self.returncode = returncode
        self.reason = reason


class Runner:
    """A pool of ``slots`` child processes (and ``SPARES`` more, clean, ahead of need).
    ``await run(project, task)`` gives an Outcome."""

    limits: TaskLimits = NO_LIMITS  # see set_limits
    _watchdog: asyncio.Task[None] | None = None  # see _patrol

    def __init__(self, slots: int, *, sandbox: Sandbox | None = None) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self.sandbox = sandbox  # see sandbox.probe; None: no namespaces, no drop
        self._tmp = tempfile.TemporaryDirectory(prefix="dcproto-worker-")
        self.workdir = Path(self._tmp.name)
        if sandbox is not None and sandbox.run_as is not None:
            os.chmod(self.workdir, 0o711)  # children dropped to nobody must reach their homes
        self._children = [Child(self.workdir, sandbox) for _ in range(slots)]
        # tasks waiting for a place in a child, oldest first: (depth allowed, where it goes)
        self._waiting: collections.deque[tuple[int, asyncio.Future[Child]]] = collections.deque()
        # keyed by (task_id, attempt): a re-sent task may overlap its abandoned attempt
        self._abandoned: set[tuple[int, int]] = set()
        self._paused_since: float | None = None  # the volunteer stopped the children then
        self._paused_total = 0.0  # seconds they were stopped before
        self._running: dict[tuple[int, int], Child] = {}
        # per project (the latest MAX_TIMED_PROJECTS): the average time one of its tasks takes
        self._task_seconds: OrderedDict[str, float] = OrderedDict()

    async def start(self) -> None:
        """Start every child (a task that needs one meanwhile waits for the same start)."""
        await asyncio.gather(*(child.ensure_started() for child in self._children))

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.gather(*(child.shutdown() for child in self._children))
        self._tmp.cleanup()

    def set_limits(self, limits: TaskLimits) -> None:
        """The caps for every task from now on. A child gets the caps with its project's
        code, for its life: children under other caps are no longer used for new tasks (the
        idle ones are replaced as places are needed)."""
        self.limits = limits

    @functools.cached_property
    def _line(self) -> collections.deque[tuple[str, int, asyncio.Future[Child]]]:
        """Tasks waiting for a place in a child, oldest first: (project, depth allowed, where
        it goes)."""
        return collections.deque()

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

    def paused(self, paused: bool) -> None:
        """The children were stopped (True) or continued (False) by the volunteer: a task's
        time limit does not count the time it spent stopped."""
        now = time.monotonic()
        if paused and self._paused_since is None:
            self._paused_since = now
        elif not paused and self._paused_since is not None:
            self._paused_total += now - self._paused_since
            self._paused_since = None

    def _paused_time(self) -> float:
        """Seconds the children have spent stopped so far (a running total)."""
        since = self._paused_since
        return self._paused_total + (0.0 if since is None else time.monotonic() - since)

    def child_pids(self) -> list[int]:
        """The pids of the live child processes (for pausing them, and for usage figures)."""
        return [c.process.pid for c in self._children if c.process is not None and c.alive]

    def is_running(self, task_id: int, attempt: int) -> bool:
        return (task_id, attempt) in self._running

    def _depth(self, project: p.Project) -> int:
        """How many tasks of ``project`` a child may hold at once."""
        if project.options.get("task_timeout") is not None:
            return 1  # its clock starts when it is sent
        seconds = self._task_seconds.get(project.project_id)
        return PIPELINE_DEPTH if seconds is not None and seconds < SHORT_TASK else 1

    def _pick(self, binding: str, depth: int) -> Child | None:
        """A child for one more task of a project of ``binding`` (see :func:`binding`),
        reserved, or None if there is no room (see the module docstring for the order of
        preference)."""
        children = self._children
        busy = sum(1 for child in children if child.reserved)
        limits = self.limits
        mine = [c for c in children if c.bound == binding and c.bound_limits == limits]
        chosen: Child | None = None
        if busy < self.slots:
            chosen = next((c for c in mine if not c.reserved), None)
            if chosen is None:
                clean = [c for c in children if c.bound is None and not c.reserved]
                if clean:
                    chosen = min(clean, key=_start_order)
                    self._bind(chosen, binding)
                    self._top_up()
        if chosen is None:
            room = [c for c in mine if 0 < c.reserved < depth]
            if room:
                chosen = min(room, key=lambda c: c.reserved)
        if chosen is None and busy < self.slots:
            if len(children) < self.slots + SPARES:
                chosen = self._new_child()
            else:  # the idle child used longest ago makes way: a fresh process takes its place
                chosen = min((c for c in children if not c.reserved), key=lambda c: c.last_used)
            self._bind(chosen, binding)
            if chosen.loaded:  # its process has run code: another creator's, or under other caps
                chosen.replace()
        if chosen is not None:
            chosen.reserved += 1
        return chosen

    def _bind(self, child: Child, binding: str) -> None:
        child.bound = binding
        child.bound_limits = self.limits

    def _new_child(self) -> Child:
        """One more child, made as ``__init__`` makes the first ``slots`` (not started)."""
        child = Child(self.workdir, self.sandbox)
        self._children.append(child)
        return child

    def _top_up(self) -> None:
        """Start a clean child if none is left and the process count allows (a spare)."""
        if len(self._children) < self.slots + SPARES and all(
            c.bound is not None for c in self._children
        ):
            self._new_child().start_soon()

    async def _child_for(self, bound_to: str, depth: int) -> Child:
        """A child for one more task, reserved. Waiting tasks are served in arrival order,
        one per freed place (waking every waiter at each answer cost more than the task)."""
        child = None if self._line else self._pick(bound_to, depth)
        if child is not None:
            return child
        handed: asyncio.Future[Child] = asyncio.get_running_loop().create_future()
        entry = (bound_to, depth, handed)
        self._line.append(entry)
        try:
            return await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():  # a child came just as we left
                handed.result().reserved -= 1
            else:  # gone from the line, which must not stay blocked by a task that left it
                with contextlib.suppress(ValueError):
                    self._line.remove(entry)
            self._hand_out()
            raise

    def _hand_out(self) -> None:
        """Give freed places to the tasks waiting longest."""
        line = self._line
        while line:
            bound_to, depth, handed = line[0]
            if handed.done():  # its task was cancelled
                line.popleft()
                continue
            child = self._pick(bound_to, depth)
            if child is None:
                return
            line.popleft()
            handed.set_result(child)

    async def run(self, project: p.Project, task: p.Task) -> Outcome:
        """Run ``task`` in a child. Cancelling this coroutine while it waits for a child is
        safe; once running, abandon it with :meth:`abandon` instead."""
        child = await self._child_for(binding(project), self._depth(project))
        key = (task.task_id, task.attempt)
        try:
            await child.ensure_started()
            outcome = await self._run_in(child, project, task)
        finally:
            self._running.pop(key, None)
            self._abandoned.discard(key)
            child.reserved -= 1
            child.last_used = time.monotonic()
            self._hand_out()
        spent = outcome.stats.get("exec")
        if outcome.outcome == "ok" and isinstance(spent, float):
            previous = self._task_seconds.pop(project.project_id, spent)
            self._task_seconds[project.project_id] = 0.8 * previous + 0.2 * spent
            if len(self._task_seconds) > MAX_TIMED_PROJECTS:
                self._task_seconds.popitem(last=False)
        return outcome

    async def _run_in(self, child: Child, project: p.Project, task: p.Task) -> Outcome:
        if project.project_id in child.loaded:
            child.loaded.move_to_end(project.project_id)  # as the child does at each run
        else:
            if child.bound != binding(project):  # never: see _pick
                raise RuntimeError(f"child {child.number} serves another creator")
            if not child.loaded:
                child.send((child.bound_limits or NO_LIMITS).command())  # before any user code
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
                    child.bound,
                ]
            )
            child.loaded[project.project_id] = None
            while len(child.loaded) > MAX_LOADED:  # the child unloads the same one itself
                child.loaded.popitem(last=False)
        key = (task.task_id, task.attempt)
        self._running[key] = child
        answer = child.run(key, ["run", task.task_id, task.attempt, task.project_id, task.items])
        self._watch(child)
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
                paused_before = self._paused_time()
                budget = float(timeout)
                while True:
                    try:
                        answer = await asyncio.wait_for(asyncio.shield(future), budget)
                        break
                    except TimeoutError:
                        # time spent stopped by the volunteer is given back to the task
                        budget = self._paused_time() - paused_before
                        paused_before += budget
                        if budget <= 0 and self._paused_since is None:
                            raise
                        budget = max(budget, 0.1)
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
            limits = child.bound_limits or NO_LIMITS
            cap = _cap_of(exc, limits)
            if cap is not None:
                error = cap_error(cap, _cap_value(cap, limits), str(exc))
                return Outcome(cap, error=error | {"returncode": exc.returncode})
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
                child.kill("runner")

        asyncio.get_running_loop().call_later(KILL_GRACE, escalate)

    def _watch(self, child: Child) -> None:
        """Have the watchdog look at ``child`` while it runs tasks, if its caps need it."""
        limits = child.bound_limits
        if limits is None or (limits.max_task_seconds is None and limits.max_memory is None):
            return
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._patrol())

    async def _patrol(self) -> None:
        """Every WATCH_INTERVAL, while capped tasks run: the CPU seconds and memory of each
        one's process tree; a child whose task is past its cap (by CPU_GRACE for CPU, which
        the child enforces itself unless user code stops it) is killed, with its tree."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            watched: list[tuple[Child, int, tuple[int, int], TaskLimits]] = []
            for child in self._children:
                limits, key = child.bound_limits, child.running
                if key is None or limits is None or child.process is None or not child.alive:
                    continue
                if limits.max_task_seconds is not None or limits.max_memory is not None:
                    watched.append((child, child.process.pid, key, limits))
            if not watched:
                return  # _watch starts another with the next capped task
            usage = await asyncio.to_thread(tree_usage, [pid for _, pid, _, _ in watched])
            for child, pid, key, limits in watched:
                if pid not in usage or child.running != key or not child.alive:
                    continue  # the task ended while we looked
                cpu, memory = usage[pid]
                if child.watched is None or child.watched[:2] != (pid, key):
                    child.watched = (pid, key, cpu)
                spent = cpu - child.watched[2]
                seconds = limits.max_task_seconds
                if seconds is not None and spent > seconds + CPU_GRACE:
                    log.warning("task %s used %.1f s of CPU; killing child %d", key, spent, pid)
                    child.kill("cpu_time")
                elif limits.max_memory is not None and (memory or 0) > limits.max_memory:
                    log.warning("task %s used %d bytes; killing child %d", key, memory, pid)
                    child.kill("memory")


def binding(project: p.Project) -> str:
    """What a child is bound to for ``project``: its owner, so that one creator's projects
    share warm processes; the project itself when the owner is unknown."""
    return f"owner:{project.owner}" if project.owner else f"project:{project.project_id}"


def _start_order(child: Child) -> int:
    """Which clean child to take first: a running process, then one starting, then none."""
    if child._starting is not None and not child._starting.done():
        return 1
    return 0 if child.alive else 2


def _cap_of(exc: ChildDied, limits: TaskLimits) -> str | None:
    """The cap a child's death shows was hit, if any."""
    if exc.reason in ("cpu_time", "memory"):
        return exc.reason  # the watchdog killed it
    if exc.returncode == -signal.SIGXCPU:
        return "cpu_time"  # past its RLIMIT_CPU with the signal's default action
    if exc.returncode == -signal.SIGXFSZ:
        return "disk"  # past its RLIMIT_FSIZE, likewise
    if exc.returncode == -signal.SIGKILL and exc.reason is None and limits.max_memory is not None:
        return "memory"  # killed, not by the runner: most likely the kernel, out of memory
    return None


def _cap_value(cap: str, limits: TaskLimits) -> float | None:
    return {
        "memory": limits.max_memory,
        "cpu_time": limits.max_task_seconds,
        "disk": limits.max_disk,
    }[cap]


def default_slots() -> int:
    return os.cpu_count() or 1
