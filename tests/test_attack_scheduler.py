"""Misbehaving peers against a real server process, with honest projects running alongside.

Each attacker speaks the protocol by hand (a :class:`RawPeer` with a token of its own): a worker
that forges results for tasks it never got, a creator that sends more tasks than its credit,
and a worker that takes tasks and then only heartbeats. Every honest project must still finish
with exactly the right results.
"""

from __future__ import annotations

import pickle
import re
import time
from collections.abc import Callable

import pytest
from conftest import RawPeer, ServerProcess, WorkerProcess, wait_for

from dcproto import Distribute
from dcproto import protocol as p
from dcproto.creator.creator import pickle_class
from dcproto.server.scheduler import TASK_TIME_GRACE
from dcproto.users import User

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 20.0  # generous: a failure shows as a timeout, a pass takes a fraction of it


# ---- a hand-driven peer -------------------------------------------------------------------------


def forged_result(task_id: int, outcome: str) -> p.Result:
    """What a worker that never got task ``task_id`` could claim about it."""
    return p.Result(
        task_id=task_id,
        attempt=1,
        outcome=outcome,
        payload=pickle.dumps({0: "forged"}) if outcome in ("ok", "stop") else b"",
        n_items=1,
        n_kept=1 if outcome in ("ok", "stop") else 0,
        error={"message": "forged"} if outcome == "error" else None,
        stats={},
        files=[],
        credit=0,
    )


class Times1000:
    @staticmethod
    def parallel_func(x: int) -> int:
        return x * 1000


def raw_tasks(project_id: str, seqs: range) -> p.Tasks:
    """One task per seq, each of one item: the seq itself."""
    return p.Tasks(
        project_id=project_id,
        tasks=[[seq, pickle.dumps([seq], protocol=pickle.HIGHEST_PROTOCOL), 1] for seq in seqs],
    )


# ---- (a) forged results -------------------------------------------------------------------------


def test_forged_results_from_a_worker_without_the_tasks_change_nothing(
    server: ServerProcess, start_worker: Callable[..., WorkerProcess], user: User
) -> None:
    honest = start_worker()

    @Distribute(user_name="home", iterator=range(60), task_size=1)
    class Squares:
        @staticmethod
        def parallel_func(x: int) -> int:
            time.sleep(0.05)  # still running when the forgeries arrive
            return x * x

    project = Squares()
    wait_for(lambda: project.progress.tasks_done >= 2, TIMEOUT, "the first results")
    with RawPeer(server, "worker", slots=4, token_name="mallory") as mallory:
        # task ids on a fresh server start at 1: these name every task of the project, done,
        # running and queued, and more besides
        for outcome in ("ok", "error", "stop"):
            mallory.send(*(forged_result(task_id, outcome) for task_id in range(1, 201)))
        results = project.get_results(timeout=TIMEOUT)
        assert not mallory.closed  # dropped, not a protocol error
        assert not [m for m in mallory.quiet_for(0.1) if isinstance(m, p.Task)]

    assert results == {x: x * x for x in range(60)}
    stats = project.stats
    assert stats["tasks_done"] == 60
    assert stats["per_worker"] == {honest.name: 60}
    # the project counts forgeries for its open tasks (most were open when they came); the
    # server also counts those for finished tasks and ids never issued, in its log
    assert 6 <= stats["forged_results_dropped"] <= 3 * 60
    logged = wait_for(
        lambda: re.findall(
            r"dropped (\d+) results from worker mallory \(c\d+\) for tasks it does not hold",
            server.log(),
        ),
        TIMEOUT,
        "the drop count in the server log",
    )
    assert 1 <= int(logged[0]) <= 3 * 200
    assert server.alive()


# ---- (b) a creator over its credit --------------------------------------------------------------


def test_a_creator_over_its_credit_is_closed_and_other_projects_go_on(
    server: ServerProcess, start_worker: Callable[..., WorkerProcess], user: User
) -> None:
    start_worker()

    @Distribute(user_name="home", iterator=range(40), task_size=2)
    class Cubes:
        @staticmethod
        def parallel_func(x: int) -> int:
            time.sleep(0.02)
            return x**3

    project = Cubes()
    with RawPeer(server, "creator", token_name="greedy") as greedy:
        # the INITIAL_CREDIT tasks right behind the Submit are fine
        greedy.send(
            p.Submit(
                project_id="greedy",
                name="greedy",
                code=pickle_class(Times1000, []),
                modules=[],
                parallel="parallel_func",
                stop=None,
                only_if=None,
                options={},
            ),
            raw_tasks("greedy", range(p.INITIAL_CREDIT)),
        )
        messages = greedy.receive_until(lambda m: isinstance(m, p.Accepted))
        accepted = messages[-1]
        assert isinstance(accepted, p.Accepted) and accepted.project_id == "greedy"
        # then far more new tasks than the credit granted (More may add a window at most)
        start = p.INITIAL_CREDIT
        greedy.send(raw_tasks("greedy", range(start, start + accepted.credit + 1000)))
        messages += greedy.until_closed()
        errors = [m for m in messages if isinstance(m, p.Error)]
        assert [e.code for e in errors] == ["credit_exceeded"], messages
        assert "new tasks sent with credit for" in errors[0].message
        assert greedy.closed

    assert project.get_results(timeout=TIMEOUT) == {x: x**3 for x in range(40)}
    assert project.stats["tasks_done"] == 20
    assert re.search(r"closing creator c\d+ \(greedy\) from .*credit for \d+", server.log())
    assert server.alive()


# ---- (c) a worker that only heartbeats ----------------------------------------------------------


def test_tasks_of_a_worker_that_only_heartbeats_go_to_a_real_worker(
    server: ServerProcess, start_worker: Callable[..., WorkerProcess], user: User
) -> None:
    # task_timeout 1 s: the sloth's first task is taken back 1 + TASK_TIME_GRACE s after it
    # was sent. Attempts to spare: on a loaded machine even x + 1 with the project's loading
    # may pass 1 s now and then (that is a counted timeout, not what this test is about)
    @Distribute(user_name="home", iterator=range(12), task_size=1, task_timeout=1, max_attempts=10)
    class PlusOne:
        @staticmethod
        def parallel_func(x: int) -> int:
            return x + 1

    with RawPeer(server, "worker", slots=1, token_name="sloth") as sloth:
        sloth.send(p.Credit(credit=3))
        project = PlusOne()
        held: list[p.Task] = []
        # no other worker yet: the sloth gets a task for its slot, and no more (nothing is
        # held ahead of a project whose task time is not known)
        while len(held) < 1:
            message = sloth.receive(TIMEOUT)
            assert message is not None, "the server closed the sloth's connection"
            if isinstance(message, p.Task):
                held.append(message)
        honest = start_worker()
        results = project.get_results(timeout=TIMEOUT)
        # it was told to give them all up, and still holds its connection: liveness is fine
        abandoned = sorted(
            task_id
            for message in sloth.quiet_for(0.2)
            if isinstance(message, p.Abandon)
            for task_id in message.task_ids
        )
        assert abandoned == sorted(task.task_id for task in held)
        assert not sloth.closed

    assert results == {x: x + 1 for x in range(12)}
    stats = project.stats
    assert stats["tasks_done"] == 12
    assert stats["per_worker"] == {honest.name: 12}
    assert stats["tasks_overdue"] == 1  # its one slot
    assert stats["tasks_reissued"] >= 1
    assert re.search(
        r"worker sloth \(c\d+\) held 1 started tasks past their time limit", server.log()
    )
    assert TASK_TIME_GRACE < TIMEOUT / 2  # the re-issue comes well within the wait above
    assert server.alive()
