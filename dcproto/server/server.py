"""The asyncio TCP server: handshake and auth, one protocol object per connection, timers.

It makes no decisions: frames become scheduler events, and the scheduler's actions become frames.
Writes are coalesced: a connection that has something to send is flushed once per loop turn,
except that messages reporting stored state wait for the next (group) commit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import secrets
import ssl
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .. import protocol as p
from ..errors import LocalProtocolError
from ..trust import permissions
from ..trust.tls import ServerIdentity, channel_binding, server_context
from ..trust.tokens import TokenRecord, TokenStore, verify_proof
from . import scheduler as s
from .admission import (
    DEFAULT_MAX_UNAUTHENTICATED,
    DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
    PER_ADDRESS,
    Admission,
    LogLimiter,
    address_key,
    peer_text,
)
from .limits import (
    DEFAULT_MAX_CODE_BYTES,
    DEFAULT_MAX_PROJECTS_PER_CREATOR,
    DEFAULT_MAX_STORED_RESULT_BYTES,
    Limits,
    Usage,
    past_quota,
    quota_message,
    submit_refusal,
)
from .replay import Replay, Replays, TooManyReplays
from .store import StateError, Store

if TYPE_CHECKING:  # imported when used: aiohttp and prometheus_client only for --http-port
    from .http import HttpSurface
    from .http_options import HttpOptions
    from .metrics import Metrics

log = logging.getLogger("dcproto.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_HEARTBEAT = 5.0
HANDSHAKE_TIMEOUT = 10.0  # from accept to Hello, TLS included
TLS_SHUTDOWN_TIMEOUT = 5.0  # a TLS close waits this long at most for the peer's close_notify
MAX_EARLY_BYTES = p.HANDSHAKE_MAX_FRAME  # raw bytes held until the TLS layer takes over
MIN_TIMER_INTERVAL = 0.02
TOKEN_CHECK_INTERVAL = 0.5  # seconds between looks at the tokens file
# a peer that stops reading is cut off once this much (and one frame of the largest size on top)
# waits for it, in the transport's buffer and held back behind a replay. Replays themselves are
# streamed only while the transport's buffer is under its high-water mark (4 MiB)
MAX_WRITE_BUFFER = 64 * 1024 * 1024
DEFAULT_KEEP_FINISHED = 7 * 24 * 3600.0  # seconds a finished project's record is kept
PRUNE_INTERVAL = 3600.0
INCIDENT_LOG_INTERVAL = 10.0  # seconds between log lines about one worker's misdeeds
TASK_ID_BLOCK = 1 << 16  # task ids reserved on disk at a time (see Server._flush)
COMMIT_SPACING = 4.0  # a commit waits until this many times the last one's duration has passed
MAX_COMMIT_DELAY = 0.001  # but never longer
FLUSH_LATENCY = 0.002  # output held this long in a busy loop turn is sent before the turn ends
CHECKPOINT_BYTES = 16 * 1024 * 1024  # WAL size past which a checkpoint starts (on a thread)
CHECKPOINT_CHECK_EVERY = 16  # commits between looks at the WAL's size (a stat each)
# messages that say something is on disk: sent only after the commit. Not Finished: if the
# server dies before committing, the project is redone after the restart (the creator already
# has every result; it has released them, so the rerun's copy is pruned in time)
COMMIT_FIRST = (p.Accepted, p.More, p.Attached, p.ProjectList)


class ServerConnection(asyncio.Protocol):
    """The I/O shell around one :class:`protocol.Connection`.

    With a TLS identity, the connection is accepted as plain TCP and the TLS handshake is run
    here (``loop.start_tls``) once the client's first bytes arrive: a socket that has not
    finished TLS is one of ours, counted, capped and closed like any unauthenticated
    connection, and costs no TLS state while it sends nothing. The Challenge goes out once TLS
    is up (at once on plain TCP)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conn_id = f"c{next(server.connection_ids)}"
        self.proto = p.Connection("server", max_frame=server.max_frame)
        self.transport: asyncio.Transport | None = None  # set once TLS is up (or at once)
        self.nonce = secrets.token_bytes(32)
        self.device_id: str | None = None
        self.role: str | None = None
        self.identity: str | None = None  # the token's name, once authenticated
        self.token_role: str | None = None
        self.name = "?"
        self.peer = "?"  # the peer's address key (admission.address_key): caps and slow-down
        self.last_received = time.monotonic()
        self.last_sent = self.last_received
        self.opened_at = self.last_received
        self.awaits_commit = False  # something queued may be sent only after the next commit
        self.gone = False  # closed, and Server.lost has run
        self._raw: asyncio.Transport | None = None  # the TCP transport (under TLS, if any)
        self._early: bytearray | None = None  # raw bytes before the TLS layer takes over
        self._plain = bytearray()  # decrypted bytes that came before our Challenge went out
        self._tls: asyncio.Task[None] | None = None  # the TLS handshake, while it runs
        self._refusal: asyncio.TimerHandle | None = None  # a failed login's delayed answer
        self.replays = Replays()  # results to replay after Attach, streamed (Server._pump)
        self.watching: set[str] = set()  # projects it follows (Attach with watch)
        self.worker_state: p.WorkerState | None = None  # a worker's latest, if it sent one
        self.paused = False  # the transport's buffer is past its high-water mark
        self.pump_scheduled = False

    @property
    def stage(self) -> str:
        """Where an unauthenticated connection is, for log lines."""
        if self.transport is None:
            return "in the TLS handshake" if self._tls is not None else "nothing received"
        if self.proto.state is p.State.AUTHENTICATING:
            return "login refused"
        return "no Hello yet"

    @property
    def closing(self) -> bool:
        return (
            self.gone
            or self.proto.state is p.State.CLOSED
            or (self.transport is not None and self.transport.is_closing())
        )

    # asyncio callbacks -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._raw = raw
        raw.set_write_buffer_limits(high=4 * 1024 * 1024)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            self.peer = address_key(str(peername[0]))
        self.server.opened(self)
        if self.gone:
            return
        if self.server.tls_context is None:
            self.transport = self._raw
            self.server.greet(self)
        else:
            self._early = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            self._before_ready(data)
            return
        self.last_received = time.monotonic()
        messages = self.proto.receive_data(data)
        for message in messages:
            self.server.handle(self, message)
        if self.proto.error is not None:
            self.server.refused(
                self.peer,
                "protocol_error",
                "closing %s (%s) from %s: protocol error: %s",
                self.conn_id,
                peer_text(self.name, 60),
                self.peer,
                peer_text(self.proto.error, 120),
            )
        self.server.mark_dirty(self)
        self.server.flush_if_late()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def pause_writing(self) -> None:
        self.paused = True  # replays wait (the TLS layer's buffer counts too, if any)

    def resume_writing(self) -> None:
        self.paused = False
        self.server.pump_soon(self)

    # the TLS handshake -------------------------------------------------------------------------

    def _before_ready(self, data: bytes) -> None:
        if self._early is not None:  # raw bytes: the first ones start the TLS handshake
            self._early += data
            if len(self._early) > MAX_EARLY_BYTES:
                self.abort()
            elif self._tls is None and self._raw is not None:
                self._raw.pause_reading()
                self._tls = asyncio.ensure_future(self._start_tls(self._raw))
        else:  # decrypted, but our Challenge has not gone out yet: kept for after it
            self._plain += data
            if len(self._plain) > MAX_EARLY_BYTES:
                self.abort()

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        context = self.server.tls_context
        assert context is not None and self._early is not None
        early, self._early = bytes(self._early), None  # what we get from now on is decrypted
        # start_tls gives the TLS layer the transport in its first step, below, and its own
        # callbacks run after this one: the layer sees the bytes that reached us first
        loop.call_soon(self._feed_tls, raw, early)
        try:
            # the liveness check closes a connection with no Hello after HANDSHAKE_TIMEOUT
            # (with a log line saying so); this is only the backstop
            transport = await loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT + 1.0,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        except asyncio.CancelledError:  # we closed it meanwhile (a cap, a timeout, stop)
            self._tls = None
            self.abort()
            return
        except Exception as exc:  # ssl.SSLError, OSError, TimeoutError...
            self._tls = None
            if not self.gone:
                self.server.tls_failed(self, exc)
            self.abort()
            return
        self._tls = None
        if transport is None or self.gone or transport.is_closing():
            self.abort()
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        self.server.greet(self)
        if self._plain:
            data, self._plain = bytes(self._plain), bytearray()
            self.data_received(data)

    def _feed_tls(self, raw: asyncio.Transport, data: bytes) -> None:
        """Hand the TLS layer the raw bytes that reached us before it took the transport
        over (uvloop starts reading before a protocol could pause it)."""
        layer: Any = raw.get_protocol()
        if self.gone or not data or layer is self:
            return
        try:
            if hasattr(layer, "get_buffer"):  # both loops' SSLProtocol: a BufferedProtocol
                view = memoryview(data)
                while view:
                    buffer = layer.get_buffer(len(view))
                    size = min(len(buffer), len(view))
                    buffer[:size] = view[:size]
                    layer.buffer_updated(size)
                    view = view[size:]
            else:
                layer.data_received(data)
        except Exception as exc:
            self.server.tls_failed(self, exc)
            self.abort()

    def challenge(self) -> None:
        self.send(
            p.Challenge(
                version=p.PROTOCOL_VERSION, nonce=self.nonce, max_frame=self.server.max_frame
            )
        )

    # closing -----------------------------------------------------------------------------------

    def abort(self) -> None:
        """Close at once, sending nothing more (a cap, a failed or stuck handshake)."""
        if self._raw is not None:
            self._raw.abort()
        self._gone()

    def _gone(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self._refusal is not None:
            self._refusal.cancel()
            self._refusal = None
        if self._tls is not None:
            task, self._tls = self._tls, None
            task.cancel()
        self.server.lost(self)

    # sending -----------------------------------------------------------------------------------

    def send(self, message: p.Message) -> None:
        if self.proto.state is p.State.CLOSED:
            return
        try:
            self.proto.send(message)
        except LocalProtocolError as exc:
            log.error("cannot send %s to %s: %s", type(message).__name__, self.conn_id, exc)
            return
        if isinstance(message, COMMIT_FIRST):
            self.awaits_commit = True
        self.server.mark_dirty(self)

    def flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        chunks = self.proto.chunks_to_send()
        if chunks:
            self.transport.writelines(chunks)
            self.last_sent = time.monotonic()
            if self.over_buffer():
                return
        if self.proto.state is p.State.CLOSED:
            self.transport.close()
        elif len(self.replays) and not self.paused:
            self.server.pump_soon(self)

    def over_buffer(self) -> bool:
        """Cut the peer off if too much waits for it (it is not reading); True if so."""
        if self.transport is None:
            return False
        waiting = self.transport.get_write_buffer_size() + self.replays.held_bytes
        if waiting <= MAX_WRITE_BUFFER + self.server.max_frame:
            return False
        log.warning("%s (%s) is not reading; closing it", self.conn_id, self.name)
        self.replays.clear()
        self.abort()
        return True

    def close(self, code: str, message: str) -> None:
        if self.transport is None:  # still before or in the TLS handshake: nothing to say in
            self.abort()
            return
        self.send(p.Error(code=code, message=message))
        self.server.mark_dirty(self)

    def close_later(self, delay: float, code: str, message: str) -> None:
        """Send the Error and close after ``delay`` seconds (a refused login from an address
        that must slow down), without blocking the loop."""
        if self._refusal is None and not self.closing:
            self._refusal = asyncio.get_running_loop().call_later(
                delay, self._close_now, code, message
            )

    def _close_now(self, code: str, message: str) -> None:
        self._refusal = None
        self.close(code, message)


class Server:
    def __init__(
        self,
        *,
        tokens: TokenStore,
        identity: ServerIdentity | None,
        state_dir: Path | None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        max_frame: int = p.DEFAULT_MAX_FRAME,
        keep_finished: float = DEFAULT_KEEP_FINISHED,
        max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
        max_unauthenticated_per_address: int = DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
        max_projects_per_creator: int = DEFAULT_MAX_PROJECTS_PER_CREATOR,
        max_code_bytes: int = DEFAULT_MAX_CODE_BYTES,
        max_stored_result_bytes: int = DEFAULT_MAX_STORED_RESULT_BYTES,
        max_slots: int = s.DEFAULT_MAX_SLOTS,
        max_task_time: float = s.DEFAULT_MAX_TASK_TIME,
        http: HttpOptions | None = None,
    ) -> None:
        """``state_dir=None`` keeps project state in memory only (the embedded default).
        ``identity=None`` serves plain TCP: only for loopback or an explicit ``--insecure``.
        At most ``max_unauthenticated`` connections (``..._per_address`` from one address) may
        be open without a successful Hello; past that the oldest of them is closed.
        ``max_projects_per_creator``, ``max_code_bytes`` and ``max_stored_result_bytes`` are
        the per-creator limits (see :mod:`.limits`; 0: no limit). ``max_slots`` caps the
        slots a worker is credited with, ``max_task_time`` the seconds a started task may stay
        unanswered (see :class:`.scheduler.Scheduler`). ``http``: serve the dashboard and
        Prometheus metrics there too (see :mod:`.http`)."""
        self.tokens = tokens
        self.identity = identity
        # what a client's proof is bound to: our certificate (nothing on plain TCP)
        self.channel = b"" if identity is None else channel_binding(identity.cert_der)
        self.state_dir = state_dir
        self.heartbeat = heartbeat
        self.max_frame = max_frame
        self.keep_finished = keep_finished
        self.tls_context: ssl.SSLContext | None = None  # made by start()
        # caps on connections not logged in yet, and slow-down of failed logins, per address
        self.admission = Admission(
            max_unauthenticated=max_unauthenticated,
            max_per_address=max_unauthenticated_per_address,
        )
        self.refusals: collections.Counter[str] = collections.Counter()  # closes, by reason
        self._refusal_log = LogLimiter()
        self.scheduler = s.Scheduler(max_slots=max_slots, max_task_time=max_task_time)
        self._last_incident_log = float("-inf")
        self._wake: asyncio.TimerHandle | None = None  # the scheduler's next WakeAt
        self._wake_when = 0.0
        self.store = Store(state_dir)
        self._store_failing = False
        # accepted results and finished projects not committed yet (the disk may be failing):
        # Attach must see them too; every successful commit clears them
        self._unsaved_results: dict[str, dict[int, dict[str, Any]]] = {}
        self._unsaved_finished: dict[str, tuple[p.Finished, int, int]] = {}
        self._last_prune = float("-inf")
        self.owners: dict[str, str] = {}  # running project -> the identity that submitted it
        self.limits = Limits(
            max_projects_per_creator=max_projects_per_creator,
            max_code_bytes=max_code_bytes,
            max_stored_result_bytes=max_stored_result_bytes,
        )
        self.usage = Usage()  # per owner: running projects, stored result bytes (restored)
        self._over_quota: set[str] = set()  # running projects to fail for the quota
        self.connections: dict[str, ServerConnection] = {}
        self.workers: dict[str, ServerConnection] = {}
        self.creators: dict[str, ServerConnection] = {}
        # running project -> connections that follow it without feeding it (Attach watch)
        self.watchers: dict[str, dict[str, ServerConnection]] = {}
        self.connection_ids = itertools.count(1)
        self._dirty: dict[str, ServerConnection] = {}
        self._flush_scheduled = False
        self._dirty_since = 0.0  # when the pending flush was scheduled
        self._task_id_ceiling = 0  # no task id above it was handed out; it is on disk
        self._after_commit: dict[str, ServerConnection] = {}  # flushed after the next commit
        self._commit_timer: asyncio.TimerHandle | None = None
        self._checkpoint: asyncio.Future[None] | None = None  # running on a thread
        self._commits_unchecked = 0
        self._last_commit_end = float("-inf")
        self._last_commit_took = 0.0
        self._server: asyncio.base_events.Server | None = None
        self._timer: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.address: tuple[str, int] | None = None
        self.started_at = time.monotonic()  # for ServerInfo's uptime
        self.http_options = http
        self.http: HttpSurface | None = None  # the dashboard and /metrics, once started
        self.metrics: Metrics | None = None  # made with it: the hooks below skip when None

    # lifecycle ---------------------------------------------------------------------------------

    async def start(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._restore()
        # accepted as plain TCP: each ServerConnection runs its own TLS handshake (start_tls),
        # so that connections still in it are counted and capped with the others
        self.tls_context = None if self.identity is None else server_context(self.identity)
        self._server = await loop.create_server(lambda: ServerConnection(self), host, port)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        self._timer = asyncio.create_task(self._run_timers())
        if self.http_options is not None:
            try:
                await self._start_http(self.http_options)
            except BaseException:
                self._server.close()
                self._timer.cancel()
                raise
        return self.address

    async def _start_http(self, options: HttpOptions) -> None:
        from .http import HttpSurface
        from .metrics import Metrics

        self.metrics = Metrics(self)
        self.http = HttpSurface(self, options, self.metrics)
        await self.http.start()

    async def stop(self, reason: str = "server shutting down") -> None:
        if self.http is not None:
            await self.http.stop()
        if self._server is not None:
            self._server.close()
        self._commit_and_flush()
        for conn in list(self.connections.values()):
            conn.send(p.Goodbye(reason=reason))
            conn.flush()
        self._stopping.set()
        if self._timer is not None:
            await asyncio.wait({self._timer}, timeout=5)
            self._timer.cancel()
        if self._wake is not None:
            self._wake.cancel()
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.close()
            else:  # still before or in the TLS handshake
                conn.abort()
        await asyncio.sleep(0)
        if self._checkpoint is not None:
            await asyncio.wait({self._checkpoint}, timeout=30)
        with contextlib.suppress(StateError):
            self.store.close()

    # coalesced writes --------------------------------------------------------------------------

    def mark_dirty(self, conn: ServerConnection) -> None:
        self._dirty[conn.conn_id] = conn
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._dirty_since = time.monotonic()
            asyncio.get_running_loop().call_soon(self._flush)

    def flush_if_late(self) -> None:
        """Flush now, between two connections' reads, when this loop turn has held its
        output for FLUSH_LATENCY: with thousands of connections ready at once, one turn can
        take long, and the tasks pushed early in it should not wait for its end."""
        if self._flush_scheduled and time.monotonic() - self._dirty_since > FLUSH_LATENCY:
            self._flush()  # the call already scheduled finds nothing left, or what came since

    def _flush(self) -> None:
        """Once per loop turn: send what may go before the state is on disk, and commit (now
        or soon) before sending the rest.

        Only messages that tell a creator something is stored (COMMIT_FIRST: Accepted, More,
        Attached, ProjectList) wait for the commit; so does anything queued behind them on the
        same connection. Workers never wait: if the server dies before the commit, a result for a
        task it never stored is dropped as unknown, and the creator resends the task (it keeps
        every task until More.stored covers it). Only a task id must never come back for a
        different task after a restart, so ids are handed out under a stored ceiling, raised a
        block at a time and committed before any id above the old ceiling leaves."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, {}
        if self.scheduler.last_task_id > self._task_id_ceiling:  # rare
            self._task_id_ceiling = self.scheduler.last_task_id + TASK_ID_BLOCK
            self.store.reserve_task_ids(self._task_id_ceiling)
            self._after_commit.update(dirty)
            self._commit_and_flush()
            return
        for conn in dirty.values():
            if conn.awaits_commit:
                self._after_commit[conn.conn_id] = conn
            else:
                conn.flush()
        if self._after_commit or self.store.has_pending():
            self._commit_soon()

    def _commit_soon(self) -> None:
        """Group commit: commits are spaced so that they take at most about a fifth of the
        time, waiting 1 ms at most. When the server is not busy that means at once; under
        load, a commit covers several turns."""
        if self._commit_timer is not None:
            return
        spacing = min(MAX_COMMIT_DELAY, COMMIT_SPACING * self._last_commit_took)
        wait = self._last_commit_end + spacing - time.monotonic()
        if wait <= 0:
            self._commit_and_flush()
        else:
            self._commit_timer = asyncio.get_running_loop().call_later(wait, self._commit_and_flush)

    def _commit_and_flush(self) -> None:
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        started = time.monotonic()
        self._commit()
        self._last_commit_end = time.monotonic()
        self._last_commit_took = self._last_commit_end - started
        waiting, self._after_commit = self._after_commit, {}
        for conn in waiting.values():
            conn.awaits_commit = False
            conn.flush()
        self._commits_unchecked += 1
        if self._checkpoint is None and self._commits_unchecked >= CHECKPOINT_CHECK_EVERY:
            self._commits_unchecked = 0
            if self.store.wal_bytes() > CHECKPOINT_BYTES:
                self._checkpoint = asyncio.get_running_loop().run_in_executor(
                    None, self.store.checkpoint
                )
                self._checkpoint.add_done_callback(self._checkpoint_done)

    def _checkpoint_done(self, done: asyncio.Future[None]) -> None:
        """The bulk of the WAL is in the database now (copied and synced on a thread); what
        was committed meanwhile is copied here, briefly blocking, and the WAL starts over."""
        self._checkpoint = None
        try:
            if done.cancelled():
                return
            error = done.exception()
            if error is not None:
                raise error
            self.store.restart_wal()
        except StateError as exc:
            log.warning("%s", exc)

    def _commit(self) -> None:
        timed = self.metrics is not None and self.store.has_pending()
        started = time.perf_counter()
        try:
            dropped = self.store.commit()
        except StateError as exc:
            # Keep serving from memory: projects still finish; the queued writes are retried
            # on every turn until the disk takes them again.
            if not self._store_failing:
                log.error("%s; serving from memory until the disk recovers", exc)
            self._store_failing = True
        else:
            if self._store_failing:
                log.warning("the state database is writable again")
            self._store_failing = False
            if timed and self.metrics is not None:
                self.metrics.commit_took(time.perf_counter() - started)
            self._unsaved_results.clear()
            self._unsaved_finished.clear()
            if dropped:
                self._fail_dropped(dropped)

    def _fail_dropped(self, projects: set[str]) -> None:
        """Writes of these projects could not be stored at all and were left out (the store
        logged each): fail those still running, with reason ``store_error``. Every other
        project's writes of the same commit are on disk."""
        now = time.monotonic()
        for project_id in sorted(projects):
            error = {
                "reason": "store_error",
                "message": "the server could not store part of this project (a value out of "
                "range for its database); see the server's log",
            }
            self._run(self.scheduler.fail(project_id, error, now))

    def _restore(self) -> None:
        """Take back the running projects of an earlier run from durable state, and what each
        owner holds (running projects, stored results) for the per-creator limits."""
        now = time.monotonic()
        for project_id, owner, nbytes in self.store.stored_result_bytes():
            self.usage.result_stored(project_id, nbytes, owner)
        self._task_id_ceiling = self.store.max_task_id()
        self.scheduler.reserve_task_ids(self._task_id_ceiling)
        for stored in self.store.running_projects():
            spec = stored.spec
            submit = p.Submit(
                project_id=stored.project_id,
                name=stored.name,
                code=stored.code,
                modules=list(spec.get("modules", [])),
                parallel=spec.get("parallel", "parallel_func"),
                stop=spec.get("stop"),
                only_if=spec.get("only_if"),
                options=dict(spec.get("options", {})),
            )
            self.owners[stored.project_id] = stored.owner or ""
            self.usage.started(stored.project_id, stored.owner or "")
            tasks = list(self.store.open_tasks(stored.project_id))
            actions = self.scheduler.restore(
                stored.project_id,
                submit,
                submitted_at=now - (time.time() - stored.submitted_at),
                tasks=tasks,
                tasks_received=stored.tasks_received,
                items_received=stored.items_received,
                total_tasks=stored.total_tasks,
                done=self.store.done_counts(stored.project_id),
                now=now,
                owner=stored.owner or "",
            )
            self._run(actions)
            log.info(
                "resumed project %s (%s): %d tasks open", stored.project_id, stored.name, len(tasks)
            )
        self._commit()

    # admission: connections before they log in ------------------------------------------------

    def opened(self, conn: ServerConnection) -> None:
        """A connection was accepted: count it as unauthenticated, and close the oldest
        unauthenticated ones past the caps (an honest client always gets its turn)."""
        self.connections[conn.conn_id] = conn
        now = time.monotonic()
        for eviction in self.admission.opened(conn.conn_id, conn.peer):
            victim = self.connections.get(eviction.conn_id)
            if victim is None:
                continue
            flag = "--max-unauthenticated"
            if eviction.cap == PER_ADDRESS:
                flag += "-per-address"
            self.refused(
                eviction.address,
                f"cap_{eviction.cap}",
                "closing unauthenticated connection %s from %s (%s, open %.1f s): "
                "%s cap of %d unauthenticated connections reached (%s)",
                victim.conn_id,
                eviction.address,
                victim.stage,
                now - victim.opened_at,
                eviction.cap,
                eviction.limit,
                flag,
            )
            victim.abort()

    def greet(self, conn: ServerConnection) -> None:
        """TLS is up (or not used): send the Challenge, unless the peer's address has failed
        to log in too often lately; then it is told to slow down."""
        wait = self.admission.penalty(conn.peer, time.monotonic())
        if wait <= 0:
            conn.challenge()
            return
        self.refused(
            conn.peer,
            "slow_down",
            "refusing %s from %s: %d failed logins from there lately; slow down for %.1f s",
            conn.conn_id,
            conn.peer,
            self.admission.failures(conn.peer),
            wait,
        )
        conn.close(
            "slow_down",
            f"too many failed logins from your address: try again in {math.ceil(wait)} s",
        )

    def tls_failed(self, conn: ServerConnection, exc: BaseException) -> None:
        self.refusals["tls_failed"] += 1
        log.debug(
            "%s from %s: TLS handshake failed: %s",
            conn.conn_id,
            conn.peer,
            peer_text(str(exc) or type(exc).__name__, 200),
        )

    def refused(self, address: str, reason: str, message: str, *args: object) -> None:
        """Count a connection refused or closed for ``reason``, and log ``message``: at most
        one such line per address per LogLimiter.interval, the next one telling how many
        were held back (peer text in ``args`` must have gone through ``peer_text``)."""
        self.refusals[reason] += 1
        held = self._refusal_log.allow(address, time.monotonic())
        if held is None:
            return
        if held:
            log.warning(message + " [and %d more from %s not logged]", *args, held, address)
        else:
            log.warning(message, *args)

    def _log_held_refusals(self, now: float) -> None:
        for address, held in self._refusal_log.overdue(now):
            log.warning("%d more refused or closed connections from %s not logged", held, address)

    def _log_incidents(self, now: float) -> None:
        """What workers did wrong (counted by the scheduler): one line per worker and kind per
        INCIDENT_LOG_INTERVAL at most, each with the count since the last line."""
        if now - self._last_incident_log < INCIDENT_LOG_INTERVAL:
            return
        incidents = self.scheduler.take_incidents()
        if not incidents:
            return
        self._last_incident_log = now
        for incident in incidents:
            worker = f"{peer_text(incident.name, 60)} ({incident.worker_id})"
            if incident.kind == "forged_results":
                log.warning(
                    "dropped %d results from worker %s for tasks it does not hold "
                    "(%d since the start)",
                    incident.count,
                    worker,
                    self.scheduler.forged_results_dropped,
                )
            elif incident.kind == "expired_leases":
                log.warning(
                    "worker %s gave no sign of life within its projects' lease_timeout: "
                    "%d of its tasks were re-issued",
                    worker,
                    incident.count,
                )
            else:
                log.warning(
                    "worker %s held %d started tasks past their time limit: all its tasks "
                    "were re-issued (%d since the start)",
                    worker,
                    incident.count,
                    self.scheduler.tasks_overdue,
                )

    # events ------------------------------------------------------------------------------------

    def handle(self, conn: ServerConnection, message: p.Message) -> None:
        now = time.monotonic()
        if conn.role == "worker":
            self._run(self.scheduler.worker_seen(conn.conn_id, now))
        match message:
            case p.Hello():
                self._hello(conn, message, now)
            case p.Credit():
                self._run(self.scheduler.worker_credit(conn.conn_id, message.credit, now))
            case p.WorkerState():
                was = conn.worker_state
                conn.worker_state = message
                changed = was is None or (was.paused, was.trust) != (message.paused, message.trust)
                if changed:  # else only its usage figures are new
                    log.info(
                        "worker %s %s%s",
                        peer_text(conn.name, 60),
                        "paused" if message.paused else "running",
                        f", for {len(message.trust)} trusted creators" if message.trust else "",
                    )
                    self._run(
                        self.scheduler.worker_state(
                            conn.conn_id, paused=message.paused, trust=message.trust, now=now
                        )
                    )
            case p.Result():
                if self.metrics is not None:
                    self.metrics.result(conn, message)
                self._run(self.scheduler.task_result(conn.conn_id, message, now))
            case p.Reject():
                log.info(
                    "%s cannot run %s: %s",
                    peer_text(conn.name, 60),
                    peer_text(message.project_id, 60),
                    peer_text(message.reason),
                )
                self._run(
                    self.scheduler.worker_rejects(
                        conn.conn_id, message.project_id, message.reason, now
                    )
                )
            case p.Submit():
                self._submit(conn, message, now)
            case p.Tasks():
                try:
                    actions = self.scheduler.add_tasks(conn.conn_id, message, now)
                except s.TasksRefused as exc:  # e.g. more new tasks than its credit
                    self.refused(
                        conn.peer,
                        exc.code,
                        "closing creator %s (%s) from %s: %s",
                        conn.conn_id,
                        peer_text(conn.name, 60),
                        conn.peer,
                        peer_text(exc, 200),
                    )
                    conn.close(exc.code, str(exc))
                else:
                    self._run(actions)
            case p.End():
                actions = self.scheduler.end_tasks(conn.conn_id, message, now)
                project = self.scheduler.projects.get(message.project_id)
                if project is not None and project.total_tasks == message.total_tasks:
                    self.store.tasks_ended(
                        message.project_id, message.total_tasks, message.total_items
                    )
                self._run(actions)
            case p.Attach():
                if self._may_access(conn, message.project_id):
                    self._attach(conn, message, now)
                else:
                    self._refuse_attach(conn, message)
            case p.Release():
                stored = self.store.project(message.project_id)
                if not self._may_access(conn, message.project_id):
                    log.warning("%s: Release of a project it does not own", conn.conn_id)
                elif stored is not None and stored.status != "running":
                    self.store.project_released(message.project_id)
                    self.usage.released(message.project_id)
            case p.ListProjects():
                self._commit()
                projects = [
                    row
                    for row in self.store.projects()
                    if permissions.may_access_project(
                        conn.identity or "", conn.token_role or "", row["owner"]
                    )
                ]
                for row in projects:
                    live = self.scheduler.projects.get(row["project_id"])
                    if live is not None:  # running: the counts of now
                        row["tasks_done"], row["items_done"] = live.tasks_done, live.items_done
                        row["tasks_reissued"] = live.tasks_reissued
                        if live.first_started_at is not None:  # monotonic: as epoch seconds
                            started = live.first_started_at - live.submitted_at
                            row["first_started_at"] = row["submitted_at"] + started
                conn.send(p.ProjectList(ref=message.ref, projects=projects))
            case p.ListWorkers():
                conn.send(p.WorkerList(ref=message.ref, workers=self._worker_rows(conn, now)))
            case p.ServerInfo():
                conn.send(p.ServerInfoReply(ref=message.ref, info=self._server_info(conn, now)))
            case p.Cancel():
                running = self.scheduler.projects.get(message.project_id)
                if self._may_access(conn, message.project_id):
                    if running is not None:  # its owner (or an admin), bound to it or not
                        owner = running.creator_id
                        self._run(self.scheduler.cancel(owner, running.project_id, now))
                else:
                    log.warning("%s: Cancel of a project it does not own", conn.conn_id)
            case p.Goodbye() | p.Error():
                text = message.reason if isinstance(message, p.Goodbye) else message.message
                log.info(
                    "%s (%s) closes: %s %s",
                    conn.conn_id,
                    peer_text(conn.name, 60),
                    type(message).__name__,
                    peer_text(text),
                )
            case _:
                pass  # Heartbeat: liveness was recorded above

    def _worker_rows(self, asker: ServerConnection | None, now: float) -> list[dict[str, Any]]:
        """The connected workers as ``asker`` may see them: volunteers' details (identity,
        device, trust, usage) go to admins only. ``None``: the dashboard (an admin's view)."""
        admin = asker is None or asker.token_role == "admin"
        rows = []
        for conn in self.workers.values():
            record = self.scheduler.workers.get(conn.conn_id)
            if record is None:
                continue
            row: dict[str, Any] = {
                "name": conn.name,
                "slots": record.slots,
                "paused": record.paused,
                "running": record.running,
                "held": len(record.leased),
                "done": record.done,
                "last_seen": max(0.0, now - record.last_seen),
            }
            if admin:
                state = conn.worker_state
                row.update(
                    identity=conn.identity,
                    device_id=conn.device_id,
                    trust=sorted(record.trust),
                    usage=dict(state.usage) if state is not None else {},
                    rtt=record.rtt,
                    connected_for=now - conn.opened_at,
                )
            rows.append(row)
        return rows

    def _server_info(self, asker: ServerConnection, now: float) -> dict[str, Any]:
        """ServerInfoReply's map: version, uptime, address, certificate and counts. Running
        projects are counted as ListProjects shows them: the asker's own, or all for an admin."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("dcproto")
        except PackageNotFoundError:
            from .. import __version__ as number
        records = [self.scheduler.workers.get(c.conn_id) for c in self.workers.values()]
        workers = [record for record in records if record is not None]
        running = sum(
            project.status == "running"
            and permissions.may_access_project(
                asker.identity or "", asker.token_role or "", project.owner
            )
            for project in self.scheduler.projects.values()
        )
        address = self.address
        return {
            "version": number,
            "protocol": p.PROTOCOL_VERSION,
            "uptime": now - self.started_at,
            "started_at": time.time() - (now - self.started_at),
            "time": time.time(),
            "address": None if address is None else f"{address[0]}:{address[1]}",
            "tls": self.identity is not None,
            "fingerprint": None if self.identity is None else self.identity.fingerprint,
            "identity": asker.identity,
            "role": asker.token_role,
            "workers": len(workers),
            "slots": sum(record.slots for record in workers),
            "slots_busy": sum(record.running for record in workers),
            "creators": len(self.creators),
            "projects_running": running,
        }

    def _verified(self, conn: ServerConnection, hello: p.Hello) -> TokenRecord | None:
        record = self.tokens.get(hello.identity)
        return (
            record
            if record is not None
            and verify_proof(
                record.stored_key,
                identity=hello.identity,
                proof=hello.proof,
                nonce=conn.nonce,
                role=hello.role,
                channel=self.channel,
            )
            else None
        )

    def _hello(self, conn: ServerConnection, hello: p.Hello, now: float) -> None:
        record = self._verified(conn, hello)
        if record is None:
            # a token added a moment ago works at once: look at the tokens file again (a stat)
            self._check_tokens()
            record = self._verified(conn, hello)
        if record is None:
            self._refuse_login(
                conn,
                "auth_failed",
                "unknown, revoked or wrong token",
                now,
                f"refused token {peer_text(hello.identity)!r}",
            )
            return
        if not permissions.may_connect_as(record.role, hello.role):
            self._refuse_login(
                conn,
                "forbidden",
                permissions.refusal(record.role, hello.role),
                now,
                f"token {peer_text(hello.identity)!r} may not connect as {hello.role}",
            )
            return
        self.admission.done(conn.conn_id)  # no longer counts against the caps
        self.admission.succeeded(conn.peer)
        conn.identity = record.name
        conn.token_role = record.role
        device_id = hello.device_id
        # a device id is kept only by the identity it was given to: nobody can pose as
        # another person's worker to deliver results for its tasks
        if not device_id or self.store.device_owner(device_id) not in ("", record.name):
            device_id = uuid.uuid4().hex
        conn.device_id = device_id
        conn.role = hello.role
        conn.name = hello.name or device_id[:8]
        self.store.device_seen(device_id, conn.name, hello.role, record.name)
        conn.send(
            p.Welcome(
                device_id=device_id, heartbeat_interval=self.heartbeat, max_frame=self.max_frame
            )
        )
        log.info(
            "%s joined as %s (%s from %s, %d slots)",
            peer_text(conn.name),
            hello.role,
            conn.conn_id,
            conn.peer,
            hello.slots,
        )
        if hello.role == "worker":
            self.workers[conn.conn_id] = conn
            self._run(
                self.scheduler.add_worker(
                    conn.conn_id, device_id=device_id, name=conn.name, slots=hello.slots, now=now
                )
            )
        else:
            self.creators[conn.conn_id] = conn

    def _refuse_login(
        self, conn: ServerConnection, code: str, text: str, now: float, why: str
    ) -> None:
        """A Hello refused: answered at once, or, once its address has failed too often
        lately, only after a growing delay (Admission.failed)."""
        delay = self.admission.failed(conn.peer, now)
        self.refused(
            conn.peer,
            code,
            "%s from %s: %s (%s)%s",
            conn.conn_id,
            conn.peer,
            why,
            code,
            f"; answering in {delay:.1f} s (slow down)" if delay > 0 else "",
        )
        if delay > 0:
            conn.close_later(delay, code, text)
        else:
            conn.close(code, text)

    def _owner(self, project_id: str) -> str | None:
        owner = self.owners.get(project_id)
        if owner is None:
            stored = self.store.project(project_id)
            owner = None if stored is None else stored.owner
        return owner

    def _may_access(self, conn: ServerConnection, project_id: str) -> bool:
        # an id nobody owns reads like someone else's to a non-admin, so that ids cannot be
        # probed; a creator whose Submit was lost takes "forbidden" as "submit again"
        return permissions.may_access_project(
            conn.identity or "", conn.token_role or "", self._owner(project_id)
        )

    def _refuse_attach(self, conn: ServerConnection, attach: p.Attach) -> None:
        """Attach to a project of someone else's: ``forbidden`` (an unknown id to a non-admin
        reads the same as any project it does not own)."""
        log.warning("%s (%s): Attach to a project it does not own", conn.conn_id, conn.identity)
        conn.send(
            p.Attached(
                ref=attach.ref,
                project_id=attach.project_id,
                status="forbidden",
                stored=0,
                items_stored=0,
                ended=False,
                credit=0,
            )
        )

    def _submit(self, conn: ServerConnection, submit: p.Submit, now: float) -> None:
        project_id = submit.project_id
        if not permissions.may_submit(conn.token_role or ""):
            self._refuse(conn, project_id, "forbidden", "this token may not submit projects")
            return
        if (
            project_id in self.scheduler.projects
            # finished (and forgotten by the scheduler) in this very turn, not committed yet:
            # a second project under its id would write over its rows
            or project_id in self._unsaved_finished
            or self.store.project(project_id) is not None
        ):
            self._refuse(conn, project_id, "duplicate_id", f"project id {project_id} is in use")
            return
        owner = conn.identity or ""
        refusal = submit_refusal(self.limits, self.usage, owner, len(submit.code))
        if refusal is not None:
            log.warning("%s: project %s refused: %s", conn.conn_id, project_id, refusal[1])
            self._refuse(conn, project_id, *refusal)
            return
        try:
            actions = self.scheduler.submit(conn.conn_id, submit, now, owner=owner)
        except ValueError as exc:
            self._refuse(conn, project_id, "bad_options", str(exc))
            return
        spec = {
            "modules": submit.modules,
            "parallel": submit.parallel,
            "stop": submit.stop,
            "only_if": submit.only_if,
            "options": self.scheduler.projects[project_id].options,
        }
        self.owners[project_id] = owner
        self.usage.started(project_id, owner)
        self.store.project_submitted(
            project_id, submit.name, conn.device_id or "", submit.code, spec, owner
        )
        log.info(
            "project %s (%s) submitted by %s",
            project_id,
            peer_text(submit.name),
            peer_text(conn.name, 60),
        )
        self._run(actions)

    def _refuse(self, conn: ServerConnection, project_id: str, reason: str, text: str) -> None:
        """A Submit not taken: Accepted of credit 0, then Finished ``failed``; the tasks the
        creator sent behind the Submit are dropped as tasks of an unknown project."""
        conn.send(p.Accepted(project_id=project_id, credit=0))
        self._to_creator(
            conn,
            p.Finished(
                project_id=project_id,
                status="failed",
                error={"reason": reason, "message": text},
                stop=None,
                stats={},
            ),
        )

    def _attach(self, conn: ServerConnection, attach: p.Attach, now: float) -> None:
        """Re-attach a creator: the project's state at once, then every stored result, then
        Finished if it has ended, streamed (see :meth:`_replay`). The creator drops seqs it
        already has."""
        self._commit()  # so that the replay below reads every result accepted so far
        project_id = attach.project_id
        running = self.scheduler.projects.get(project_id)
        if attach.watch and running is not None and running.status == "running":
            self._replay(conn, project_id, None)  # first: live results are held back from now
            conn.watching.add(project_id)
            self.watchers.setdefault(project_id, {})[conn.conn_id] = conn
            conn.send(
                p.Attached(
                    ref=attach.ref,
                    project_id=project_id,
                    status="running",
                    stored=running.tasks_received,
                    items_stored=running.items_received,
                    ended=running.total_tasks is not None,
                    credit=0,
                )
            )
            return
        actions = self.scheduler.attach(conn.conn_id, attach.ref, project_id, now)
        stored = self.store.project(project_id)
        if actions:
            self._replay(conn, project_id, None)  # first: live results are held back from now
            self._run(actions)  # Attached
            return
        unsaved = self._unsaved_finished.get(project_id)
        if unsaved is not None:  # finished, but not on disk yet
            finished, tasks_received, items_received = unsaved
            conn.send(
                p.Attached(
                    ref=attach.ref,
                    project_id=project_id,
                    status=finished.status,
                    stored=tasks_received,
                    items_stored=items_received,
                    ended=True,
                    credit=0,
                )
            )
            self._replay(conn, project_id, finished)
            return
        if stored is None or stored.status == "running":
            conn.send(
                p.Attached(
                    ref=attach.ref,
                    project_id=project_id,
                    status="unknown",
                    stored=0,
                    items_stored=0,
                    ended=False,
                    credit=0,
                )
            )
            return
        conn.send(
            p.Attached(
                ref=attach.ref,
                project_id=project_id,
                status="released" if stored.released else stored.status,
                stored=stored.tasks_received,
                items_stored=stored.items_received,
                ended=True,
                credit=0,
            )
        )
        if stored.released:
            return  # its results are gone: nothing to replay
        outcome = stored.outcome or {}
        finished = p.Finished(
            project_id=project_id,
            status=stored.status,
            error=outcome.get("error"),
            stop=outcome.get("stop"),
            stats=outcome.get("stats", {}),
        )
        self._replay(conn, project_id, finished)

    def _replay(self, conn: ServerConnection, project_id: str, last: p.Message | None) -> None:
        """Queue the replay of a project's stored results (and of those accepted but not on
        disk yet), then ``last``, to ``conn``. It is streamed a page at a time while the
        connection reads (:meth:`_pump`), one replay per connection at a time; an Attach of a
        project already replaying or waiting to on ``conn`` starts none, and past
        ``replay.MAX_REPLAYS`` waiting the connection is closed with ``too_many_requests``.
        Nothing live about the project (a new TaskDone, or Finished) overtakes the replay: from
        now on such messages to ``conn`` are held back until it is over (:meth:`_to_creator`)."""
        if conn.closing or project_id in conn.replays:
            return  # a replay under way or waiting covers this Attach too
        replay = Replay(project_id, last, dict(self._unsaved_results.get(project_id, {})))
        try:
            if conn.replays.add(replay):
                self.pump_soon(conn)
        except TooManyReplays as exc:
            log.warning("closing %s (%s): %s", conn.conn_id, peer_text(conn.name), exc)
            conn.replays.clear()
            conn.close("too_many_requests", f"{exc}; wait for the replays under way")

    def pump_soon(self, conn: ServerConnection) -> None:
        if len(conn.replays) and not conn.pump_scheduled:
            conn.pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump, conn)

    def _pump(self, conn: ServerConnection) -> None:
        """Queue the next step of ``conn``'s replay (a page of about ``replay.STEP_BYTES``),
        unless its transport's buffer is full (pause_writing): the flush that writes it, or
        resume_writing, asks for the next one. A peer that never reads holds one page."""
        conn.pump_scheduled = False
        if conn.closing:
            conn.replays.clear()
            return
        if conn.paused or conn.transport is None:
            return
        try:
            messages = conn.replays.step(self._results_page)
        except Exception as exc:  # sqlite3.Error: the database cannot be read
            log.error("cannot replay results to %s: %s", conn.conn_id, exc)
            conn.replays.clear()
            conn.close("store_error", "the server cannot read its stored results; try later")
            return
        for message in messages:
            conn.send(message)

    def _results_page(self, project_id: str, after_seq: int, max_bytes: int) -> list[Any]:
        return self.store.results_page(project_id, after_seq, max_bytes=max_bytes)

    def _to_creator(self, conn: ServerConnection, message: p.Message) -> None:
        """Send ``message`` to a creator, unless it is a TaskDone or Finished of a project
        whose replay to ``conn`` runs or waits: then it follows the replay."""
        if conn.replays.hold(message):
            conn.over_buffer()  # what is held counts as waiting for the peer
            return
        conn.send(message)

    def lost(self, conn: ServerConnection) -> None:
        conn.replays.clear()
        for project_id in conn.watching:
            watchers = self.watchers.get(project_id, {})
            watchers.pop(conn.conn_id, None)
            if not watchers:
                self.watchers.pop(project_id, None)
        conn.watching.clear()
        self.admission.done(conn.conn_id)
        self.connections.pop(conn.conn_id, None)
        self._dirty.pop(conn.conn_id, None)
        self._after_commit.pop(conn.conn_id, None)
        now = time.monotonic()
        if self.workers.pop(conn.conn_id, None) is not None:
            log.info("worker %s left", peer_text(conn.name))
            self._run(self.scheduler.remove_worker(conn.conn_id, now))
        if self.creators.pop(conn.conn_id, None) is not None:
            self._run(self.scheduler.remove_creator(conn.conn_id, now))

    def _run(self, actions: list[s.Action]) -> None:
        for action in actions:
            match action:
                case s.SendTask(worker_id, message) | s.SendProject(worker_id, message):
                    conn = self.workers.get(worker_id)
                    if conn is not None:
                        conn.send(message)
                    if self.metrics is not None and isinstance(message, p.Task):
                        self.metrics.task_sent(message)
                case s.AbandonTasks(worker_id, task_ids):
                    conn = self.workers.get(worker_id)
                    if conn is not None:
                        conn.send(p.Abandon(task_ids=task_ids))
                case s.RecallTasks(worker_id, task_ids):
                    conn = self.workers.get(worker_id)
                    if conn is not None:
                        conn.send(p.Recall(task_ids=task_ids))
                case s.WakeAt(when):
                    self._wake_at(when)
                case s.StoreTasks(project_id, tasks):
                    self.store.tasks_added(project_id, tasks)
                    if self.metrics is not None:
                        self.metrics.task_stored(project_id, tasks)
                case s.ToCreator(creator_id, message):
                    if isinstance(message, p.TaskDone):
                        record = {
                            "seq": message.seq,
                            "items": message.items,
                            "payload": message.payload,
                            "n_items": message.n_items,
                            "n_kept": message.n_kept,
                            "files": message.files,
                            "stats": message.stats,
                        }
                        nbytes = self.store.task_done(message.project_id, message.seq, record)
                        unsaved = self._unsaved_results.setdefault(message.project_id, {})
                        unsaved.setdefault(message.seq, record)
                        total = self.usage.result_stored(message.project_id, nbytes)
                        if past_quota(self.limits, total):
                            self._over_quota.add(message.project_id)
                        if self.metrics is not None:
                            self.metrics.task_done(message)
                    conn = self.creators.get(creator_id or "")
                    if conn is not None:
                        self._to_creator(conn, message)
                    project_id = getattr(message, "project_id", "")
                    for watcher in self.watchers.get(project_id, {}).values():
                        if watcher is not conn:
                            self._to_creator(watcher, message)
                    if isinstance(message, p.Finished):
                        for watcher in self.watchers.pop(project_id, {}).values():
                            watcher.watching.discard(project_id)
                        self._finished(message)
        while self._over_quota:  # the result that went past the quota is kept; no more are
            self._fail_over_quota(self._over_quota.pop())

    def _wake_at(self, when: float) -> None:
        """Run the scheduler's clock at ``when`` (monotonic), unless it runs earlier anyway."""
        if self._wake is not None and self._wake_when <= when:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_when = when
        self._wake = asyncio.get_running_loop().call_later(
            max(0.0, when - time.monotonic()), self._woken
        )

    def _woken(self) -> None:
        self._wake = None
        self._run(self.scheduler.tick(time.monotonic()))

    def _fail_over_quota(self, project_id: str) -> None:
        owner = self.usage.owner(project_id) or ""
        project = self.scheduler.projects.get(project_id)
        if project is None or project.status != "running":
            return
        text = quota_message(self.limits, self.usage, owner)
        log.warning("project %s fails: %s", project_id, text)
        error = {"reason": "quota", "message": text}
        self._run(self.scheduler.fail(project_id, error, time.monotonic()))

    def _finished(self, message: p.Finished) -> None:
        log.info("project %s %s", message.project_id, message.status)
        project = self.scheduler.projects.get(message.project_id)
        if project is not None and self.metrics is not None:
            self.metrics.project_finished(project, message)
        if project is not None:
            self._unsaved_finished[message.project_id] = (
                message,
                project.tasks_received,
                project.items_received,
            )
        self.store.project_finished(
            message.project_id,
            message.status,
            {"error": message.error, "stop": message.stop, "stats": message.stats},
        )
        self.scheduler.forget_project(message.project_id)
        self.owners.pop(message.project_id, None)
        self.usage.ended(message.project_id)

    # timers ------------------------------------------------------------------------------------

    async def _run_timers(self) -> None:
        """Lease expiry, heartbeats and silent-peer detection."""
        while True:
            now = time.monotonic()
            self._run(self.scheduler.tick(now))
            self._log_incidents(now)
            self._check_liveness(now)
            self._log_held_refusals(now)
            self._check_tokens()
            if now - self._last_prune > PRUNE_INTERVAL:
                self._last_prune = now
                for project_id in self.store.prune(self.keep_finished):
                    self.usage.released(project_id)
            # Leases are checked a few times per the shortest lease, not on every event: an
            # expiry is noticed at most a quarter of a lease late, at a fixed small cost.
            wait = min(self.heartbeat / 2, TOKEN_CHECK_INTERVAL)
            for project in self.scheduler.projects.values():
                wait = min(wait, project.options["lease_timeout"] / 4)
            deadline = self.scheduler.next_deadline()
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            wait = max(MIN_TIMER_INTERVAL, wait)
            # not wait_for: on Python 3.11 it can swallow the cancellation stop() sends
            waiter = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({waiter}, timeout=wait)
            finally:
                waiter.cancel()
            if self._stopping.is_set():
                return

    def _check_tokens(self) -> None:
        """Pick up tokens added or revoked by ``dcproto tokens`` (one stat when nothing
        changed); a revoked token's connections are closed at once."""
        if not self.tokens.reload_if_changed():
            return
        for conn in list(self.connections.values()):
            if conn.identity is None:
                continue
            record = self.tokens.get(conn.identity)
            if record is None or not permissions.may_connect_as(record.role, conn.role or ""):
                log.warning("%s (%s): token %r revoked", conn.conn_id, conn.name, conn.identity)
                conn.close("revoked", "this connection's token was revoked")
            else:
                conn.token_role = record.role

    def _check_liveness(self, now: float) -> None:
        silence_limit = self.heartbeat * p.SILENCE_FACTOR
        for conn in list(self.connections.values()):
            if conn.role is None:
                if now - conn.opened_at > HANDSHAKE_TIMEOUT and not conn.closing:
                    self.refused(
                        conn.peer,
                        "handshake_timeout",
                        "closing %s from %s: no Hello within %.0f s (handshake timeout; %s)",
                        conn.conn_id,
                        conn.peer,
                        HANDSHAKE_TIMEOUT,
                        conn.stage,
                    )
                    conn.close("handshake_timeout", "no Hello in time")
                continue
            if now - conn.last_received > silence_limit:
                log.warning(
                    "%s (%s) silent for %.1f s; dropping it",
                    conn.conn_id,
                    peer_text(conn.name),
                    now - conn.last_received,
                )
                if conn.transport is not None:
                    conn.transport.abort()
            elif now - conn.last_sent > self.heartbeat:
                conn.send(p.Heartbeat())
