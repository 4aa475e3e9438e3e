"""Sans-I/O wire format of dcproto: message types, framing, incremental decoding, connection states.

Theory of operation
-------------------
A frame is a 4-byte big-endian unsigned length followed by that many bytes of msgpack. The msgpack
value is an array ``[type, field1, field2, ...]``: ``type`` is the small integer of a message type
and the fields follow in the order of that type's dataclass below. Nothing here owns a socket, a
task or a clock: :class:`Decoder` turns bytes into frames, :func:`encode` and :func:`decode` map
frames to the frozen message dataclasses, and :class:`Connection` tracks one connection's state
(which messages may arrive when) and buffers outgoing bytes so the I/O layer writes once per turn.

A misbehaving peer never makes :meth:`Connection.receive_data` raise: the connection records the
error, queues an :class:`Error` frame and moves to ``CLOSED``; the I/O layer sends what is queued
and closes. Sending an invalid message from local code raises :class:`LocalProtocolError`.
``docs/protocol.md`` is written from the tables in this module.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, cast, dataclass_transform

import msgpack

from .errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION = 6  # 2: creator-chosen ids, INITIAL_CREDIT; 3: tokens, TLS; 4: Recall;
# 5: Project.owner; 6: a payload may be a list of one value per item
HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
#: The handshake happens before the peer is authenticated, so it gets a much smaller limit.
HANDSHAKE_MAX_FRAME = 64 * 1024
JOIN_LIMIT = 64 * 1024  # frames up to this size are joined with their header before sending
MIN_MAX_FRAME = HANDSHAKE_MAX_FRAME  # a peer may not announce a smaller limit than this
MIN_NONCE = 16
#: A peer silent for this many heartbeat intervals is taken for gone, by either side.
SILENCE_FACTOR = 3
# tasks a creator may send right behind its Submit, so a project starts without a round trip
INITIAL_CREDIT = 32
PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a token's name
#: Every integer field is at most this unless INT_RANGES says otherwise: it fits a double, and
#: SQLite's signed 64-bit integers with room for any sum the server computes.
MAX_INT = 2**53
MAX_SLOTS = 1024  # tasks one worker runs at once
# tasks a worker may hold per slot beyond the one it runs: enough to keep a slot busy on
# one-item tasks across a round trip of a few hundred milliseconds
MAX_PREFETCH_PER_SLOT = 512
MAX_CREDIT = 1 << 16  # credit one message may grant
MAX_TASKS_PER_FRAME = 4096
MAX_TEXT = 4096  # names, reasons and messages
MAX_NAME = 200  # project, device and method names
MAX_MODULES = 256
MAX_FILES = 1000  # extra files of one task
MAX_TRUSTED = 256  # creators one worker may name in WorkerState.trust

ROLES = ("worker", "creator")
RESULT_OUTCOMES = (
    "ok",
    "stop",
    "error",
    "crash",
    "timeout",
    "abandoned",
    "load_error",
    # a cap the volunteer set was hit: failed attempts, retried elsewhere like a crash
    "memory",
    "cpu_time",
    "disk",
)
#: outcomes that are failed attempts (counted against max_attempts)
FAILED_ATTEMPTS = ("crash", "timeout", "memory", "cpu_time", "disk")
PROJECT_STATUSES = ("done", "stopped", "failed", "cancelled")
ERROR_POLICIES = ("raise", "skip")


# --------------------------------------------------------------------------------------------
# Messages. One frozen, keyword-only dataclass per type; ``TYPE`` is its number on the wire.
# --------------------------------------------------------------------------------------------


class Message:
    TYPE: ClassVar[int]

    def _validate(self) -> None:
        """Checks beyond field types; raises ValueError. Overridden where needed."""


_M = TypeVar("_M", bound=type)


@dataclass_transform(frozen_default=True, kw_only_default=True)
def _msg(cls: _M) -> _M:
    """A message class: a frozen, keyword-only dataclass with slots."""
    return dataclass(frozen=True, kw_only=True, slots=True)(cls)  # type: ignore[return-value]


@_msg
class Challenge(Message):
    """Server -> client, first frame on every connection."""

    TYPE = 1
    version: int
    nonce: bytes
    max_frame: int

    def _validate(self) -> None:
        if len(self.nonce) < MIN_NONCE:
            raise ValueError(f"nonce must be at least {MIN_NONCE} bytes")


@_msg
class Hello(Message):
    """Client -> server: who we are (a token's name) and the proof that we hold that token,
    over the server's nonce and certificate (see *Authentication*)."""

    TYPE = 2
    version: int
    role: str
    identity: str
    proof: bytes
    device_id: str | None
    name: str
    slots: int

    def _validate(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        if not IDENTITY.fullmatch(self.identity):
            raise ValueError("identity must be a token name (1 to 64 of A-Z a-z 0-9 _ -)")


@_msg
class Welcome(Message):
    """Server -> client: the handshake succeeded."""

    TYPE = 3
    device_id: str
    heartbeat_interval: float
    max_frame: int

    def _validate(self) -> None:
        if not math.isfinite(self.heartbeat_interval) or self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be a positive number")


@_msg
class Error(Message):
    """Either way: a fatal error; the sender closes the connection after it."""

    TYPE = 4
    code: str
    message: str


@_msg
class Heartbeat(Message):
    """Either way: liveness. Any frame counts as liveness; this one is sent when idle."""

    TYPE = 5


@_msg
class Goodbye(Message):
    """Either way: a clean close, with a reason for the logs."""

    TYPE = 6
    reason: str


@_msg
class Credit(Message):
    """Worker -> server: the worker can take ``credit`` more tasks."""

    TYPE = 10
    credit: int


@_msg
class WorkerState(Message):
    """Worker -> server: what the volunteer decided, and what the worker uses. ``paused``: give
    it no task until it says otherwise (it hands back what it has not started). ``trust``:
    the names of the creators (token names) whose projects it runs; empty for every creator.
    ``usage``: figures for the server's view of the worker (e.g. ``cpu_percent``,
    ``rss_bytes``, ``paused_by``); ignore unknown keys. Sent after Welcome when any differs
    from the default (not paused, trusting all), whenever they change, and with fresh usage
    figures a second after Welcome and every 10 s."""

    TYPE = 17
    paused: bool
    trust: list[str]
    usage: dict[str, Any]

    def _validate(self) -> None:
        if any(len(name) > MAX_NAME for name in self.trust):
            raise ValueError(f"a trusted creator's name is longer than {MAX_NAME} characters")


@_msg
class Project(Message):
    """Server -> worker: a project's code, sent once per worker before its first task.
    ``owner``: the token name of the creator that submitted it ("" when unknown); a worker
    runs the projects of one owner, and only of one, in the same child process."""

    TYPE = 11
    project_id: str
    code: bytes
    modules: list[str]
    parallel: str
    stop: str | None
    only_if: str | None
    options: dict[str, Any]
    owner: str

    def _validate(self) -> None:
        if self.owner and not IDENTITY.fullmatch(self.owner):
            raise ValueError("owner must be empty or a token name")


@_msg
class Reject(Message):
    """Worker -> server: this worker cannot run the project (e.g. a module is missing)."""

    TYPE = 12
    project_id: str
    reason: str


@_msg
class Task(Message):
    """Server -> worker: run the parallel function over ``items`` (opaque, pickled list)."""

    TYPE = 13
    task_id: int
    project_id: str
    attempt: int
    items: bytes


@_msg
class Result(Message):
    """Worker -> server: the outcome of one task attempt, and credit handed back."""

    TYPE = 14
    task_id: int
    attempt: int
    outcome: str
    payload: bytes
    n_items: int
    n_kept: int
    error: dict[str, Any] | None
    stats: dict[str, Any]
    files: list[Any]
    credit: int

    def _validate(self) -> None:
        if self.outcome not in RESULT_OUTCOMES:
            raise ValueError(f"outcome must be one of {RESULT_OUTCOMES}")
        if self.n_kept > self.n_items:
            raise ValueError("n_kept must be <= n_items")
        _check_files(self.files)


@_msg
class Abandon(Message):
    """Server -> worker: stop these tasks now; their results are no longer wanted."""

    TYPE = 15
    task_ids: list[int]


@_msg
class Recall(Message):
    """Server -> worker: give these tasks back if they have not started; a started one runs
    on and is answered as usual. A task given back is answered with outcome ``abandoned``."""

    TYPE = 16
    task_ids: list[int]


@_msg
class Submit(Message):
    """Creator -> server: a new project, under an id the creator chose. The creator may send
    up to ``INITIAL_CREDIT`` tasks right behind it, without waiting for :class:`Accepted`."""

    TYPE = 20
    project_id: str
    name: str
    code: bytes
    modules: list[str]
    parallel: str
    stop: str | None
    only_if: str | None
    options: dict[str, Any]

    def _validate(self) -> None:
        if not PROJECT_ID.fullmatch(self.project_id):
            raise ValueError("project_id must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-'")
        for module in self.modules:
            if not module or len(module) > MAX_NAME:
                raise ValueError(f"each module name must be 1 to {MAX_NAME} characters")


@_msg
class Accepted(Message):
    """Server -> creator: the project is registered (and stored); ``credit`` tasks more may
    be sent on top of the ``INITIAL_CREDIT`` the Submit came with."""

    TYPE = 21
    project_id: str
    credit: int


@_msg
class Tasks(Message):
    """Creator -> server: the next tasks, each ``[seq, items, n_items]`` (items opaque)."""

    TYPE = 22
    project_id: str
    tasks: list[Any]

    def _validate(self) -> None:
        for entry in self.tasks:
            if (
                not isinstance(entry, list)
                or len(entry) != 3
                or type(entry[0]) is not int
                or not isinstance(entry[1], bytes)
                or type(entry[2]) is not int
            ):
                raise ValueError("each task must be [seq:int, items:bin, n_items:int]")
            if not (0 <= entry[0] <= MAX_INT and 0 <= entry[2] <= MAX_INT):
                raise ValueError(f"a task's seq and n_items must be in 0..{MAX_INT}")


@_msg
class End(Message):
    """Creator -> server: the iterator is exhausted; no more tasks will come."""

    TYPE = 23
    project_id: str
    total_tasks: int
    total_items: int


@_msg
class More(Message):
    """Server -> creator: send up to ``credit`` more tasks (back-pressure). ``stored`` counts
    the project's tasks on disk (seqs ``0 .. stored-1``); the creator may forget those."""

    TYPE = 24
    project_id: str
    credit: int
    stored: int


@_msg
class TaskDone(Message):
    """Server -> creator: one task's kept results (the worker's opaque pickled dict, keyed by
    the item's index in the task), the task's items as the creator sent them, and its files."""

    TYPE = 25
    project_id: str
    seq: int
    items: bytes
    payload: bytes
    n_items: int
    n_kept: int
    files: list[Any]
    stats: dict[str, Any]

    def _validate(self) -> None:
        _check_files(self.files)


@_msg
class Finished(Message):
    """Server -> creator: the project ended. ``stop`` is ``[seq, items, payload]`` when
    stopped: the task's items as the creator sent them and the worker's payload."""

    TYPE = 26
    project_id: str
    status: str
    error: dict[str, Any] | None
    stop: list[Any] | None
    stats: dict[str, Any]

    def _validate(self) -> None:
        if self.status not in PROJECT_STATUSES:
            raise ValueError(f"status must be one of {PROJECT_STATUSES}")
        if self.stop is not None and (
            len(self.stop) != 3
            or type(self.stop[0]) is not int
            or not isinstance(self.stop[1], bytes)
            or not isinstance(self.stop[2], bytes)
        ):
            raise ValueError("stop must be [seq:int, items:bin, payload:bin] or nil")


@_msg
class Cancel(Message):
    """Creator -> server: cancel the project; running tasks are abandoned at once."""

    TYPE = 27
    project_id: str


@_msg
class Notice(Message):
    """Server -> creator: something the user should know (e.g. no worker can run it)."""

    TYPE = 28
    project_id: str
    level: str
    text: str


@_msg
class Attach(Message):
    """Creator -> server: re-attach to a project (after a reconnect, or from another process).
    The server answers with :class:`Attached`, then replays every stored result as TaskDone
    (a creator drops seqs it already has) and, if the project has ended, Finished.
    ``watch``: only follow the project (its results, Notices, Finished) without taking it
    over from the creator bound to it, which goes on feeding it and getting its results."""

    TYPE = 29
    ref: int
    project_id: str
    watch: bool = False


@_msg
class Attached(Message):
    """Server -> creator: the state of an attached project. ``status`` is ``running``, a
    Finished status, ``released`` (its results were already released), ``unknown``, or
    ``forbidden`` (it belongs to another creator: only its owner or an admin may attach).
    ``stored``/``items_stored`` count the tasks and items on disk: a creator still feeding
    resumes at seq ``stored``; ``ended`` tells whether End was stored."""

    TYPE = 30
    ref: int
    project_id: str
    status: str
    stored: int
    items_stored: int
    ended: bool
    credit: int


@_msg
class Release(Message):
    """Creator -> server: the creator keeps the results now; the server may drop its copy."""

    TYPE = 31
    project_id: str


@_msg
class ListProjects(Message):
    """Creator -> server: which projects the server knows that the caller may see (its own;
    an admin's: all)."""

    TYPE = 32
    ref: int


@_msg
class ProjectList(Message):
    """Server -> creator: one map per project (``project_id``, ``name``, ``status``, times,
    counts; ignore unknown keys)."""

    TYPE = 33
    ref: int
    projects: list[Any]


@_msg
class ListWorkers(Message):
    """Creator -> server: the connected workers. An admin sees every field; other tokens see
    each worker's name, slots, whether it is paused and how many tasks it holds."""

    TYPE = 34
    ref: int


@_msg
class WorkerList(Message):
    """Server -> creator: one map per connected worker (``name``, ``slots``, ``paused``,
    ``running``, ``held``, ``done``, ``last_seen``; for an admin also ``identity``,
    ``device_id``, ``trust``, ``usage``, ``rtt``, ``connected_for``; ignore unknown keys)."""

    TYPE = 35
    ref: int
    workers: list[Any]


@_msg
class ServerInfo(Message):
    """Creator -> server: about the server itself (``dcproto status``)."""

    TYPE = 36
    ref: int


@_msg
class ServerInfoReply(Message):
    """Server -> creator: one map about the server (``version``, ``protocol``, ``uptime``
    seconds, ``started_at`` and ``time`` by its wall clock, ``address``, ``tls``,
    ``fingerprint``, the caller's ``identity`` and ``role``, and counts: ``workers``,
    ``slots``, ``slots_busy``, ``creators``, ``projects_running`` (the caller's own unless an
    admin asks); ignore unknown keys)."""

    TYPE = 37
    ref: int
    info: dict[str, Any]


def _check_files(files: list[Any]) -> None:
    for entry in files:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], bytes)
        ):
            raise ValueError("each file must be [name:str, data:bin]")


MESSAGE_TYPES: tuple[type[Message], ...] = (
    Challenge,
    Hello,
    Welcome,
    Error,
    Heartbeat,
    Goodbye,
    Credit,
    Project,
    Reject,
    Task,
    Result,
    Abandon,
    Recall,
    WorkerState,
    Submit,
    Accepted,
    Tasks,
    End,
    More,
    TaskDone,
    Finished,
    Cancel,
    Notice,
    Attach,
    Attached,
    Release,
    ListProjects,
    ProjectList,
    ListWorkers,
    WorkerList,
    ServerInfo,
    ServerInfoReply,
)
BY_TYPE: dict[int, type[Message]] = {cls.TYPE: cls for cls in MESSAGE_TYPES}

_NONE = type(None)
# Annotation text -> accepted Python types after msgpack decoding. bool is excluded from int
# by an exact type check below, because msgpack keeps them apart and so do we.
_ANNOTATION_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "bool": (bool,),
    "float": (float, int),
    "str": (str,),
    "bytes": (bytes,),
    "str | None": (str, _NONE),
    "list[str]": (list,),
    "list[int]": (list,),
    "list[Any]": (list,),
    "list[Any] | None": (list, _NONE),
    "dict[str, Any]": (dict,),
    "dict[str, Any] | None": (dict, _NONE),
}
_ELEMENT_TYPES: dict[str, type] = {"list[str]": str, "list[int]": int}

#: Per message class: its fields as (name, annotation, accepted types).
SCHEMA: dict[type[Message], tuple[tuple[str, str, tuple[type, ...]], ...]] = {
    cls: tuple(
        (f.name, str(f.type), _ANNOTATION_TYPES[str(f.type)])
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]  # each is a dataclass
    )
    for cls in MESSAGE_TYPES
}


def encode(message: Message) -> bytes:
    """One frame (header + body) for ``message``. Raises LocalProtocolError if it is invalid."""
    body = _encode_body(message)
    return HEADER.pack(len(body)) + body


def _encode_body(message: Message) -> bytes:
    try:
        _check_fields(message)
        message._validate()
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"invalid {type(message).__name__}: {exc}") from exc
    try:
        body: bytes = msgpack.packb(
            [message.TYPE, *_FIELDS[type(message)](message)], use_bin_type=True
        )
    except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        raise LocalProtocolError(f"cannot encode {type(message).__name__}: {exc}") from exc
    return body


def decode(body: bytes | memoryview) -> Message:
    """The message in one frame body. Raises RemoteProtocolError if it is malformed."""
    try:
        value = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        reason = f"undecodable msgpack ({type(exc).__name__}: {exc})"
        raise RemoteProtocolError(reason, code="bad_frame") from exc
    if not isinstance(value, list) or not value or type(value[0]) is not int:
        raise RemoteProtocolError("a frame must be an array starting with a type number")
    cls = BY_TYPE.get(value[0])
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {value[0]}", code="unknown_type")
    schema = SCHEMA[cls]
    if len(value) != len(schema) + 1:
        raise RemoteProtocolError(
            f"{cls.__name__} needs {len(schema)} fields, got {len(value) - 1}"
        )
    message = cls(**dict(zip(_NAMES[cls], value[1:], strict=True)))
    try:
        _check_fields(message)
        message._validate()
    except (TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"invalid {cls.__name__}: {exc}") from exc
    return message


def _check_fields(message: Message) -> None:
    if not _FAST_CHECKS[type(message)](message):
        _check_fields_precisely(message)
    if not _LIMITS[type(message)](message):
        raise ValueError(_explain_limits(message))


def _check_fields_precisely(message: Message) -> None:
    """Raises TypeError naming the first bad field (or accepts what the fast check could not
    decide, such as a subclass of an accepted type)."""
    for name, annotation, accepted, element, may_hold_maps in _PLANS[type(message)]:
        item = getattr(message, name)
        if not isinstance(item, accepted) or (type(item) is bool and bool not in accepted):
            raise TypeError(f"field {name!r} must be {annotation}, not {type(item).__name__}")
        if element is not None:
            for entry in cast(list[Any], item):
                if type(entry) is not element:
                    raise TypeError(f"field {name!r} must be {annotation}")
        if may_hold_maps and item is not None and not _str_keys(item):
            raise TypeError(f"field {name!r}: every map key must be a str")


def _str_keys(value: Any, depth: int = 0) -> bool:
    """Whether every map inside ``value`` has str keys (what the receiving side accepts)."""
    if depth > 32:
        return False
    if isinstance(value, dict):
        for key, inner in value.items():
            if type(key) is not str:
                return False
            if isinstance(inner, _NESTED) and not _str_keys(inner, depth + 1):
                return False
    elif isinstance(value, _SEQUENCES):
        for inner in value:
            if isinstance(inner, _NESTED) and not _str_keys(inner, depth + 1):
                return False
    return True


_NESTED = (dict, list)
_SEQUENCES = (list, tuple)


#: Per message class, the checks of each field: (name, annotation, accepted types, element
#: type of a typed list, whether the field may hold maps whose keys must be checked).
_PLANS: dict[type[Message], list[tuple[str, str, tuple[type, ...], type | None, bool]]] = {
    cls: [
        (
            name,
            annotation,
            accepted,
            _ELEMENT_TYPES.get(annotation),
            "dict" in annotation or "Any" in annotation,
        )
        for name, annotation, accepted in schema
    ]
    for cls, schema in SCHEMA.items()
}


def _fast_check(cls: type[Message]) -> Callable[[Message], bool]:
    """A generated predicate: True when every field of a ``cls`` message has exactly an
    accepted type (and maps have str keys). False means "not sure": the precise check decides.
    Same rules as :func:`_check_fields_precisely`, in one expression and without loops over
    the plan: validation runs on every frame both ways."""
    terms: list[str] = []
    env: dict[str, Any] = {"_str_keys": _str_keys}
    for index, (name, _, accepted, element, may_hold_maps) in enumerate(_PLANS[cls]):
        env[f"T{index}"] = frozenset(accepted)
        term = f"type(m.{name}) in T{index}"
        if element is not None:
            env[f"E{index}"] = element
            term += f" and all(type(e) is E{index} for e in m.{name})"
        if may_hold_maps:
            term += f" and (m.{name} is None or _str_keys(m.{name}))"
        terms.append(f"({term})")
    source = f"def check(m):\n    return {' and '.join(terms) or 'True'}\n"
    exec(source, env)  # built from the field table above: no outside input reaches it
    check: Callable[[Message], bool] = env["check"]
    return check


_FAST_CHECKS = {cls: _fast_check(cls) for cls in MESSAGE_TYPES}


# ---- ranges and lengths ----------------------------------------------------------------------

#: (message, int field) -> inclusive range. Int fields not listed: 0 .. MAX_INT. The elements of
#: a ``list[int]`` field share its range.
INT_RANGES: dict[tuple[str, str], tuple[int, int]] = {
    ("Challenge", "version"): (0, 65535),
    ("Hello", "version"): (0, 65535),
    ("Challenge", "max_frame"): (MIN_MAX_FRAME, 2**31),
    ("Welcome", "max_frame"): (MIN_MAX_FRAME, 2**31),
    ("Hello", "slots"): (0, MAX_SLOTS),
    ("Credit", "credit"): (1, MAX_CREDIT),
    ("Result", "credit"): (0, MAX_CREDIT),
    ("Task", "attempt"): (0, 2**31),
    ("Result", "attempt"): (0, 2**31),
}
#: (message, str/bytes/list field) -> most characters, bytes or entries. Fields not listed are
#: bounded by the frame size only.
LENGTHS: dict[tuple[str, str], int] = {
    ("Challenge", "nonce"): 1024,
    ("Hello", "proof"): 64,
    ("Hello", "device_id"): 64,
    ("Hello", "name"): MAX_NAME,
    ("Welcome", "device_id"): 64,
    ("Error", "code"): 64,
    ("Error", "message"): MAX_TEXT,
    ("Goodbye", "reason"): MAX_TEXT,
    ("Project", "modules"): MAX_MODULES,
    ("Reject", "reason"): MAX_TEXT,
    ("Result", "files"): MAX_FILES,
    ("Abandon", "task_ids"): MAX_CREDIT,
    ("Recall", "task_ids"): MAX_CREDIT,
    ("WorkerState", "trust"): MAX_TRUSTED,
    ("Submit", "name"): MAX_NAME,
    ("Submit", "modules"): MAX_MODULES,
    ("Submit", "parallel"): MAX_NAME,
    ("Submit", "stop"): MAX_NAME,
    ("Submit", "only_if"): MAX_NAME,
    ("Tasks", "tasks"): MAX_TASKS_PER_FRAME,
    ("TaskDone", "files"): MAX_FILES,
    ("Notice", "level"): 32,
    ("Notice", "text"): MAX_TEXT,
}


def _int_range(cls: type[Message], name: str) -> tuple[int, int]:
    return INT_RANGES.get((cls.__name__, name), (0, MAX_INT))


def _limits_check(cls: type[Message]) -> Callable[[Message], bool]:
    """A generated predicate: True when every int field of a ``cls`` message is in its range
    and every limited field within its length. Runs after the type check, on every frame."""
    terms: list[str] = []
    for name, annotation, _ in SCHEMA[cls]:
        if annotation in ("int", "list[int]"):
            low, high = _int_range(cls, name)
            if annotation == "int":
                terms.append(f"{low} <= m.{name} <= {high}")
            else:
                terms.append(f"all({low} <= e <= {high} for e in m.{name})")
        limit = LENGTHS.get((cls.__name__, name))
        if limit is not None:
            optional = "None" in annotation
            term = f"len(m.{name}) <= {limit}"
            terms.append(f"(m.{name} is None or {term})" if optional else term)
    source = f"def check(m):\n    return {' and '.join(terms) or 'True'}\n"
    env: dict[str, Any] = {}
    exec(source, env)  # built from the tables above: no outside input reaches it
    check: Callable[[Message], bool] = env["check"]
    return check


def _explain_limits(message: Message) -> str:
    cls = type(message)
    for name, annotation, _ in SCHEMA[cls]:
        value = getattr(message, name)
        if annotation in ("int", "list[int]"):
            low, high = _int_range(cls, name)
            values = [value] if annotation == "int" else value
            if any(not low <= v <= high for v in values):
                return f"field {name!r} must be in {low}..{high}"
        limit = LENGTHS.get((cls.__name__, name))
        if limit is not None and value is not None and len(value) > limit:
            return f"field {name!r} is longer than {limit}"
    return "a field is out of range"


_LIMITS = {cls: _limits_check(cls) for cls in MESSAGE_TYPES}
_NAMES = {cls: tuple(name for name, _, _ in schema) for cls, schema in SCHEMA.items()}


def _field_getter(cls: type[Message]) -> Callable[[Message], tuple[Any, ...]]:
    names = _NAMES[cls]
    if not names:
        return lambda message: ()
    getter = operator.attrgetter(*names)
    if len(names) == 1:
        return lambda message: (getter(message),)
    return getter


_FIELDS = {cls: _field_getter(cls) for cls in MESSAGE_TYPES}


class Decoder:
    """Incremental frame splitter: ``feed(bytes)`` returns complete frame bodies.

    The length is checked against ``max_frame`` as soon as the 4-byte header is in, before any
    of the body is buffered, so a huge announced frame costs nothing.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._pos = 0  # start of the unread part of the buffer
        self._need: int | None = None  # body length of the frame being read
        self._pending: FrameTooLarge | None = None  # raised after the frames before it

    def append(self, data: bytes) -> None:
        """Buffer ``data`` without splitting it; take frames with :meth:`next_frame`."""
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete frame body, or None. Raises FrameTooLarge (and then keeps
        raising it: the stream cannot be resynchronised)."""
        if self._pending is not None:
            raise self._pending
        buffer = self._buffer
        available = len(buffer) - self._pos
        if self._need is None:
            if available < HEADER.size:
                return None
            (size,) = HEADER.unpack_from(buffer, self._pos)
            if size > self.max_frame:
                self._pending = FrameTooLarge(size, self.max_frame)
                self._buffer = bytearray()
                self._pos = 0
                raise self._pending
            self._pos += HEADER.size
            available -= HEADER.size
            self._need = size
        if available < self._need:
            self._compact()
            return None
        # one copy (a bytearray slice would make two); the view is gone before any resize
        body = bytes(memoryview(buffer)[self._pos : self._pos + self._need])
        self._pos += self._need
        self._need = None
        if self._pos == len(buffer):
            buffer.clear()
            self._pos = 0
        return body

    def _compact(self) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every frame body it completes. Raises FrameTooLarge, but only
        once the frames completed before the oversized one have been returned."""
        self.append(data)
        frames: list[bytes] = []
        while True:
            try:
                body = self.next_frame()
            except FrameTooLarge:
                if frames:
                    return frames  # the error is raised by the next call
                raise
            if body is None:
                return frames
            frames.append(body)

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._pos


# --------------------------------------------------------------------------------------------
# Connection states: which messages each side may receive in each state.
# --------------------------------------------------------------------------------------------


class State(enum.Enum):
    AWAIT_CHALLENGE = "await_challenge"  # client: connected, waiting for the server's nonce
    AWAIT_HELLO = "await_hello"  # server: challenge sent, waiting for the client's Hello
    AWAIT_WELCOME = "await_welcome"  # client: Hello sent, waiting for Welcome or Error
    AUTHENTICATING = "authenticating"  # server: Hello received, Welcome or Error not yet sent
    READY = "ready"
    CLOSED = "closed"


_ALWAYS = frozenset({Error, Goodbye, Heartbeat})
_WORKER_TO_SERVER = frozenset({Credit, Reject, Result, WorkerState}) | _ALWAYS
_CREATOR_TO_SERVER = (
    frozenset({Submit, Tasks, End, Cancel, Attach, Release, ListProjects, ListWorkers, ServerInfo})
    | _ALWAYS
)
_SERVER_TO_WORKER = frozenset({Project, Task, Abandon, Recall}) | _ALWAYS
_SERVER_TO_CREATOR = (
    frozenset(
        {
            Accepted,
            More,
            TaskDone,
            Finished,
            Notice,
            Attached,
            ProjectList,
            WorkerList,
            ServerInfoReply,
        }
    )
    | _ALWAYS
)

#: (our side, peer role or None before the handshake, state) -> messages we may receive.
RECEIVE_TABLE: dict[tuple[str, str | None, State], frozenset[type[Message]]] = {
    ("server", None, State.AWAIT_HELLO): frozenset({Hello, Error, Goodbye}),
    ("server", None, State.AUTHENTICATING): frozenset({Error, Goodbye}),
    ("server", "worker", State.READY): _WORKER_TO_SERVER,
    ("server", "creator", State.READY): _CREATOR_TO_SERVER,
    ("client", None, State.AWAIT_CHALLENGE): frozenset({Challenge, Error, Goodbye}),
    ("client", None, State.AWAIT_WELCOME): frozenset({Welcome, Error, Goodbye}),
    ("client", "worker", State.READY): _SERVER_TO_WORKER,
    ("client", "creator", State.READY): _SERVER_TO_CREATOR,
}

#: (state, message received or sent) -> next state. Pairs not listed leave the state as is.
TRANSITIONS: dict[tuple[State, type[Message]], State] = {
    (State.AWAIT_CHALLENGE, Challenge): State.AWAIT_WELCOME,  # the client answers with Hello
    (State.AWAIT_HELLO, Hello): State.AUTHENTICATING,  # a client must wait for Welcome
    (State.AUTHENTICATING, Welcome): State.READY,  # sent by the server once auth passed
    (State.AWAIT_WELCOME, Welcome): State.READY,
}


@dataclass(eq=False)
class Connection:
    """One connection's protocol state, for either side. Owns no socket.

    Feed received bytes to :meth:`receive_data`; queue messages with :meth:`send`; write what
    :meth:`data_to_send` returns. After ``state`` becomes CLOSED, write the rest and close.
    """

    side: str  # "server" or "client"
    role: str | None = None  # the client's role; a client sets it up front, a server on Hello
    max_frame: int = DEFAULT_MAX_FRAME
    state: State = field(init=False)
    error: RemoteProtocolError | None = field(default=None, init=False)
    _decoder: Decoder = field(init=False)
    _outgoing: list[bytes] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.side not in ("server", "client"):
            raise ValueError("side must be 'server' or 'client'")
        self.state = State.AWAIT_HELLO if self.side == "server" else State.AWAIT_CHALLENGE
        self._decoder = Decoder(HANDSHAKE_MAX_FRAME)

    # ---- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Message]:
        """Messages completed by ``data``. On a protocol violation: the messages before it,
        ``error`` set, an Error frame queued and state CLOSED."""
        if self.state is State.CLOSED:
            return []
        self._decoder.append(data)
        messages: list[Message] = []
        # One frame at a time: a message may change the state, and with it the size limit
        # that applies to the frames after it.
        while self._open():
            try:
                body = self._decoder.next_frame()
                if body is None:
                    break
                message = decode(body)
                self._check_receivable(message)
            except RemoteProtocolError as exc:
                self._fail(exc)
                break
            messages.append(message)
            self._after(message)
        return messages

    def _open(self) -> bool:
        """Not closed (a method: each message handled may close the connection)."""
        return self.state is not State.CLOSED

    def _check_receivable(self, message: Message) -> None:
        role = self.role if self.state is State.READY else None
        allowed = RECEIVE_TABLE.get((self.side, role, self.state), frozenset())
        if type(message) not in allowed:
            raise RemoteProtocolError(
                f"{type(message).__name__} is not allowed in state {self.state.value}",
                code="unexpected_message",
            )
        if isinstance(message, Hello | Challenge) and message.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"protocol version {message.version} is not supported "
                f"(this side speaks {PROTOCOL_VERSION})",
                code="version_mismatch",
            )

    def _after(self, message: Message) -> None:
        if isinstance(message, Error | Goodbye):
            self.state = State.CLOSED
            return
        if isinstance(message, Hello):
            self.role = message.role
        elif isinstance(message, Challenge | Welcome):
            self.max_frame = min(self.max_frame, message.max_frame)
        nxt = TRANSITIONS.get((self.state, type(message)))
        if nxt is not None:
            self._enter(nxt)

    def _fail(self, exc: RemoteProtocolError) -> None:
        self.error = exc
        if self.state is not State.CLOSED:
            self._outgoing.append(encode(Error(code=exc.code, message=str(exc))))
            self.state = State.CLOSED

    def _enter(self, state: State) -> None:
        self.state = state
        if state is State.READY:
            self._decoder.max_frame = self.max_frame

    # ---- sending ---------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue ``message``. Raises LocalProtocolError if it is invalid or the state is closed."""
        if self.state is State.CLOSED:
            raise LocalProtocolError(f"cannot send {type(message).__name__}: connection closed")
        body = _encode_body(message)
        if len(body) > self.max_frame:
            raise LocalProtocolError(
                f"{type(message).__name__} of {len(body)} bytes exceeds the "
                f"frame limit of {self.max_frame}"
            )
        if len(body) < JOIN_LIMIT:
            self._outgoing.append(HEADER.pack(len(body)) + body)
        else:  # a large body is not copied to put its header in front: it is written as is
            self._outgoing += (HEADER.pack(len(body)), body)
        if isinstance(message, Error | Goodbye):
            self.state = State.CLOSED
        else:
            nxt = TRANSITIONS.get((self.state, type(message)))
            if nxt is not None:
                self._enter(nxt)

    def data_to_send(self) -> bytes:
        """All bytes queued since the last call (possibly empty)."""
        return b"".join(self.chunks_to_send())

    def chunks_to_send(self) -> list[bytes]:
        """The bytes queued since the last call, as pieces for one ``writelines``; possibly
        empty. Runs of small frames are joined into one piece: a TLS transport encrypts each
        piece as its own record (one record per frame cost the worker and the server more
        than the frames' encoding); large bodies stay apart, never copied."""
        chunks, self._outgoing = self._outgoing, []
        if len(chunks) < 2:
            return chunks
        pieces: list[bytes] = []
        run: list[bytes] = []
        for chunk in chunks:
            if len(chunk) < JOIN_LIMIT:
                run.append(chunk)
                continue
            if run:
                pieces.append(b"".join(run) if len(run) > 1 else run[0])
                run = []
            pieces.append(chunk)
        if run:
            pieces.append(b"".join(run) if len(run) > 1 else run[0])
        return pieces
