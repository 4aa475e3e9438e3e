"""Fuzzing with hypothesis: (a) the frame decoder alone, (b) a live ``dcproto-server`` process.

(a) ``protocol.decode`` on arbitrary bytes, on mutated valid frames of every message type and on
arbitrary msgpack arrays never raises anything but RemoteProtocolError, whatever it decodes
encodes again, and a :class:`protocol.Connection` in any state never raises on what it is fed.

(b) Against one real server, an authenticated raw creator and a raw worker (and, now and then,
a connection that has not said Hello) send hypothesis-generated frames: valid messages with
random in-range values (which keep the connection open and reach the scheduler and the store),
valid messages with fields replaced by random msgpack values (huge ints, nested maps, bytes),
arbitrary arrays with a valid or random type number, raw bytes, and oversized frame headers.
The server may close a connection (that is the answer to most bad frames), but it must never
crash, never send a frame that does not decode, never log a Traceback or an ERROR line; after
the run an honest project on a real worker finishes exactly.

Valid messages keep counts small (n_items, texts): the overflows that in-range but huge counts
and texts still cause are bugs of their own, each pinned by an xfail test in test_attacks.py.
``python -m bench.fuzz_server`` runs the same kind of live fuzz for 100,000 cases and more.
"""

from __future__ import annotations

import collections
import itertools
import pickle
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from conftest import ServerProcess, WorkerProcess, raw_socket
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_attacks import Peer, Times3, assert_honest_project_finishes, log_problems

from dcproto import protocol as p
from dcproto.creator.creator import pickle_class
from dcproto.errors import RemoteProtocolError
from dcproto.users import User

pytestmark = pytest.mark.timeout(300)

# ---- strategies ---------------------------------------------------------------------------------

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
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**63), 2**64 - 1))
leaves = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(),  # nan and inf included
    st.text(max_size=40),
    st.binary(max_size=40),
)
keys = st.one_of(
    st.text(max_size=12), st.text(max_size=12), st.integers(-5, 5), st.binary(max_size=4)
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(keys, inner, max_size=5),
    ),
    max_leaves=16,
)
# what valid messages carry in their maps: the same, with str keys only
str_values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=16,
)
str_maps = st.dictionaries(st.text(max_size=12), str_values, max_size=4)
type_numbers = st.one_of(
    st.sampled_from(sorted(p.BY_TYPE)), st.integers(-3, 300), st.sampled_from(EDGE_INTS)
)
PROJECT_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
project_ids = st.text(PROJECT_ID_ALPHABET, min_size=1, max_size=64)
small_texts = st.text(max_size=60)


def pack(value: Any) -> bytes:
    """A frame (header and body) holding ``value`` as msgpack."""
    body = msgpack.packb(value, use_bin_type=True)
    return p.HEADER.pack(len(body)) + body


def sample_messages() -> list[p.Message]:
    """A valid instance of every message type, both directions."""
    code = pickle_class(Times3, [])
    items = pickle.dumps([1, 2])
    payload = pickle.dumps({0: 3, 1: 6})
    return [
        p.Challenge(version=p.PROTOCOL_VERSION, nonce=b"n" * 32, max_frame=p.DEFAULT_MAX_FRAME),
        p.Hello(
            version=p.PROTOCOL_VERSION,
            role="worker",
            identity="name",
            proof=b"\1" * 32,
            device_id="d",
            name="host",
            slots=2,
        ),
        p.Welcome(device_id="d", heartbeat_interval=0.5, max_frame=p.DEFAULT_MAX_FRAME),
        p.Error(code="bad_message", message="no"),
        p.Heartbeat(),
        p.Goodbye(reason="bye"),
        p.Credit(credit=3),
        p.Project(
            project_id="pid",
            code=code,
            modules=["math"],
            parallel="parallel_func",
            stop=None,
            only_if=None,
            options={"lease_timeout": 30.0},
            owner="creator",
        ),
        p.Reject(project_id="pid", reason="missing"),
        p.Task(task_id=7, project_id="pid", attempt=1, items=items),
        p.Result(
            task_id=7,
            attempt=1,
            outcome="ok",
            payload=payload,
            n_items=2,
            n_kept=2,
            error=None,
            stats={"exec": 0.1, "nested": {"a": [1, {"b": 2}]}},
            files=[["plot.png", b"\x89PNG"]],
            credit=1,
        ),
        p.Abandon(task_ids=[1, 2, 3]),
        p.Recall(task_ids=[4, 5]),
        p.WorkerState(paused=False, trust=["alice"], usage={"cpu_percent": 1.0}),
        p.ListWorkers(ref=3),
        p.WorkerList(ref=3, workers=[{"name": "w"}]),
        p.Submit(
            project_id="pid",
            name="name",
            code=code,
            modules=[],
            parallel="parallel_func",
            stop="stop",
            only_if=None,
            options={"max_attempts": 2},
        ),
        p.Accepted(project_id="pid", credit=4),
        p.Tasks(project_id="pid", tasks=[[0, items, 2], [1, items, 2]]),
        p.End(project_id="pid", total_tasks=2, total_items=4),
        p.More(project_id="pid", credit=8, stored=2),
        p.TaskDone(
            project_id="pid",
            seq=0,
            items=items,
            payload=payload,
            n_items=2,
            n_kept=2,
            files=[],
            stats={"worker": "w"},
        ),
        p.Finished(
            project_id="pid", status="stopped", error=None, stop=[0, items, payload], stats={}
        ),
        p.Cancel(project_id="pid"),
        p.Notice(project_id="pid", level="info", text="hello"),
        p.Attach(ref=1, project_id="pid"),
        p.Attached(
            ref=1,
            project_id="pid",
            status="running",
            stored=1,
            items_stored=2,
            ended=False,
            credit=3,
        ),
        p.Release(project_id="pid"),
        p.ListProjects(ref=2),
        p.ProjectList(ref=2, projects=[{"project_id": "pid", "status": "done"}]),
        p.ServerInfo(ref=4),
        p.ServerInfoReply(ref=4, info={"version": "0.1.0", "uptime": 1.0}),
    ]


SAMPLES = sample_messages()
assert {type(m) for m in SAMPLES} == set(p.MESSAGE_TYPES)
SAMPLE_BODIES = [p.encode(m)[p.HEADER.size :] for m in SAMPLES]


def fields_of(message: p.Message) -> list[Any]:
    return [getattr(message, name) for name, _, _ in p.SCHEMA[type(message)]]


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A valid frame body with bytes flipped, inserted, deleted or cut off."""
    body = bytearray(draw(st.sampled_from(SAMPLE_BODIES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not body:
            body.append(draw(st.integers(0, 255)))
            continue
        at = draw(st.integers(0, len(body) - 1))
        if op == "flip":
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            body[at] = draw(st.integers(0, 255))
        elif op == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del body[at : at + draw(st.integers(1, 8))]
        else:
            del body[at:]
    return bytes(body)


@st.composite
def mutated_messages(draw: st.DrawFn) -> list[Any]:
    """A valid message's wire array with some of its fields replaced by random values."""
    message = draw(st.sampled_from(SAMPLES))
    fields = fields_of(message)
    for _ in range(draw(st.integers(1, 3))):
        if fields:
            fields[draw(st.integers(0, len(fields) - 1))] = draw(values)
    if draw(st.integers(0, 9)) == 0:  # now and then one field too many or too few
        fields = fields[:-1] if fields and draw(st.booleans()) else [*fields, draw(values)]
    return [message.TYPE, *fields]


random_arrays = st.builds(lambda t, rest: [t, *rest], type_numbers, st.lists(values, max_size=12))


# ---- (a) the decoder alone ----------------------------------------------------------------------


def decode_refuses_cleanly(body: bytes) -> p.Message | None:
    """Decode ``body``: a message (which must encode again) or None for a RemoteProtocolError;
    any other exception fails the test."""
    try:
        message = p.decode(body)
    except RemoteProtocolError as exc:
        assert exc.code, exc
        return None
    p.encode(message)  # what one side accepts, the other can send
    return message


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    decode_refuses_cleanly(data)


@settings(max_examples=600, deadline=None)
@given(mutated_bodies())
def test_decode_mutated_valid_frames(body: bytes) -> None:
    decode_refuses_cleanly(body)


@settings(max_examples=600, deadline=None)
@given(st.one_of(mutated_messages(), random_arrays, values))
def test_decode_arbitrary_msgpack(value: Any) -> None:
    decode_refuses_cleanly(pack(value)[p.HEADER.size :])


def test_decode_valid_frames_round_trip() -> None:
    for message, body in zip(SAMPLES, SAMPLE_BODIES, strict=True):
        assert p.decode(body) == message


def _connections() -> dict[str, Callable[[], p.Connection]]:
    """Connections in each state a peer can reach on its own."""

    def server_ready(role: str) -> Callable[[], p.Connection]:
        def make() -> p.Connection:
            conn = p.Connection("server")
            hello = SAMPLES[1]
            assert isinstance(hello, p.Hello)
            hello = p.Hello(
                **{**{n: getattr(hello, n) for n, _, _ in p.SCHEMA[p.Hello]}, "role": role}
            )
            assert conn.receive_data(p.encode(hello)) == [hello]
            conn.send(
                p.Welcome(device_id="d", heartbeat_interval=1.0, max_frame=p.DEFAULT_MAX_FRAME)
            )
            conn.data_to_send()
            assert conn.state is p.State.READY
            return conn

        return make

    def client_ready(role: str) -> Callable[[], p.Connection]:
        def make() -> p.Connection:
            conn = p.Connection("client", role=role)
            conn.receive_data(p.encode(SAMPLES[0]))
            conn.receive_data(p.encode(SAMPLES[2]))
            assert conn.state is p.State.READY
            return conn

        return make

    return {
        "server-await-hello": lambda: p.Connection("server"),
        "server-worker": server_ready("worker"),
        "server-creator": server_ready("creator"),
        "client-await-challenge": lambda: p.Connection("client", role="worker"),
        "client-worker": client_ready("worker"),
        "client-creator": client_ready("creator"),
    }


CONNECTIONS = _connections()


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """Frames (valid, mutated or random), sometimes a bare header, cut into random chunks."""
    frames = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.integers(0, 4))
        if kind == 0:
            frames.append(p.encode(draw(st.sampled_from(SAMPLES))))
        elif kind == 1:
            frames.append(pack(draw(st.one_of(mutated_messages(), random_arrays))))
        elif kind == 2:
            body = draw(mutated_bodies())
            frames.append(p.HEADER.pack(len(body)) + body)
        elif kind == 3:
            frames.append(p.HEADER.pack(draw(st.integers(0, 2**32 - 1))))
        else:
            frames.append(draw(st.binary(max_size=64)))
    data = b"".join(frames)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(CONNECTIONS)), streams())
def test_connection_never_raises_on_what_it_is_fed(state: str, chunks: list[bytes]) -> None:
    conn = CONNECTIONS[state]()
    for chunk in chunks:
        messages = conn.receive_data(chunk)
        for message in messages:
            p.encode(message)
    if conn.error is not None:  # refused: an Error frame is queued and the connection closed
        assert conn.state is p.State.CLOSED
        sent = [p.decode(body) for body in p.Decoder().feed(conn.data_to_send())]
        assert isinstance(sent[-1], p.Error) and sent[-1].code == conn.error.code


# ---- (b) a live server --------------------------------------------------------------------------

BARRIER_REFS = itertools.count(2**52)


class LiveFuzz:
    """An authenticated raw creator and a raw worker on one server, reconnected whenever the
    server closes them; each case is one frame or a few, on one of them (or on a connection that
    has not said Hello). After each case the creator asks an Attach of a reserved ref and waits
    for its Attached: the server is alive and has read what came before on that connection."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.tokens = {
            "creator": server.add_token("fuzz-creator", "creator"),
            "worker": server.add_token("fuzz-worker", "worker"),
        }
        self.peers: dict[str, Peer | None] = {"creator": None, "worker": None}
        self.cases = 0
        self.connections = 0
        self.codes: collections.Counter[str] = collections.Counter()
        self.project_ids: list[str] = ["fz-0"]
        self.task_ids: list[tuple[int, int]] = [(1, 1)]
        self.bad_frames: list[Exception] = []

    def peer(self, role: str) -> Peer:
        peer = self.peers[role]
        if peer is None or peer.closed.is_set():
            if peer is not None:
                self._retire(peer)
            peer = Peer(self.server, role, self.tokens[role], slots=4, name=f"fuzz-{role}")
            self.peers[role] = peer
            self.connections += 1
        return peer

    def _retire(self, peer: Peer) -> None:
        self._take(peer, peer.drain())
        peer.close()
        self.bad_frames += peer.bad_frames

    def _take(self, peer: Peer, messages: list[p.Message]) -> None:
        for message in messages:
            if isinstance(message, p.Error):
                self.codes[message.code] += 1
            elif isinstance(message, p.Task):
                self.task_ids = [*self.task_ids[-31:], (message.task_id, message.attempt)]
            elif isinstance(message, p.Project | p.Accepted):
                self.project_ids = [*self.project_ids[-31:], message.project_id]

    def run(self, where: str, frames: list[bytes]) -> None:
        self.cases += 1
        data = b"".join(frames)
        if where == "hello":
            self._before_hello(data)
        else:
            peer = self.peer(where)
            peer.send_raw(data)
            if where == "worker":
                time.sleep(0.01)
                self._take(peer, peer.drain())
        self._barrier()

    def _before_hello(self, data: bytes) -> None:
        with raw_socket(self.server) as sock:
            self.connections += 1
            sock.sendall(data)
            sock.settimeout(0.2)
            decoder = p.Decoder()
            try:
                while chunk := sock.recv(65536):
                    for body in decoder.feed(chunk):
                        message = p.decode(body)
                        if isinstance(message, p.Error):
                            self.codes[message.code] += 1
            except (TimeoutError, ConnectionResetError):
                pass

    def _barrier(self) -> None:
        for _ in range(2):  # the creator itself may have been closed by the case
            peer = self.peer("creator")
            ref = next(BARRIER_REFS)
            peer.send(p.Attach(ref=ref, project_id="fuzz-barrier"))
            messages, answered = peer.collect(
                lambda m, ref=ref: isinstance(m, p.Attached) and m.ref == ref, 15
            )
            self._take(peer, messages)
            if answered:
                return
            if not peer.closed.is_set():
                pytest.fail("the server stopped answering")
        pytest.fail("the creator connection keeps closing on a bare Attach")

    def close(self) -> None:
        for role, peer in self.peers.items():
            if peer is not None:
                self._retire(peer)
                self.peers[role] = None


@st.composite
def valid_messages(draw: st.DrawFn, where: str, fuzz: LiveFuzz) -> p.Message:
    """A valid message the server accepts from ``where``, with random in-range values and ids
    the server knows now and then."""
    if draw(st.integers(0, 2)):  # by index: what is drawn never depends on the server
        project_id = fuzz.project_ids[draw(st.integers(0, 31)) % len(fuzz.project_ids)]
    else:
        project_id = draw(project_ids)
    if where == "worker":
        kind = draw(st.sampled_from(["credit", "result", "result", "reject", "heartbeat", "state"]))
        if kind == "state":  # pause, resume, trust some creators (or none that exist)
            trust = st.lists(st.sampled_from(["creator", "admin", "nobody-here"]), max_size=2)
            return p.WorkerState(
                paused=draw(st.booleans()), trust=draw(trust), usage=draw(str_maps)
            )
        if kind == "credit":
            return p.Credit(credit=draw(st.integers(1, 64)))
        if kind == "reject":
            return p.Reject(project_id=project_id, reason=draw(small_texts))
        if kind == "heartbeat":
            return p.Heartbeat()
        if draw(st.booleans()):
            task_id, attempt = fuzz.task_ids[draw(st.integers(0, 31)) % len(fuzz.task_ids)]
        else:
            task_id, attempt = draw(st.tuples(st.integers(0, 50), st.integers(0, 3)))
        outcome = draw(st.sampled_from(p.RESULT_OUTCOMES))
        n_items = draw(st.integers(0, 1000))
        payload = draw(st.one_of(st.binary(max_size=64), st.just(pickle.dumps({0: 1}))))
        names = st.text("abcdefghij./", min_size=1, max_size=20)
        return p.Result(
            task_id=task_id,
            attempt=attempt,
            outcome=outcome,
            payload=payload,
            n_items=n_items,
            n_kept=draw(st.integers(0, n_items)),
            error=draw(st.one_of(st.none(), st.fixed_dictionaries({"message": small_texts}))),
            stats=draw(str_maps),
            files=draw(st.lists(st.tuples(names, st.binary(max_size=16)).map(list), max_size=3)),
            credit=draw(st.integers(0, 8)),
        )
    kind = draw(
        st.sampled_from(
            [
                "submit",
                "tasks",
                "tasks",
                "end",
                "cancel",
                "attach",
                "release",
                "list",
                "workers",
                "info",
                "beat",
            ]
        )
    )
    if kind == "submit":
        options = draw(
            st.dictionaries(
                st.sampled_from(
                    ["lease_timeout", "task_timeout", "max_attempts", "errors", "trust_workers"]
                ),
                st.one_of(str_values, st.floats(0.1, 100), st.integers(1, 5)),
                max_size=3,
            )
        )
        code = draw(st.one_of(st.binary(max_size=32), st.just(pickle_class(Times3, []))))
        return p.Submit(
            project_id=draw(project_ids),
            name=draw(st.text(max_size=30)),
            code=code,
            modules=draw(st.lists(st.sampled_from(["math", "json", "no_such_mod"]), max_size=2)),
            parallel="parallel_func",
            stop=draw(st.one_of(st.none(), st.just("parallel_func"))),
            only_if=None,
            options=options,
        )
    if kind == "tasks":
        items = st.one_of(st.binary(max_size=16), st.just(pickle.dumps([1, 2, 3])))
        entries = st.tuples(st.integers(0, 6), items, st.integers(0, 1000)).map(list)
        return p.Tasks(project_id=project_id, tasks=draw(st.lists(entries, max_size=4)))
    if kind == "end":
        return p.End(
            project_id=project_id,
            total_tasks=draw(st.integers(0, 8)),
            total_items=draw(st.integers(0, 1000)),
        )
    if kind == "cancel":
        return p.Cancel(project_id=project_id)
    if kind == "attach":
        return p.Attach(
            ref=draw(st.integers(0, 1000)), project_id=project_id, watch=draw(st.booleans())
        )
    if kind == "release":
        return p.Release(project_id=project_id)
    if kind == "list":
        return p.ListProjects(ref=draw(st.integers(0, 1000)))
    if kind == "workers":
        return p.ListWorkers(ref=draw(st.integers(0, 1000)))
    if kind == "info":
        return p.ServerInfo(ref=draw(st.integers(0, 1000)))
    return p.Heartbeat()


@st.composite
def live_frames(draw: st.DrawFn, where: str, fuzz: LiveFuzz) -> bytes:
    kind = draw(st.sampled_from(["valid", "valid", "mutated", "array", "bytes", "header"]))
    if kind == "valid" and where != "hello":
        return p.encode(draw(valid_messages(where, fuzz)))
    if kind in ("valid", "mutated"):
        return pack(draw(mutated_messages()))
    if kind == "array":
        return pack(draw(random_arrays))
    if kind == "bytes":
        body = draw(st.binary(max_size=256))
        return p.HEADER.pack(len(body)) + body
    return p.HEADER.pack(draw(st.integers(p.DEFAULT_MAX_FRAME + 1, 2**32 - 1))) + b"\0"


def test_live_server_survives_fuzzed_frames(
    server: ServerProcess,
    start_worker: Callable[..., WorkerProcess],
    user: User,
) -> None:
    fuzz = LiveFuzz(server)

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def one_case(data: st.DataObject) -> None:
        where = data.draw(st.sampled_from(["creator", "creator", "worker", "worker", "hello"]))
        count = data.draw(st.integers(1, 3))
        fuzz.run(where, [data.draw(live_frames(where, fuzz)) for _ in range(count)])
        assert server.alive()

    started = time.monotonic()
    try:
        one_case()
    finally:
        fuzz.close()
    elapsed = time.monotonic() - started
    print(
        f"live fuzz: {fuzz.cases} cases, {fuzz.connections} connections, "
        f"closes by code {dict(fuzz.codes)}, {elapsed:.1f} s"
    )
    assert fuzz.cases >= 200
    assert fuzz.bad_frames == [], "the server sent frames that do not decode"
    assert fuzz.codes, "no frame was refused: the fuzz did not reach the decoder"
    assert server.alive()
    assert log_problems(server) == []

    start_worker()
    assert_honest_project_finishes()
    assert log_problems(server) == []
