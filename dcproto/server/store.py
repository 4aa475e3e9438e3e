"""Durable server state in SQLite (WAL mode): devices, projects, tasks and results.

Writes are queued and written together by :meth:`Store.commit`: result payloads first, into
their per-project files, then every queued row in one transaction, so a row never points at
bytes not yet written. ``synchronous=NORMAL``: a commit survives a crash of the process; a
power loss may undo the last ones.

The server does *not* commit before everything it sends (see ``Server._flush`` and
``COMMIT_FIRST`` in :mod:`.server`). Commits are grouped: spaced after the last one by up to
``MAX_COMMIT_DELAY`` (1 ms), so under load one transaction covers several loop turns. Only
what tells a creator that something is stored waits for the commit: Accepted, More, Attached
and ProjectList, with whatever is queued behind them on the same connection; and a task id
above the stored ceiling (ids are reserved on disk a block at a time) is committed before it
leaves. Everything else -- Tasks to workers, TaskDone, Finished, Notices, Errors -- may go out
before the state it reflects is on disk. A kill -9 therefore loses the writes not yet
committed (a loop turn's, plus at most a millisecond's), some of which may already have been
sent: a task or result not stored is redone after the restart (the creator resends any task
that More.stored does not cover yet), and a project whose Finished went out may run again.

When the disk refuses a commit, no row of it lands: its writes are kept in memory (up to
``MAX_PENDING_WRITES``) and retried by the next commits, while the server serves from memory;
the messages that waited for that commit are then sent anyway, although their state is not on
disk.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sqlite3
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ..errors import DcprotoError

log = logging.getLogger("dcproto.server.store")

MAX_PENDING_WRITES = 1_000_000  # writes held in memory while the disk refuses them
DB_FILE = "state.sqlite3"
RESULTS_DIR = "results"  # in the state dir: one file of result payloads per project
FILE_PAYLOAD_MIN = 4096  # payloads from this size on go to the project's results file
MAX_OPEN_RESULT_FILES = 64
WAL_SIZE_LIMIT = 4 * 1024 * 1024
RESULTS_PAGE_ROWS = 256  # results read from the database at a time
RESULTS_PAGE_BYTES = 4 * 1024 * 1024  # and about this many bytes at most (one row at least)
# SQLite's primary result codes (an error's code & 0xFF) that mean the disk or the database file
# fails, whatever the row: BUSY, LOCKED, NOMEM, READONLY, INTERRUPT, IOERR, CORRUPT, FULL,
# CANTOPEN, PROTOCOL, NOLFS, NOTADB. Writes failing with them are kept and retried.
DISK_FAILURE_CODES = frozenset({5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 22, 26})

# Each entry upgrades the schema by one version; the index + 1 is the version it produces.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL
    );
    CREATE TABLE projects (
        project_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        creator_device TEXT NOT NULL,
        submitted_at REAL NOT NULL,
        finished_at REAL,
        status TEXT NOT NULL,
        stats TEXT
    );
    """,
    """
    ALTER TABLE projects ADD COLUMN code BLOB;
    ALTER TABLE projects ADD COLUMN spec BLOB;
    ALTER TABLE projects ADD COLUMN total_tasks INTEGER;
    ALTER TABLE projects ADD COLUMN total_items INTEGER;
    ALTER TABLE projects ADD COLUMN tasks_received INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE projects ADD COLUMN items_received INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE projects ADD COLUMN outcome BLOB;
    ALTER TABLE projects ADD COLUMN released INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE tasks (
        task_id INTEGER PRIMARY KEY,
        project_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        items BLOB,
        n_items INTEGER NOT NULL,
        done INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX tasks_by_project ON tasks(project_id, done);
    CREATE UNIQUE INDEX tasks_by_seq ON tasks(project_id, seq);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    CREATE TABLE results (
        project_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        message BLOB NOT NULL,
        PRIMARY KEY (project_id, seq)
    );
    """,
    # large payloads live in a file per project (RESULTS_DIR); the row says where
    """
    ALTER TABLE results ADD COLUMN payload_at INTEGER;
    ALTER TABLE results ADD COLUMN payload_size INTEGER;
    ALTER TABLE results ADD COLUMN payload_crc INTEGER;
    """,
    # 4: tokens. A project belongs to the identity (token name) that submitted it, and a
    # device id to the identity that was given it
    """
    ALTER TABLE projects ADD COLUMN owner TEXT;
    ALTER TABLE devices ADD COLUMN owner TEXT;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class StateError(DcprotoError):
    """The state directory or database cannot be used."""


@dataclass(frozen=True, slots=True)
class StoredProject:
    project_id: str
    name: str
    status: str
    submitted_at: float
    finished_at: float | None
    code: bytes
    spec: dict[str, Any]  # modules, parallel, stop, only_if, options
    total_tasks: int | None
    total_items: int | None
    tasks_received: int
    items_received: int
    outcome: dict[str, Any] | None  # Finished fields once finished: error, stop, stats
    released: bool
    owner: str | None  # the identity that submitted it (None: before tokens)


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _unpack(blob: bytes | None) -> Any:
    return None if blob is None else msgpack.unpackb(blob, raw=False)


class Store:
    """One SQLite database. ``state_dir=None`` keeps it in memory (no durability)."""

    def __init__(self, state_dir: Path | None) -> None:
        try:
            if state_dir is None:
                target = ":memory:"
            else:
                state_dir.mkdir(parents=True, exist_ok=True)
                target = str(state_dir / DB_FILE)
            self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives a process crash; only power loss can undo the last ones
            self._db.execute("PRAGMA synchronous=NORMAL")
            # checkpoints fsync: the server runs them on a thread (checkpoint()), not inside
            # a commit on its event loop
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            # a reset WAL is cut back to this size, so its size tells how much awaits the next
            # checkpoint
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._migrate()
            # SQLite silently falls back to read-only when it cannot open the file for writing
            # (e.g. a read-only mount holding the WAL files of a crashed server): a write that
            # changes nothing fails then
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the state database in {state_dir}: {exc}") from exc
        except OSError as exc:
            raise StateError(f"cannot use the state dir {state_dir}: {exc}") from exc
        self.path = target
        self._wal = None if state_dir is None else Path(target + "-wal")
        self._results_dir = None if state_dir is None else state_dir / RESULTS_DIR
        self._file_ends: dict[str, int] = {}  # next free offset in each project's results file
        self._files: collections.OrderedDict[str, int] = collections.OrderedDict()  # open fds
        self._file_writes: list[tuple[str, int, bytes]] = []  # (project, offset, payload)
        self._file_removals: list[str] = []  # projects whose results file goes after the commit
        # results files left by an earlier run (others exist only once written in this one)
        self._files_at_start: set[str] = set()
        if self._results_dir is not None:
            with contextlib.suppress(OSError):  # none yet, or unreadable: nothing to remove
                self._files_at_start = {
                    path.stem for path in self._results_dir.iterdir() if path.suffix == ".bin"
                }
        self._checkpointer: sqlite3.Connection | None = None
        # queued writes: (statement, parameters, the project it is about or None)
        self._pending: list[tuple[str, Any, str | None]] = []
        self.failed: str | None = None  # why the last commit failed, while it keeps failing
        self.lost_writes = 0  # writes given up after the disk failed for too long
        self.dropped_writes = 0  # writes left out because they could not be stored at all
        self._unstorable: set[str] = set()  # projects with writes dropped when queued

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StateError(
                f"the state database has schema version {version}, newer than this dcproto "
                f"({SCHEMA_VERSION}); upgrade dcproto"
            )
        for number in range(version, SCHEMA_VERSION):
            self._db.executescript(
                "BEGIN;" + MIGRATIONS[number] + f"PRAGMA user_version={number + 1}; COMMIT;"
            )

    def close(self) -> None:
        self.commit()
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.close()  # the last connection to close checkpoints and removes the WAL

    # ---- checkpoints ---------------------------------------------------------------------------

    def wal_bytes(self) -> int:
        """Size of the write-ahead log (0 in memory): what the next checkpoint copies back."""
        if self._wal is None:
            return 0
        try:
            return self._wal.stat().st_size
        except OSError:
            return 0

    def checkpoint(self) -> None:
        """Copy the WAL back into the database, without blocking writers; meant for a thread
        of its own (it has its own connection). Raises StateError."""
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"cannot checkpoint the server state: {exc}") from exc

    def restart_wal(self) -> None:
        """After :meth:`checkpoint`: copy what was written meanwhile (little) and start the WAL
        over, so it does not grow for as long as writes keep coming. Raises StateError."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"cannot checkpoint the server state: {exc}") from exc

    # ---- batched writes ------------------------------------------------------------------------

    def _queue(self, sql: str, params: Any, project_id: str | None = None) -> None:
        self._pending.append((sql, params, project_id))

    def has_pending(self) -> bool:
        return bool(self._pending or self._file_writes or self._file_removals)

    def commit(self) -> set[str]:
        """Write everything queued: result payloads into their files, then the rows in one
        transaction (a row never points at bytes not yet written).

        Two kinds of failure are told apart. When the disk or the database file fails (see
        :func:`disk_failure`), nothing is written: everything is kept to be retried, file writes
        included (each goes to a fixed offset, so writing it twice is harmless), and StateError
        is raised. When a statement fails because of what it carries (a bad row: an integer
        past 64 bits, a constraint, a value SQLite cannot bind), the batch is rolled back and
        run again statement by statement in one transaction, leaving out only the statements
        that fail on their own: every other write lands, whoever queued it. Returns the
        projects whose writes were left out (normally none); each is logged."""
        unstorable, self._unstorable = self._unstorable, set()
        if not self.has_pending():
            return unstorable
        pending, self._pending = self._pending, []
        writes, self._file_writes = self._file_writes, []
        dropped: list[int] = []
        try:
            for project_id, offset, payload in writes:
                self._write_at(project_id, offset, payload)
            try:
                self._run_batch(pending)
            except Exception as exc:
                if disk_failure(exc):
                    raise
                dropped = self._run_isolated(pending)
        except BaseException as exc:
            self._unstorable |= unstorable
            self.failed = str(exc) or type(exc).__name__
            if len(pending) + len(self._pending) <= MAX_PENDING_WRITES:
                self._pending = pending + self._pending  # retried by the next commit
                self._file_writes = writes + self._file_writes
            else:
                self.lost_writes += len(pending)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt and the like: kept for a retry, and passed on
            raise StateError(f"cannot write the server state: {self.failed}") from exc
        self.failed = None
        removals, self._file_removals = self._file_removals, []
        for project_id in removals:
            self._remove_file(project_id)
        self.dropped_writes += len(dropped)
        return unstorable | {
            project for index in dropped if (project := pending[index][2]) is not None
        }

    def _packed(self, project_id: str, what: str, value: Any) -> bytes | None:
        """``value`` packed; None if it cannot be (an int past 64 bits, say), logged and the
        project reported by the next commit with those whose writes were left out: the store
        does not rely on the protocol's ranges alone."""
        try:
            return _pack(value)
        except (OverflowError, TypeError, ValueError) as exc:
            log.error(
                "dropped a write that cannot be stored (project %s): %s: %.200s; in: %s",
                project_id,
                type(exc).__name__,
                str(exc),
                what,
            )
            self._unstorable.add(project_id)
            self.dropped_writes += 1
            return None

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _run_batch(self, pending: list[tuple[str, Any, str | None]]) -> None:
        """The whole batch in one transaction, one executemany per run of equal statements.
        Raises what fails, after rolling back."""
        try:
            self._db.execute("BEGIN")
            for sql, params in _grouped(pending):
                self._db.executemany(sql, params)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _run_isolated(self, pending: list[tuple[str, Any, str | None]]) -> list[int]:
        """The batch again, statement by statement in one transaction, without the statements
        that fail because of what they carry; returns their indices. A failing statement
        changes nothing (SQLite backs out the statement, and an unbindable value never reaches
        it). Raises a disk failure, after rolling back everything."""
        dropped: list[int] = []
        try:
            self._db.execute("BEGIN")
            for index, (sql, params, project_id) in enumerate(pending):
                try:
                    self._db.execute(sql, params)
                except Exception as exc:
                    # SQLite may have rolled the whole transaction back (e.g. disk full)
                    if disk_failure(exc) or not self._db.in_transaction:
                        raise
                    dropped.append(index)
                    log.error(
                        "dropped a write that cannot be stored (project %s): %s: %.200s; "
                        "statement: %.100s",
                        project_id or "-",
                        type(exc).__name__,
                        str(exc),
                        " ".join(sql.split()),
                    )
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return dropped

    # ---- results files -------------------------------------------------------------------------

    def _results_file(self, project_id: str) -> Path:
        assert self._results_dir is not None
        return self._results_dir / f"{project_id}.bin"

    def _fd(self, project_id: str) -> int:
        fd = self._files.get(project_id)
        if fd is not None:
            self._files.move_to_end(project_id)
            return fd
        assert self._results_dir is not None
        self._results_dir.mkdir(exist_ok=True)
        fd = os.open(self._results_file(project_id), os.O_RDWR | os.O_CREAT, 0o600)
        self._files[project_id] = fd
        while len(self._files) > MAX_OPEN_RESULT_FILES:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def _write_at(self, project_id: str, offset: int, payload: bytes) -> None:
        fd = self._fd(project_id)
        view = memoryview(payload)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written

    def _remove_file(self, project_id: str) -> None:
        fd = self._files.pop(project_id, None)
        if fd is not None:
            os.close(fd)
        written = self._file_ends.pop(project_id, None) is not None
        if self._results_dir is not None and (written or project_id in self._files_at_start):
            self._files_at_start.discard(project_id)
            with contextlib.suppress(OSError):
                self._results_file(project_id).unlink()

    def _place(self, project_id: str, size: int) -> int:
        """Where the next ``size`` bytes of the project's results file go."""
        end = self._file_ends.get(project_id)
        if end is None:  # first payload since the server started: append to what is there
            try:
                end = self._results_file(project_id).stat().st_size
            except OSError:
                end = 0
        self._file_ends[project_id] = end + size
        return end

    def _read_payload(self, project_id: str, seq: int, at: int, size: int, crc: int) -> bytes:
        try:
            payload = os.pread(self._fd(project_id), size, at)
        except OSError as exc:
            raise StateError(f"cannot read result {seq} of project {project_id}: {exc}") from exc
        if len(payload) != size or zlib.crc32(payload) != crc:
            raise StateError(f"result {seq} of project {project_id} is damaged on disk")
        return payload

    # ---- devices -------------------------------------------------------------------------------

    def device_owner(self, device_id: str) -> str | None:
        """The identity a device id was given to; None for an unknown id."""
        row = self._db.execute(
            "SELECT owner FROM devices WHERE device_id=?", (device_id,)
        ).fetchone()
        return None if row is None else (row[0] or "")

    def device_seen(self, device_id: str, name: str, role: str, owner: str) -> None:
        now = time.time()
        self._queue(
            "INSERT INTO devices(device_id, name, role, first_seen, last_seen, owner) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
            "name=excluded.name, last_seen=excluded.last_seen, "
            "owner=coalesce(devices.owner, excluded.owner)",
            (device_id, name, role, now, now, owner),
        )

    # ---- projects ------------------------------------------------------------------------------

    def project_submitted(
        self,
        project_id: str,
        name: str,
        creator_device: str,
        code: bytes,
        spec: dict[str, Any],
        owner: str,
    ) -> None:
        packed = self._packed(project_id, "the project's spec", spec)
        if packed is None:
            return
        self._queue(
            "INSERT INTO projects(project_id, name, creator_device, submitted_at, status, code, "
            "spec, owner) VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
            (project_id, name, creator_device, time.time(), code, packed, owner),
            project_id,
        )

    def tasks_added(self, project_id: str, tasks: list[tuple[int, int, bytes, int]]) -> None:
        """``tasks``: (task_id, seq, items, n_items) in seq order."""
        for task in tasks:
            self._queue(
                "INSERT INTO tasks(task_id, project_id, seq, items, n_items) VALUES (?,?,?,?,?)",
                (task[0], project_id, task[1], task[2], task[3]),
                project_id,
            )
        self._queue(
            "UPDATE projects SET tasks_received=tasks_received+?, items_received=items_received+? "
            "WHERE project_id=?",
            (len(tasks), sum(t[3] for t in tasks), project_id),
            project_id,
        )

    def reserve_task_ids(self, ceiling: int) -> None:
        """Record that no task id above ``ceiling`` has been handed out. Task ids are never
        reused, even after their project is pruned: a worker may still deliver a result for
        an old id after a restart, so the server restarts above the ceiling."""
        self._queue(
            "INSERT INTO meta(key, value) VALUES ('max_task_id', ?) "
            "ON CONFLICT(key) DO UPDATE SET value=max(value, excluded.value)",
            (ceiling,),
        )

    def tasks_ended(self, project_id: str, total_tasks: int, total_items: int) -> None:
        self._queue(
            "UPDATE projects SET total_tasks=?, total_items=? WHERE project_id=?",
            (total_tasks, total_items, project_id),
            project_id,
        )

    def task_done(self, project_id: str, seq: int, message: dict[str, Any]) -> int:
        """A task's accepted result (the TaskDone fields), kept until the creator releases it.
        Returns the bytes it takes on disk, as :meth:`stored_result_bytes` counts them."""
        self._queue(
            "UPDATE tasks SET done=1, items=NULL WHERE project_id=? AND seq=?",
            (project_id, seq),
            project_id,
        )
        payload = message["payload"]
        if self._results_dir is None or len(payload) < FILE_PAYLOAD_MIN:
            blob = self._packed(project_id, f"result {seq}", message)
            if blob is None:
                return 0
            self._queue(
                "INSERT OR IGNORE INTO results(project_id, seq, message) VALUES (?, ?, ?)",
                (project_id, seq, blob),
                project_id,
            )
            return len(blob)
        # a large payload is appended to the project's results file, not copied through
        # SQLite's log and then its database file
        blob = self._packed(project_id, f"result {seq}", {**message, "payload": b""})
        if blob is None:
            return 0
        at = self._place(project_id, len(payload))
        self._file_writes.append((project_id, at, payload))
        self._queue(
            "INSERT OR IGNORE INTO results(project_id, seq, message, payload_at, payload_size, "
            "payload_crc) VALUES (?, ?, ?, ?, ?, ?)",
            (project_id, seq, blob, at, len(payload), zlib.crc32(payload)),
            project_id,
        )
        return len(blob) + len(payload)

    def project_finished(self, project_id: str, status: str, outcome: dict[str, Any]) -> None:
        stats = outcome.get("stats", {})
        packed = self._packed(project_id, "the project's outcome", outcome)
        if packed is None:  # how it ended is still stored, without what cannot be
            self._unstorable.discard(project_id)  # it has ended: there is nothing to fail
            message = "the server could not store this project's outcome; see its log"
            packed = _pack({"error": {"reason": "store_error", "message": message}, "stats": {}})
            stats = {}
        try:
            stats_text = json.dumps(stats)
        except (TypeError, ValueError):
            stats_text = "{}"
        self._queue(
            "UPDATE projects SET status=?, finished_at=?, stats=?, outcome=? WHERE project_id=?",
            (status, time.time(), stats_text, packed, project_id),
            project_id,
        )
        self._queue("DELETE FROM tasks WHERE project_id=?", (project_id,), project_id)

    def project_released(self, project_id: str) -> None:
        """The creator has every result: they need not be kept any longer."""
        self._queue("UPDATE projects SET released=1 WHERE project_id=?", (project_id,), project_id)
        self._queue("DELETE FROM results WHERE project_id=?", (project_id,), project_id)
        self._file_removals.append(project_id)

    def prune(self, keep_finished: float, now: float | None = None) -> list[str]:
        """Forget projects finished more than ``keep_finished`` seconds ago; returns them."""
        cutoff = (time.time() if now is None else now) - keep_finished
        old = [
            row[0]
            for row in self._db.execute(
                "SELECT project_id FROM projects WHERE status != 'running' AND finished_at < ?",
                (cutoff,),
            )
        ]
        for project_id in old:
            self._queue("DELETE FROM results WHERE project_id=?", (project_id,), project_id)
            self._queue("DELETE FROM tasks WHERE project_id=?", (project_id,), project_id)
            self._queue("DELETE FROM projects WHERE project_id=?", (project_id,), project_id)
            self._file_removals.append(project_id)
        return old

    # ---- reads ---------------------------------------------------------------------------------

    def project(self, project_id: str) -> StoredProject | None:
        row = self._db.execute(_PROJECT_SELECT + " WHERE project_id=?", (project_id,)).fetchone()
        return None if row is None else _project(row)

    def running_projects(self) -> list[StoredProject]:
        rows = self._db.execute(_PROJECT_SELECT + " WHERE status='running' ORDER BY submitted_at")
        return [_project(row) for row in rows]

    def open_tasks(self, project_id: str) -> Iterator[tuple[int, int, bytes, int]]:
        yield from self._db.execute(
            "SELECT task_id, seq, items, n_items FROM tasks WHERE project_id=? AND done=0 "
            "ORDER BY seq",
            (project_id,),
        )

    def done_counts(self, project_id: str) -> tuple[int, int, int]:
        """(tasks, items, items kept) of the project's stored results."""
        tasks = items = kept = 0
        for (blob,) in self._db.execute(
            "SELECT message FROM results WHERE project_id=?", (project_id,)
        ):
            message = _unpack(blob)
            tasks += 1
            items += message["n_items"]
            kept += message["n_kept"]
        return tasks, items, kept

    def results(self, project_id: str) -> Iterator[dict[str, Any]]:
        """The project's stored results (TaskDone fields), by seq, read a page at a time. A
        payload that cannot be read back intact comes as None, with the reason under
        ``"damaged"``."""
        after = -1
        while page := self.results_page(project_id, after):
            yield from page
            after = page[-1]["seq"]

    def results_page(
        self,
        project_id: str,
        after_seq: int,
        max_rows: int = RESULTS_PAGE_ROWS,
        max_bytes: int = RESULTS_PAGE_BYTES,
    ) -> list[dict[str, Any]]:
        """The project's next stored results after seq ``after_seq``, by seq: at most
        ``max_rows``, and no more once ``max_bytes`` are read (at least one). Empty at the
        end. Each is as :meth:`results` gives it, ``"seq"`` included."""
        cursor = self._db.execute(
            "SELECT seq, message, payload_at, payload_size, payload_crc FROM results "
            "WHERE project_id=? AND seq>? ORDER BY seq LIMIT ?",
            (project_id, after_seq, max_rows),
        )
        page: list[dict[str, Any]] = []
        total = 0
        try:
            for seq, blob, at, size, crc in cursor:
                message = _unpack(blob)
                message["seq"] = seq
                total += len(blob)
                if at is not None:
                    total += size
                    try:
                        message["payload"] = self._read_payload(project_id, seq, at, size, crc)
                    except StateError as exc:
                        message["payload"], message["damaged"] = None, str(exc)
                page.append(message)
                if total >= max_bytes:
                    break
        finally:
            cursor.close()
        return page

    def stored_result_bytes(self) -> list[tuple[str, str, int]]:
        """(project, owner, bytes) of every project whose stored results are not released;
        the bytes as :meth:`task_done` counts them."""
        rows = self._db.execute(
            "SELECT r.project_id, coalesce(p.owner, ''), "
            "sum(length(r.message) + coalesce(r.payload_size, 0)) "
            "FROM results AS r JOIN projects AS p ON p.project_id = r.project_id "
            "WHERE p.released = 0 GROUP BY r.project_id"
        ).fetchall()
        return [(row[0], row[1], int(row[2])) for row in rows]

    def max_task_id(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='max_task_id'").fetchone()
        return 0 if row is None else int(row[0])

    def projects(self) -> list[dict[str, Any]]:
        """One row per project; ``tasks_done``, ``items_done``, ``tasks_reissued`` and
        ``first_started_at`` (epoch seconds) are those of a finished project's final stats
        (None while it runs: the scheduler knows them)."""
        rows = self._db.execute(
            "SELECT project_id, name, status, submitted_at, finished_at, total_tasks, "
            "total_items, tasks_received, released, owner, stats FROM projects "
            "ORDER BY submitted_at"
        ).fetchall()
        keys = (
            "project_id",
            "name",
            "status",
            "submitted_at",
            "finished_at",
            "total_tasks",
            "total_items",
            "tasks_received",
            "released",
            "owner",
        )
        out = []
        for row in rows:
            record = dict(zip(keys, row[:-1], strict=True))
            try:
                stats = json.loads(row[-1]) if row[-1] else {}
            except ValueError:
                stats = {}
            if not isinstance(stats, dict):
                stats = {}
            for name in ("tasks_done", "items_done", "tasks_reissued"):
                value = stats.get(name)
                record[name] = value if type(value) is int else None
            # the stats' times are the server's monotonic clock: carry the delay over to ours
            started, submitted = stats.get("first_started_at"), stats.get("submitted_at")
            record["first_started_at"] = None
            if isinstance(started, int | float) and isinstance(submitted, int | float):
                record["first_started_at"] = record["submitted_at"] + (started - submitted)
            out.append(record)
        return out


_PROJECT_SELECT = (
    "SELECT project_id, name, status, submitted_at, finished_at, code, spec, total_tasks, "
    "total_items, tasks_received, items_received, outcome, released, owner FROM projects"
)


def _project(row: tuple[Any, ...]) -> StoredProject:
    return StoredProject(
        project_id=row[0],
        name=row[1],
        status=row[2],
        submitted_at=row[3],
        finished_at=row[4],
        code=row[5] or b"",
        spec=_unpack(row[6]) or {},
        total_tasks=row[7],
        total_items=row[8],
        tasks_received=row[9],
        items_received=row[10],
        outcome=_unpack(row[11]),
        released=bool(row[12]),
        owner=row[13],
    )


def disk_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a write, says the disk or the database file fails (True: keep
    the writes and retry them later) rather than that the statement cannot be stored (False: a
    bad row, e.g. OverflowError for an int past 64 bits, IntegrityError, InterfaceError)."""
    if isinstance(exc, OSError | MemoryError):
        return True
    if not isinstance(exc, sqlite3.Error):
        return False  # OverflowError, TypeError, ValueError...: raised binding the row
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in DISK_FAILURE_CODES
    # raised by the sqlite3 module itself: a bad parameter, or a database it cannot use
    return type(exc) in (sqlite3.OperationalError, sqlite3.DatabaseError, sqlite3.Error)


def _grouped(pending: list[tuple[str, Any, str | None]]) -> Iterator[tuple[str, list[Any]]]:
    """Consecutive statements with the same SQL, as executemany batches (order kept)."""
    sql: str | None = None
    batch: list[Any] = []
    for statement, params, _ in pending:
        if statement != sql and batch:
            assert sql is not None
            yield sql, batch
            batch = []
        sql = statement
        batch.append(params)
    if batch and sql is not None:
        yield sql, batch
