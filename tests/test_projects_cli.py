"""``dcproto projects list|results|cancel`` against a real server, real workers and real creator
processes; the command line runs as a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, wait_for

from dcproto import Distribute, load_results
from dcproto.cli import format_projects
from dcproto.users import User

pytestmark = pytest.mark.timeout(120)

DCPROTO = [sys.executable, "-m", "dcproto.cli"]
RESULT_TIMEOUT = 60.0  # bound on every wait for a project: generous, only against hangs

CREATOR_SCRIPT = """
import sys, time
from dcproto import Distribute

SLEEP = float(sys.argv[3])  # a global: it travels with the class

@Distribute(user_name="home", iterator=range(int(sys.argv[1])), task_size=1)
class Orphan:
    @staticmethod
    def parallel_func(x):
        time.sleep(SLEEP)
        return x * 11

project = Orphan()
while sys.argv[2] == "fed" and project.progress.total_tasks is None:
    time.sleep(0.01)
print(project.project_id, flush=True)
time.sleep(60)
"""


def dcproto(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DCPROTO, *args], capture_output=True, text=True, timeout=90, env=env, check=False
    )


def orphan(n_items: int, when: str, sleep: float = 0.01) -> str:
    """A creator process submits range(n_items) as project Orphan and is killed once it has
    submitted (``when="submitted"``: still sending items) or sent every item (``"fed"``)."""
    creator = subprocess.Popen(
        [sys.executable, "-c", CREATOR_SCRIPT, str(n_items), when, str(sleep)],
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


def listed(*target: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``dcproto projects list``: its lines by project id (the header under "ID")."""
    result = dcproto("projects", "list", *target, env=env)
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line for line in result.stdout.splitlines()}


def orphan_class() -> type:
    @Distribute(user_name="home", iterator=range(300), task_size=1)
    class Orphan:
        @staticmethod
        def parallel_func(x):
            time.sleep(0.01)
            return x * 11

    return Orphan


# ---- list ----------------------------------------------------------------------------------------


def test_list_has_a_header_and_counts_tasks_done_of_all(
    server: ServerProcess, start_worker: Any, user: User
) -> None:
    start_worker()

    @Distribute(user_name="home", iterator=range(12), task_size=3)
    class Twelve:
        @staticmethod
        def parallel_func(x):
            return x

    done = Twelve()
    assert done.get_results(timeout=RESULT_TIMEOUT) == {x: x for x in range(12)}
    unfed = orphan(300, "submitted", sleep=0.05)

    lines = listed("--user", "home")
    assert lines["ID"].split() == ["ID", "STATUS", "SUBMITTED", "TASKS", "NAME"]
    assert done.project_id is not None
    assert lines[done.project_id].split()[1] == "done"
    assert "4/4 tasks done" in lines[done.project_id]
    assert lines[done.project_id].endswith("Twelve")
    # its creator is still sending (here: gone while sending): no total yet, only what came
    assert lines[unfed].split()[1] == "running"
    assert "+ tasks done" in lines[unfed]

    # the same server by address, as dcproto-worker connect takes it: --token-file, then
    # $DCPROTO_TOKEN (the same creator token, so the same projects)
    token_file = server.token_file("creator", "creator")
    pin = ["--fingerprint", server.fingerprint]
    by_address = listed("--server", server.address, "--token-file", str(token_file), *pin)
    assert by_address.keys() == lines.keys()
    env = {**os.environ, "DCPROTO_TOKEN": server.add_token("creator", "creator")}
    assert listed("--server", server.address, *pin, env=env).keys() == lines.keys()
    # with no token for an address, a clear error, not a traceback
    nothing = dcproto("projects", "list", "--server", server.address, *pin)
    assert nothing.returncode != 0
    assert "Traceback" not in nothing.stderr and "token" in nothing.stderr

    # the server's rows carry no tasks_done yet: where one does, it is shown as it is
    row = {"project_id": "p1", "status": "running", "submitted_at": time.time(), "name": "N"}
    lines_out = format_projects([{**row, "total_tasks": 40, "tasks_done": 12}])
    assert "12/40 tasks done" in lines_out[1]


# ---- results -------------------------------------------------------------------------------------


def test_results_never_ends_a_project_its_creator_had_not_fed_completely(
    start_worker: Any, user: User, tmp_path: Path
) -> None:
    """The creator is killed while still sending items: ``projects results`` must not end the
    project with the items that happen to be on the server (it sent End for them, once: the
    project was then done with a quarter of its items, and exit 0)."""
    start_worker()
    project_id = orphan(300, "submitted")
    out = tmp_path / "out"
    refused = dcproto("projects", "results", project_id, "--user", "home", "--out", str(out))
    assert refused.returncode != 0
    assert "not complete on the server" in refused.stderr
    assert f"Orphan.attach('{project_id}'" in refused.stderr  # how to go on
    assert "Traceback" not in refused.stderr
    assert not out.exists()
    assert listed("--user", "home")[project_id].split()[1] == "running"
    # re-attached with the class (its iterator), the project gets every item: nothing ended it
    handle = orphan_class().attach(project_id)
    assert handle.get_results(timeout=RESULT_TIMEOUT) == {x: x * 11 for x in range(300)}
    assert handle.progress.total_items == 300


def test_results_waits_for_a_project_whose_items_are_all_on_the_server(
    start_worker: Any, user: User, tmp_path: Path
) -> None:
    start_worker()
    project_id = orphan(40, "fed", sleep=0.05)  # every item sent; most still to run
    out = tmp_path / "out"
    fetched = dcproto("projects", "results", project_id, "--user", "home", "--out", str(out))
    assert fetched.returncode == 0, fetched.stderr
    assert f"40 results of {project_id} written to {out}/" in fetched.stdout
    assert load_results(out) == {x: x * 11 for x in range(40)}
    assert listed("--user", "home")[project_id].split()[1] == "done"


def test_results_timeout_is_a_one_line_error(user: User, tmp_path: Path) -> None:
    project_id = orphan(5, "fed")  # no worker: it cannot finish
    out = tmp_path / "out"
    waited = dcproto(
        "projects", "results", project_id, "--user", "home", "--out", str(out), "--timeout", "1"
    )
    assert waited.returncode == 1
    assert waited.stderr.strip().splitlines() == [
        f"dcproto: project {project_id} has not finished within 1 s; it goes on on the "
        "server: run this again to wait for it"
    ]
    assert listed("--user", "home")[project_id].split()[1] == "running"


# ---- cancel --------------------------------------------------------------------------------------


def test_cancel(server: ServerProcess, user: User, tmp_path: Path) -> None:
    fed = orphan(5, "fed")  # no worker: both stay running until cancelled
    unfed = orphan(300, "submitted")
    cancelled = dcproto("projects", "cancel", fed, "--user", "home")
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"cancelled {fed}"
    # by address, with the token in $DCPROTO_TOKEN; a project its creator had not fed
    # completely can be cancelled too
    env = {**os.environ, "DCPROTO_TOKEN": server.add_token("creator", "creator")}
    pin = ["--fingerprint", server.fingerprint]
    by_address = dcproto("projects", "cancel", unfed, "--server", server.address, *pin, env=env)
    assert by_address.returncode == 0, by_address.stderr
    assert by_address.stdout.strip() == f"cancelled {unfed}"
    lines = listed("--user", "home")
    assert lines[fed].split()[1] == lines[unfed].split()[1] == "cancelled"

    again = dcproto("projects", "cancel", fed, "--user", "home")
    assert again.returncode == 1
    assert f"{fed} had already ended (cancelled)" in again.stderr
    results = dcproto("projects", "results", fed, "--user", "home", "--out", str(tmp_path / "o"))
    assert results.returncode != 0
    assert "cancelled" in results.stderr and "Traceback" not in results.stderr


def test_cancel_of_a_finished_project_leaves_its_results(
    start_worker: Any, user: User, tmp_path: Path
) -> None:
    start_worker()
    project_id = orphan(6, "fed")
    wait_for(
        lambda: listed("--user", "home")[project_id].split()[1] == "done",
        RESULT_TIMEOUT,
        "the project to finish",
    )
    late = dcproto("projects", "cancel", project_id, "--user", "home")
    assert late.returncode == 1
    assert "had already ended (done)" in late.stderr
    out = tmp_path / "out"
    fetched = dcproto("projects", "results", project_id, "--user", "home", "--out", str(out))
    assert fetched.returncode == 0, fetched.stderr
    assert load_results(out) == {x: x * 11 for x in range(6)}
