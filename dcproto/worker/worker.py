"""The volunteer worker: connect, take pushed tasks, run them in child processes, send results.

``dcproto-worker connect HOST[:PORT]|ALIAS [--tasks N] [--slots K]`` runs it; with no arguments
it opens the interactive menu (see :mod:`dcproto.menu`). A lost connection abandons the tasks in
hand (the server re-issues them) and reconnects with capped, jittered backoff.

The volunteer stays in control (see :mod:`.control`): the worker can be paused (SIGUSR1, the
menu's ``pause``, or ``--when-idle`` while the owner uses the machine) and resumed (SIGUSR2,
``resume``), its tasks' CPU share capped (``--cpu-limit``), and limited to the projects of
chosen creators (``--trust``). The server learns of it by WorkerState messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import re
import socket
import sys
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import protocol as p
from ..connection import Endpoint, backoff_delays, keep_alive, open_session
from ..errors import (
    AuthenticationFailed,
    CertificateMismatch,
    ConnectionFailed,
    DcprotoError,
    LocalProtocolError,
    PermissionDenied,
    UsageError,
)
from ..logs import FORMATS, configure_logging
from ..trust.tokens import NAME_RE, TOKEN_ENV, read_token_file
from . import sandbox as sandbox_module
from .control import OWNER_ACTIVITY, ProcessControl
from .runner import Outcome, Runner, TaskLimits, default_slots
from .sandbox import SANDBOX_MODES, Sandbox, SandboxOptions, SandboxUnavailable

log = logging.getLogger("dcproto.worker")

BACKOFF_START = 0.1
BACKOFF_CAP = 5.0
MAX_CACHED_PROJECTS = 64
MAX_OUTBOX = 10_000  # results kept for delivery while disconnected
# the server ignores credit beyond slots * (1 + MAX_PREFETCH_PER_SLOT) held tasks, and sizes
# what it actually sends from the round trip and the task time (see docs/protocol.md)
MAX_PREFETCH_PER_SLOT = p.MAX_PREFETCH_PER_SLOT
LEASE_RENEWALS = 3  # frames sent per shortest lease held, at least
USAGE_INTERVAL = 10.0  # seconds between two WorkerState reports of what the tasks use
FIRST_USAGE_REPORT = 1.0  # seconds after joining: soon, but with a CPU share to report
VOLUNTEER = "volunteer"  # paused_by for SIGUSR1 and the menu's pause


@dataclass(kw_only=True)
class WorkerConfig:
    endpoint: Endpoint
    device_id: str | None = None
    name: str = ""
    slots: int = 0  # 0: one per CPU
    prefetch: int | None = None  # tasks held beyond the slots at most; None: as the server sees fit
    max_tasks: int | None = None  # exit after this many finished tasks
    reconnect: bool = True
    sandbox: str = "auto"  # auto | required | off: see sandbox.py
    allow_network: bool = False  # a sandboxed task may use the network
    max_memory: int | None = None  # bytes one slot's task may use
    max_task_seconds: float | None = None  # CPU seconds one task may use
    max_disk: int | None = None  # bytes one task may write in its output dir
    cpu_limit: float | None = None  # percent of the whole machine all the tasks may use
    when_idle: bool = False  # pause while something else keeps the machine busy
    trust: list[str] = field(default_factory=list)  # creators' token names; empty: every one


def missing_modules(names: list[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMG]?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    """``300M``, ``1.5G``, ``64K``, ``1000000`` (bytes) -> bytes; K, M, G are powers of 1024.
    ValueError for anything else, or for less than one byte."""
    found = _SIZE.fullmatch(text.strip())
    if found is None or (not found[2] and "." in found[1]):
        raise ValueError(
            f"{text!r} is not a size: give a whole number of bytes, or a number with K, M or G "
            "(e.g. 300M, 1.5G)"
        )
    size = int(float(found[1]) * _UNITS[found[2].upper()])
    if size < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return size


def probe_sandbox(config: WorkerConfig) -> Sandbox:
    """What sandbox this machine gives the tasks, for ``config``; SandboxUnavailable when
    ``--sandbox required`` cannot be met."""
    options = SandboxOptions(
        mode=config.sandbox, allow_network=config.allow_network, max_disk=config.max_disk
    )
    return sandbox_module.probe(options)


def make_runner(slots: int, sandbox: Sandbox, config: WorkerConfig) -> Runner:
    """The runner for ``slots``, under ``sandbox`` and the volunteer's caps."""
    runner = Runner(slots, sandbox=sandbox)
    runner.set_limits(
        TaskLimits(
            max_memory=config.max_memory,
            max_task_seconds=config.max_task_seconds,
            max_disk=config.max_disk,
        )
    )
    return runner


class Worker:
    """One worker process's client. ``await run()`` returns when ``max_tasks`` are done, on
    :meth:`stop`, or raises when the server cannot be joined at all."""

    def __init__(self, config: WorkerConfig, sandbox: Sandbox | None = None) -> None:
        self.config = config
        self.slots = config.slots or default_slots()
        self.prefetch = (
            self.slots * MAX_PREFETCH_PER_SLOT
            if config.prefetch is None
            else max(0, min(config.prefetch, self.slots * MAX_PREFETCH_PER_SLOT))
        )
        self.name = config.name or f"{socket.gethostname()}:{os.getpid()}"
        self.device_id = config.device_id
        self.completed = 0
        self.sandbox = sandbox if sandbox is not None else probe_sandbox(config)
        # e.g. "sandbox: bubblewrap (...)"; a warning when auto found none: tasks then run
        # with the worker account's rights
        contained = self.sandbox.bwrap is not None or self.sandbox.options.mode == "off"
        (log.info if contained else log.warning)("%s", self.sandbox.description)
        self.runner = make_runner(self.slots, self.sandbox, config)
        self.trust = list(config.trust)
        self._paused_by: list[str] = []  # why the worker is paused, first reason first
        self.control = ProcessControl(
            self.runner.child_pids,
            cpu_limit=config.cpu_limit,
            when_idle=self._owner_active if config.when_idle else None,
        )
        self._projects: OrderedDict[str, p.Project] = OrderedDict()
        self._rejected: set[str] = set()
        # keyed by (task_id, attempt): a re-sent task may overlap its abandoned attempt
        self._tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._received: dict[tuple[int, int], float] = {}  # when each task arrived
        # held tasks per project: their leases are renewed by our frames (see _renew_every)
        self._held_projects: Counter[str] = Counter()
        self._stopping = asyncio.Event()
        self._unused_credit = 0  # granted this session, not yet used by a Task
        self._outbox: deque[p.Result] = deque(maxlen=MAX_OUTBOX)
        self._last_received = 0.0
        self._flush_scheduled = False
        self._proto: p.Connection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_sent = 0.0
        self.heartbeat_interval = 5.0  # the server's value replaces it at each handshake

    def stop(self) -> None:
        self._stopping.set()
        self.control.release()  # stopped tasks could not give up, nor the worker leave

    # ---- the volunteer's controls --------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return bool(self._paused_by)

    @property
    def paused_by(self) -> str | None:
        return self._paused_by[0] if self._paused_by else None

    def pause(self, reason: str = VOLUNTEER) -> None:
        """Stop the running tasks where they are (SIGSTOP), hand the unstarted ones back and
        take no more until :meth:`resume` for every reason given."""
        if reason in self._paused_by or self._stopping.is_set():
            return
        self._paused_by.append(reason)
        if len(self._paused_by) > 1:
            log.info("paused (%s) as well", reason)
            return
        stopped = self.control.pause()
        self.runner.paused(True)  # stopped time is not the tasks' time
        # first: the server then counts what comes back as given back by a paused worker
        self._send_state()
        handed = self._hand_back_unstarted()
        log.info(
            "paused (%s): %d task processes stopped, %d tasks not started handed back",
            reason,
            stopped,
            handed,
        )

    def resume(self, reason: str = VOLUNTEER) -> None:
        """Undo :meth:`pause` for ``reason``; the tasks go on once no reason is left."""
        if reason not in self._paused_by:
            return
        self._paused_by.remove(reason)
        if self._paused_by:
            log.info("%s is over; still paused (%s)", reason, self.paused_by)
            return
        continued = self.control.resume()
        self.runner.paused(False)
        self._send_state()
        self._top_up()
        log.info("resumed (%s is over): %d task processes continued", reason, continued)

    def set_trust(self, names: list[str]) -> None:
        """Run only the projects of these creators (token names); empty: every creator's."""
        if names != self.trust:
            self.trust = list(names)
            self._send_state()

    def _owner_active(self, busy: bool) -> None:
        if busy:
            self.pause(OWNER_ACTIVITY)
        else:
            self.resume(OWNER_ACTIVITY)

    def _hand_back_unstarted(self) -> int:
        """Give back every task held but not started: those waiting for a child are answered
        ``abandoned`` now, those queued in a child when it reaches them."""
        waiting = 0
        for task_id, attempt in list(self._tasks):
            waiting += not self.runner.is_running(task_id, attempt)
            self._abandon(task_id, started=False)
        return waiting

    def usage(self) -> dict[str, object]:
        """What WorkerState.usage says: the tasks' CPU (percent of the whole machine, since
        the last report) and memory, why the worker is paused, its sandbox and slots."""
        return {
            **self.control.usage(),
            "paused_by": self.paused_by,
            "sandbox": self.sandbox.description,
            "slots": self.slots,
        }

    def _send_state(self) -> None:
        self._send(p.WorkerState(paused=self.paused, trust=list(self.trust), usage=self.usage()))

    async def _report_usage(self) -> None:
        self.control.usage()  # the start of the first report's CPU share
        await asyncio.sleep(FIRST_USAGE_REPORT)
        while True:
            self._send_state()
            await asyncio.sleep(USAGE_INTERVAL)

    @property
    def done(self) -> bool:
        return self.config.max_tasks is not None and self.completed >= self.config.max_tasks

    async def run(self) -> None:
        # children start while we connect: joining costs one of the two, not both
        children = asyncio.create_task(self.runner.start())
        self.control.start()
        try:
            delays = backoff_delays(BACKOFF_START, BACKOFF_CAP)
            while not self._stopping.is_set() and not self.done:
                try:
                    await self._session()
                    delays = backoff_delays(BACKOFF_START, BACKOFF_CAP)  # it worked: start over
                except (AuthenticationFailed, CertificateMismatch, PermissionDenied):
                    raise  # retrying cannot help
                except ConnectionFailed as exc:
                    if not self.config.reconnect:
                        raise
                    log.warning("%s", exc)
                if self._stopping.is_set() or self.done:
                    break
                delay = next(delays)
                log.info("reconnecting in %.1f s", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
        finally:
            self.control.release()  # paused tasks must run to give up
            await self._abandon_all()
            if not children.done():
                children.cancel()
            with contextlib.suppress(BaseException):
                await children
            await self.runner.close()
            await self.control.close()

    # ---- one connection ------------------------------------------------------------------------

    async def _session(self) -> None:
        cfg = self.config
        reader, writer, proto, welcome = await open_session(
            cfg.endpoint,
            role="worker",
            device_id=self.device_id,
            name=self.name,
            slots=self.slots,
        )
        self.device_id = welcome.device_id
        self.heartbeat_interval = welcome.heartbeat_interval
        log.info("connected to %s as %s", cfg.endpoint.address, self.device_id)
        self._proto, self._writer = proto, writer
        self._last_received = time.monotonic()
        self._unused_credit = 0
        heartbeat = asyncio.create_task(self._heartbeats(self.heartbeat_interval))
        reports = asyncio.create_task(self._report_usage())
        stop_wait = asyncio.create_task(self._stopping.wait())
        try:
            if self.paused or self.trust:  # before any credit: no task it would not take
                self._send_state()
            # results finished while we were away: the first result for a task wins
            while self._outbox:
                self._send(self._outbox.popleft())
            self._top_up()
            self._flush()
            while not self.done:
                read = asyncio.create_task(reader.read(2**20))
                finished, _ = await asyncio.wait(
                    {read, stop_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                if stop_wait in finished:
                    read.cancel()
                    return
                data = read.result()
                if not data:
                    raise ConnectionFailed("the server closed the connection")
                self._last_received = time.monotonic()
                for message in proto.receive_data(data):
                    self._handle(message)
                self._flush()
                if proto.state is p.State.CLOSED:
                    if proto.error is not None:
                        raise ConnectionFailed(f"protocol error: {proto.error}")
                    raise ConnectionFailed("the server ended the session")
        except OSError as exc:
            raise ConnectionFailed(f"connection to the server lost: {exc}") from exc
        finally:
            stop_wait.cancel()
            heartbeat.cancel()
            reports.cancel()
            if self._stopping.is_set():
                await self._abandon_all()  # hand the running tasks back before leaving
            if proto.state is not p.State.CLOSED:
                with contextlib.suppress(Exception):
                    proto.send(p.Goodbye(reason="worker leaving"))
                    self._flush()
            self._proto = self._writer = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _heartbeats(self, interval: float) -> None:
        def abort() -> None:
            if self._writer is not None:
                self._writer.transport.abort()  # the session ends and the worker reconnects

        await keep_alive(
            interval,
            renew_every=self._renew_every,
            last_sent=lambda: self._last_sent,
            last_received=lambda: self._last_received,
            heartbeat=lambda: self._send(p.Heartbeat()),
            abort=abort,
        )

    def _renew_every(self) -> float | None:
        """Seconds between our frames that keep the leases we hold alive: a fraction of the
        shortest lease_timeout among the projects of our tasks (None if we hold none)."""
        shortest = None
        for project_id in self._held_projects:
            project = self._projects.get(project_id)
            lease = None if project is None else project.options.get("lease_timeout")
            if isinstance(lease, int | float) and lease > 0:
                shortest = lease if shortest is None else min(shortest, lease)
        return None if shortest is None else shortest / LEASE_RENEWALS

    def _flush(self) -> None:
        if self._proto is None or self._writer is None:
            return
        chunks = self._proto.chunks_to_send()
        if chunks and not self._writer.is_closing():
            self._writer.writelines(chunks)
            self._last_sent = time.monotonic()

    def _send(self, message: p.Message) -> bool:
        """Queue ``message``; everything queued in one loop turn goes out in one write."""
        if self._proto is None or self._proto.state is not p.State.READY:
            return False
        self._proto.send(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)
        return True

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    # ---- credit ----------------------------------------------------------------------------------

    def _wanted_credit(self) -> int:
        """Credit to grant now: enough to hold slots + prefetch tasks, never more than it can
        still run under ``max_tasks``. The server sends only what hides the round trip."""
        if self.paused:
            return 0  # resume tops it up
        held = len(self._tasks)
        want = self.slots + self.prefetch - held - self._unused_credit
        if self.config.max_tasks is not None:
            want = min(want, self.config.max_tasks - self.completed - held - self._unused_credit)
        return max(0, min(want, p.MAX_CREDIT))

    def _top_up(self) -> None:
        credit = self._wanted_credit()
        if credit and self._send(p.Credit(credit=credit)):
            self._unused_credit += credit

    # ---- messages --------------------------------------------------------------------------------

    def _handle(self, message: p.Message) -> None:
        match message:
            case p.Project():
                self._projects[message.project_id] = message
                self._projects.move_to_end(message.project_id)
                while len(self._projects) > MAX_CACHED_PROJECTS:
                    self._projects.popitem(last=False)
                missing = missing_modules(message.modules)
                if missing:
                    self._rejected.add(message.project_id)
                    reason = "missing modules: " + ", ".join(missing)
                    log.warning("cannot run project %s: %s", message.project_id, reason)
                    self._send(p.Reject(project_id=message.project_id, reason=reason))
                else:
                    self._rejected.discard(message.project_id)
            case p.Task():
                self._unused_credit = max(0, self._unused_credit - 1)
                project = self._projects.get(message.project_id)
                if project is None or message.project_id in self._rejected or self.paused:
                    # sent before the server knew we paused: given back unstarted
                    outcome = "abandoned" if project is not None else "load_error"
                    error = None if project else {"message": "Task before its Project"}
                    self._reply(message, Outcome(outcome, error=error))
                    return
                key = (message.task_id, message.attempt)
                self._received[key] = time.monotonic()
                self._held_projects[message.project_id] += 1
                self._tasks[key] = asyncio.create_task(self._run_task(project, message))
            case p.Abandon():
                for task_id in message.task_ids:
                    self._abandon(task_id)
            case p.Recall():
                for task_id in message.task_ids:
                    self._abandon(task_id, started=False)
            case p.Goodbye() | p.Error():
                log.info("server says: %s", message)
            case _:
                pass

    async def _run_task(self, project: p.Project, task: p.Task) -> None:
        try:
            outcome = await self.runner.run(project, task)
        except asyncio.CancelledError:
            outcome = Outcome("abandoned")
        except Exception as exc:  # the runner itself failed: report, never die
            log.exception("runner failed on task %d", task.task_id)
            outcome = Outcome("crash", error={"message": f"worker error: {exc}"})
        finally:
            self._tasks.pop((task.task_id, task.attempt), None)
            self._held_projects[task.project_id] -= 1
            if self._held_projects[task.project_id] <= 0:
                del self._held_projects[task.project_id]
        self._reply(task, outcome)

    def _reply(self, task: p.Task, outcome: Outcome) -> None:
        if outcome.outcome != "abandoned":
            self.completed += 1
        received = self._received.pop((task.task_id, task.attempt), None)
        if received is not None and outcome.outcome in ("ok", "stop"):
            # the server takes this from its round trip to learn the network's share
            outcome.stats["held"] = time.monotonic() - received
        connected = self._proto is not None and self._proto.state is p.State.READY
        credit = self._wanted_credit() if connected else 0
        result = p.Result(
            task_id=task.task_id,
            attempt=task.attempt,
            outcome=outcome.outcome,
            payload=outcome.payload,
            n_items=outcome.n_items,
            n_kept=outcome.n_kept,
            error=outcome.error,
            stats=outcome.stats,
            files=outcome.files,
            credit=credit,
        )
        try:
            sent = self._send(result)
        except LocalProtocolError as exc:  # e.g. a result larger than a frame: fail the task
            log.warning("task %d: cannot send its result: %s", task.task_id, exc)
            result = replace(
                result,
                outcome="error",
                payload=b"",
                n_kept=0,
                files=[],
                error={"reason": "too_large", "message": f"the result cannot be sent: {exc}"},
            )
            sent = self._send(result)
        if sent:
            self._unused_credit += credit
        elif outcome.outcome != "abandoned":
            # delivered after the reconnect; an abandoned task needs no answer then
            if len(self._outbox) == self._outbox.maxlen:
                log.warning("outbox full: dropping the oldest undelivered result")
            self._outbox.append(result)
        if self.done and not self._tasks:
            self._stopping.set()

    def _abandon(self, task_id: int, *, started: bool = True) -> None:
        """Give up every attempt of ``task_id`` held here, running or still waiting; with
        ``started=False`` (a Recall) one a child has started runs on."""
        self.runner.abandon(task_id, started=started)
        for (held_id, attempt), waiting in list(self._tasks.items()):
            if held_id == task_id and not self.runner.is_running(held_id, attempt):
                waiting.cancel()  # still waiting for a child: drop it now

    async def _abandon_all(self) -> None:
        for task_id, _ in list(self._tasks):
            self._abandon(task_id)
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)


# ---- command line ------------------------------------------------------------------------------


def resolve_target(
    target: str, *, token: str | None, fingerprint: str | None, insecure: bool
) -> tuple[Endpoint, str | None, str | None]:
    """``HOST[:PORT]`` or a user alias -> (endpoint, device_id, alias). The token comes from
    ``token`` (read from --token-file), ``$DCPROTO_TOKEN``, the user, or for a server on this
    machine, its state dir."""
    from .. import users
    from ..paths import default_state_dir, read_local_server

    known = users.load_users()
    if target in known:
        user = known[target]
        found = token or user.token or os.environ.get(TOKEN_ENV)
        if not found:
            raise UsageError(f"user {target!r} has no token; add it again with its join line")
        endpoint = Endpoint(
            host=user.host,
            port=user.port,
            token=found,
            fingerprint=fingerprint or user.fingerprint,
            insecure=insecure or user.insecure,
        )
        return endpoint, user.device_id, target
    if ":" not in target and "." not in target and target.lower() != "localhost":
        # most likely a mistyped alias, not a host: refuse rather than try it for ever
        close = users.closest_name(target, known)
        guess = f"did you mean {close!r}? " if close else ""
        names = f"known users: {', '.join(known)}" if known else "no users are configured"
        raise UsageError(
            f"no user named {target!r}; {guess}({names}; file {users.config_path()}). "
            f"For a host of that name, give its port: {target}:{users.DEFAULT_PORT}"
        )
    host, port = users.parse_address(target)
    found = token or os.environ.get(TOKEN_ENV)
    if host in ("127.0.0.1", "localhost", "::1"):
        local = read_local_server(default_state_dir())  # a server of ours on this machine
        if local is not None:
            found = found or local.token
            fingerprint = fingerprint or local.fingerprint
            insecure = insecure or local.insecure
    if not found:
        raise UsageError(
            f"no token for {target}: use --token-file, set ${TOKEN_ENV}, "
            "or add the server with the join line its admin gives you (dcproto users add ...)"
        )
    if not insecure and fingerprint is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.info("no fingerprint for %s: its certificate must verify against the CA store", host)
    endpoint = Endpoint(
        host=host, port=port, token=found, fingerprint=fingerprint, insecure=insecure
    )
    return endpoint, None, None


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    from ..paths import default_state_dir
    from ..users import DEFAULT_PORT

    try:
        number = version("dcproto")
    except PackageNotFoundError:
        from .. import __version__ as number
    parser = argparse.ArgumentParser(
        prog="dcproto-worker",
        description="Run a dcproto worker. Without arguments: the interactive menu.",
    )
    parser.add_argument("--version", action="version", version=f"dcproto-worker {number}")
    sub = parser.add_subparsers(dest="command")
    connect = sub.add_parser(
        "connect",
        help="connect to a server and run its tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=CONNECT_EPILOG,
    )
    connect.add_argument(
        "target",
        help=f"HOST[:PORT] (default port: {DEFAULT_PORT}) or the name of a user (named "
        "server: dcproto users list); a host name without a dot needs its :PORT",
    )
    connect.add_argument(
        "--tasks", type=int, default=None, help="exit after N tasks (default: run until stopped)"
    )
    connect.add_argument(
        "--slots",
        type=int,
        default=0,
        help=f"tasks at once (default: the number of CPUs, here {default_slots()})",
    )
    connect.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="tasks held beyond the slots (default: adapts to task length)",
    )
    local = default_state_dir()
    connect.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"file holding the token (default: the user's token, else ${TOKEN_ENV}, else for "
        f"127.0.0.1/localhost the admin token of the server whose state dir is {local})",
    )
    connect.add_argument(
        "--fingerprint",
        default=None,
        help="the server certificate's sha256 fingerprint (default: the user's, else for "
        f"127.0.0.1/localhost the one recorded in {local}, else the CA store verifies it)",
    )
    connect.add_argument(
        "--insecure",
        action="store_true",
        help="plain TCP, for a server run with --insecure (default: the user's setting)",
    )
    connect.add_argument(
        "--name", default="", help="name shown in stats and logs (default: HOSTNAME:PID)"
    )
    connect.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default: INFO)"
    )
    connect.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text lines, or one JSON object per line (ts, level, logger, message, fields)",
    )
    control = connect.add_argument_group("the volunteer's limits")
    control.add_argument(
        "--sandbox",
        choices=SANDBOX_MODES,
        default="auto",
        help="isolate the tasks: 'auto' where this machine allows it, 'required' refuses to "
        "start without a sandbox (exit code 2), 'off' never (default: auto)",
    )
    control.add_argument(
        "--allow-network",
        action="store_true",
        help="let sandboxed tasks use the network (default: no network in the sandbox)",
    )
    control.add_argument(
        "--max-memory",
        type=_size_argument,
        default=None,
        metavar="SIZE",
        help="memory one slot's task may use, e.g. 300M or 1.5G (K, M, G: powers of 1024); "
        "a task over it fails with outcome 'memory' (default: no cap)",
    )
    control.add_argument(
        "--max-task-seconds",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="CPU seconds one task may use; over it, outcome 'cpu_time' (default: no cap)",
    )
    control.add_argument(
        "--max-disk",
        type=_size_argument,
        default=None,
        metavar="SIZE",
        help="bytes one task may write into its output dir, e.g. 500M; over it, outcome "
        "'disk' (default: no cap)",
    )
    control.add_argument(
        "--cpu-limit",
        type=_percent,
        default=None,
        metavar="PERCENT",
        help="share of the whole machine (all CPUs) the tasks may use together, 1 to 100; "
        "by a cgroup's CPU quota where the worker can make one, else by stopping and "
        "continuing the tasks in 100 ms periods (default: no limit)",
    )
    control.add_argument(
        "--when-idle",
        action="store_true",
        help="pause the tasks while something else uses the machine (over 20%% of a CPU for "
        "2 s) and resume them once it has been idle for a few seconds (default: always run)",
    )
    control.add_argument(
        "--trust",
        nargs="+",
        action="extend",
        type=_creator_name,
        default=[],
        metavar="NAME",
        help="run only the projects of these creators (their token names); put it after the "
        "target (default: every creator's projects)",
    )
    return parser


CONNECT_EPILOG = """\
pausing:
  kill -USR1 PID   pause: the running tasks are stopped where they are (SIGSTOP, nothing is
                   killed), the tasks not started yet go back to the server, and no new ones
                   come until resumed
  kill -USR2 PID   resume
  (PID: the dcproto-worker process; the menu's 'pause' and 'resume' do the same)
"""


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text.removesuffix("%"))
    except ValueError:
        value = -1.0
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage from 1 to 100")
    return value


def _creator_name(text: str) -> str:
    if not NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a token name (letters, digits, '_' and '-', at most 64)"
        )
    return text


async def run_worker(
    config: WorkerConfig,
    alias: str | None = None,
    *,
    started: Callable[[Worker], None] | None = None,
) -> int:
    """Run a worker until it is done or stopped; the exit code. ``started`` is called with the
    worker before it connects (the menu wires its commands to it)."""
    try:
        sandbox = probe_sandbox(config)
    except SandboxUnavailable as exc:
        print(f"dcproto-worker: {exc}", file=sys.stderr)
        return 2
    worker = Worker(config, sandbox=sandbox)
    loop = asyncio.get_running_loop()
    import signal

    handlers: dict[int, Callable[[], None]] = {
        signal.SIGINT: worker.stop,
        signal.SIGTERM: worker.stop,
    }
    if hasattr(signal, "SIGUSR1"):  # not on Windows
        handlers[signal.SIGUSR1] = worker.pause
        handlers[signal.SIGUSR2] = worker.resume
    for signum, handler in handlers.items():
        loop.add_signal_handler(signum, handler)
    if started is not None:
        started(worker)
    try:
        await worker.run()
    except (AuthenticationFailed, PermissionDenied) as exc:
        print(f"dcproto-worker: {exc}", file=sys.stderr)
        return 3
    except CertificateMismatch as exc:
        print(f"dcproto-worker: {exc}", file=sys.stderr)
        return 4
    finally:
        for signum in handlers:
            loop.remove_signal_handler(signum)
        if alias is not None and worker.device_id and worker.device_id != config.device_id:
            from .. import users

            with contextlib.suppress(DcprotoError):
                users.set_device_id(alias, worker.device_id)
    print(f"dcproto-worker: {worker.completed} tasks done", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        from .menu import run_menu

        return run_menu()
    configure_logging(args.log_level, args.log_format)
    if args.tasks is not None and args.tasks < 1:
        print("dcproto-worker: --tasks must be at least 1", file=sys.stderr)
        return 2
    if len(set(args.trust)) > p.MAX_TRUSTED:
        print(f"dcproto-worker: --trust names at most {p.MAX_TRUSTED} creators", file=sys.stderr)
        return 2
    try:
        token = read_token_file(args.token_file) if args.token_file else None
        endpoint, device_id, alias = resolve_target(
            args.target, token=token, fingerprint=args.fingerprint, insecure=args.insecure
        )
    except DcprotoError as exc:
        print(f"dcproto-worker: {exc}", file=sys.stderr)
        return 2
    # a name that does not resolve would be retried for ever: refuse it now; a temporary
    # failure (no DNS server reachable yet) is left to the reconnect loop
    try:
        socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno != getattr(socket, "EAI_AGAIN", None):
            print(
                f"dcproto-worker: cannot resolve host {endpoint.host!r} "
                f"(from {args.target!r}): {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
        log.warning("cannot resolve %s yet (%s); will keep trying", endpoint.host, exc)
    config = WorkerConfig(
        endpoint=endpoint,
        device_id=device_id,
        name=args.name,
        slots=args.slots,
        prefetch=args.prefetch,
        max_tasks=args.tasks,
        sandbox=args.sandbox,
        allow_network=args.allow_network,
        max_memory=args.max_memory,
        max_task_seconds=args.max_task_seconds,
        max_disk=args.max_disk,
        cpu_limit=args.cpu_limit,
        when_idle=args.when_idle,
        trust=list(dict.fromkeys(args.trust)),
    )
    from ..connection import install_uvloop

    install_uvloop()
    return asyncio.run(run_worker(config, alias))


if __name__ == "__main__":
    sys.exit(main())
