"""The creator library against a real server and real workers: a shared connection that gives
up, iterators used by more than one Project(), stats.json, load_results, remote tracebacks that
name the user's file, Ctrl-C, and errors of the iterator."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, server_user, wait_for

from dcproto import ConnectionFailed, DcprotoError, Distribute, load_results
from dcproto.errors import UsageError
from dcproto.users import User, add_user

pytestmark = pytest.mark.timeout(120)

RESULT_TIMEOUT = 60.0  # bound on every wait: generous, only against hangs


def home_user(server: ServerProcess) -> User:
    return server_user(server, "home", server.add_token("creator", "creator"))


def _quick() -> type:
    @Distribute(user_name="home", iterator=range(6), task_size=2)
    class Quick:
        @staticmethod
        def parallel_func(x):
            return x * 3

    return Quick


# ---- 3: a shared connection that gives up --------------------------------------------------------


def test_project_waiting_on_a_connection_that_gives_up_fails_and_the_next_one_connects(
    make_server: Any, start_worker: Any, config_dir: Path
) -> None:
    """A Project() that waits for the shared connection to come back gets its error once that
    connection gives up (it waited for ever before, holding the per-server lock, so every later
    Project() for the server failed after 60 s), and a Project() after the restart connects."""
    first = make_server()
    add_user(home_user(first))
    start_worker(server=first)

    @Distribute(user_name="home", iterator=range(40), task_size=1, reconnect_timeout=2.0)
    class Holder:
        @staticmethod
        def parallel_func(x):
            time.sleep(0.2)
            return x

    holder = Holder()
    wait_for(lambda: holder.progress.tasks_done >= 1, RESULT_TIMEOUT, "a first result")
    first.proc.terminate()
    assert first.proc.wait(timeout=10) == 0
    client = holder._run.client
    assert client is not None
    wait_for(lambda: not client.connected.is_set(), RESULT_TIMEOUT, "the creator to notice")

    outcome: dict[str, Any] = {}

    def submit() -> None:  # waits on the reconnecting connection
        try:
            outcome["project"] = _quick()()
        except BaseException as exc:
            outcome["error"] = exc

    waiter = threading.Thread(target=submit, daemon=True)
    waiter.start()
    waiter.join(timeout=45)  # less than the 60 s after which Project() gives up by itself
    assert not waiter.is_alive(), "Project() still waits on a connection that gave up"
    assert isinstance(outcome.get("error"), ConnectionFailed), outcome
    assert "timed out reaching the server" not in str(outcome["error"])
    with pytest.raises(ConnectionFailed):
        holder.get_results(timeout=RESULT_TIMEOUT)

    make_server(port=first.port, state_dir=first.state_dir)
    assert _quick()().get_results(timeout=RESULT_TIMEOUT) == {x: x * 3 for x in range(6)}


# ---- 5: iterators --------------------------------------------------------------------------------


def test_generator_iterator_serves_one_project_and_a_function_serves_each(
    start_worker: Any, user: User
) -> None:
    start_worker()

    def items():
        yield from range(20)

    @Distribute(user_name="home", iterator=items(), task_size=4)
    class Once:
        @staticmethod
        def parallel_func(x):
            return -x

    assert Once().get_results(timeout=RESULT_TIMEOUT) == {x: -x for x in range(20)}
    with pytest.raises(UsageError, match=r"iterator=lambda"):
        Once()  # it would run on nothing

    for source in (lambda: items(), items):  # a fresh generator for each Project()

        @Distribute(user_name="home", iterator=source, task_size=4)
        class Each:
            @staticmethod
            def parallel_func(x):
                return x + 1

        first, second = Each(), Each()
        expected = {x: x + 1 for x in range(20)}
        assert first.get_results(timeout=RESULT_TIMEOUT) == expected
        assert second.get_results(timeout=RESULT_TIMEOUT) == expected
        assert first.project_id != second.project_id


# ---- 7, 8: stats.json and load_results -----------------------------------------------------------


def test_stats_of_a_stopped_project_agree_and_carry_iso_times(
    start_worker: Any, user: User, tmp_path: Path
) -> None:
    start_worker()
    out = tmp_path / "stopped"

    @Distribute(
        user_name="home",
        iterator=range(200),
        task_size=5,
        results_path=out,
        stop_func="stop",
        only_if_func="even",
    )
    class Stops:
        @staticmethod
        def parallel_func(x):
            time.sleep(0.005)
            return x

        @staticmethod
        def stop(value):
            return value == 120

        @staticmethod
        def even(value):
            return value % 2 == 0

    project = Stops()
    assert project.get_results(timeout=RESULT_TIMEOUT) == {120: 120}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status"] == "stopped"
    # the stopping task counts as done, as on the server (it used to be left out here)
    assert stats["tasks_done"] == sum(stats["per_worker_tasks"].values())
    assert stats["tasks_done"] == project.stats["tasks_done"]
    assert stats["items_done"] == project.stats["items_done"]
    # only what the results hold: the values kept before the stop were dropped with it
    assert stats["items_kept"] == 1
    assert project.progress.tasks_done == stats["tasks_done"]
    for name in ("submitted_at", "first_started_at", "finished_at"):
        iso = stats[f"{name}_utc"]
        assert iso.endswith("Z")
        parsed = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
        assert parsed.utcoffset() == datetime.timedelta(0)
        assert abs(parsed.timestamp() - stats[name]) < 1e-3  # the numbers stay beside them
    assert load_results(out) == {120: 120}
    assert load_results(out / "results.pickle") == {120: 120}  # the file itself, too
    assert load_results(str(out / "results.pickle")) == {120: 120}
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "nothing-here")


# ---- 9: remote tracebacks name the user's file ---------------------------------------------------

FAULTY_SCRIPT = """\
from dcproto import Distribute, TaskFailed

@Distribute(user_name="home", iterator=range(6), task_size=2)
class Faulty:
    @staticmethod
    def parallel_func(x):
        if x == 4:
            raise ValueError(f"cannot handle {x}")
        return x

try:
    Faulty().get_results(60)
except TaskFailed as exc:
    print(exc)
"""


def test_remote_traceback_names_the_users_file_and_line(
    start_worker: Any, user: User, tmp_path: Path
) -> None:
    start_worker("--sandbox", "off")  # the line is read from the script under /tmp
    script = tmp_path / "my_project.py"
    script.write_text(FAULTY_SCRIPT)
    line = FAULTY_SCRIPT.splitlines().index('            raise ValueError(f"cannot handle {x}")')
    ran = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert f'File "{script}", line {line + 1}, in parallel_func' in ran.stdout
    assert 'raise ValueError(f"cannot handle {x}")' in ran.stdout  # the worker read the line
    assert "ValueError: cannot handle 4" in ran.stdout
    assert "<dynamic-code>" not in ran.stdout


HELPER_MODULE = """\
import math

class Squares:
    @staticmethod
    def parallel_func(x):
        return [x, square(x)]

def square(x):
    return math.prod([x, x])
"""

SUBCLASS_SCRIPT = """\
from dcproto import Distribute
import shapes

@Distribute(user_name="home", iterator=range(5), task_size=2)
class Job(shapes.Squares):
    pass

print(sorted(Job().get_results(60).items()))
"""


def test_a_project_class_based_on_the_users_own_module_travels_with_it(
    start_worker: Any, user: User, tmp_path: Path
) -> None:
    """The worker cannot import ``shapes`` (it lives beside the user's script only): the base
    class and the function it calls travel by value with the project."""
    start_worker()
    (tmp_path / "shapes.py").write_text(HELPER_MODULE)
    script = tmp_path / "job.py"
    script.write_text(SUBCLASS_SCRIPT)
    ran = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == str([(x, [x, x * x]) for x in range(5)])


# ---- 10: Ctrl-C, and the iterator's own errors ---------------------------------------------------

INTERRUPTED_SCRIPT = """\
import sys, time
from dcproto import Distribute

@Distribute(user_name=sys.argv[1] or None, iterator=range(1000), task_size=1, local_workers=1)
class Slow:
    @staticmethod
    def parallel_func(x):
        time.sleep(0.05)
        return x

project = Slow()
print(project.project_id, flush=True)
project.get_results()
"""


@pytest.mark.parametrize("user_name", ["home", ""])
def test_ctrl_c_of_a_creator_exits_cleanly(
    start_worker: Any, user: User, tmp_path: Path, user_name: str
) -> None:
    if user_name:
        start_worker()
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_SCRIPT)
    creator = subprocess.Popen(
        [sys.executable, str(script), user_name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal, whatever the test runner does with SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert creator.stdout is not None
        project_id = creator.stdout.readline().strip()
        assert project_id
        time.sleep(1)  # into get_results()
        creator.send_signal(signal.SIGINT)
        _, stderr = creator.communicate(timeout=60)
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.wait(timeout=10)
    assert creator.returncode in (130, -signal.SIGINT), stderr
    assert "Task was destroyed" not in stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dcproto: interrupted"), stderr
    if user_name:  # the project goes on on the server: say how to get it
        assert project_id in lines[0]


def test_an_error_of_the_iterator_is_chained_to_its_traceback(
    start_worker: Any, user: User
) -> None:
    start_worker()

    def rows():
        yield from range(12)
        raise KeyError("row 12 is missing")

    @Distribute(user_name="home", iterator=rows(), task_size=4)
    class FromRows:
        @staticmethod
        def parallel_func(x):
            return x

    with pytest.raises(DcprotoError, match="row 12 is missing") as caught:
        FromRows().get_results(timeout=RESULT_TIMEOUT)
    cause = caught.value.__cause__
    assert isinstance(cause, KeyError)
    text = "".join(traceback.format_exception(caught.value))
    assert "The above exception was the direct cause" in text
    assert f'File "{__file__}"' in text and ", in rows" in text  # the generator's frame
    assert 'raise KeyError("row 12 is missing")' in text
    assert os.path.basename(__file__) in "".join(traceback.format_tb(cause.__traceback__))
