"""Tests for dcproto.server.scheduler: the server's pure state machine (events in, actions out).

No sockets, no sleeps: time is always the injected ``now``.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcproto import protocol as p
from dcproto.options import DEFAULT_OPTIONS, normalize_options
from dcproto.server.scheduler import (
    DEFAULT_MAX_SLOTS,
    MAX_HELD_PER_SLOT,
    MIN_WINDOW,
    PREFETCH_MARGIN,
    TASK_TIME_GRACE,
    TASK_TRANSITIONS,
    AbandonTasks,
    Action,
    CreditExceeded,
    Incident,
    RecallTasks,
    Scheduler,
    SendProject,
    SendTask,
    StoreTasks,
    TaskState,
    ToCreator,
    TooManyItems,
    WakeAt,
)

CREATOR = "creator-1"
OTHER_CREATOR = "creator-2"


# ---- helpers -----------------------------------------------------------------------------------


def make_submit(project_id: str = "P", name: str = "proj", **options: Any) -> p.Submit:
    return p.Submit(
        project_id=project_id,
        name=name,
        code=b"code",
        modules=["math"],
        parallel="work",
        stop=None,
        only_if=None,
        options=options,
    )


def make_tasks(project_id: str, seqs: range | list[int], n_items: int = 2) -> p.Tasks:
    return p.Tasks(project_id=project_id, tasks=[[seq, b"items-%d" % seq, n_items] for seq in seqs])


def make_end(project_id: str, total: int) -> p.End:
    return p.End(project_id=project_id, total_tasks=total, total_items=2 * total)


def make_result(
    task: p.Task,
    outcome: str = "ok",
    *,
    attempt: int | None = None,
    payload: bytes = b"payload",
    credit: int = 1,
    error: dict[str, Any] | None = None,
    n_items: int = 2,
    n_kept: int = 1,
    stats: dict[str, Any] | None = None,
    files: list[Any] | None = None,
) -> p.Result:
    return p.Result(
        task_id=task.task_id,
        attempt=task.attempt if attempt is None else attempt,
        outcome=outcome,
        payload=payload,
        n_items=n_items,
        n_kept=n_kept,
        error=error,
        stats={} if stats is None else stats,
        files=[] if files is None else files,
        credit=credit,
    )


def valid(actions: list[Action]) -> list[Action]:
    """Every message in ``actions`` must be encodable on the wire (StoreTasks is not sent)."""
    for action in actions:
        if isinstance(action, SendProject | SendTask | ToCreator):
            p.encode(action.message)
        elif isinstance(action, AbandonTasks):
            p.encode(p.Abandon(task_ids=action.task_ids))
        elif isinstance(action, RecallTasks):
            p.encode(p.Recall(task_ids=action.task_ids))
        elif isinstance(action, WakeAt):
            assert math.isfinite(action.when)
        else:
            assert isinstance(action, StoreTasks), action
            for task_id, seq, items, n_items in action.tasks:
                assert type(task_id) is int and type(seq) is int and type(n_items) is int
                assert isinstance(items, bytes)
    return actions


def stored(actions: list[Action]) -> list[tuple[str, list[tuple[int, int, bytes, int]]]]:
    return [(a.project_id, a.tasks) for a in actions if isinstance(a, StoreTasks)]


def unstored(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, StoreTasks)]


def sends(actions: list[Action]) -> list[SendTask]:
    return [a for a in actions if isinstance(a, SendTask)]


def sent(actions: list[Action]) -> list[tuple[str, int, int]]:
    """(worker, task_id, attempt) of each SendTask, in order."""
    return [(a.worker_id, a.message.task_id, a.message.attempt) for a in sends(actions)]


def creator_msgs(actions: list[Action], cls: type[p.Message] = p.Message) -> list[Any]:
    return [a.message for a in actions if isinstance(a, ToCreator) and isinstance(a.message, cls)]


def one(actions: list[Action], cls: type[p.Message]) -> Any:
    found = creator_msgs(actions, cls)
    assert len(found) == 1, actions
    return found[0]


def abandons(actions: list[Action]) -> dict[str, list[int]]:
    return {a.worker_id: sorted(a.task_ids) for a in actions if isinstance(a, AbandonTasks)}


def new_project(
    s: Scheduler,
    project_id: str = "P",
    *,
    creator: str = CREATOR,
    now: float = 0.0,
    name: str = "proj",
    **options: Any,
) -> list[Action]:
    return valid(s.submit(creator, make_submit(project_id, name=name, **options), now))


def join(
    s: Scheduler,
    worker_id: str,
    *,
    credit: int = 0,
    slots: int | None = None,
    now: float = 0.0,
    device: str | None = None,
) -> list[Action]:
    """Worker ``worker_id`` joins (as device ``dev-<worker_id>`` unless told otherwise), with
    a slot per unit of credit unless told otherwise: a worker gets tasks beyond its slots only
    once the times that size its prefetch are measured (see ``measured``)."""
    slots = max(1, credit) if slots is None else slots
    actions = s.add_worker(
        worker_id, device_id=device or f"dev-{worker_id}", name=worker_id, slots=slots, now=now
    )
    if credit:
        actions += s.worker_credit(worker_id, credit, now)
    return valid(actions)


def measured(s: Scheduler, worker_id: str, project_id: str = "P", per_slot: int = 1) -> None:
    """As if the project's task time (1 s) and the worker's round trip were measured so that
    the worker, with a task just started in each slot, holds ``per_slot`` tasks per slot
    beyond the ones it runs: PREFETCH_MARGIN round trips are ``per_slot + 1`` tasks' work."""
    s.projects[project_id].task_seconds = 1.0
    worker = s.workers[worker_id]
    worker.rtt = (per_slot + 1) / PREFETCH_MARGIN
    worker.prefetch = worker.slots * min(p.MAX_PREFETCH_PER_SLOT, per_slot + 1)
    s._refresh(worker)


def add(
    s: Scheduler, project_id: str, seqs: range | list[int], *, creator: str = CREATOR, now=0.0
) -> list[Action]:
    """Send tasks ``seqs`` (the project's next seqs, in order); checks that exactly those were
    stored, as one StoreTasks ahead of the other actions, which are returned."""
    next_id = s._next_task_id
    actions = valid(s.add_tasks(creator, make_tasks(project_id, seqs), now))
    expected = [(next_id + i, seq, b"items-%d" % seq, 2) for i, seq in enumerate(seqs)]
    if expected:
        assert actions[0] == StoreTasks(project_id, expected), actions
    assert stored(actions[1:]) == []
    return unstored(actions)


def answer(s: Scheduler, send: SendTask, outcome: str = "ok", *, now: float = 1.0, **kw: Any):
    return valid(s.task_result(send.worker_id, make_result(send.message, outcome, **kw), now))


# ---- options and submit ------------------------------------------------------------------------


def test_task_transitions_table_is_consistent() -> None:
    assert all(
        isinstance(a, TaskState) and isinstance(b, TaskState)
        for (a, _), b in TASK_TRANSITIONS.items()
    )
    assert TASK_TRANSITIONS[(TaskState.QUEUED, "lease")] is TaskState.LEASED


def test_normalize_options_defaults_and_unknown_keys() -> None:
    assert normalize_options({}) == DEFAULT_OPTIONS
    merged = normalize_options({"bogus": 1, "task_timeout": 5, "fail_when_unrunnable": 1})
    assert "bogus" not in merged
    assert merged["task_timeout"] == 5
    assert merged["fail_when_unrunnable"] is True
    assert normalize_options({"lease_timeout": 2, "errors": "skip", "max_attempts": 1}) == {
        **DEFAULT_OPTIONS,
        "lease_timeout": 2,
        "errors": "skip",
        "max_attempts": 1,
    }


@pytest.mark.parametrize(
    "options",
    [
        {"lease_timeout": 0},
        {"lease_timeout": -1.5},
        {"lease_timeout": "30"},
        {"lease_timeout": None},
        {"task_timeout": 0},
        {"task_timeout": -2},
        {"task_timeout": "10"},
        {"max_attempts": 0},
        {"max_attempts": 2.0},
        {"max_attempts": True},
        {"max_attempts": "3"},
        {"errors": "ignore"},
        {"errors": None},
        {"lease_timeout": 0.5},  # too short to be renewed by heartbeats
        {"max_reissues": 0},
        {"max_reissues": 1.5},
        {"max_reissues": True},
    ],
)
def test_normalize_options_rejects_bad_values(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        normalize_options(options)
    s = Scheduler()
    with pytest.raises(ValueError):
        s.submit(CREATOR, make_submit(**options), 0.0)
    assert s.projects == {}


@pytest.mark.parametrize(
    "options",
    [
        {"lease_timeout": math.nan},
        {"lease_timeout": math.inf},
        {"lease_timeout": -math.inf},
        {"lease_timeout": True},
        {"task_timeout": math.nan},
        {"task_timeout": math.inf},
        {"task_timeout": True},
        {"task_timeout": False},
    ],
)
def test_normalize_options_rejects_nan_inf_and_bool_timeouts(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        normalize_options(options)
    s = Scheduler()
    with pytest.raises(ValueError):
        s.submit(CREATOR, make_submit(**options), 0.0)
    assert s.projects == {}


def test_normalize_options_accepts_finite_int_and_float_timeouts() -> None:
    merged = normalize_options({"lease_timeout": 1.5, "task_timeout": 7})
    assert (merged["lease_timeout"], merged["task_timeout"]) == (1.5, 7)
    assert normalize_options({"task_timeout": None})["task_timeout"] is None


def test_submit_without_workers_grants_min_window() -> None:
    s = Scheduler()
    actions = valid(s.submit(CREATOR, make_submit("P"), 0.0))
    # the Submit came with INITIAL_CREDIT, which is the whole minimum window
    assert MIN_WINDOW == p.INITIAL_CREDIT
    assert actions[0] == ToCreator(CREATOR, p.Accepted(project_id="P", credit=0))
    # with nobody connected, the creator is also told so, after Accepted
    assert len(actions) == 2
    notice = actions[1]
    assert isinstance(notice, ToCreator) and notice.creator_id == CREATOR
    assert isinstance(notice.message, p.Notice)
    assert notice.message.project_id == "P"
    assert notice.message.level == "info"
    assert notice.message.text.startswith("no worker is connected yet; ")
    assert s.projects["P"].credit_outstanding == MIN_WINDOW
    project = s.projects["P"].message
    assert project.project_id == "P"
    assert project.modules == ["math"]
    assert project.options == DEFAULT_OPTIONS


def test_submit_window_is_four_times_total_slots() -> None:
    s = Scheduler()
    join(s, "A", slots=6)
    join(s, "B", slots=4)
    actions = new_project(s)
    assert one(actions, p.Accepted).credit == 40 - p.INITIAL_CREDIT
    assert creator_msgs(actions, p.Notice) == []  # a worker is connected: no notice
    # a few slots: the window never drops below MIN_WINDOW
    s2 = Scheduler()
    join(s2, "A", slots=3)
    assert one(new_project(s2), p.Accepted).credit == MIN_WINDOW - p.INITIAL_CREDIT


def test_submit_duplicate_project_raises() -> None:
    s = Scheduler()
    new_project(s)
    with pytest.raises(ValueError, match="exists"):
        new_project(s)


def test_add_worker_twice_raises() -> None:
    s = Scheduler()
    join(s, "A")
    with pytest.raises(ValueError, match="already connected"):
        join(s, "A")


# ---- pushing tasks to workers ------------------------------------------------------------------


def test_send_project_once_per_worker_per_project_before_first_task() -> None:
    s = Scheduler()
    new_project(s, "P")
    new_project(s, "Q")
    add(s, "P", range(3))
    actions = join(s, "A", credit=3, slots=5)
    assert isinstance(actions[0], SendProject)
    assert actions[0] == SendProject("A", s.projects["P"].message)
    assert [type(a) for a in actions] == [SendProject, SendTask, SendTask, SendTask]
    # more tasks of P: no second SendProject
    actions = add(s, "P", [3])
    assert actions == []
    actions = s.worker_credit("A", 1, 1.0)
    assert [type(a) for a in actions] == [SendTask]
    # another project: its own SendProject, right before its first task
    add(s, "Q", [0])
    actions = s.worker_credit("A", 1, 1.0)
    assert [type(a) for a in actions] == [SendProject, SendTask]
    assert actions[0].message.project_id == "Q"
    # another worker gets its own copy
    add(s, "P", [4])
    actions = join(s, "B", credit=1)
    assert [type(a) for a in actions] == [SendProject, SendTask]
    assert actions[0].worker_id == "B"


def test_tasks_flow_only_while_the_worker_has_credit() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(3))
    actions = join(s, "A", credit=1)
    assert sent(actions) == [("A", 1, 1)]
    assert s.workers["A"].credit == 0
    assert sends(s.worker_credit("A", 0, 0.5)) == []  # zero credit: nothing
    # the result hands one credit back: one more task
    actions = answer(s, sends(actions)[0], credit=1)
    assert sent(actions) == [("A", 2, 1)]
    # a result that returns no credit: nothing more
    actions = answer(s, sends(actions)[0], credit=0)
    assert sends(actions) == []
    assert len(s.projects["P"].queue) == 1
    assert sent(s.worker_credit("A", 5, 2.0)) == [("A", 3, 1)]
    assert s.workers["A"].credit == 4


def test_worker_with_credit_gets_tasks_when_they_arrive() -> None:
    s = Scheduler()
    new_project(s)
    assert join(s, "A", credit=2) == []
    assert sent(add(s, "P", range(3))) == [("A", 1, 1), ("A", 2, 1)]


def test_two_workers_alternate_one_task_per_pass() -> None:
    s = Scheduler()
    new_project(s)
    join(s, "A", credit=2)
    join(s, "B", credit=2)
    actions = add(s, "P", range(5))
    assert [w for w, _, _ in sent(actions)] == ["A", "B", "A", "B"]
    assert [t for _, t, _ in sent(actions)] == [1, 2, 3, 4]
    assert s.projects["P"].first_started_at == 0.0


def test_fairness_small_project_is_interleaved_with_a_big_one() -> None:
    s = Scheduler()
    new_project(s, "BIG")
    add(s, "BIG", range(30))
    new_project(s, "SMALL")
    add(s, "SMALL", range(10))
    order: list[str] = []
    actions = join(s, "A", credit=1)
    for step in range(40):
        (send,) = sends(actions)
        order.append(send.message.project_id)
        actions = answer(s, send, now=1.0 + step, credit=1)
    small_at = [i for i, project_id in enumerate(order) if project_id == "SMALL"]
    assert len(small_at) == 10
    assert max(small_at) < 20
    assert order[:20] == ["BIG", "SMALL"] * 10
    assert order[20:] == ["BIG"] * 20


# ---- results -----------------------------------------------------------------------------------


def test_ok_result_is_forwarded_with_stats() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", [0], now=0.5)
    (send,) = sends(join(s, "A", credit=1, now=1.0))
    files = [["out.txt", b"data"]]
    actions = valid(
        s.task_result(
            "A",
            make_result(send.message, payload=b"kept", stats={"cpu": 0.25}, files=files, n_kept=1),
            3.5,
        )
    )
    done = one(actions, p.TaskDone)
    assert done == p.TaskDone(
        project_id="P",
        seq=0,
        items=b"items-0",
        payload=b"kept",
        n_items=2,
        n_kept=1,
        files=files,
        stats={"cpu": 0.25, "worker": "A", "attempt": 1, "round_trip": 2.5},
    )
    assert s.tasks == {}
    assert s.workers["A"].leased == set()
    assert s.projects["P"].leased == set()


def test_end_then_last_result_finishes_done_with_stats() -> None:
    s = Scheduler()
    new_project(s, now=10.0)
    add(s, "P", range(2), now=10.0)
    (first,) = sends(join(s, "A", credit=1, now=11.0))
    (second,) = sends(join(s, "B", credit=1, now=11.5))
    assert creator_msgs(s.end_tasks(CREATOR, make_end("P", 2), 12.0)) == []
    actions = answer(s, first, now=13.0)
    assert creator_msgs(actions, p.Finished) == []
    actions = answer(s, second, now=14.0, n_kept=0)
    assert [type(m) for m in creator_msgs(actions)] == [p.TaskDone, p.Finished]
    finished = one(actions, p.Finished)
    assert finished.status == "done"
    assert finished.error is None and finished.stop is None
    assert finished.stats == {
        "submitted_at": 10.0,
        "first_started_at": 11.0,
        "finished_at": 14.0,
        "tasks_done": 2,
        "items_done": 4,
        "items_kept": 1,
        "tasks_reissued": 0,
        "tasks_recalled": 0,
        "duplicates_dropped": 0,
        "forged_results_dropped": 0,
        "tasks_overdue": 0,
        "per_worker": {"A": 1, "B": 1},
    }
    assert s.projects["P"].status == "done"


def test_end_with_zero_tasks_finishes_at_once() -> None:
    s = Scheduler()
    new_project(s)
    actions = valid(s.end_tasks(CREATOR, make_end("P", 0), 1.0))
    finished = one(actions, p.Finished)
    assert finished.status == "done"
    assert finished.stats["tasks_done"] == 0
    assert finished.stats["first_started_at"] is None
    # End again, or from a stranger, is ignored
    assert s.end_tasks(CREATOR, make_end("P", 0), 2.0) == []
    new_project(s, "Q")
    assert s.end_tasks(OTHER_CREATOR, make_end("Q", 0), 2.0) == []
    assert s.end_tasks(CREATOR, make_end("nope", 0), 2.0) == []
    assert s.projects["Q"].status == "running"


# ---- first result wins, duplicates -------------------------------------------------------------


def expired_setup() -> tuple[Scheduler, SendTask]:
    """Project P (lease 2 s), task 1 sent to A at t=0; A went silent and the lease expired.

    A is now suspect, task 1 waits at the front of the queue and B (connected) has no credit.
    """
    s = Scheduler()
    new_project(s, lease_timeout=2)
    add(s, "P", [0])
    (send_a,) = sends(join(s, "A", credit=1))
    join(s, "B")
    actions = s.tick(3.0)
    assert actions == [AbandonTasks("A", [1])]
    assert s.workers["A"].suspect
    assert list(s.projects["P"].queue) == [1]
    return s, send_a


def test_earlier_attempt_from_the_same_worker_wins() -> None:
    s, old = expired_setup()
    s.remove_worker("B", 3.0)
    # A wakes, grants credit: it gets task 1 again as attempt 2
    (new,) = sends(s.worker_credit("A", 1, 4.0))
    assert (new.worker_id, new.message.attempt) == ("A", 2)
    # then attempt 1's late ok arrives first: it wins, and attempt 2 is withdrawn from A
    actions = answer(s, old, now=4.5, credit=0)
    assert [type(a) for a in actions] == [AbandonTasks, ToCreator]
    assert abandons(actions) == {"A": [1]}
    done = one(actions, p.TaskDone)
    assert (done.seq, done.payload, done.stats["worker"]) == (0, b"payload", "A")
    assert s.tasks == {}
    assert s.workers["A"].leased == set()
    assert s.projects["P"].leased == set()
    assert s.next_deadline() is None
    assert s.projects["P"].tasks_done == 1
    assert s.projects["P"].duplicates_dropped == 0
    # A answers the withdrawn attempt 2: "abandoned" is not a duplicate
    assert answer(s, new, "abandoned", now=5.0, credit=0, payload=b"") == []
    assert s.projects["P"].duplicates_dropped == 0
    # an attempt is answered once: a second answer to it is a replay, dropped as forged
    assert answer(s, new, now=5.1, credit=0) == []
    assert s.projects["P"].duplicates_dropped == 0
    assert s.forged_results_dropped == 1
    assert s.projects["P"].tasks_done == 1


def test_earlier_attempt_from_another_worker_wins_and_the_holder_is_abandoned() -> None:
    s, old = expired_setup()
    actions = s.worker_credit("B", 1, 3.5)
    assert sent(actions) == [("B", 1, 2)]
    (send_b,) = sends(actions)
    add(s, "P", [1])
    # A's late ok of attempt 1 wins: B must drop attempt 2, and A's credit brings it new work
    actions = answer(s, old, now=4.0, credit=1)
    assert [type(a) for a in actions] == [AbandonTasks, ToCreator, SendTask]
    assert abandons(actions) == {"B": [1]}
    done = one(actions, p.TaskDone)
    assert (done.seq, done.stats["worker"]) == (0, "A")
    assert sent(actions) == [("A", 2, 1)]
    assert not s.workers["A"].suspect
    assert s.workers["B"].leased == set()
    assert s.projects["P"].leased == {2}
    assert s.projects["P"].per_worker == Counter({"A": 1})
    # B's answer to the withdrawn attempt is a dropped duplicate; its credit still comes back
    actions = answer(s, send_b, now=4.5, credit=1)
    assert creator_msgs(actions) == []
    assert s.projects["P"].duplicates_dropped == 1
    assert s.projects["P"].tasks_done == 1
    assert s.workers["B"].credit == 1


def test_result_from_a_replacement_connection_wins() -> None:
    """A's connection dropped while it ran task 1; it came back as A2 and reports attempt 1."""
    s = Scheduler()
    new_project(s)
    add(s, "P", [0])
    (old,) = sends(join(s, "A", credit=1))
    join(s, "B", credit=1)
    assert sent(s.remove_worker("A", 1.0)) == [("B", 1, 2)]
    join(s, "A2", now=2.0, device="dev-A")  # the same device, on a new connection
    actions = valid(s.task_result("A2", make_result(old.message), 3.0))
    assert abandons(actions) == {"B": [1]}
    assert one(actions, p.TaskDone).stats["worker"] == "A2"
    assert s.workers["B"].leased == set()
    assert s.workers["A2"].credit == 1
    assert s.projects["P"].tasks_done == 1


def test_earlier_attempt_wins_while_the_task_waits_in_the_queue() -> None:
    s, old = expired_setup()
    add(s, "P", [1])
    assert list(s.projects["P"].queue) == [1, 2]
    actions = answer(s, old, now=4.0, credit=0)
    assert one(actions, p.TaskDone).seq == 0
    assert abandons(actions) == {}  # nobody held it
    assert list(s.projects["P"].queue) == [2]
    assert s.projects["P"].leased == set()
    # task 1 is not sent again
    actions = s.worker_credit("B", 2, 5.0)
    assert sent(actions) == [("B", 2, 1)]
    s.end_tasks(CREATOR, make_end("P", 2), 5.0)
    finished = one(answer(s, sends(actions)[0], now=6.0), p.Finished)
    assert finished.status == "done"
    assert finished.stats["tasks_done"] == 2
    assert finished.stats["tasks_reissued"] == 1
    assert finished.stats["per_worker"] == {"A": 1, "B": 1}


def test_earlier_attempt_wins_while_the_task_waits_for_a_retry() -> None:
    s, old = expired_setup()
    (send_b,) = sends(s.worker_credit("B", 1, 3.5))
    add(s, "P", [1])
    # B's attempt 2 crashed: task 1 waits for a retry (A is suspect, B has no credit)
    assert answer(s, send_b, "crash", now=4.0, credit=0) == []
    assert list(s.projects["P"].retries) == [1]
    actions = answer(s, old, now=4.5, credit=0)
    assert one(actions, p.TaskDone).stats["worker"] == "A"
    assert abandons(actions) == {}
    assert list(s.projects["P"].retries) == []
    assert list(s.projects["P"].queue) == [2]
    assert set(s.tasks) == {2}


@pytest.mark.parametrize("outcome", ["stop", "error"])
def test_earlier_attempt_stop_or_error_wins(outcome: str) -> None:
    s, old = expired_setup()
    (send_b,) = sends(s.worker_credit("B", 1, 3.5))
    error = {"message": "boom"} if outcome == "error" else None
    actions = answer(s, old, outcome, now=4.0, payload=b"found", error=error)
    assert abandons(actions) == {"B": [1]}
    assert creator_msgs(actions, p.TaskDone) == []
    finished = one(actions, p.Finished)
    if outcome == "stop":
        assert finished.status == "stopped"
        assert finished.stop == [0, b"items-0", b"found"]
        assert finished.stats["tasks_done"] == 1
    else:
        assert finished.status == "failed"
        assert finished.error == {"message": "boom", "reason": "exception", "attempts": 2}
        assert finished.stats["tasks_done"] == 0
    assert s.tasks == {}
    assert s.workers["B"].leased == set()
    # B's answer comes too late
    assert creator_msgs(answer(s, send_b, now=5.0)) == []


@pytest.mark.parametrize("outcome", ["crash", "timeout", "load_error", "abandoned"])
def test_stale_failure_or_abandon_is_ignored_but_returns_credit(outcome: str) -> None:
    s, old = expired_setup()
    (send_b,) = sends(s.worker_credit("B", 1, 3.5))
    error = {"message": "No module named 'numpy'"}
    # from a worker that no longer holds the task
    assert answer(s, old, outcome, now=4.0, credit=1, error=error, payload=b"") == []
    # from the holder, but naming an attempt it does not hold
    forged = SendTask("B", p.Task(task_id=1, project_id="P", attempt=1, items=b""))
    assert answer(s, forged, outcome, now=4.1, credit=0, error=error, payload=b"") == []
    task = s.tasks[1]
    assert (task.state, task.worker_id, task.attempt) == (TaskState.LEASED, "B", 2)
    assert task.failures == 0 and task.failed_on == set()
    assert s.workers["B"].leased == {1}
    assert s.projects["P"].leased == {1}
    assert s.projects["P"].rejected_by == set()
    assert s.projects["P"].tasks_reissued == 1
    assert s.projects["P"].duplicates_dropped == 0
    assert s.workers["A"].credit == 1 and not s.workers["A"].suspect
    # the current attempt's crash still counts, and A (credit back, alive) takes the retry
    assert sent(answer(s, send_b, "crash", now=4.5, credit=0)) == [("A", 1, 3)]
    assert s.tasks[1].failed_on == {"B"}


def test_late_result_for_a_finished_task_is_a_counted_duplicate() -> None:
    s, old = expired_setup()
    (send_b,) = sends(s.worker_credit("B", 1, 3.5))
    one(answer(s, send_b, now=4.0, credit=0), p.TaskDone)
    assert s.tasks == {}
    add(s, "P", [1])  # something left for A once its credit comes back
    actions = answer(s, old, now=5.0, credit=1)
    assert creator_msgs(actions) == []
    assert sent(actions) == [("A", 2, 1)]  # the result was a sign of life: A is not suspect
    assert s.projects["P"].tasks_done == 1
    assert s.projects["P"].duplicates_dropped == 1
    # the attempt was answered: answering it again is a replay, dropped as forged
    answer(s, old, "crash", now=5.1, credit=0)
    assert s.projects["P"].duplicates_dropped == 1
    assert s.forged_results_dropped == 1
    assert s.projects["P"].tasks_done == 1


@pytest.mark.parametrize("outcome", ["ok", "stop", "error", "crash", "timeout", "abandoned"])
def test_a_late_answer_counts_as_a_duplicate_unless_it_gives_the_task_back(outcome: str) -> None:
    s, old = expired_setup()
    (send_b,) = sends(s.worker_credit("B", 1, 3.5))
    one(answer(s, send_b, now=4.0, credit=0), p.TaskDone)
    answer(s, old, outcome, now=5.0, credit=0)
    assert s.projects["P"].duplicates_dropped == (0 if outcome == "abandoned" else 1)
    assert s.forged_results_dropped == 0


def test_abandoned_answer_to_a_stale_attempt_is_not_a_duplicate() -> None:
    s, old = expired_setup()
    sends(s.worker_credit("B", 1, 3.5))
    actions = answer(s, old, "abandoned", now=3.6, payload=b"")
    assert actions == []
    assert s.projects["P"].duplicates_dropped == 0
    # a result for a task id the server never issued is ignored
    ghost = SendTask("A", p.Task(task_id=999, project_id="P", attempt=1, items=b""))
    assert answer(s, ghost, now=3.7, credit=0) == []
    assert s.projects["P"].duplicates_dropped == 0


def test_abandoned_current_attempt_is_requeued_and_reissued() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", [0])
    (send,) = sends(join(s, "A", credit=1))
    join(s, "B", credit=1)
    actions = answer(s, send, "abandoned", credit=0, now=2.0)
    assert sent(actions) == [("B", 1, 2)]
    assert creator_msgs(actions) == []
    assert s.projects["P"].tasks_reissued == 1
    assert s.projects["P"].duplicates_dropped == 0
    assert s.tasks[1].failures == 0


def test_stats_of_an_earlier_attempt_that_wins_name_that_attempt() -> None:
    s, old = expired_setup()
    sends(s.worker_credit("B", 1, 3.5))
    done = one(answer(s, old, now=4.0), p.TaskDone)
    assert done.stats["worker"] == "A"
    assert done.stats["attempt"] == 1


def test_fairness_holds_after_an_earlier_attempt_wins_from_the_queue() -> None:
    s, old = expired_setup()
    one(answer(s, old, now=3.5, credit=0), p.TaskDone)  # task 1 leaves P's queue
    new_project(s, "Q")
    add(s, "Q", range(10), now=4.0)
    add(s, "P", range(1, 11), now=4.0)
    order: list[str] = []
    actions = s.worker_credit("B", 1, 5.0)
    for step in range(12):
        (send,) = sends(actions)
        order.append(send.message.project_id)
        actions = answer(s, send, now=6.0 + step)
    assert Counter(order) == {"P": 6, "Q": 6}, order
    assert all(a != b for a, b in itertools.pairwise(order)), order


# ---- stop, error, crash ------------------------------------------------------------------------


def test_stop_finishes_and_abandons_the_other_tasks() -> None:
    s = Scheduler()
    new_project(s)
    join(s, "A", credit=2)
    join(s, "B", credit=1)
    join(s, "C", credit=1)
    actions = add(s, "P", range(5))
    assert sent(actions) == [("A", 1, 1), ("B", 2, 1), ("C", 3, 1), ("A", 4, 1)]
    send_a1, send_b, _, _ = sends(actions)
    actions = answer(s, send_b, "stop", payload=b"found", now=2.0)
    assert abandons(actions) == {"A": [1, 4], "C": [3]}
    assert not sends(actions)  # the queued task 5 is dropped
    assert [type(m) for m in creator_msgs(actions)] == [p.Finished]
    finished = one(actions, p.Finished)
    assert finished.status == "stopped"
    assert finished.stop == [1, b"items-1", b"found"]
    assert finished.error is None
    assert finished.stats["tasks_done"] == 1
    assert finished.stats["finished_at"] == 2.0
    assert s.tasks == {}
    assert s.workers["A"].leased == set() and s.workers["C"].leased == set()
    # later results for abandoned tasks are dropped
    assert answer(s, send_a1, now=3.0) == []
    assert s.add_tasks(CREATOR, make_tasks("P", [5]), 3.0) == []
    assert s.tasks == {}


def test_error_fails_the_project() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(3))
    send1, send2 = sends(join(s, "A", credit=2))
    error = {"message": "ZeroDivisionError: division by zero", "traceback": "..."}
    actions = answer(s, send1, "error", error=error, now=2.0)
    assert abandons(actions) == {"A": [2]}
    finished = one(actions, p.Finished)
    assert finished.status == "failed"
    assert finished.error == {**error, "reason": "exception", "attempts": 1}
    assert answer(s, send2, now=3.0) == []


def test_error_without_details_and_with_own_reason() -> None:
    s = Scheduler()
    new_project(s, "P")
    new_project(s, "Q")
    add(s, "P", [0])
    add(s, "Q", [0])
    send_p, send_q = sends(join(s, "A", credit=2))
    finished = one(answer(s, send_p, "error", error=None), p.Finished)
    assert finished.error == {"reason": "exception", "attempts": 1}
    finished = one(answer(s, send_q, "error", error={"reason": "custom"}), p.Finished)
    assert finished.error == {"reason": "custom", "attempts": 1}


@pytest.mark.parametrize("outcome", ["crash", "timeout"])
def test_failed_attempts_retry_then_fail_the_project(outcome: str) -> None:
    s = Scheduler()
    new_project(s, max_attempts=3)
    add(s, "P", [0])
    (send,) = sends(join(s, "A", credit=1))
    for attempt in (2, 3):
        actions = answer(s, send, outcome, now=float(attempt))
        assert creator_msgs(actions) == []
        # the only worker gets the retry once nothing else is queued
        assert sent(actions) == [("A", 1, attempt)]
        (send,) = sends(actions)
    assert s.projects["P"].tasks_reissued == 2
    actions = answer(s, send, outcome, now=9.0)
    finished = one(actions, p.Finished)
    assert finished.status == "failed"
    assert finished.error == {
        "reason": outcome,
        "attempts": 3,
        "message": f"task failed 3 times ({outcome})",
    }
    assert finished.stats["tasks_reissued"] == 2


def test_failed_attempt_keeps_the_worker_error_message() -> None:
    s = Scheduler()
    new_project(s, max_attempts=1)
    add(s, "P", [0])
    (send,) = sends(join(s, "A", credit=1))
    error = {"message": "child died", "returncode": -9, "reason": "ignored"}
    finished = one(answer(s, send, "crash", error=error), p.Finished)
    assert finished.error == {
        "message": "child died",
        "returncode": -9,
        "reason": "crash",
        "attempts": 1,
    }


def test_retry_goes_to_a_different_worker_when_one_asks() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(3))
    (send,) = sends(join(s, "A", credit=1))
    join(s, "B")
    assert answer(s, send, "crash", credit=0) == []
    assert list(s.projects["P"].retries) == [1]
    # B asks: the retry is served before the queue
    assert sent(s.worker_credit("B", 1, 2.0)) == [("B", 1, 2)]
    assert s.projects["P"].tasks_reissued == 1


def test_retry_skips_the_worker_it_failed_on_while_other_work_is_queued() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(2))
    (send,) = sends(join(s, "A", credit=1))
    join(s, "B")
    # A crashed on task 1 and asks again: it gets task 2, the retry waits for another worker
    assert sent(answer(s, send, "crash", credit=1)) == [("A", 2, 1)]
    assert sent(s.worker_credit("B", 1, 2.0)) == [("B", 1, 2)]
    assert s.tasks[1].failed_on == {"A"}


# ---- load errors and rejections ----------------------------------------------------------------


def test_load_error_requeues_without_counting_a_failure() -> None:
    s = Scheduler()
    new_project(s, max_attempts=1)
    add(s, "P", [0])
    (send,) = sends(join(s, "A", credit=1))
    join(s, "B")
    error = {"message": "No module named 'numpy'"}
    actions = answer(s, send, "load_error", error=error, credit=1)
    assert actions == []  # A may not run it and B has no credit: no notice, B can
    assert s.projects["P"].rejected_by == {"A"}
    assert s.tasks[1].failures == 0
    assert s.projects["P"].tasks_reissued == 0
    assert sent(s.worker_credit("B", 1, 2.0)) == [("B", 1, 2)]


def test_load_error_on_every_worker_sends_one_notice() -> None:
    s = Scheduler()
    new_project(s, name="primes")
    add(s, "P", range(2))
    send1, send2 = sends(join(s, "A", credit=2))
    actions = answer(s, send1, "load_error", error={"message": "bad pickle"})
    notice = one(actions, p.Notice)
    assert notice.project_id == "P"
    assert notice.level == "warning"
    assert notice.text == "no connected worker can run project 'primes': bad pickle"
    assert not sends(actions)  # A's credit came back but it rejected the project
    actions = answer(s, send2, "load_error", error=None)
    assert creator_msgs(actions) == []  # once only
    assert creator_msgs(add(s, "P", [2])) == []
    # a new worker resets the notice and gets the tasks
    actions = join(s, "B", credit=5)
    assert s.projects["P"].unrunnable_noticed is False
    assert sorted(t for _, t, _ in sent(actions)) == [1, 2, 3]
    assert {w for w, _, _ in sent(actions)} == {"B"}


def test_load_error_without_message_uses_a_default_reason() -> None:
    s = Scheduler()
    new_project(s, fail_when_unrunnable=True)
    add(s, "P", range(3))
    send1, send2 = sends(join(s, "A", credit=2))
    actions = answer(s, send1, "load_error", error=None)
    finished = one(actions, p.Finished)
    assert finished.status == "failed"
    assert finished.error == {
        "reason": "unrunnable",
        "message": "no connected worker can run project 'proj': the project could not be loaded",
    }
    assert abandons(actions) == {"A": [2]}
    assert answer(s, send2, "load_error") == []


def test_worker_rejects_moves_its_tasks_on() -> None:
    s = Scheduler()
    new_project(s, "P")
    new_project(s, "Q")
    add(s, "Q", [0])
    add(s, "P", range(3))
    actions = join(s, "A", credit=3)
    assert [(a.message.project_id, a.message.task_id) for a in sends(actions)] == [
        ("Q", 1),
        ("P", 2),
        ("P", 3),
    ]
    join(s, "B")
    actions = s.worker_rejects("A", "P", "missing modules: numpy", 2.0)
    assert actions == []  # B has not rejected it
    assert s.workers["A"].leased == {1}  # its task of Q stays
    assert s.projects["P"].tasks_reissued == 0
    assert sorted(s.projects["P"].queue) == [2, 3, 4]
    # A still answers the rejected tasks with "abandoned": dropped, not duplicates
    for task_id in (2, 3):
        task = p.Task(task_id=task_id, project_id="P", attempt=1, items=b"")
        assert s.task_result("A", make_result(task, "abandoned", credit=0), 2.1) == []
    assert s.projects["P"].duplicates_dropped == 0
    # A gets credit back: nothing of P comes to it
    assert s.worker_credit("A", 2, 2.2) == []
    # B leaves: every remaining worker rejected P -> notice with the reason
    actions = s.remove_worker("B", 3.0)
    notice = one(actions, p.Notice)
    assert "proj" in notice.text
    assert s.projects["P"].unrunnable_noticed


def test_worker_rejects_every_worker_notice_carries_reason() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(2))
    join(s, "A", credit=1)
    notice = one(s.worker_rejects("A", "P", "missing modules: numpy", 1.0), p.Notice)
    assert notice.text.endswith(": missing modules: numpy")
    assert s.worker_rejects("A", "P", "again", 1.5) == []
    # another worker that also rejects: notice again (it was reset by the join)
    join(s, "B")
    notice = one(s.worker_rejects("B", "P", "no gpu", 2.0), p.Notice)
    assert notice.text.endswith(": no gpu")


def test_worker_rejects_with_fail_when_unrunnable_fails() -> None:
    s = Scheduler()
    new_project(s, fail_when_unrunnable=True)
    add(s, "P", [0])
    join(s, "A", credit=1)
    actions = s.worker_rejects("A", "P", "no gpu", 1.0)
    finished = one(actions, p.Finished)
    assert finished.status == "failed"
    assert finished.error["reason"] == "unrunnable"
    assert "no gpu" in finished.error["message"]
    assert s.worker_rejects("A", "P", "late", 1.5) == []  # finished: ignored
    assert s.worker_rejects("A", "nope", "unknown", 1.5) == []


def test_no_notice_without_workers_or_without_queued_tasks() -> None:
    s = Scheduler()
    new_project(s)
    assert creator_msgs(add(s, "P", [0])) == []  # nobody connected: nothing to say
    join(s, "A")
    assert s.worker_rejects("A", "P", "x", 1.0) != []
    s2 = Scheduler()
    new_project(s2)
    join(s2, "A")
    assert s2.worker_rejects("A", "P", "x", 1.0) == []  # nothing queued yet
    assert one(add(s2, "P", [0]), p.Notice).text.endswith("project 'proj'")


# ---- workers leaving ---------------------------------------------------------------------------


def test_remove_worker_requeues_its_tasks_at_the_front() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(3))
    assert sent(join(s, "A", credit=2, slots=20)) == [("A", 1, 1), ("A", 2, 1)]
    join(s, "B", slots=3)
    actions = s.remove_worker("A", 1.0)
    assert actions == []
    assert s.projects["P"].tasks_reissued == 2
    assert sorted(list(s.projects["P"].queue)[:2]) == [1, 2]
    assert "A" not in s.workers
    actions = s.worker_credit("B", 3, 2.0)
    assert sorted(sent(actions)[:2]) == [("B", 1, 2), ("B", 2, 2)]
    assert sent(actions)[2] == ("B", 3, 1)
    assert s.remove_worker("A", 3.0) == []  # unknown worker


def test_remove_worker_shrinks_the_window() -> None:
    s = Scheduler()
    join(s, "A", slots=20)
    assert one(new_project(s), p.Accepted).credit == 80 - p.INITIAL_CREDIT
    s.remove_worker("A", 1.0)
    add(s, "P", range(70))
    assert creator_msgs(s.end_tasks(CREATOR, make_end("P", 70), 1.0)) == []


# ---- leases and time ---------------------------------------------------------------------------


def test_lease_expires_after_lease_timeout_of_silence() -> None:
    s = Scheduler()
    new_project(s, lease_timeout=2)
    add(s, "P", [0])
    (send_a,) = sends(join(s, "A", credit=1))
    join(s, "B")
    assert s.next_deadline() == 2.0
    assert s.tick(1.0) == []
    assert s.tick(2.0) == []  # not more than 2 s yet
    actions = s.tick(2.5)
    assert actions == [AbandonTasks("A", [1])]
    assert s.projects["P"].tasks_reissued == 1
    assert s.workers["A"].leased == set()
    assert s.next_deadline() is None
    (send_b,) = sends(s.worker_credit("B", 1, 3.0))
    assert send_b.message.attempt == 2
    assert s.next_deadline() == 5.0
    # B answers first: its result is the one forwarded
    done = one(answer(s, send_b, now=4.0), p.TaskDone)
    assert done.stats == {"worker": "B", "attempt": 2, "round_trip": 1.0}
    # A's late result of the expired attempt is then a dropped duplicate
    assert creator_msgs(answer(s, send_a, now=4.5)) == []
    assert s.projects["P"].duplicates_dropped == 1


def test_late_result_of_an_expired_lease_wins_when_it_comes_first() -> None:
    s = Scheduler()
    new_project(s, lease_timeout=2)
    add(s, "P", [0])
    (send_a,) = sends(join(s, "A", credit=1))
    join(s, "B")
    assert s.tick(2.5) == [AbandonTasks("A", [1])]
    (send_b,) = sends(s.worker_credit("B", 1, 3.0))
    # A's late result of the expired attempt arrives before B's: accepted, B's lease dropped
    actions = answer(s, send_a, now=3.5)
    assert one(actions, p.TaskDone).stats["worker"] == "A"
    assert abandons(actions) == {"B": [1]}
    assert s.next_deadline() is None
    assert s.tick(100.0) == []
    assert creator_msgs(answer(s, send_b, now=4.0)) == []
    assert s.projects["P"].duplicates_dropped == 1
    assert s.projects["P"].tasks_done == 1


def test_worker_seen_renews_the_lease() -> None:
    s = Scheduler()
    new_project(s, lease_timeout=2)
    add(s, "P", [0])
    join(s, "A", credit=1)
    assert s.worker_seen("A", 1.5) == []  # not suspect: nothing to dispatch
    assert s.worker_seen("ghost", 1.5) == []  # unknown worker: ignored
    assert s.next_deadline() == 3.5
    assert s.tick(3.0) == []
    assert s.tick(3.6) == [AbandonTasks("A", [1])]


def test_worker_credit_also_renews_the_lease() -> None:
    s = Scheduler()
    new_project(s, lease_timeout=2)
    add(s, "P", [0])
    join(s, "A", credit=1)
    s.worker_credit("A", 1, 1.0)
    assert s.next_deadline() == 3.0


def test_next_deadline_is_the_earliest_expiry() -> None:
    s = Scheduler()
    assert s.next_deadline() is None
    new_project(s, "SLOW", lease_timeout=10)
    new_project(s, "FAST", lease_timeout=2)
    add(s, "SLOW", [0])
    join(s, "A", credit=1, now=0.0)
    assert s.next_deadline() == 10.0
    add(s, "FAST", [0], now=5.0)
    (send_b,) = sends(join(s, "B", credit=1, now=5.0))
    assert s.next_deadline() == 7.0
    answer(s, send_b, now=6.0, credit=0)
    assert s.next_deadline() == 10.0
    # only A's SLOW task expires at 10.5; nothing else is leased
    assert s.tick(10.5) == [AbandonTasks("A", [1])]
    assert s.next_deadline() is None


def test_next_deadline_keeps_the_earlier_of_two_leases() -> None:
    s = Scheduler()
    new_project(s, lease_timeout=2)
    add(s, "P", range(2))
    join(s, "A", credit=1, now=0.0)
    join(s, "B", credit=1, now=1.0)
    assert s.next_deadline() == 2.0
    assert s.tick(2.5) == [AbandonTasks("A", [1])]
    assert s.next_deadline() == 3.0


def test_sent_at_counts_for_a_task_pushed_after_silence() -> None:
    s = Scheduler()
    new_project(s, lease_timeout=2)
    join(s, "A", credit=1, now=0.0)
    add(s, "P", [0], now=10.0)  # sent at 10, though A was last heard from at 0
    assert s.next_deadline() == 12.0
    assert s.tick(11.0) == []


# ---- cancel and creators leaving ---------------------------------------------------------------


def test_cancel_finishes_and_abandons() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(4))
    join(s, "A", credit=2)
    join(s, "B", credit=1)
    assert s.cancel(OTHER_CREATOR, "P", 1.0) == []  # not the owner
    actions = valid(s.cancel(CREATOR, "P", 2.0))
    assert abandons(actions) == {"A": [1, 2], "B": [3]}
    finished = one(actions, p.Finished)
    assert finished.status == "cancelled"
    assert finished.stats["finished_at"] == 2.0
    assert s.tasks == {}
    assert s.cancel(CREATOR, "P", 3.0) == []  # already over
    assert s.cancel(CREATOR, "nope", 3.0) == []


def test_remove_creator_detaches_its_projects_which_go_on() -> None:
    s = Scheduler()
    new_project(s, "P1")
    new_project(s, "DONE")
    new_project(s, "OTHER", creator=OTHER_CREATOR)
    s.end_tasks(CREATOR, make_end("DONE", 0), 0.0)
    add(s, "P1", range(3))
    (send,) = sends(join(s, "A", credit=1))
    add(s, "OTHER", range(2), creator=OTHER_CREATOR)
    assert s.remove_creator(CREATOR, 1.0) == []  # nothing cancelled, nothing abandoned
    assert set(s.projects) == {"P1", "DONE", "OTHER"}
    p1 = s.projects["P1"]
    assert (p1.status, p1.creator_id, p1.credit_outstanding) == ("running", None, 0)
    assert s.projects["DONE"].creator_id is None
    assert s.projects["OTHER"].creator_id == OTHER_CREATOR
    assert s.workers["A"].leased == {1}
    assert s.workers["A"].loaded == {"P1"}
    # the detached project's work goes on; its results are addressed to no creator
    actions = answer(s, send, now=2.0)
    assert [(a.creator_id, type(a.message)) for a in actions if isinstance(a, ToCreator)] == [
        (None, p.TaskDone)
    ]
    assert len(sends(actions)) == 1
    # and nobody is granted credit for it: no More, with or without workers joining
    # (A took OTHER's first task: it was never served, P1 was)
    assert creator_msgs(join(s, "B", slots=20, now=2.5), p.More) == [
        p.More(project_id="OTHER", credit=4 * 21 - MIN_WINDOW + 1, stored=2)  # 1 + 20 slots
    ]
    # the old creator id no longer owns it
    assert s.add_tasks(CREATOR, make_tasks("P1", [3]), 3.0) == []
    assert s.cancel(CREATOR, "P1", 3.0) == []
    assert s.end_tasks(CREATOR, make_end("P1", 3), 3.0) == []
    assert s.projects["P1"].status == "running"
    assert s.remove_creator("nobody", 3.0) == []


# ---- attach and restore ------------------------------------------------------------------------


def test_attach_binds_a_running_project_with_fresh_credit() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(3))
    s.remove_creator(CREATOR, 1.0)
    actions = valid(s.attach(OTHER_CREATOR, 9, "P", 2.0))
    assert actions == [
        ToCreator(
            OTHER_CREATOR,
            p.Attached(
                ref=9,
                project_id="P",
                status="running",
                stored=3,
                items_stored=6,
                ended=False,
                credit=MIN_WINDOW - 3,
            ),
        )
    ]
    assert s.projects["P"].creator_id == OTHER_CREATOR
    # the creator feeds on from seq 3: a resent stored seq, or a gap, is not taken
    actions = valid(s.add_tasks(OTHER_CREATOR, make_tasks("P", [2, 3, 4, 6]), 3.0))
    assert stored(actions) == [("P", [(4, 3, b"items-3", 2), (5, 4, b"items-4", 2)])]
    assert s.projects["P"].tasks_received == 5
    assert s.projects["P"].items_received == 10
    assert sorted(s.tasks) == [1, 2, 3, 4, 5]
    assert valid(s.add_tasks(OTHER_CREATOR, make_tasks("P", [0, 1]), 3.0)) == []  # all resent
    assert s.add_tasks(CREATOR, make_tasks("P", [5]), 3.0) == []  # not its project any more
    # results go to the attached creator
    (send,) = sends(join(s, "A", credit=1, now=4.0))
    actions = answer(s, send, now=5.0, credit=0)
    assert [a.creator_id for a in actions if isinstance(a, ToCreator)] == [OTHER_CREATOR]
    # an ended project attaches without credit
    s.end_tasks(OTHER_CREATOR, make_end("P", 5), 6.0)
    attached = one(valid(s.attach(CREATOR, 10, "P", 7.0)), p.Attached)
    assert (attached.stored, attached.items_stored, attached.ended, attached.credit) == (
        5,
        10,
        True,
        0,
    )
    # finished or unknown projects: the scheduler has nothing to say
    assert s.attach(CREATOR, 11, "nope", 8.0) == []
    s.cancel(CREATOR, "P", 8.0)
    assert s.attach(CREATOR, 12, "P", 9.0) == []


def test_restore_takes_a_project_back_after_a_restart() -> None:
    s = Scheduler()
    s.reserve_task_ids(10)
    actions = s.restore(
        "P",
        make_submit(name="primes", lease_timeout=5),
        submitted_at=1.0,
        tasks=[(7, 3, b"items-3", 2), (9, 5, b"items-5", 2)],
        tasks_received=6,
        items_received=12,
        total_tasks=None,
        done=(4, 8, 3),
        now=20.0,
    )
    assert valid(actions) == []  # no creator attached, no worker: nothing to say
    project = s.projects["P"]
    assert (project.creator_id, project.status, project.name) == (None, "running", "primes")
    assert project.options["lease_timeout"] == 5
    assert list(project.queue) == [7, 9]
    assert (project.tasks_done, project.items_done, project.items_kept) == (4, 8, 3)
    with pytest.raises(ValueError, match="exists"):
        s.restore(
            "P",
            make_submit(),
            submitted_at=1.0,
            tasks=[],
            tasks_received=0,
            items_received=0,
            total_tasks=None,
            done=(0, 0, 0),
            now=20.0,
        )
    # a creator attaches and feeds on from seq 6; new task ids stay above the reserved ones
    attached = one(valid(s.attach(CREATOR, 1, "P", 21.0)), p.Attached)
    assert (attached.stored, attached.items_stored, attached.ended) == (6, 12, False)
    add(s, "P", [6])
    assert s.tasks[11].seq == 6
    # workers get the restored tasks first
    actions = join(s, "A", credit=3, now=22.0)
    assert sent(actions) == [("A", 7, 1), ("A", 9, 1), ("A", 11, 1)]
    send_7, send_9, send_11 = sends(actions)
    # a worker that ran task 9 before the restart reports it on its new connection: it holds
    # no lease of this run, so its result is dropped and the task runs again
    join(s, "B", now=22.5)
    old = p.Task(task_id=9, project_id="P", attempt=2, items=b"items-5")
    assert valid(s.task_result("B", make_result(old), 23.0)) == []
    assert s.projects["P"].forged_results_dropped == 1
    assert s.workers["A"].leased == {7, 9, 11}
    assert one(answer(s, send_9, now=23.2, credit=0), p.TaskDone).seq == 5
    assert s.projects["P"].duplicates_dropped == 0
    s.end_tasks(CREATOR, make_end("P", 7), 23.0)
    answer(s, send_7, now=24.0)
    finished = one(answer(s, send_11, now=25.0), p.Finished)
    assert finished.status == "done"
    assert finished.stats["submitted_at"] == 1.0
    assert finished.stats["tasks_done"] == 7
    assert finished.stats["items_done"] == 8 + 3 * 2


def test_restore_of_a_project_with_every_task_done_finishes_it() -> None:
    s = Scheduler()
    actions = valid(
        s.restore(
            "P",
            make_submit(),
            submitted_at=1.0,
            tasks=[],
            tasks_received=2,
            items_received=4,
            total_tasks=2,
            done=(2, 4, 1),
            now=5.0,
        )
    )
    assert [(a.creator_id, type(a.message)) for a in actions] == [(None, p.Finished)]
    finished = one(actions, p.Finished)
    assert finished.status == "done"
    assert finished.stats["tasks_done"] == 2
    assert finished.stats["finished_at"] == 5.0
    assert s._next_task_id == 1


def test_forget_project_only_drops_finished_projects() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", [0])
    (send,) = sends(join(s, "A", credit=1))
    s.forget_project("P")
    assert "P" in s.projects  # still running
    s.end_tasks(CREATOR, make_end("P", 1), 1.0)
    one(answer(s, send), p.Finished)
    assert s.workers["A"].loaded == {"P"}
    s.forget_project("P")
    assert "P" not in s.projects
    assert s.workers["A"].loaded == set()
    s.forget_project("P")  # unknown: no error
    # a result arriving after the project is gone is ignored
    assert answer(s, send, credit=0) == []


# ---- creator back-pressure ---------------------------------------------------------------------


def test_add_tasks_reduces_credit_and_more_tops_the_window_up() -> None:
    s = Scheduler()
    new_project(s)
    project = s.projects["P"]
    assert add(s, "P", range(10)) == []
    assert project.credit_outstanding == MIN_WINDOW - 10
    join(s, "A", slots=1)
    s.worker_credit("A", 1, 1.0)
    measured(s, "A", per_slot=p.MAX_PREFETCH_PER_SLOT)
    actions = s.worker_credit("A", 6, 1.0)
    assert len(sends(actions)) == 6
    assert creator_msgs(actions) == []  # deficit 7 < window / 4
    actions = s.worker_credit("A", 1, 1.0)
    assert len(sends(actions)) == 1
    assert creator_msgs(actions) == [p.More(project_id="P", credit=8, stored=10)]
    assert project.credit_outstanding == MIN_WINDOW - 2
    # exactly the credit left may be sent
    add(s, "P", range(10, 40))
    assert project.credit_outstanding == 0
    s.end_tasks(CREATOR, make_end("P", 40), 2.0)
    actions = s.worker_credit("A", 50, 3.0)
    assert len(sends(actions)) == 32  # all that is left
    assert creator_msgs(actions, p.More) == []  # no More after End


def test_more_when_a_big_worker_joins() -> None:
    s = Scheduler()
    new_project(s)
    actions = join(s, "A", slots=20)
    assert creator_msgs(actions) == [p.More(project_id="P", credit=80 - MIN_WINDOW, stored=0)]
    assert s.projects["P"].credit_outstanding == 80


def test_add_tasks_for_unknown_foreign_or_finished_project_is_ignored() -> None:
    s = Scheduler()
    new_project(s)
    join(s, "A", credit=5)
    assert s.add_tasks(CREATOR, make_tasks("nope", [0]), 0.0) == []
    assert s.add_tasks(OTHER_CREATOR, make_tasks("P", [0]), 0.0) == []
    assert s.tasks == {}
    assert s.projects["P"].tasks_received == 0
    assert valid(s.add_tasks(CREATOR, p.Tasks(project_id="P", tasks=[]), 0.0)) == []
    s.cancel(CREATOR, "P", 1.0)
    assert s.add_tasks(CREATOR, make_tasks("P", [0]), 1.0) == []
    assert s.tasks == {}


# ---- suspect workers ---------------------------------------------------------------------------


def suspect_setup() -> tuple[Scheduler, SendTask]:
    """A (2 credits) got task 1 of P (lease 2 s) at t=0 and went silent. At t=2.5 its lease
    expired: A still has a credit, but it is suspect and is not sent task 1 again."""
    s = Scheduler()
    new_project(s, "P", lease_timeout=2)
    new_project(s, "Q")
    add(s, "P", [0])
    (first,) = sends(join(s, "A", credit=2))
    assert s.tick(2.5) == [AbandonTasks("A", [1])]
    assert s.workers["A"].suspect
    assert s.workers["A"].credit == 1
    assert "A" not in s._ready
    assert list(s.projects["P"].queue) == [1]
    return s, first


def test_expired_worker_is_suspect_and_gets_no_new_tasks() -> None:
    s, _ = suspect_setup()
    assert add(s, "P", [1], now=2.6) == []
    assert add(s, "Q", [0], now=2.6) == []
    assert s.tick(10.0) == []  # nothing leased: no second abandon
    assert s.next_deadline() is None
    # the work goes to another worker meanwhile
    actions = join(s, "B", credit=3, now=10.0)
    assert sorted(t for _, t, _ in sent(actions)) == [1, 2, 3]
    assert {w for w, _, _ in sent(actions)} == {"B"}
    assert s.workers["A"].leased == set()
    assert s.workers["A"].suspect


def test_only_the_expired_worker_becomes_suspect() -> None:
    s = Scheduler()
    new_project(s, lease_timeout=2)
    add(s, "P", range(4))
    join(s, "A", credit=1, now=0.0)
    join(s, "B", credit=2, slots=3, now=1.0)
    assert s.tick(2.5) == [AbandonTasks("A", [1])]
    assert s.workers["A"].suspect and not s.workers["B"].suspect
    assert sent(s.worker_credit("B", 1, 2.6)) == [("B", 1, 2)]


@pytest.mark.parametrize("sign", ["seen", "credit", "result"])
def test_a_sign_of_life_clears_suspect_and_work_flows_again(sign: str) -> None:
    s, first = suspect_setup()
    if sign == "seen":
        actions = valid(s.worker_seen("A", 3.0))
    elif sign == "credit":
        actions = valid(s.worker_credit("A", 1, 3.0))
    else:  # A honours the Abandon: its answer hands the credit back
        actions = answer(s, first, "abandoned", now=3.0, payload=b"", credit=1)
    assert not s.workers["A"].suspect
    assert sent(actions) == [("A", 1, 2)]
    assert s.projects["P"].tasks_reissued == 1
    assert s.next_deadline() == 5.0


@pytest.mark.parametrize("sign", ["result-without-credit", "reject"])
def test_a_sign_of_life_without_new_credit_puts_leftover_credit_to_work(sign: str) -> None:
    s, first = suspect_setup()
    if sign == "reject":
        actions = valid(s.worker_rejects("A", "Q", "no gpu", 3.0))
    else:
        actions = answer(s, first, "abandoned", now=3.0, payload=b"", credit=0)
    assert not s.workers["A"].suspect
    assert sent(actions) == [("A", 1, 2)]


def test_worker_seen_returns_actions_when_it_clears_suspect() -> None:
    s = Scheduler()
    new_project(s, lease_timeout=2)
    add(s, "P", range(2))
    join(s, "A", credit=1)
    assert s.tick(3.5) == [AbandonTasks("A", [1])]
    assert s.workers["A"].suspect
    # suspect without credit: cleared, but there is nothing it can take yet
    assert s.worker_seen("A", 4.0) == []
    assert not s.workers["A"].suspect
    assert "A" not in s._ready
    assert s.worker_seen("A", 4.1) == []
    assert sent(s.worker_credit("A", 1, 4.2)) == [("A", 1, 2)]
    # suspect again: a Credit frame is a sign of life too, and the credit is used at once
    assert s.tick(7.0) == [AbandonTasks("A", [1])]
    assert s.workers["A"].suspect
    assert sent(s.worker_credit("A", 1, 7.5)) == [("A", 1, 3)]
    assert not s.workers["A"].suspect


# ---- stale answers and the current lease -------------------------------------------------------


def resent_to_same_worker() -> tuple[Scheduler, SendTask]:
    """A (2 credits) got task 1 at t=0 and went silent; at t=2.5 the lease expired and A
    became suspect. At t=2.6 A showed life and, still having a credit, got task 1 back as
    attempt 2; at t=2.7 it answered attempt 1 "abandoned". Returns attempt 1's send."""
    s = Scheduler()
    new_project(s, lease_timeout=2)
    add(s, "P", [0])
    (first,) = sends(join(s, "A", credit=2))
    actions = s.tick(2.5)
    assert actions == [AbandonTasks("A", [1])]  # not sent straight back: A is suspect
    assert sent(valid(s.worker_seen("A", 2.6))) == [("A", 1, 2)]
    assert answer(s, first, "abandoned", now=2.7, payload=b"") == []
    return s, first


def test_stale_answer_does_not_drop_the_current_lease_on_worker_loss() -> None:
    s, first = resent_to_same_worker()
    assert answer(s, first, "crash", now=2.8, credit=0) == []  # stale: ignored too
    assert s.workers["A"].leased == {1}
    assert s.tasks[1].failures == 0
    s.remove_worker("A", 3.0)
    actions = join(s, "B", credit=1, now=3.0)
    assert sent(actions) == [("B", 1, 3)]


def test_stale_answer_does_not_drop_the_current_lease_on_expiry() -> None:
    s, _ = resent_to_same_worker()
    assert s.next_deadline() == pytest.approx(4.7)
    assert s.tick(4.6) == []
    assert s.tick(10.0) == [AbandonTasks("A", [1])]


# ---- results only from leaseholders ------------------------------------------------------------


def forged_send(worker_id: str, task_id: int, attempt: int = 1) -> SendTask:
    """A Task as if sent to ``worker_id`` (which never got it): to forge its answer."""
    return SendTask(worker_id, p.Task(task_id=task_id, project_id="P", attempt=attempt, items=b""))


@pytest.mark.parametrize(
    "outcome", ["ok", "stop", "error", "crash", "timeout", "load_error", "abandoned"]
)
def test_result_from_a_worker_that_never_held_the_task_is_dropped(outcome: str) -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(2))
    (send_a,) = sends(join(s, "A", credit=1))
    join(s, "M")
    actions = answer(s, forged_send("M", 1), outcome, credit=1, error={"message": "forged"})
    # only M's own credit counts (it takes the queued task 2); task 1 and the project are
    # untouched: no take-back, no failure, no stop, no rejection
    assert sent(actions) == [("M", 2, 1)]
    assert creator_msgs(actions) == [] and abandons(actions) == {}
    task = s.tasks[1]
    assert (task.state, task.worker_id, task.attempt) == (TaskState.LEASED, "A", 1)
    assert (task.failures, task.failed_on, task.holders) == (0, set(), ("dev-A",))
    assert s.workers["A"].leased == {1}
    project = s.projects["P"]
    assert project.status == "running"
    assert (project.tasks_done, project.tasks_reissued, project.duplicates_dropped) == (0, 0, 0)
    assert project.rejected_by == set()
    assert project.forged_results_dropped == s.forged_results_dropped == 1
    assert s.take_incidents() == [Incident("M", "M", "forged_results", 1)]
    assert s.take_incidents() == []
    # the holder's answer is taken as usual
    assert one(answer(s, send_a, now=2.0), p.TaskDone).stats["worker"] == "A"


def test_forged_results_for_every_task_id_leave_the_project_exact() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(4))
    (send,) = sends(join(s, "A", credit=1))
    actions = answer(s, send, now=1.0, credit=1)
    assert one(actions, p.TaskDone).seq == 0
    (send,) = sends(actions)  # task 2
    join(s, "M", now=1.5)
    for task_id in range(1, 201):
        for outcome in ("ok", "stop", "error"):
            assert answer(s, forged_send("M", task_id), outcome, now=2.0, credit=0) == []
    project = s.projects["P"]
    # task 1 finished, 2 leased to A, 3 and 4 queued: dropped and counted (by the project
    # only while the task is open: a finished task's project is not remembered); the other
    # ids were never issued: dropped
    assert project.forged_results_dropped == 3 * 3
    assert s.forged_results_dropped == 4 * 3
    assert s.take_incidents() == [Incident("M", "M", "forged_results", 12)]
    assert (project.duplicates_dropped, project.tasks_done, project.status) == (0, 1, "running")
    assert list(project.queue) == [3, 4]
    s.end_tasks(CREATOR, make_end("P", 4), 3.0)
    seqs = [0]
    while True:
        actions = answer(s, send, now=4.0, credit=1)
        seqs.append(one(actions, p.TaskDone).seq)
        if creator_msgs(actions, p.Finished):
            break
        (send,) = sends(actions)
    finished = one(actions, p.Finished)
    assert finished.status == "done"
    assert seqs == [0, 1, 2, 3]
    assert finished.stats["tasks_done"] == 4
    assert finished.stats["forged_results_dropped"] == 9
    assert finished.stats["per_worker"] == {"A": 4}


def test_an_earlier_leaseholder_still_wins_after_a_reissue_but_nobody_else() -> None:
    s, old = expired_setup()  # A's lease of task 1 expired; B has no credit yet
    (send_b,) = sends(s.worker_credit("B", 1, 3.5))
    assert s.tasks[1].holders == ("dev-A", "dev-B")
    join(s, "C", now=3.6)
    forged = SendTask("C", old.message)
    assert answer(s, forged, now=3.7, credit=0) == []
    assert (s.tasks[1].worker_id, s.tasks[1].attempt) == ("B", 2)
    actions = answer(s, old, now=4.0, credit=0)
    assert abandons(actions) == {"B": [1]}
    assert one(actions, p.TaskDone).stats["worker"] == "A"
    # too late: from B, a leaseholder, a duplicate; from C, forged
    assert answer(s, send_b, now=4.5, credit=0) == []
    assert answer(s, forged, now=4.6, credit=0) == []
    project = s.projects["P"]
    # (the second forged answer came once the task was finished: counted by the server only)
    assert (project.duplicates_dropped, project.forged_results_dropped) == (1, 1)
    assert s.forged_results_dropped == 2
    assert project.tasks_done == 1


def test_a_reconnected_worker_delivers_under_its_device_id_only() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", [0])
    (old,) = sends(join(s, "A", credit=1))
    s.remove_worker("A", 1.0)  # task 1 is queued again
    join(s, "X", now=1.5)  # another device
    assert answer(s, SendTask("X", old.message), now=2.0, credit=0) == []
    assert s.projects["P"].forged_results_dropped == 1
    assert list(s.projects["P"].queue) == [1]
    join(s, "A2", now=2.5, device="dev-A")  # A again, on a new connection
    actions = answer(s, SendTask("A2", old.message), now=3.0, credit=0)
    assert one(actions, p.TaskDone).stats["worker"] == "A2"
    assert s.projects["P"].tasks_done == 1


# ---- what a worker may claim: slots and credit -------------------------------------------------


def test_slots_are_capped_by_max_slots() -> None:
    assert Scheduler().max_slots == DEFAULT_MAX_SLOTS == 256
    s = Scheduler(max_slots=8)
    join(s, "BIG", slots=p.MAX_SLOTS)
    join(s, "ZERO", slots=0)
    join(s, "TWO", slots=2)
    assert [s.workers[w].slots for w in ("BIG", "ZERO", "TWO")] == [8, 1, 2]
    assert s._total_slots == 11
    s.remove_worker("BIG", 1.0)
    assert s._total_slots == 3


@pytest.mark.parametrize(
    "limits",
    [
        {"max_slots": 0},
        {"max_slots": p.MAX_SLOTS + 1},
        {"max_slots": 2.0},
        {"max_task_time": 0},
        {"max_task_time": -1.0},
        {"max_task_time": math.inf},
        {"max_task_time": math.nan},
        {"max_task_time": "60"},
    ],
)
def test_scheduler_limits_out_of_range_raise(limits: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Scheduler(**limits)


def test_worker_credit_beyond_what_its_slots_can_hold_is_ignored() -> None:
    s = Scheduler()
    join(s, "A", slots=2)
    cap = 2 * MAX_HELD_PER_SLOT
    for _ in range(100):
        assert s.worker_credit("A", p.MAX_CREDIT, 0.0) == []
    worker = s.workers["A"]
    assert worker.credit == cap
    new_project(s)
    measured(s, "A", per_slot=p.MAX_PREFETCH_PER_SLOT)
    s._refresh(worker)
    s.projects["P"].credit_outstanding = cap + 10
    tasks = sends(add(s, "P", range(cap + 10)))
    assert len(tasks) == cap
    assert worker.capacity == s._total_capacity == cap
    assert (worker.credit, len(worker.leased)) == (0, cap)
    # an answer's credit replaces the task it answers, in full; anything above is ignored
    assert sent(answer(s, tasks[0], credit=1)) == [("A", cap + 1, 1)]
    assert sent(answer(s, tasks[1], credit=p.MAX_CREDIT)) == [("A", cap + 2, 1)]
    assert (worker.credit, len(worker.leased)) == (0, cap)
    assert s._total_capacity == cap
    assert s.worker_credit("A", 1, 2.0) == []
    assert worker.credit == 0


class HonestWorker:
    """The credit accounting of ``dcproto.worker.worker.Worker``: it asks for up to ``slots +
    prefetch`` tasks held in all, ``prefetch`` at most ``MAX_PREFETCH_PER_SLOT`` per slot, and
    an answer hands back the credit of the task it answers."""

    def __init__(self, s: Scheduler, worker_id: str, slots: int) -> None:
        self.s, self.worker_id, self.slots = s, worker_id, slots
        self.prefetch = slots * p.MAX_PREFETCH_PER_SLOT
        self.held: list[p.Task] = []
        self.unused = 0

    def want(self) -> int:
        return max(0, self.slots + self.prefetch - len(self.held) - self.unused)

    def take(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, SendTask) and action.worker_id == self.worker_id:
                self.held.append(action.message)
                self.unused = max(0, self.unused - 1)
        return actions

    def grant(self, now: float) -> list[Action]:
        """Credit up to what it wants; the caller hands the actions to ``take``."""
        credit = self.want()
        self.unused += credit
        return self.s.worker_credit(self.worker_id, credit, now)

    def answer(self, now: float) -> list[Action]:
        """Answer its oldest task; the caller hands the actions to ``take``."""
        task = self.held.pop(0)
        credit = self.want()  # as in Worker._reply: the task has left
        self.unused += credit
        return self.s.task_result(self.worker_id, make_result(task, credit=credit), now)

    def check(self) -> None:
        """The server holds exactly what the worker thinks it holds: no credit was cut."""
        record = self.s.workers[self.worker_id]
        assert record.credit + len(record.leased) == len(self.held) + self.unused


def test_an_honest_worker_never_has_credit_ignored() -> None:
    s = Scheduler()
    workers = [HonestWorker(s, "A", 1), HonestWorker(s, "B", 3)]
    for worker in workers:
        s.add_worker(
            worker.worker_id, device_id=worker.worker_id, name="w", slots=worker.slots, now=0
        )
        worker.take(worker.grant(0.0))
    new_project(s)
    total = 500
    fed = 0
    actions: list[Action] = []
    for step in range(4 * total):
        credit = s.projects["P"].credit_outstanding
        if fed < total and credit:
            count = min(credit, total - fed)
            actions = valid(s.add_tasks(CREATOR, make_tasks("P", range(fed, fed + count)), 1.0))
            fed += count
            if fed == total:
                actions += s.end_tasks(CREATOR, make_end("P", total), 1.0)
            for worker in workers:
                worker.take(actions)
        busy = [w for w in workers if w.held]
        if not busy:
            break
        actions = busy[step % len(busy)].answer(1.0 + step)
        for worker in workers:
            worker.take(actions)
            worker.check()
    assert s.projects.get("P") is None or s.projects["P"].status == "done"
    assert one(actions, p.Finished).stats["tasks_done"] == total


# ---- what a creator may send: credit -----------------------------------------------------------


def test_a_creator_may_send_exactly_its_credit_and_not_one_new_task_more() -> None:
    assert issubclass(CreditExceeded, ValueError) and CreditExceeded.code == "credit_exceeded"
    s = Scheduler()
    new_project(s)  # no worker: the INITIAL_CREDIT that came with the Submit, no more
    project = s.projects["P"]
    assert project.credit_outstanding == p.INITIAL_CREDIT
    add(s, "P", range(p.INITIAL_CREDIT - 1))
    before = (project.tasks_received, project.items_received, project.credit_outstanding)
    with pytest.raises(CreditExceeded, match="2 new tasks sent with credit for 1"):
        s.add_tasks(CREATOR, make_tasks("P", [31, 32]), 1.0)
    # refused before anything changed
    assert (project.tasks_received, project.items_received, project.credit_outstanding) == before
    assert len(s.tasks) == p.INITIAL_CREDIT - 1 and s.last_task_id == p.INITIAL_CREDIT - 1
    assert list(project.queue) == list(range(1, p.INITIAL_CREDIT))
    assert s._actions == []
    add(s, "P", [31])  # exactly the credit left
    assert project.credit_outstanding == 0
    # resends of stored seqs are free, however many and with no credit left...
    assert valid(s.add_tasks(CREATOR, make_tasks("P", range(32)), 2.0)) == []
    # ...but a new task among them is not
    with pytest.raises(CreditExceeded, match="1 new tasks sent with credit for 0"):
        s.add_tasks(CREATOR, make_tasks("P", [30, 31, 32]), 2.0)
    assert project.tasks_received == 32
    # credit granted by More is usable to the last task, resends alongside still free
    more = one(join(s, "A", slots=20), p.More)
    assert more.credit == project.credit_outstanding == 80 - 32
    actions = valid(s.add_tasks(CREATOR, make_tasks("P", range(20, 32 + more.credit)), 3.0))
    assert len(stored(actions)[0][1]) == more.credit
    assert project.credit_outstanding == 0


def test_a_project_may_not_pass_max_int_items() -> None:
    s = Scheduler()
    new_project(s)
    huge = p.Tasks(project_id="P", tasks=[[0, b"a", p.MAX_INT], [1, b"b", 1]])
    with pytest.raises(TooManyItems):
        s.add_tasks(CREATOR, huge, 0.0)
    assert TooManyItems.code == "too_many_items"
    project = s.projects["P"]
    assert (project.tasks_received, project.items_received) == (0, 0)
    s.add_tasks(CREATOR, p.Tasks(project_id="P", tasks=[[0, b"a", p.MAX_INT]]), 0.0)
    assert project.items_received == p.MAX_INT


def test_counts_of_worker_claimed_items_saturate() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(3))
    s.end_tasks(CREATOR, make_end("P", 3), 0.0)
    task_sends = sends(join(s, "A", credit=3))
    for send in task_sends:
        actions = answer(s, send, n_items=p.MAX_INT, n_kept=p.MAX_INT)
    finished = one(actions, p.Finished)  # valid(): encodable
    assert finished.stats["items_done"] == finished.stats["items_kept"] == p.MAX_INT


class HonestCreator:
    """The credit accounting of ``dcproto.creator.run.ProjectRun``: ``INITIAL_CREDIT`` tasks
    may follow the Submit at once; Accepted, More and Attached add credit; every task sent
    that the server has not stored takes one, a resend after a re-attach too."""

    def __init__(self, s: Scheduler, total: int) -> None:
        self.s, self.total = s, total
        self.creator = CREATOR
        self.credit = 0
        self.next_seq = 0
        self.unstored: list[int] = []
        self.resend: list[int] = []
        self.connected = True
        self.lose_next_frame = False

    def send(self, seqs: list[int], now: float) -> list[Action]:
        self.credit -= len(seqs)
        assert self.credit >= 0
        if self.lose_next_frame:  # sent, but the connection drops before it arrives
            self.lose_next_frame = False
            return []
        return self.s.add_tasks(self.creator, make_tasks("P", seqs), now)

    def feed(self, now: float) -> list[Action]:
        if not self.connected:
            return []
        if self.resend:
            seqs, self.resend = self.resend[: self.credit], self.resend[self.credit :]
        else:
            count = min(self.credit, self.total - self.next_seq)
            seqs = list(range(self.next_seq, self.next_seq + count))
            self.next_seq += count
        self.unstored += [seq for seq in seqs if seq not in self.unstored]
        return self.read(self.send(seqs, now), now) if seqs else []

    def read(self, actions: list[Action], now: float) -> list[Action]:
        out = list(valid(actions))
        for action in actions:
            if isinstance(action, ToCreator) and action.creator_id == self.creator:
                message = action.message
                if isinstance(message, p.Accepted | p.More | p.Attached):
                    self.credit += message.credit
                if isinstance(message, p.More | p.Attached):
                    self.unstored = [seq for seq in self.unstored if seq >= message.stored]
                if isinstance(message, p.Attached):
                    self.resend = list(self.unstored)
        return out + self.feed(now)


def test_an_honest_creator_never_exceeds_its_credit() -> None:
    """The first tasks right behind the Submit, credit from More, and resends after a re-attach
    (a frame lost in the disconnect) within the Attached credit: never refused."""
    s = Scheduler()
    creator = HonestCreator(s, total=400)
    creator.credit = p.INITIAL_CREDIT
    submitted = s.submit(CREATOR, make_submit(), 0.0)
    creator.feed(0.0)  # the first tasks leave before the Accepted is read
    creator.read(submitted, 0.0)
    assert creator.next_seq == p.INITIAL_CREDIT
    worker = HonestWorker(s, "A", 2)
    s.add_worker("A", device_id="A", name="A", slots=2, now=0.0)
    worker.take(creator.read(worker.grant(0.0), 0.0))
    now = 1.0

    def work_until(done: Callable[[], bool]) -> None:
        nonlocal now
        while not done():
            assert worker.held, "stalled"
            now += 1.0
            worker.take(creator.read(worker.answer(now), now))

    # the next frame the creator sends is lost as its connection drops
    creator.lose_next_frame = True
    work_until(lambda: not creator.lose_next_frame)
    lost = len(creator.unstored)
    assert lost > 0
    creator.connected = False
    creator.credit = 0
    s.remove_creator(CREATOR, now)
    creator.creator = OTHER_CREATOR
    creator.connected = True
    worker.take(creator.read(s.attach(OTHER_CREATOR, 1, "P", now), now))
    work_until(lambda: s.projects["P"].tasks_received == creator.total)
    assert creator.next_seq == creator.total and creator.resend == []
    s.end_tasks(creator.creator, make_end("P", creator.total), now)
    actions: list[Action] = []
    while worker.held:
        now += 1.0
        actions = worker.take(worker.answer(now))
    assert one(actions, p.Finished).stats["tasks_done"] == creator.total


# ---- time limits on a task ---------------------------------------------------------------------


def test_a_task_held_past_its_time_limit_is_reissued_whatever_the_heartbeats() -> None:
    s = Scheduler()
    new_project(s, task_timeout=1, lease_timeout=30)
    add(s, "P", range(3))
    (send_a,) = sends(join(s, "A", credit=1))
    limit = 1 + TASK_TIME_GRACE
    assert s.tasks[1].run_deadline == limit
    assert s.next_deadline() == limit  # earlier than the lease's 30 s
    for second in range(1, int(limit) + 1):
        assert s.worker_seen("A", float(second)) == []
        assert s.tick(float(second)) == []
    join(s, "B", now=limit)
    assert s.tick(limit + 0.5) == [AbandonTasks("A", [1])]
    project = s.projects["P"]
    assert (project.tasks_overdue, project.tasks_reissued, s.tasks_overdue) == (1, 1, 1)
    assert s.tasks[1].failures == 0  # not a failed attempt
    assert s.take_incidents() == [Incident("A", "A", "overdue_tasks", 1)]
    assert s.workers["A"].overdue
    assert s.next_deadline() is None
    # heartbeats and credit do not bring it back
    assert s.worker_seen("A", limit + 1) == []
    assert s.worker_credit("A", 2, limit + 1) == []
    (send_b,) = sends(s.worker_credit("B", 1, limit + 1.5))
    assert (send_b.worker_id, send_b.message.task_id, send_b.message.attempt) == ("B", 1, 2)
    # an answer to a task it held does
    measured(s, "A", per_slot=1)
    actions = answer(s, send_a, "abandoned", now=limit + 2, credit=0, payload=b"")
    assert sent(actions) == [("A", 2, 1), ("A", 3, 1)]
    assert not s.workers["A"].overdue
    assert one(answer(s, send_b, now=limit + 3), p.TaskDone).stats["worker"] == "B"
    assert one(s.cancel(CREATOR, "P", limit + 4), p.Finished).stats["tasks_overdue"] == 1


def test_a_task_waiting_behind_another_starts_its_clock_when_a_slot_frees() -> None:
    s = Scheduler()
    new_project(s, task_timeout=10, lease_timeout=1000)
    add(s, "P", range(3))
    first, _ = sends(join(s, "A", credit=3, slots=2))
    measured(s, "A", per_slot=1)
    assert sent(s.worker_credit("A", 1, 0.0)) == [("A", 3, 1)]
    limit = 10 + TASK_TIME_GRACE
    assert [s.tasks[t].run_deadline for t in (1, 2, 3)] == [limit, limit, None]
    assert list(s.workers["A"].waiting) == [3]
    answer(s, first, now=12.0, credit=0)
    assert s.tasks[3].run_deadline == 12.0 + limit
    assert s.workers["A"].waiting == {}
    assert s.next_deadline() == limit
    # the second is overdue: none of A's tasks stays with it, the waiting one included
    actions = s.tick(limit + 1)
    assert actions == [AbandonTasks("A", [2, 3])]
    assert s.projects["P"].tasks_overdue == 1
    assert s.projects["P"].tasks_reissued == 2
    assert s.workers["A"].leased == set() and s.workers["A"].waiting == {}


def test_max_task_time_bounds_every_project() -> None:
    s = Scheduler(max_task_time=100)
    new_project(s, "NONE", lease_timeout=1000)
    new_project(s, "LONG", task_timeout=500, lease_timeout=1000)
    assert s.projects["NONE"].task_time_limit == 100
    # the workers are told 100 s: their own kill ends the task first, as a counted timeout
    assert s.projects["LONG"].options["task_timeout"] == 100
    assert s.projects["LONG"].message.options["task_timeout"] == 100
    assert s.projects["LONG"].task_time_limit == 100 + TASK_TIME_GRACE
    add(s, "NONE", [0])
    join(s, "A", credit=1)
    for second in range(10, 101, 10):
        assert s.worker_seen("A", float(second)) == []
        assert s.tick(float(second)) == []
    assert s.tick(100.5) == [AbandonTasks("A", [1])]
    assert s.projects["NONE"].tasks_overdue == 1


def test_incidents_add_up_per_worker_and_kind_until_taken() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(2))
    join(s, "M")
    join(s, "N")
    for _ in range(3):
        answer(s, forged_send("M", 1), credit=0)
    answer(s, forged_send("N", 2), credit=0)
    assert s.take_incidents() == [
        Incident("M", "M", "forged_results", 3),
        Incident("N", "N", "forged_results", 1),
    ]
    assert s.take_incidents() == []
    assert s.forged_results_dropped == 4


# ---- property test -----------------------------------------------------------------------------

N_WORKERS = 4  # worker 0 never leaves, never rejects and only ever answers "ok"
OUTCOMES = ("ok", "ok", "abandoned", "crash", "timeout", "load_error")

# (kind, worker index, amount 1..3, which held task to answer, outcome); kinds are weighted
KINDS = (
    ("answer",) * 6
    + ("credit",) * 3
    + ("join", "join", "feed", "feed", "tick", "tick", "leave", "seen", "reject")
)
TICKS = {1: 0.5, 2: 1.0, 3: 2.5}
op_strategy = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, N_WORKERS - 1),
    st.integers(1, 3),
    st.integers(0, 50),
    st.sampled_from(OUTCOMES),
)


class Sim:
    """Drives a Scheduler with one project and records what the creator and workers see.

    With ``latest_only`` a worker keeps only the latest attempt it was sent of a task, and a
    worker that reconnects has forgotten its old tasks. Otherwise it may answer any attempt
    it was ever sent, in any order, and a worker that reconnects still answers the tasks of
    its previous connection on the new one (as after a dropped connection).
    """

    def __init__(self, n_tasks: int, latest_only: bool) -> None:
        self.s = Scheduler()
        self.now = 0.0
        self.n_tasks = n_tasks
        self.fed = 0
        self.latest_only = latest_only
        self.forwarded: Counter[int] = Counter()
        self.finished: list[p.Finished] = []
        self.conn: dict[int, str] = {}  # worker index -> current connection id
        self.generation = 0
        self.held: dict[str, list[p.Task]] = {}  # tasks each connection may still answer
        self.orphans: dict[int, list[p.Task]] = {}  # tasks of a closed connection, by index
        self.names: dict[str, str] = {}  # connection id -> worker name
        self.sent: dict[tuple[int, int], tuple[str, int]] = {}  # (task, attempt) -> (name, seq)
        self.ok_answers: set[tuple[int, int]] = set()  # (task, attempt) answered "ok"
        self.ended = False
        # task_time_limit 1 + TASK_TIME_GRACE: some runs tick past it, some workers go overdue
        submit = make_submit(lease_timeout=2, max_attempts=10**6, task_timeout=1)
        self.apply(self.s.submit(CREATOR, submit, 0))

    def apply(self, actions: list[Action]) -> None:
        for action in valid(actions):
            if isinstance(action, SendTask):
                task = action.message
                seq = int(task.items.removeprefix(b"items-"))
                assert (task.task_id, task.attempt) not in self.sent  # a new attempt each time
                self.sent[(task.task_id, task.attempt)] = (self.names[action.worker_id], seq)
                held = self.held[action.worker_id]
                if self.latest_only:
                    held[:] = [t for t in held if t.task_id != task.task_id]
                held.append(task)
            elif isinstance(action, AbandonTasks):
                assert action.worker_id in self.s.workers
            elif isinstance(action, ToCreator):
                message = action.message
                if isinstance(message, p.TaskDone):
                    self.forwarded[message.seq] += 1
                    assert self.forwarded[message.seq] == 1, f"seq {message.seq} forwarded twice"
                    # the ok answer of an attempt of this seq that was actually sent
                    task_id, attempt = (int(x) for x in message.payload.split(b":"))
                    assert (task_id, attempt) in self.ok_answers
                    assert self.sent[(task_id, attempt)] == (message.stats["worker"], message.seq)
                elif isinstance(message, p.Finished):
                    self.finished.append(message)
                    assert len(self.finished) == 1
                elif isinstance(message, p.More):
                    assert not self.ended
        self.check_invariants()

    def check_invariants(self) -> None:
        s = self.s
        for task in s.tasks.values():
            if task.state is TaskState.LEASED:
                assert task.task_id in s.workers[task.worker_id].leased
                assert task.task_id in s.projects[task.project_id].leased
        for worker in s.workers.values():
            for task_id in worker.leased:
                assert s.tasks[task_id].state is TaskState.LEASED
                assert s.tasks[task_id].worker_id == worker.worker_id
                assert worker.device_id in s.tasks[task_id].holders
                started = s.tasks[task_id].run_deadline is not None
                assert started == (task_id not in worker.waiting)
            assert worker.waiting.keys() <= worker.leased
            assert worker.started == worker.leased - worker.waiting.keys()
            running = len(worker.leased) - len(worker.waiting)
            assert running <= worker.slots
            assert running == worker.slots or not worker.waiting
            assert worker.credit + len(worker.leased) <= worker.slots * MAX_HELD_PER_SLOT
        for worker_id in s._ready:
            assert s.workers[worker_id].credit > 0
            assert not s.workers[worker_id].blocked
        project = s.projects["P"]
        queued = [*project.queue, *project.retries]
        assert len(queued) == len(set(queued))
        assert set(queued) == {t.task_id for t in s.tasks.values() if t.state is TaskState.QUEUED}

    def start(self, n_workers: int) -> None:
        """Workers 0..n_workers-1 join with 2 credits each; half the tasks are fed."""
        for index in range(n_workers):
            self.join(index, 1)
            self.apply(self.s.worker_credit(self.conn[index], 2, self.now))
        self.feed((self.n_tasks + 1) // 2)

    def join(self, index: int, slots: int) -> None:
        if index in self.conn:
            return
        self.generation += 1
        worker_id = f"w{index}-{self.generation}"
        self.conn[index] = worker_id
        self.held[worker_id] = self.orphans.pop(index, [])
        self.names[worker_id] = f"w{index}"
        self.apply(
            self.s.add_worker(
                worker_id, device_id=f"d{index}", name=f"w{index}", slots=slots, now=self.now
            )
        )

    def leave(self, index: int) -> None:
        worker_id = self.conn.pop(index)
        held = self.held.pop(worker_id)
        if not self.latest_only:
            self.orphans[index] = held
        self.apply(self.s.remove_worker(worker_id, self.now))

    def answer(self, worker_id: str, pick: int, outcome: str) -> None:
        held = self.held[worker_id]
        if held:
            task = held.pop(pick % len(held))
            payload = b"%d:%d" % (task.task_id, task.attempt)  # which answer was accepted
            if outcome == "ok":
                self.ok_answers.add((task.task_id, task.attempt))
            result = make_result(task, outcome, payload=payload)
            self.apply(self.s.task_result(worker_id, result, self.now))

    def feed(self, count: int) -> None:
        count = min(count, self.n_tasks - self.fed)
        if count:
            seqs = range(self.fed, self.fed + count)
            self.apply(self.s.add_tasks(CREATOR, make_tasks("P", seqs), self.now))
            self.fed += count

    def step(self, op: tuple[str, int, int, int, str]) -> None:
        kind, index, amount, pick, outcome = op
        self.now += 0.1
        worker_id = self.conn.get(index)
        if kind == "join":
            self.join(index, amount)
        elif kind == "tick":
            self.now += TICKS[amount]
            self.apply(self.s.tick(self.now))
        elif kind == "feed":
            self.feed(amount)
        elif worker_id is None:
            return
        elif kind == "credit":
            self.apply(self.s.worker_credit(worker_id, amount, self.now))
        elif kind == "answer":
            self.answer(worker_id, pick, "ok" if index == 0 else outcome)
        elif kind == "seen":
            self.apply(self.s.worker_seen(worker_id, self.now))
        elif index == 0:
            return  # worker 0 stays and never rejects
        elif kind == "leave":
            self.leave(index)
        elif kind == "reject":
            self.apply(self.s.worker_rejects(worker_id, "P", "nope", self.now))

    def finish(self) -> None:
        """Worker 0 keeps answering ok, the others fall silent; ticks move stuck leases on."""
        self.feed(self.n_tasks)
        self.ended = True
        self.apply(self.s.end_tasks(CREATOR, make_end("P", self.n_tasks), self.now))
        steady = self.conn[0]
        for _ in range(100):
            if self.finished:
                return
            self.now += 2.5
            self.apply(self.s.worker_seen(steady, self.now))
            self.apply(self.s.tick(self.now))
            self.apply(self.s.worker_credit(steady, 1, self.now))
            while self.held[steady] and not self.finished:
                self.answer(steady, 0, "ok")


@pytest.mark.parametrize("latest_only", [True, False], ids=["latest-answers", "stale-answers"])
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    n_tasks=st.integers(1, 8),
    n_start=st.integers(1, N_WORKERS),
    ops=st.lists(op_strategy, min_size=5, max_size=60),
)
def test_property_each_result_forwarded_once(
    latest_only: bool, n_tasks: int, n_start: int, ops: list[tuple[str, int, int, int, str]]
) -> None:
    """Random joins, leaves, credit, answers, rejections and ticks around one project.

    Safety after every event: no seq is forwarded twice, every forwarded result is the ok
    answer of an attempt that was actually sent (of that seq, by that worker), Finished comes
    at most once, no More after End, and leases, queues and the ready set stay consistent.
    Liveness: once worker 0 alone keeps answering, the project finishes with every seq
    forwarded exactly once -- whether workers answer only their latest attempts or stale ones.
    """
    sim = Sim(n_tasks, latest_only)
    sim.start(n_start)
    for op in ops:
        sim.step(op)
    sim.finish()
    assert [f.status for f in sim.finished] == ["done"]
    assert sim.forwarded == Counter(range(n_tasks))
    assert sim.finished[0].stats["tasks_done"] == n_tasks
    assert sim.s.tasks == {}
