"""Containment on real child processes: one project per child, nothing a task starts outlives
it, and the caps a volunteer sets (memory, CPU seconds, disk).

User classes are pickled by value (see :func:`make_project`), as in ``test_runner.py``.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import payload_by_index
from conftest import project_message as make_project
from conftest import task_message as make_task

from dcproto import protocol as p
from dcproto.worker.child import MAX_LOADED
from dcproto.worker.runner import SPARES, Outcome, Runner, TaskLimits, binding

MiB = 1 << 20


async def run(runner: Runner, project: p.Project, items: list[Any]) -> Outcome:
    return await runner.run(project, make_task(project, items))


def values(outcome: Outcome) -> list[Any]:
    """The kept values, in item order."""
    assert outcome.outcome in ("ok", "stop"), outcome.error
    kept = payload_by_index(outcome.payload)
    return [kept[index] for index in sorted(kept)]


def running(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` names a live (not zombie) process, the one started at ``start`` if
    given (clock ticks after boot: a reused pid is another process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0] not in "ZXx" and (start is None or fields[19] == start)


def start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()[19]


async def gone(pid: int, start: str, limit: float = 10.0) -> bool:
    """Whether the process is gone within ``limit`` seconds (a kill is asynchronous)."""
    deadline = time.monotonic() + limit
    while running(pid, start):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def wait_for_file(path: Path, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.01)


RunnerFactory = Callable[..., Awaitable[Runner]]


@pytest.fixture
async def make_runner() -> AsyncIterator[RunnerFactory]:
    runners: list[Runner] = []

    async def factory(slots: int = 1, limits: TaskLimits | None = None) -> Runner:
        runner = Runner(slots)
        if limits is not None:
            runner.set_limits(limits)
        runners.append(runner)
        await runner.start()
        return runner

    yield factory
    for runner in runners:
        await runner.close()


# --------------------------------------------------------------------------------------------
# User code
# --------------------------------------------------------------------------------------------


class Patcher:
    """Creator A: patches everything it can reach in its child."""

    @staticmethod
    def f(x: Any) -> Any:
        import builtins
        import pickle

        import dcproto.worker.child as child

        if x == "patch":
            original = pickle.dumps
            builtins.abs = lambda number: -1  # type: ignore[assignment]
            builtins.PATCHED_BY_A = True  # type: ignore[attr-defined]
            pickle.dumps = lambda obj, *args, **kwargs: original({0: "pwned"}, *args, **kwargs)
            child._pickle_kept = lambda kept, items, check: original({0: "pwned"})
        return (x, os.getpid())


class Honest:
    """Creator B: reports what it sees of the process it runs in."""

    @staticmethod
    def f(x: int) -> dict[str, Any]:
        import _pickle
        import builtins
        import pickle

        import dcproto.worker.child as child

        return {
            "square": x * x,
            "pid": os.getpid(),
            "abs": abs(-3),
            "patched": hasattr(builtins, "PATCHED_BY_A"),
            "dumps": pickle.dumps is _pickle.dumps,
            "pickle_kept": child._pickle_kept.__module__ == "dcproto.worker.child",
        }


def clean_view(x: int, pid: int) -> dict[str, Any]:
    return {
        "square": x * x,
        "pid": pid,
        "abs": 3,
        "patched": False,
        "dumps": True,
        "pickle_kept": True,
    }


class Spawner:
    """Starts processes that try to outlive the task."""

    @staticmethod
    def f(x: Any) -> Any:
        if x == "session":  # a sleep in a session of its own
            return subprocess.Popen(["sleep", "300"], start_new_session=True).pid
        if x == "double-fork":  # a daemon: its parent is gone, it is nobody's child
            read, write = os.pipe()
            middle = os.fork()
            if middle == 0:
                os.setsid()
                grandchild = os.fork()
                if grandchild == 0:
                    os.execvp("sleep", ["sleep", "300"])
                os.write(write, str(grandchild).encode())
                os._exit(0)
            os.close(write)
            os.waitpid(middle, 0)
            pid = int(os.read(read, 64))
            os.close(read)
            return pid
        if isinstance(x, tuple):  # (how, marker): start one, say its pid, then hang
            how, marker = x
            pid = subprocess.Popen(["sleep", "300"], start_new_session=True).pid
            if how == "deaf":
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            Path(marker).write_text(str(pid))
            time.sleep(100)
        return x


class Hog:
    """Goes over a cap if told to; an int is an honest item."""

    @staticmethod
    def f(x: Any) -> Any:
        out = Path(os.environ["DCPROTO_OUTPUT_DIR"])
        if x == "memory":
            return len(bytearray(1_500_000_000))
        if x == "memory-tree":  # each process is under the cap, all of them are not
            hold = "b = b'x' * 150_000_000; import time; time.sleep(60)"
            procs = [subprocess.Popen([sys.executable, "-c", hold]) for _ in range(3)]
            for proc in procs:
                proc.wait()
            return "survived"
        if x == "spin":
            while True:
                pass
        if x == "spin-deaf":
            signal.signal(signal.SIGXCPU, signal.SIG_IGN)
            while True:
                pass
        if x == "disk":
            with open(out / "big.bin", "wb") as file:
                for _ in range(50):
                    file.write(b"\0" * MiB)
            return "wrote"
        if x == "disk-files":  # each file under the cap, all of them over it
            for i in range(6):
                (out / f"part-{i}").write_bytes(b"\0" * (3 * MiB))
            return "wrote"
        if x == "disk-full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if x == "small-file":
            (out / "small.txt").write_bytes(b"fine")
        return (x * 2 if isinstance(x, int) else x, os.getpid())


# --------------------------------------------------------------------------------------------
# One project per child process
# --------------------------------------------------------------------------------------------


async def test_a_project_never_sees_another_projects_patches(make_runner: RunnerFactory) -> None:
    runner = await make_runner(1)
    patcher = make_project(Patcher, project_id="a")
    honest = make_project(Honest, project_id="b")
    patched = await run(runner, patcher, ["patch"])
    assert values(patched) == ["pwned"]  # A's patches work in A's own child
    a_pid = next(
        c.process.pid for c in runner._children if c.bound == binding(patcher) and c.process
    )

    outcome = await run(runner, honest, [1, 2, 3])
    b_values = values(outcome)
    b_pid = b_values[0]["pid"]
    assert b_pid != a_pid
    assert b_values == [clean_view(x, b_pid) for x in (1, 2, 3)]

    # A's child is kept warm for A (its patches with it), B's for B
    assert values(await run(runner, patcher, ["again"])) == ["pwned"]
    again = values(await run(runner, honest, [4]))
    assert again == [clean_view(4, b_pid)]

    # a third project, with both processes taken: the one idle longest makes way for a
    # fresh process, never one that ran another project's code
    third = make_project(Honest, project_id="c")
    c_values = values(await run(runner, third, [5]))
    c_pid = c_values[0]["pid"]
    assert c_pid not in (a_pid, b_pid)
    assert c_values == [clean_view(5, c_pid)]
    assert sum(1 for c in runner._children if c.alive) <= 1 + SPARES


async def test_a_spare_waits_for_the_next_new_project(make_runner: RunnerFactory) -> None:
    runner = await make_runner(1)
    await run(runner, make_project(Honest, project_id="a"), [1])
    # binding the last clean child started a spare in the background
    [spare] = [c for c in runner._children if c.bound is None]
    await spare.ensure_started()
    assert spare.process is not None
    spare_pid = spare.process.pid
    b_values = values(await run(runner, make_project(Honest, project_id="b"), [2]))
    assert b_values == [clean_view(2, spare_pid)]
    assert len(runner._children) == 1 + SPARES  # no more processes than slots + spares


async def test_two_slots_two_projects_at_once(make_runner: RunnerFactory, tmp_path: Path) -> None:
    runner = await make_runner(2)
    projects = [make_project(Honest, project_id=f"p{i}") for i in range(4)]
    outcomes = await asyncio.gather(*(run(runner, pr, [i]) for i, pr in enumerate(projects * 3)))
    pids: dict[str, set[int]] = {}
    for i, (project, outcome) in enumerate(zip(projects * 3, outcomes, strict=True)):
        [view] = values(outcome)
        assert view == clean_view(i, view["pid"])
        pids.setdefault(project.project_id, set()).add(view["pid"])
    # no process ever served two projects
    for first, second in itertools.combinations(pids.values(), 2):
        assert not first & second
    assert len(runner._children) <= 2 + SPARES


async def test_the_child_refuses_another_creators_project(make_runner: RunnerFactory) -> None:
    """Even if the runner asked, a child would not load or run another creator's project."""
    runner = await make_runner(1)
    first = make_project(Honest, project_id="a")
    await run(runner, first, [1])
    [child] = [c for c in runner._children if c.bound == binding(first)]
    other = make_project(Honest, project_id="b")
    for bound_to in (binding(other), None):
        child.send(["load", "b", other.code, [], "f", None, None, "raise", False, bound_to])
        answer, _ = await child.run((10**9, 1), ["run", 10**9, 1, "b", pickle.dumps([2])])
        assert answer[2] == "load_error"
        assert "not loaded in this child" in answer[6]["message"]


class Counter:
    """Counts its calls in class state: what one process keeps between projects shows."""

    calls = 0

    @classmethod
    def f(cls, x: int) -> list[int]:
        cls.calls += 1
        return [os.getpid(), cls.calls]


async def test_one_creators_projects_share_a_warm_child(make_runner: RunnerFactory) -> None:
    runner = await make_runner(1)
    answers = []
    for i in range(12):  # more projects than a child keeps loaded
        project = make_project(Counter, project_id=f"mine{i}", owner="alice")
        answers.append(values(await run(runner, project, [i]))[0])
    pids = {pid for pid, _ in answers}
    assert len(pids) == 1, answers  # one process served every project of alice
    # the same code is unpickled once: its class, and so its state, carries over
    assert [calls for _, calls in answers] == list(range(1, 13))
    [child] = [c for c in runner._children if c.bound == "owner:alice"]
    assert len(child.loaded) == MAX_LOADED

    bob = values(await run(runner, make_project(Counter, project_id="b", owner="bob"), [0]))
    assert bob[0][0] not in pids and bob[0][1] == 1  # bob: another process, a fresh class
    unknown = make_project(Counter, project_id="anon", owner="")
    anon = values(await run(runner, unknown, [0]))
    assert anon[0][0] not in pids | {bob[0][0]}  # an unknown owner shares with no one


async def test_new_caps_mean_new_processes(make_runner: RunnerFactory) -> None:
    runner = await make_runner(1)
    project = make_project(Honest)
    before = values(await run(runner, project, [1]))[0]["pid"]
    runner.set_limits(TaskLimits(max_memory=1 << 30))
    after = values(await run(runner, project, [2]))[0]["pid"]
    assert after != before  # the old child got its caps for life: it is not used


# --------------------------------------------------------------------------------------------
# Nothing left behind
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["session", "double-fork"])
async def test_processes_a_task_started_are_gone_when_it_ends(
    make_runner: RunnerFactory, how: str
) -> None:
    runner = await make_runner(1)
    project = make_project(Spawner)
    outcome = await run(runner, project, [how])
    [pid] = values(outcome)
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped before the answer
    assert values(await run(runner, project, [7])) == [7]  # the child lives on


@pytest.mark.parametrize("how", ["abandon", "deaf", "timeout", "close"])
async def test_processes_of_a_task_that_is_stopped_are_gone(
    make_runner: RunnerFactory, tmp_path: Path, how: str
) -> None:
    """Abandoned (the child gives up), abandoned but deaf (the runner kills the child),
    over its time limit (likewise), or the runner closed under it: the sleep goes too."""
    runner = await make_runner(1)
    options = {"task_timeout": 1.0} if how == "timeout" else {}
    project = make_project(Spawner, **options)
    marker = tmp_path / "pid"
    task = make_task(project, [("deaf" if how in ("deaf", "timeout") else "plain", str(marker))])
    running_task = asyncio.create_task(runner.run(project, task))
    await wait_for_file(marker)
    pid = int(marker.read_text())
    start = start_time(pid)
    if how in ("abandon", "deaf"):
        assert runner.abandon(task.task_id)
    if how == "close":
        await runner.close()
        running_task.cancel()
    else:
        outcome = await running_task
        assert outcome.outcome == ("timeout" if how == "timeout" else "abandoned")
    assert await gone(pid, start)
    if how != "close":
        assert values(await run(runner, project, [8])) == [8]


# --------------------------------------------------------------------------------------------
# Caps
# --------------------------------------------------------------------------------------------


async def test_memory_cap(make_runner: RunnerFactory) -> None:
    runner = await make_runner(1, TaskLimits(max_memory=300 * MiB))
    project = make_project(Hog)
    [(_, pid)] = values(await run(runner, project, [1]))
    outcome = await run(runner, project, ["memory"])
    assert outcome.outcome == "memory"
    assert outcome.error is not None
    assert outcome.error["message"] == "the task used more than 300 MiB (--max-memory)"
    assert outcome.payload == b""
    # the child shrugged it off and runs the next task exactly
    assert values(await run(runner, project, [1, 2, 3])) == [(2, pid), (4, pid), (6, pid)]


async def test_memory_cap_counts_the_processes_a_task_starts(make_runner: RunnerFactory) -> None:
    runner = await make_runner(1, TaskLimits(max_memory=300 * MiB))
    project = make_project(Hog)
    outcome = await run(runner, project, ["memory-tree"])
    assert outcome.outcome == "memory"
    assert outcome.error is not None and "300 MiB (--max-memory)" in outcome.error["message"]
    # a fresh child took the killed one's place
    [(value, _)] = values(await run(runner, project, [21]))
    assert value == 42


async def test_cpu_cap(make_runner: RunnerFactory) -> None:
    runner = await make_runner(1, TaskLimits(max_task_seconds=1))
    project = make_project(Hog)
    [(_, pid)] = values(await run(runner, project, [1]))
    outcome = await run(runner, project, ["spin"])
    assert outcome.outcome == "cpu_time"
    assert outcome.error is not None
    message = "the task used more than 1 s of CPU time (--max-task-seconds)"
    assert outcome.error["message"] == message
    assert values(await run(runner, project, [1, 2])) == [(2, pid), (4, pid)]  # same child


async def test_cpu_cap_holds_when_user_code_ignores_sigxcpu(make_runner: RunnerFactory) -> None:
    runner = await make_runner(1, TaskLimits(max_task_seconds=1))
    project = make_project(Hog)
    [(_, pid)] = values(await run(runner, project, [1]))
    outcome = await run(runner, project, ["spin-deaf"])
    assert outcome.outcome == "cpu_time"  # the runner saw it and killed the child
    [(value, new_pid)] = values(await run(runner, project, [5]))
    assert value == 10
    assert new_pid != pid


@pytest.mark.parametrize("item", ["disk", "disk-files"])
async def test_disk_cap(make_runner: RunnerFactory, item: str) -> None:
    runner = await make_runner(1, TaskLimits(max_disk=10 * MiB))
    project = make_project(Hog)
    [(_, pid)] = values(await run(runner, project, [1]))
    outcome = await run(runner, project, [item])
    assert outcome.outcome == "disk"
    assert outcome.error is not None
    assert outcome.error["message"] == "the task wrote more than 10 MiB (--max-disk)"
    assert outcome.files == []
    for child_dir in runner.workdir.iterdir():
        assert list(child_dir.iterdir()) == []  # the files were dropped
    after = await run(runner, project, ["small-file", 3])
    assert values(after) == [("small-file", pid), (6, pid)]
    assert after.files == [["small.txt", b"fine"]]  # files under the cap still travel


async def test_a_full_disk_is_a_disk_outcome(make_runner: RunnerFactory) -> None:
    runner = await make_runner(1)
    project = make_project(Hog, errors="skip")  # not skipped: the item is not at fault
    outcome = await run(runner, project, [1, "disk-full", 2])
    assert outcome.outcome == "disk"
    assert outcome.error is not None and "disk space" in outcome.error["message"]
    assert [value for value, _ in values(await run(runner, project, [1]))] == [2]
