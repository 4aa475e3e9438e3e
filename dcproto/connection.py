"""What every client shares: connecting with the handshake, keep-alive, reconnect backoff.

The worker and the creator both build on these; none of it decides anything about projects.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterator

from . import protocol as p
from .errors import AuthenticationFailed, ConnectionFailed

log = logging.getLogger("dcproto.connection")

CONNECT_TIMEOUT = 10.0
SECRET_ENV = "DCPROTO_SECRET"


async def open_session(
    host: str,
    port: int,
    *,
    role: str,
    secret: str,
    device_id: str | None,
    name: str,
    slots: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, p.Connection, p.Welcome]:
    """Connect and run the handshake. Raises ConnectionFailed or AuthenticationFailed."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=2**20), CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        raise ConnectionFailed(f"cannot reach the dcproto server at {host}:{port}: {exc}") from exc
    proto = p.Connection("client", role=role)

    async def next_message() -> p.Message:
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionFailed("the server closed the connection during the handshake")
            messages = proto.receive_data(data)
            if proto.error is not None:
                writer.write(proto.data_to_send())
                raise ConnectionFailed(f"protocol error in the handshake: {proto.error}")
            if messages:
                return messages[0]

    async def steps() -> p.Welcome:
        challenge = await next_message()
        if not isinstance(challenge, p.Challenge):
            raise ConnectionFailed(f"the server refused the connection: {challenge}")
        proto.send(
            p.Hello(
                version=p.PROTOCOL_VERSION,
                role=role,
                auth=p.auth_token(secret, challenge.nonce),
                device_id=device_id,
                name=name,
                slots=slots,
            )
        )
        writer.write(proto.data_to_send())
        answer = await next_message()
        if isinstance(answer, p.Error):
            if answer.code == "auth_failed":
                raise AuthenticationFailed(f"the server at {host}:{port} refused the secret")
            raise ConnectionFailed(f"the server refused: {answer.code}: {answer.message}")
        if not isinstance(answer, p.Welcome):
            raise ConnectionFailed(f"unexpected handshake answer {answer}")
        return answer

    try:
        welcome = await asyncio.wait_for(steps(), CONNECT_TIMEOUT)
    except TimeoutError as exc:
        writer.close()
        raise ConnectionFailed(f"no handshake answer from {host}:{port}") from exc
    except BaseException:
        writer.close()
        raise
    return reader, writer, proto, welcome


async def keep_alive(
    interval: float,
    *,
    last_sent: Callable[[], float],
    last_received: Callable[[], float],
    heartbeat: Callable[[], object],
    abort: Callable[[], None],
) -> None:
    """A client's side of liveness: send a heartbeat when idle, so the server does not take
    us for gone, and ``abort()`` the connection once the server has been silent for
    SILENCE_FACTOR intervals (a half-open connection). Returns after aborting."""
    while True:
        await asyncio.sleep(interval / 2)
        now = time.monotonic()
        silent = now - last_received()
        if silent > p.SILENCE_FACTOR * interval:
            log.warning("the server has been silent for %.1f s; dropping the connection", silent)
            abort()
            return
        if now - last_sent() >= interval / 2:
            heartbeat()


def backoff_delays(start: float = 0.1, cap: float = 5.0) -> Iterator[float]:
    """Capped exponential backoff with jitter (0.5x to 1.5x), forever."""
    delay = start
    while True:
        yield delay * random.uniform(0.5, 1.5)
        delay = min(cap, delay * 2)


def install_uvloop() -> bool:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
