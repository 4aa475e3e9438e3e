"""The volunteer in control, with real server, worker and task processes: --trust, pausing by
SIGUSR1 / SIGUSR2 and from the menu, --when-idle under a competing load, --cpu-limit, and the
caps' sizes. Each asserts what happened (process states, who ran what, exact results), never
how fast."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, WorkerProcess, add_server_user, wait_for

from dcproto import Distribute
from dcproto.connection import Endpoint
from dcproto.users import User
from dcproto.worker import control
from dcproto.worker.worker import Worker, WorkerConfig, parse_size

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not control.HAVE_PROC, reason="needs Linux /proc"),
]

TIMEOUT = 60.0
WORKER = [sys.executable, "-m", "dcproto.worker.worker"]
BURNER = [sys.executable, "-c", "while True: pass"]


class Steps:
    """Items are numbers of 0.1 s sleeps. A stopped task stops counting them, so the longest
    gap between two steps shows how long it was paused in the middle."""

    @staticmethod
    def parallel_func(steps: int) -> dict[str, float]:
        print(f"STEPS-STARTED {steps}", file=sys.stderr, flush=True)  # the worker's log
        longest, last = 0.0, time.monotonic()
        for _ in range(steps):
            time.sleep(0.1)
            now = time.monotonic()
            longest, last = max(longest, now - last), now
        return {"steps": steps, "longest_gap": longest}


class Burn:
    """Items are seconds of wall time to keep a CPU busy."""

    @staticmethod
    def parallel_func(seconds: float) -> float:
        print(f"BURN-STARTED {seconds}", file=sys.stderr, flush=True)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return seconds


def submit(cls: type, items: list[Any], user_name: str = "home") -> Any:
    named = type(f"{cls.__name__}{time.monotonic_ns()}", (cls,), {})
    return Distribute(user_name=user_name, iterator=items, task_size=1)(named)()


def task_processes(worker: WorkerProcess) -> dict[int, str]:
    """pid -> state of every process below the worker (its children and theirs)."""
    tree = control.process_tree([worker.pid])
    return {pid: stat.state for pid, stat in tree.items() if pid != worker.pid}


def all_stopped(worker: WorkerProcess) -> bool:
    states = task_processes(worker)
    return bool(states) and all(state in "Tt" for state in states.values())


def none_stopped(worker: WorkerProcess) -> bool:
    states = task_processes(worker)
    return bool(states) and not any(state in "Tt" for state in states.values())


@pytest.fixture
def load() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start CPU burners that are not the worker's; all killed at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(BURNER, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


# ---- --trust -----------------------------------------------------------------------------------


def test_a_worker_trusting_bob_runs_bobs_projects_and_no_one_elses(
    server: ServerProcess, user: User, start_worker: Callable[..., WorkerProcess]
) -> None:
    add_server_user(server, "bob")
    worker = start_worker("--trust", "bob")
    wait_for(lambda: "for 1 trusted creators" in server.log(), TIMEOUT, "the worker's WorkerState")

    others = submit(Steps, [1, 2, 3])  # by "creator", the token of the user "home"
    wait_for(lambda: others.notices, TIMEOUT, "the notice that no worker can run it")
    assert "no connected worker can run" in others.notices[0]

    bobs = submit(Steps, [1, 2, 3, 4], user_name="bob")
    results = bobs.get_results(timeout=TIMEOUT)
    assert {key: value["steps"] for key, value in results.items()} == {1: 1, 2: 2, 3: 3, 4: 4}
    assert bobs.stats["per_worker"] == {worker.name: 4}

    assert others.progress.tasks_done == 0
    assert not others.done()  # still queued, waiting for a worker that runs it
    others.cancel()


# ---- pause and resume --------------------------------------------------------------------------


def test_sigusr1_stops_the_task_where_it_is_and_sigusr2_lets_it_finish(
    server: ServerProcess, user: User, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker()  # two slots: one stays free for a second project
    first = submit(Steps, [30])
    wait_for(lambda: "STEPS-STARTED 30" in worker.log(), TIMEOUT, "the task to start")

    os.kill(worker.pid, signal.SIGUSR1)
    wait_for(lambda: "paused (volunteer)" in worker.log(), TIMEOUT, "the worker to pause")
    wait_for(lambda: all_stopped(worker), TIMEOUT, "every task process to be stopped")
    wait_for(lambda: f"worker {worker.name} paused" in server.log(), TIMEOUT, "the server")

    second = submit(Steps, [1])
    time.sleep(2.0)  # it would start at once on the free slot, were the worker not paused
    assert second.progress.tasks_done == 0
    assert "STEPS-STARTED 1\n" not in worker.log()
    assert all_stopped(worker)  # and nothing woke them

    os.kill(worker.pid, signal.SIGUSR2)
    wait_for(lambda: "resumed" in worker.log(), TIMEOUT, "the worker to resume")
    assert second.get_results(timeout=TIMEOUT)[1]["steps"] == 1
    result = first.get_results(timeout=TIMEOUT)[30]
    assert result["steps"] == 30
    assert result["longest_gap"] >= 1.5  # stopped mid-task for the 2 s above, not restarted
    assert first.stats["tasks_reissued"] == 0
    assert second.stats["per_worker"] == {worker.name: 1}
    assert none_stopped(worker)


def test_menu_pause_and_resume_reach_the_running_worker(
    server: ServerProcess, config_dir: Path
) -> None:
    add_server_user(server, "creator")
    add_server_user(server, "home", role="worker", token_name="volunteer")
    project = submit(Steps, [2], user_name="creator")
    menu = subprocess.run(
        WORKER,
        input="home\npause\ntask\n1\npause\nresume\nhelp\nexit\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert menu.returncode == 0, menu.stderr
    assert "no tasks are running: 'pause' works while 'task' runs" in menu.stdout
    assert "paused (volunteer)" in menu.stdout
    assert "resumed; running" in menu.stdout
    assert "'help' waits until the tasks are done" in menu.stdout
    assert "1 tasks done" in menu.stdout
    assert menu.stdout.count("commands:") == 1  # 'help' ran after the tasks, then exit
    assert project.get_results(timeout=TIMEOUT)[2]["steps"] == 2


async def test_usage_and_pausing_without_a_server(tmp_path: Path) -> None:
    """The figures WorkerState carries, and pause / resume on the worker's own children."""
    config = WorkerConfig(
        endpoint=Endpoint(host="127.0.0.1", port=1, token="x.y", insecure=True),
        slots=2,
        sandbox="off",
    )
    worker = Worker(config)
    await worker.runner.start()
    worker.control.start()
    try:
        children = worker.runner.child_pids()
        assert len(children) == 2
        usage = worker.usage()
        assert usage["rss_bytes"] > 0
        assert usage["paused_by"] is None and usage["slots"] == 2
        assert isinstance(usage["sandbox"], str) and usage["sandbox"]
        assert "cpu_percent" in usage

        worker.pause()
        assert worker.paused and worker.usage()["paused_by"] == "volunteer"
        wait_for(lambda: all(control.read_stat(c).state == "T" for c in children), 10, "stops")
        worker.pause("owner activity")
        worker.resume()  # the volunteer's pause is over, the owner's is not
        assert worker.paused and worker.paused_by == "owner activity"
        assert all(control.read_stat(c).state == "T" for c in children)
        worker.resume("owner activity")
        assert not worker.paused
        wait_for(lambda: all(control.read_stat(c).state != "T" for c in children), 10, "runs")
    finally:
        await worker.control.close()
        await worker.runner.close()


# ---- --when-idle -------------------------------------------------------------------------------


def _others_load(seconds: float) -> float:
    """Cores the machine used over ``seconds``, not counting this test's process."""
    me = control.CpuMeter()
    me.sample([control.read_stat(os.getpid())])
    before = control.machine_busy_seconds() or 0.0
    time.sleep(seconds)
    used = (control.machine_busy_seconds() or 0.0) - before
    return (used - me.sample([control.read_stat(os.getpid())])) / seconds


async def test_the_idle_monitor_waits_for_busy_and_idle_runs() -> None:
    """Busy after ``busy_samples`` busy seconds in a row, idle after ``idle_samples`` quiet
    ones: a lone busy or quiet second changes nothing."""
    script = [0.0, 0.5, 0.1, 0.5, 0.5, 0.5, 0.1, 0.1, 0.5, 0.1, 0.1, 0.1]
    calls: list[float] = []
    changes: list[tuple[bool, int]] = []

    def sample() -> float:
        calls.append(script[len(calls)] if len(calls) < len(script) else 0.0)
        return calls[-1]

    monitor = control.IdleMonitor(
        lambda busy: changes.append((busy, len(calls))),
        threshold=0.2,
        busy_samples=2,
        idle_samples=3,
        interval=0.001,
    )
    monitor.sample = sample  # type: ignore[method-assign]
    running = asyncio.create_task(monitor.run())
    while len(calls) < len(script) + 2:
        await asyncio.sleep(0.01)
    running.cancel()
    # the first call primes; then busy at the 2nd busy second in a row (call 5), idle at the
    # 3rd quiet second in a row (call 12), not at the two quiet ones broken by a busy one
    assert changes == [(True, 5), (False, 12)]


def _unless_busy(condition: Callable[[], Any], what: str) -> None:
    """Wait for ``condition``; skip, not fail, if the machine is busy with something else
    (another test run, a build): then the worker rightly keeps waiting for its owner."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            if _others_load(2.0) > control.IDLE_THRESHOLD:
                pytest.skip(f"the machine stayed busy with something else: no {what}")
            pytest.fail(f"timed out after {TIMEOUT} s waiting for {what}")
        time.sleep(0.05)


def test_when_idle_pauses_under_a_competing_load_and_resumes_after_it(
    server: ServerProcess,
    user: User,
    start_worker: Callable[..., WorkerProcess],
    load: Callable[[], subprocess.Popen[bytes]],
) -> None:
    if _others_load(2.0) > 2 * control.IDLE_THRESHOLD:
        pytest.skip("the machine is busy with something else: idleness cannot be told")
    worker = start_worker("--slots", "1", "--when-idle")
    project = submit(Steps, [60])
    _unless_busy(lambda: "STEPS-STARTED 60" in worker.log(), "start of the task")
    if "paused" in worker.log():
        pytest.skip("the machine got busy with something else before the test's load")

    burner = load()
    wait_for(lambda: "paused (owner activity)" in worker.log(), TIMEOUT, "the worker to pause")
    wait_for(lambda: all_stopped(worker), TIMEOUT, "the task processes to be stopped")
    time.sleep(1.0)
    assert all_stopped(worker)  # nothing was killed: still there, still stopped
    burner.kill()
    burner.wait()

    _unless_busy(lambda: "resumed (owner activity is over)" in worker.log(), "resume")
    result = project.get_results(timeout=TIMEOUT)[60]
    assert result["steps"] == 60
    assert result["longest_gap"] >= 1.0
    assert project.stats["tasks_reissued"] == 0


# ---- --cpu-limit -------------------------------------------------------------------------------


def _cores_used(roots: Callable[[], list[int]], seconds: float) -> float:
    meter = control.CpuMeter()
    meter.sample(control.process_tree(roots()).values())
    start = time.monotonic()
    time.sleep(seconds)
    used = meter.sample(control.process_tree(roots()).values())
    return used / (time.monotonic() - start)


def test_cpu_limit_keeps_cpu_bound_tasks_under_their_share(
    server: ServerProcess, user: User, start_worker: Callable[..., WorkerProcess]
) -> None:
    cpus = control.cpu_count()
    worker = start_worker("--slots", str(cpus), "--cpu-limit", "25")
    wait_for(lambda: "CPU limit 25% of" in worker.log(), TIMEOUT, "the CPU limit's log line")
    items = [8.0 + i / 1000 for i in range(cpus)]  # one CPU-bound task per slot
    project = submit(Burn, items)
    wait_for(lambda: worker.log().count("BURN-STARTED") == cpus, TIMEOUT, "every task to start")
    time.sleep(1.0)  # the cap settles (a duty cycle measures over a second)

    def children() -> list[int]:
        return [pid for pid in task_processes(worker)]

    used = _cores_used(children, 3.0)
    # uncapped they would use `cpus` cores; capped, a quarter of them
    assert used < 0.25 * cpus + 0.15, (used, worker.log())
    assert project.get_results(timeout=TIMEOUT) == {item: item for item in items}

    worker.proc.send_signal(signal.SIGINT)
    assert worker.proc.wait(TIMEOUT) == 0
    found = re.search(r"cgroup v\d (\S+) \(", worker.log())
    if found:  # the cap was a cgroup: the worker removed it on leaving
        assert not Path(found[1]).exists()


def test_the_duty_cycle_holds_a_burning_process_under_its_share() -> None:
    """The fallback when no cgroup can be made: SIGSTOP / SIGCONT in 100 ms periods."""
    burner = subprocess.Popen(BURNER, start_new_session=True)

    async def capped() -> tuple[float, int]:
        pause = control.ProcessControl(lambda: [burner.pid])
        cap = control.DutyCycleCap(10, cpus=2)  # a fifth of a core
        running = asyncio.create_task(cap.run(lambda: [burner.pid], pause))
        await asyncio.sleep(1.5)
        used = await asyncio.to_thread(_cores_used, lambda: [burner.pid], 3.0)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        return used, cap.stops

    try:
        used, stops = asyncio.run(capped())
        assert stops > 0
        assert used < 0.5  # uncapped: a whole core, or what the machine's load leaves it
        assert control.read_stat(burner.pid).state != "T"  # continued when the cap ended
    finally:
        burner.kill()
        burner.wait()


# ---- the caps' sizes and other options --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("300M", 300 * 2**20), ("1.5G", int(1.5 * 2**30)), ("64k", 65536), ("1000", 1000)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12X", "", "M", "-1M", "1.5", "0", "0.0001K", "1e3", "10 MB"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|byte"):
        parse_size(text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-memory", "12X"], "argument --max-memory: '12X' is not a size"),
        (["--max-disk", "1.5"], "argument --max-disk: '1.5' is not a size"),
        (["--cpu-limit", "0"], "argument --cpu-limit: '0' is not a percentage from 1 to 100"),
        (["--max-task-seconds", "-3"], "'-3' is not a positive number of seconds"),
        (["--trust", "bob,alice"], "'bob,alice' is not a token name"),
        (["--sandbox", "maybe"], "argument --sandbox: invalid choice: 'maybe'"),
    ],
)
def test_bad_values_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    done = subprocess.run(
        [*WORKER, "connect", "127.0.0.1:1", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert message in done.stderr
    if "size" in message:
        assert "K, M or G (e.g. 300M, 1.5G)" in done.stderr


def test_help_documents_the_options_and_the_signals() -> None:
    shown = subprocess.run(
        [*WORKER, "connect", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert shown.returncode == 0
    for option in (
        "--sandbox",
        "--allow-network",
        "--max-memory",
        "--max-task-seconds",
        "--max-disk",
        "--cpu-limit",
        "--when-idle",
        "--trust",
    ):
        assert option in shown.stdout
    assert "kill -USR1 PID" in shown.stdout and "kill -USR2 PID" in shown.stdout


def test_the_process_tree_is_the_same_with_or_without_children_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without CONFIG_PROC_CHILDREN the tree comes from a scan of every process."""
    shell = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        wait_for(lambda: len(control.process_tree([shell.pid])) == 3, 10, "two sleeps")
        from_lists = control.process_tree([shell.pid])
        monkeypatch.setattr(control, "HAVE_CHILDREN_LISTS", False)
        assert control.process_tree([shell.pid]).keys() == from_lists.keys()
    finally:
        control.signal_pids(control.tree_pids([shell.pid]), signal.SIGKILL)
        shell.wait()
