"""``dcproto status`` (ServerInfo, WorkerList and ProjectList in one view, as the token's role
may see them), ``--json`` on the listings, and the server's and the worker's
``--log-format json``."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, WorkerProcess, wait_for

from dcproto import Distribute
from dcproto.cli import format_status, project_figures
from dcproto.logs import configure_logging
from dcproto.users import User, add_user

pytestmark = pytest.mark.timeout(90)

DCPROTO = [sys.executable, "-m", "dcproto.cli"]


def dcproto(*args: str) -> str:
    done = subprocess.run([*DCPROTO, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def named(server: ServerProcess, name: str, token: str) -> None:
    add_user(User(name=name, host="127.0.0.1", port=server.port, token=token,
                  fingerprint=server.fingerprint))  # fmt: skip


def run_project(name: str = "home") -> str:
    @Distribute(user_name=name, iterator=range(30), task_size=4)
    class Doubles:
        @staticmethod
        def parallel_func(x: int) -> int:
            return 2 * x

    project = Doubles()
    assert project.get_results(60, progress=False) == {x: 2 * x for x in range(30)}
    assert project.project_id is not None
    return project.project_id


def test_status_follows_the_callers_role(
    server: ServerProcess, user: User, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker()
    project_id = run_project()
    named(server, "boss", server.token)  # the admin token
    named(server, "other", server.add_token("other", "creator"))

    mine = json.loads(dcproto("status", "--user", "home", "--json"))
    assert set(mine) == {"server", "workers", "projects"}
    info = mine["server"]
    assert info["fingerprint"] == server.fingerprint
    assert info["tls"] is True
    assert info["role"] == "creator" and info["identity"] == "creator"
    assert info["version"] and info["protocol"] >= 1
    assert info["uptime"] >= 0 and info["workers"] == 1 and info["slots"] == 2
    assert [w["name"] for w in mine["workers"]] == [worker.name]
    assert "usage" not in mine["workers"][0]  # volunteers' figures: admins only
    assert mine["workers"][0]["last_seen"] >= 0
    [project] = mine["projects"]
    assert project["project_id"] == project_id and project["status"] == "done"
    assert project["items_done"] == 30 and project["total_items"] == 30
    assert project["fraction"] == 1.0 and project["eta"] is None
    assert project["rate"] is not None and project["rate"] > 0
    assert project["first_started_at"] >= project["submitted_at"]

    admin = json.loads(dcproto("status", "--user", "boss", "--json"))
    assert admin["server"]["role"] == "admin"
    assert "usage" in admin["workers"][0] and admin["workers"][0]["identity"] == "volunteer"
    assert [p["project_id"] for p in admin["projects"]] == [project_id]

    other = json.loads(dcproto("status", "--user", "other", "--json"))
    assert other["projects"] == []  # not its project
    assert other["server"]["projects_running"] == 0

    text = dcproto("status", "--user", "home")
    assert f"certificate {server.fingerprint}" in text
    assert "creator (creator token)" in text
    assert worker.name in text and project_id in text and "30/30 (100%)" in text


def test_status_by_address_with_a_token_file(
    server: ServerProcess, config_dir: Path, tmp_path: Path
) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(server.token + "\n", encoding="utf-8")
    text = dcproto(
        "status",
        "--server",
        f"127.0.0.1:{server.port}",
        "--token-file",
        str(token_file),
        "--fingerprint",
        server.fingerprint,
    )
    assert "admin token" in text and "no workers connected" in text and "no projects" in text


def test_listings_as_json(
    server: ServerProcess, user: User, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker()
    project_id = run_project()
    projects = json.loads(dcproto("projects", "list", "--user", "home", "--json"))
    assert [(p["project_id"], p["status"]) for p in projects] == [(project_id, "done")]
    workers = json.loads(dcproto("workers", "list", "--user", "home", "--json"))
    assert [w["name"] for w in workers] == [worker.name]
    users = json.loads(dcproto("users", "list", "--json"))
    assert [(u["name"], u["port"], u["token"]) for u in users] == [("home", server.port, "creator")]
    assert user.token is not None and user.token not in json.dumps(users)  # never the secret
    tokens = json.loads(dcproto("tokens", "list", "--state-dir", str(server.state_dir), "--json"))
    roles = {t["name"]: t["role"] for t in tokens}
    assert roles["creator"] == "creator" and roles["volunteer"] == "worker"
    assert all(isinstance(t["created_at"], float) for t in tokens)


def test_project_figures() -> None:
    running = {
        "status": "running",
        "submitted_at": 1000.0,
        "first_started_at": 1010.0,
        "items_done": 50,
        "total_items": 100,
    }
    assert project_figures(running, now=1020.0) == {"rate": 5.0, "eta": 10.0, "fraction": 0.5}
    feeding = {**running, "total_items": None}  # the total is not known yet
    assert project_figures(feeding, now=1020.0) == {"rate": 5.0, "eta": None, "fraction": None}
    waiting = {**running, "first_started_at": None, "items_done": 0}
    assert project_figures(waiting, now=1020.0) == {"rate": None, "eta": None, "fraction": 0.0}
    done = {**running, "status": "done", "finished_at": 1030.0, "items_done": 100}
    assert project_figures(done, now=5000.0) == {"rate": 5.0, "eta": None, "fraction": 1.0}


def test_format_status_shows_what_it_is_given() -> None:
    info: dict[str, Any] = {
        "version": "9.9",
        "protocol": 1,
        "uptime": 3725,
        "address": "0.0.0.0:7777",
        "connected_to": "example.org:7777",
        "tls": True,
        "fingerprint": "sha256:ab",
        "identity": "alice",
        "role": "admin",
        "workers": 1,
        "slots": 4,
        "slots_busy": 3,
        "creators": 2,
        "projects_running": 1,
    }
    workers = [
        {"name": "w1", "slots": 4, "running": 3, "held": 4, "done": 17, "last_seen": 0.4,
         "paused": False, "usage": {"cpu_percent": 97.2, "rss_bytes": 300 * 2**20}},
    ]  # fmt: skip
    projects = [
        {"project_id": "abc", "name": "Squares", "owner": "alice", "status": "running",
         "items_done": 50, "total_items": 200, "tasks_reissued": 2, "rate": 5.0, "eta": 30.0,
         "fraction": 0.25},
    ]  # fmt: skip
    lines = format_status(info, workers, projects)
    text = "\n".join(lines)
    assert "0.0.0.0:7777 (reached at example.org:7777), dcproto 9.9" in text
    assert "up 1h02m" in text and "certificate sha256:ab" in text
    assert "slots busy 3 of 4" in text
    header = next(line for line in lines if line.startswith("WORKER"))
    assert header.split() == ["WORKER", "SLOTS", "BUSY", "HELD", "DONE", "LAST", "SEEN",
                              "STATE", "CPU%", "RSS"]  # fmt: skip
    assert next(line for line in lines if line.startswith("w1")).split() == [
        "w1", "4", "3", "4", "17", "0s", "ago", "running", "97", "300M"
    ]  # fmt: skip
    assert next(line for line in lines if line.startswith("abc")).split() == [
        "abc", "Squares", "alice", "running", "50/200", "(25%)", "5.0/s", "30s", "2"
    ]  # fmt: skip
    old = format_status({"error": "no ServerInfo", "connected_to": "h:1"}, [], [])
    assert old[0] == "server    h:1: no ServerInfo"


# ---- --log-format json ---------------------------------------------------------------------------


def test_json_log_lines() -> None:
    out = io.StringIO()
    try:
        configure_logging("DEBUG", "json", stream=out)
        log = logging.getLogger("dcproto.test")
        log.info("project %s done", "p1", extra={"project_id": "p1", "items": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        configure_logging("WARNING", "text")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "INFO" and first["logger"] == "dcproto.test"
    assert first["message"] == "project p1 done"
    assert first["project_id"] == "p1" and first["items"] == 3
    assert first["ts"].endswith("Z")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc_info"]
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "xml")


def test_the_server_logs_json_lines(
    make_server: Callable[..., ServerProcess], start_worker: Callable[..., WorkerProcess]
) -> None:
    server = make_server(extra=["--log-format", "json"])
    start_worker(server=server)  # something to log
    lines = wait_for(lambda: server.log().splitlines(), 10, "a log line")
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "logger", "message"} <= set(entry)


def test_the_worker_logs_json_lines(start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("--log-format", "json")  # returns once it logged "connected to"
    entries = [json.loads(line) for line in worker.log().splitlines()]
    for entry in entries:
        assert {"ts", "level", "logger", "message"} <= set(entry)
    assert any(entry["message"].startswith("connected to ") for entry in entries)
