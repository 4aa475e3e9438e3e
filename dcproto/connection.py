"""What every client shares: connecting with the handshake, keep-alive, reconnect backoff.

The worker and the creator both build on these; none of it decides anything about projects.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import protocol as p
from .errors import AuthenticationFailed, ConnectionFailed, PermissionDenied
from .trust.tls import channel_binding, check_pin, client_context, peer_certificate
from .trust.tokens import make_proof, parse_token

log = logging.getLogger("dcproto.connection")

CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """A server to connect to and how to trust it: a pinned certificate fingerprint, or the CA
    chain and host name when there is no pin, or plain TCP when ``insecure`` (loopback and
    explicit opt-in only). ``token`` is ``NAME.SECRET`` as printed by ``dcproto tokens add``."""

    host: str
    port: int
    token: str = field(repr=False)
    fingerprint: str | None = None
    insecure: bool = False
    ca_file: Path | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


#: Error codes of a refused Hello -> the exception the client raises.
_REFUSALS: dict[str, type[ConnectionFailed] | type[PermissionDenied]] = {
    "auth_failed": AuthenticationFailed,
    "forbidden": PermissionDenied,
}


async def open_session(
    endpoint: Endpoint,
    *,
    role: str,
    device_id: str | None,
    name: str,
    slots: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, p.Connection, p.Welcome]:
    """Connect, check the server's certificate, and prove we hold our token. Nothing is sent
    before the certificate checks out. Raises ConnectionFailed (CertificateMismatch,
    AuthenticationFailed) or PermissionDenied (the token's role may not connect as ``role``)."""
    identity, _ = parse_token(endpoint.token)  # a malformed token fails before any connect
    where = endpoint.address
    context = None
    if not endpoint.insecure:
        context = client_context(fingerprint=endpoint.fingerprint, ca_file=endpoint.ca_file)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                endpoint.host,
                endpoint.port,
                limit=2**20,
                ssl=context,
                server_hostname=endpoint.host if context is not None else None,
                ssl_handshake_timeout=CONNECT_TIMEOUT if context is not None else None,
            ),
            CONNECT_TIMEOUT,
        )
    except ssl.SSLCertVerificationError as exc:
        raise ConnectionFailed(
            f"the server at {where} presented a certificate that cannot be verified "
            f"({exc.verify_message}); pin its fingerprint with 'dcproto users add ... "
            "--fingerprint ...' as printed by its join line"
        ) from exc
    except (OSError, TimeoutError) as exc:
        text = str(exc) or type(exc).__name__
        raise ConnectionFailed(f"cannot reach the dcproto server at {where}: {text}") from exc
    channel = b""
    try:
        if context is not None:
            ssl_object = writer.get_extra_info("ssl_object")
            if ssl_object is None:
                raise ConnectionFailed(f"no TLS session with {where}")
            cert = peer_certificate(ssl_object)
            check_pin(cert, endpoint.fingerprint, where)
            channel = channel_binding(cert)
    except BaseException:
        writer.transport.abort()  # nothing was sent: a wrong server learns nothing
        raise
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
        if isinstance(challenge, p.Error):  # e.g. slow_down: too many failed logins from here
            raise ConnectionFailed(
                f"the server at {where} refused the connection: {challenge.code}: "
                f"{challenge.message}"
            )
        if not isinstance(challenge, p.Challenge):
            raise ConnectionFailed(f"the server refused the connection: {challenge}")
        _, proof = make_proof(endpoint.token, nonce=challenge.nonce, role=role, channel=channel)
        proto.send(
            p.Hello(
                version=p.PROTOCOL_VERSION,
                role=role,
                identity=identity,
                proof=proof,
                device_id=device_id,
                name=name[: p.MAX_NAME],
                slots=slots,
            )
        )
        writer.write(proto.data_to_send())
        answer = await next_message()
        if isinstance(answer, p.Error):
            refusal = _REFUSALS.get(answer.code)
            if refusal is not None:
                raise refusal(f"the server at {where} refused token {identity!r}: {answer.message}")
            raise ConnectionFailed(f"the server refused: {answer.code}: {answer.message}")
        if not isinstance(answer, p.Welcome):
            raise ConnectionFailed(f"unexpected handshake answer {answer}")
        return answer

    try:
        welcome = await asyncio.wait_for(steps(), CONNECT_TIMEOUT)
    except TimeoutError as exc:
        writer.close()
        raise ConnectionFailed(f"no handshake answer from {where}") from exc
    except BaseException:
        writer.close()
        raise
    return reader, writer, proto, welcome


KEEP_ALIVE_NAP = 0.25  # seconds; well under the shortest lease a project may have


async def keep_alive(
    interval: float,
    *,
    last_sent: Callable[[], float],
    last_received: Callable[[], float],
    heartbeat: Callable[[], object],
    abort: Callable[[], None],
    renew_every: Callable[[], float | None] = lambda: None,
) -> None:
    """A client's side of liveness: send a heartbeat when idle, so the server does not take
    us for gone, and ``abort()`` the connection once the server has been silent for
    SILENCE_FACTOR intervals (a half-open connection). Returns after aborting.
    ``renew_every()``: seconds within which a frame must go out for another reason (a worker
    renewing short leases), or None."""
    while True:
        renew = renew_every()
        quiet = interval / 2 if renew is None else min(interval / 2, renew)
        # short naps: a lease taken on while we sleep is renewed in time
        await asyncio.sleep(min(quiet, KEEP_ALIVE_NAP))
        now = time.monotonic()
        silent = now - last_received()
        if silent > p.SILENCE_FACTOR * interval:
            log.warning("the server has been silent for %.1f s; dropping the connection", silent)
            abort()
            return
        if now - last_sent() >= quiet:
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
