"""What a worker holds beyond the tasks it runs: prefetch sized by the round trip and the task
time, free slots served first, unstarted tasks taken back for idle workers, re-issues capped,
and memory that does not grow with finished tasks. Pure state machine: no sockets, no clock."""

from __future__ import annotations

import math
from typing import Any

from test_scheduler import (
    CREATOR,
    abandons,
    add,
    answer,
    join,
    make_end,
    make_result,
    make_submit,
    make_tasks,
    measured,
    new_project,
    one,
    sends,
    sent,
    valid,
)

from dcproto import protocol as p
from dcproto.server.scheduler import (
    NO_PREFETCH_RATIO,
    PREFETCH_MARGIN,
    RecallTasks,
    Scheduler,
    ToCreator,
    WakeAt,
)


def timed_result(send: Any, *, held: float, service: float, credit: int = 1) -> p.Result:
    return make_result(send.message, credit=credit, stats={"held": held, "service": service})


def test_prefetch_is_the_bandwidth_delay_product_per_slot() -> None:
    s = Scheduler()
    new_project(s)
    project = s.projects["P"]
    join(s, "A", slots=2)
    worker = s.workers["A"]
    assert s._prefetch_per_slot(worker, project) == 0  # nothing measured: hold nothing
    project.task_seconds, worker.rtt = 0.001, 0.1
    assert s._prefetch_per_slot(worker, project) == math.ceil(PREFETCH_MARGIN * 100)
    project.task_seconds, worker.rtt = 1e-9, 10.0
    assert s._prefetch_per_slot(worker, project) == p.MAX_PREFETCH_PER_SLOT
    # a round trip small beside the task: the slot idles less than NO_PREFETCH_RATIO of it
    project.task_seconds, worker.rtt = 1.0, NO_PREFETCH_RATIO / 2
    assert s._prefetch_per_slot(worker, project) == 0


def test_a_result_measures_the_round_trip_and_the_task_time() -> None:
    s = Scheduler()
    new_project(s)
    s.projects["P"].credit_outstanding = 400
    add(s, "P", range(400))
    (send,) = sends(join(s, "A", credit=p.MAX_CREDIT, slots=1))
    # sent at 0, answered at 0.1001 after the worker held it 0.0001 s: a 100 ms round trip
    actions = valid(s.task_result("A", timed_result(send, held=0.0001, service=0.0001), 0.1001))
    worker, project = s.workers["A"], s.projects["P"]
    assert math.isclose(worker.rtt or 0, 0.1)
    assert math.isclose(project.task_seconds or 0, 0.0001)
    # so it holds about PREFETCH_MARGIN round trips of work beyond the task it runs
    assert worker.prefetch == p.MAX_PREFETCH_PER_SLOT
    assert len(sends(actions)) == 1 + min(p.MAX_PREFETCH_PER_SLOT, 399 - 1)


def test_figures_a_worker_claims_beyond_what_the_server_saw_are_ignored() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(3))
    (send,) = sends(join(s, "A", credit=3, slots=1))
    for held, service in ((5.0, 5.0), (-1.0, -1.0), (float("nan"), "x"), (True, None)):
        s.task_result("A", timed_result(send, held=held, service=service), 1.0)  # type: ignore[arg-type]
    assert s.workers["A"].rtt is None and s.projects["P"].task_seconds is None


def test_a_worker_warmed_on_tiny_tasks_holds_nothing_of_a_new_project() -> None:
    """A project's tasks may be long until one is measured: the second worker, joining late,
    still finds work, and the first holds only what it runs."""
    s = Scheduler()
    new_project(s, "TINY")
    add(s, "TINY", range(1))
    s.end_tasks(CREATOR, make_end("TINY", 1), 0.0)
    (send,) = sends(join(s, "A", credit=p.MAX_CREDIT, slots=1))
    s.task_result("A", timed_result(send, held=0.0001, service=0.0001), 0.01)
    assert s.workers["A"].prefetch > 0
    new_project(s, "LONG", now=1.0)
    actions = add(s, "LONG", range(12), now=1.0)
    assert len(sends(actions)) == 1  # its slot, and no more
    assert [t.message.project_id for t in sends(actions)] == ["LONG"]
    assert len(sends(join(s, "B", credit=5, slots=5, now=1.8))) == 5


def test_free_slots_are_served_before_prefetch() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(1))
    join(s, "A", credit=4, slots=1)
    measured(s, "A", per_slot=3)
    join(s, "B", credit=1, slots=1)
    # A may hold it ahead, but B has a free slot
    assert sent(add(s, "P", range(1, 2))) == [("B", 2, 1)]


def test_an_idle_worker_takes_an_unstarted_task_from_the_busiest() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(1))
    sends(join(s, "A", credit=10, slots=1))
    measured(s, "A", per_slot=4)
    held = sends(add(s, "P", range(1, 5)))
    assert [t.message.task_id for t in held] == [2, 3, 4, 5]
    assert list(s.workers["A"].waiting) == [2, 3, 4, 5]
    # B joins: nothing is queued, so it takes the task A would run last
    actions = join(s, "B", credit=2, slots=2, now=1.0)
    assert sent(actions) == [("B", 5, 2), ("B", 4, 2)]
    assert [(a.worker_id, a.task_ids) for a in actions if isinstance(a, RecallTasks)] == [
        ("A", [5]),
        ("A", [4]),
    ]
    assert list(s.workers["A"].waiting) == [2, 3]


def test_an_unstarted_task_given_back_is_no_duplicate_and_a_started_one_still_wins() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(1))
    sends(join(s, "A", credit=10, slots=1))
    measured(s, "A", per_slot=2)
    second, third = sends(add(s, "P", range(1, 3)))
    actions = join(s, "B", credit=1, slots=1, now=1.0)
    assert sent(actions) == [("B", 3, 2)]
    assert [(a.worker_id, a.task_ids) for a in actions if isinstance(a, RecallTasks)] == [
        ("A", [3])
    ]
    project = s.projects["P"]
    assert project.tasks_recalled == 1 and project.tasks_reissued == 0
    # A gives task 3 back: neither a duplicate nor forged, and its credit returns
    assert answer(s, third, "abandoned", now=1.1, credit=1, payload=b"") == []
    assert (project.duplicates_dropped, s.forged_results_dropped) == (0, 0)
    # task 2 stays with A; had A started task 3 after all, its answer wins
    (steal_2,) = sends(join(s, "C", credit=1, slots=1, now=1.2))
    assert steal_2.message.task_id == 2
    actions = answer(s, second, now=1.3, credit=0)
    assert abandons(actions) == {"C": [2]}
    assert one(actions, p.TaskDone).stats["worker"] == "A"


def test_no_task_is_taken_back_that_starts_sooner_where_it_is() -> None:
    """A far idle worker does not take a task a near busy one starts in less than the far
    one's round trip."""
    s = Scheduler()
    new_project(s)
    add(s, "P", range(1))
    join(s, "A", credit=10, slots=1)
    measured(s, "A", per_slot=2)  # tasks of 1 s
    sends(add(s, "P", range(1, 3)))
    join(s, "FAR", slots=1)
    s.workers["FAR"].rtt = 5.0
    assert sent(s.worker_credit("FAR", 1, 0.5)) == []
    s.workers["FAR"].rtt = 0.5
    assert sent(s.worker_credit("FAR", 1, 0.6)) == [("FAR", 3, 2)]


def test_max_tasks_worker_gets_its_tasks_from_warmed_workers() -> None:
    """A worker that may run 3 more tasks gets 3, even when the others hold the rest."""
    s = Scheduler()
    new_project(s)
    add(s, "P", range(2))
    join(s, "A", credit=20, slots=1)
    join(s, "B", credit=20, slots=1)
    for worker_id in ("A", "B"):
        measured(s, worker_id, per_slot=14)
    add(s, "P", range(2, 30))
    project = s.projects["P"]
    assert not project.has_queued()
    got = []
    actions = join(s, "C", credit=1, slots=1, now=1.0)
    for _ in range(3):
        (send,) = sends(actions)
        assert send.worker_id == "C"
        got.append(send.message.task_id)
        actions = answer(s, send, now=2.0, credit=1 if len(got) < 3 else 0)
    assert len(set(got)) == 3


def test_a_task_reissued_max_reissues_times_fails_the_project_with_the_reason() -> None:
    s = Scheduler()
    new_project(s, max_reissues=3, lease_timeout=2)
    add(s, "P", range(2))
    for round_ in range(3):
        now = 10.0 * round_
        join(s, f"W{round_}", credit=1, now=now)
        actions = s.remove_worker(f"W{round_}", now + 1)
    finished = one(actions, p.Finished)
    assert finished.status == "failed"
    assert finished.error["reason"] == "reissued"
    assert "3 times" in finished.error["message"]
    assert "its worker disconnected" in finished.error["message"]


def test_expired_leases_are_reissued_counted_and_reported() -> None:
    s = Scheduler()
    new_project(s, max_reissues=2, lease_timeout=2)
    add(s, "P", range(1))
    join(s, "A", credit=1, now=0.0)
    s.tick(3.0)
    assert s.take_incidents()[0].kind == "expired_leases"
    s.worker_seen("A", 3.1)
    s.worker_credit("A", 1, 3.1)
    actions = s.tick(6.0)
    finished = one(actions, p.Finished)
    assert finished.error["reason"] == "reissued"
    assert "lease_timeout" in finished.error["message"]


def test_memory_stays_flat_however_many_tasks_finish() -> None:
    """Nothing per finished task is kept: not the task, not its holders. Late answers from a
    worker whose lease expired are still told apart from forged ones."""
    s = Scheduler()
    new_project(s, lease_timeout=2)
    join(s, "A", credit=1)
    join(s, "B", credit=1)
    now = 0.0
    for seq in range(0, 5000, 2):
        now += 0.01
        actions = add(s, "P", [seq, seq + 1], now=now)
        for send in sends(actions):
            answer(s, send, now=now + 0.005, credit=1)
    project = s.projects["P"]
    assert project.tasks_done == 5000
    assert s.tasks == {} and s._owed == {} and not project.leased
    # an expired lease answered late: a duplicate, and then nothing is kept for it either
    (late,) = sends(add(s, "P", [5000], now=now))
    other = "B" if late.worker_id == "A" else "A"
    s.worker_seen(other, now + 2.5)
    (again,) = sends(s.tick(now + 3))
    assert again.worker_id == other
    answer(s, again, now=now + 3.5, credit=0)
    assert s._owed
    answer(s, late, now=now + 4, credit=0)
    assert project.duplicates_dropped == 1
    assert s._owed == {} and s.tasks == {}


def test_a_task_is_held_ahead_only_just_in_time() -> None:
    """Tasks of 50 ms, a 3 ms round trip: the next task goes out only when the running one is
    about to end (the server wakes for it), so a project that comes meanwhile is next."""
    s = Scheduler()
    new_project(s, "BIG")
    add(s, "BIG", range(10))
    assert len(sends(join(s, "A", credit=5, slots=1, now=0.0))) == 1
    s.projects["BIG"].task_seconds = 0.05
    s.workers["A"].rtt = 0.003
    s.workers["A"].prefetch = 5
    s._refresh(s.workers["A"])
    actions = valid(s.worker_credit("A", 1, 0.0))
    assert sends(actions) == []
    (wake,) = [a for a in actions if isinstance(a, WakeAt)]
    assert math.isclose(wake.when, 0.05 - PREFETCH_MARGIN * 0.003)
    assert s.next_deadline() == wake.when
    new_project(s, "SMALL", now=0.02)
    assert sends(add(s, "SMALL", [0], now=0.02)) == []
    actions = valid(s.tick(wake.when))
    assert [(t.worker_id, t.message.project_id) for t in sends(actions)] == [("A", "SMALL")]
    assert list(s.workers["A"].waiting) == [sends(actions)[0].message.task_id]


def test_a_paused_worker_gets_nothing_and_its_unstarted_tasks_go_elsewhere() -> None:
    s = Scheduler()
    new_project(s)
    add(s, "P", range(1))
    sends(join(s, "A", credit=10, slots=1))
    measured(s, "A", per_slot=2)
    sends(add(s, "P", range(1, 3)))
    assert list(s.workers["A"].waiting) == [2, 3]
    actions = valid(s.worker_state("A", paused=True, trust=[], now=1.0))
    assert [(a.worker_id, a.task_ids) for a in actions if isinstance(a, RecallTasks)] == [
        ("A", [2, 3])
    ]
    assert s.workers["A"].leased == {1}  # the running one stays, paused with it
    assert sends(s.worker_credit("A", 1, 1.1)) == []
    # its give-back answers are no fault of anyone's
    assert sent(join(s, "B", credit=2, slots=2, now=1.2)) == [("B", 2, 2), ("B", 3, 2)]
    assert s.projects["P"].tasks_reissued == 0
    assert sends(s.worker_state("A", paused=False, trust=[], now=2.0)) == []
    add(s, "P", range(3, 4), now=2.1)
    assert s.workers["A"].leased == {1, 4}


def test_a_worker_runs_only_the_projects_of_creators_it_trusts() -> None:
    s = Scheduler()
    s.submit("c1", make_submit("ALICE"), 0.0, owner="alice")
    s.submit("c2", make_submit("BOB"), 0.0, owner="bob")
    join(s, "W", slots=4)
    s.worker_state("W", paused=False, trust=["bob"], now=0.0)
    s.add_tasks("c1", make_tasks("ALICE", range(2)), 0.0)
    actions = valid(s.worker_credit("W", 4, 0.1))
    assert sends(actions) == []
    # nobody connected runs it: its creator is told
    notices = [a.message for a in actions if isinstance(a, ToCreator)]
    notices += [
        a.message
        for a in valid(s.add_tasks("c2", make_tasks("BOB", range(2)), 0.2))
        if isinstance(a, ToCreator)
    ]
    assert {t.message.project_id for t in sends(s.tick(0.3))} <= {"BOB"}
    assert {s.tasks[t].project_id for t in s.workers["W"].leased} == {"BOB"}
