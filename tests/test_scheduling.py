"""Who gets which task, with a real server and real worker processes: late joiners and idle
workers get work held by busy ones, a small project is not queued behind a big one, far
workers (through a delay relay) take work back, a long task keeps its lease, and a livelock
ends. Each asserts who did what, never how fast (bench/scheduling.py measures that)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import ServerProcess, WorkerProcess, wait_for

from bench.relay import DelayRelay
from dcproto import Distribute
from dcproto.errors import ConfigurationError, TaskFailed
from dcproto.users import User

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 60.0


class Sleeper:
    """Items are seconds to sleep; each returns its own item."""

    @staticmethod
    def parallel_func(x: float) -> float:
        if x:
            time.sleep(x)
        return x


def run_project(items: list[float], **options: object) -> tuple[dict[float, float], object]:
    cls = Distribute(user_name="home", iterator=items, task_size=1, **options)(
        type("Sleepy", (Sleeper,), {})
    )
    project = cls()
    return project.get_results(timeout=TIMEOUT), project


def warm(workers: int = 2) -> None:
    """Tiny tasks first: the workers' round trips are measured, as on a busy server."""
    results, project = run_project([0] * 100)
    assert len(results) == 1  # every item is 0: one key
    assert len(project.stats["per_worker"]) == workers


@pytest.fixture
def one_slot(start_worker: Callable[..., WorkerProcess]) -> Callable[..., WorkerProcess]:
    def start(*args: str, **kw: object) -> WorkerProcess:
        return start_worker("--slots", "1", *args, **kw)

    return start


def test_a_worker_that_joins_late_gets_tasks_the_others_have_not_started(
    user: User, one_slot: Callable[..., WorkerProcess]
) -> None:
    first, second = one_slot(), one_slot()
    warm()
    cls = Distribute(user_name="home", iterator=[0.4] * 12, task_size=1)(
        type("Late", (Sleeper,), {})
    )
    project = cls()
    wait_for(lambda: project.progress.tasks_done >= 1, TIMEOUT, "a first result")
    late = one_slot()
    results = project.get_results(timeout=TIMEOUT)
    assert results == {0.4: 0.4}
    split = project.stats["per_worker"]
    assert sum(split.values()) == 12
    assert split.get(late.name, 0) >= 1, split
    assert {first.name, second.name} <= set(split)


def test_a_second_worker_takes_the_task_the_first_would_run_next(
    user: User, one_slot: Callable[..., WorkerProcess]
) -> None:
    one_slot()
    cls = Distribute(user_name="home", iterator=[1.5, 1.501], task_size=1)(
        type("Two", (Sleeper,), {})
    )
    project = cls()  # the first worker starts one; the other is not held for it
    second = one_slot()
    results = project.get_results(timeout=TIMEOUT)
    assert results == {1.5: 1.5, 1.501: 1.501}
    assert project.stats["per_worker"].get(second.name) == 1, project.stats["per_worker"]


def test_a_worker_with_tasks_n_runs_n_and_exits(
    user: User, one_slot: Callable[..., WorkerProcess]
) -> None:
    one_slot(), one_slot()
    warm()
    capped = one_slot("--tasks", "3")
    results, project = run_project([0.2] * 30)
    assert results == {0.2: 0.2}
    assert project.stats["per_worker"].get(capped.name) == 3, project.stats["per_worker"]
    assert capped.proc.wait(TIMEOUT) == 0
    assert "3 tasks done" in capped.output()


def test_a_small_project_is_not_queued_behind_a_big_one(
    user: User, one_slot: Callable[..., WorkerProcess]
) -> None:
    one_slot(), one_slot()
    warm()
    big = Distribute(user_name="home", iterator=[0.05] * 100, task_size=1)(
        type("Big", (Sleeper,), {})
    )()
    wait_for(lambda: big.progress.tasks_done >= 4, TIMEOUT, "the big project to run")
    small, _ = run_project([0.05, 0.0501])
    assert small == {0.05: 0.05, 0.0501: 0.0501}
    assert big.progress.tasks_done < 100  # the small one did not wait for the big one
    assert len(big.get_results(timeout=TIMEOUT)) == 1


@pytest.fixture
def relay(server: ServerProcess) -> Iterator[int]:
    """A relay adding 50 ms each way in front of the server: its port."""
    loop = asyncio.new_event_loop()
    proxy = DelayRelay(("127.0.0.1", server.port), 0.05)
    port = loop.run_until_complete(proxy.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield port
    asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def far_worker(server: ServerProcess, port: int, tmp_path: object, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dcproto.worker.worker", "connect", f"127.0.0.1:{port}",
         "--token-file", str(server.token_file()), "--fingerprint", server.fingerprint,
         "--slots", "1", "--name", name],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def test_a_far_worker_holds_work_ahead_and_a_near_idle_one_takes_it_back(
    server: ServerProcess, user: User, relay: int, one_slot: Callable[..., WorkerProcess]
) -> None:
    far = far_worker(server, relay, None, "far")
    try:
        cls = Distribute(user_name="home", iterator=[0.03 + i / 1e6 for i in range(120)])(
            type("FarWork", (Sleeper,), {})
        )
        project = cls()
        # a 100 ms round trip against 30 ms tasks: once measured, it holds several ahead
        wait_for(lambda: project.progress.tasks_done >= 10, TIMEOUT, "the far worker to warm")
        near = one_slot()
        results = project.get_results(timeout=TIMEOUT)
        assert len(results) == 120
        split = project.stats["per_worker"]
        assert split.get("far", 0) >= 10 and split.get(near.name, 0) >= 1, split
        assert project.stats["tasks_recalled"] >= 1  # taken back from the far one's hands
    finally:
        far.kill()
        far.wait()


def test_a_task_longer_than_its_lease_keeps_it_on_a_healthy_worker(
    user: User, one_slot: Callable[..., WorkerProcess], server: ServerProcess
) -> None:
    """lease_timeout 1 s, a 4 s task, the server's heartbeat 5 s: the worker renews the lease
    by frames sent several times per lease, so the task runs once and is not re-issued."""
    one_slot()
    results, project = run_project([4.0], lease_timeout=1.0)
    assert results == {4.0: 4.0}
    assert project.stats["tasks_reissued"] == 0
    assert "re-issued" not in server.log()


def test_a_lease_too_short_to_be_renewed_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="at least 1 s"):
        Distribute(user_name="home", iterator=[1], lease_timeout=0.5)(type("X", (Sleeper,), {}))


class KillsItsWorker:
    @staticmethod
    def parallel_func(x: int) -> int:
        os.kill(os.getppid(), signal.SIGKILL)  # the worker process, not just this child
        time.sleep(30)
        return x


def test_a_task_that_keeps_losing_its_worker_fails_the_project_after_max_reissues(
    user: User, one_slot: Callable[..., WorkerProcess]
) -> None:
    cls = Distribute(user_name="home", iterator=[1], max_reissues=3)(KillsItsWorker)
    project = cls()
    stop = threading.Event()

    def keep_a_worker() -> None:  # a volunteer that keeps coming back
        while not stop.is_set():
            worker = one_slot("--sandbox", "off", wait=False)  # a sandboxed task cannot
            while worker.proc.poll() is None and not stop.is_set():
                time.sleep(0.05)

    supervisor = threading.Thread(target=keep_a_worker, daemon=True)
    supervisor.start()
    try:
        with pytest.raises(TaskFailed) as failure:
            project.get_results(timeout=TIMEOUT)
    finally:
        stop.set()
        supervisor.join(30)
    assert failure.value.reason == "reissued"
    assert "3 times" in str(failure.value)
    assert "its worker disconnected" in str(failure.value)


def test_projects_results_follows_a_project_without_taking_it_from_its_creator(
    user: User, one_slot: Callable[..., WorkerProcess], config_dir: object
) -> None:
    """A creator still connected keeps its project when someone fetches it by id: both get
    every result."""
    one_slot()
    cls = Distribute(user_name="home", iterator=[0.1 + i / 1e6 for i in range(20)])(
        type("Shared", (Sleeper,), {})
    )
    project = cls()
    wait_for(lambda: project.progress.tasks_done >= 2, TIMEOUT, "the project to run")
    fetched = subprocess.run(
        [sys.executable, "-m", "dcproto.cli", "projects", "results", project.project_id,
         "--user", "home", "--out", str(config_dir) + "-out", "--timeout", str(TIMEOUT)],
        capture_output=True, text=True, timeout=TIMEOUT + 30,
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    assert "20 results" in fetched.stdout
    assert len(project.get_results(timeout=TIMEOUT)) == 20
