"""A project's life on the creator's background loop: feed tasks, take results, finish.

Tasks are sliced from the iterator only while the server grants credit, and kept until the
server says they are stored (``More.stored``), so a reconnect can resend exactly the ones it
lost. Every task sent that the server has not stored takes a unit of credit, a resend too: the
server closes a creator that sends more new tasks than its credit (see
``scheduler.CreditExceeded``), so resends wait for credit like new tasks. Results are
de-duplicated by task seq, so a replay after re-attaching counts nothing twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import itertools
import logging
import math
import pickle
import time
import uuid
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import cloudpickle

from .. import protocol as p
from ..connection import Endpoint
from ..errors import (
    ConnectionFailed,
    DcprotoError,
    LocalProtocolError,
    PermissionDenied,
    ProjectCancelled,
    ProjectError,
    ProjectUnrunnable,
    SerializationError,
    TaskFailed,
    UnhashableItemError,
)
from ..pickling import PLAIN_TYPES
from ..trust.files import check_files
from ..trust.safe import loads_from_worker, trusted_loads
from .client import CreatorClient, background_loop, connected_client, get_client
from .shipping import shipped_by_value
from .stream import ResultStream

if TYPE_CHECKING:
    from .creator import ProjectHandle

log = logging.getLogger("dcproto")
# user name -> the address this process resolved it to last: lets a Project() whose
# connection is up start without reading the users file (see ProjectRun.start_nowait)
_user_endpoints: dict[str, Endpoint] = {}
NOWAIT_MAX_CODE = 64 * 1024  # a larger class is submitted the waiting way

MAX_TASKS_PER_FRAME = 256
MAX_ERRORS_PER_TASK = 5  # error reports a task may add to project.errors
MAX_FRAME_PAYLOAD = 8 * 1024 * 1024  # a Tasks frame is cut once its items reach this size
FRAME_OVERHEAD = 4096  # room for the rest of a Tasks frame around its items


class FeedPaused(Exception):
    """Raised by a project's iterator (its ``__next__``, called on the background loop) when
    no item is ready yet but more may follow: the feeder sends what it has, awaits ``waiter``
    and asks again, instead of taking the pause for the end. ``dcproto.Executor`` feeds its
    project this way, with ``task_size=1`` (a larger task would lose the items of a chunk cut
    short by the pause)."""

    def __init__(self, waiter: Awaitable[object]) -> None:
        super().__init__("no item ready yet")
        self.waiter = waiter


class SeqSet:
    """A set of task seqs (0, 1, 2, ...) as a bitmap: one bit per task."""

    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, seq: int) -> bool:
        """Add ``seq``; False if it was already there."""
        index, bit = divmod(seq, 8)
        if index >= len(self._bits):
            self._bits.extend(bytes(index + 1 - len(self._bits)))
        if self._bits[index] & (1 << bit):
            return False
        self._bits[index] |= 1 << bit
        return True

    def __contains__(self, seq: int) -> bool:
        index, bit = divmod(seq, 8)
        return index < len(self._bits) and bool(self._bits[index] & (1 << bit))


class ProjectRun:
    """Implements the client's ProjectListener for one project."""

    def __init__(self, handle: ProjectHandle, code: bytes) -> None:
        self.handle = handle
        self.spec = handle._spec
        self.trusted = self.spec.options.get("trust_workers") is True
        self.code = code
        self.client: CreatorClient | None = None
        self.project_id: str | None = None
        self.status = "submitting"
        self.results: dict[Any, Any] = {}
        self.seen = SeqSet()
        self.tasks_done = self.items_done = self.items_kept = 0
        self.run_time_total = self.exec_time_total = self.round_trip_total = 0.0
        self.total_tasks: int | None = None
        self.total_items: int | None = None
        self.credit = 0
        self._credit_event = asyncio.Event()
        self._unstored: collections.deque[list[Any]] = collections.deque()
        # unstored tasks lost in a disconnect, to send again (as credit allows) before any new
        # one; and whether End must follow them
        self._resend: collections.deque[list[Any]] = collections.deque()
        self._end_unsent = False
        self._feeder: asyncio.Task[None] | None = None
        self._next_seq = 0
        self._skip_items = 0  # items already on the server when resuming from another process
        self.submitted_at = time.time()
        self.accepted = False  # the server has stored the Submit
        self.attached_status: str | None = None  # the project's status when attached to
        self.finished = False
        # for the progress bar: worker name -> when its latest result came (monotonic), and
        # attempts beyond the first of the tasks done (crashes, timeouts, re-issues)
        self.worker_seen: dict[str, float] = {}
        self.retried = 0
        self._streams: list[ResultStream] = []  # as_completed() / async for, being iterated
        self._stream_tail: list[tuple[Any, Any]] = []  # a stopped project's stopping value

    # ---- starting --------------------------------------------------------------------------

    async def _connect(self) -> None:
        spec = self.spec
        if spec.endpoint is not None:
            self.client = await get_client(spec.endpoint, reconnect_timeout=spec.reconnect_timeout)
        elif spec.user_name is None:
            from .local import local_cluster

            cluster = await local_cluster(spec.local_workers)
            self.client = await get_client(cluster.endpoint, reconnect_timeout=0)
        else:
            from ..users import get_user

            endpoint = get_user(spec.user_name).endpoint()
            self.client = await get_client(endpoint, reconnect_timeout=spec.reconnect_timeout)
            _user_endpoints[spec.user_name] = endpoint

    def _known_client(self) -> CreatorClient | None:
        """The connected client this project would use, found without I/O: None if there is
        none yet, or finding it needs the users file or a local cluster's start."""
        spec = self.spec
        if spec.endpoint is not None:
            endpoint: Endpoint | None = spec.endpoint
        elif spec.user_name is None:
            from . import local

            cluster = local._cluster
            endpoint = cluster.endpoint if cluster is not None else None
        else:  # as this process resolved the user last (a user changed since: next process)
            endpoint = _user_endpoints.get(spec.user_name)
        return connected_client(endpoint) if endpoint is not None else None

    def start_nowait(self) -> bool:
        """From the caller's thread: when this process's connection to the project's server
        is up, start the project on the client loop without waiting for it, and return True
        (``project_id`` is set at once; an error from here on fails the project's results).
        False if the connection is not up: then :meth:`start` must run and be waited for."""
        client = self._known_client()
        if client is None or len(self.code) > NOWAIT_MAX_CODE:
            return False  # a large class: checked against the frame limit on the loop
        project_id = uuid.uuid4().hex
        submit = self._submit_message(project_id)
        # a Submit the server would refuse fails here, in Project(), as on the waiting path
        if len(p.encode(submit)) - p.HEADER.size > client.proto.max_frame:
            return False  # the waiting path says why
        self.client = client
        self.handle.project_id = project_id
        background_loop().call_soon_threadsafe(self._start_now, submit)
        return True

    def _start_now(self, submit: p.Submit) -> None:
        try:
            self._launch(submit)
        except DcprotoError as exc:
            self._finish(error=exc)
        except Exception as exc:  # never lost on the loop: the caller's results() tells it
            self._finish(error=_chained(DcprotoError(f"the project could not start: {exc}"), exc))

    async def start(self) -> None:
        """Submit the project and start feeding its tasks at once: the id is ours, and the
        first ``INITIAL_CREDIT`` tasks may follow the Submit before the server answers."""
        await self._connect()
        self._launch(self._submit_message(uuid.uuid4().hex))

    def _launch(self, submit: p.Submit) -> None:
        assert self.client is not None
        self._begin(submit.project_id)
        try:
            self.credit = p.INITIAL_CREDIT
            # the feeder's first step runs before the client's flush: Submit and the first
            # tasks leave in one write
            self._feeder = asyncio.create_task(self._feed())
            self.client.send(submit)
        except BaseException:
            if self._feeder is not None:
                self._feeder.cancel()
            self._forget_listener()
            raise
        if self.handle._writer is not None:  # after that write: the files wait, not the tasks
            asyncio.get_running_loop().call_soon(self._writer_started, submit.project_id)

    def _writer_started(self, project_id: str) -> None:
        writer = self.handle._writer
        if writer is None or self.finished:
            return
        try:
            writer.started(project_id)
        except DcprotoError as exc:
            self._fail_locally(exc)

    def _submit_message(self, project_id: str) -> p.Submit:
        spec = self.spec
        options = dict(spec.options)
        if spec.user_name is None:
            options["fail_when_unrunnable"] = True
        return p.Submit(
            project_id=project_id,
            name=self.handle.name,
            code=self.code,
            modules=list(spec.modules),
            parallel=spec.parallel_func,
            stop=spec.stop_func,
            only_if=spec.only_if_func,
            options=options,
        )

    async def start_attached(self, project_id: str) -> None:
        """Re-attach to a project from a new process; resume feeding if it still needs it.

        By id alone (no project class, so no iterator), a project whose creator had not sent
        all its items is refused before attaching: nothing here could send the rest, and an
        Attach would take the project from its creator (if it still runs) for nothing."""
        await self._connect()
        assert self.client is not None
        if self.spec.by_id:
            await self._check_fed(project_id)
        self._begin(project_id)
        # by id, there is nothing to feed: follow the project, leave it to its creator
        attached = await self.client.attach(project_id, watch=self.spec.by_id)
        self.attached_status = attached.status
        if attached.status == "unknown":
            self._forget_listener()
            raise ProjectError(f"the server knows no project {project_id}")
        if attached.status == "forbidden":
            self._forget_listener()
            raise PermissionDenied(
                f"project {project_id} is not one of yours (or does not exist): only its owner "
                "or an admin may attach to it, fetch, cancel or release it"
            )
        if attached.status == "released":
            self._forget_listener()
            raise ProjectError(f"project {project_id}'s results were already fetched and released")
        self.accepted = True
        if self.handle._writer is not None:
            self.handle._writer.started(project_id)
        if attached.ended:  # every task is on the server: these are the project's totals
            self.total_tasks = attached.stored
            self.total_items = attached.items_stored
        if attached.status == "running" and not attached.ended and self.spec.by_id:
            if not self.spec.allow_unfed:  # End came after the check above: rare, but refuse
                self._forget_listener()
                raise self._unfed_error(project_id, attached.stored, attached.items_stored)
            return  # to cancel it: never feed, and above all never send End
        if attached.status == "running" and not attached.ended:
            self._next_seq = attached.stored
            self._skip_items = attached.items_stored
            self.credit = attached.credit
            self._feeder = asyncio.create_task(self._feed())

    async def _check_fed(self, project_id: str) -> None:
        """Raise ProjectError if ``project_id`` runs without all its items on the server."""
        assert self.client is not None
        rows = await self.client.list_projects()
        row = next((r for r in rows if r.get("project_id") == project_id), None)
        if row is None:
            return  # unknown, or not ours: Attach says which
        if isinstance(row.get("name"), str):
            self.handle.name = row["name"]
        if type(row.get("submitted_at")) in (int, float):
            self.submitted_at = row["submitted_at"]  # for stats.json: not when we attached
        unfed = row.get("status") == "running" and row.get("total_tasks") is None
        if unfed and not self.spec.allow_unfed:
            raise self._unfed_error(project_id, row.get("tasks_received"), None)

    def _unfed_error(self, project_id: str, tasks: Any, items: Any) -> ProjectError:
        stored = f"{tasks} tasks" + (f" ({items} items)" if items is not None else "")
        user = self.spec.user_name
        server = f"user_name={user!r}" if user is not None else "user_name=..."
        return ProjectError(
            f"project {project_id} ({self.handle.name}) is not complete on the server: its "
            f"creator stopped before sending all its items ({stored} stored so far, and no "
            "end), so it cannot finish from here, and was left as it is. Re-attach from the "
            f"creator's code, with its iterator: {self.handle.name}.attach({project_id!r}, "
            f"{server}) sends the rest and waits for the results"
        )

    def detach(self) -> None:
        """Stop listening to the project (whatever the server still sends for it is dropped)."""
        self._forget_listener()

    def _begin(self, project_id: str) -> None:
        assert self.client is not None
        self.project_id = self.handle.project_id = project_id
        self.client.listeners[project_id] = self
        self.status = "running"

    def _forget_listener(self) -> None:
        if self.client is not None and self.project_id is not None:
            self.client.listeners.pop(self.project_id, None)

    # ---- feeding tasks -----------------------------------------------------------------------

    async def _feed(self) -> None:
        try:
            # ProjectHandle.__init__ replaced a callable iterator with the iterable it made
            iterable = cast("Iterable[Any]", self.spec.iterator)
            chunks = task_chunks(iterable, self._skip_items, self.spec.task_size)
        except Exception as exc:
            error = DcprotoError(f"the iterator cannot be iterated: {exc!r}")
            self._fail_locally(_chained(error, exc))
            return
        seq = itertools.count(self._next_seq)
        total_items = self._skip_items
        assert self.client is not None
        limit = self.client.proto.max_frame - FRAME_OVERHEAD
        pending: list[Any] | None = None  # a task that did not fit in the last frame
        while not self.finished:
            while (self.credit <= 0 or self._resend) and not self.finished:
                self._credit_event.clear()  # resends go first: _send_resends wakes us after
                await self._credit_event.wait()
            if self.finished:
                return
            batch: list[list[Any]] = []
            batch_bytes = 0
            exhausted = False
            paused: Awaitable[object] | None = None
            try:
                while (
                    len(batch) < min(self.credit, MAX_TASKS_PER_FRAME)
                    and batch_bytes < MAX_FRAME_PAYLOAD
                ):
                    if pending is not None:
                        entry, pending = pending, None
                    else:
                        try:
                            items = next(chunks, None)
                        except FeedPaused as pause:
                            paused = pause.waiter
                            break
                        if items is None:
                            exhausted = True
                            break
                        with shipped_by_value(self.handle.user_class, self.spec.modules):
                            blob = pickle_items(items)
                        if len(blob) > limit:
                            raise SerializationError(
                                f"a task of {len(items)} item(s) pickles to {len(blob)} bytes, "
                                f"more than one frame carries ({limit}); use smaller items "
                                "or a smaller task_size"
                            )
                        entry = [next(seq), blob, len(items)]
                        total_items += len(items)
                    if batch and batch_bytes + len(entry[1]) > limit:
                        pending = entry  # it opens the next frame
                        break
                    batch.append(entry)
                    batch_bytes += len(entry[1])
            except DcprotoError as exc:
                self._fail_locally(exc)
                return
            except Exception as exc:
                # chained: the traceback then shows the iterator's own frame, where it raised
                self._fail_locally(_chained(DcprotoError(f"the iterator raised {exc!r}"), exc))
                return
            self.credit -= len(batch)
            self._unstored.extend(batch)
            if exhausted:
                self.total_tasks = batch[-1][0] + 1 if batch else next(seq)
                self.total_items = total_items
            try:
                self._send_tasks(batch)
            except LocalProtocolError as exc:  # a frame we must not send: fail, never hang
                self._fail_locally(SerializationError(f"tasks cannot be sent: {exc}"))
                return
            if exhausted:
                return
            assert self.client is not None
            await self.client.drain()
            if paused is not None:
                await paused  # whoever paused the iterator wakes it (and on finishing)
            await asyncio.sleep(0)

    def _send_tasks(self, batch: list[list[Any]], *, end: bool | None = None) -> None:
        """Send ``batch`` (and End once the iterator is exhausted, unless ``end`` says
        otherwise). While disconnected nothing is lost: unstored tasks and End are sent again
        on re-attach."""
        assert self.client is not None and self.project_id is not None
        if end is None:
            end = self.total_tasks is not None
        with contextlib.suppress(ConnectionFailed):
            if batch:
                self.client.send(p.Tasks(project_id=self.project_id, tasks=batch))
            if end and self.total_tasks is not None:
                self.client.send(
                    p.End(
                        project_id=self.project_id,
                        total_tasks=self.total_tasks,
                        total_items=self.total_items or 0,
                    )
                )

    def _stored(self, stored: int) -> None:
        while self._unstored and self._unstored[0][0] < stored:
            self._unstored.popleft()
        while self._resend and self._resend[0][0] < stored:
            self._resend.popleft()

    def _send_resends(self) -> None:
        """Send again, within credit and frame limits, the tasks lost in a disconnect; then
        End if it was lost too, and let the feeder go on."""
        if self.finished or self.client is None:
            return
        limit = self.client.proto.max_frame - FRAME_OVERHEAD
        while self._resend and self.credit > 0:
            batch: list[list[Any]] = []
            size = 0
            while self._resend and len(batch) < min(self.credit, MAX_TASKS_PER_FRAME):
                if batch and size + len(self._resend[0][1]) > limit:
                    break
                batch.append(self._resend.popleft())
                size += len(batch[-1][1])
            self.credit -= len(batch)
            try:
                self._send_tasks(batch, end=False)
            except LocalProtocolError as exc:  # each went out once: should not happen
                self._fail_locally(SerializationError(f"tasks cannot be sent: {exc}"))
                return
        if self._resend:
            return  # the rest waits for More
        if self._end_unsent:
            self._end_unsent = False
            self._send_tasks([], end=True)
        self._credit_event.set()

    def _fail_locally(self, error: DcprotoError) -> None:
        """The creator side failed (iterator, pickling): cancel on the server, then fail."""
        self.cancel()
        self._finish(error=error)

    def cancel(self) -> None:
        if self.finished or self.client is None or self.project_id is None:
            return
        with contextlib.suppress(DcprotoError):
            self.client.send(p.Cancel(project_id=self.project_id))

    # ---- the client's listener interface -----------------------------------------------------

    def on_disconnect(self) -> None:
        self.credit = 0

    async def on_reconnect(self) -> None:
        assert self.client is not None and self.project_id is not None
        try:
            attached = await self.client.attach(self.project_id, watch=self.spec.by_id)
        except ConnectionFailed:
            return  # disconnected again; the next reconnect tries again
        if attached.status in ("unknown", "forbidden") and not self.accepted:
            # the Submit never made it to the server's disk: submit again, with every task
            # sent so far (none can have been stored without the Submit)
            log.info(
                "project %s was not stored before the reconnect; submitting again", self.handle.name
            )
            self.client.send(self._submit_message(self.project_id))
            self.credit = p.INITIAL_CREDIT
            self._resend = collections.deque(self._unstored)
            self._end_unsent = self.total_tasks is not None
            self._send_resends()
            return
        if attached.status in ("unknown", "released", "forbidden"):
            self._finish(
                error=ProjectError(f"the server lost project {self.project_id} ({attached.status})")
            )
            return
        if attached.status != "running":
            return  # the replay and Finished follow
        self._stored(attached.stored)
        # +=: credit was 0 since the disconnect, and a More may have come right behind
        # Attached, before this coroutine resumed
        self.credit += attached.credit
        if attached.ended:
            return
        log.info(
            "project %s re-attached; resending %d tasks", self.handle.name, len(self._unstored)
        )
        self._resend = collections.deque(self._unstored)
        self._end_unsent = self.total_tasks is not None
        self._send_resends()

    def on_lost(self, error: ConnectionFailed) -> None:
        self._finish(error=error)

    def on_message(self, message: p.Message) -> None:
        if self.finished:
            return
        try:
            self._on_message(message)
        except DcprotoError as exc:
            self._fail_locally(exc)
        except Exception as exc:  # a malformed message fails this project, nothing else
            log.warning("project %s: %r", self.handle.name, exc)
            self._fail_locally(SerializationError(f"a malformed message from the server: {exc}"))

    def _on_message(self, message: p.Message) -> None:
        match message:
            case p.Accepted():
                self.accepted = True
                self.credit += message.credit
                self._send_resends()
                self._credit_event.set()
            case p.More():
                self._stored(message.stored)
                self.credit += message.credit
                self._send_resends()
                self._credit_event.set()
            case p.TaskDone():
                self._task_done(message)
            case p.Notice():
                level = logging.WARNING if message.level == "warning" else logging.INFO
                log.log(level, "project %s: %s", self.handle.name, message.text)
                self.handle.notices.append(message.text)
            case p.Finished():
                self._finished(message)

    def _task_done(self, message: p.TaskDone) -> None:
        if not self.seen.add(message.seq):
            return  # replayed after a re-attach: already counted
        what = f"the result of task {message.seq}"
        try:
            values = self._decode(message.items, message.payload, what)
            files = check_files(message.files)
        except (DcprotoError, ValueError) as exc:
            raise SerializationError(f"{what} was refused: {exc}") from exc
        self.results.update(values)
        stats = message.stats
        self._arrived(values, stats)
        self.tasks_done += 1
        self.items_done += message.n_items
        self.items_kept += len(values)
        self.run_time_total += _seconds(stats.get("run"))
        self.exec_time_total += _seconds(stats.get("exec"))
        self.round_trip_total += _seconds(stats.get("round_trip"))
        errors = stats.get("errors")
        if isinstance(errors, list):
            self.handle.errors.extend(
                e for e in errors[:MAX_ERRORS_PER_TASK] if isinstance(e, dict)
            )
        writer = self.handle._writer
        if writer is not None:
            writer.task_done(message.seq, stats, files)

    def _arrived(self, values: dict[Any, Any], stats: dict[str, Any]) -> None:
        """A task's results came: hand them to the streams; note who answered, for the bar."""
        for stream in self._streams:
            stream.push(values.items())
        worker, attempt = stats.get("worker"), stats.get("attempt")
        if isinstance(worker, str):
            self.worker_seen[worker] = time.monotonic()
        if type(attempt) is int and attempt > 1:
            self.retried += attempt - 1

    # ---- streams: on the background loop -----------------------------------------------------

    def subscribe(self, stream: ResultStream) -> None:
        """Start ``stream`` with every result so far; it gets the rest as they come."""
        stream.push(self.results.items())
        if self.finished:
            stream.push(self._stream_tail)
            stream.close()
        else:
            self._streams.append(stream)

    def unsubscribe(self, stream: ResultStream) -> None:
        with contextlib.suppress(ValueError):
            self._streams.remove(stream)

    def _decode(self, items_blob: bytes, payload: bytes, what: str) -> dict[Any, Any]:
        """A worker's ``{index: value}`` as ``{item: value}``. The items are our own bytes,
        relayed by the server; the values are the worker's, decoded safely unless the project
        trusts its workers. Raises DcprotoError or ValueError for anything malformed."""
        return self._decode_indexed(items_blob, payload, what)[0]

    def _decode_indexed(
        self, items_blob: bytes, payload: bytes, what: str
    ) -> tuple[dict[Any, Any], Sequence[int]]:
        """:meth:`_decode`, and the indexes in the task of the items it holds."""
        items = trusted_loads(items_blob, what=f"the items of {what}")
        if not isinstance(items, Sequence):
            raise ValueError("the task's items are not a sequence")
        values = loads_from_worker(payload, trusted=self.trusted, what=what)
        if type(values) is list:  # every item kept: one value per item, in order
            if len(values) != len(items):
                raise ValueError(
                    f"the payload holds {len(values)} values for a task of {len(items)} items"
                )
            return dict(zip(items, values, strict=True)), range(len(items))
        if not isinstance(values, dict):
            raise ValueError(f"the payload is a {type(values).__name__}, not a dict or a list")
        indexes = list(values)
        if (  # every index an int in the task: checked and mapped at C speed
            indexes
            and set(map(type, indexes)) == {int}
            and min(indexes) >= 0
            and max(indexes) < len(items)
        ):
            kept = map(items.__getitem__, indexes)
            return dict(zip(kept, values.values(), strict=True)), indexes
        results: dict[Any, Any] = {}
        for index, value in values.items():
            if type(index) is not int or not 0 <= index < len(items):
                raise ValueError(f"the payload names item {index!r:.50}, not in the task")
            results[items[index]] = value
        return results, indexes

    def _finished(self, message: p.Finished) -> None:
        stats = dict(message.stats)
        self.handle.stats = stats
        if message.status == "done":
            if self.tasks_done < stats.get("tasks_done", 0):
                self._finish(
                    error=ProjectError(
                        f"project {self.handle.name} is done on the server, but only "
                        f"{self.tasks_done} of its {stats['tasks_done']} task results "
                        "reached this process"
                    ),
                    stats=stats,
                )
                return
            self._finish(result=self.results, stats=stats)
        elif message.status == "stopped":
            assert message.stop is not None
            seq, items_blob, payload = message.stop
            stopped, indexes = self._decode_indexed(
                items_blob, payload, f"the stopping result (task {seq})"
            )
            if len(stopped) != 1:
                raise ValueError(f"the stopping result holds {len(stopped)} values, not 1")
            if type(seq) is int and seq >= 0 and seq not in self.seen:
                # the stopping task comes in Finished, never as a TaskDone, yet the server
                # counts it done (in tasks_done and per_worker): count it too, with the items
                # its worker ran (up to the stopping one)
                self.tasks_done += 1
                self.items_done += indexes[0] + 1
            # what the results hold: the values kept before the stop are dropped with it
            self.items_kept = len(stopped)
            self._finish(result=stopped, stats=stats, status="stopped")
        elif message.status == "cancelled":
            self._finish(error=ProjectCancelled(f"project {self.handle.name} was cancelled"))
        else:
            error = message.error or {}
            reason = error.get("reason", "failed")
            text = error.get("message", "the project failed")
            if reason == "unrunnable":
                self._finish(error=ProjectUnrunnable(text), stats=stats)
            else:
                self._finish(
                    error=TaskFailed(
                        f"project {self.handle.name} failed: {text}",
                        reason=reason,
                        attempts=error.get("attempts", 1),
                        item=error.get("item"),
                        remote_traceback=error.get("traceback"),
                        details=error,
                    ),
                    stats=stats,
                )

    def _finish(
        self,
        *,
        result: dict[Any, Any] | None = None,
        error: BaseException | None = None,
        stats: dict[str, Any] | None = None,
        status: str | None = None,
    ) -> None:
        if self.finished:
            return
        self.finished = True
        self._credit_event.set()
        if status is not None:
            self.status = status
        elif error is not None:
            self.status = "cancelled" if isinstance(error, ProjectCancelled) else "failed"
        else:
            self.status = "done"
        self._forget_listener()
        writer = self.handle._writer
        if writer is not None:
            try:
                writer.finish(
                    results=result,
                    status=self.status,
                    error=error,
                    stats=self._stats(stats or {}),
                    errors=self.handle.errors,
                )
            except DcprotoError as exc:
                error = error or exc
        if (
            stats is not None
            and self.spec.release
            and self.client is not None
            and self.project_id is not None
        ):
            # the results are ours now (and on disk, with a results_path): the server may
            # drop its copy
            with contextlib.suppress(DcprotoError):
                self.client.send(p.Release(project_id=self.project_id))
                self.client.flush()  # now: the server's work on it overlaps the caller's
        future = self.handle._future
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result if result is not None else {})
        if self.status == "stopped" and result:  # the stopping value came with Finished
            self._stream_tail = [(k, v) for k, v in result.items() if k not in self.results]
        for stream in self._streams:  # after the future: a stream's end reads the outcome
            stream.push(self._stream_tail)
            stream.close()
        self._streams.clear()

    def _stats(self, server: dict[str, Any]) -> dict[str, Any]:
        finished_at = time.time()
        wall = finished_at - self.submitted_at
        first_started_at = None
        if server.get("first_started_at") is not None and server.get("submitted_at") is not None:
            # the server's clock is monotonic; carry its delay over to our wall clock
            first_started_at = self.submitted_at + (
                server["first_started_at"] - server["submitted_at"]
            )
        return {
            "project_id": self.project_id,
            "name": self.handle.name,
            "status": self.status,
            # times: seconds since the epoch, and the same as ISO 8601 in UTC
            "submitted_at": self.submitted_at,
            "submitted_at_utc": _utc(self.submitted_at),
            "first_started_at": first_started_at,
            "first_started_at_utc": _utc(first_started_at),
            "finished_at": finished_at,
            "finished_at_utc": _utc(finished_at),
            "wall_time": wall,
            "total_tasks": self.total_tasks,
            "total_items": self.total_items,
            "tasks_done": self.tasks_done,
            "items_done": self.items_done,
            "items_kept": self.items_kept,
            "tasks_reissued": server.get("tasks_reissued", 0),
            "duplicates_dropped": server.get("duplicates_dropped", 0),
            "per_worker_tasks": server.get("per_worker", {}),
            "items_per_second": self.items_done / wall if wall > 0 else None,
            "run_time_total": self.run_time_total,
            "exec_time_total": self.exec_time_total,
            "round_trip_total": self.round_trip_total,
        }


def task_chunks(source: Iterable[Any], skip: int, size: int) -> Iterator[Sequence[Any]]:
    """The items of ``source`` after the first ``skip``, ``size`` at a time. A range is cut
    into sub-ranges: no list is built, and a sub-range pickles in a few bytes whatever its
    length. Raises at once if ``source`` cannot be iterated."""
    if type(source) is range:
        return _range_chunks(source[skip:], size)
    iterator = iter(source)
    if skip:
        collections.deque(itertools.islice(iterator, skip), maxlen=0)
    return iter(lambda: list(itertools.islice(iterator, size)), [])


def _range_chunks(items: range, size: int) -> Iterator[range]:
    # by slicing, not len(): a range may be longer than len() can count (range(10**20))
    while chunk := items[:size]:
        yield chunk
        items = items[size:]


def pickle_items(items: Sequence[Any]) -> bytes:
    if type(items) is range:
        return pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
    if PLAIN_TYPES.issuperset(map(type, items)):
        # all hashable; and the C pickler is several times faster, and plain values pickle
        # the same either way
        return pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
    for item in items:
        try:
            hash(item)
        except TypeError:
            raise UnhashableItemError(
                f"item {item!r:.200} is not hashable, so it cannot be a key of the results; "
                "yield tuples or frozensets instead of lists or sets"
            ) from None
    try:
        return cast("bytes", cloudpickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as exc:
        raise SerializationError(f"an item cannot be pickled: {exc}") from exc


def _utc(when: float | None) -> str | None:
    """``when`` (seconds since the epoch) in ISO 8601, UTC: ``2024-05-01T12:00:00.123456Z``."""
    if when is None:
        return None
    text = datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def _chained(error: DcprotoError, cause: BaseException) -> DcprotoError:
    """``error`` as if raised ``from cause``: its traceback then shows where ``cause`` was
    raised (in the user's iterator, say), though it is raised later, from ``results()``."""
    error.__cause__ = cause
    return error


def _seconds(value: Any) -> float:
    """A time from a worker's stats; anything but a finite, non-negative number counts 0."""
    if type(value) in (int, float) and math.isfinite(value) and value >= 0:
        return float(value)
    return 0.0
