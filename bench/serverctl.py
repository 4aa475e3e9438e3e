"""What every bench script does with a fresh ``dcproto-server``: read its banner, its record
(certificate fingerprint) and make the tokens its clients present.

The server makes its TLS identity and an admin token in ``--state-dir`` on first start and
prints ``dcproto server listening on HOST:PORT`` once it accepts connections. After that line:

* :func:`read_fingerprint` reads ``server.json`` (None when the server runs ``--insecure``);
* :func:`make_credentials` adds a ``worker`` and a ``creator`` token to the state dir (as
  ``dcproto tokens add`` does), writes the worker token to a 0600 file for worker processes
  (``dcproto-worker connect ... --token-file FILE``), and waits until the running server knows
  the new tokens (it looks at its tokens file every 0.5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from dcproto import protocol as p
from dcproto.connection import Endpoint, open_session
from dcproto.errors import AuthenticationFailed
from dcproto.server.statedir import read_record
from dcproto.trust.tokens import TokenStore
from dcproto.users import User

BANNER = "dcproto server listening on "


def banner_address(line: str) -> tuple[str, int] | None:
    """``(host, port)`` from the server's banner line, None for any other line."""
    if BANNER not in line:
        return None
    address = line.split(BANNER, 1)[1].strip()
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def read_fingerprint(state_dir: Path) -> tuple[str | None, bool]:
    """``(fingerprint, insecure)`` of the server last started on ``state_dir``."""
    record = read_record(state_dir)
    if record is None:
        raise RuntimeError(f"no server record in {state_dir} (the server did not start?)")
    return record.fingerprint, record.insecure


@dataclass(frozen=True)
class Credentials:
    """How this bench's clients reach and trust one server."""

    host: str
    port: int
    fingerprint: str | None  # None: plain TCP
    insecure: bool
    creator_token: str = field(repr=False)
    worker_token: str = field(repr=False)
    worker_token_file: Path

    def endpoint(self, token: str) -> Endpoint:
        return Endpoint(
            host=self.host,
            port=self.port,
            token=token,
            fingerprint=self.fingerprint,
            insecure=self.insecure,
        )

    def user(self, name: str) -> User:
        """The named server for ``Distribute(user_name=name)``, with the creator token."""
        return User(
            name=name,
            host=self.host,
            port=self.port,
            token=self.creator_token,
            fingerprint=self.fingerprint,
            insecure=self.insecure,
        )

    def worker_args(self) -> list[str]:
        """``dcproto-worker connect`` flags: the token file and how to trust the server."""
        out = ["--token-file", str(self.worker_token_file)]
        if self.insecure:
            out.append("--insecure")
        elif self.fingerprint is not None:
            out += ["--fingerprint", self.fingerprint]
        return out

    def with_port(self, port: int) -> Credentials:
        """The same identity and tokens on another port (a restarted server)."""
        return Credentials(
            host=self.host,
            port=port,
            fingerprint=self.fingerprint,
            insecure=self.insecure,
            creator_token=self.creator_token,
            worker_token=self.worker_token,
            worker_token_file=self.worker_token_file,
        )


def write_private(path: Path, text: str) -> None:
    """``text`` to ``path``, readable by this user only (0600 from the start)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


async def wait_accepted(endpoint: Endpoint, timeout: float = 10.0) -> None:
    """Until the server accepts ``endpoint``'s token on a creator connection (a token added
    while it runs is picked up within 0.5 s); AuthenticationFailed after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer, proto, _ = await open_session(
                endpoint, role="creator", device_id=None, name="bench-probe", slots=0
            )
        except AuthenticationFailed:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        with contextlib.suppress(Exception):
            proto.send(p.Goodbye(reason="token check"))
            writer.write(proto.data_to_send())
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return


async def make_credentials_async(
    state_dir: Path,
    host: str,
    port: int,
    token_dir: Path,
    *,
    prefix: str = "bench",
    timeout: float = 10.0,
) -> Credentials:
    """Call once the server printed its banner: the fingerprint from its record, a worker and a
    creator token (the worker's also in ``token_dir/PREFIX-worker.token``), both known to the
    running server when this returns."""
    fingerprint, insecure = read_fingerprint(state_dir)
    store = TokenStore(state_dir)
    worker_token = store.add(f"{prefix}-worker", "worker")
    # added last: once the server accepts it, it has re-read the file with both tokens in it
    creator_token = store.add(f"{prefix}-creator", "creator")
    token_file = token_dir / f"{prefix}-worker.token"
    write_private(token_file, worker_token)
    creds = Credentials(
        host=host,
        port=port,
        fingerprint=fingerprint,
        insecure=insecure,
        creator_token=creator_token,
        worker_token=worker_token,
        worker_token_file=token_file,
    )
    await wait_accepted(creds.endpoint(creator_token), timeout)
    return creds


def make_credentials(
    state_dir: Path,
    host: str,
    port: int,
    token_dir: Path,
    *,
    prefix: str = "bench",
    timeout: float = 10.0,
) -> Credentials:
    """:func:`make_credentials_async` for code without an event loop."""
    return asyncio.run(
        make_credentials_async(state_dir, host, port, token_dir, prefix=prefix, timeout=timeout)
    )
