"""End-to-end tests: a real server process, real worker processes and the creator library, all
talking TCP on 127.0.0.1. Every test compares with the exact answer computed serially here.

Project classes are defined inside the tests; they travel to the workers by value.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, hello_for, raw_socket, server_user, wait_for

import dcproto
from dcproto import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionFailed,
    DcprotoError,
    Distribute,
    ProjectCancelled,
    ResultsPathError,
    SerializationError,
    TaskFailed,
    UnhashableItemError,
    load_results,
)
from dcproto import protocol as p
from dcproto.creator.creator import attach
from dcproto.errors import UnknownUserError
from dcproto.server.server import HANDSHAKE_TIMEOUT
from dcproto.trust.tokens import new_token
from dcproto.users import User, add_user, get_user, load_users

pytestmark = pytest.mark.timeout(60)

RESULT_TIMEOUT = 30.0  # bound on every wait for a project


def bin_command(name: str, module: str) -> list[str]:
    """The installed console script ``name``, or ``python -m module`` when it is missing."""
    path = Path(sys.executable).parent / name
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


DCPROTO = bin_command("dcproto", "dcproto.cli")
DCPROTO_WORKER = bin_command("dcproto-worker", "dcproto.worker.worker")


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


def home_user(server: ServerProcess) -> User:
    return server_user(server, "home", server.add_token("creator", "creator"))


def free_port() -> int:
    """A port nothing listens on (bound, then closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- 1, 2: plain projects ------------------------------------------------------------------------


def test_plain_project_and_results_path(start_worker: Any, user: User, tmp_path: Path) -> None:
    first, second = start_worker(), start_worker()
    out = tmp_path / "results"

    @Distribute(user_name="home", iterator=range(200), task_size=7, results_path=out)
    class Squares:
        @staticmethod
        def parallel_func(x):
            return x * x + 1

    project = Squares()
    results = project.get_results(timeout=RESULT_TIMEOUT)
    expected = {x: x * x + 1 for x in range(200)}
    assert results == expected
    assert project.done()
    assert project.progress == dcproto.Progress(
        tasks_done=29,
        items_done=200,
        items_kept=200,
        total_tasks=29,
        total_items=200,
        status="done",
    )

    loaded = load_results(out)
    assert loaded == expected
    assert all(type(key) is int for key in loaded)
    assert {item: value for item, value in json.loads((out / "results.json").read_text())} == (
        expected
    )
    assert (out / "project_id").read_text().strip() == project.project_id

    stats = json.loads((out / "stats.json").read_text())
    assert stats["status"] == "done"
    assert stats["project_id"] == project.project_id
    assert stats["tasks_done"] == stats["total_tasks"] == 29
    assert stats["items_done"] == stats["total_items"] == 200
    assert stats["per_worker_tasks"].keys() == {first.name, second.name}
    assert sum(stats["per_worker_tasks"].values()) == 29
    assert stats["wall_time"] > 0
    assert stats["items_per_second"] > 0

    with open(out / "tasks.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(int(row["seq"]) for row in rows) == list(range(29))
    assert {row["worker"] for row in rows} <= {first.name, second.name}
    assert not (out / "errors.json").exists()


async def test_await_results_in_async_code(start_worker: Any, user: User) -> None:
    start_worker()

    @Distribute(user_name="home", iterator=range(50), task_size=4)
    class Doubles:
        @staticmethod
        def parallel_func(x):
            return 2 * x

    project = Doubles()
    results = await asyncio.wait_for(project.results(), RESULT_TIMEOUT)
    assert results == {x: 2 * x for x in range(50)}


# ---- 3-6: stop, only-if, generators --------------------------------------------------------------


def test_stop_ends_a_huge_iterator_early(start_worker: Any, user: User) -> None:
    start_worker(), start_worker()

    @Distribute(user_name="home", iterator=range(10**9), task_size=1000, stop_func="stop_func")
    class Needle:
        @staticmethod
        def parallel_func(x):
            return x

        @staticmethod
        def stop_func(value):
            return value == 12345

    started = time.monotonic()
    project = Needle()
    results = project.get_results(timeout=RESULT_TIMEOUT)
    elapsed = time.monotonic() - started
    assert results == {12345: 12345}
    assert elapsed < 10, f"the stop took {elapsed:.1f} s"
    assert project.progress.total_items is None  # the iterator was never walked to its end
    assert project.stats["items_done"] < 100_000


def test_only_if_keeps_matching_values(start_worker: Any, user: User) -> None:
    start_worker()

    @Distribute(user_name="home", iterator=range(300), task_size=10, only_if_func="keep")
    class Evens:
        @staticmethod
        def parallel_func(x):
            return x * 3

        @staticmethod
        def keep(value):
            return value % 2 == 0

    project = Evens()
    results = project.get_results(timeout=RESULT_TIMEOUT)
    assert results == {x: x * 3 for x in range(300) if (x * 3) % 2 == 0}
    assert project.progress.items_done == 300
    assert project.progress.items_kept == 150


def test_stop_is_checked_before_only_if(start_worker: Any, user: User) -> None:
    """777 is odd, so only-if would drop it; stop is tested first and ends the project with it."""
    start_worker(), start_worker()

    @Distribute(
        user_name="home",
        iterator=range(2000),
        task_size=10,
        stop_func="is_stop",
        only_if_func="is_even",
    )
    class StopAndFilter:
        @staticmethod
        def parallel_func(x):
            return x

        @staticmethod
        def is_stop(value):
            return value == 777

        @staticmethod
        def is_even(value):
            return value % 2 == 0

    assert StopAndFilter().get_results(timeout=RESULT_TIMEOUT) == {777: 777}


def test_generator_iterator(start_worker: Any, user: User) -> None:
    start_worker()
    consumed = []

    def items():
        for i in range(1000):
            consumed.append(i)
            yield ("item", i)

    @Distribute(user_name="home", iterator=items(), task_size=25)
    class FromGenerator:
        @staticmethod
        def parallel_func(item):
            return item[1] * 2

    project = FromGenerator()
    results = project.get_results(timeout=RESULT_TIMEOUT)
    assert results == {("item", i): i * 2 for i in range(1000)}
    assert consumed == list(range(1000))
    assert project.progress.total_tasks == 40


def test_empty_iterator(start_worker: Any, user: User) -> None:
    start_worker()

    @Distribute(user_name="home", iterator=[], task_size=3)
    class Empty:
        @staticmethod
        def parallel_func(x):
            return x

    project = Empty()
    assert project.get_results(timeout=RESULT_TIMEOUT) == {}
    assert project.progress.total_tasks == 0


def test_stop_that_never_fires_returns_everything(start_worker: Any, user: User) -> None:
    start_worker()

    @Distribute(user_name="home", iterator=range(100), task_size=10, stop_func="stop_func")
    class NeverStops:
        @staticmethod
        def parallel_func(x):
            return x + 0.5

        @staticmethod
        def stop_func(value):
            return value < 0

    assert NeverStops().get_results(timeout=RESULT_TIMEOUT) == {x: x + 0.5 for x in range(100)}


def test_iterator_raising_fails_the_project(start_worker: Any, user: User) -> None:
    start_worker()

    def items():
        yield from range(50)
        raise RuntimeError("the data source broke")

    @Distribute(user_name="home", iterator=items(), task_size=5)
    class Broken:
        @staticmethod
        def parallel_func(x):
            return x

    with pytest.raises(DcprotoError, match="the data source broke"):
        Broken().get_results(timeout=RESULT_TIMEOUT)


# ---- 7: additional result files ------------------------------------------------------------------


def test_additional_result_files_come_back(start_worker: Any, user: User, tmp_path: Path) -> None:
    start_worker(), start_worker()
    out = tmp_path / "results"

    @Distribute(user_name="home", iterator=range(12), task_size=1, results_path=out)
    class Files:
        @staticmethod
        def parallel_func(x):
            with open(os.path.join(dcproto.ADDITIONAL_RESULTS, f"{x}.txt"), "w") as handle:
                handle.write(f"value {x}")
            with open(os.path.join(dcproto.ADDITIONAL_RESULTS, "common.txt"), "w") as handle:
                handle.write(f"common {x}")
            nested = dcproto.output_dir() / "nested"
            nested.mkdir(exist_ok=True)
            (nested / f"{x}.bin").write_bytes(bytes([x]) * 3)
            return x

    assert Files().get_results(timeout=RESULT_TIMEOUT) == {x: x for x in range(12)}
    extra = out / "additional_results"
    for x in range(12):
        assert (extra / f"{x}.txt").read_text() == f"value {x}"
        assert (extra / "nested" / f"{x}.bin").read_bytes() == bytes([x]) * 3
    commons = sorted(extra.glob("common*.txt"))
    assert (extra / "common.txt") in commons
    assert len(commons) == 12  # one kept as is, eleven renamed, none overwritten
    assert {path.read_text() for path in commons} == {f"common {x}" for x in range(12)}
    assert len([path for path in extra.rglob("*") if path.is_file()]) == 36


def test_renamed_file_does_not_overwrite_another(
    start_worker: Any, user: User, tmp_path: Path
) -> None:
    start_worker("--slots", "1")  # one child: task 0 is done, and written, before task 1
    out = tmp_path / "results"

    @Distribute(user_name="home", iterator=range(2), task_size=1, results_path=out)
    class Collides:
        @staticmethod
        def parallel_func(x):
            (dcproto.output_dir() / "common.txt").write_text(f"{x} common")
            if x == 0:  # the very name task 1's common.txt is renamed to
                (dcproto.output_dir() / "common.task1.txt").write_text("0 extra")
            return x

    assert Collides().get_results(timeout=RESULT_TIMEOUT) == {0: 0, 1: 1}
    written = sorted(path.read_text() for path in (out / "additional_results").iterdir())
    assert written == ["0 common", "0 extra", "1 common"]


# ---- 8: modules ----------------------------------------------------------------------------------


def test_modules_are_imported_in_workers(start_worker: Any, user: User) -> None:
    start_worker()

    @Distribute(user_name="home", iterator=range(20), task_size=5, modules=["json"])
    class WithJson:
        @staticmethod
        def parallel_func(x):
            return json.dumps({"x": x})

    assert WithJson().get_results(timeout=RESULT_TIMEOUT) == {
        x: json.dumps({"x": x}) for x in range(20)
    }


def test_missing_module_gives_a_notice_and_waits(start_worker: Any, user: User) -> None:
    start_worker(), start_worker()

    @Distribute(user_name="home", iterator=range(20), task_size=5, modules=["no_such_module_xyz"])
    class NeedsMissing:
        @staticmethod
        def parallel_func(x):
            return x

    project = NeedsMissing()
    wait_for(lambda: project.notices, 5, "a notice that no worker can run the project")
    assert "no_such_module_xyz" in project.notices[0]
    time.sleep(0.3)
    assert not project.done()  # a named server waits for a worker that can run it
    project.cancel()
    with pytest.raises(ProjectCancelled):
        project.get_results(timeout=10)


# ---- 9: user code raising ------------------------------------------------------------------------


def test_exception_fails_the_project_with_item_and_traceback(start_worker: Any, user: User) -> None:
    start_worker()

    @Distribute(
        user_name="home",
        iterator=[f"item-{i}" for i in range(40)],
        task_size=4,
        parallel_func="crunch_numbers",
    )
    class Raises:
        @staticmethod
        def crunch_numbers(item):
            if item == "item-13":
                raise ValueError(f"cannot crunch {item}")
            return len(item)

    project = Raises()
    with pytest.raises(TaskFailed) as caught:
        project.get_results(timeout=RESULT_TIMEOUT)
    error = caught.value
    text = str(error)
    assert "'item-13'" in text
    assert "crunch_numbers" in text  # the remote traceback names the user function
    assert "ValueError: cannot crunch item-13" in text
    assert error.reason == "exception"
    assert error.item == "'item-13'"
    assert error.remote_traceback and "crunch_numbers" in error.remote_traceback


def test_errors_skip_drops_bad_items(start_worker: Any, user: User, tmp_path: Path) -> None:
    start_worker()
    out = tmp_path / "results"

    @Distribute(user_name="home", iterator=range(50), task_size=5, errors="skip", results_path=out)
    class Skips:
        @staticmethod
        def parallel_func(x):
            if x % 10 == 3:
                raise ValueError(f"bad {x}")
            return -x

    project = Skips()
    results = project.get_results(timeout=RESULT_TIMEOUT)
    assert results == {x: -x for x in range(50) if x % 10 != 3}
    assert sorted(error["item"] for error in project.errors) == sorted(
        repr(x) for x in range(50) if x % 10 == 3
    )
    assert all("ValueError" in error["traceback"] for error in project.errors)
    assert len(json.loads((out / "errors.json").read_text())) == 5


def test_crashing_task_is_retried_then_fails(start_worker: Any, user: User) -> None:
    start_worker(), start_worker()

    @Distribute(user_name="home", iterator=range(10), task_size=1, max_attempts=2)
    class Crashes:
        @staticmethod
        def parallel_func(x):
            if x == 5:
                os._exit(3)
            return x

    with pytest.raises(TaskFailed) as caught:
        Crashes().get_results(timeout=RESULT_TIMEOUT)
    assert caught.value.reason == "crash"
    assert caught.value.attempts == 2


def test_task_timeout(start_worker: Any, user: User) -> None:
    worker = start_worker()

    @Distribute(user_name="home", iterator=range(4), task_size=1, task_timeout=0.5, max_attempts=1)
    class Hangs:
        @staticmethod
        def parallel_func(x):
            if x == 2:
                time.sleep(60)
            return x

    started = time.monotonic()
    with pytest.raises(TaskFailed) as caught:
        Hangs().get_results(timeout=RESULT_TIMEOUT)
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 10
    assert worker.proc.poll() is None

    @Distribute(user_name="home", iterator=range(8), task_size=1)
    class After:
        @staticmethod
        def parallel_func(x):
            return x + 100

    assert After().get_results(timeout=RESULT_TIMEOUT) == {x: x + 100 for x in range(8)}


def test_cancel_abandons_running_tasks(start_worker: Any, user: User) -> None:
    start_worker(), start_worker()

    @Distribute(user_name="home", iterator=range(20), task_size=1)
    class Sleeps:
        @staticmethod
        def parallel_func(x):
            time.sleep(60)
            return x

    project = Sleeps()
    time.sleep(0.5)  # let the tasks start in the workers' children
    started = time.monotonic()
    project.cancel()
    with pytest.raises(ProjectCancelled):
        project.get_results(timeout=10)
    assert time.monotonic() - started < 5

    @Distribute(user_name="home", iterator=range(8), task_size=1)
    class Quick:
        @staticmethod
        def parallel_func(x):
            return -x

    # the four slots were freed: this would wait a minute otherwise
    assert Quick().get_results(timeout=15) == {x: -x for x in range(8)}


# ---- 10, 11: workers dying or freezing -----------------------------------------------------------


def _slow_project() -> type:
    @Distribute(user_name="home", iterator=range(200), task_size=1, lease_timeout=1.5)
    class SlowSquares:
        @staticmethod
        def parallel_func(x):
            time.sleep(0.05)
            return x * x

    return SlowSquares


SLOW_EXPECTED = {x: x * x for x in range(200)}


def test_killed_worker_tasks_are_reissued(start_worker: Any, user: User) -> None:
    victim, survivor = start_worker(), start_worker()
    project = _slow_project()()
    wait_for(lambda: project.progress.tasks_done >= 20, 20, "20 results")
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.proc.wait(timeout=10) == -signal.SIGKILL
    results = project.get_results(timeout=RESULT_TIMEOUT)
    assert results == SLOW_EXPECTED
    stats = project.stats
    assert stats["tasks_reissued"] >= 1  # the victim held leased tasks when it died
    assert stats["tasks_done"] == 200
    assert stats["per_worker"][survivor.name] > 0


def test_frozen_worker_loses_its_leases(start_worker: Any, user: User) -> None:
    frozen, healthy = start_worker(), start_worker()
    project = _slow_project()()
    wait_for(lambda: project.progress.tasks_done >= 20, 20, "20 results")
    os.kill(frozen.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        results = project.get_results(timeout=RESULT_TIMEOUT)
        finished_after = time.monotonic() - stopped_at
        assert frozen.proc.poll() is None
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    snapshot = dict(results)
    assert results == SLOW_EXPECTED
    assert finished_after < 10, f"the project took {finished_after:.1f} s after the freeze"
    assert project.stats["tasks_reissued"] >= 1
    assert project.stats["per_worker"][healthy.name] > 0
    # the thawed worker finds its connection gone and rejoins; nothing changes for the project
    frozen.wait_connected(count=2, timeout=15)
    assert project.get_results(timeout=1) == snapshot == SLOW_EXPECTED


def test_long_task_keeps_its_lease_while_the_worker_is_alive(start_worker: Any, user: User) -> None:
    """A task may run longer than lease_timeout: the worker's heartbeats renew the lease."""
    start_worker()

    @Distribute(user_name="home", iterator=range(2), task_size=1, lease_timeout=1.0)
    class Long:
        @staticmethod
        def parallel_func(x):
            time.sleep(2.5)
            return x

    project = Long()
    assert project.get_results(timeout=RESULT_TIMEOUT) == {0: 0, 1: 1}
    assert project.stats["tasks_reissued"] == 0
    assert project.stats["duplicates_dropped"] == 0


def test_server_death_fails_the_project_after_reconnect_timeout(
    server: ServerProcess, start_worker: Any, user: User
) -> None:
    start_worker()

    @Distribute(user_name="home", iterator=range(4), task_size=1, reconnect_timeout=1.0)
    class Waits:
        @staticmethod
        def parallel_func(x):
            time.sleep(30)
            return x

    project = Waits()
    time.sleep(0.3)
    os.killpg(server.proc.pid, signal.SIGKILL)
    with pytest.raises(ConnectionFailed):
        project.get_results(timeout=10)


def test_thawed_worker_late_results_are_dropped(
    make_server: Any, start_worker: Any, config_dir: Path
) -> None:
    """With a heartbeat of 1 s the server keeps a silent peer for 3 s, longer than the 1 s lease:
    the frozen worker's tasks move on, and when it wakes its late results reach the server on
    the same connection and must be dropped, not counted twice."""
    server = make_server(heartbeat=1.0)
    add_user(home_user(server))
    frozen, healthy = start_worker(server=server), start_worker(server=server)

    @Distribute(user_name="home", iterator=range(200), task_size=1, lease_timeout=1.0)
    class SlowCubes:
        @staticmethod
        def parallel_func(x):
            time.sleep(0.05)
            return x**3

    project = SlowCubes()
    wait_for(lambda: project.progress.tasks_done >= 20, 20, "20 results")
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        time.sleep(1.6)  # past the 1 s lease, short of the 3 s before the server drops it
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    results = project.get_results(timeout=RESULT_TIMEOUT)
    assert results == {x: x**3 for x in range(200)}
    assert project.stats["tasks_done"] == 200
    assert project.stats["tasks_reissued"] >= 1
    assert project.stats["per_worker"][healthy.name] > 0
    assert frozen.connections() == 1  # it kept its connection all along


# ---- 12: --tasks N -------------------------------------------------------------------------------


def test_worker_exits_after_its_task_budget(start_worker: Any, user: User) -> None:
    limited = start_worker("--tasks", "5")

    @Distribute(user_name="home", iterator=range(12), task_size=1)
    class Twelve:
        @staticmethod
        def parallel_func(x):
            time.sleep(0.05)
            return x + 1

    project = Twelve()
    assert limited.proc.wait(timeout=20) == 0
    assert "5 tasks done" in limited.output()
    wait_for(lambda: project.progress.tasks_done >= 5, 5, "the 5 results of the limited worker")
    assert project.progress.tasks_done == 5
    finisher = start_worker()
    assert project.get_results(timeout=RESULT_TIMEOUT) == {x: x + 1 for x in range(12)}
    assert project.stats["per_worker"] == {limited.name: 5, finisher.name: 7}


# ---- 13: several creators ------------------------------------------------------------------------

CREATOR_SCRIPT = """
import json, time
from dcproto import Distribute

@Distribute(user_name="home", iterator=range(60), task_size=3)
class Cubes:
    @staticmethod
    def parallel_func(x):
        time.sleep(0.01)
        return x ** 3

print(json.dumps(sorted(Cubes().get_results(timeout=50).items())))
"""


def test_several_creators_share_the_workers(start_worker: Any, user: User) -> None:
    start_worker(), start_worker()
    other = subprocess.Popen(
        [sys.executable, "-c", CREATOR_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        @Distribute(user_name="home", iterator=range(100), task_size=5)
        class Doubles:
            @staticmethod
            def parallel_func(x):
                time.sleep(0.01)
                return 2 * x

        @Distribute(user_name="home", iterator=[f"w{i}" for i in range(80)], task_size=4)
        class Lengths:
            @staticmethod
            def parallel_func(word):
                time.sleep(0.01)
                return len(word)

        doubles, lengths = Doubles(), Lengths()
        assert doubles.project_id != lengths.project_id
        assert doubles.get_results(timeout=RESULT_TIMEOUT) == {x: 2 * x for x in range(100)}
        assert lengths.get_results(timeout=RESULT_TIMEOUT) == {
            f"w{i}": len(f"w{i}") for i in range(80)
        }
        stdout, stderr = other.communicate(timeout=50)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait(timeout=10)
    assert other.returncode == 0, stderr
    assert json.loads(stdout) == [[x, x**3] for x in range(60)]


ORPHAN_SCRIPT = """
import sys, time
from dcproto import Distribute

@Distribute(user_name="home", iterator=range(int(sys.argv[1])), task_size=1)
class Orphan:
    @staticmethod
    def parallel_func(x):
        time.sleep(0.01)
        return x * 11

project = Orphan()
while sys.argv[2] == "fed" and project.progress.total_tasks is None:
    time.sleep(0.01)
print(project.project_id, flush=True)
time.sleep(60)
"""


def _orphan_a_project(n_items: int, when: str) -> str:
    """A creator process submits range(n_items) and is killed once it has submitted (or, with
    ``when="fed"``, once it has sent every task); the project's id."""
    creator = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT, str(n_items), when],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert creator.stdout is not None
        project_id = creator.stdout.readline().strip()
        assert project_id, "the creator process did not submit its project"
    finally:
        creator.kill()
        creator.wait(timeout=10)
    return project_id


def test_project_of_a_killed_creator_goes_on_and_can_be_attached(
    start_worker: Any, user: User
) -> None:
    start_worker()
    project_id = _orphan_a_project(40, "fed")
    handle = attach(project_id, user_name="home")
    assert handle.project_id == project_id
    assert handle.get_results(timeout=RESULT_TIMEOUT) == {x: x * 11 for x in range(40)}


def test_attaching_with_the_class_resumes_feeding(start_worker: Any, user: User) -> None:
    start_worker()
    project_id = _orphan_a_project(300, "submitted")  # killed while it still fed tasks

    @Distribute(user_name="home", iterator=range(300), task_size=1)
    class Orphan:
        @staticmethod
        def parallel_func(x):
            time.sleep(0.01)
            return x * 11

    handle = Orphan.attach(project_id)
    assert handle.get_results(timeout=RESULT_TIMEOUT) == {x: x * 11 for x in range(300)}
    assert handle.progress.total_items == 300


def _connection_ids(worker: Any) -> list[str]:
    return [
        line.rsplit(" as ", 1)[1].strip()
        for line in worker.log().splitlines()
        if "connected to " in line
    ]


def test_project_survives_a_server_restart(
    make_server: Any, start_worker: Any, config_dir: Path
) -> None:
    first = make_server()
    add_user(home_user(first))
    worker = start_worker(server=first)

    @Distribute(user_name="home", iterator=range(120), task_size=1)
    class Survives:
        @staticmethod
        def parallel_func(x):
            time.sleep(0.02)
            return x * 5

    project = Survives()
    wait_for(lambda: project.progress.tasks_done >= 10, 20, "10 results")
    first.proc.terminate()
    assert first.proc.wait(timeout=10) == 0
    second = make_server(port=first.port, state_dir=first.state_dir)
    assert project.get_results(timeout=RESULT_TIMEOUT) == {x: x * 5 for x in range(120)}
    assert worker.connections() == 2
    first_id, second_id = _connection_ids(worker)
    assert first_id == second_id  # the restarted server still knows the device

    @Distribute(user_name="home", iterator=range(10), task_size=2)
    class After:
        @staticmethod
        def parallel_func(x):
            return x + 1

    assert After().get_results(timeout=RESULT_TIMEOUT) == {x: x + 1 for x in range(10)}
    assert second.alive()


# ---- 14: connection errors -----------------------------------------------------------------------


def _tiny_project(user_name: str) -> type:
    @Distribute(user_name=user_name, iterator=range(3))
    class Tiny:
        @staticmethod
        def parallel_func(x):
            return x

    return Tiny


def test_wrong_token_raises_authentication_failed(server: ServerProcess, user: User) -> None:
    forged = new_token("creator")  # the right name, another secret
    add_user(dataclasses.replace(home_user(server), name="wrong", token=forged))
    with pytest.raises(AuthenticationFailed, match="refused token 'creator'"):
        _tiny_project("wrong")()


def test_wrong_token_worker_exits(start_worker: Any, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.token"
    wrong.write_text(new_token("volunteer"))
    worker = start_worker("--token-file", str(wrong), wait=False)
    assert worker.proc.wait(timeout=20) == 3
    assert "refused token 'volunteer'" in worker.log()


def test_unreachable_server_raises_connection_failed(config_dir: Path) -> None:
    add_user(User(name="nowhere", host="127.0.0.1", port=free_port(), token=new_token("x")))
    with pytest.raises(ConnectionFailed) as caught:
        _tiny_project("nowhere")()
    assert not isinstance(caught.value, AuthenticationFailed)


def test_user_without_token_is_a_configuration_error(server: ServerProcess, user: User) -> None:
    add_user(User(name="notoken", host="127.0.0.1", port=server.port))
    with pytest.raises(ConfigurationError, match="has no token"):
        _tiny_project("notoken")()


def test_unknown_user_raises_unknown_user_error(user: User) -> None:
    with pytest.raises(UnknownUserError, match="no_such_user"):
        _tiny_project("no_such_user")()


# ---- 15: bad input to the server -----------------------------------------------------------------


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[list[p.Message], bool]:
    """Frames the server sends (but Heartbeats) until it closes (True) or ``timeout`` passes."""
    decoder = p.Decoder()
    messages: list[p.Message] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return messages, False
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return messages, False
        except ConnectionResetError:
            return messages, True
        if not data:
            return messages, True
        for body in decoder.feed(data):
            message = p.decode(body)
            if not isinstance(message, p.Heartbeat):
                messages.append(message)


def _raw_connection(server: ServerProcess) -> tuple[socket.socket, p.Challenge]:
    sock = raw_socket(server)
    decoder = p.Decoder()
    while True:
        data = sock.recv(65536)
        assert data, "the server closed before its Challenge"
        bodies = decoder.feed(data)
        if bodies:
            challenge = p.decode(bodies[0])
            assert isinstance(challenge, p.Challenge)
            return sock, challenge


def _authenticated_creator(server: ServerProcess) -> socket.socket:
    sock, challenge = _raw_connection(server)
    sock.sendall(p.encode(hello_for(server, challenge, "creator")))
    decoder = p.Decoder()
    while True:
        data = sock.recv(65536)
        assert data, "the server closed instead of welcoming us"
        bodies = decoder.feed(data)
        if bodies:
            assert isinstance(p.decode(bodies[0]), p.Welcome)
            return sock


BAD_INPUTS = {
    "undecodable body": (p.HEADER.pack(4) + b"\xc1\xc1\xc1\xc1", "bad_frame"),
    "2**31 byte frame": (p.HEADER.pack(2**31), "too_large"),
    "http request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "too_large"),
    "not an array": (p.HEADER.pack(1) + b"\x05", "bad_message"),
    "unknown type": (p.HEADER.pack(2) + b"\x91\x63", "unknown_type"),
    "credit before hello": (p.encode(p.Credit(credit=1)), "unexpected_message"),
}


def test_bad_input_is_refused_and_the_server_keeps_serving(
    server: ServerProcess, start_worker: Any, user: User
) -> None:
    silent, _ = _raw_connection(server)  # never says Hello
    opened = time.monotonic()
    try:
        for label, (data, code) in BAD_INPUTS.items():
            sock, _ = _raw_connection(server)
            with sock:
                sock.sendall(data)
                messages, closed = _read_until_closed(sock, 5)
            assert closed, label
            assert [(type(m), getattr(m, "code", None)) for m in messages] == [(p.Error, code)], (
                label
            )
        with _authenticated_creator(server) as sock:
            sock.sendall(p.HEADER.pack(3) + b"\xc1\xc1\xc1")
            messages, closed = _read_until_closed(sock, 5)
        assert closed
        assert [getattr(m, "code", None) for m in messages] == ["bad_frame"]
        with _authenticated_creator(server) as sock:  # a worker's message from a creator
            sock.sendall(p.encode(p.Credit(credit=1)))
            messages, closed = _read_until_closed(sock, 5)
        assert closed
        assert [getattr(m, "code", None) for m in messages] == ["unexpected_message"]

        assert server.alive()
        start_worker()
        assert _tiny_project("home")().get_results(timeout=RESULT_TIMEOUT) == {0: 0, 1: 1, 2: 2}

        messages, closed = _read_until_closed(
            silent, HANDSHAKE_TIMEOUT + 5 - (time.monotonic() - opened)
        )
        assert closed, "a connection that never said Hello was kept"
        assert [getattr(m, "code", None) for m in messages] == ["handshake_timeout"]
        assert server.alive()
    finally:
        silent.close()


# ---- 16: configuration errors --------------------------------------------------------------------


def test_missing_parallel_function_is_refused_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match="parallel_func"):

        @Distribute(user_name="home", iterator=range(3))
        class NoParallel:
            pass


def test_plain_method_is_refused_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match="staticmethod"):

        @Distribute(user_name="home", iterator=range(3))
        class PlainMethod:
            def parallel_func(self, x):
                return x


@pytest.mark.parametrize(
    "kwargs",
    [
        {"task_size": 0},
        {"errors": "ignore"},
        {"max_attempts": 0},
        {"lease_timeout": -1},
        {"iterator": 42},
        {"stop_func": "missing"},
    ],
    ids=str,
)
def test_bad_distribute_arguments(kwargs: dict[str, Any]) -> None:
    arguments = {"user_name": "home", "iterator": range(3), **kwargs}
    with pytest.raises(ConfigurationError):

        @Distribute(**arguments)
        class Bad:
            @staticmethod
            def parallel_func(x):
                return x


def test_unhashable_items(start_worker: Any, user: User) -> None:
    @Distribute(user_name="home", iterator=[[1], [2]])
    class Lists:
        @staticmethod
        def parallel_func(x):
            return x

    project = Lists()
    with pytest.raises(UnhashableItemError, match="not hashable"):
        project.get_results(timeout=RESULT_TIMEOUT)


def test_unpicklable_item(user: User) -> None:
    @Distribute(user_name="home", iterator=[threading.Lock()])
    class Locks:
        @staticmethod
        def parallel_func(x):
            return x

    with pytest.raises(SerializationError):
        Locks().get_results(timeout=RESULT_TIMEOUT)


def test_unwritable_results_path(user: User, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    @Distribute(user_name="home", iterator=range(3), results_path=blocker / "results")
    class Unwritable:
        @staticmethod
        def parallel_func(x):
            return x

    with pytest.raises(ResultsPathError):
        Unwritable()


def test_unpicklable_class_attribute(user: User) -> None:
    @Distribute(user_name="home", iterator=range(3))
    class HoldsALock:
        lock = threading.Lock()

        @staticmethod
        def parallel_func(x):
            return x

    with pytest.raises(SerializationError, match="HoldsALock"):
        HoldsALock()


def test_unpicklable_return_value(start_worker: Any, user: User) -> None:
    start_worker()

    @Distribute(user_name="home", iterator=range(5))
    class ReturnsALock:
        @staticmethod
        def parallel_func(x):
            return threading.Lock() if x == 3 else x

    with pytest.raises(TaskFailed) as caught:
        ReturnsALock().get_results(timeout=RESULT_TIMEOUT)
    assert caught.value.reason == "unpicklable"
    assert caught.value.item == "3"


HUGE_ITEM_SCRIPT = """
from dcproto import Distribute
from dcproto.protocol import DEFAULT_MAX_FRAME

@Distribute(user_name="home", iterator=[b"x" * (DEFAULT_MAX_FRAME + 2**20)])
class Huge:
    @staticmethod
    def parallel_func(x):
        return len(x)

try:
    Huge().get_results(timeout=6)
except Exception as exc:
    print(type(exc).__name__, exc, flush=True)
"""


def test_item_too_large_for_a_frame_fails_the_project(user: User) -> None:
    # In a creator process of its own: the bug leaves an unretrieved task exception that is
    # logged, traceback and all, from the loop thread at a random moment of this process.
    creator = run([sys.executable, "-c", HUGE_ITEM_SCRIPT])
    assert creator.stdout.startswith("SerializationError"), creator.stdout + creator.stderr


def test_result_too_large_for_a_frame_fails_the_project(start_worker: Any, user: User) -> None:
    start_worker()

    @Distribute(user_name="home", iterator=[1, 2, 3], task_size=1)
    class HugeResult:
        @staticmethod
        def parallel_func(x):
            return b"y" * (p.DEFAULT_MAX_FRAME + 2**20) if x == 2 else x

    with pytest.raises(TaskFailed):
        HugeResult().get_results(timeout=6)


def test_every_public_name_is_importable() -> None:
    assert [name for name in dcproto.__all__ if not hasattr(dcproto, name)] == []


# ---- 17: the embedded default --------------------------------------------------------------------


def test_embedded_default_runs_locally(tmp_path: Path) -> None:
    out = tmp_path / "results"

    @Distribute(iterator=range(50), task_size=3, local_workers=2, results_path=out)
    class Local:
        @staticmethod
        def parallel_func(x):
            return x + 1

    expected = {x: x + 1 for x in range(50)}
    assert Local().get_results(timeout=RESULT_TIMEOUT) == expected
    assert load_results(out) == expected


@dataclasses.dataclass(frozen=True)
class Point:
    """A class defined in the creator's code: it must travel by value, as items and values."""

    x: int
    y: int


def test_items_and_values_of_the_creators_own_classes() -> None:
    items = [Point(i, -i) for i in range(12)] + list(range(4))  # plain and custom, mixed tasks

    @Distribute(iterator=items, task_size=3, local_workers=2)
    class Points:
        @staticmethod
        def parallel_func(p):
            return Point(p.y, p.x) if isinstance(p, Point) else p * 10

    expected = {p: (Point(p.y, p.x) if isinstance(p, Point) else p * 10) for p in items}
    assert Points().get_results(timeout=RESULT_TIMEOUT) == expected


# ---- 18: the command line ------------------------------------------------------------------------


def test_users_command_line(server: ServerProcess, config_dir: Path) -> None:
    token = server.add_token("creator", "creator")
    pin = ["--fingerprint", server.fingerprint]
    added = run([*DCPROTO, "users", "add", "lab", server.address, "--token", token, *pin])
    assert added.returncode == 0, added.stderr
    assert "added lab" in added.stdout
    lab = get_user("lab")
    assert lab == User(
        name="lab", host="127.0.0.1", port=server.port, token=token, fingerprint=server.fingerprint
    )
    assert lab.token == token
    listed = run([*DCPROTO, "users", "list"])
    assert listed.returncode == 0, listed.stderr
    assert f"lab\t{server.address}\ttoken creator\tpinned" in listed.stdout.splitlines()
    removed = run([*DCPROTO, "users", "remove", "lab"])
    assert removed.returncode == 0, removed.stderr
    assert "lab" not in load_users()
    again = run([*DCPROTO, "users", "remove", "lab"])
    assert again.returncode == 2
    assert "no user named 'lab'" in again.stderr
    assert "no users" in run([*DCPROTO, "users", "list"]).stdout


def test_worker_by_alias_and_interactive_menu(server: ServerProcess, user: User) -> None:
    @Distribute(user_name="home", iterator=range(5), task_size=1)
    class Five:
        @staticmethod
        def parallel_func(x):
            time.sleep(0.05)
            return x * 10

    project = Five()

    by_alias = run([*DCPROTO_WORKER, "connect", "home", "--tasks", "3"])
    assert by_alias.returncode == 0, by_alias.stderr
    assert "3 tasks done" in by_alias.stdout
    assert get_user("home").device_id  # the server's device id was remembered

    menu = run(DCPROTO_WORKER, input="home\nhelp\ntask\n2\nexit\n")
    assert menu.returncode == 0, menu.stderr
    assert "commands:" in menu.stdout  # the help text
    assert "2 tasks done" in menu.stdout

    assert project.get_results(timeout=RESULT_TIMEOUT) == {x: x * 10 for x in range(5)}
    assert sorted(project.stats["per_worker"].values()) == [2, 3]
