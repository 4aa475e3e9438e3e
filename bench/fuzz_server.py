"""A long live fuzz of a real ``dcproto-server``: many cases of random frames from
authenticated creators and workers (and from connections that never said Hello), then an honest
project that must still finish exactly, and a look at the server's log.

    python -m bench.fuzz_server --cases 100000 [--clients 3] [--seed 1] [--keep DIR]

A case is one frame on one connection:

* a valid message with random in-range values (Submit, Tasks, End, Cancel, Attach, Release,
  ListProjects from a creator; Credit, Result, Reject from a worker; Heartbeat from both), with
  project and task ids the server gave out now and then, so that cases reach the scheduler and
  the store and leave the connection open;
* a valid message with some fields replaced by random msgpack values (huge ints, nested maps,
  bytes, floats), or one field too many or too few;
* an arbitrary msgpack array with a valid or random type number; raw bytes; a header announcing
  more than the frame limit;
* any of these in place of a Hello, on a fresh connection.

After a case on a creator connection the creator asks an Attach with a reserved ref and waits
for its Attached, so every case counts once the server has read it; on a worker connection it
waits a few milliseconds for an Error. A connection the server closes (the expected answer to
most bad frames) is opened again. Several client processes share the cases; the server runs
alone in its own process.

The report gives the cases run, connections, closes by error code, the time taken, the number
of Tracebacks and ERROR lines in the server's log (must be 0), and whether an honest project on
a real worker still finishes exactly. The exit status is 0 only if all is well.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import multiprocessing
import os
import pickle
import queue
import random
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from dcproto import protocol as p
from dcproto.errors import RemoteProtocolError
from dcproto.trust.tls import channel_binding, check_pin, client_context, peer_certificate
from dcproto.trust.tokens import TokenStore, make_proof

BANNER = "dcproto server listening on "
BARRIER_PROJECT = "fuzz-barrier"  # never submitted: an Attach to it is answered at once
BARRIER_REF = 2**52  # refs from here on are the barrier's; the fuzz uses smaller ones
WORKER_WAIT = 0.003  # seconds to wait for an Error after a case on a worker connection
HONEST_ITEMS = 60

# ---- random values ------------------------------------------------------------------------------

EDGE_INTS = [
    0,
    1,
    -1,
    2**31,
    2**31 + 1,
    p.MAX_CREDIT,
    p.MAX_CREDIT + 1,
    p.MAX_INT,
    p.MAX_INT + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**63),
]
EDGE_FLOATS = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324]
PROJECT_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
TEXT_CHARS = "ab ./-_\x00\x1f\x7féü€\u202e\U0001f600"
MODULE_NAMES = ["math", "json", "no_such_mod", "os.path"]
OPTION_NAMES = ["lease_timeout", "task_timeout", "max_attempts", "errors", "trust_workers", "x"]
OUTCOMES = list(p.RESULT_OUTCOMES)


class Values:
    """Random msgpack values, with ``random.Random`` (hypothesis would be far too slow here)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self) -> int:
        rng = self.rng
        roll = rng.random()
        if roll < 0.4:
            return rng.choice(EDGE_INTS)
        if roll < 0.7:
            return rng.randint(-5, 100)
        bits = rng.randint(1, 64)
        value = rng.getrandbits(bits)
        return value if bits == 64 or rng.random() < 0.7 else -value

    def text(self, limit: int = 20) -> str:
        return "".join(self.rng.choice(TEXT_CHARS) for _ in range(self.rng.randint(0, limit)))

    def leaf(self) -> Any:
        rng = self.rng
        kind = rng.randint(0, 6)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return self.int()
        if kind == 3:
            return rng.choice(EDGE_FLOATS) if rng.random() < 0.5 else rng.uniform(-1e9, 1e9)
        if kind == 4:
            return self.text()
        if kind == 5:
            return rng.randbytes(rng.randint(0, 24))
        if rng.random() < 0.5:
            return msgpack.Timestamp(rng.randint(-(2**33), 2**33), rng.randint(0, 999_999_999))
        return msgpack.ExtType(rng.randint(0, 5), rng.randbytes(rng.randint(0, 12)))

    def key(self, str_keys: bool) -> Any:
        if str_keys or self.rng.random() < 0.7:
            return self.text(10)
        return self.rng.choice([self.int(), self.rng.randbytes(3)])

    def any(self, depth: int = 0, *, str_keys: bool = False) -> Any:
        rng = self.rng
        roll = rng.random()
        if depth >= 3 or roll < 0.6:
            value = self.leaf()
            if str_keys and isinstance(value, msgpack.ExtType | msgpack.Timestamp):
                return None
            return value
        if roll < 0.8:
            return [self.any(depth + 1, str_keys=str_keys) for _ in range(rng.randint(0, 4))]
        return {
            self.key(str_keys): self.any(depth + 1, str_keys=str_keys)
            for _ in range(rng.randint(0, 4))
        }

    def str_map(self) -> dict[str, Any]:
        return {self.text(10): self.any(1, str_keys=True) for _ in range(self.rng.randint(0, 3))}

    def nested(self, depth: int) -> bytes:
        """msgpack of containers nested ``depth`` deep (arrays of one, maps of one "k"), past
        msgpack's and the decoder's limits: built by hand, msgpack would not pack it."""
        heads = [b"\x91", b"\x81\xa1k"]
        return b"".join(self.rng.choice(heads) for _ in range(depth)) + b"\x01"


# ---- frames -------------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return p.HEADER.pack(len(body)) + body


def pack(value: Any) -> bytes:
    return frame(msgpack.packb(value, use_bin_type=True))


class Raw(bytes):
    """Bytes that go into a frame as msgpack as they are (see :func:`pack_array`)."""


def pack_array(elements: list[Any]) -> bytes:
    """A frame holding the msgpack array of ``elements``; a :class:`Raw` element goes in as is."""
    n = len(elements)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    parts = [e if isinstance(e, Raw) else msgpack.packb(e, use_bin_type=True) for e in elements]
    return frame(head + b"".join(parts))


def fields_of(message: p.Message) -> list[Any]:
    return [getattr(message, name) for name, _, _ in p.SCHEMA[type(message)]]


@dataclass
class Known:
    """Ids the server gave this client, to aim valid messages at."""

    project_ids: collections.deque[str] = field(
        default_factory=lambda: collections.deque(["fz-0"], maxlen=64)
    )
    tasks: collections.deque[tuple[int, int]] = field(
        default_factory=lambda: collections.deque([(1, 1)], maxlen=256)
    )
    next_seq: dict[str, int] = field(default_factory=dict)


class Frames:
    """Random frames for a creator, a worker, or in place of a Hello."""

    def __init__(self, rng: random.Random, code: bytes) -> None:
        self.rng = rng
        self.values = Values(rng)
        self.code = code  # a real pickled project class, now and then
        self.items = pickle.dumps([1, 2, 3])
        self.known = Known()
        self.samples = self._samples()

    def _samples(self) -> list[p.Message]:
        return [
            p.Hello(
                version=p.PROTOCOL_VERSION,
                role="worker",
                identity="fuzz-worker",
                proof=b"\0" * 32,
                device_id=None,
                name="fuzz",
                slots=2,
            ),
            p.Error(code="bad", message="x"),
            p.Heartbeat(),
            p.Goodbye(reason="bye"),
            p.Credit(credit=1),
            p.Reject(project_id="fz-0", reason="r"),
            p.Result(
                task_id=1,
                attempt=1,
                outcome="ok",
                payload=b"",
                n_items=1,
                n_kept=0,
                error=None,
                stats={},
                files=[],
                credit=1,
            ),
            p.Submit(
                project_id="fz-0",
                name="n",
                code=b"c",
                modules=[],
                parallel="parallel_func",
                stop=None,
                only_if=None,
                options={},
            ),
            p.Tasks(project_id="fz-0", tasks=[[0, b"x", 1]]),
            p.End(project_id="fz-0", total_tasks=1, total_items=1),
            p.Cancel(project_id="fz-0"),
            p.Attach(ref=1, project_id="fz-0"),
            p.Release(project_id="fz-0"),
            p.ListProjects(ref=1),
            p.Task(task_id=1, project_id="fz-0", attempt=1, items=b"x"),  # a server's message
            p.Welcome(device_id="d", heartbeat_interval=1.0, max_frame=p.DEFAULT_MAX_FRAME),
        ]

    # -- valid messages --

    def project_id(self) -> str:
        rng = self.rng
        if rng.random() < 0.7:
            return rng.choice(self.known.project_ids)
        return "".join(rng.choice(PROJECT_ID_CHARS) for _ in range(rng.randint(1, 64)))

    def valid(self, role: str) -> p.Message:
        rng, values = self.rng, self.values
        project_id = self.project_id()
        if role == "worker":
            kind = rng.choice(["credit", "result", "result", "result", "reject", "heartbeat"])
            if kind == "credit":
                return p.Credit(credit=rng.randint(1, 16))
            if kind == "reject":
                return p.Reject(project_id=project_id, reason=values.text(60))
            if kind == "heartbeat":
                return p.Heartbeat()
            if rng.random() < 0.7:
                task_id, attempt = rng.choice(self.known.tasks)
            else:
                task_id, attempt = rng.randint(0, 10_000), rng.randint(0, 3)
            n_items = rng.randint(0, 1000)
            names = ["out.txt", "a/b.bin", "../x", "/abs", "ok", "d/e/f"]
            payload = rng.choice([b"", pickle.dumps({0: 1}), rng.randbytes(rng.randint(0, 64))])
            return p.Result(
                task_id=task_id,
                attempt=attempt,
                outcome=rng.choice(OUTCOMES),
                payload=payload,
                n_items=n_items,
                n_kept=rng.randint(0, n_items),
                error=rng.choice([None, {"message": values.text(60)}, values.str_map()]),
                stats=values.str_map(),
                files=[
                    [rng.choice(names), rng.randbytes(rng.randint(0, 16))]
                    for _ in range(rng.randint(0, 3))
                ],
                credit=rng.randint(0, 4),
            )
        kind = rng.choice(
            ["submit", "tasks", "tasks", "end", "cancel", "attach", "release", "list", "beat"]
        )
        if kind == "submit":
            new_id = "fz-" + "".join(rng.choice(PROJECT_ID_CHARS) for _ in range(12))
            options = {
                rng.choice(OPTION_NAMES): rng.choice(
                    [values.any(1, str_keys=True), rng.uniform(0.1, 60), rng.randint(1, 5)]
                )
                for _ in range(rng.randint(0, 3))
            }
            return p.Submit(
                project_id=new_id,
                name=values.text(30),
                code=self.code if rng.random() < 0.3 else rng.randbytes(rng.randint(0, 32)),
                modules=[rng.choice(MODULE_NAMES) for _ in range(rng.randint(0, 2))],
                parallel="parallel_func",
                stop=rng.choice([None, "parallel_func", "nope"]),
                only_if=rng.choice([None, "parallel_func"]),
                options=options,
            )
        if kind == "tasks":
            seq = self.known.next_seq.get(project_id, 0)
            entries = []
            for _ in range(rng.randint(0, 4)):
                entry_seq = seq if rng.random() < 0.8 else rng.randint(0, seq + 3)
                seq += entry_seq == seq
                items = self.items if rng.random() < 0.5 else rng.randbytes(rng.randint(0, 16))
                entries.append([entry_seq, items, rng.randint(0, 1000)])
            self.known.next_seq[project_id] = seq
            return p.Tasks(project_id=project_id, tasks=entries)
        if kind == "end":
            return p.End(
                project_id=project_id,
                total_tasks=rng.randint(0, 8),
                total_items=rng.randint(0, 1000),
            )
        if kind == "cancel":
            return p.Cancel(project_id=project_id)
        if kind == "attach":
            return p.Attach(ref=rng.randint(0, 1000), project_id=project_id)
        if kind == "release":
            return p.Release(project_id=project_id)
        if kind == "list":
            return p.ListProjects(ref=rng.randint(0, 1000))
        return p.Heartbeat()

    # -- invalid ones --

    def mutated(self) -> bytes:
        rng = self.rng
        message = rng.choice(self.samples)
        fields = fields_of(message)
        for _ in range(rng.randint(1, 3)):
            if fields:
                at = rng.randrange(len(fields))
                roll = rng.random()
                if roll < 0.5:
                    fields[at] = self.values.int()
                elif roll < 0.9:
                    fields[at] = self.values.any()
                else:
                    fields[at] = Raw(self.values.nested(rng.choice([33, 200, 2000])))
        if rng.random() < 0.1:
            fields = fields[:-1] if fields and rng.random() < 0.5 else [*fields, None]
        return pack_array([message.TYPE, *fields])

    def array(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.5:
            type_number: Any = rng.choice(sorted(p.BY_TYPE))
        elif roll < 0.8:
            type_number = rng.randint(-3, 300)
        else:
            type_number = rng.choice([*EDGE_INTS, True, None, "x", 1.0])
        return pack([type_number, *(self.values.any() for _ in range(rng.randint(0, 12)))])

    def raw(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:
            return frame(rng.randbytes(rng.randint(0, 256)))
        if roll < 0.8:
            return frame(b"")
        return p.HEADER.pack(rng.randint(p.DEFAULT_MAX_FRAME + 1, 2**32 - 1)) + b"\0"

    def next(self, role: str) -> bytes:
        """One case's frame for ``role`` (creator, worker or hello)."""
        roll = self.rng.random()
        if roll < 0.62 and role != "hello":
            return p.encode(self.valid(role))
        if roll < 0.82:
            return self.mutated()
        if roll < 0.94:
            return self.array()
        return self.raw()


# ---- a client connection ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    fingerprint: str
    tokens: dict[str, str]


class Closed(Exception):
    pass


class Connection:
    """One TLS connection to the server, driven synchronously."""

    def __init__(self, target: Target, role: str | None) -> None:
        context = client_context(fingerprint=target.fingerprint)
        plain = socket.create_connection((target.host, target.port), timeout=10)
        # small frames, each waited for: no Nagle delay (with the peer's delayed ACK, 40 ms)
        plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(plain, server_hostname=target.host)
        cert = peer_certificate(self.sock)
        check_pin(cert, target.fingerprint, f"{target.host}:{target.port}")
        self.channel = channel_binding(cert)
        self.decoder = p.Decoder()
        self.inbox: collections.deque[p.Message] = collections.deque()
        self.closed = False
        self.errored = False  # the server sent an Error
        self.frames_sent = 0
        self.sent_closing = False  # we sent a valid Goodbye or Error on it: we closed it
        self.reset = False  # ended by a reset (or a failed write), not by the server's FIN
        self.bad_frames = 0
        challenge = self.wait(lambda m: isinstance(m, p.Challenge), 10)
        if not isinstance(challenge, p.Challenge):
            raise Closed("no Challenge")
        self.challenge = challenge
        if role is not None:
            token = target.tokens[role]
            identity, proof = make_proof(
                token, nonce=challenge.nonce, role=role, channel=self.channel
            )
            hello = p.Hello(
                version=p.PROTOCOL_VERSION,
                role=role,
                identity=identity,
                proof=proof,
                device_id=None,
                name=f"fuzz-{role}",
                slots=2,
            )
            self.send(p.encode(hello))
            welcome = self.wait(lambda m: isinstance(m, p.Welcome | p.Error), 10)
            if not isinstance(welcome, p.Welcome):
                raise Closed(f"refused: {welcome}")

    def send(self, data: bytes, *, closing: bool = False) -> None:
        if self.closed:
            return
        self.frames_sent += 1
        self.sent_closing = self.sent_closing or closing
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError):
            self.poll(0.05)  # the server's Error may still be waiting to be read
            self.closed = self.reset = True

    def poll(self, timeout: float) -> None:
        """Take in the next batch of data arriving within ``timeout`` seconds (0: only what is
        there already)."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            if not self.sock.pending():
                remaining = max(0.0, deadline - time.monotonic())
                readable, _, _ = select.select([self.sock], [], [], remaining)
                if not readable:
                    return
            try:
                data = self.sock.recv(1 << 20)
            except ssl.SSLWantReadError:
                continue
            except (OSError, ssl.SSLError):
                # a reset: what the server sent last (its Error) may be lost with it
                self.reset = True
                data = b""
            if not data:
                self.closed = True
                return
            try:
                bodies = self.decoder.feed(data)
            except RemoteProtocolError:
                self.bad_frames += 1
                self.closed = True
                return
            for body in bodies:
                try:
                    message = p.decode(body)
                except RemoteProtocolError:
                    self.bad_frames += 1
                    continue
                if not isinstance(message, p.Heartbeat):
                    self.inbox.append(message)
            if not self.sock.pending():
                return  # one batch at a time: the caller looks at it

    def wait(self, last: Any, timeout: float) -> p.Message | None:
        """The first message for which ``last`` is true (the ones before it stay in the
        inbox), or None on close or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.inbox:
                if last(message):
                    self.inbox.remove(message)
                    return message
            remaining = deadline - time.monotonic()
            if self.closed or remaining <= 0:
                return None
            self.poll(min(remaining, 0.5))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ---- one client process -------------------------------------------------------------------------


@dataclass
class ClientStats:
    cases: int = 0
    connections: int = 0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    silent_closes: int = 0  # closed by the server (FIN) with no Error, and not after our
    # own Goodbye/Error: the server dropped a connection without saying why
    resets: int = 0  # ended by a reset with no Error read: we wrote after the server closed
    # (on a worker connection there is no reply to wait for), and the reset took its Error
    own_closes: int = 0  # closed after our own Goodbye or Error
    bad_frames: int = 0  # frames from the server that did not decode
    unanswered_barriers: int = 0  # the server stopped answering (must be 0)
    silent_samples: list[str] = field(default_factory=list)  # what preceded a silent close
    elapsed: float = 0.0


def _closing(data: bytes) -> bool:
    """Whether the frame is a valid Goodbye or Error: we close, the server need not answer."""
    try:
        message = p.decode(data[p.HEADER.size :])
    except RemoteProtocolError:
        return False
    return isinstance(message, p.Goodbye | p.Error)


class Client:
    def __init__(self, target: Target, seed: int, code: bytes) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.frames = Frames(self.rng, code)
        self.stats = ClientStats()
        self.conns: dict[str, Connection | None] = {"creator": None, "worker": None}
        self.barrier_refs = iter(range(BARRIER_REF + seed * 10**9, 2**53))
        self.last_frame: dict[str, bytes] = {}  # for the report of a silent close

    def conn(self, role: str) -> Connection:
        conn = self.conns[role]
        if conn is None or conn.closed:
            if conn is not None:
                self.retire(role, conn)
            conn = Connection(self.target, role)
            self.stats.connections += 1
            self.conns[role] = conn
        return conn

    def retire(self, role: str, conn: Connection) -> None:
        self.take(conn)
        if conn.closed and not conn.errored:
            if conn.sent_closing:
                self.stats.own_closes += 1
            elif conn.reset:
                self.stats.resets += 1
            else:
                self.stats.silent_closes += 1
                self._sample(role, conn, self.last_frame.get(role, b""))
        self.stats.bad_frames += conn.bad_frames
        conn.close()
        self.conns[role] = None

    def take(self, conn: Connection) -> None:
        """Learn ids from what the server sent; count Errors."""
        while conn.inbox:
            message = conn.inbox.popleft()
            if isinstance(message, p.Error):
                self.stats.codes[message.code] += 1
                conn.errored = True
            elif isinstance(message, p.Task):
                self.frames.known.tasks.append((message.task_id, message.attempt))
            elif (
                isinstance(message, p.Project | p.Accepted)
                and message.project_id not in self.frames.known.project_ids
            ):
                self.frames.known.project_ids.append(message.project_id)

    def case(self) -> None:
        roll = self.rng.random()
        role = "hello" if roll < 0.04 else "creator" if roll < 0.54 else "worker"
        data = self.frames.next(role)
        self.stats.cases += 1
        if role == "hello":
            self.before_hello(data)
            return
        conn = self.conn(role)
        self.last_frame[role] = data
        if role == "creator":
            self.barrier(conn, data)
        else:
            conn.send(data, closing=_closing(data))
            conn.poll(WORKER_WAIT)
            self.take(conn)
        if conn.closed:
            self.retire(role, conn)

    def barrier(self, conn: Connection, data: bytes) -> None:
        """Send ``data`` and wait until the server has read it, or closed the connection."""
        ref = next(self.barrier_refs)
        conn.send(
            data + p.encode(p.Attach(ref=ref, project_id=BARRIER_PROJECT)), closing=_closing(data)
        )
        answer = conn.wait(lambda m: isinstance(m, p.Attached) and m.ref == ref, 30)
        if answer is None and not conn.closed:
            self.stats.unanswered_barriers += 1
            conn.closed = True
        self.take(conn)

    def before_hello(self, data: bytes) -> None:
        conn = Connection(self.target, None)
        self.stats.connections += 1
        conn.send(data, closing=_closing(data))
        error = conn.wait(lambda m: isinstance(m, p.Error), 0.3)
        if isinstance(error, p.Error):
            self.stats.codes[error.code] += 1
        elif conn.closed:
            if conn.sent_closing:
                self.stats.own_closes += 1
            elif conn.reset:
                self.stats.resets += 1
            else:
                self.stats.silent_closes += 1
                self._sample("hello", conn, data)
        self.stats.bad_frames += conn.bad_frames
        conn.close()

    def _sample(self, role: str, conn: Connection, data: bytes) -> None:
        if len(self.stats.silent_samples) < 5:
            self.stats.silent_samples.append(
                f"{role} connection, {conn.frames_sent} frames sent, last "
                f"({len(data)} bytes): {data[:80].hex()}"
            )

    def run(self, cases: int, progress: Any = None) -> ClientStats:
        started = time.monotonic()
        for number in range(cases):
            try:
                self.case()
            except (OSError, ssl.SSLError, Closed):
                # the server refused a new connection or dropped one mid-handshake: count it
                # and go on (the log check below tells whether the server is to blame)
                self.stats.codes["connect_failed"] += 1
                for role, conn in list(self.conns.items()):
                    if conn is not None:
                        self.retire(role, conn)
            if progress is not None and number % 1000 == 999:
                progress.put(1000)
        for role, conn in list(self.conns.items()):
            if conn is not None:
                conn.send(p.encode(p.Goodbye(reason="fuzz over")), closing=True)
                self.retire(role, conn)
        self.stats.elapsed = time.monotonic() - started
        return self.stats


def client_main(target: Target, seed: int, cases: int, code: bytes, progress: Any) -> ClientStats:
    return Client(target, seed, code).run(cases, progress)


# ---- the server and the honest project ----------------------------------------------------------


@dataclass
class ServerRun:
    proc: subprocess.Popen[str]
    host: str
    port: int
    state_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def start_server(directory: Path, heartbeat: float) -> ServerRun:
    state_dir = directory / "state"
    log_path = directory / "server.log"
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dcproto.server.main",
                "--port",
                "0",
                "--state-dir",
                str(state_dir),
                "--heartbeat",
                str(heartbeat),
                "--log-level",
                "INFO",
            ],
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        if BANNER in line:
            host, _, port = line.split(BANNER, 1)[1].strip().rpartition(":")
            return ServerRun(proc, host, int(port), state_dir, log_path)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log_path.read_text()}")


def honest_project(run: ServerRun, fingerprint: str, directory: Path, timeout: float) -> str:
    """Run a project on a real worker process; 'exact' or what went wrong."""
    os.environ["DCPROTO_CONFIG_DIR"] = str(directory / "config")
    from dcproto import Distribute
    from dcproto.users import User, add_user

    store = TokenStore(run.state_dir)
    add_user(
        User(
            name="honest",
            host="127.0.0.1",
            port=run.port,
            token=store.add("honest-creator", "creator"),
            fingerprint=fingerprint,
        )
    )
    token_file = directory / "volunteer.token"
    token_file.write_text(store.add("volunteer", "worker") + "\n", encoding="utf-8")
    worker_log = directory / "worker.log"
    with open(worker_log, "wb") as log_file:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dcproto.worker.worker",
                "connect",
                f"127.0.0.1:{run.port}",
                "--token-file",
                str(token_file),
                "--fingerprint",
                fingerprint,
                "--slots",
                "2",
                "--name",
                "honest-worker",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,
        )
    try:

        @Distribute(user_name="honest", iterator=range(HONEST_ITEMS), task_size=3)
        class Honest:
            @staticmethod
            def parallel_func(x):
                return x * x - 3 * x + 7

        expected = {x: x * x - 3 * x + 7 for x in range(HONEST_ITEMS)}
        try:
            results = Honest().get_results(timeout=timeout)
        except Exception as exc:  # reported, not raised: the report is the point
            return f"FAILED: {type(exc).__name__}: {exc}"
        return "exact" if results == expected else f"WRONG: {len(results)} results"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)


def log_problems(text: str) -> tuple[int, list[str]]:
    lines = text.splitlines()
    tracebacks = sum("Traceback" in line for line in lines)
    errors = [line for line in lines if " ERROR " in line or " CRITICAL " in line]
    return tracebacks, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz_server", description=__doc__)
    parser.add_argument("--cases", type=int, default=100_000, help="cases to run in all")
    parser.add_argument("--clients", type=int, default=3, help="client processes")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first client")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="the server's --heartbeat")
    parser.add_argument("--honest-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--keep", type=Path, default=None, help="keep the state dir and logs here")
    args = parser.parse_args(argv)

    directory = Path(tempfile.mkdtemp(prefix="dcproto-fuzz-")) if args.keep is None else args.keep
    directory.mkdir(parents=True, exist_ok=True)
    run = start_server(directory, args.heartbeat)
    exit_code = 1
    try:
        from dcproto.server.statedir import read_record

        record = read_record(run.state_dir)
        assert record is not None and record.fingerprint is not None
        store = TokenStore(run.state_dir)
        target = Target(
            host="127.0.0.1",
            port=run.port,
            fingerprint=record.fingerprint,
            tokens={
                "creator": store.add("fuzz-creator", "creator"),
                "worker": store.add("fuzz-worker", "worker"),
            },
        )
        from dcproto.creator.creator import pickle_class

        code = pickle_class(_Times3, [])
        shares = [
            args.cases // args.clients + (i < args.cases % args.clients)
            for i in range(args.clients)
        ]
        print(
            f"fuzzing {run.host}:{run.port} with {args.cases} cases from {args.clients} client "
            f"processes (seeds {args.seed}..{args.seed + args.clients - 1})",
            flush=True,
        )
        context = multiprocessing.get_context("spawn")
        manager = context.Manager()
        progress = manager.Queue()
        started = time.monotonic()
        with context.Pool(args.clients) as pool:
            pending = pool.starmap_async(
                client_main,
                [(target, args.seed + i, share, code, progress) for i, share in enumerate(shares)],
            )
            done = 0
            while not pending.ready():
                with contextlib.suppress(queue.Empty):
                    done += progress.get(timeout=1)
                    if done % 10_000 == 0:
                        rate = done / (time.monotonic() - started)
                        print(f"  {done} cases ({rate:.0f}/s)", flush=True)
            results: list[ClientStats] = pending.get()
        elapsed = time.monotonic() - started
        manager.shutdown()

        total = ClientStats()
        for stats in results:
            total.cases += stats.cases
            total.connections += stats.connections
            total.codes.update(stats.codes)
            total.silent_closes += stats.silent_closes
            total.silent_samples += stats.silent_samples
            total.resets += stats.resets
            total.own_closes += stats.own_closes
            total.bad_frames += stats.bad_frames
            total.unanswered_barriers += stats.unanswered_barriers
        alive_after_fuzz = run.proc.poll() is None
        honest_started = time.monotonic()
        honest = (
            honest_project(run, record.fingerprint, directory, args.honest_timeout)
            if alive_after_fuzz
            else "not run: the server died"
        )
        honest_took = time.monotonic() - honest_started
        alive = run.proc.poll() is None
        stop_code = None
        if alive:
            run.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                stop_code = run.proc.wait(timeout=30)
        tracebacks, errors = log_problems(run.log())
        warnings = sum(" WARNING " in line for line in run.log().splitlines())

        print()
        print("dcproto live fuzz report")
        rate = total.cases / elapsed
        print(f"  cases run:            {total.cases} in {elapsed:.1f} s ({rate:.0f}/s)")
        print(f"  connections:          {total.connections}")
        print("  closes by error code:")
        for code_name, count in total.codes.most_common():
            print(f"    {code_name:<22}{count}")
        print("  closes without an Error frame:")
        print(f"    by the server (FIN), unexplained:  {total.silent_closes}")
        for sample in total.silent_samples[:5]:
            print(f"      {sample}")
        print(f"    resets after we wrote to a closed connection: {total.resets}")
        print(f"    after our own Goodbye or Error:    {total.own_closes}")
        print(f"  undecodable frames from the server: {total.bad_frames}")
        print(f"  barriers left unanswered:           {total.unanswered_barriers}")
        print(
            f"  server log: {tracebacks} Tracebacks, {len(errors)} ERROR lines, "
            f"{warnings} WARNING lines ({run.log_path})"
        )
        for line in errors[:10]:
            print(f"    {line}")
        print(f"  server alive after the fuzz: {'yes' if alive_after_fuzz else 'NO'}")
        print(
            f"  honest project ({HONEST_ITEMS} items, real worker): {honest} ({honest_took:.1f} s)"
        )
        print(f"  server stopped by SIGTERM with exit code {stop_code}")
        ok = (
            total.cases >= args.cases
            and tracebacks == 0
            and not errors
            and total.bad_frames == 0
            and total.unanswered_barriers == 0
            and total.silent_closes == 0
            and alive_after_fuzz
            and honest == "exact"
            and stop_code == 0
        )
        print(f"  verdict: {'PASS' if ok else 'FAIL'}")
        exit_code = 0 if ok else 1
    finally:
        if run.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGKILL)
        if args.keep is None and exit_code == 0:
            shutil.rmtree(directory, ignore_errors=True)
        elif exit_code != 0:
            print(f"  state dir and logs kept in {directory}")
    return exit_code


class _Times3:
    @staticmethod
    def parallel_func(x: int) -> int:
        return x * 3


if __name__ == "__main__":
    sys.exit(main())
