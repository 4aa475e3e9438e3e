"""The durable store on its own (no sockets): where result payloads live, and that they come
back intact or are reported damaged, across restarts and disk failures."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from dcproto.server.store import FILE_PAYLOAD_MIN, RESULTS_DIR, StateError, Store


def record(seq: int, payload: bytes) -> dict[str, Any]:
    return {
        "seq": seq,
        "payload": payload,
        "n_items": 1,
        "n_kept": 1,
        "files": [],
        "stats": {"run": 0.5},
    }


def submitted(store: Store, project_id: str = "P", n_tasks: int = 3) -> None:
    store.project_submitted(project_id, "proj", "device", b"code", {"options": {}}, "alice")
    store.tasks_added(project_id, [(i + 1, i, b"items", 1) for i in range(n_tasks)])
    store.commit()


def results_file(state: Path, project_id: str = "P") -> Path:
    return state / RESULTS_DIR / f"{project_id}.bin"


def test_large_payloads_go_to_the_projects_file_small_ones_inline(tmp_path: Path) -> None:
    store = Store(tmp_path)
    submitted(store)
    big = os.urandom(FILE_PAYLOAD_MIN * 3)
    small = b"s" * (FILE_PAYLOAD_MIN - 1)
    store.task_done("P", 0, record(0, big))
    store.task_done("P", 1, record(1, small))
    assert not results_file(tmp_path).exists()  # nothing is written before the commit
    store.commit()
    assert results_file(tmp_path).stat().st_size == len(big)
    got = list(store.results("P"))
    assert [(m["seq"], m["payload"], m["stats"]) for m in got] == [
        (0, big, {"run": 0.5}),
        (1, small, {"run": 0.5}),
    ]
    assert store.done_counts("P") == (2, 2, 2)
    store.close()


def test_payloads_survive_a_restart_and_new_ones_are_appended(tmp_path: Path) -> None:
    store = Store(tmp_path)
    submitted(store)
    first = os.urandom(FILE_PAYLOAD_MIN)
    store.task_done("P", 0, record(0, first))
    store.commit()
    del store  # no close(): as after a crash, the commit is all that counts

    again = Store(tmp_path)
    second = os.urandom(FILE_PAYLOAD_MIN * 2)
    again.task_done("P", 1, record(1, second))
    again.commit()
    assert [m["payload"] for m in again.results("P")] == [first, second]
    assert results_file(tmp_path).stat().st_size == len(first) + len(second)
    again.close()


def test_releasing_removes_the_file_after_the_commit(tmp_path: Path) -> None:
    store = Store(tmp_path)
    submitted(store)
    store.task_done("P", 0, record(0, os.urandom(FILE_PAYLOAD_MIN)))
    store.project_finished("P", "done", {"stats": {}})
    store.commit()
    store.project_released("P")
    assert results_file(tmp_path).exists()
    store.commit()
    assert not results_file(tmp_path).exists()
    assert list(store.results("P")) == []
    store.close()


def test_a_damaged_payload_is_reported_not_returned(tmp_path: Path) -> None:
    store = Store(tmp_path)
    submitted(store)
    payloads = [os.urandom(FILE_PAYLOAD_MIN) for _ in range(3)]
    for seq, payload in enumerate(payloads):
        store.task_done("P", seq, record(seq, payload))
    store.commit()
    with results_file(tmp_path).open("r+b") as fh:  # flip a byte of the middle payload
        fh.seek(FILE_PAYLOAD_MIN + 10)
        byte = fh.read(1)
        fh.seek(FILE_PAYLOAD_MIN + 10)
        fh.write(bytes([byte[0] ^ 0xFF]))
    got = list(store.results("P"))
    assert [m["payload"] for m in got] == [payloads[0], None, payloads[2]]
    assert "result 1 of project P is damaged on disk" in got[1]["damaged"]
    store.close()


def test_a_failed_payload_write_is_retried_with_its_row(tmp_path: Path) -> None:
    store = Store(tmp_path)
    submitted(store)
    (tmp_path / RESULTS_DIR).write_bytes(b"")  # a file where the directory should be
    payload = os.urandom(FILE_PAYLOAD_MIN)
    store.task_done("P", 0, record(0, payload))
    with pytest.raises(StateError, match="cannot write the server state"):
        store.commit()
    assert store.has_pending()
    assert list(store.results("P")) == []  # the row waits with its payload
    (tmp_path / RESULTS_DIR).unlink()
    store.commit()
    assert [m["payload"] for m in store.results("P")] == [payload]
    store.close()


def test_in_memory_store_keeps_payloads_inline(tmp_path: Path) -> None:
    store = Store(None)
    submitted(store)
    payload = os.urandom(FILE_PAYLOAD_MIN * 2)
    store.task_done("P", 0, record(0, payload))
    store.commit()
    assert [m["payload"] for m in store.results("P")] == [payload]
    store.close()


# ---- one bad row never costs other writes ------------------------------------------------------


def _project_ids(store: Store) -> set[str]:
    return {row["project_id"] for row in store.projects()}


def _others(store: Store, n: int = 5) -> list[str]:
    """``n`` projects of another owner, each with a task and a result, queued (not committed)."""
    ids = [f"other-{i}" for i in range(n)]
    for project_id in ids:
        store.project_submitted(project_id, "theirs", "device-b", b"code", {"options": {}}, "bob")
        store.tasks_added(project_id, [(100 + int(project_id[-1]), 0, b"items", 1)])
        store.task_done(project_id, 0, record(0, project_id.encode() * 10))
    return ids


def _check_others(store: Store, ids: list[str]) -> None:
    assert _project_ids(store) >= set(ids)
    for project_id in ids:
        assert [m["payload"] for m in store.results(project_id)] == [project_id.encode() * 10]
        stored = store.project(project_id)
        assert stored is not None
        assert (stored.tasks_received, stored.items_received) == (1, 1)


def test_an_int_past_64_bits_drops_only_its_statement(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first = _others(store, 3)
    store.project_submitted("bad", "mine", "device-a", b"code", {"options": {}}, "alice")
    store.tasks_ended("bad", 2**64 - 1, 1)  # sqlite3 raises OverflowError binding it
    # each task's n_items fits, their sum does not
    store.tasks_added("bad", [(1, 0, b"items", 2**62), (2, 1, b"items", 2**62)])
    later = [f"late-{i}" for i in range(2)]
    for project_id in later:
        store.project_submitted(project_id, "theirs", "device-b", b"code", {}, "bob")
    dropped = store.commit()
    assert dropped == {"bad"}
    assert store.dropped_writes == 2
    assert store.failed is None and not store.has_pending()
    _check_others(store, first)
    assert _project_ids(store) == {*first, "bad", *later}
    bad = store.project("bad")
    assert bad is not None and bad.total_tasks is None and bad.tasks_received == 0
    assert [task[1] for task in store.open_tasks("bad")] == [0, 1]  # the task rows are fine
    store.project_finished("bad", "failed", {"error": {"reason": "store_error"}})
    assert store.commit() == set()
    del store  # no close(): as after a crash

    again = Store(tmp_path)
    _check_others(again, first)
    assert _project_ids(again) == {*first, "bad", *later}
    again.close()


def test_a_constraint_violation_in_the_middle_drops_only_its_row(tmp_path: Path) -> None:
    store = Store(tmp_path)
    submitted(store, "P", n_tasks=1)  # task id 1, seq 0
    before = _others(store, 2)
    # the same seq twice (UNIQUE tasks_by_seq) and a task id in use (PRIMARY KEY)
    store._queue(
        "INSERT INTO tasks(task_id, project_id, seq, items, n_items) VALUES (?,?,?,?,?)",
        (50, "P", 0, b"again", 1),
        "P",
    )
    store._queue(
        "INSERT INTO tasks(task_id, project_id, seq, items, n_items) VALUES (?,?,?,?,?)",
        (1, "P", 7, b"again", 1),
        "P",
    )
    after = [f"after-{i}" for i in range(2)]
    for project_id in after:
        store.project_submitted(project_id, "theirs", "device-b", b"code", {}, "bob")
    assert store.commit() == {"P"}
    assert store.dropped_writes == 2
    _check_others(store, before)
    assert _project_ids(store) == {"P", *before, *after}
    assert [(t[0], t[1], t[2]) for t in store.open_tasks("P")] == [(1, 0, b"items")]
    del store

    again = Store(tmp_path)
    _check_others(again, before)
    assert _project_ids(again) == {"P", *before, *after}
    again.close()


def test_an_unbindable_value_drops_only_its_row(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ids = _others(store, 2)
    store._queue("UPDATE projects SET name=? WHERE project_id=?", ({"a": 1}, "other-0"), "x")
    store._queue("UPDATE projects SET name=? WHERE project_id=?", ("bad\udc80", "other-1"), "y")
    assert store.commit() == {"x", "y"}
    _check_others(store, ids)
    assert {row["name"] for row in store.projects()} == {"theirs"}
    store.close()


def test_a_failing_disk_keeps_every_write_for_a_retry(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ids = _others(store, 3)
    store._db.execute("PRAGMA query_only=ON")  # every write fails: SQLITE_READONLY
    for _ in range(2):
        with pytest.raises(StateError, match="cannot write the server state"):
            store.commit()
        assert store.failed is not None and "readonly" in store.failed
        assert store.has_pending()
        assert store.dropped_writes == 0
    assert _project_ids(store) == set()
    store._db.execute("PRAGMA query_only=OFF")
    assert store.commit() == set()
    assert store.failed is None
    _check_others(store, ids)
    store.close()


def test_a_disk_failure_after_a_bad_row_still_keeps_the_good_writes(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ids = _others(store, 2)
    store.tasks_ended("other-0", 2**64, 1)
    store._db.execute("PRAGMA query_only=ON")
    with pytest.raises(StateError):
        store.commit()  # the disk fails too: nothing is dropped yet, everything is kept
    assert store.dropped_writes == 0 and store.has_pending()
    store._db.execute("PRAGMA query_only=OFF")
    assert store.commit() == {"other-0"}
    _check_others(store, ids)
    store.close()


def test_disk_failure_tells_the_disk_from_the_row() -> None:
    from dcproto.server.store import disk_failure

    def sqlite_error(cls: type[sqlite3.Error], code: int) -> sqlite3.Error:
        exc = cls("x")
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
        return exc

    assert disk_failure(OSError(5, "EIO"))
    assert disk_failure(sqlite_error(sqlite3.OperationalError, 10))  # IOERR
    assert disk_failure(sqlite_error(sqlite3.OperationalError, 10 | (3 << 8)))  # IOERR_WRITE
    assert disk_failure(sqlite_error(sqlite3.OperationalError, 13))  # FULL
    assert disk_failure(sqlite_error(sqlite3.OperationalError, 8))  # READONLY
    assert disk_failure(sqlite3.OperationalError("no code"))
    assert not disk_failure(OverflowError("Python int too large to convert to SQLite INTEGER"))
    assert not disk_failure(TypeError("x"))
    assert not disk_failure(ValueError("x"))
    assert not disk_failure(sqlite_error(sqlite3.IntegrityError, 19))  # CONSTRAINT
    assert not disk_failure(sqlite_error(sqlite3.DataError, 18))  # TOOBIG
    assert not disk_failure(sqlite3.InterfaceError("Error binding parameter 1"))
    assert not disk_failure(sqlite3.ProgrammingError("Incorrect number of bindings"))


def test_results_come_a_page_at_a_time(tmp_path: Path) -> None:
    store = Store(tmp_path)
    submitted(store, n_tasks=10)
    payloads = [os.urandom(FILE_PAYLOAD_MIN * 2 if seq % 2 else 100) for seq in range(10)]
    for seq in (3, 1, 0, 2, 9, 5, 4, 8, 7, 6):  # completion order is not seq order
        store.task_done("P", seq, record(seq, payloads[seq]))
    store.commit()
    page = store.results_page("P", -1, max_rows=4)
    assert [m["seq"] for m in page] == [0, 1, 2, 3]
    page = store.results_page("P", 3, max_bytes=1)  # one row at least
    assert [m["seq"] for m in page] == [4]
    page = store.results_page("P", 4, max_bytes=FILE_PAYLOAD_MIN * 3)
    assert [m["seq"] for m in page] == [5, 6, 7]
    assert store.results_page("P", 9) == []
    assert [m["payload"] for m in store.results("P")] == payloads
    store.close()


def test_stored_result_bytes_match_what_task_done_counted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    submitted(store, "P", n_tasks=3)
    submitted(store, "Q", n_tasks=1)
    counted = {"P": 0, "Q": 0}
    for seq, size in enumerate((10, FILE_PAYLOAD_MIN * 5, 1000)):
        counted["P"] += store.task_done("P", seq, record(seq, os.urandom(size)))
    counted["Q"] += store.task_done("Q", 0, record(0, b"q"))
    store.commit()
    assert sorted(store.stored_result_bytes()) == [
        ("P", "alice", counted["P"]),
        ("Q", "alice", counted["Q"]),
    ]
    assert counted["P"] > FILE_PAYLOAD_MIN * 5
    store.project_finished("Q", "done", {})
    store.project_released("Q")
    store.commit()
    assert store.stored_result_bytes() == [("P", "alice", counted["P"])]
    store.close()


def test_values_that_cannot_be_packed_are_dropped_when_queued(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ids = _others(store, 2)
    submitted(store, "P")
    store.project_submitted("Q", "q", "device", b"code", {"options": {"x": 2**64}}, "alice")
    assert store.task_done("P", 0, {**record(0, b"small"), "stats": {"n": 2**64}}) == 0
    assert store.task_done("P", 1, {**record(1, bytes(FILE_PAYLOAD_MIN)), "stats": {1j: 1}}) == 0
    assert store.task_done("P", 2, record(2, b"fine")) > 0
    assert store.commit() == {"P", "Q"}
    assert store.dropped_writes == 3
    _check_others(store, ids)
    assert store.project("Q") is None
    assert [m["seq"] for m in store.results("P")] == [2]
    # an outcome that cannot be packed: the project still ends, its stats left out
    store.project_finished("P", "done", {"error": None, "stats": {"items_done": 2**70}})
    assert store.commit() == set()
    finished = store.project("P")
    assert finished is not None and finished.status == "done"
    assert finished.outcome is not None and finished.outcome["error"]["reason"] == "store_error"
    store.close()
