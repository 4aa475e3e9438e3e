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
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import protocol as p
from .errors import AuthenticationFailed, ConnectionFailed

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

                loop = uvloop.new_event_loop()
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

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(run_hooks(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)


def call(coro: Awaitable[T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and wait for it from this (non-loop) thread."""
    future = asyncio.run_coroutine_threadsafe(coro, background_loop())  # type: ignore[arg-type]
    return future.result(timeout)


class CreatorClient:
    """A creator connection: submits projects and routes server messages to their handlers."""

    def __init__(self, host: str, port: int, secret: str) -> None:
        self.host, self.port, self.secret = host, port, secret
        self.proto = p.Connection("client", role="creator")
        self.device_id: str | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._refs = itertools.count(1)
        self._accepts: dict[int, asyncio.Future[p.Accepted]] = {}
        self.handlers: dict[str, Callable[[p.Message], None]] = {}
        self._read_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._last_sent = 0.0
        self.heartbeat_interval = 5.0
        self.closed = False

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=2**20), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            raise ConnectionFailed(
                f"cannot reach the dcproto server at {self.host}:{self.port}: {exc}"
            ) from exc
        try:
            await asyncio.wait_for(self._handshake(), CONNECT_TIMEOUT)
        except BaseException:
            self._writer.close()
            raise
        self._read_task = asyncio.create_task(self._read_loop())
        self._heartbeat_task = asyncio.create_task(self._heartbeats())

    async def _heartbeats(self) -> None:
        """Keep the server from taking us for gone while projects run and we are quiet."""
        while not self.closed:
            await asyncio.sleep(self.heartbeat_interval / 2)
            if time.monotonic() - self._last_sent >= self.heartbeat_interval / 2:
                with contextlib.suppress(ConnectionFailed):
                    self.send(p.Heartbeat())

    async def _next(self) -> p.Message:
        assert self._reader is not None
        while True:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionFailed("the server closed the connection during the handshake")
            messages = self.proto.receive_data(data)
            if self.proto.error is not None:
                raise ConnectionFailed(f"protocol error: {self.proto.error}")
            if messages:
                return messages[0]

    async def _handshake(self) -> None:
        challenge = await self._next()
        if not isinstance(challenge, p.Challenge):
            raise ConnectionFailed(f"the server refused the connection: {challenge}")
        self.send(
            p.Hello(
                version=p.PROTOCOL_VERSION,
                role="creator",
                auth=p.auth_token(self.secret, challenge.nonce),
                device_id=None,
                name=f"{socket.gethostname()}:{os.getpid()}",
                slots=0,
            )
        )
        answer = await self._next()
        if isinstance(answer, p.Error):
            if answer.code == "auth_failed":
                raise AuthenticationFailed(
                    f"the server at {self.host}:{self.port} refused the secret"
                )
            raise ConnectionFailed(f"the server refused: {answer.code}: {answer.message}")
        if not isinstance(answer, p.Welcome):
            raise ConnectionFailed(f"unexpected handshake answer {answer}")
        self.device_id = answer.device_id
        self.heartbeat_interval = answer.heartbeat_interval

    def send(self, message: p.Message) -> None:
        if self.closed or self.proto.state is p.State.CLOSED:
            raise ConnectionFailed("the connection to the server is closed")
        self.proto.send(message)
        data = self.proto.data_to_send()
        if data and self._writer is not None:
            self._writer.write(data)
            self._last_sent = time.monotonic()

    async def drain(self) -> None:
        if self._writer is not None:
            await self._writer.drain()

    async def submit(self, submit_fields: dict[str, Any]) -> p.Accepted:
        ref = next(self._refs)
        future: asyncio.Future[p.Accepted] = asyncio.get_running_loop().create_future()
        self._accepts[ref] = future
        self.send(p.Submit(ref=ref, **submit_fields))
        return await future

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reason = "the server closed the connection"
        try:
            while True:
                data = await self._reader.read(2**20)
                if not data:
                    break
                for message in self.proto.receive_data(data):
                    self._dispatch(message)
                if self.proto.state is p.State.CLOSED:
                    reason = f"the server ended the session ({self.proto.error or 'goodbye'})"
                    break
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason = f"connection to the server lost: {exc}"
        finally:
            self._lost(reason)

    def _dispatch(self, message: p.Message) -> None:
        if isinstance(message, p.Accepted):
            future = self._accepts.pop(message.ref, None)
            if future is not None and not future.done():
                future.set_result(message)
            return
        project_id = getattr(message, "project_id", None)
        if project_id is None:
            if isinstance(message, p.Goodbye | p.Error):
                log.warning("server: %s", message)
            return
        handler = self.handlers.get(project_id)
        if handler is not None:
            handler(message)

    def _lost(self, reason: str) -> None:
        self.closed = True
        error = ConnectionFailed(reason)
        for future in self._accepts.values():
            if not future.done():
                future.set_exception(error)
        self._accepts.clear()
        for handler in list(self.handlers.values()):
            handler(p.Goodbye(reason=reason))
        if self._writer is not None:
            self._writer.close()

    async def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(BaseException):
                await self._read_task
        self.closed = True
        if self._writer is not None:
            self._writer.close()


_clients: dict[tuple[str, int, str], CreatorClient] = {}


async def get_client(host: str, port: int, secret: str) -> CreatorClient:
    """The shared, connected client for that server (reconnecting if the last one closed)."""
    key = (host, port, secret)
    client = _clients.get(key)
    if client is None or client.closed:
        client = CreatorClient(host, port, secret)
        await client.connect()
        if not _clients:
            on_shutdown(_close_clients)
        _clients[key] = client
    return client


async def _close_clients() -> None:
    for client in list(_clients.values()):
        await client.close()
    _clients.clear()
