"""``dcproto workers list``: the server's view of its workers, against a real server and a
real worker; volunteers' details go to admins only."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from conftest import ServerProcess, WorkerProcess, wait_for

from dcproto.users import User, add_user

DCPROTO = [sys.executable, "-m", "dcproto.cli"]


def named(server: ServerProcess, name: str, token: str) -> None:
    add_user(User(name=name, host="127.0.0.1", port=server.port, token=token,
                  fingerprint=server.fingerprint))  # fmt: skip


def listing(name: str) -> list[list[str]]:
    shown = subprocess.run(
        [*DCPROTO, "workers", "list", "--user", name], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    return [line.split() for line in shown.stdout.splitlines()]


def _with_rows(lines: list[list[str]], count: int) -> list[list[str]] | None:
    return lines if len(lines) == count + 1 else None


def test_workers_list_shows_each_worker_and_its_usage_to_admins_only(
    server: ServerProcess, user: User, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker()
    named(server, "boss", server.token)  # the admin token
    header, *rows = wait_for(lambda: _with_rows(listing("boss"), 1), 30, "the worker row")
    assert header[:6] == ["NAME", "SLOTS", "STATE", "RUNNING", "HELD", "DONE"]
    assert rows[0][:3] == [worker.name, "2", "running"]
    assert rows[0][-1] == "all"  # trusts every creator
    # a creator sees that the worker exists, not its volunteer's figures
    _, *seen = listing("home")
    assert seen[0][:3] == [worker.name, "2", "running"]
    assert seen[0][-3:] == ["-", "-", "-"]
