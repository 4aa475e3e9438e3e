"""Streamed replays (dcproto.server.replay) without sockets: pages, order, held-back live
messages, the limit on waiting replays."""

from __future__ import annotations

from typing import Any

import pytest

from dcproto import protocol as p
from dcproto.server.replay import Replay, Replays, TooManyReplays


def result(seq: int, size: int = 10) -> dict[str, Any]:
    return {
        "seq": seq,
        "items": b"i",
        "payload": bytes(size),
        "n_items": 1,
        "n_kept": 1,
        "files": [],
        "stats": {},
    }


class FakeStore:
    """Pages of stored results, as Store.results_page gives them; counts the reads."""

    def __init__(self, results: dict[str, list[dict[str, Any]]]) -> None:
        self.results = results
        self.reads = 0

    def page(self, project_id: str, after_seq: int, max_bytes: int) -> list[dict[str, Any]]:
        self.reads += 1
        page: list[dict[str, Any]] = []
        total = 0
        for message in sorted(self.results.get(project_id, []), key=lambda m: m["seq"]):
            if message["seq"] > after_seq:
                page.append(dict(message))
                total += len(message["payload"] or b"")
                if total >= max_bytes:
                    break
        return page


def finished(project_id: str, status: str = "done") -> p.Finished:
    return p.Finished(project_id=project_id, status=status, error=None, stop=None, stats={})


def drain(replays: Replays, store: FakeStore, budget: int) -> list[list[p.Message]]:
    steps = []
    while step := replays.step(store.page, budget):
        steps.append(step)
    return steps


def describe(messages: list[p.Message]) -> list[tuple[str, str, int | str]]:
    out: list[tuple[str, str, int | str]] = []
    for m in messages:
        if isinstance(m, p.TaskDone):
            out.append(("done", m.project_id, m.seq))
        elif isinstance(m, p.Finished):
            out.append(("finished", m.project_id, m.status))
        else:
            out.append((type(m).__name__, getattr(m, "project_id", ""), ""))
    return out


def test_a_replay_comes_a_page_per_step_then_its_last_message() -> None:
    store = FakeStore({"A": [result(seq, 100) for seq in range(10)]})
    replays = Replays()
    assert replays.add(Replay("A", finished("A"), {}))
    steps = drain(replays, store, budget=300)
    assert [len(step) for step in steps] == [3, 3, 3, 1, 1]
    flat = [m for step in steps for m in step]
    assert describe(flat) == [("done", "A", s) for s in range(10)] + [("finished", "A", "done")]
    assert len(replays) == 0


def test_unsaved_results_come_after_the_stored_ones_each_once() -> None:
    store = FakeStore({"A": [result(0), result(2)]})
    unsaved = {2: result(2), 5: result(5), 1: result(1)}  # 2 reached the disk meanwhile
    replays = Replays()
    replays.add(Replay("A", None, unsaved))
    flat = [m for step in drain(replays, store, 1 << 20) for m in step]
    assert describe(flat) == [
        ("done", "A", 0),
        ("done", "A", 2),
        ("done", "A", 5),
        ("done", "A", 1),
    ]


def test_live_messages_of_a_replaying_project_wait_for_its_end() -> None:
    store = FakeStore({"A": [result(seq, 100) for seq in range(4)], "B": [result(0)]})
    replays = Replays()
    replays.add(Replay("A", None, {}))
    replays.add(Replay("B", finished("B"), {}))
    first = replays.step(store.page, 100)
    # live: a new result and Finished of A, a result of C (not replaying: sent at once)
    live_a = p.TaskDone(
        project_id="A",
        seq=9,
        items=b"",
        payload=b"x" * 1000,
        n_items=1,
        n_kept=1,
        files=[],
        stats={},
    )
    assert replays.hold(live_a)
    assert replays.hold(finished("A"))
    assert not replays.hold(p.Notice(project_id="A", level="info", text="hi"))  # may overtake
    assert not replays.hold(
        p.TaskDone(
            project_id="C", seq=0, items=b"", payload=b"", n_items=1, n_kept=1, files=[], stats={}
        )
    )
    assert replays.held_bytes >= 1000
    rest = [m for step in drain(replays, store, 100) for m in step]
    assert describe(first + rest) == [
        ("done", "A", 0),
        ("done", "A", 1),
        ("done", "A", 2),
        ("done", "A", 3),
        ("done", "A", 9),
        ("finished", "A", "done"),
        ("done", "B", 0),
        ("finished", "B", "done"),
    ]
    assert replays.held_bytes == 0


def test_a_waiting_replay_holds_its_live_messages_too() -> None:
    store = FakeStore({"A": [result(0)], "B": [result(0)]})
    replays = Replays()
    replays.add(Replay("A", None, {}))
    replays.add(Replay("B", None, {}))
    assert replays.hold(finished("B"))
    flat = [m for step in drain(replays, store, 1 << 20) for m in step]
    assert describe(flat)[-2:] == [("done", "B", 0), ("finished", "B", "done")]


def test_a_repeated_project_starts_no_second_replay_and_the_queue_is_bounded() -> None:
    replays = Replays(limit=3)
    assert replays.add(Replay("A", None, {}))
    assert not replays.add(Replay("A", None, {}))
    assert replays.add(Replay("B", None, {}))
    assert replays.add(Replay("C", None, {}))
    assert not replays.add(Replay("C", None, {}))  # a repeat is fine even when full
    with pytest.raises(TooManyReplays):
        replays.add(Replay("D", None, {}))
    assert len(replays) == 3


def test_a_damaged_result_becomes_a_notice() -> None:
    damaged = {**result(1), "payload": None, "damaged": "result 1 of project A is damaged"}
    store = FakeStore({"A": [result(0), damaged]})
    replays = Replays()
    replays.add(Replay("A", finished("A"), {}))
    flat = [m for step in drain(replays, store, 1 << 20) for m in step]
    assert describe(flat) == [
        ("done", "A", 0),
        ("Notice", "A", ""),
        ("finished", "A", "done"),
    ]
