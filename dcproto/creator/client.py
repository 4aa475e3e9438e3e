"""The creator's connection to a server, and the private event loop thread it lives on.

One :class:`CreatorClient` per server address per process carries all of that process's
projects. It runs on a background event loop (:func:`background_loop`) so that the blocking API
and the async API share one implementation.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from .. import protocol as p
from ..connection import Endpoint, backoff_delays, keep_alive, open_session
from ..errors import AuthenticationFailed, CertificateMismatch, ConnectionFailed, PermissionDenied

log = logging.getLogger("dcproto.client")

CONNECT_TIMEOUT = 10.0
T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()
_shutdown_hooks: list[Callable[[], Awaitable[None]]] = []


def background_loop() -> asyncio.AbstractEventLoop:
    """The process-wide private event loop, started on first use in a daemon thread."""
    global _loop
    with _loop_lock:
        if _loop is None:
            try:
                import uvloop  # type: ignore[import-not-found,unused-ignore]

                loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            except ImportError:
                loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="dcproto-loop", daemon=True)
            thread.start()
            _loop = loop
            atexit.register(_shutdown)
        return _loop


def on_shutdown(hook: Callable[[], Awaitable[None]]) -> None:
    """Run ``hook`` on the background loop when the process exits."""
    _shutdown_hooks.append(hook)


def _shutdown() -> None:
    loop = _loop
    if loop is None or not loop.is_running():
        return

    async def run_hooks() -> None:
        for hook in reversed(_shutdown_hooks):
            with contextlib.suppress(Exception):
                await hook()
        # then end whatever is left (a project's feeder, a re-attach): a task still pending
        # when the loop goes away is reported as "Task was destroyed but it is pending"
        current = asyncio.current_task()
        left = [task for task in asyncio.all_tasks() if task is not current]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=5)

    with contextlib.suppress(BaseException):
        asyncio.run_coroutine_threadsafe(run_hooks(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)


def call(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and wait for it from this (non-loop) thread."""
    future = asyncio.run_coroutine_threadsafe(coro, background_loop())
    try:
        return future.result(timeout)
    except BaseException:
        # timed out or interrupted: stop the coroutine too, or it would go on alone (holding
        # what it holds, a lock of get_client say) and perhaps act after the caller gave up
        future.cancel()
        raise


class ProjectListener(Protocol):
    def on_message(self, message: p.Message) -> None: ...

    def on_disconnect(self) -> None: ...

    async def on_reconnect(self) -> None: ...

    def on_lost(self, error: ConnectionFailed) -> None: ...


class CreatorClient:
    """A creator connection shared by a process's projects. When it drops, it reconnects with
    backoff for up to ``reconnect_timeout`` seconds and has each project re-attach."""

    def __init__(self, endpoint: Endpoint, *, reconnect_timeout: float = 300.0) -> None:
        self.endpoint = endpoint
        self.reconnect_timeout = reconnect_timeout
        self.proto = p.Connection("client", role="creator")
        self.device_id: str | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._refs = itertools.count(1)
        self._replies: dict[int, asyncio.Future[p.Message]] = {}
        self.listeners: dict[str, ProjectListener] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._last_sent = self._last_received = 0.0
        self._flush_scheduled = False
        self.heartbeat_interval = 5.0
        self.connected = asyncio.Event()
        self.closed = False  # for good: no reconnect
        self._closed_event = asyncio.Event()  # set with ``closed``: wakes wait_connected()

    async def connect(self) -> None:
        reader, writer, proto, welcome = await open_session(
            self.endpoint,
            role="creator",
            device_id=self.device_id,
            name=f"{socket.gethostname()}:{os.getpid()}",
            slots=0,
        )
        self._writer, self.proto = writer, proto
        self.device_id = welcome.device_id
        self.heartbeat_interval = welcome.heartbeat_interval
        self._last_sent = self._last_received = time.monotonic()
        self.connected.set()
        self._tasks = [
            asyncio.create_task(self._read_loop(reader)),
            asyncio.create_task(self._heartbeats()),
        ]

    async def _heartbeats(self) -> None:
        def heartbeat() -> None:
            with contextlib.suppress(ConnectionFailed):
                self.send(p.Heartbeat())

        def abort() -> None:
            if self._writer is not None:
                self._writer.transport.abort()  # the read loop then reconnects

        await keep_alive(
            self.heartbeat_interval,
            last_sent=lambda: self._last_sent,
            last_received=lambda: self._last_received,
            heartbeat=heartbeat,
            abort=abort,
        )

    def send(self, message: p.Message) -> None:
        """Queue ``message``; raises ConnectionFailed while disconnected. What is queued in
        one loop turn goes out in one write (a Submit with its first tasks, say)."""
        if not self.connected.is_set() or self.proto.state is not p.State.READY:
            raise ConnectionFailed("not connected to the server")
        self.proto.send(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        chunks = self.proto.chunks_to_send()
        if chunks and self._writer is not None and self.connected.is_set():
            self._writer.writelines(chunks)
            self._last_sent = time.monotonic()

    async def drain(self) -> None:
        self.flush()
        if self._writer is not None and self.connected.is_set():
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()

    async def request(self, message: p.Message, ref: int) -> p.Message:
        """Send a message carrying ``ref`` and wait for the reply with the same ref."""
        future: asyncio.Future[p.Message] = asyncio.get_running_loop().create_future()
        self._replies[ref] = future
        try:
            self.send(message)
            return await future
        finally:
            self._replies.pop(ref, None)

    def next_ref(self) -> int:
        return next(self._refs)

    async def attach(self, project_id: str, *, watch: bool = False) -> p.Attached:
        """``watch``: follow the project without taking it from its creator (see Attach)."""
        ref = self.next_ref()
        reply = await self.request(p.Attach(ref=ref, project_id=project_id, watch=watch), ref)
        assert isinstance(reply, p.Attached)
        return reply

    async def list_workers(self) -> list[dict[str, Any]]:
        ref = self.next_ref()
        reply = await self.request(p.ListWorkers(ref=ref), ref)
        assert isinstance(reply, p.WorkerList)
        return reply.workers

    async def list_projects(self) -> list[dict[str, Any]]:
        ref = self.next_ref()
        reply = await self.request(p.ListProjects(ref=ref), ref)
        assert isinstance(reply, p.ProjectList)
        return reply.projects

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        reason = "the server closed the connection"
        try:
            while True:
                data = await reader.read(2**20)
                if not data:
                    break
                self._last_received = time.monotonic()
                for message in self.proto.receive_data(data):
                    self._dispatch(message)
                if self.proto.state is p.State.CLOSED:
                    reason = f"the server ended the session ({self.proto.error or 'goodbye'})"
                    break
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason = f"connection to the server lost: {exc}"
        self._disconnected(reason)

    def _dispatch(self, message: p.Message) -> None:
        ref = getattr(message, "ref", None)
        if ref is not None:
            future = self._replies.get(ref)
            if future is not None and not future.done():
                future.set_result(message)
            return
        project_id = getattr(message, "project_id", None)
        if project_id is None:
            if isinstance(message, p.Goodbye | p.Error):
                log.info("server: %s", message)
            return
        listener = self.listeners.get(project_id)
        if listener is not None:
            listener.on_message(message)

    def _disconnected(self, reason: str) -> None:
        self.connected.clear()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self._writer is not None:
            self._writer.close()
        error = ConnectionFailed(reason)
        for future in self._replies.values():
            if not future.done():
                future.set_exception(error)
        if self.closed or not self.listeners or self.reconnect_timeout <= 0:
            self._give_up(error)
            return
        log.warning("%s; reconnecting", reason)
        for listener in list(self.listeners.values()):
            listener.on_disconnect()
        self._tasks = [asyncio.create_task(self._reconnect(reason))]

    async def _reconnect(self, reason: str) -> None:
        deadline = time.monotonic() + self.reconnect_timeout
        for delay in backoff_delays():
            if time.monotonic() + delay > deadline:
                break
            await asyncio.sleep(delay)
            try:
                await self.connect()
            except (AuthenticationFailed, CertificateMismatch) as exc:
                self._give_up(exc)
                return
            except PermissionDenied as exc:
                self._give_up(ConnectionFailed(str(exc)))
                return
            except ConnectionFailed as exc:
                reason = str(exc)
                continue
            log.info("reconnected to %s", self.endpoint.address)
            self._tasks += [
                asyncio.create_task(listener.on_reconnect())
                for listener in list(self.listeners.values())
            ]
            return
        self._give_up(
            ConnectionFailed(f"{reason} (no reconnect within {self.reconnect_timeout:.0f} s)")
        )

    def _give_up(self, error: ConnectionFailed) -> None:
        self.closed = True
        self._closed_event.set()
        for listener in list(self.listeners.values()):
            listener.on_lost(error)
        self.listeners.clear()

    async def wait_connected(self) -> bool:
        """Wait until the connection is up again (True) or the client gave up (False)."""
        if self.connected.is_set() or self.closed:
            return not self.closed
        waits = [
            asyncio.create_task(self.connected.wait()),
            asyncio.create_task(self._closed_event.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return not self.closed

    async def close(self) -> None:
        self.closed = True
        self._closed_event.set()
        self.flush()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._writer is not None:
            self._writer.close()


_clients: dict[Endpoint, CreatorClient] = {}
_client_locks: dict[Endpoint, asyncio.Lock] = {}


async def get_client(endpoint: Endpoint, *, reconnect_timeout: float = 300.0) -> CreatorClient:
    """The shared, connected client for that server (a new one if the last gave up)."""
    key = endpoint
    # one connection per server even when several projects start at once
    lock = _client_locks.setdefault(key, asyncio.Lock())
    async with lock:
        client = _clients.get(key)
        if client is not None and not client.closed and not client.connected.is_set():
            # reconnecting: wait until it is back or gives up (bounded by its timeout); once
            # it gave up, try afresh below: the error of that attempt, if any, is the caller's
            await client.wait_connected()
        if client is None or client.closed:
            client = CreatorClient(endpoint, reconnect_timeout=reconnect_timeout)
            await client.connect()
        if not _clients:
            on_shutdown(_close_clients)
        _clients[key] = client
    return client


def connected_client(endpoint: Endpoint) -> CreatorClient | None:
    """The shared client for that server if it is connected now, else None. Callable from
    any thread: it only reads (a client found here may still drop at once; its projects then
    re-attach or fail as on any disconnect)."""
    client = _clients.get(endpoint)
    if client is None or client.closed or not client.connected.is_set():
        return None
    return client


async def _close_clients() -> None:
    for client in list(_clients.values()):
        await client.close()
    _clients.clear()
