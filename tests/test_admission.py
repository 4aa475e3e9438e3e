"""Tests for dcproto.server.admission (pure rules, no sockets, ``now`` passed in), and for the
server's own TLS handshake (start_tls on accepted plain TCP) under asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dcproto import protocol as p
from dcproto.connection import Endpoint, open_session
from dcproto.errors import AuthenticationFailed, ConnectionFailed
from dcproto.server.admission import (
    PER_ADDRESS,
    TOTAL,
    Admission,
    Eviction,
    LogLimiter,
    address_key,
    peer_text,
)
from dcproto.server.server import Server
from dcproto.trust.tls import ServerIdentity, load_or_create_identity
from dcproto.trust.tokens import TokenStore, new_token

# ---- caps on unauthenticated connections -------------------------------------------------------


def test_per_address_cap_closes_the_oldest_of_that_address() -> None:
    admission = Admission(max_unauthenticated=100, max_per_address=3)
    assert admission.opened("a1", "A") == []
    assert admission.opened("b1", "B") == []
    assert admission.opened("a2", "A") == []
    assert admission.opened("a3", "A") == []
    assert admission.opened("a4", "A") == [Eviction("a1", "A", PER_ADDRESS, 3)]
    assert admission.opened("a5", "A") == [Eviction("a2", "A", PER_ADDRESS, 3)]
    assert admission.unauthenticated_from("A") == 3
    assert admission.unauthenticated_from("B") == 1
    assert admission.unauthenticated == 4


def test_total_cap_closes_the_oldest_overall() -> None:
    admission = Admission(max_unauthenticated=3, max_per_address=3)
    for conn_id, address in [("x", "X"), ("y", "Y"), ("z", "Z")]:
        assert admission.opened(conn_id, address) == []
    assert admission.opened("honest", "H") == [Eviction("x", "X", TOTAL, 3)]
    admission.done("honest")  # it logged in: no longer counts
    assert admission.unauthenticated == 2
    assert admission.opened("w", "W") == []
    assert admission.opened("v", "V") == [Eviction("y", "Y", TOTAL, 3)]


def test_a_new_connection_is_never_the_one_closed() -> None:
    admission = Admission(max_unauthenticated=1, max_per_address=1)
    for n in range(50):
        evicted = admission.opened(f"c{n}", "A" if n % 2 else "B")
        assert all(e.conn_id != f"c{n}" for e in evicted)
        assert admission.unauthenticated == 1


def test_done_is_idempotent_and_forgets_empty_addresses() -> None:
    admission = Admission()
    admission.opened("c1", "A")
    admission.done("c1")
    admission.done("c1")
    admission.done("never")
    assert admission.unauthenticated == 0
    assert admission.unauthenticated_from("A") == 0
    assert admission._by_address == {}


def test_caps_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Admission(max_unauthenticated=0)


# ---- failed logins -----------------------------------------------------------------------------


def test_failures_past_the_allowance_wait_longer_and_longer() -> None:
    admission = Admission(failures_allowed=5, first_delay=0.5, max_delay=5.0)
    now = 100.0
    assert [admission.failed("A", now) for _ in range(5)] == [0.0] * 5
    assert admission.penalty("A", now) == 0.0
    delays = [admission.failed("A", now) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert admission.penalty("A", now) == 5.0
    assert admission.penalty("A", now + 4.0) == pytest.approx(1.0)
    assert admission.penalty("A", now + 6.0) == 0.0
    assert admission.penalty("B", now) == 0.0  # another address is not concerned
    assert admission.failures("A") == 11


def test_a_success_resets_the_address() -> None:
    admission = Admission(failures_allowed=1)
    admission.failed("A", 0.0)
    assert admission.failed("A", 0.0) > 0
    admission.succeeded("A")
    assert admission.penalty("A", 0.0) == 0.0
    assert admission.failed("A", 0.0) == 0.0


def test_the_window_starts_over_once_it_and_the_penalty_have_passed() -> None:
    admission = Admission(failures_allowed=2, failure_window=60.0, max_delay=5.0)
    assert [admission.failed("A", t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.5]
    assert admission.failed("A", 30.0) == 1.0  # still in the window
    assert admission.failed("A", 61.0) == 0.0  # a new window
    assert admission.failed("A", 62.0) == 0.0
    assert admission.failed("A", 63.0) == 0.5


def test_failure_state_is_bounded() -> None:
    admission = Admission(failures_allowed=0, max_addresses=10)
    for n in range(100):
        admission.failed(f"10.0.0.{n}", 0.0)
    assert len(admission._failures) == 10
    assert admission.penalty("10.0.0.99", 0.0) > 0
    assert admission.penalty("10.0.0.0", 0.0) == 0.0  # the least recent were forgotten


# ---- addresses, log lines ----------------------------------------------------------------------


def test_address_keys() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2::99") == address_key("2001:db8:1:2:ffff::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("not an address") == "not an address"


def test_peer_text() -> None:
    assert peer_text("worker-1") == "worker-1"
    assert peer_text("a b 'c'") == "a b 'c'"
    forged = "x\n2026-01-01 00:00:00,000 FORGED"
    assert peer_text(forged) == repr(forged)
    assert "\n" not in peer_text(forged)
    assert "\r" not in peer_text("a\rb") and "\x1b" not in peer_text("\x1b[2J")
    long = peer_text("y" * 4000)
    assert len(long) == 100 and long.startswith("'yyy") and long.endswith("...")
    assert len(peer_text("\x00" * 4000, 40)) == 40
    assert peer_text(ValueError("bad\nthing")) == repr("bad\nthing")


def test_log_limiter_holds_back_and_counts() -> None:
    limiter = LogLimiter(interval=10.0, max_keys=100)
    assert limiter.allow("A", 0.0) == 0
    assert limiter.allow("A", 1.0) is None
    assert limiter.allow("A", 2.0) is None
    assert limiter.allow("B", 2.0) == 0  # per address
    assert limiter.overdue(5.0) == []
    assert limiter.allow("A", 10.5) == 2  # the next line reports the two held back
    assert limiter.allow("A", 11.0) is None
    assert limiter.overdue(15.0) == []
    assert limiter.overdue(21.0) == [("A", 1)]  # no next line came: a summary, once
    assert limiter.overdue(40.0) == []
    assert limiter.allow("A", 25.0) is None  # the summary counted as A's line


def test_log_limiter_is_bounded() -> None:
    limiter = LogLimiter(interval=10.0, max_keys=5)
    for n in range(50):
        assert limiter.allow(f"k{n}", 0.0) == 0
        limiter.allow(f"k{n}", 0.1)
    assert len(limiter._last) == 5
    assert len(limiter._held) <= 5


# ---- the server's own TLS handshake, on both event loops ---------------------------------------


def _loop_factories() -> list[object]:
    factories: list[object] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        factories.append(pytest.param(None, id="uvloop", marks=pytest.mark.skip("no uvloop")))
    else:
        factories.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return factories


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> ServerIdentity:
    return load_or_create_identity(tmp_path_factory.mktemp("identity"))


async def _front_door(identity: ServerIdentity) -> None:
    tokens = TokenStore(None)
    admin = tokens.ensure_admin()
    assert admin is not None
    server = Server(
        tokens=tokens,
        identity=identity,
        state_dir=None,
        max_unauthenticated=6,
        max_unauthenticated_per_address=4,
    )
    host, port = await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    endpoint = Endpoint(host=host, port=port, token=admin, fingerprint=identity.fingerprint)
    idle: list[socket.socket] = []
    try:
        # honest sessions through start_tls: the channel binding holds, Welcome comes
        for _ in range(3):
            _, writer, _, welcome = await open_session(
                endpoint, role="creator", device_id=None, name="honest", slots=0
            )
            assert welcome.heartbeat_interval > 0
            writer.close()

        # idle sockets (no byte sent) and ones stopped in the middle of TLS, past the caps
        for n in range(12):
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind(("127.0.0.1" if n < 8 else "127.0.0.2", 0))  # 4 past each cap
            await loop.sock_connect(sock, (host, port))
            if n % 3 == 0:  # a TLS record header, no more: the server is in the handshake
                await loop.sock_sendall(sock, b"\x16\x03\x01\x00\xff")
            idle.append(sock)
        closed = 0
        for _ in range(500):  # until the server has accepted them all
            closed = server.refusals["cap_total"] + server.refusals["cap_per-address"]
            if closed >= 6:
                break
            await asyncio.sleep(0.01)
        assert closed == 6
        assert server.admission.unauthenticated == 6
        assert server.refusals["cap_per-address"] == 4
        assert server.refusals["cap_total"] == 2

        # the honest one still gets in, and the wrong one is refused
        _, writer, _, _ = await open_session(
            endpoint, role="creator", device_id=None, name="after", slots=0
        )
        writer.close()
        wrong = Endpoint(
            host=host, port=port, token=new_token("admin"), fingerprint=identity.fingerprint
        )
        with pytest.raises(AuthenticationFailed):
            await open_session(wrong, role="creator", device_id=None, name="wrong", slots=0)

        # garbage instead of TLS: closed, counted, the server goes on
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing said
        writer.close()
        for _ in range(100):
            if server.refusals["tls_failed"]:
                break
            await asyncio.sleep(0.01)
        assert server.refusals["tls_failed"] >= 1
    finally:
        for sock in idle:
            sock.close()
        await server.stop()


async def _slow_down(identity: ServerIdentity) -> None:
    tokens = TokenStore(None)
    admin = tokens.ensure_admin()
    assert admin is not None
    server = Server(tokens=tokens, identity=identity, state_dir=None)
    server.admission = Admission(failures_allowed=2, first_delay=0.2, max_delay=0.4)
    host, port = await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    right = Endpoint(host=host, port=port, token=admin, fingerprint=identity.fingerprint)
    wrong = Endpoint(
        host=host, port=port, token=new_token("admin"), fingerprint=identity.fingerprint
    )

    async def attempt() -> tuple[type[Exception], float]:
        started = loop.time()
        try:
            await open_session(wrong, role="creator", device_id=None, name="w", slots=0)
        except ConnectionFailed as exc:
            return type(exc), loop.time() - started
        raise AssertionError("a wrong token got in")

    try:
        for _ in range(2):  # within the allowance: refused at once
            kind, _ = await attempt()
            assert kind is AuthenticationFailed
        third = asyncio.ensure_future(attempt())  # answered after 0.2 s
        await asyncio.sleep(0.1)
        kind, _ = await attempt()  # meanwhile: told to slow down, before any Challenge
        assert kind is ConnectionFailed
        kind, took = await third
        assert kind is AuthenticationFailed and took >= 0.2
        await asyncio.sleep(0.5)
        _, writer, _, _ = await open_session(
            right, role="creator", device_id=None, name="right", slots=0
        )
        writer.close()
        assert server.admission.failures("127.0.0.1") == 0  # the success reset it
        assert server.refusals["slow_down"] == 1 and server.refusals["auth_failed"] == 3
    finally:
        await server.stop()


@pytest.mark.parametrize("new_loop", _loop_factories())
def test_tls_on_accepted_tcp_under_both_loops(
    new_loop: Callable[[], asyncio.AbstractEventLoop], identity: ServerIdentity
) -> None:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(asyncio.wait_for(_front_door(identity), 60))


@pytest.mark.parametrize("new_loop", _loop_factories())
def test_failed_logins_slow_down_under_both_loops(
    new_loop: Callable[[], asyncio.AbstractEventLoop], identity: ServerIdentity
) -> None:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(asyncio.wait_for(_slow_down(identity), 60))


def test_plain_tcp_mode_still_challenges_at_once(tmp_path: Path) -> None:
    async def run() -> None:
        tokens = TokenStore(None)
        admin = tokens.ensure_admin()
        assert admin is not None
        server = Server(tokens=tokens, identity=None, state_dir=None)
        host, port = await server.start("127.0.0.1", 0)
        try:
            endpoint = Endpoint(host=host, port=port, token=admin, insecure=True)
            _, writer, _, welcome = await open_session(
                endpoint, role="worker", device_id=None, name="plain", slots=1
            )
            assert welcome.device_id
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
            frame = await asyncio.wait_for(reader.readexactly(4), 5)
            body = await reader.readexactly(p.HEADER.unpack(frame)[0])
            assert isinstance(p.decode(body), p.Challenge)
            writer.close()
        finally:
            await server.stop()

    asyncio.run(run())


def test_server_raises_its_soft_open_files_limit_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit on open files is only {hard}")
    code = (
        "import resource\n"
        "from dcproto.server.main import raise_open_file_limit\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "raise_open_file_limit()\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "print(soft > 256, soft == hard or hard == resource.RLIM_INFINITY)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["True", "True"], done
