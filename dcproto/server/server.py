"""The asyncio TCP server: handshake and auth, one protocol object per connection, timers.

It makes no decisions: frames become scheduler events, and the scheduler's actions become frames.
Writes are coalesced: a connection that has something to send is flushed once per loop turn,
except that messages reporting stored state wait for the next (group) commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

from .. import protocol as p
from ..errors import LocalProtocolError
from ..trust import permissions
from ..trust.tls import ServerIdentity, channel_binding, server_context
from ..trust.tokens import TokenRecord, TokenStore, verify_proof
from . import scheduler as s
from .store import StateError, Store

log = logging.getLogger("dcproto.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_HEARTBEAT = 5.0
HANDSHAKE_TIMEOUT = 10.0
MIN_TIMER_INTERVAL = 0.02
TOKEN_CHECK_INTERVAL = 0.5  # seconds between looks at the tokens file
MAX_WRITE_BUFFER = 256 * 1024 * 1024  # a peer that stops reading is cut off past this
DEFAULT_KEEP_FINISHED = 7 * 24 * 3600.0  # seconds a finished project's record is kept
PRUNE_INTERVAL = 3600.0
TASK_ID_BLOCK = 1 << 16  # task ids reserved on disk at a time (see Server._flush)
COMMIT_SPACING = 4.0  # a commit waits until this many times the last one's duration has passed
MAX_COMMIT_DELAY = 0.001  # but never longer
CHECKPOINT_BYTES = 16 * 1024 * 1024  # WAL size past which a checkpoint starts (on a thread)
CHECKPOINT_CHECK_EVERY = 16  # commits between looks at the WAL's size (a stat each)
# messages that say something is on disk: sent only after the commit. Not Finished: if the
# server dies before committing, the project is redone after the restart (the creator already
# has every result; it has released them, so the rerun's copy is pruned in time)
COMMIT_FIRST = (p.Accepted, p.More, p.Attached, p.ProjectList)


class ServerConnection(asyncio.Protocol):
    """The I/O shell around one :class:`protocol.Connection`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conn_id = f"c{next(server.connection_ids)}"
        self.proto = p.Connection("server", max_frame=server.max_frame)
        self.transport: asyncio.Transport | None = None
        self.nonce = secrets.token_bytes(32)
        self.device_id: str | None = None
        self.role: str | None = None
        self.identity: str | None = None  # the token's name, once authenticated
        self.token_role: str | None = None
        self.name = "?"
        self.last_received = time.monotonic()
        self.last_sent = self.last_received
        self.opened_at = self.last_received
        self.awaits_commit = False  # something queued may be sent only after the next commit

    # asyncio callbacks -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        self.server.connections[self.conn_id] = self
        self.send(
            p.Challenge(
                version=p.PROTOCOL_VERSION, nonce=self.nonce, max_frame=self.server.max_frame
            )
        )

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        messages = self.proto.receive_data(data)
        for message in messages:
            self.server.handle(self, message)
        if self.proto.error is not None:
            log.warning("closing %s (%s): %s", self.conn_id, self.name, self.proto.error)
        self.server.mark_dirty(self)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
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
            if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                log.warning("%s is not reading; closing it", self.conn_id)
                self.transport.abort()
                return
        if self.proto.state is p.State.CLOSED:
            self.transport.close()

    def close(self, code: str, message: str) -> None:
        self.send(p.Error(code=code, message=message))
        self.server.mark_dirty(self)


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
    ) -> None:
        """``state_dir=None`` keeps project state in memory only (the embedded default).
        ``identity=None`` serves plain TCP: only for loopback or an explicit ``--insecure``."""
        self.tokens = tokens
        self.identity = identity
        # what a client's proof is bound to: our certificate (nothing on plain TCP)
        self.channel = b"" if identity is None else channel_binding(identity.cert_der)
        self.state_dir = state_dir
        self.heartbeat = heartbeat
        self.max_frame = max_frame
        self.keep_finished = keep_finished
        self.scheduler = s.Scheduler()
        self.store = Store(state_dir)
        self._store_failing = False
        # accepted results and finished projects not committed yet (the disk may be failing):
        # Attach must see them too; every successful commit clears them
        self._unsaved_results: dict[str, dict[int, dict[str, Any]]] = {}
        self._unsaved_finished: dict[str, tuple[p.Finished, int, int]] = {}
        self._last_prune = float("-inf")
        self.owners: dict[str, str] = {}  # running project -> the identity that submitted it
        self.connections: dict[str, ServerConnection] = {}
        self.workers: dict[str, ServerConnection] = {}
        self.creators: dict[str, ServerConnection] = {}
        self.connection_ids = itertools.count(1)
        self._dirty: dict[str, ServerConnection] = {}
        self._flush_scheduled = False
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

    # lifecycle ---------------------------------------------------------------------------------

    async def start(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._restore()
        context = None if self.identity is None else server_context(self.identity)
        self._server = await loop.create_server(
            lambda: ServerConnection(self),
            host,
            port,
            ssl=context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if context is not None else None,
        )
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        self._timer = asyncio.create_task(self._run_timers())
        return self.address

    async def stop(self, reason: str = "server shutting down") -> None:
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
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.close()
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
            asyncio.get_running_loop().call_soon(self._flush)

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
        try:
            self.store.commit()
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
            self._unsaved_results.clear()
            self._unsaved_finished.clear()

    def _restore(self) -> None:
        """Take back the running projects of an earlier run from durable state."""
        now = time.monotonic()
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
            )
            self._run(actions)
            log.info(
                "resumed project %s (%s): %d tasks open", stored.project_id, stored.name, len(tasks)
            )
        self._commit()

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
            case p.Result():
                self._run(self.scheduler.task_result(conn.conn_id, message, now))
            case p.Reject():
                log.info("%s cannot run %s: %s", conn.name, message.project_id, message.reason)
                self._run(
                    self.scheduler.worker_rejects(
                        conn.conn_id, message.project_id, message.reason, now
                    )
                )
            case p.Submit():
                self._submit(conn, message, now)
            case p.Tasks():
                self._run(self.scheduler.add_tasks(conn.conn_id, message, now))
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
            case p.ListProjects():
                self._commit()
                projects = [
                    row
                    for row in self.store.projects()
                    if permissions.may_access_project(
                        conn.identity or "", conn.token_role or "", row["owner"]
                    )
                ]
                conn.send(p.ProjectList(ref=message.ref, projects=projects))
            case p.Cancel():
                if self._may_access(conn, message.project_id):
                    self._run(self.scheduler.cancel(conn.conn_id, message.project_id, now))
                else:
                    log.warning("%s: Cancel of a project it does not own", conn.conn_id)
            case p.Goodbye() | p.Error():
                log.info("%s (%s) closes: %s", conn.conn_id, conn.name, message)
            case _:
                pass  # Heartbeat: liveness was recorded above

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
            log.warning("%s: refused token %r", conn.conn_id, hello.identity)
            conn.close("auth_failed", "unknown, revoked or wrong token")
            return
        if not permissions.may_connect_as(record.role, hello.role):
            log.warning(
                "%s: token %r may not connect as %s", conn.conn_id, hello.identity, hello.role
            )
            conn.close("forbidden", permissions.refusal(record.role, hello.role))
            return
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
        log.info("%s joined as %s (%s, %d slots)", conn.name, hello.role, conn.conn_id, hello.slots)
        if hello.role == "worker":
            self.workers[conn.conn_id] = conn
            self._run(
                self.scheduler.add_worker(
                    conn.conn_id, device_id=device_id, name=conn.name, slots=hello.slots, now=now
                )
            )
        else:
            self.creators[conn.conn_id] = conn

    def _owner(self, project_id: str) -> str | None:
        owner = self.owners.get(project_id)
        if owner is None:
            stored = self.store.project(project_id)
            owner = None if stored is None else stored.owner
        return owner

    def _may_access(self, conn: ServerConnection, project_id: str) -> bool:
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
        if project_id in self.scheduler.projects or self.store.project(project_id) is not None:
            self._refuse(conn, project_id, "duplicate_id", f"project id {project_id} is in use")
            return
        try:
            actions = self.scheduler.submit(conn.conn_id, submit, now)
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
        owner = conn.identity or ""
        self.owners[project_id] = owner
        self.store.project_submitted(
            project_id, submit.name, conn.device_id or "", submit.code, spec, owner
        )
        log.info("project %s (%s) submitted by %s", project_id, submit.name, conn.name)
        self._run(actions)

    def _refuse(self, conn: ServerConnection, project_id: str, reason: str, text: str) -> None:
        """A Submit not taken: Accepted of credit 0, then Finished ``failed``; the tasks the
        creator sent behind the Submit are dropped as tasks of an unknown project."""
        conn.send(p.Accepted(project_id=project_id, credit=0))
        conn.send(
            p.Finished(
                project_id=project_id,
                status="failed",
                error={"reason": reason, "message": text},
                stop=None,
                stats={},
            )
        )

    def _attach(self, conn: ServerConnection, attach: p.Attach, now: float) -> None:
        """Re-attach a creator: the project's state, then every stored result, then Finished
        if it has ended. The creator drops seqs it already has."""
        self._commit()  # so that the replay below reads every result accepted so far
        project_id = attach.project_id
        actions = self.scheduler.attach(conn.conn_id, attach.ref, project_id, now)
        stored = self.store.project(project_id)
        if actions:
            self._run(actions)
            self._replay(conn, project_id, None)
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
        """Send a project's stored results, then ``last``, in this turn: nothing live (a new
        result, or Finished) can overtake them. The creator drops seqs it already has."""
        replayed = set()
        for message in self.store.results(project_id):
            damaged = message.pop("damaged", None)
            if damaged is not None:  # e.g. after a power loss: say so; the creator then
                log.error("%s", damaged)  # sees it is missing results, never wrong ones
                conn.send(p.Notice(project_id=project_id, level="warning", text=damaged))
                continue
            replayed.add(message["seq"])
            conn.send(p.TaskDone(project_id=project_id, **message))
        for seq, message in self._unsaved_results.get(project_id, {}).items():
            if seq not in replayed:
                conn.send(p.TaskDone(project_id=project_id, **message))
        if last is not None:
            conn.send(last)

    def lost(self, conn: ServerConnection) -> None:
        self.connections.pop(conn.conn_id, None)
        self._dirty.pop(conn.conn_id, None)
        self._after_commit.pop(conn.conn_id, None)
        now = time.monotonic()
        if self.workers.pop(conn.conn_id, None) is not None:
            log.info("worker %s left", conn.name)
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
                case s.AbandonTasks(worker_id, task_ids):
                    conn = self.workers.get(worker_id)
                    if conn is not None:
                        conn.send(p.Abandon(task_ids=task_ids))
                case s.StoreTasks(project_id, tasks):
                    self.store.tasks_added(project_id, tasks)
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
                        self.store.task_done(message.project_id, message.seq, record)
                        unsaved = self._unsaved_results.setdefault(message.project_id, {})
                        unsaved.setdefault(message.seq, record)
                    conn = self.creators.get(creator_id or "")
                    if conn is not None:
                        conn.send(message)
                    if isinstance(message, p.Finished):
                        self._finished(message)

    def _finished(self, message: p.Finished) -> None:
        log.info("project %s %s", message.project_id, message.status)
        project = self.scheduler.projects.get(message.project_id)
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

    # timers ------------------------------------------------------------------------------------

    async def _run_timers(self) -> None:
        """Lease expiry, heartbeats and silent-peer detection."""
        while True:
            now = time.monotonic()
            self._run(self.scheduler.tick(now))
            self._check_liveness(now)
            self._check_tokens()
            if now - self._last_prune > PRUNE_INTERVAL:
                self._last_prune = now
                self.store.prune(self.keep_finished)
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
                if now - conn.opened_at > HANDSHAKE_TIMEOUT:
                    conn.close("handshake_timeout", "no Hello in time")
                continue
            if now - conn.last_received > silence_limit:
                log.warning(
                    "%s (%s) silent for %.1f s; dropping it",
                    conn.conn_id,
                    conn.name,
                    now - conn.last_received,
                )
                if conn.transport is not None:
                    conn.transport.abort()
            elif now - conn.last_sent > self.heartbeat:
                conn.send(p.Heartbeat())
