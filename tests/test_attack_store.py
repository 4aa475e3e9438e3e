"""Attacks on the server's memory and durable state, against real server processes.

* An Attach flood from a creator that never reads: replays are streamed, so the server's
  memory stays bounded, an honest project finishes meanwhile, and when the flooder does read it
  gets each result exactly once; past ``replay.MAX_REPLAYS`` waiting replays it is closed with
  ``too_many_requests``. Live results and Finished of a project being replayed never overtake
  its replay.
* Per-creator limits (``--max-projects-per-creator``, ``--max-code-bytes``,
  ``--max-stored-result-bytes``): a clear refusal, naming the flag, and other creators are
  unaffected.
* One creator's writes that cannot be stored never cost another creator's: every project a
  creator was told was Accepted is still there after a SIGKILL and a restart.

The protocol is spoken by hand, so the tests see exactly what the server sends.
"""

from __future__ import annotations

import pickle
import re
import select
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

import pytest
from conftest import ServerProcess, hello_for, wait_for

from dcproto import protocol as p
from dcproto.server.replay import MAX_REPLAYS
from dcproto.trust.tls import check_pin, client_context, peer_certificate

TIMEOUT = 30.0  # generous: a failure shows as a timeout, a pass takes a fraction of it
KIB = 1024
MIB = 1024 * KIB


# ---- hand-driven peers --------------------------------------------------------------------------


class Peer:
    """One authenticated protocol connection driven by the test, as ``token`` (default: the
    shared ``creator`` or ``worker`` token). A thread sends Heartbeats, so the server does not
    drop the peer while the test is not reading. ``rcvbuf`` shrinks the socket's receive buffer
    (set before connecting, so the TCP window stays small) for a peer that stops reading."""

    def __init__(
        self,
        server: ServerProcess,
        role: str,
        *,
        token: str | None = None,
        slots: int = 0,
        rcvbuf: int | None = None,
    ) -> None:
        plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        plain.settimeout(10)
        plain.connect((server.host, server.port))
        context = client_context(fingerprint=server.fingerprint)
        self.sock: ssl.SSLSocket = context.wrap_socket(plain, server_hostname=server.host)
        check_pin(peer_certificate(self.sock), server.fingerprint, server.address)
        self._decoder = p.Decoder(max_frame=p.DEFAULT_MAX_FRAME)
        self._inbox: deque[p.Message] = deque()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self.closed = False  # the server closed the connection
        challenge = self.receive(10)
        assert isinstance(challenge, p.Challenge), challenge
        self.send(hello_for(server, challenge, role, token=token, slots=slots, name=f"t-{role}"))
        welcome = self.receive(10)
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
        if not self.sock.pending():
            readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not readable:
                return
        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        except (TimeoutError, ssl.SSLWantReadError):
            return
        if not data:
            self.closed = True
            return
        self._decoder.append(data)
        while (body := self._decoder.next_frame()) is not None:
            message = p.decode(body)
            if not isinstance(message, p.Heartbeat):
                self._inbox.append(message)

    def poll(self, timeout: float) -> p.Message | None:
        """The next message but Heartbeats, or None after ``timeout`` or once closed."""
        deadline = time.monotonic() + timeout
        while not self._inbox and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._pump(remaining)
        return self._inbox.popleft() if self._inbox else None

    def receive(self, timeout: float) -> p.Message | None:
        """Like :meth:`poll`, but fails the test after ``timeout`` seconds."""
        message = self.poll(timeout)
        if message is None and not self.closed:
            pytest.fail(f"no message from the server within {timeout} s")
        return message

    def receive_until(
        self, last: Callable[[p.Message], bool], timeout: float = TIMEOUT
    ) -> list[p.Message]:
        """Messages up to and including the first one for which ``last`` is true."""
        deadline = time.monotonic() + timeout
        messages: list[p.Message] = []
        while True:
            message = self.receive(max(0.0, deadline - time.monotonic()))
            if message is None:
                pytest.fail(f"the server closed the connection; so far: {summary(messages)}")
            messages.append(message)
            if last(message):
                return messages

    def read_to_end(self, timeout: float = TIMEOUT) -> list[p.Message]:
        """Everything until the server closes the connection."""
        deadline = time.monotonic() + timeout
        messages: list[p.Message] = []
        while (message := self.receive(max(0.0, deadline - time.monotonic()))) is not None:
            messages.append(message)
        return messages


class HandWorker:
    """A worker spoken by hand, in a thread: it answers every Task with ``payload(project_id,
    items)`` until stopped; with ``free`` set, only that many, the others once :meth:`release`
    is called."""

    def __init__(
        self,
        server: ServerProcess,
        payload: Callable[[str, Any], bytes],
        slots: int = 8,
        free: int | None = None,
    ) -> None:
        self.peer = Peer(server, "worker", slots=slots)
        self.payload = payload
        self.answered = 0
        self.free = free
        self._gate = threading.Event()
        self._waiting: deque[p.Task] = deque()
        self._stop = threading.Event()
        self.peer.send(p.Credit(credit=slots * 4))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._gate.set()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.peer.closed:
            message = self.peer.poll(0.1)
            if isinstance(message, p.Task):
                self._waiting.append(message)
            while self._waiting and (
                self.free is None or self.answered < self.free or self._gate.is_set()
            ):
                self._answer(self._waiting.popleft())

    def _answer(self, task: p.Task) -> None:
        items = pickle.loads(task.items)
        self.peer.send(
            p.Result(
                task_id=task.task_id,
                attempt=task.attempt,
                outcome="ok",
                payload=self.payload(task.project_id, items),
                n_items=len(items),
                n_kept=len(items),
                error=None,
                stats={},
                files=[],
                credit=1,
            )
        )
        self.answered += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.peer.close()


def submit(project_id: str, code: bytes = b"code") -> p.Submit:
    return p.Submit(
        project_id=project_id,
        name=project_id,
        code=code,
        modules=[],
        parallel="parallel_func",
        stop=None,
        only_if=None,
        options={},
    )


def task_entries(items: Iterable[int], first_seq: int = 0) -> list[list[Any]]:
    return [
        [seq, pickle.dumps([item], protocol=pickle.HIGHEST_PROTOCOL), 1]
        for seq, item in enumerate(items, first_seq)
    ]


def run_project(creator: Peer, project_id: str, items: list[int]) -> list[p.Message]:
    """Submit a project of one task per item, feed it within the credit granted, and return
    everything the creator received up to Finished."""
    tasks = task_entries(items)
    first, rest = tasks[: p.INITIAL_CREDIT], tasks[p.INITIAL_CREDIT :]
    end = p.End(project_id=project_id, total_tasks=len(tasks), total_items=len(tasks))
    creator.send(submit(project_id), p.Tasks(project_id=project_id, tasks=first))
    if not rest:
        creator.send(end)
    messages: list[p.Message] = []
    deadline = time.monotonic() + TIMEOUT
    while True:
        message = creator.receive(max(0.0, deadline - time.monotonic()))
        assert message is not None, f"closed; so far: {summary(messages)}"
        messages.append(message)
        if getattr(message, "project_id", None) != project_id:
            continue
        if isinstance(message, p.Accepted | p.More) and rest:
            batch, rest = rest[: message.credit], rest[message.credit :]
            if batch:
                creator.send(p.Tasks(project_id=project_id, tasks=batch))
            if not rest:
                creator.send(end)
        if isinstance(message, p.Finished):
            return messages


def finished(project_id: str) -> Callable[[p.Message], bool]:
    return lambda m: isinstance(m, p.Finished) and m.project_id == project_id


def summary(messages: list[p.Message]) -> str:
    return str(Counter(type(m).__name__ for m in messages))


def rss_mib(server: ServerProcess) -> float:
    status = Path(f"/proc/{server.proc.pid}/status").read_text(encoding="ascii")
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None, status
    return int(match.group(1)) / 1024


def times3(project_id: str, items: Any) -> bytes:
    return pickle.dumps({index: item * 3 for index, item in enumerate(items)})


def refusal(messages: list[p.Message], project_id: str) -> dict[str, Any]:
    """The error of a refused Submit: Accepted of credit 0, then Finished ``failed``."""
    about = [m for m in messages if getattr(m, "project_id", None) == project_id]
    assert [type(m) for m in about] == [p.Accepted, p.Finished], about
    accepted, done = about
    assert isinstance(accepted, p.Accepted) and accepted.credit == 0
    assert isinstance(done, p.Finished) and done.status == "failed" and done.error is not None
    return done.error


def accepted(creator: Peer, project_id: str) -> p.Accepted:
    """Submit a project with no tasks yet (it stays running) and wait for Accepted."""
    creator.send(submit(project_id))
    messages = creator.receive_until(
        lambda m: isinstance(m, p.Accepted) and m.project_id == project_id
    )
    answer = messages[-1]
    assert isinstance(answer, p.Accepted), messages
    # a refusal is Accepted of credit 0 too, with Finished right behind it
    assert not [m for m in drain(creator, 0.1) if isinstance(m, p.Finished)], project_id
    return answer


# ---- an Attach flood from a creator that never reads -------------------------------------------

BIG_RESULTS = 200
BIG_PAYLOAD = 100 * KIB  # 20 MiB of results in all
FLOODERS = 3
# The server's RSS may grow by this much while FLOODERS non-readers send 230 Attach frames each
# for that project, and an honest project runs. Measured: about 10 MiB per non-reader (what
# waits in its TLS and TCP transports up to the high-water mark, and one replay page), 35-45
# MiB in all. Before replays were streamed, each Attach copied all 20 MiB of results into the
# connection's buffer: 30 Attach frames from one non-reader took the server past 600 MiB.
RSS_GROWTH_BOUND_MIB = 120


def big_payload(project_id: str, items: Any) -> bytes:
    if project_id == "big":
        return items[0].to_bytes(4, "big") + bytes(BIG_PAYLOAD)
    return times3(project_id, items)


def test_an_attach_flood_from_a_non_reader_keeps_memory_bounded(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(heartbeat=1.0)
    honest_token = server.add_token("honest", "creator")
    worker = HandWorker(server, big_payload)
    try:
        with Peer(server, "creator") as owner:
            messages = run_project(owner, "big", list(range(BIG_RESULTS)))
            assert isinstance(messages[-1], p.Finished) and messages[-1].status == "done"
            assert sum(isinstance(m, p.TaskDone) for m in messages) == BIG_RESULTS
            # no Release: the results stay stored on the server

        time.sleep(0.5)
        baseline = rss_mib(server)
        flooders = [Peer(server, "creator", rcvbuf=4 * KIB) for _ in range(FLOODERS)]
        try:
            for flooder in flooders:
                for ref in range(30):  # then more, in bursts
                    flooder.send(p.Attach(ref=ref, project_id="big"))
                flooder.send(*[p.Attach(ref=100 + ref, project_id="big") for ref in range(200)])

            # an honest creator's project finishes meanwhile, every result exact
            peak = baseline
            with Peer(server, "creator", token=honest_token) as honest:
                items = list(range(300))
                messages = run_project(honest, "honest", items)
                peak = max(peak, rss_mib(server))
            done = messages[-1]
            assert isinstance(done, p.Finished) and done.status == "done", done
            results: dict[int, Any] = {}
            for message in messages:
                if isinstance(message, p.TaskDone):
                    assert message.seq not in results, f"seq {message.seq} twice"
                    (item,) = pickle.loads(message.items)
                    results[message.seq] = pickle.loads(message.payload)[0]
                    assert results[message.seq] == item * 3
            assert sorted(results) == items

            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                peak = max(peak, rss_mib(server))
                time.sleep(0.1)
            print(f"server RSS: {baseline:.0f} MiB before the flood, {peak:.0f} MiB at most")
            assert peak - baseline < RSS_GROWTH_BOUND_MIB, (baseline, peak)
            assert server.alive()

            # now the first flooder reads: one replay (not 230), each result once, then
            # Finished; an Attached for every Attach
            reader = flooders[0]
            got: list[p.Message] = []
            while not any(isinstance(m, p.Finished) for m in got) or (
                sum(isinstance(m, p.Attached) for m in got) < 230
            ):
                message = reader.receive(TIMEOUT)
                assert message is not None, summary(got)
                got.append(message)
            assert drain(reader, 0.5) == []
            seqs = [m.seq for m in got if isinstance(m, p.TaskDone)]
            assert sorted(seqs) == list(range(BIG_RESULTS)), Counter(seqs).most_common(3)
            for message in got:
                if isinstance(message, p.TaskDone):
                    assert message.payload[:4] == pickle.loads(message.items)[0].to_bytes(4, "big")
                    assert len(message.payload) == 4 + BIG_PAYLOAD
            assert sum(isinstance(m, p.Finished) for m in got) == 1
            kinds = [type(m) for m in got]
            last_result = max(i for i, kind in enumerate(kinds) if kind is p.TaskDone)
            assert kinds.index(p.Finished) > last_result  # Finished comes after the replay
            attached = [m for m in got if isinstance(m, p.Attached)]
            assert len(attached) == 230
            assert {(m.status, m.stored, m.ended) for m in attached} == {
                ("done", BIG_RESULTS, True)
            }
            # and a later Attach replays again, in full
            reader.send(p.Attach(ref=999, project_id="big"))
            again = reader.receive_until(finished("big"))
            assert sorted(m.seq for m in again if isinstance(m, p.TaskDone)) == list(
                range(BIG_RESULTS)
            )
        finally:
            for flooder in flooders:
                flooder.close()
    finally:
        worker.close()


def test_live_results_of_a_running_project_follow_its_replay(
    make_server: Callable[..., ServerProcess],
) -> None:
    """A non-reader attaches to a running project: its replay stalls; the project then gets
    its last results and finishes. When the creator reads, nothing of that (no TaskDone, no
    Finished) came before the replay: every result arrives, and Finished after all of them."""
    server = make_server(heartbeat=1.0)
    total, early = 32, 20

    def payload(project_id: str, items: Any) -> bytes:
        return items[0].to_bytes(4, "big") + bytes(MIB)  # 20 of them: 20 MiB

    worker = HandWorker(server, payload, free=early)
    try:
        with Peer(server, "creator") as owner:
            owner.send(
                submit("live"),
                p.Tasks(project_id="live", tasks=task_entries(range(total))),
                p.End(project_id="live", total_tasks=total, total_items=total),
            )
            results = 0
            deadline = time.monotonic() + TIMEOUT
            while results < early:
                message = owner.receive(max(0.0, deadline - time.monotonic()))
                results += isinstance(message, p.TaskDone)
        with Peer(server, "creator", rcvbuf=4 * KIB) as reader:
            reader.send(p.Attach(ref=1, project_id="live"))
            time.sleep(0.5)  # the replay starts, and stalls
            worker.release()
            wait_for(lambda: "project live done" in server.log(), TIMEOUT, "the project's end")
            got = reader.receive_until(finished("live"))
            assert drain(reader, 0.5) == []
        kinds = [type(m) for m in got]
        assert kinds[0] is p.Attached, kinds[:3]
        assert kinds[-1] is p.Finished
        done = got[-1]
        assert isinstance(done, p.Finished) and done.status == "done", done
        seqs = [m.seq for m in got if isinstance(m, p.TaskDone)]
        assert set(seqs) == set(range(total)), sorted(set(range(total)) - set(seqs))
        for message in got:
            if isinstance(message, p.TaskDone):  # the right payload under each seq
                assert message.payload[:4] == message.seq.to_bytes(4, "big")
    finally:
        worker.close()


def test_too_many_waiting_replays_close_the_connection(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(heartbeat=1.0)
    worker = HandWorker(server, big_payload)
    try:
        with Peer(server, "creator") as owner:
            run_project(owner, "big", list(range(BIG_RESULTS)))
            running = [f"r{i}" for i in range(MAX_REPLAYS)]
            for project_id in running:  # running projects, no tasks: each a (tiny) replay
                accepted(owner, project_id)

            with Peer(server, "creator", rcvbuf=4 * KIB) as flooder:
                # the replay of "big" cannot go on (nobody reads), the others wait behind it:
                # 1 + MAX_REPLAYS - 1 are fine, one more is too many
                flooder.send(p.Attach(ref=0, project_id="big"))
                flooder.send(
                    *[p.Attach(ref=1 + i, project_id=pid) for i, pid in enumerate(running)]
                )
                got = flooder.read_to_end()
            last = got[-1]
            assert isinstance(last, p.Error), summary(got)
            assert last.code == "too_many_requests"
            assert str(MAX_REPLAYS) in last.message
            # the replay that ran was a partial one: the stream ended with the Error
            assert not any(isinstance(m, p.Finished) for m in got)

            # the server goes on serving the owner
            owner.send(p.Attach(ref=5, project_id="big"))
            again = owner.receive_until(finished("big"))
            assert sum(isinstance(m, p.TaskDone) for m in again) == BIG_RESULTS
    finally:
        worker.close()
    assert "too_many_requests" in server.log() or "replays asked for at once" in server.log()


# ---- per-creator limits ------------------------------------------------------------------------


def test_a_creator_over_its_project_limit_is_refused_others_are_not(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(
        extra=["--max-projects-per-creator", "2", "--max-code-bytes", str(100 * KIB)]
    )
    alice = server.add_token("alice", "creator")
    bob = server.add_token("bob", "creator")
    with Peer(server, "creator", token=alice) as a, Peer(server, "creator", token=bob) as b:
        accepted(a, "a1")
        accepted(a, "a2")
        a.send(submit("a3"), p.Tasks(project_id="a3", tasks=task_entries([1, 2])))
        error = refusal(a.receive_until(finished("a3")), "a3")
        assert error["reason"] == "too_many_projects"
        assert "--max-projects-per-creator" in error["message"]
        assert "alice already has 2 running projects" in error["message"]

        # another creator is unaffected
        accepted(b, "b1")
        accepted(b, "b2")

        # code over --max-code-bytes: refused whoever sends it
        b.send(submit("b-big", code=bytes(100 * KIB + 1)))
        error = refusal(b.receive_until(finished("b-big")), "b-big")
        assert error["reason"] == "code_too_large"
        assert "--max-code-bytes" in error["message"]

        # a finished project frees its place
        a.send(p.Cancel(project_id="a1"))
        a.receive_until(finished("a1"))
        accepted(a, "a3")
        a.send(p.ListProjects(ref=1))
        listing = a.receive_until(lambda m: isinstance(m, p.ProjectList))[-1]
        assert isinstance(listing, p.ProjectList)
        assert {r["project_id"]: r["status"] for r in listing.projects} == {
            "a1": "cancelled",
            "a2": "running",
            "a3": "running",
        }
    assert server.alive()


def test_stored_results_past_the_quota_fail_the_project(
    make_server: Callable[..., ServerProcess],
) -> None:
    quota = 1 * MIB
    server = make_server(extra=["--max-stored-result-bytes", str(quota)])
    alice = server.add_token("alice", "creator")
    bob = server.add_token("bob", "creator")

    def payload(project_id: str, items: Any) -> bytes:
        return bytes(300 * KIB)  # four of them are past the quota

    worker = HandWorker(server, payload, slots=1)
    try:
        with Peer(server, "creator", token=alice) as a, Peer(server, "creator", token=bob) as b:
            messages = run_project(a, "heavy", list(range(10)))
            done = messages[-1]
            assert isinstance(done, p.Finished) and done.status == "failed", done
            assert done.error is not None and done.error["reason"] == "quota"
            assert "--max-stored-result-bytes" in done.error["message"]
            # the result that went past the quota is kept; none after it
            assert sum(isinstance(m, p.TaskDone) for m in messages) == 4

            # no new project while the results are kept; bob is unaffected
            a.send(submit("next"))
            error = refusal(a.receive_until(finished("next")), "next")
            assert error["reason"] == "quota"
            small = run_project(b, "small", [1])
            assert isinstance(small[-1], p.Finished) and small[-1].status == "done"

            # released: room again
            a.send(p.Release(project_id="heavy"))
            accepted(a, "next")
    finally:
        worker.close()


# ---- one creator's bad writes never cost another creator's -------------------------------------


def test_accepted_projects_survive_a_restart_whatever_another_creator_sends(
    make_server: Callable[..., ServerProcess],
) -> None:
    """Alice tries the ways through the protocol to a row the database refuses, in between Bob's
    Submits; then the server is SIGKILLed and restarted. Every project Bob was answered
    Accepted for is there, and so is every record of Alice's that was stored.

    (1) A project that ends at once and a second Submit under its id in the same write: before
    the commit the store did not know the id yet, and the second project's row collided with
    the first's (a UNIQUE violation that, before the store isolated bad rows, failed every
    commit from then on, everybody's writes with it). The server now refuses it as
    ``duplicate_id``. (2) Tasks whose item counts sum past SQLite's 64-bit integers in one
    frame (an OverflowError binding the row): refused by the scheduler where it enforces the
    creator's credit and caps item counts; otherwise the store leaves that row out and the
    project fails with ``store_error``. The store's isolation itself is unit-tested in
    test_store.py."""
    first = make_server()
    alice = first.add_token("alice", "creator")
    bob = first.add_token("bob", "creator")
    bobs = [f"bob-{i}" for i in range(40)]
    dups = [f"dup-{i}" for i in range(10)]
    with (
        Peer(first, "creator", token=bob) as b,
        Peer(first, "creator", token=alice) as a,
        Peer(first, "creator", token=alice) as a_sum,
    ):
        for index, project_id in enumerate(bobs):
            b.send(submit(project_id), p.Tasks(project_id=project_id, tasks=task_entries([1])))
            if index % 4 == 0:
                dup = dups[index // 4]
                end = p.End(project_id=dup, total_tasks=0, total_items=0)
                a.send(submit(dup), end, submit(dup), end)
            if index == 20:
                huge = [[seq, b"", p.MAX_INT] for seq in range(1100)]  # 1100 * 2**53 > 2**63
                a_sum.send(submit("sum"), p.Tasks(project_id="sum", tasks=huge))
        answered: set[str] = set()
        deadline = time.monotonic() + TIMEOUT
        while answered != set(bobs):
            message = b.receive(max(0.0, deadline - time.monotonic()))
            assert message is not None, "the server closed Bob's connection"
            assert not isinstance(message, p.Finished), message  # not refused, not failed
            if isinstance(message, p.Accepted):
                answered.add(message.project_id)

        ends: dict[str, list[str]] = {}
        for message in drain(a, 1.0):
            if isinstance(message, p.Finished):
                reason = (message.error or {}).get("reason")
                ends.setdefault(message.project_id, []).append(f"{message.status}:{reason}")
        assert ends == {dup: ["done:None", "failed:duplicate_id"] for dup in dups}, ends

        sum_outcome = drain(a_sum, 1.0)
        closed = [m for m in sum_outcome if isinstance(m, p.Error)]
        failed = [m for m in sum_outcome if isinstance(m, p.Finished) and m.project_id == "sum"]
        print(f"tasks summing past 64 bits: {summary(sum_outcome)} {closed or failed}")
        if closed:  # the scheduler refused the frame
            assert closed[0].code in ("credit_exceeded", "too_many_items", "tasks_refused")
        else:  # the store left the row out; the project failed, saying why
            assert len(failed) == 1 and failed[0].status == "failed", sum_outcome
            assert (failed[0].error or {}).get("reason") == "store_error"
            assert "dropped a write that cannot be stored (project sum)" in first.log()
    assert "cannot write the server state" not in first.log()

    first.proc.kill()  # SIGKILL: only what was committed counts
    first.proc.wait(timeout=10)
    second = make_server(port=first.port, state_dir=first.state_dir)
    with Peer(second, "creator", token=bob) as b:
        b.send(p.ListProjects(ref=1))
        listing = b.receive_until(lambda m: isinstance(m, p.ProjectList))[-1]
        assert isinstance(listing, p.ProjectList)
        stored = {r["project_id"]: r for r in listing.projects}
        assert sorted(stored) == sorted(bobs)
        assert all(r["status"] == "running" and r["tasks_received"] == 1 for r in stored.values())
        for project_id in bobs[:3]:
            b.send(p.Attach(ref=2, project_id=project_id))
            reply = b.receive_until(lambda m: isinstance(m, p.Attached))[-1]
            assert isinstance(reply, p.Attached) and reply.status == "running", reply
    with Peer(second, "creator", token=alice) as a:
        a.send(p.ListProjects(ref=1))
        listing = a.receive_until(lambda m: isinstance(m, p.ProjectList))[-1]
        assert isinstance(listing, p.ProjectList)
        mine = {r["project_id"]: r for r in listing.projects}
        # each duplicate pair left one record: the first project's, done
        assert {pid: mine[pid]["status"] for pid in dups} == dict.fromkeys(dups, "done")
    assert second.alive()


def drain(peer: Peer, seconds: float) -> list[p.Message]:
    """Whatever arrives within ``seconds`` (the connection stays open)."""
    deadline = time.monotonic() + seconds
    messages: list[p.Message] = []
    while (remaining := deadline - time.monotonic()) > 0:
        message = peer.poll(remaining)
        if message is None:
            if peer.closed:
                break
            continue
        messages.append(message)
    return messages
