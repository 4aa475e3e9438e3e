"""Generate the message and state tables of docs/protocol.md from dcproto/protocol.py.

Usage::

    python docs/gen_protocol_tables.py            # print the generated markdown
    python docs/gen_protocol_tables.py --write    # rewrite the generated region of the doc
    python docs/gen_protocol_tables.py --check    # exit 1 with a diff if the doc is stale

The region between ``<!-- BEGIN GENERATED -->`` and ``<!-- END GENERATED -->`` is replaced;
the rest of the doc is prose and is left alone. Message descriptions are the dataclasses'
docstrings; field types come from ``SCHEMA``, directions from ``RECEIVE_TABLE``, every int
field's range from ``INT_RANGES`` (default 0 .. ``MAX_INT``) and length limits from ``LENGTHS``.
Field meanings and the ``_validate`` rules are kept below, next to the code that renders them,
and generation fails if they no longer match the message classes (a field added, removed or
renamed, a ``_validate`` added, a range or limit naming a field that has none), so the tables
cannot silently fall behind the code.

The prose cannot be generated, but a few facts in it can be checked: ``--check`` and
``--write`` also fail (exit 1, naming the sentence) when the prose states another protocol
version than ``PROTOCOL_VERSION``, or when any sentence, table cell or table row calls a
project id "server-assigned" (or "assigned by the server") although the creator chooses it.
``--doc FILE`` checks or rewrites another copy of the doc.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dcproto import protocol as p  # noqa: E402

DOC = ROOT / "docs" / "protocol.md"
BEGIN = "<!-- BEGIN GENERATED -->"
END = "<!-- END GENERATED -->"


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(f"`{v}`" for v in values)


def _number(value: int) -> str:
    """An integer as the doc writes it: large powers of two as ``2^k``."""
    if value >= 2**20 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    return str(value)


#: (message class name, field) -> what the field means.
FIELD_NOTES: dict[tuple[str, str], str] = {
    ("Challenge", "version"): f"Protocol version the server speaks (now {p.PROTOCOL_VERSION}).",
    ("Challenge", "nonce"): "Fresh random bytes; the client's `proof` is bound to them.",
    ("Challenge", "max_frame"): "Largest frame body, in bytes, the server accepts after Welcome.",
    ("Hello", "version"): "Protocol version the client speaks; must equal the server's.",
    ("Hello", "role"): f"What the client is: one of {_one_of(p.ROLES)}.",
    ("Hello", "identity"): "The token's name (the part before the dot of `NAME.SECRET`).",
    ("Hello", "proof"): "32 bytes proving the token is held, bound to `nonce`, `role`, "
    "`identity` and the server's certificate (see *Authentication*).",
    ("Hello", "device_id"): "The `device_id` a server gave this machine before, or nil.",
    ("Hello", "name"): "Human-readable name of the client (host name), for logs and stats.",
    ("Hello", "slots"): "Tasks a worker runs at once; a creator sends 0.",
    ("Welcome", "device_id"): "Id of this machine; the client stores it and sends it next time.",
    ("Welcome", "heartbeat_interval"): "Seconds; no side stays silent longer (see *Heartbeats*).",
    ("Welcome", "max_frame"): "Largest frame body, in bytes, the server accepts from now on.",
    ("Error", "code"): "Machine-readable error code (see *Error codes*).",
    ("Error", "message"): "Human-readable explanation.",
    ("Goodbye", "reason"): "Why the sender closes (free text, for logs).",
    ("Credit", "credit"): "How many more Tasks the worker can take, added to what it had.",
    ("Project", "project_id"): "Creator-chosen project id (from Submit); Tasks refer to it.",
    ("Project", "code"): "The creator's pickled project class, passed on unchanged.",
    ("Project", "modules"): "Modules the worker must import before unpickling `code`.",
    ("Project", "parallel"): "Name of the method to run on each item.",
    ("Project", "stop"): "Name of the stop-condition method, or nil.",
    ("Project", "only_if"): "Name of the keep-this-result filter method, or nil.",
    ("Project", "options"): "Project options, server defaults filled in (string keys).",
    ("Project", "owner"): "Token name of the creator that submitted it; empty when unknown.",
    ("Reject", "project_id"): "The project the worker cannot run.",
    ("Reject", "reason"): "Why (e.g. the text of an ImportError).",
    ("Task", "task_id"): "Server-assigned id of the task, unique on this server.",
    ("Task", "project_id"): "The project the task belongs to.",
    ("Task", "attempt"): "Attempt number, from 1; the Result must carry the same number.",
    ("Task", "items"): "The items to process: an opaque pickled list, made by the creator.",
    ("Result", "task_id"): "The `task_id` of the Task answered.",
    ("Result", "attempt"): "The `attempt` of the Task answered.",
    ("Result", "outcome"): f"One of {_one_of(p.RESULT_OUTCOMES)} (see *Result outcomes*).",
    ("Result", "payload"): "The kept results: a pickled list of one value per item in order "
    "when every item was kept, else a pickled dict `{index: value}` keyed by the item's index "
    "in the task; may be empty.",
    ("Result", "n_items"): "Items processed.",
    ("Result", "n_kept"): "Entries in `payload`; at most `n_items`.",
    ("Result", "error"): "Details when the task failed (string keys such as `message`), or nil.",
    ("Result", "stats"): "Timings and counters (string keys; ignore unknown keys).",
    ("Result", "files"): "Extra output files, each `[name: str, data: bin]`.",
    ("Result", "credit"): "Credit handed back with this result (0 = none).",
    ("Abandon", "task_ids"): "Tasks to stop; each is still answered by one Result.",
    ("Recall", "task_ids"): "Tasks to give back if not started; each is answered by one Result.",
    ("ListWorkers", "ref"): "Chosen by the creator; echoed in WorkerList.",
    ("WorkerList", "ref"): "The `ref` of the ListWorkers.",
    ("WorkerList", "workers"): "One map per connected worker (see ListWorkers).",
    ("ServerInfo", "ref"): "Chosen by the creator; echoed in ServerInfoReply.",
    ("ServerInfoReply", "ref"): "The `ref` of the ServerInfo.",
    ("ServerInfoReply", "info"): "One map about the server (see ServerInfo).",
    ("WorkerState", "paused"): "True: send it no task (it hands back what it has not started).",
    ("WorkerState", "trust"): "Token names of the creators whose projects it runs; empty: all.",
    ("WorkerState", "usage"): "Figures for the server's view of the worker (CPU, memory...).",
    ("Submit", "project_id"): "Creator-chosen id (a random UUID's hex), unique on the server.",
    ("Submit", "name"): "Project name, for logs and notices.",
    ("Submit", "code"): "The pickled project class (opaque to the server).",
    ("Submit", "modules"): "Modules a worker must import before unpickling `code`.",
    ("Submit", "parallel"): "Name of the method to run on each item.",
    ("Submit", "stop"): "Name of the stop-condition method, or nil.",
    ("Submit", "only_if"): "Name of the filter method, or nil.",
    ("Submit", "options"): "Project options (string keys; see the server docs).",
    ("Accepted", "project_id"): "The project accepted.",
    ("Accepted", "credit"): "Tasks the creator may send on top of `INITIAL_CREDIT`.",
    ("Tasks", "project_id"): "The project.",
    ("Tasks", "tasks"): "Entries `[seq: int, items: bin, n_items: int]`; `seq` numbers tasks.",
    ("End", "project_id"): "The project.",
    ("End", "total_tasks"): "Tasks sent in all.",
    ("End", "total_items"): "Items in those tasks.",
    ("More", "project_id"): "The project.",
    ("More", "credit"): "Further tasks the creator may send, added to what it had.",
    ("More", "stored"): "Tasks of the project durably stored: seqs `0 .. stored-1`.",
    ("TaskDone", "project_id"): "The project.",
    ("TaskDone", "seq"): "The creator's `seq` of the task.",
    ("TaskDone", "items"): "The task's items exactly as the creator sent them in Tasks.",
    ("TaskDone", "payload"): "The worker's Result payload (a list or `{index: value}`), unchanged.",
    ("TaskDone", "n_items"): "Items processed.",
    ("TaskDone", "n_kept"): "Entries in `payload`.",
    ("TaskDone", "files"): "Extra output files, each `[name: str, data: bin]`.",
    ("TaskDone", "stats"): "The worker's stats plus server-added keys (ignore unknown keys).",
    ("Finished", "project_id"): "The project.",
    ("Finished", "status"): f"One of {_one_of(p.PROJECT_STATUSES)}.",
    ("Finished", "error"): "Why it failed (string keys such as `reason`, `message`), or nil.",
    ("Finished", "stop"): "`[seq, items, payload]` of the task that met the stop condition "
    "(its items as the creator sent them, the worker's payload), or nil.",
    ("Finished", "stats"): "Project counters and times (string keys; ignore unknown keys).",
    ("Cancel", "project_id"): "The project to cancel.",
    ("Notice", "project_id"): "The project concerned.",
    ("Notice", "level"): "Severity, e.g. `info` or `warning`.",
    ("Notice", "text"): "Message for the user.",
    ("Attach", "ref"): "Chosen by the creator; echoed in Attached.",
    ("Attach", "project_id"): "The project to re-attach to.",
    ("Attach", "watch"): "True: follow it without taking it from its creator (no feeding).",
    ("Attached", "ref"): "The `ref` of the Attach.",
    ("Attached", "project_id"): "The project.",
    ("Attached", "status"): "`running`, a Finished status, `released`, `unknown` or `forbidden`.",
    ("Attached", "stored"): "Tasks durably stored (seqs `0 .. stored-1`); feeding resumes here.",
    ("Attached", "items_stored"): "Items in those tasks.",
    ("Attached", "ended"): "Whether the project's End is stored.",
    ("Attached", "credit"): "Tasks the creator may send now.",
    ("Release", "project_id"): "The project whose results the creator now keeps.",
    ("ListProjects", "ref"): "Chosen by the creator; echoed in ProjectList.",
    ("ProjectList", "ref"): "The `ref` of the ListProjects.",
    ("ProjectList", "projects"): "One map per project the token may see (str keys; ignore "
    "unknown keys).",
}

_FILES_RULE = "each `files` entry is a 2-element array `[str, bin]`"

#: message class name -> its ``_validate`` rules, in words. Integer ranges and length limits
#: are not repeated here: they are rendered from ``INT_RANGES`` and ``LENGTHS``.
VALIDATION: dict[str, list[str]] = {
    "Challenge": [f"`nonce` is at least {p.MIN_NONCE} bytes"],
    "Hello": [
        f"`role` is one of {_one_of(p.ROLES)}",
        "`identity` is a token name: 1 to 64 characters of `A-Z a-z 0-9 _ -`, the first a "
        "letter or digit",
    ],
    "Welcome": ["`heartbeat_interval` is finite and > 0"],
    "Project": ["`owner` is empty or a token name"],
    "Result": [
        f"`outcome` is one of {_one_of(p.RESULT_OUTCOMES)}",
        "`n_kept` <= `n_items`",
        _FILES_RULE,
    ],
    "WorkerState": [f"each name in `trust` has at most {p.MAX_NAME} characters"],
    "Submit": [
        "`project_id` is 1 to 64 characters of `A-Z a-z 0-9 _ -`",
        f"each `modules` entry is 1 to {p.MAX_NAME} characters",
    ],
    "Tasks": [
        "each `tasks` entry is a 3-element array `[int, bin, int]`; its `seq` and `n_items` "
        f"are in 0 .. {_number(p.MAX_INT)}"
    ],
    "TaskDone": [_FILES_RULE],
    "Finished": [
        f"`status` is one of {_one_of(p.PROJECT_STATUSES)}",
        "`stop` is nil or a 3-element array `[int, bin, bin]`",
    ],
}

_SCALARS = {
    "bool": "bool",
    "int": "int",
    "float": "float (int accepted)",
    "str": "str",
    "bytes": "bin",
}


def msgpack_type(annotation: str) -> str:
    """The msgpack type of a field annotation as written in protocol.py."""
    parts = [part.strip() for part in annotation.split("|")]
    optional = "None" in parts
    parts = [part for part in parts if part != "None"]
    if len(parts) != 1:
        raise ValueError(f"cannot render annotation {annotation!r}")
    base = parts[0]
    if base in _SCALARS:
        text = _SCALARS[base]
    elif (m := re.fullmatch(r"list\[(.+)\]", base)) is not None:
        inner = m.group(1)
        text = "array" if inner == "Any" else f"array of {msgpack_type(inner)}"
    elif re.fullmatch(r"dict\[str, *Any\]", base) is not None:
        text = "map (str keys)"
    else:
        raise ValueError(f"cannot render annotation {annotation!r}")
    return f"{text} or nil" if optional else text


def _docstring(cls: type) -> str:
    text = " ".join((inspect.getdoc(cls) or "").split())
    return text.replace(":class:", "").replace("``", "`")


def _senders_and_receivers(cls: type) -> list[tuple[str, str]]:
    pairs = []
    for (side, role, _), allowed in p.RECEIVE_TABLE.items():
        if cls not in allowed:
            continue
        peer = role or "client"
        pairs.append((peer, "server") if side == "server" else ("server", peer))
    return pairs


def direction(cls: type) -> str:
    pairs = _senders_and_receivers(cls)
    to_server = {s for s, r in pairs if r == "server"}
    to_client = {r for s, r in pairs if s == "server"}
    if to_server and to_client:
        return "both ways"
    if not pairs:
        return "never received"
    if to_server:
        sender = next(iter(to_server)) if len(to_server) == 1 else "client"
        return f"{sender} → server"
    receiver = next(iter(to_client)) if len(to_client) == 1 else "client"
    return f"server → {receiver}"


def _check_notes() -> None:
    fields = {(cls.__name__, name) for cls in p.MESSAGE_TYPES for name, _, _ in p.SCHEMA[cls]}
    problems = [f"no note for field {c}.{f}" for c, f in sorted(fields - FIELD_NOTES.keys())]
    problems += [f"note for unknown field {c}.{f}" for c, f in sorted(FIELD_NOTES.keys() - fields)]
    validated = {cls.__name__ for cls in p.MESSAGE_TYPES if "_validate" in vars(cls)}
    problems += [f"{c}._validate has no rules here" for c in sorted(validated - VALIDATION.keys())]
    problems += [
        f"rules for {c}, which has no _validate" for c in sorted(VALIDATION.keys() - validated)
    ]
    annotations = {
        (cls.__name__, name): annotation
        for cls in p.MESSAGE_TYPES
        for name, annotation, _ in p.SCHEMA[cls]
    }
    for key in sorted(p.INT_RANGES):
        if annotations.get(key) not in ("int", "list[int]"):
            problems.append(f"INT_RANGES names {key[0]}.{key[1]}, which is not an int field")
    for key in sorted(p.LENGTHS):
        if _unit(annotations.get(key, "")) is None:
            problems.append(f"LENGTHS names {key[0]}.{key[1]}, which has no length")
    if _creator_chosen_ids():
        problems += [
            f"the note for {c}.{f} calls a creator-chosen project id server-assigned"
            for (c, f), note in sorted(FIELD_NOTES.items())
            if f == "project_id" and _SERVER_ASSIGNED.search(note)
        ]
    if problems:
        raise SystemExit("gen_protocol_tables.py is out of date:\n  " + "\n  ".join(problems))


# ---- ranges and lengths ----------------------------------------------------------------------


def _unit(annotation: str) -> str | None:
    """What a length limit on a field of this annotation counts, or None if it has no length."""
    base = annotation.replace(" | None", "")
    if base == "str":
        return "characters"
    if base == "bytes":
        return "bytes"
    if base.startswith("list["):
        return "entries"
    return None


def limit(cls: type, name: str, annotation: str) -> str:
    """The range of an int field, or the length limit of a str, bin or array field, as text;
    an em dash when only the frame size bounds it."""
    key = (cls.__name__, name)
    parts = []
    length = p.LENGTHS.get(key)
    if length is not None:
        parts.append(f"≤ {_number(length)} {_unit(annotation)}")
    if annotation in ("int", "list[int]"):
        low, high = p.INT_RANGES.get(key, (0, p.MAX_INT))
        span = f"{_number(low)} .. {_number(high)}"
        parts.append(span if annotation == "int" else f"each {span}")
    return ", ".join(parts) or "—"


# ---- facts the hand-written prose must agree with --------------------------------------------

_SERVER_ASSIGNED = re.compile(
    r"server[- ]assigned|assigned by the server|the server (?:assigns|allocates|picks)",
    re.IGNORECASE,
)
_PROJECT_ID = re.compile(r"project[ _]id|project's id|id of (?:the|a) project", re.IGNORECASE)
_VERSION_LINE = re.compile(r"Protocol version: \*\*(\d+)\*\*")


def _creator_chosen_ids() -> bool:
    """Whether the creator names its projects: Submit carries the id."""
    return any(name == "project_id" for name, _, _ in p.SCHEMA[p.Submit])


def _sentences(text: str) -> list[str]:
    """Sentences, table cells and table rows of markdown text, each on one line (a row too:
    a field named in one cell may be described in another)."""
    paragraphs = re.split(r"\n\s*\n", text)
    chunks: list[str] = []
    for paragraph in paragraphs:
        joined = " ".join(paragraph.split())
        chunks += [c for c in re.split(r"(?<=[.!?])\s+|\s*\|\s*", joined) if c]
    chunks += [line.strip() for line in text.splitlines() if line.lstrip().startswith("|")]
    return chunks


def prose_problems(doc: str) -> list[str]:
    """Where the doc contradicts facts taken from the code: the protocol version it states
    outside the generated region, and any sentence or table cell that calls a project id
    server-assigned while the creator chooses it."""
    start, stop = doc.find(BEGIN), doc.find(END)
    prose = doc[:start] + doc[stop + len(END) :] if 0 <= start < stop else doc
    problems = []
    stated = _VERSION_LINE.findall(prose)
    if not stated:
        problems.append(f"the prose does not state 'Protocol version: **{p.PROTOCOL_VERSION}**'")
    for version in stated:
        if int(version) != p.PROTOCOL_VERSION:
            problems.append(
                f"the prose says protocol version {version}; the code speaks {p.PROTOCOL_VERSION}"
            )
    if _creator_chosen_ids():
        for sentence in _sentences(doc):
            if _SERVER_ASSIGNED.search(sentence) and _PROJECT_ID.search(sentence):
                shown = sentence if len(sentence) <= 120 else sentence[:117] + "..."
                problems.append(f"project ids are creator-chosen, but the doc says: {shown!r}")
    return problems


def _state_name(state: p.State) -> str:
    return f"`{state.name}`"


def render() -> str:
    """The markdown of the generated region (without the markers)."""
    _check_notes()
    out: list[str] = []
    add = out.append
    add("<!-- Generated by docs/gen_protocol_tables.py from dcproto/protocol.py; do not edit. -->")
    add("")
    add("### Constants")
    add("")
    add("| name | value |")
    add("| --- | --- |")
    add(f"| `PROTOCOL_VERSION` | {p.PROTOCOL_VERSION} |")
    add(f"| frame header | {p.HEADER.size} bytes, big-endian unsigned (`{p.HEADER.format}`) |")
    add(f"| `HANDSHAKE_MAX_FRAME` | {p.HANDSHAKE_MAX_FRAME} bytes |")
    add(f"| `DEFAULT_MAX_FRAME` | {p.DEFAULT_MAX_FRAME} bytes |")
    add(f"| `INITIAL_CREDIT` | {p.INITIAL_CREDIT} tasks a creator may send right behind a Submit |")
    add(f"| `MAX_INT` | {_number(p.MAX_INT)}: the top of every integer field's default range |")
    add(f"| `MIN_NONCE` | {p.MIN_NONCE} bytes |")
    add(f"| token names (`Hello.identity`) | `{p.IDENTITY.pattern}` |")
    add(f"| project ids | `{p.PROJECT_ID.pattern}` |")
    add(f"| roles | {_one_of(p.ROLES)} |")
    add(f"| Result outcomes | {_one_of(p.RESULT_OUTCOMES)} |")
    add(f"| project statuses | {_one_of(p.PROJECT_STATUSES)} |")
    add("")
    add("### Ranges and lengths")
    add("")
    add(f"Every int field is in 0 .. {_number(p.MAX_INT)} unless its row below says otherwise;")
    add("the elements of an array of int share the array's range. A str, bin or array field")
    add("with a limit holds at most that many characters, bytes or entries. A field marked —")
    add("has no limit of its own: the frame size and the message's validation rules bound it.")
    add("The receiver answers a message that breaks a range or a limit with Error `bad_message`;")
    add("the reference implementation also refuses to encode one.")
    add("")
    add("### Message types")
    add("")
    add("| type | message | direction | description |")
    add("| ---: | --- | --- | --- |")
    for cls in p.MESSAGE_TYPES:
        anchor = cls.__name__.lower()
        add(f"| {cls.TYPE} | [{cls.__name__}](#{anchor}) | {direction(cls)} | {_docstring(cls)} |")
    for cls in p.MESSAGE_TYPES:
        schema = p.SCHEMA[cls]
        add("")
        add(f"#### {cls.__name__}")
        add("")
        add(f"Type **{cls.TYPE}**, {direction(cls)}. {_docstring(cls)}")
        add("")
        wire = ", ".join([str(cls.TYPE), *(name for name, _, _ in schema)])
        add(f"Wire form: `[{wire}]`")
        add("")
        if schema:
            add("| # | field | msgpack type | range or length | meaning |")
            add("| ---: | --- | --- | --- | --- |")
            for index, (name, annotation, _) in enumerate(schema, start=1):
                note = FIELD_NOTES[(cls.__name__, name)]
                kind = msgpack_type(annotation)
                add(f"| {index} | `{name}` | {kind} | {limit(cls, name, annotation)} | {note} |")
        else:
            add("No fields.")
        rules = VALIDATION.get(cls.__name__)
        if rules:
            add("")
            add("Validation: " + "; ".join(rules) + ".")
    add("")
    add("### Receive table")
    add("")
    add("Which messages each side accepts in each state. The table uses the client's role only")
    add("in `READY` (the server learns it from Hello). Any other message is `unexpected_message`.")
    add("")
    add("| side | client role | state | accepts |")
    add("| --- | --- | --- | --- |")
    for (side, role, state), allowed in p.RECEIVE_TABLE.items():
        names = ", ".join(cls.__name__ for cls in sorted(allowed, key=lambda c: c.TYPE))
        add(f"| {side} | {role or 'any'} | {_state_name(state)} | {names} |")
    add("")
    add("### Transitions")
    add("")
    add("| state | on | next state |")
    add("| --- | --- | --- |")
    receivable = {
        (state, cls) for (_, _, state), allowed in p.RECEIVE_TABLE.items() for cls in allowed
    }
    for (state, cls), nxt in p.TRANSITIONS.items():
        how = "receiving" if (state, cls) in receivable else "sending"
        add(f"| {_state_name(state)} | {how} {cls.__name__} | {_state_name(nxt)} |")
    add(f"| any | sending or receiving Error or Goodbye | {_state_name(p.State.CLOSED)} |")
    add(f"| any | a protocol violation by the peer | {_state_name(p.State.CLOSED)} |")
    add("")
    server, client = _state_name(p.State.AWAIT_HELLO), _state_name(p.State.AWAIT_CHALLENGE)
    add(f"Initial state: server {server}, client {client}. Other messages leave the state as is.")
    return "\n".join(out) + "\n"


def splice(doc: str, generated: str) -> str:
    """``doc`` with the text between the markers replaced by ``generated``."""
    start = doc.find(BEGIN)
    stop = doc.find(END)
    if start < 0 or stop < start:
        raise SystemExit(f"markers {BEGIN} / {END} not found in order")
    return doc[: start + len(BEGIN)] + "\n" + generated + doc[stop:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the doc's generated region")
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff if the doc is stale")
    parser.add_argument("--doc", type=Path, default=DOC, help="the doc to check or rewrite")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(render())
        return 0
    current = args.doc.read_text(encoding="utf-8")
    try:
        generated = render()
    except SystemExit as exc:  # the notes above fell behind protocol.py: check the prose too
        print(exc.code, file=sys.stderr)
        for problem in prose_problems(current):
            print(f"{args.doc}: {problem} (edit the prose by hand)", file=sys.stderr)
        return 1
    wanted = splice(current, generated)
    problems = prose_problems(wanted)
    for problem in problems:
        print(f"{args.doc}: {problem} (edit the prose by hand)", file=sys.stderr)
    if args.write:
        if wanted != current:
            args.doc.write_text(wanted, encoding="utf-8")
        return 1 if problems else 0
    if wanted == current:
        return 1 if problems else 0
    diff = difflib.unified_diff(
        current.splitlines(keepends=True),
        wanted.splitlines(keepends=True),
        fromfile=f"{args.doc} (current)",
        tofile=f"{args.doc} (generated)",
    )
    sys.stdout.writelines(diff)
    print(f"\n{args.doc} is stale: run python docs/gen_protocol_tables.py --write", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
