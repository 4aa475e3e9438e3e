"""The durable store on its own (no sockets): where result payloads live, and that they come
back intact or are reported damaged, across restarts and disk failures."""

from __future__ import annotations

import os
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
