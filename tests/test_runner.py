"""Tests for the worker's runner and child: real child processes running pickled user code.

User classes are defined in this module and pickled by value (see :func:`make_project`), so the
child, which cannot import this test module, rebuilds them from the bytes alone.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import pickle
import signal
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import payload_by_index
from conftest import project_message as make_project
from conftest import task_message as make_task

from dcproto import protocol as p
from dcproto.worker.child import MAX_OUTPUT_BYTES, MAX_OUTPUT_FILES
from dcproto.worker.runner import KILL_GRACE, PIPELINE_DEPTH, SPARES, Outcome, Runner

# --------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------


async def run(runner: Runner, project: p.Project, items: list[Any]) -> Outcome:
    return await run_task(runner, project, make_task(project, items))


async def run_task(runner: Runner, project: p.Project, task: p.Task) -> Outcome:
    """``runner.run``, remembering the task's items so that :func:`pairs` can map the
    payload's item indices back to them, as the creator does."""
    outcome = await runner.run(project, task)
    try:
        items = pickle.loads(task.items)
    except Exception:  # a test of items that do not unpickle
        items = []
    _items_of[id(outcome)] = (outcome, items)
    return outcome


# id(outcome) -> (outcome, the task's items); the outcome is kept so that its id stays unique
_items_of: dict[int, tuple[Outcome, list[Any]]] = {}


def pairs(outcome: Outcome) -> list[tuple[Any, Any]]:
    kept = payload_by_index(outcome.payload)
    items = _items_of[id(outcome)][1]
    return [(items[index], value) for index, value in kept.items()]


async def wait_for_file(path: Path, limit: float = 10.0) -> None:
    """Wait until user code in a child has created ``path`` (i.e. it is running)."""
    deadline = time.monotonic() + limit
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.01)


def child_pid(runner: Runner, project_id: str = "proj") -> int:
    """The pid of the child bound to ``project_id``'s creator (of which it is the only
    project here: see make_project)."""
    [child] = [c for c in runner._children if c.bound == f"owner:creator-{project_id}"]
    process = child.process
    assert process is not None
    return process.pid


RunnerFactory = Callable[[int], Awaitable[Runner]]


@pytest.fixture
async def make_runner() -> AsyncIterator[RunnerFactory]:
    runners: list[Runner] = []

    async def factory(slots: int = 1) -> Runner:
        runner = Runner(slots)
        runners.append(runner)
        await runner.start()
        return runner

    yield factory
    for runner in runners:
        await runner.close()


@pytest.fixture
async def runner(make_runner: RunnerFactory) -> Runner:
    return await make_runner(1)


# --------------------------------------------------------------------------------------------
# User code (pickled by value and run in the children)
# --------------------------------------------------------------------------------------------


class Square:
    @staticmethod
    def f(x: int) -> int:
        return x * x


class Pid:
    @staticmethod
    def f(x: Any) -> tuple[Any, int]:
        return (x, os.getpid())


class TenfoldStopAt30:
    @staticmethod
    def f(x: int) -> int:
        # one file per item run, so the test can see which items ran at all
        out = Path(os.environ["DCPROTO_OUTPUT_DIR"])
        (out / f"ran-{x}").write_bytes(b"")
        return x * 10

    @staticmethod
    def stop(value: int) -> bool:
        return value >= 30


class Mod3:
    @staticmethod
    def f(x: int) -> int:
        return x % 3

    @staticmethod
    def keep(value: int) -> bool:
        return bool(value)

    @staticmethod
    def is_zero(value: int) -> bool:
        return value == 0


def explode_on_two(x: Any) -> Any:
    if x == "two":
        raise ValueError(f"bad item {x}")
    return x


class Explode:
    @staticmethod
    def f(x: Any) -> Any:
        return explode_on_two(x)


class OddsFail:
    @staticmethod
    def f(x: int) -> int:
        if x % 2:
            raise RuntimeError(f"odd {x}")
        return x


class ReturnsLock:
    @staticmethod
    def f(x: Any) -> Any:
        return threading.Lock() if x == "lock-me" else x


class DropsLock:
    @staticmethod
    def f(x: Any) -> Any:
        return threading.Lock() if x == "lock-me" else x

    @staticmethod
    def keep(value: Any) -> bool:
        return isinstance(value, str)


class Crashy:
    @staticmethod
    def f(x: Any) -> Any:
        if x == "exit":
            os._exit(3)
        if x == "segv":
            ctypes.string_at(0)
        return (x, os.getpid())


class Busy:
    @staticmethod
    def f(x: Any) -> Any:
        if x == "spin":
            while True:
                pass
        if x == "sleep":
            time.sleep(100)
        return (x, os.getpid())


class IgnoresAbandon:
    @staticmethod
    def f(x: Any) -> Any:
        if x == "deaf":
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            time.sleep(100)
        return (x, os.getpid())


class SleepOnPath:
    """Item: a path (touch it, then sleep) or anything else (return it and the pid)."""

    @staticmethod
    def f(x: Any) -> Any:
        if isinstance(x, str) and x.startswith("/"):
            Path(x).touch()
            time.sleep(100)
        return (x, os.getpid())

    @staticmethod
    def deaf(x: Any) -> Any:
        if isinstance(x, str) and x.startswith("/"):
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        return SleepOnPath.f(x)


class QuickUnlessPath:
    """Items are quick, except a path: touch it, then sleep a little."""

    @staticmethod
    def f(x: Any) -> Any:
        if isinstance(x, str) and x.startswith("/"):
            Path(x).touch()
            time.sleep(0.5)
        return x


class MarkThenSleep:
    """Item: a path. Touch it (so the test knows user code is running), then sleep."""

    @staticmethod
    def f(path: str) -> str:
        Path(path).touch()
        time.sleep(100)
        return "slept"

    @staticmethod
    def swallowing(path: str) -> str:
        Path(path).touch()
        for _ in range(1000):
            try:  # noqa: SIM105 (a literal except Exception is the point)
                time.sleep(100)
            except Exception:
                pass
        return "swallowed"

    @staticmethod
    def deaf(path: str) -> str:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        Path(path).touch()
        time.sleep(100)
        return "slept"


class WritesFiles:
    @staticmethod
    def f(x: Any) -> str:
        out = Path(os.environ["DCPROTO_OUTPUT_DIR"])
        if x == "files":
            (out / "a.txt").write_bytes(b"hello")
            (out / "sub" / "dir").mkdir(parents=True)
            (out / "sub" / "dir" / "b.bin").write_bytes(bytes(range(256)))
            (out / "empty-dir").mkdir()
        elif x == "too-big":
            (out / "big.bin").write_bytes(b"\0" * (MAX_OUTPUT_BYTES + 1))
        elif x == "too-many":
            for i in range(MAX_OUTPUT_FILES + 1):
                (out / f"f{i}").write_bytes(b"x")
        elif x == "then-crash":
            (out / "partial.txt").write_bytes(b"partial")
            os._exit(3)
        return str(out)

    @staticmethod
    def env(x: Any) -> str | None:
        return os.environ.get("DCPROTO_OUTPUT_DIR")


class Chatty:
    @staticmethod
    def f(x: int) -> int:
        for i in range(2000):
            print(f"chatter {x} {i} " + "." * 200)
        sys.stdout.flush()
        os.write(1, b"\x00\x00\x00\x05hello raw bytes on fd 1")
        sys.__stdout__.write("via __stdout__\n")
        sys.__stdout__.flush()
        print("to stderr too", file=sys.stderr)
        return x + 1


class Sleepy:
    @staticmethod
    def f(x: Any) -> Any:
        time.sleep(0.5)
        return (x, os.getpid())


class MarkThenReturn:
    """Item: (marker, release). Touch the marker, then wait (up to 30 s) for the release."""

    @staticmethod
    def f(x: Any) -> str:
        marker, release = x
        Path(marker).touch()
        deadline = time.monotonic() + 30
        while not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "released"


class Rendezvous:
    """Each task announces itself with a file named after its item, then waits (up to 30 s)
    for its partner's file: both return True only if they ran at the same time."""

    @staticmethod
    def f(x: Any) -> Any:
        directory, me, partner = x
        Path(directory, me).touch()
        deadline = time.monotonic() + 30
        while not Path(directory, partner).exists():
            if time.monotonic() > deadline:
                return (False, os.getpid())
            time.sleep(0.01)
        return (True, os.getpid())


class Counter:
    @staticmethod
    def f(x: Any, _calls: list[Any] = []) -> tuple[int, int]:  # noqa: B006 (state kept on purpose)
        _calls.append(x)
        return (len(_calls), os.getpid())


class BigValue:
    @staticmethod
    def f(x: int) -> bytes:
        return bytes([x]) * (8 * 1024 * 1024)


# --------------------------------------------------------------------------------------------
# Results, stop and only-if
# --------------------------------------------------------------------------------------------


def test_runner_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        Runner(0)


async def test_ok_results(runner: Runner) -> None:
    outcome = await run(runner, make_project(Square), [1, 2, 3])
    assert outcome.outcome == "ok"
    assert pairs(outcome) == [(1, 1), (2, 4), (3, 9)]
    assert pickle.loads(outcome.payload) == [1, 4, 9]  # every item kept: a list, in order
    assert (outcome.n_items, outcome.n_kept) == (3, 3)
    assert outcome.error is None
    assert outcome.files == []
    assert set(outcome.stats) == {"run", "exec", "service"}
    assert 0 <= outcome.stats["run"] <= outcome.stats["exec"]


async def test_empty_task(runner: Runner) -> None:
    outcome = await run(runner, make_project(Square), [])
    assert outcome.outcome == "ok"
    assert pairs(outcome) == []
    assert (outcome.n_items, outcome.n_kept) == (0, 0)


async def test_large_value_travels(runner: Runner) -> None:
    outcome = await run(runner, make_project(BigValue), [1, 2])
    assert outcome.outcome == "ok"
    result = pairs(outcome)
    assert [item for item, _ in result] == [1, 2]
    assert result[1][1] == b"\x02" * (8 * 1024 * 1024)


async def test_stop_keeps_only_the_stopping_pair(runner: Runner) -> None:
    project = make_project(TenfoldStopAt30, stop="stop")
    outcome = await run(runner, project, [1, 2, 3, 4, 5, 6])
    assert outcome.outcome == "stop"
    assert pairs(outcome) == [(3, 30)]
    assert (outcome.n_items, outcome.n_kept) == (3, 1)
    # items after the stopping one never ran
    assert sorted(name for name, _ in outcome.files) == ["ran-1", "ran-2", "ran-3"]


async def test_only_if_drops_falsy(runner: Runner) -> None:
    outcome = await run(runner, make_project(Mod3, only_if="keep"), list(range(9)))
    assert outcome.outcome == "ok"
    assert pairs(outcome) == [(1, 1), (2, 2), (4, 1), (5, 2), (7, 1), (8, 2)]
    assert (outcome.n_items, outcome.n_kept) == (9, 6)


async def test_stop_is_checked_before_only_if(runner: Runner) -> None:
    # value 0 both stops the task and would be dropped by only-if: stop wins
    project = make_project(Mod3, stop="is_zero", only_if="keep")
    outcome = await run(runner, project, [1, 2, 3, 4])
    assert outcome.outcome == "stop"
    assert pairs(outcome) == [(3, 0)]
    assert (outcome.n_items, outcome.n_kept) == (3, 1)


# --------------------------------------------------------------------------------------------
# Exceptions in user code and unpicklable values
# --------------------------------------------------------------------------------------------


async def test_exception_with_errors_raise(runner: Runner) -> None:
    outcome = await run(runner, make_project(Explode), ["one", "two", "three"])
    assert outcome.outcome == "error"
    assert outcome.payload == b""
    assert (outcome.n_items, outcome.n_kept) == (2, 0)
    error = outcome.error
    assert error is not None
    assert error["message"] == "ValueError: bad item two"
    assert error["type"] == "ValueError"
    assert error["item"] == "'two'"
    assert "explode_on_two" in error["traceback"]
    assert "Traceback (most recent call last)" in error["traceback"]


async def test_exception_with_errors_skip(runner: Runner) -> None:
    outcome = await run(runner, make_project(OddsFail, errors="skip"), list(range(14)))
    assert outcome.outcome == "ok"
    assert outcome.error is None
    assert pairs(outcome) == [(x, x) for x in range(0, 14, 2)]
    assert type(pickle.loads(outcome.payload)) is dict  # some skipped: keyed by index
    assert (outcome.n_items, outcome.n_kept) == (14, 7)
    assert outcome.stats["n_errors"] == 7
    errors = outcome.stats["errors"]
    assert len(errors) == 5  # only the first few error texts travel back
    assert [e["item"] for e in errors] == ["1", "3", "5", "7", "9"]
    assert errors[0]["message"] == "RuntimeError: odd 1"


@pytest.mark.parametrize("items", [[1, 2, 4], [2, 4, 3], [3], [1, 3, 5, 2]])
async def test_skipped_items_at_either_end_keep_the_others_on_their_items(
    runner: Runner, items: list[int]
) -> None:
    outcome = await run(runner, make_project(OddsFail, errors="skip"), items)
    assert outcome.outcome == "ok"
    assert pairs(outcome) == [(x, x) for x in items if x % 2 == 0]
    assert (outcome.n_items, outcome.n_kept) == (len(items), len([x for x in items if x % 2 == 0]))
    assert [e["item"] for e in outcome.stats["errors"]] == [str(x) for x in items if x % 2]


class StopsOnThree:
    @staticmethod
    def f(x: int) -> int:
        if x == 3:
            raise StopIteration  # map() would end quietly here: the item must still fail
        return x * 10


@pytest.mark.parametrize("errors", ["skip", "raise"])
async def test_an_item_raising_stop_iteration_fails_alone_and_the_rest_still_run(
    runner: Runner, errors: str
) -> None:
    outcome = await run(runner, make_project(StopsOnThree, errors=errors), [1, 2, 3, 4, 5])
    if errors == "raise":
        assert outcome.outcome == "error"
        assert outcome.error is not None and outcome.error["item"] == "3"
        assert "StopIteration" in outcome.error["message"]
        assert outcome.n_items == 3
        return
    assert outcome.outcome == "ok"
    assert pairs(outcome) == [(1, 10), (2, 20), (4, 40), (5, 50)]
    assert (outcome.n_items, outcome.n_kept) == (5, 4)
    [error] = outcome.stats["errors"]
    assert error["item"] == "3" and "StopIteration" in error["message"]


async def test_unpicklable_value(runner: Runner) -> None:
    outcome = await run(runner, make_project(ReturnsLock), ["a", "lock-me", "b"])
    assert outcome.outcome == "error"
    assert outcome.payload == b""
    assert outcome.n_kept == 0
    error = outcome.error
    assert error is not None
    assert error["reason"] == "unpicklable"
    assert error["item"] == "'lock-me'"
    assert "cannot be pickled" in error["message"]
    assert "lock" in error["message"]


async def test_unpicklable_value_dropped_by_only_if_is_fine(runner: Runner) -> None:
    outcome = await run(runner, make_project(DropsLock, only_if="keep"), ["a", "lock-me"])
    assert outcome.outcome == "ok"
    assert pairs(outcome) == [("a", "a")]


async def test_items_that_do_not_unpickle(runner: Runner) -> None:
    project = make_project(Square)
    task = dataclasses.replace(make_task(project, []), items=b"not a pickle")
    outcome = await run_task(runner, project, task)
    assert outcome.outcome == "error"
    assert outcome.error is not None and "UnpicklingError" in outcome.error["message"]
    # the child survived and runs the next task
    assert (await run(runner, project, [4])).outcome == "ok"


# --------------------------------------------------------------------------------------------
# Crashes, time limits and abandon
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected", "returncode"),
    [("exit", "exited with code 3", 3), ("segv", "SIGSEGV", -signal.SIGSEGV)],
)
async def test_crash_and_the_slot_recovers(
    runner: Runner, item: str, expected: str, returncode: int
) -> None:
    project = make_project(Crashy)
    before = pairs(await run(runner, project, ["warm-up"]))[0][1][1]
    outcome = await run(runner, project, ["fine", item, "never"])
    assert outcome.outcome == "crash"
    assert outcome.error is not None
    assert expected in outcome.error["message"]
    assert outcome.error["returncode"] == returncode
    assert outcome.payload == b""
    # same slot, fresh child, project loaded again
    after = await run(runner, project, ["next"])
    assert after.outcome == "ok"
    (_, (_, pid)) = pairs(after)[0]
    assert pid != before


@pytest.mark.parametrize("item", ["spin", "sleep"])
async def test_timeout_python_code(runner: Runner, item: str) -> None:
    project = make_project(Busy, task_timeout=0.5)
    # the child's start-up carries no time limit (it is over before the task is sent): on a
    # loaded machine a starting interpreter alone may take longer than the limit under test
    before = pairs(await run(runner, project, ["warm-up"]))[0][1][1]
    started = time.monotonic()
    outcome = await run(runner, project, [item])
    elapsed = time.monotonic() - started
    assert outcome.outcome == "timeout"
    assert outcome.error is not None and "0.5" in outcome.error["message"]
    assert elapsed >= 0.45  # never before the limit (how late depends on the machine)
    # Python code gives up on SIGUSR1: the child is kept and keeps working
    after = await run(runner, project, ["next"])
    assert after.outcome == "ok"
    assert pairs(after)[0][1][1] == before


async def test_timeout_escalates_to_sigkill(runner: Runner) -> None:
    project = make_project(IgnoresAbandon, task_timeout=0.5)
    before = pairs(await run(runner, project, ["warm-up"]))[0][1][1]  # see the test above
    started = time.monotonic()
    outcome = await run(runner, project, ["deaf"])
    elapsed = time.monotonic() - started
    assert outcome.outcome == "timeout"
    assert elapsed >= 0.5 + KILL_GRACE - 0.1  # SIGKILL only after the grace
    after = await run(runner, project, ["next"])
    assert after.outcome == "ok"
    assert pairs(after)[0][1][1] != before


async def test_no_timeout_option_means_no_limit(runner: Runner) -> None:
    outcome = await run(runner, make_project(Sleepy), ["x"])
    assert outcome.outcome == "ok"


async def test_abandon_running_task(runner: Runner, tmp_path: Path) -> None:
    project = make_project(SleepOnPath)
    marker = tmp_path / "started"
    task = make_task(project, [str(marker)])
    running = asyncio.create_task(run_task(runner, project, task))
    await wait_for_file(marker)
    pid = child_pid(runner)
    started = time.monotonic()
    assert runner.abandon(task.task_id) is True
    outcome = await running
    assert time.monotonic() - started < 0.5
    assert outcome.outcome == "abandoned"
    assert outcome.payload == b""
    assert runner.abandon(task.task_id) is False  # not running any more
    # the child gave the task up cleanly and is reused
    after = await run(runner, project, ["next"])
    assert pairs(after) == [("next", ("next", pid))]


async def test_abandon_unknown_task(runner: Runner) -> None:
    assert runner.abandon(987654321) is False


async def test_abandon_is_not_swallowed_by_except_exception(runner: Runner, tmp_path: Path) -> None:
    project = make_project(MarkThenSleep, parallel="swallowing")
    marker = tmp_path / "started"
    task = make_task(project, [str(marker)])
    running = asyncio.create_task(run_task(runner, project, task))
    await wait_for_file(marker)
    started = time.monotonic()
    assert runner.abandon(task.task_id)
    outcome = await running
    assert time.monotonic() - started < 0.5
    assert outcome.outcome == "abandoned"


async def test_abandon_escalates_to_sigkill(runner: Runner, tmp_path: Path) -> None:
    project = make_project(SleepOnPath, parallel="deaf")
    marker = tmp_path / "started"
    task = make_task(project, [str(marker)])
    running = asyncio.create_task(run_task(runner, project, task))
    await wait_for_file(marker)
    pid = child_pid(runner)
    started = time.monotonic()
    assert runner.abandon(task.task_id)
    outcome = await running
    elapsed = time.monotonic() - started
    assert outcome.outcome == "abandoned"  # not "crash", although the child was killed
    assert KILL_GRACE - 0.1 <= elapsed < KILL_GRACE + 1.0
    after = await run(runner, project, ["next"])
    assert after.outcome == "ok"
    assert pairs(after)[0][1][1] != pid


async def test_abandon_of_a_task_still_waiting_for_a_child(runner: Runner, tmp_path: Path) -> None:
    sleeper = make_project(MarkThenSleep)
    marker = tmp_path / "started"
    first = make_task(sleeper, [str(marker)])
    first_run = asyncio.create_task(run_task(runner, sleeper, first))
    await wait_for_file(marker)
    square = make_project(Square, project_id="square")
    queued = make_task(square, [5])
    queued_run = asyncio.create_task(run_task(runner, square, queued))
    await asyncio.sleep(0.05)
    assert runner.abandon(queued.task_id) is False  # not running: the caller must cancel it
    assert runner.abandon(first.task_id) is True
    assert (await first_run).outcome == "abandoned"
    outcome = await queued_run
    assert outcome.outcome == "ok"
    assert pairs(outcome) == [(5, 25)]


async def test_a_stray_sigusr1_harms_no_task(runner: Runner, tmp_path: Path) -> None:
    """The child gives up only a task the worker named on its abandon pipe: a signal that
    names nothing (or lands between two tasks) leaves the task running."""
    project = make_project(MarkThenReturn)
    marker = tmp_path / "started"
    release = tmp_path / "release"
    running = asyncio.create_task(run(runner, project, [(str(marker), str(release))]))
    await wait_for_file(marker)
    pid = child_pid(runner)
    os.kill(pid, signal.SIGUSR1)  # not via abandon(): nobody asked for it
    release.touch()
    outcome = await asyncio.wait_for(running, 30)
    assert outcome.outcome == "ok"
    assert child_pid(runner) == pid


async def test_an_abandon_for_a_task_not_started_yet_is_exact(
    runner: Runner, tmp_path: Path
) -> None:
    """Two tasks queued in one child; the second is abandoned while the first runs: it is
    answered abandoned without running, the first finishes, and nobody is killed."""
    project = make_project(MarkThenReturn)
    runner._task_seconds[project.project_id] = 0.0001  # short tasks: both go to the child
    first_mark, second_mark = tmp_path / "first", tmp_path / "second"
    release = tmp_path / "release"
    first = make_task(project, [(str(first_mark), str(release))])
    second = make_task(project, [(str(second_mark), str(release))])
    runs = [asyncio.create_task(run_task(runner, project, t)) for t in (first, second)]
    await wait_for_file(first_mark)
    pid = child_pid(runner)
    assert runner.is_running(second.task_id, second.attempt)  # sent to the child, queued
    assert runner.abandon(second.task_id)
    release.touch()
    first_outcome, second_outcome = await asyncio.wait_for(asyncio.gather(*runs), 30)
    assert (first_outcome.outcome, second_outcome.outcome) == ("ok", "abandoned")
    assert not second_mark.exists()  # it never ran
    assert child_pid(runner) == pid  # and no child was killed for it
    again = await run(runner, project, [(str(tmp_path / "third"), str(release))])
    assert again.outcome == "ok"


async def test_a_recall_leaves_a_started_task_running(runner: Runner, tmp_path: Path) -> None:
    project = make_project(MarkThenReturn)
    runner._task_seconds[project.project_id] = 0.0001
    first_mark, second_mark = tmp_path / "first", tmp_path / "second"
    release = tmp_path / "release"
    first = make_task(project, [(str(first_mark), str(release))])
    second = make_task(project, [(str(second_mark), str(release))])
    runs = [asyncio.create_task(run_task(runner, project, t)) for t in (first, second)]
    await wait_for_file(first_mark)
    runner.abandon(first.task_id, started=False)  # running: it stays
    runner.abandon(second.task_id, started=False)  # queued: it goes
    release.touch()
    first_outcome, second_outcome = await asyncio.wait_for(asyncio.gather(*runs), 30)
    assert (first_outcome.outcome, second_outcome.outcome) == ("ok", "abandoned")
    assert not second_mark.exists()


# --------------------------------------------------------------------------------------------
# Additional result files
# --------------------------------------------------------------------------------------------


async def test_additional_files(runner: Runner) -> None:
    project = make_project(WritesFiles)
    task = make_task(project, ["files"])
    outcome = await run_task(runner, project, task)
    assert outcome.outcome == "ok"
    assert outcome.files == [["a.txt", b"hello"], ["sub/dir/b.bin", bytes(range(256))]]
    output_dir = Path(pairs(outcome)[0][1])
    assert output_dir.parent == runner.workdir
    assert list(output_dir.iterdir()) == []  # emptied after the task
    # a later task starts with an empty directory
    again = await run(runner, project, ["nothing"])
    assert again.outcome == "ok"
    assert again.files == []


async def test_output_dir_env_only_during_a_task(runner: Runner) -> None:
    project = make_project(WritesFiles, parallel="env")
    outcome = await run(runner, project, ["x"])
    assert pairs(outcome)[0][1] is not None
    assert os.environ.get("DCPROTO_OUTPUT_DIR") is None  # the worker's own env is untouched


@pytest.mark.parametrize("item", ["too-big", "too-many"])
async def test_too_many_file_bytes_is_an_error(runner: Runner, item: str) -> None:
    project = make_project(WritesFiles)
    outcome = await run(runner, project, [item])
    assert outcome.outcome == "error"
    assert outcome.error is not None and "exceed" in outcome.error["message"]
    assert outcome.files == []
    assert outcome.payload == b""
    for child_dir in runner.workdir.iterdir():
        assert list(child_dir.iterdir()) == []  # cleaned up anyway
    assert (await run(runner, project, ["files"])).outcome == "ok"


async def test_output_dir_of_a_crashed_task_is_removed(runner: Runner) -> None:
    project = make_project(WritesFiles)
    task = make_task(project, ["then-crash"])
    outcome = await run_task(runner, project, task)
    assert outcome.outcome == "crash"
    leftovers = [path for path in runner.workdir.rglob("*") if path.is_file()]
    assert leftovers == []  # what the dead child wrote is removed


# --------------------------------------------------------------------------------------------
# Loading projects
# --------------------------------------------------------------------------------------------


async def test_missing_module_is_a_load_error(runner: Runner) -> None:
    project = make_project(Square, modules=["no_such_module_xyz"])
    outcome = await run(runner, project, [1])
    assert outcome.outcome == "load_error"
    assert outcome.error is not None
    assert "no_such_module_xyz" in outcome.error["message"]
    # the failed load is remembered, not retried, and does not hurt the child
    assert (await run(runner, project, [1])).outcome == "load_error"
    assert (await run(runner, make_project(Square, project_id="good"), [2])).outcome == "ok"


def _class_from_a_phantom_module() -> bytes:
    """Pickled (by reference) class of a module that exists only in the test process."""
    module = types.ModuleType("phantom_module_xyz")
    exec("class Phantom:\n    @staticmethod\n    def f(x):\n        return x\n", module.__dict__)
    sys.modules["phantom_module_xyz"] = module
    try:
        return pickle.dumps(module.Phantom)
    finally:
        del sys.modules["phantom_module_xyz"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"code": b"certainly not a pickle"}, "UnpicklingError"),
        ({"code": _class_from_a_phantom_module()}, "phantom_module_xyz"),
        ({"parallel": "no_such_function"}, "no_such_function"),
        ({"stop": "no_such_stop"}, "no_such_stop"),
        ({"only_if": "no_such_filter"}, "no_such_filter"),
    ],
)
async def test_class_that_does_not_load(
    runner: Runner, kwargs: dict[str, Any], expected: str
) -> None:
    outcome = await run(runner, make_project(Square, **kwargs), [1])
    assert outcome.outcome == "load_error"
    assert outcome.error is not None and expected in outcome.error["message"]
    assert (outcome.n_items, outcome.payload) == (0, b"")


async def test_project_is_loaded_once_per_child(runner: Runner) -> None:
    project = make_project(Counter)
    first = await run(runner, project, ["a"])
    second = await run(runner, project, ["b", "c"])
    assert pairs(first)[0][1][0] == 1
    # the same function object (and its state) serves the second task: no reload
    assert [value[0] for _, value in pairs(second)] == [2, 3]
    assert pairs(first)[0][1][1] == pairs(second)[0][1][1]
    [child] = [c for c in runner._children if c.bound == "owner:creator-proj"]
    assert list(child.loaded) == ["proj"]


async def test_each_project_has_its_own_child(runner: Runner) -> None:
    square = make_project(Pid, project_id="square")
    other = make_project(Pid, project_id="other")
    (_, (_, first)) = pairs(await run(runner, square, [3]))[0]
    (_, (_, second)) = pairs(await run(runner, other, [4]))[0]
    (_, (_, again)) = pairs(await run(runner, square, [5]))[0]
    assert first != second  # a clean child for the second project
    assert again == first  # and the first project's child kept warm (a spare was free)


async def test_many_projects_take_turns_on_one_slot(runner: Runner) -> None:
    """More projects than processes: each new one gets a fresh process (the one idle longest
    is replaced), and one seen before runs again exactly, in a child of its own."""
    projects = [make_project(Pid, project_id=f"p{i}") for i in range(6)]
    seen: dict[int, str] = {}
    for i, project in enumerate([*projects, projects[0], projects[3]]):
        outcome = await run(runner, project, [i])
        assert outcome.outcome == "ok", outcome.error
        (item, (_, pid)) = pairs(outcome)[0]
        assert item == i
        assert seen.setdefault(pid, project.project_id) == project.project_id
    assert len(runner._children) <= 1 + SPARES
    assert len({c.process.pid for c in runner._children if c.process and c.alive}) == len(
        [c for c in runner._children if c.alive]
    )


# --------------------------------------------------------------------------------------------
# Channel hygiene and concurrency
# --------------------------------------------------------------------------------------------


async def test_prints_do_not_corrupt_the_channel(runner: Runner) -> None:
    outcome = await run(runner, make_project(Chatty), [1, 2])
    assert outcome.outcome == "ok"
    assert pairs(outcome) == [(1, 2), (2, 3)]
    assert (await run(runner, make_project(Square), [3])).outcome == "ok"


async def test_two_slots_run_concurrently(make_runner: RunnerFactory, tmp_path: Path) -> None:
    runner = await make_runner(2)
    project = make_project(Rendezvous)
    here = str(tmp_path)
    first, second = await asyncio.gather(
        run(runner, project, [(here, "a", "b")]), run(runner, project, [(here, "b", "a")])
    )
    assert first.outcome == second.outcome == "ok"
    (_, (met_a, pid_a)), (_, (met_b, pid_b)) = pairs(first)[0], pairs(second)[0]
    assert met_a and met_b  # each saw the other running: they overlapped
    assert pid_a != pid_b  # two different children


async def test_more_tasks_than_slots_queue(make_runner: RunnerFactory) -> None:
    runner = await make_runner(2)
    project = make_project(Square)
    outcomes = await asyncio.gather(*(run(runner, project, [i]) for i in range(6)))
    assert [pairs(o) for o in outcomes] == [[(i, i * i)] for i in range(6)]


# --------------------------------------------------------------------------------------------
# Pipelining: short tasks are queued in a child, several at a time
# --------------------------------------------------------------------------------------------


async def run_all(
    runner: Runner, project: p.Project, tasks: list[p.Task]
) -> tuple[list[Outcome], int]:
    """Run ``tasks`` at once; also the most tasks a child held at any moment."""
    runs = [asyncio.create_task(run_task(runner, project, task)) for task in tasks]
    peak = 0
    while not all(r.done() for r in runs):
        peak = max([peak, *(len(child.queue) for child in runner._children)])
        await asyncio.sleep(0)
    return [r.result() for r in runs], peak


async def test_short_tasks_are_pipelined_into_a_child(runner: Runner) -> None:
    project = make_project(Crashy)
    assert (await run(runner, project, ["warm-up"])).outcome == "ok"  # now known to be short
    tasks = [make_task(project, [i]) for i in range(3 * PIPELINE_DEPTH)]
    outcomes, peak = await run_all(runner, project, tasks)
    # all PIPELINE_DEPTH go out at once, but the first may be answered before we look
    assert 2 <= peak <= PIPELINE_DEPTH
    assert [pairs(o)[0][0] for o in outcomes] == list(range(3 * PIPELINE_DEPTH))
    assert len({pairs(o)[0][1][1] for o in outcomes}) == 1  # one child did them all


async def test_a_crash_in_a_pipeline_hands_back_the_tasks_behind_it(runner: Runner) -> None:
    project = make_project(Crashy)
    assert (await run(runner, project, ["warm-up"])).outcome == "ok"
    tasks = [make_task(project, [x]) for x in ("a", "exit", "b", "c")]
    outcomes, peak = await run_all(runner, project, tasks)
    assert peak >= 2
    # only the task that crashed counts as a failed attempt; the others never started
    assert [o.outcome for o in outcomes] == ["ok", "crash", "abandoned", "abandoned"]
    assert (await run(runner, project, ["after"])).outcome == "ok"


async def test_abandoning_a_task_queued_behind_another(runner: Runner, tmp_path: Path) -> None:
    project = make_project(QuickUnlessPath)
    for i in range(3):
        assert (await run(runner, project, [i])).outcome == "ok"
    marker = tmp_path / "started"
    slow, queued = make_task(project, [str(marker)]), make_task(project, [7])
    slow_run = asyncio.create_task(run_task(runner, project, slow))
    queued_run = asyncio.create_task(run_task(runner, project, queued))
    await wait_for_file(marker)
    assert runner.abandon(queued.task_id) is True  # held by the child, behind the slow one
    assert (await queued_run).outcome == "abandoned"
    assert pairs(await slow_run) == [(str(marker), str(marker))]  # not interrupted


async def test_tasks_with_a_time_limit_are_never_pipelined(runner: Runner) -> None:
    project = make_project(Square, task_timeout=5)
    assert (await run(runner, project, [1])).outcome == "ok"
    outcomes, peak = await run_all(runner, project, [make_task(project, [i]) for i in range(8)])
    assert peak == 1
    assert [pairs(o) for o in outcomes] == [[(i, i * i)] for i in range(8)]


async def test_tasks_cancelled_while_waiting_do_not_block_later_ones(
    runner: Runner, tmp_path: Path
) -> None:
    # what a stop does to a worker: the tasks waiting for a child are cancelled, the running
    # one is abandoned; the next project's tasks must still find the child free
    sleeper = make_project(MarkThenSleep)
    marker = tmp_path / "started"
    running = make_task(sleeper, [str(marker)])
    running_run = asyncio.create_task(run_task(runner, sleeper, running))
    await wait_for_file(marker)
    waiting = [
        asyncio.create_task(run(runner, sleeper, [str(tmp_path / f"w{i}")])) for i in range(3)
    ]
    await asyncio.sleep(0.05)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert runner.abandon(running.task_id) is True
    assert (await running_run).outcome == "abandoned"
    after = await asyncio.wait_for(run(runner, make_project(Square, project_id="sq"), [3]), 5)
    assert pairs(after) == [(3, 9)]
