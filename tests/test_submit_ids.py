"""Creator-chosen project ids and task ids, against real server processes on 127.0.0.1.

The protocol is spoken by hand here (creators and, for the task ids, a worker), so the tests
see exactly what the server sends: the answer to a duplicate or malformed project id, and the
task ids handed out before and after a SIGKILL restart.
"""

from __future__ import annotations

import contextlib
import pickle
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
from conftest import RawPeer, ServerProcess, WorkerProcess, payload_by_index

from dcproto import protocol as p
from dcproto.creator.creator import pickle_class
from dcproto.server.server import TASK_ID_BLOCK
from dcproto.server.store import DB_FILE

TIMEOUT = 20.0  # generous: a failure shows as a timeout, a pass takes a fraction of it


class Times7:
    @staticmethod
    def parallel_func(x: int) -> int:
        time.sleep(0.2)  # still running when the duplicate Submit arrives
        return x * 7


class Times1000:
    @staticmethod
    def parallel_func(x: int) -> int:
        return x * 1000


# ---- a hand-driven peer -------------------------------------------------------------------------


def _finished(project_id: str) -> Callable[[p.Message], bool]:
    return lambda m: isinstance(m, p.Finished) and m.project_id == project_id


def _submit(project_id: str, name: str, cls: type) -> p.Submit:
    return p.Submit(
        project_id=project_id,
        name=name,
        code=pickle_class(cls, []),
        modules=[],
        parallel="parallel_func",
        stop=None,
        only_if=None,
        options={},
    )


def _tasks(project_id: str, items: dict[int, int]) -> p.Tasks:
    """One task per ``seq: item``, each item alone in its task."""
    return p.Tasks(
        project_id=project_id,
        tasks=[
            [seq, pickle.dumps([item], protocol=pickle.HIGHEST_PROTOCOL), 1]
            for seq, item in items.items()
        ],
    )


def _results(messages: list[p.Message], project_id: str) -> dict[int, dict[Any, Any]]:
    """Each TaskDone's ``{item: value}`` (its payload's item indices mapped through its
    items, as the creator does), by seq (each seq at most once)."""
    results: dict[int, dict[Any, Any]] = {}
    for message in messages:
        if isinstance(message, p.TaskDone):
            assert message.project_id == project_id, message
            assert message.seq not in results, f"seq {message.seq} delivered twice"
            items = pickle.loads(message.items)
            by_index = payload_by_index(message.payload)
            results[message.seq] = {items[i]: value for i, value in by_index.items()}
    return results


def _about(messages: list[p.Message]) -> set[str]:
    return {getattr(m, "project_id", "") for m in messages} - {""}


# ---- a duplicate project id ---------------------------------------------------------------------


def test_duplicate_id_is_refused_and_the_first_project_is_unaffected(
    server: ServerProcess, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker()
    with RawPeer(server, "creator") as first, RawPeer(server, "creator") as second:
        # the first project, without End for now: it cannot finish before the duplicate came
        first.send(_submit("dup-1", "first", Times7), _tasks("dup-1", {0: 0, 1: 1, 2: 2}))
        accepted = first.receive_until(lambda m: isinstance(m, p.Accepted))[-1]
        assert isinstance(accepted, p.Accepted)
        assert accepted.project_id == "dup-1"

        # the duplicate, with different code and a task and End behind it that would be
        # taken by the first project if they leaked into it (seq 3 is the next one expected)
        second.send(
            _submit("dup-1", "second", Times1000),
            _tasks("dup-1", {3: 100}),
            p.End(project_id="dup-1", total_tasks=4, total_items=4),
        )
        refused = second.receive_until(_finished("dup-1"), timeout=5)
        assert len(refused) == 2, refused
        assert refused[0] == p.Accepted(project_id="dup-1", credit=0)
        finished = refused[1]
        assert isinstance(finished, p.Finished)
        assert finished.status == "failed"
        assert finished.error is not None
        assert finished.error["reason"] == "duplicate_id"

        first.send(p.End(project_id="dup-1", total_tasks=3, total_items=3))
        messages = first.receive_until(_finished("dup-1"))
        done = messages[-1]
        assert isinstance(done, p.Finished)
        assert done.status == "done", done
        assert _about(messages) == {"dup-1"}
        assert _results(messages, "dup-1") == {0: {0: 0}, 1: {1: 7}, 2: {2: 14}}
        # nothing of the first project reached the refused creator
        assert second.quiet_for(0.3) == []
        assert not second.closed

    # the id stays taken once its project has finished
    with RawPeer(server, "creator") as third:
        third.send(_submit("dup-1", "third", Times7), _tasks("dup-1", {0: 5}))
        refused = third.receive_until(_finished("dup-1"), timeout=5)
        assert [type(m) for m in refused] == [p.Accepted, p.Finished], refused
        assert refused[0] == p.Accepted(project_id="dup-1", credit=0)
        again = refused[1]
        assert isinstance(again, p.Finished)
        assert again.status == "failed"
        assert (again.error or {}).get("reason") == "duplicate_id"

        third.send(p.ListProjects(ref=7))
        listing = third.receive_until(lambda m: isinstance(m, p.ProjectList))[-1]
        assert isinstance(listing, p.ProjectList)
        assert listing.ref == 7
        records = [r for r in listing.projects if r["project_id"] == "dup-1"]
        assert len(records) == 1, listing.projects
        assert records[0]["name"] == "first"
        assert records[0]["status"] == "done"
        # the duplicate's task was not taken by the first project
        assert (records[0]["tasks_received"], records[0]["total_tasks"]) == (3, 3), records
    assert server.alive()


# ---- a malformed project id ---------------------------------------------------------------------


def _raw_submit(project_id: str) -> bytes:
    """A Submit frame whatever its id (``p.encode`` refuses to build an invalid one)."""
    submit = _submit("placeholder", "bad", Times1000)
    fields = [getattr(submit, name) for name, _, _ in p.SCHEMA[p.Submit]]
    fields[0] = project_id
    body = msgpack.packb([p.Submit.TYPE, *fields], use_bin_type=True)
    return p.HEADER.pack(len(body)) + body


BAD_IDS = ["not ok!", "", "x" * 65, "a/b", "caf\u00e9", "tab\tid"]


def test_malformed_id_closes_the_connection_and_the_server_keeps_serving(
    server: ServerProcess, start_worker: Callable[..., WorkerProcess]
) -> None:
    for bad_id in BAD_IDS:
        with RawPeer(server, "creator") as creator:
            # valid tasks behind it: they must not be taken either
            creator.send_raw(_raw_submit(bad_id) + p.encode(_tasks(bad_id, {0: 1})))
            messages: list[p.Message] = []
            while (message := creator.receive(5)) is not None:
                messages.append(message)
            assert creator.closed, bad_id
            assert [(type(m), getattr(m, "code", None)) for m in messages] == [
                (p.Error, "bad_message")
            ], (bad_id, messages)
    assert server.alive()

    start_worker()
    longest = "ok_" + "x" * 61  # 64 characters: the longest id allowed
    with RawPeer(server, "creator") as creator:
        creator.send(
            _submit(longest, "fine", Times1000),
            _tasks(longest, {0: 1, 1: 2}),
            p.End(project_id=longest, total_tasks=2, total_items=2),
        )
        messages = creator.receive_until(_finished(longest))
    finished = messages[-1]
    assert isinstance(finished, p.Finished)
    assert finished.status == "done", finished
    assert isinstance(messages[0], p.Accepted)
    assert _results(messages, longest) == {0: {1: 1000}, 1: {2: 2000}}
    assert server.alive()


# ---- task ids across a SIGKILL restart ----------------------------------------------------------


def _run_project_by_hand(
    server: ServerProcess, project_id: str, items: dict[int, int], stale: Sequence[int] = ()
) -> list[int]:
    """Run a project on ``server`` with a hand-driven worker that answers each item ``x``
    with ``x * 3``; first, once it holds the tasks, it sends a Result for each task id in
    ``stale`` (from an earlier server run), which must be dropped. Returns the task ids."""
    # a slot per task: the server sends a worker nothing beyond its slots until it has
    # measured the project's task time
    slots = len(items) + 1
    with RawPeer(server, "worker", slots=slots) as worker, RawPeer(server, "creator") as creator:
        worker.send(p.Credit(credit=slots))
        creator.send(
            _submit(project_id, project_id, Times1000),
            _tasks(project_id, dict(enumerate(items.values()))),
            p.End(project_id=project_id, total_tasks=len(items), total_items=len(items)),
        )
        received: list[p.Message] = []
        while sum(isinstance(m, p.Task) for m in received) < len(items):
            message = worker.receive(TIMEOUT)
            assert message is not None, "the server closed the worker's connection"
            received.append(message)
        project = received[0]
        assert isinstance(project, p.Project), received
        assert project.project_id == project_id
        tasks = [m for m in received if isinstance(m, p.Task)]
        assert len(received) == len(tasks) + 1, received
        for old_id in stale:
            worker.send(
                p.Result(
                    task_id=old_id,
                    attempt=1,
                    outcome="ok",
                    payload=pickle.dumps({"stale": old_id}),
                    n_items=1,
                    n_kept=1,
                    error=None,
                    stats={},
                    files=[],
                    credit=0,
                )
            )
        for task in tasks:
            assert task.project_id == project_id
            assert task.attempt == 1
            (item,) = pickle.loads(task.items)
            worker.send(
                p.Result(
                    task_id=task.task_id,
                    attempt=task.attempt,
                    outcome="ok",
                    payload=pickle.dumps({0: item * 3}),  # keyed by the index in the task
                    n_items=1,
                    n_kept=1,
                    error=None,
                    stats={},
                    files=[],
                    credit=1,
                )
            )
        messages = creator.receive_until(_finished(project_id))
    finished = messages[-1]
    assert isinstance(finished, p.Finished)
    assert finished.status == "done", finished
    assert _results(messages, project_id) == {
        seq: {item: item * 3} for seq, item in enumerate(items.values())
    }
    task_ids = [t.task_id for t in tasks]
    assert len(set(task_ids)) == len(task_ids), task_ids
    return task_ids


def _stored_ceiling(server: ServerProcess) -> int:
    with contextlib.closing(sqlite3.connect(server.state_dir / DB_FILE)) as db:
        row = db.execute("SELECT value FROM meta WHERE key='max_task_id'").fetchone()
    assert row is not None, "no max_task_id in the state database"
    return int(row[0])


def test_task_ids_after_a_sigkill_restart_are_above_the_stored_ceiling(
    make_server: Callable[..., ServerProcess],
) -> None:
    first = make_server()
    old_ids = _run_project_by_hand(first, "before", {0: 10, 1: 11, 2: 12})

    first.proc.kill()
    first.proc.wait(timeout=10)
    ceiling = _stored_ceiling(first)
    assert ceiling >= max(old_ids), (ceiling, old_ids)

    second = make_server(port=first.port, state_dir=first.state_dir)
    new_ids = _run_project_by_hand(second, "after", {0: 20, 1: 21, 2: 22}, stale=old_ids)
    assert min(new_ids) > ceiling, (ceiling, old_ids, new_ids)
    assert min(new_ids) > max(old_ids)
    assert min(new_ids) >= min(old_ids) + TASK_ID_BLOCK, (old_ids, new_ids)
    assert second.alive()
