"""Project() once this process's connection to the server is up: it starts the project on the
client loop without waiting for it, yet a Submit the server would refuse still fails there,
and a failure after it returned reaches results() instead of hanging."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ServerProcess, server_user

from dcproto import Distribute
from dcproto.errors import LocalProtocolError, ResultsPathError
from dcproto.users import add_user

RESULT_TIMEOUT = 60


class Doubles:
    @staticmethod
    def parallel_func(x: int) -> int:
        return 2 * x


def project_class(name: str = "Doubles", **options: object) -> type:
    return Distribute(user_name="home", iterator=range(5), task_size=1, **options)(
        type(name, (Doubles,), {})
    )


@pytest.fixture
def connected(server: ServerProcess, start_worker: object, config_dir: Path) -> object:
    """A server with a worker, and this process's connection to it up (a first project ran)."""
    add_user(server_user(server, "home", server.add_token("creator", "creator")))
    start_worker(server=server)  # type: ignore[operator]
    first = project_class()()
    assert first.get_results(timeout=RESULT_TIMEOUT) == {x: 2 * x for x in range(5)}
    return first


def test_a_project_on_a_connection_already_up_has_its_id_at_once_and_its_results(
    connected: object,
) -> None:
    projects = [project_class()() for _ in range(5)]
    for project in projects:  # the ids are ours, set before Project() returned
        assert re.fullmatch(r"[0-9a-f]{32}", project.project_id or ""), project.project_id
        assert project._run.client is connected._run.client  # type: ignore[attr-defined]
    assert len({project.project_id for project in projects}) == 5
    for project in projects:
        assert project.get_results(timeout=RESULT_TIMEOUT) == {x: 2 * x for x in range(5)}


def test_a_submit_the_server_would_refuse_still_fails_in_project(connected: object) -> None:
    too_long = "N" * 300  # a project name is at most 200 characters on the wire
    with pytest.raises(LocalProtocolError, match="name"):
        project_class(too_long)()


def test_a_failure_after_project_returned_fails_its_results(
    connected: object, tmp_path: Path
) -> None:
    results_path = tmp_path / "out"
    (results_path / "project_id").mkdir(parents=True)  # the id file cannot be written
    project = project_class(results_path=str(results_path))()
    with pytest.raises(ResultsPathError, match="project_id"):
        project.get_results(timeout=RESULT_TIMEOUT)
    # the connection is unharmed: the next project runs
    assert project_class()().get_results(timeout=RESULT_TIMEOUT) == {x: 2 * x for x in range(5)}
