"""Misbehaving peers against a real server process, with honest projects running alongside.

Each attacker speaks the protocol by hand (a :class:`RawPeer` with a token of its own): a worker
that forges results for tasks it never got, a creator that sends more tasks than its credit,
and a worker that takes tasks and then only heartbeats. Every honest project must still finish
with exactly the right results.
"""

from __future__ import annotations

import pickle
import re
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Self

import pytest
from conftest import ServerProcess, WorkerProcess, hello_for, raw_socket, wait_for

from dcproto import Distribute
from dcproto import protocol as p
from dcproto.creator.creator import pickle_class
from dcproto.server.scheduler import TASK_TIME_GRACE
from dcproto.users import User

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 20.0  # generous: a failure shows as a timeout, a pass takes a fraction of it


# ---- a hand-driven peer -------------------------------------------------------------------------


class RawPeer:
    """One authenticated protocol connection driven by the test, under a token of its own
    (``token_name``). A thread sends Heartbeats, so the server does not drop the peer while the
    test waits; received Heartbeats are skipped."""

    def __init__(self, server: ServerProcess, role: str, token_name: str, slots: int = 0) -> None:
        self.sock = raw_socket(server)
        self._decoder = p.Decoder()
        self._inbox: deque[p.Message] = deque()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self.closed = False  # the server closed the connection
        challenge = self.receive(5)
        assert isinstance(challenge, p.Challenge), challenge
        token = server.add_token(token_name, role)
        self.send(hello_for(server, challenge, role, token=token, slots=slots, name=token_name))
        welcome = self.receive(5)
        assert isinstance(welcome, p.Welcome), welcome
        self._beats = threading.Thread(
            target=self._heartbeats, args=(welcome.heartbeat_interval / 3,), daemon=True
        )
        self._beats.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._beats.is_alive():
            self._beats.join(timeout=5)
        self.sock.close()

    def _heartbeats(self, interval: float) -> None:
        beat = p.encode(p.Heartbeat())
        while not self._stop.wait(interval):
            try:
                self.send_raw(beat)
            except OSError:
                return

    def send_raw(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def send(self, *messages: p.Message) -> None:
        """All ``messages`` in one write."""
        self.send_raw(b"".join(p.encode(m) for m in messages))

    def _pump(self, timeout: float) -> None:
        readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not readable:
            return
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        for body in self._decoder.feed(data):
            message = p.decode(body)
            if not isinstance(message, p.Heartbeat):
                self._inbox.append(message)

    def receive(self, timeout: float) -> p.Message | None:
        """The next message but Heartbeats; None once the server has closed. Fails the test
        after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._inbox:
            if self.closed:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no message from the server within {timeout} s")
            self._pump(remaining)
        return self._inbox.popleft()

    def receive_until(
        self, last: Callable[[p.Message], bool], timeout: float = TIMEOUT
    ) -> list[p.Message]:
        """Messages up to and including the first one for which ``last`` is true."""
        deadline = time.monotonic() + timeout
        messages: list[p.Message] = []
        while True:
            message = self.receive(max(0.0, deadline - time.monotonic()))
            if message is None:
                pytest.fail(f"the server closed the connection; so far: {messages}")
            messages.append(message)
            if last(message):
                return messages

    def until_closed(self, timeout: float = TIMEOUT) -> list[p.Message]:
        """Every message until the server closes the connection."""
        messages: list[p.Message] = []
        while (message := self.receive(timeout)) is not None:
            messages.append(message)
        return messages

    def quiet_for(self, seconds: float) -> list[p.Message]:
        """What has arrived, and whatever arrives within ``seconds``, but Heartbeats."""
        deadline = time.monotonic() + seconds
        while not self.closed and (remaining := deadline - time.monotonic()) > 0:
            self._pump(remaining)
        messages = list(self._inbox)
        self._inbox.clear()
        return messages


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
    with RawPeer(server, "worker", "mallory", slots=4) as mallory:
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
    # the first two tasks were done before the forgeries came: at least 3 outcomes each
    assert 6 <= stats["forged_results_dropped"] <= 3 * 60
    logged = wait_for(
        lambda: re.findall(
            r"dropped (\d+) results from worker mallory \(c\d+\) for tasks it does not hold",
            server.log(),
        ),
        TIMEOUT,
        "the drop count in the server log",
    )
    assert 1 <= int(logged[0]) <= stats["forged_results_dropped"]
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
    with RawPeer(server, "creator", "greedy") as greedy:
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

    with RawPeer(server, "worker", "sloth", slots=1) as sloth:
        sloth.send(p.Credit(credit=3))
        project = PlusOne()
        held: list[p.Task] = []
        while len(held) < 3:  # no other worker yet: the sloth gets the first tasks
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
    assert stats["tasks_overdue"] == 1  # its one slot: the other two never started
    assert stats["tasks_reissued"] >= 3
    assert re.search(
        r"worker sloth \(c\d+\) held 1 started tasks past their time limit", server.log()
    )
    assert TASK_TIME_GRACE < TIMEOUT / 2  # the re-issue comes well within the wait above
    assert server.alive()
