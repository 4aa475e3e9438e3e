"""Tests for dcproto.protocol: framing, message codec, decoder and connection state machine."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcproto import protocol as p
from dcproto.errors import (
    DcprotoError,
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from dcproto.protocol import (
    DEFAULT_MAX_FRAME,
    HANDSHAKE_MAX_FRAME,
    HEADER,
    PROTOCOL_VERSION,
    Abandon,
    Accepted,
    Attach,
    Attached,
    Cancel,
    Challenge,
    Connection,
    Credit,
    Decoder,
    End,
    Error,
    Finished,
    Goodbye,
    Heartbeat,
    Hello,
    ListProjects,
    ListWorkers,
    Message,
    More,
    Notice,
    Project,
    ProjectList,
    Recall,
    Reject,
    Release,
    Result,
    ServerInfo,
    ServerInfoReply,
    State,
    Submit,
    Task,
    TaskDone,
    Tasks,
    Welcome,
    WorkerList,
    WorkerState,
    decode,
    encode,
)
from dcproto.trust.tokens import (
    client_key,
    make_proof,
    new_token,
    parse_token,
    stored_key,
    verify_proof,
)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = new_token("alice")
CHANNEL = b"\x01" * 32  # what a TLS session binds the proof to
NONCE = bytes(range(32))

# ---- helpers ---------------------------------------------------------------------------------


def frame(value: Any) -> bytes:
    """A frame around the msgpack encoding of ``value`` (bypassing encode's checks)."""
    body = msgpack.packb(value, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def raw_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def wire(message: Message) -> list[Any]:
    """The array a message is sent as, as a mutable list."""
    return [message.TYPE, *(getattr(message, name) for name, _, _ in p.SCHEMA[type(message)])]


def decode_frames(data: bytes) -> list[Message]:
    decoder = Decoder()
    return [decode(body) for body in decoder.feed(data)]


def hello(role: str = "worker", **changes: Any) -> Hello:
    fields = dict(
        version=PROTOCOL_VERSION,
        role=role,
        identity="alice",
        proof=make_proof(TOKEN, nonce=NONCE, role=role, channel=CHANNEL)[1],
        device_id=None,
        name="host-1",
        slots=4 if role == "worker" else 0,
    )
    fields.update(changes)
    return Hello(**fields)


def challenge(**changes: Any) -> Challenge:
    fields = dict(version=PROTOCOL_VERSION, nonce=NONCE, max_frame=DEFAULT_MAX_FRAME)
    fields.update(changes)
    return Challenge(**fields)


def welcome(**changes: Any) -> Welcome:
    fields = dict(device_id="dev-1", heartbeat_interval=5.0, max_frame=DEFAULT_MAX_FRAME)
    fields.update(changes)
    return Welcome(**fields)


def result(**changes: Any) -> Result:
    fields = dict(
        task_id=7,
        attempt=1,
        outcome="ok",
        payload=b"\x80\x04pairs",
        n_items=3,
        n_kept=2,
        error=None,
        stats={"run": 0.5, "exec": 0.25},
        files=[["out.txt", b"data"]],
        credit=1,
    )
    fields.update(changes)
    return Result(**fields)


# One representative instance of every message type, with non-trivial values.
SAMPLES: dict[type[Message], Message] = {
    Challenge: challenge(),
    Hello: hello(device_id="dev-1"),
    Welcome: welcome(),
    Error: Error(code="bad_message", message="nope ✗"),
    Heartbeat: Heartbeat(),
    Goodbye: Goodbye(reason="shutting down"),
    Credit: Credit(credit=8),
    Project: Project(
        project_id="p-1",
        code=b"\x80\x05code\x00\xff",
        modules=["numpy", "os.path"],
        parallel="run",
        stop="done",
        only_if=None,
        options={"lease_timeout": 30.0, "task_timeout": None, "nested": {"a": [1, 2]}},
        owner="alice",
    ),
    Reject: Reject(project_id="p-1", reason="No module named 'numpy'"),
    Task: Task(task_id=2**40, project_id="p-1", attempt=2, items=b"\x00" * 100),
    Result: result(),
    Abandon: Abandon(task_ids=[1, 2, 2**53]),
    Recall: Recall(task_ids=[3, 2**53]),
    WorkerState: WorkerState(paused=True, trust=["alice", "bob"], usage={"cpu_percent": 12.5}),
    ListWorkers: ListWorkers(ref=7),
    WorkerList: WorkerList(ref=7, workers=[{"name": "w1", "slots": 2, "paused": False}]),
    Submit: Submit(
        project_id="p-1",
        name="squares",
        code=b"\x80\x05code",
        modules=[],
        parallel="run",
        stop=None,
        only_if="keep",
        options={},
    ),
    Accepted: Accepted(project_id="p-1", credit=32),
    Tasks: Tasks(project_id="p-1", tasks=[[0, b"items0", 10], [1, b"", 0]]),
    End: End(project_id="p-1", total_tasks=2, total_items=10),
    More: More(project_id="p-1", credit=16, stored=40),
    TaskDone: TaskDone(
        project_id="p-1",
        seq=0,
        items=b"items0",
        payload=b"pairs",
        n_items=10,
        n_kept=10,
        files=[],
        stats={"worker": "host-1", "round_trip": 0.1},
    ),
    Finished: Finished(
        project_id="p-1",
        status="stopped",
        error=None,
        stop=[3, b"items3", b"payload"],
        stats={"tasks_done": 4, "per_worker": {"host-1": 4}},
    ),
    Cancel: Cancel(project_id="p-1"),
    Notice: Notice(project_id="p-1", level="warning", text="no worker can run it"),
    Attach: Attach(ref=7, project_id="p-1"),
    Attached: Attached(
        ref=7,
        project_id="p-1",
        status="running",
        stored=40,
        items_stored=400,
        ended=False,
        credit=8,
    ),
    Release: Release(project_id="p-1"),
    ListProjects: ListProjects(ref=9),
    ProjectList: ProjectList(ref=9, projects=[{"project_id": "p-1", "status": "done"}]),
    ServerInfo: ServerInfo(ref=11),
    ServerInfoReply: ServerInfoReply(
        ref=11, info={"version": "0.1.0", "uptime": 12.5, "fingerprint": None, "workers": 2}
    ),
}

# Variants that exercise the other side of "X | None" and int-for-float.
VARIANTS: list[Message] = [
    hello(device_id=None, role="creator", slots=0),
    welcome(heartbeat_interval=3),
    result(error={"message": "boom", "item": "3"}, outcome="error", payload=b"", credit=0),
    dataclasses.replace(SAMPLES[Project], stop=None, only_if="keep", modules=[]),
    Finished(project_id="p", status="failed", error={"reason": "crash"}, stop=None, stats={}),
    Tasks(project_id="p", tasks=[]),
    Abandon(task_ids=[]),
    Recall(task_ids=[]),
    WorkerState(paused=False, trust=[], usage={}),
    Error(code="", message=""),
    ServerInfoReply(ref=0, info={}),
]


class ConnectionPair:
    """A server and a client Connection wired back to back in memory (like h11's)."""

    def __init__(
        self,
        role: str = "worker",
        *,
        server_max: int = DEFAULT_MAX_FRAME,
        client_max: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.server = Connection("server", max_frame=server_max)
        self.client = Connection("client", role=role, max_frame=client_max)

    def peer(self, conn: Connection) -> Connection:
        return self.client if conn is self.server else self.server

    def send(self, conn: Connection, *messages: Message) -> list[Message]:
        """``conn`` sends ``messages``; returns what its peer received from them."""
        for message in messages:
            conn.send(message)
        return self.peer(conn).receive_data(conn.data_to_send())

    def deliver(self, conn: Connection) -> list[Message]:
        """Move whatever ``conn`` has queued (e.g. an Error frame) to its peer."""
        return self.peer(conn).receive_data(conn.data_to_send())

    def handshake(self, *, welcome_max: int | None = None, slots: int | None = None) -> None:
        server, client = self.server, self.client
        got = self.send(server, challenge(max_frame=server.max_frame))
        assert got == [challenge(max_frame=server.max_frame)]
        assert client.state is State.AWAIT_WELCOME
        assert client.role is not None
        proof = make_proof(TOKEN, nonce=got[0].nonce, role=self.client.role, channel=CHANNEL)[1]
        greeting = hello(self.client.role, proof=proof)
        if slots is not None:
            greeting = dataclasses.replace(greeting, slots=slots)
        (received,) = self.send(client, greeting)
        assert isinstance(received, Hello)
        assert _verifies(received)
        assert server.role == client.role
        assert server.state is State.AUTHENTICATING
        limit = server.max_frame if welcome_max is None else welcome_max
        assert self.send(server, welcome(max_frame=limit)) == [welcome(max_frame=limit)]
        assert server.state is State.READY
        assert client.state is State.READY


def ready_connection(side: str, role: str | None, state: State) -> Connection:
    """A connection brought (through its public API) into ``state``."""
    if side == "server":
        conn = Connection("server")
        if state in (State.AUTHENTICATING, State.READY):
            conn.receive_data(encode(hello(role or "worker")))
        if state is State.READY:
            conn.send(welcome())
    else:
        conn = Connection("client", role=role or "worker")
        if state in (State.AWAIT_WELCOME, State.READY):
            conn.receive_data(encode(challenge()))
        if state is State.READY:
            conn.receive_data(encode(welcome()))
    assert conn.state is state
    conn.data_to_send()
    return conn


def assert_failed(conn: Connection, code: str) -> Error:
    """``conn`` hit a protocol violation ``code``: it is closed with one Error frame queued."""
    assert conn.state is State.CLOSED
    assert conn.error is not None
    assert conn.error.code == code
    sent = decode_frames(conn.data_to_send())
    assert len(sent) == 1
    assert isinstance(sent[0], Error)
    assert sent[0].code == code
    assert sent[0].message == str(conn.error)
    return sent[0]


# ---- tables ----------------------------------------------------------------------------------


def test_samples_cover_every_message_type() -> None:
    assert set(SAMPLES) == set(p.MESSAGE_TYPES)
    assert all(type(message) is cls for cls, message in SAMPLES.items())


def test_type_numbers_are_unique_and_indexed() -> None:
    numbers = [cls.TYPE for cls in p.MESSAGE_TYPES]
    assert len(set(numbers)) == len(numbers)
    assert {cls.TYPE: cls for cls in p.MESSAGE_TYPES} == p.BY_TYPE


def test_schema_follows_dataclass_field_order() -> None:
    for cls in p.MESSAGE_TYPES:
        assert [name for name, _, _ in p.SCHEMA[cls]] == [f.name for f in dataclasses.fields(cls)]


def test_receive_table_only_names_known_types_and_every_type_is_receivable() -> None:
    receivable = set().union(*p.RECEIVE_TABLE.values())
    assert receivable == set(p.MESSAGE_TYPES)
    for side, role, _state in p.RECEIVE_TABLE:
        assert side in ("server", "client")
        assert role is None or role in p.ROLES


def test_messages_are_frozen_and_keyword_only() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLES[Credit].credit = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        Credit(3)  # type: ignore[misc]


def test_error_hierarchy() -> None:
    assert issubclass(FrameTooLarge, RemoteProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(ProtocolError, DcprotoError)
    assert RemoteProtocolError("x").code == "bad_message"


# ---- encode / decode -------------------------------------------------------------------------


@pytest.mark.parametrize("message", [*SAMPLES.values(), *VARIANTS], ids=repr)
def test_round_trip(message: Message) -> None:
    data = encode(message)
    (size,) = HEADER.unpack_from(data)
    assert size == len(data) - HEADER.size
    body = data[HEADER.size :]
    assert msgpack.unpackb(body, raw=False) == wire(message)
    decoded = decode(body)
    assert type(decoded) is type(message)
    assert decoded == message
    assert decode(memoryview(body)) == message


def test_exact_bytes_on_the_wire() -> None:
    assert encode(Credit(credit=3)) == b"\x00\x00\x00\x03\x92\x0a\x03"
    assert encode(Heartbeat()) == b"\x00\x00\x00\x02\x91\x05"
    # str travels as msgpack str (0xa1 = fixstr of 1), bytes as msgpack bin (0xc4 = bin 8)
    assert encode(Goodbye(reason="x")) == b"\x00\x00\x00\x04\x92\x06\xa1x"
    task = encode(Task(task_id=1, project_id="p", attempt=1, items=b"ab"))
    assert task == b"\x00\x00\x00\x0a\x95\x0d\x01\xa1p\x01\xc4\x02ab"
    # None is nil (0xc0)
    body = encode(Cancel(project_id="p"))[HEADER.size :]
    assert body == b"\x92\x1b\xa1p"
    # (a fixed proof: a random one may hold the byte 0xc0 itself)
    fixed = hello(device_id=None, proof=b"\x01" * 32)
    assert encode(fixed)[HEADER.size :].count(b"\xc0") == 1


def test_int_accepted_for_float_field_stays_int() -> None:
    decoded = decode(encode(welcome(heartbeat_interval=2))[HEADER.size :])
    assert decoded == welcome(heartbeat_interval=2)
    assert type(decoded.heartbeat_interval) is int  # type: ignore[attr-defined]


def test_extension_values_in_opaque_fields_are_passed_through() -> None:
    body = msgpack.packb(
        [26, "p", "done", None, None, {"t": [1, msgpack.ExtType(5, b"x")]}], use_bin_type=True
    )
    message = decode(body)
    assert isinstance(message, Finished)
    assert message.stats == {"t": [1, msgpack.ExtType(5, b"x")]}


@pytest.mark.parametrize(
    "body",
    [
        b"",  # empty
        b"\xc1",  # the one byte msgpack never uses
        b"\x93\x05",  # array of 3 with one element: truncated
        b"\xdd\xff\xff\xff\xff",  # array header announcing 4 billion elements
        b"\x91\x05\x00",  # a valid value followed by extra data
        b"\x92\x06\xa2\xff\xfe",  # str with invalid UTF-8
        msgpack.packb([26, "p", "done", None, None, {1: 2}]),  # int map key
        msgpack.packb([11, "p", b"", [], "f", None, None, {"a": {(1, 2): 3}}]),
    ],
    ids=[
        "empty",
        "never-used",
        "truncated",
        "huge-array",
        "extra-data",
        "bad-utf8",
        "int-key",
        "array-key",
    ],
)
def test_undecodable_bodies_are_bad_frame(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(body)
    assert info.value.code == "bad_frame"
    assert "undecodable msgpack" in str(info.value)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize(
    "value",
    [5, "hello", b"bin", None, 1.5, {"type": 5}, [], ["5"], [True], [1.0], [None, 1], [[5]]],
    ids=repr,
)
def test_bodies_that_are_not_arrays_starting_with_an_int(value: Any) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(msgpack.packb(value, use_bin_type=True))
    assert info.value.code == "bad_message"
    assert "array starting with a type number" in str(info.value)


@pytest.mark.parametrize("number", [0, 7, 9, 18, 19, 38, 255, -1, 2**64 - 1, -(2**63)])
def test_unknown_type_numbers(number: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(msgpack.packb([number, "x"]))
    assert info.value.code == "unknown_type"
    assert str(number) in str(info.value)


@pytest.mark.parametrize("cls", p.MESSAGE_TYPES, ids=lambda cls: cls.__name__)
def test_wrong_field_counts(cls: type[Message]) -> None:
    fields = wire(SAMPLES[cls])
    for value in (fields[:-1], [*fields, 0]):
        if len(value) == 0:
            continue
        with pytest.raises(RemoteProtocolError) as info:
            decode(msgpack.packb(value, use_bin_type=True))
        assert info.value.code == "bad_message"
        assert f"{cls.__name__} needs {len(fields) - 1} fields" in str(info.value)


def _bad_values(annotation: str) -> list[Any]:
    """Values of the wrong msgpack type for a field of ``annotation``."""
    candidates: list[Any] = [True, False, 1, -1, 1.5, "text", b"bin", None, [1], {"k": 1}]
    accepted = p._ANNOTATION_TYPES[annotation]  # what decode accepts at top level
    bad = []
    for value in candidates:
        if not isinstance(value, accepted) or (type(value) is bool and bool not in accepted):
            bad.append(value)
    element = p._ELEMENT_TYPES.get(annotation)
    if element is int:
        bad += [[1, True], [1, "2"], [1.0]]
    elif element is str:
        bad += [["a", b"b"], ["a", 1], [None]]
    return bad


WRONG_TYPES = [
    pytest.param(cls, name, value, id=f"{cls.__name__}.{name}={value!r}")
    for cls in p.MESSAGE_TYPES
    for name, annotation, _ in p.SCHEMA[cls]
    for value in _bad_values(annotation)
]


@pytest.mark.parametrize(("cls", "name", "value"), WRONG_TYPES)
def test_wrong_field_types_are_rejected_both_ways(
    cls: type[Message], name: str, value: Any
) -> None:
    fields = wire(SAMPLES[cls])
    index = [n for n, _, _ in p.SCHEMA[cls]].index(name) + 1
    fields[index] = value
    with pytest.raises(RemoteProtocolError) as info:
        decode(msgpack.packb(fields, use_bin_type=True))
    assert info.value.code == "bad_message"
    assert f"field {name!r} must be" in str(info.value)
    local = dataclasses.replace(SAMPLES[cls], **{name: value})
    with pytest.raises(LocalProtocolError, match=f"invalid {cls.__name__}"):
        encode(local)


@pytest.mark.parametrize("cls", p.MESSAGE_TYPES, ids=lambda cls: cls.__name__)
def test_the_fast_field_check_takes_every_valid_sample(cls: type[Message]) -> None:
    # the generated check must pass valid messages, or every frame would take the slow path
    assert p._FAST_CHECKS[cls](SAMPLES[cls])


@pytest.mark.parametrize(("cls", "name", "value"), WRONG_TYPES)
def test_the_fast_field_check_never_passes_a_wrong_type(
    cls: type[Message], name: str, value: Any
) -> None:
    assert not p._FAST_CHECKS[cls](dataclasses.replace(SAMPLES[cls], **{name: value}))


@pytest.mark.parametrize(
    "owner", ["bad owner", "-leading-dash", "x" * 65, "name\nnewline", "ümlaut"]
)
def test_a_project_whose_owner_is_no_token_name_is_refused(owner: str) -> None:
    """A worker keys its child processes by owner: only a token name (or "") may be one."""
    project = dataclasses.replace(SAMPLES[Project], owner=owner)
    fields = [getattr(project, field.name) for field in dataclasses.fields(project)]
    with pytest.raises(RemoteProtocolError, match="owner must be empty or a token name"):
        decode(msgpack.packb([Project.TYPE, *fields]))
    unknown = dataclasses.replace(project, owner="")
    assert decode(encode(unknown)[HEADER.size :]) == unknown


def test_some_wrong_types_explicitly() -> None:
    # the cases most likely to slip through a lax decoder
    cases = [
        [10, True],  # bool where int is expected
        [13, 1, "p", 1, "items"],  # str where bin is expected
        [12, b"p", "reason"],  # bin where str is expected
        [3, "dev", True, 10],  # bool where float is expected
        [10, 1.0],  # float where int is expected
        [15, [1, False]],  # bool inside list[int]
        [11, "p", b"", ["ok", 3], "f", None, None, {}, ""],  # int inside list[str]
        [14, 1, 1, "ok", b"", 0, 0, "err", {}, [], 0],  # str where map-or-nil expected
    ]
    for value in cases:
        with pytest.raises(RemoteProtocolError, match="must be"):
            decode(msgpack.packb(value, use_bin_type=True))


INVALID = [
    pytest.param(hello(role="admin"), "role must be one of", id="hello-role"),
    pytest.param(hello(slots=-1), r"'slots' must be in 0\.\.1024", id="hello-slots"),
    pytest.param(Credit(credit=0), r"'credit' must be in 1\.\.65536", id="credit-zero"),
    pytest.param(Credit(credit=-5), r"'credit' must be in 1\.\.65536", id="credit-negative"),
    pytest.param(result(outcome="OK"), "outcome must be one of", id="result-outcome"),
    pytest.param(result(credit=-1), r"'credit' must be in 0\.\.65536", id="result-credit"),
    pytest.param(result(files=["a"]), "each file must be", id="result-file-not-list"),
    pytest.param(result(files=[["a"]]), "each file must be", id="result-file-short"),
    pytest.param(result(files=[["a", b"", 1]]), "each file must be", id="result-file-long"),
    pytest.param(result(files=[[b"a", b""]]), "each file must be", id="result-file-name"),
    pytest.param(result(files=[["a", "data"]]), "each file must be", id="result-file-data"),
    pytest.param(Tasks(project_id="p", tasks=[5]), "each task must be", id="tasks-not-list"),
    pytest.param(Tasks(project_id="p", tasks=[[0, b""]]), "each task must be", id="tasks-short"),
    pytest.param(
        Tasks(project_id="p", tasks=[[0, b"", 1, 2]]), "each task must be", id="tasks-long"
    ),
    pytest.param(Tasks(project_id="p", tasks=[["0", b"", 1]]), "each task must be", id="tasks-seq"),
    pytest.param(
        Tasks(project_id="p", tasks=[[True, b"", 1]]), "each task must be", id="tasks-seq-bool"
    ),
    pytest.param(
        Tasks(project_id="p", tasks=[[0, "items", 1]]), "each task must be", id="tasks-items"
    ),
    pytest.param(
        Tasks(project_id="p", tasks=[[0, b"", 1.0]]), "each task must be", id="tasks-n-items"
    ),
    pytest.param(
        Tasks(project_id="p", tasks=[[0, b"", 1], [1, b"", False]]),
        "each task must be",
        id="tasks-second-bad",
    ),
    pytest.param(
        dataclasses.replace(SAMPLES[TaskDone], files=[["a", None]]),
        "each file must be",
        id="taskdone-file",
    ),
    pytest.param(
        dataclasses.replace(SAMPLES[Finished], status="ok"),
        "status must be one of",
        id="finished-status",
    ),
]


@pytest.mark.parametrize(("message", "match"), INVALID)
def test_validation_rules_on_decode(message: Message, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode(msgpack.packb(wire(message), use_bin_type=True))
    assert info.value.code == "bad_message"
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(("message", "match"), INVALID)
def test_validation_rules_on_encode(message: Message, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match) as info:
        encode(message)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(
    "message",
    [
        hello(slots=0),
        Credit(credit=1),
        result(credit=0, files=[]),
        *(result(outcome=outcome) for outcome in p.RESULT_OUTCOMES),
        *(dataclasses.replace(SAMPLES[Finished], status=s) for s in p.PROJECT_STATUSES),
        *(hello(role=role) for role in p.ROLES),
    ],
    ids=repr,
)
def test_validation_boundaries_accepted(message: Message) -> None:
    assert decode(encode(message)[HEADER.size :]) == message


def test_encode_type_error_is_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError, match="field 'items' must be bytes") as info:
        encode(Task(task_id=1, project_id="p", attempt=1, items=bytearray(b"x")))  # type: ignore[arg-type]
    assert isinstance(info.value.__cause__, TypeError)


# ---- auth ------------------------------------------------------------------------------------


def _verifies(message: Hello, token: str = TOKEN, nonce: bytes = NONCE) -> bool:
    name, secret = parse_token(token)
    return verify_proof(
        stored_key(client_key(name, secret)),
        identity=message.identity,
        proof=message.proof,
        nonce=nonce,
        role=message.role,
        channel=CHANNEL,
    )


def test_hello_carries_a_proof_the_server_verifies() -> None:
    assert _verifies(hello())
    assert not _verifies(hello(), nonce=NONCE[::-1])
    assert not _verifies(hello(), token=new_token("alice"))


@pytest.mark.parametrize("identity", ["", "a b", "x" * 65, "-lead", "a.b"])
def test_hello_identity_must_be_a_token_name(identity: str) -> None:
    with pytest.raises(LocalProtocolError, match="identity"):
        encode(hello(identity=identity))


# ---- Decoder ---------------------------------------------------------------------------------

STREAM_MESSAGES = [
    SAMPLES[Heartbeat],
    SAMPLES[Project],
    SAMPLES[Result],
    SAMPLES[Tasks],
    SAMPLES[Finished],
]
STREAM = b"".join(encode(m) for m in STREAM_MESSAGES)


def test_decoder_byte_by_byte() -> None:
    decoder = Decoder()
    bodies: list[bytes] = []
    for index in range(len(STREAM)):
        bodies += decoder.feed(STREAM[index : index + 1])
    assert [decode(b) for b in bodies] == STREAM_MESSAGES
    assert decoder.buffered == 0


def test_decoder_all_at_once_and_empty_feeds() -> None:
    decoder = Decoder()
    assert decoder.feed(b"") == []
    bodies = decoder.feed(STREAM)
    assert [decode(b) for b in bodies] == STREAM_MESSAGES
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


def test_decoder_keeps_partial_frames() -> None:
    decoder = Decoder()
    data = encode(SAMPLES[Result])
    assert decoder.feed(data[:2]) == []
    assert decoder.buffered == 2
    assert decoder.feed(data[2:10]) == []
    assert decoder.buffered == 6  # the header was consumed; 6 body bytes wait
    assert decoder.feed(data[10:]) == [data[HEADER.size :]]
    assert decoder.buffered == 0


def test_decoder_zero_length_frame() -> None:
    decoder = Decoder()
    assert decoder.feed(HEADER.pack(0) * 3) == [b"", b"", b""]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_decoder_random_splits(data: st.DataObject) -> None:
    messages = data.draw(st.lists(st.sampled_from(list(SAMPLES.values())), min_size=1, max_size=6))
    stream = b"".join(encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = Decoder()
    bodies: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        bodies += decoder.feed(stream[start:cut])
        start = cut
    assert [decode(b) for b in bodies] == messages
    assert decoder.buffered == 0


def test_decoder_limit_checked_on_the_header_alone() -> None:
    decoder = Decoder(max_frame=1000)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(HEADER.pack(2**32 - 1))
    assert info.value.size == 2**32 - 1
    assert info.value.limit == 1000
    assert info.value.code == "too_large"
    assert decoder.buffered == 0


def test_decoder_limit_header_split_and_after_other_frames() -> None:
    decoder = Decoder(max_frame=1000)
    assert decoder.feed(HEADER.pack(1001)[:3]) == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(HEADER.pack(1001)[3:] + b"body bytes that never get buffered")
    assert decoder.buffered == 0


def test_decoder_limit_is_inclusive() -> None:
    decoder = Decoder(max_frame=10)
    assert decoder.feed(raw_frame(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(FrameTooLarge):
        decoder.feed(raw_frame(b"x" * 11))


def test_decoder_default_limit() -> None:
    assert Decoder().max_frame == DEFAULT_MAX_FRAME


# ---- Connection: construction and basic I/O --------------------------------------------------


def test_connection_initial_states() -> None:
    server = Connection("server")
    client = Connection("client", role="creator")
    assert server.state is State.AWAIT_HELLO
    assert client.state is State.AWAIT_CHALLENGE
    assert server.role is None
    assert server.error is None
    assert server.data_to_send() == b""
    assert server._decoder.max_frame == HANDSHAKE_MAX_FRAME


def test_connection_rejects_unknown_side() -> None:
    with pytest.raises(ValueError, match="side must be"):
        Connection("peer")


def test_data_to_send_drains_the_queue() -> None:
    server = Connection("server")
    server.send(challenge())
    server.send(SAMPLES[Error])
    data = server.data_to_send()
    assert decode_frames(data) == [challenge(), SAMPLES[Error]]
    assert server.data_to_send() == b""


def test_a_large_frame_is_queued_without_copying_its_body() -> None:
    pair = ConnectionPair("worker")
    pair.handshake()
    small = result(payload=b"s" * 10)
    large = result(payload=b"L" * (p.JOIN_LIMIT + 1))
    pair.client.send(small)
    pair.client.send(large)
    pair.client.send(small)
    chunks = pair.client.chunks_to_send()
    assert pair.client.chunks_to_send() == []
    # the small frame and the large frame's header in one piece (one TLS record), the large
    # body a piece of its own, then the last small frame
    body = len(encode(large)) - HEADER.size
    assert [len(c) for c in chunks] == [len(encode(small)) + HEADER.size, body, len(encode(small))]
    assert b"".join(chunks) == encode(small) + encode(large) + encode(small)
    assert pair.server.receive_data(b"".join(chunks)) == [small, large, small]


def test_small_frames_queued_in_a_row_go_out_as_one_piece() -> None:
    pair = ConnectionPair("worker")
    pair.handshake()
    answers = [result(task_id=i, payload=b"s" * 10) for i in range(1, 6)]
    for answer in answers:
        pair.client.send(answer)
    chunks = pair.client.chunks_to_send()
    assert len(chunks) == 1
    assert pair.server.receive_data(chunks[0]) == answers


# ---- Connection: conversations ---------------------------------------------------------------


def test_worker_conversation() -> None:
    pair = ConnectionPair("worker")
    pair.handshake()
    server, client = pair.server, pair.client
    assert server.role == "worker"

    assert pair.send(client, Credit(credit=2)) == [Credit(credit=2)]
    project = SAMPLES[Project]
    tasks = [Task(task_id=i, project_id="p-1", attempt=1, items=b"it") for i in (1, 2)]
    assert pair.send(server, project, *tasks) == [project, *tasks]
    answer = result(task_id=1, credit=1)
    assert pair.send(client, answer) == [answer]
    assert pair.send(server, Abandon(task_ids=[2])) == [Abandon(task_ids=[2])]
    abandoned = result(task_id=2, outcome="abandoned", payload=b"", n_kept=0, files=[])
    assert pair.send(client, abandoned, SAMPLES[Reject]) == [abandoned, SAMPLES[Reject]]
    assert pair.send(client, Heartbeat()) == [Heartbeat()]
    assert pair.send(server, Heartbeat()) == [Heartbeat()]

    assert pair.send(client, Goodbye(reason="bye")) == [Goodbye(reason="bye")]
    assert client.state is State.CLOSED
    assert server.state is State.CLOSED
    assert server.error is None
    assert client.error is None
    assert server.data_to_send() == b""  # a Goodbye is not answered


def test_creator_conversation() -> None:
    pair = ConnectionPair("creator")
    pair.handshake(slots=0)
    server, client = pair.server, pair.client
    assert server.role == "creator"

    submit = SAMPLES[Submit]
    assert pair.send(client, submit) == [submit]
    accepted = Accepted(project_id=submit.project_id, credit=2)
    assert pair.send(server, accepted) == [accepted]
    batch = Tasks(project_id="p-1", tasks=[[0, b"a", 1], [1, b"b", 1]])
    assert pair.send(client, batch) == [batch]
    more = More(project_id="p-1", credit=1, stored=1)
    assert pair.send(server, more) == [more]
    last = Tasks(project_id="p-1", tasks=[[2, b"c", 1]])
    end = End(project_id="p-1", total_tasks=3, total_items=3)
    assert pair.send(client, last, end) == [last, end]
    done = [dataclasses.replace(SAMPLES[TaskDone], seq=seq) for seq in (1, 0, 2)]
    notice = SAMPLES[Notice]
    finished = Finished(project_id="p-1", status="done", error=None, stop=None, stats={})
    assert pair.send(server, *done, notice, finished) == [*done, notice, finished]
    assert pair.send(client, Cancel(project_id="p-1")) == [Cancel(project_id="p-1")]
    assert pair.send(server, Heartbeat(), Goodbye(reason="server stopping")) == [
        Heartbeat(),
        Goodbye(reason="server stopping"),
    ]
    assert client.state is State.CLOSED
    assert server.state is State.CLOSED


def test_auth_failure_conversation() -> None:
    pair = ConnectionPair("worker")
    server, client = pair.server, pair.client
    (received,) = pair.send(server, challenge())
    other = new_token("alice")
    bad = hello(proof=make_proof(other, nonce=received.nonce, role="worker", channel=CHANNEL)[1])  # type: ignore[attr-defined]
    (got,) = pair.send(client, bad)
    assert not _verifies(got)  # type: ignore[arg-type]
    refusal = Error(code="auth_failed", message="wrong secret")
    assert pair.send(server, refusal) == [refusal]
    assert server.state is State.CLOSED
    assert client.state is State.CLOSED
    assert client.error is None  # an Error from the peer is not a protocol violation
    assert client.data_to_send() == b""  # and is never answered
    with pytest.raises(LocalProtocolError, match="connection closed"):
        client.send(Goodbye(reason="too late"))


def test_error_and_goodbye_close_in_every_handshake_state() -> None:
    for message in (Error(code="shutting_down", message=""), Goodbye(reason="")):
        for side, state in (
            ("server", State.AWAIT_HELLO),
            ("client", State.AWAIT_CHALLENGE),
            ("client", State.AWAIT_WELCOME),
        ):
            conn = ready_connection(side, None, state)
            assert conn.receive_data(encode(message)) == [message]
            assert conn.state is State.CLOSED
            assert conn.data_to_send() == b""


def test_frames_after_error_in_the_same_read_are_ignored() -> None:
    conn = ready_connection("client", "worker", State.READY)
    data = encode(Heartbeat()) + encode(SAMPLES[Error]) + encode(Heartbeat()) + raw_frame(b"\xc1")
    assert conn.receive_data(data) == [Heartbeat(), SAMPLES[Error]]
    assert conn.state is State.CLOSED
    assert conn.receive_data(encode(Heartbeat())) == []


def test_messages_before_a_violation_are_returned() -> None:
    pair = ConnectionPair("worker")
    pair.handshake()
    data = encode(Credit(credit=1)) + encode(SAMPLES[Submit]) + encode(Heartbeat())
    assert pair.server.receive_data(data) == [Credit(credit=1)]
    error = assert_failed(pair.server, "unexpected_message")
    assert "Submit is not allowed in state ready" in error.message
    # the Error frame reaches the client, which closes without answering
    pair.client.receive_data(encode(error))
    assert pair.client.state is State.CLOSED
    assert pair.client.data_to_send() == b""


def test_receive_after_close_is_ignored() -> None:
    server = Connection("server")
    server.receive_data(b"\x00\x00\x00\x01\xc1")
    assert_failed(server, "bad_frame")
    assert server.receive_data(encode(hello())) == []
    assert server.data_to_send() == b""


@pytest.mark.parametrize(
    ("side", "role", "state"),
    list(p.RECEIVE_TABLE),
    ids=lambda v: getattr(v, "value", v),
)
def test_receive_table_is_enforced(side: str, role: str | None, state: State) -> None:
    allowed = p.RECEIVE_TABLE[(side, role, state)]
    for cls, message in SAMPLES.items():
        conn = ready_connection(side, role, state)
        received = conn.receive_data(encode(message))
        if cls in allowed:
            assert received == [message], cls
            assert conn.error is None
        else:
            assert received == []
            error = assert_failed(conn, "unexpected_message")
            assert f"{cls.__name__} is not allowed in state {state.value}" in error.message


def test_client_without_role_accepts_nothing_when_ready() -> None:
    client = Connection("client")
    client.receive_data(encode(challenge()))
    client.receive_data(encode(welcome()))
    assert client.state is State.READY
    client.receive_data(encode(Heartbeat()))
    assert_failed(client, "unexpected_message")


def test_second_challenge_is_unexpected() -> None:
    client = Connection("client", role="worker")
    assert client.receive_data(encode(challenge()) + encode(challenge())) == [challenge()]
    assert_failed(client, "unexpected_message")


def test_hello_from_a_ready_client_is_unexpected() -> None:
    pair = ConnectionPair("creator")
    pair.handshake()
    pair.send(pair.client, hello("creator"))
    assert_failed(pair.server, "unexpected_message")


# ---- version mismatch ------------------------------------------------------------------------


def test_server_refuses_other_hello_version() -> None:
    pair = ConnectionPair("worker")
    pair.send(pair.server, challenge())
    assert pair.send(pair.client, hello(version=PROTOCOL_VERSION + 1)) == []
    error = assert_failed(pair.server, "version_mismatch")
    assert f"protocol version {PROTOCOL_VERSION + 1} is not supported" in error.message
    assert pair.server.role is None


def test_client_refuses_other_challenge_version() -> None:
    pair = ConnectionPair("creator")
    assert pair.send(pair.server, challenge(version=0)) == []
    assert pair.client.state is State.CLOSED
    error = assert_failed(pair.client, "version_mismatch")
    # the server reads the Error and closes too
    assert pair.server.receive_data(encode(error)) == [error]
    assert pair.server.state is State.CLOSED


# ---- sending ---------------------------------------------------------------------------------


def test_sending_after_close_raises() -> None:
    pair = ConnectionPair("worker")
    pair.handshake()
    pair.client.send(Goodbye(reason="done"))
    assert pair.client.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="cannot send Heartbeat: connection closed"):
        pair.client.send(Heartbeat())
    pair.deliver(pair.client)
    with pytest.raises(LocalProtocolError):
        pair.server.send(Heartbeat())


def test_sending_error_closes() -> None:
    server = Connection("server")
    server.send(Error(code="shutting_down", message="bye"))
    assert server.state is State.CLOSED
    assert decode_frames(server.data_to_send()) == [Error(code="shutting_down", message="bye")]
    with pytest.raises(LocalProtocolError):
        server.send(Error(code="shutting_down", message="again"))


def test_sending_after_a_protocol_violation_raises() -> None:
    client = Connection("client", role="worker")
    client.receive_data(b"\x00\x00\x00\x01\x05")
    assert_failed(client, "bad_message")
    with pytest.raises(LocalProtocolError):
        client.send(Heartbeat())


def test_sending_an_invalid_message_raises_and_changes_nothing() -> None:
    pair = ConnectionPair("worker")
    pair.handshake()
    with pytest.raises(LocalProtocolError, match="'credit' must be in 1"):
        pair.client.send(Credit(credit=0))
    with pytest.raises(LocalProtocolError, match="must be int"):
        pair.client.send(Credit(credit=True))
    assert pair.client.state is State.READY
    assert pair.client.data_to_send() == b""


def test_server_welcome_is_what_makes_it_ready() -> None:
    server = Connection("server")
    server.send(challenge())
    assert server.state is State.AWAIT_HELLO
    server.receive_data(encode(hello()))
    assert server.state is State.AUTHENTICATING
    server.send(welcome())
    assert server.state is State.READY


# ---- frame size limits -----------------------------------------------------------------------


def test_handshake_frames_are_limited() -> None:
    server = Connection("server")
    data = HEADER.pack(HANDSHAKE_MAX_FRAME + 1)  # e.g. a Hello with a huge name
    assert server.receive_data(data) == []
    error = assert_failed(server, "too_large")
    assert str(HANDSHAKE_MAX_FRAME) in error.message
    assert server._decoder.buffered == 0

    client = Connection("client", role="worker")
    client.receive_data(HEADER.pack(HANDSHAKE_MAX_FRAME + 1))
    assert_failed(client, "too_large")


def test_huge_announced_frame_costs_nothing() -> None:
    pair = ConnectionPair("worker")
    pair.handshake()
    assert pair.server.receive_data(HEADER.pack(2**32 - 1)) == []
    assert pair.server._decoder.buffered == 0
    assert isinstance(pair.server.error, FrameTooLarge)
    assert_failed(pair.server, "too_large")


@pytest.mark.parametrize(
    ("server_max", "client_max", "welcome_max", "expected"),
    [
        (100_000, 500_000, None, 100_000),  # the server's smaller limit wins
        (500_000, 100_000, None, 100_000),  # the client's smaller limit wins
        (500_000, 500_000, 200_000, 200_000),  # a smaller Welcome.max_frame wins
        (300_000, 500_000, 400_000, 300_000),  # a larger Welcome does not raise it back
    ],
)
def test_max_frame_negotiation(
    server_max: int, client_max: int, welcome_max: int | None, expected: int
) -> None:
    pair = ConnectionPair("worker", server_max=server_max, client_max=client_max)
    pair.handshake(welcome_max=welcome_max)
    client = pair.client
    assert client.max_frame == expected
    assert client._decoder.max_frame == expected
    assert pair.server._decoder.max_frame == server_max

    # the client refuses to send a frame over the negotiated size, and queues nothing
    overhead = len(encode(result(payload=b"")))
    fits = result(payload=b"x" * (expected - (overhead - HEADER.size) - 5))
    assert len(encode(fits)) - HEADER.size <= expected
    too_big = result(payload=b"x" * expected)
    with pytest.raises(LocalProtocolError, match=f"exceeds the frame limit of {expected}"):
        client.send(too_big)
    assert client.data_to_send() == b""
    assert client.state is State.READY
    assert pair.send(client, fits) == [fits]

    # and the client refuses to receive one
    big = Task(task_id=1, project_id="p", attempt=1, items=b"x" * expected)
    assert client.receive_data(encode(big)[: HEADER.size]) == []
    assert_failed(client, "too_large")


def test_send_limit_counts_the_body_only() -> None:
    conn = ready_connection("server", "worker", State.READY)
    message = Task(task_id=1, project_id="p", attempt=1, items=b"")
    body = len(encode(message)) - HEADER.size
    conn.max_frame = body
    conn.send(message)  # exactly at the limit: allowed
    conn.max_frame = body - 1
    with pytest.raises(LocalProtocolError):
        conn.send(message)


def test_frame_at_the_negotiated_limit_is_received() -> None:
    pair = ConnectionPair("worker", server_max=HANDSHAKE_MAX_FRAME * 4)
    pair.handshake()
    items = b"x" * (HANDSHAKE_MAX_FRAME * 2)
    task = Task(task_id=1, project_id="p", attempt=1, items=items)
    assert pair.send(pair.server, task) == [task]  # larger than the handshake limit: fine now


# ---- fuzzing ---------------------------------------------------------------------------------


def _assert_robust(conn: Connection, data: bytes, splits: list[int]) -> None:
    cuts = sorted({min(s, len(data)) for s in splits})
    start = 0
    for cut in [*cuts, len(data)]:
        messages = conn.receive_data(data[start:cut])  # must never raise
        assert all(isinstance(m, Message) for m in messages)
        start = cut
    if conn.error is not None:
        assert conn.state is State.CLOSED
        sent = decode_frames(conn.data_to_send())
        assert sent == [Error(code=conn.error.code, message=str(conn.error))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=4))
def test_fuzz_arbitrary_bytes_into_server(data: bytes, splits: list[int]) -> None:
    _assert_robust(Connection("server"), data, splits)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=12,
)
type_numbers = st.sampled_from([cls.TYPE for cls in p.MESSAGE_TYPES]) | st.integers(-2, 40)
bodies = st.tuples(type_numbers, st.lists(msgpack_values, max_size=11)).map(lambda t: [t[0], *t[1]])
# frames that decode to arrays starting with a type number, plus well-formed messages
framed = st.one_of(
    bodies.map(frame),
    st.sampled_from([encode(m) for m in [*SAMPLES.values(), *VARIANTS]]),
    st.binary(max_size=20).map(raw_frame),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(list(p.RECEIVE_TABLE)),
    st.lists(framed, min_size=1, max_size=5),
    st.lists(st.integers(0, 400), max_size=3),
)
def test_fuzz_structured_frames(
    key: tuple[str, str | None, State], frames: list[bytes], splits: list[int]
) -> None:
    conn = ready_connection(*key)
    _assert_robust(conn, b"".join(frames), splits)


# ---- internal guards -------------------------------------------------------------------------


def test_fail_on_a_closed_connection_queues_no_second_error() -> None:
    # Not reachable through receive_data (it stops at CLOSED); the guard is defensive.
    conn = ready_connection("server", "worker", State.READY)
    conn.send(Goodbye(reason="bye"))
    conn.data_to_send()
    conn._fail(RemoteProtocolError("late"))
    assert conn.error is not None
    assert conn.data_to_send() == b""


# ---- regressions: bugs found by review, fixed in protocol.py ----------------------------------


def test_messages_before_an_oversize_header_are_returned() -> None:
    conn = ready_connection("server", "worker", State.READY)
    assert conn.receive_data(encode(Heartbeat()) + HEADER.pack(2**32 - 1)) == [Heartbeat()]


def test_large_frame_in_the_same_read_as_welcome() -> None:
    client = ready_connection("client", "creator", State.AWAIT_WELCOME)
    big = TaskDone(
        project_id="p",
        seq=0,
        items=b"",
        payload=b"x" * (HANDSHAKE_MAX_FRAME + 1),
        n_items=1,
        n_kept=1,
        files=[],
        stats={},
    )
    assert client.receive_data(encode(welcome()) + encode(big)) == [welcome(), big]


@pytest.mark.parametrize(
    "message",
    [
        Goodbye(reason="\ud800"),
        Credit(credit=2**64),
        dataclasses.replace(SAMPLES[Project], options={"x": object()}),
    ],
    ids=["surrogate", "int-overflow", "unpackable"],
)
def test_unencodable_values_raise_local_protocol_error(message: Message) -> None:
    with pytest.raises(LocalProtocolError):
        encode(message)


def test_encode_refuses_what_decode_refuses() -> None:
    message = dataclasses.replace(SAMPLES[Finished], stats={1: "x"})
    try:
        data = encode(message)
    except LocalProtocolError:
        return
    decode(data[HEADER.size :])


def test_second_hello_is_unexpected() -> None:
    server = Connection("server")
    server.receive_data(encode(hello("worker")) + encode(hello("creator")))
    assert server.error is not None
    assert server.error.code == "unexpected_message"


# ---- the doc ---------------------------------------------------------------------------------


def test_protocol_doc_is_up_to_date() -> None:
    script = ROOT / "docs" / "gen_protocol_tables.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_protocol_doc_check_detects_drift(tmp_path: Path) -> None:
    script = ROOT / "docs" / "gen_protocol_tables.py"
    stale = tmp_path / "protocol.md"
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    stale.write_text(text.replace("| 10 | [Credit]", "| 99 | [Credit]"), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script), "--check", "--doc", str(stale)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert "-| 99 | [Credit]" in proc.stdout
    assert "+| 10 | [Credit]" in proc.stdout
    proc = subprocess.run(
        [sys.executable, str(script), "--write", "--doc", str(stale)], cwd=ROOT, check=True
    )
    assert stale.read_text(encoding="utf-8") == text
