"""A volunteer's worker against hostile tasks, end to end: a real server, one real 1-slot
``dcproto-worker`` with the default sandbox and the volunteer's caps, and creator projects
whose tasks attack it. Each attack is refused or contained with a reason the creator sees, and
an honest project on the same worker is still exact afterwards.

The honest project of each test runs *after* the attack on the same one-slot worker: what the
attack left behind would show there.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, WorkerProcess, add_server_user, wait_for

from dcproto import Distribute, TaskFailed
from dcproto.users import User
from dcproto.worker import control
from dcproto.worker.sandbox import SandboxOptions, SandboxUnavailable, probe

TIMEOUT = 120.0
CAPS = ("--max-memory", "300M", "--max-task-seconds", "3", "--max-disk", "4M")


def bwrap_works() -> bool:
    try:
        return probe(SandboxOptions(mode="required")).bwrap is not None
    except SandboxUnavailable:
        return False


needs_bwrap = pytest.mark.skipif(not bwrap_works(), reason="bubblewrap cannot run here")


def assert_sandboxed(worker: WorkerProcess) -> None:
    """Where bubblewrap works for this process, the worker must have it too (a worker whose
    code lies under a hidden root once fell back to no sandbox)."""
    assert "sandbox: bubblewrap" in worker.log(), worker.log()


SECRET = "s3cret-of-the-volunteer"


@pytest.fixture
def volunteer(
    server: ServerProcess,
    user: User,
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> WorkerProcess:
    """One 1-slot worker with the default sandbox (auto) and the volunteer's caps, started
    with secrets in its environment."""
    monkeypatch.setenv("DCPROTO_SECRET", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    return start_worker("--slots", "1", *CAPS)


class Honest:
    @staticmethod
    def parallel_func(x: int) -> int:
        return x * x + 1


def submit(cls: type, items: list[Any], user_name: str = "home", **options: Any) -> Any:
    named = type(f"{cls.__name__}{time.monotonic_ns()}", (cls,), {})
    options.setdefault("max_attempts", 1)  # one worker: a retry would meet the same cap
    return Distribute(user_name=user_name, iterator=items, task_size=1, **options)(named)()


def honest_project_is_exact(user_name: str = "home") -> None:
    items = list(range(40))
    results = submit(Honest, items, user_name).get_results(timeout=TIMEOUT)
    assert results == {x: x * x + 1 for x in items}


def failure_of(cls: type, items: list[Any] | None = None, **options: Any) -> TaskFailed:
    project = submit(cls, items or [1], **options)
    with pytest.raises(TaskFailed) as failed:
        project.get_results(timeout=TIMEOUT)
    return failed.value


# ---- what a task can see -----------------------------------------------------------------------


class Snoop:
    @staticmethod
    def parallel_func(_: int) -> dict[str, Any]:
        import os

        return {"env": dict(os.environ), "uid": os.getuid()}


@needs_bwrap
def test_a_task_sees_no_credential_and_cannot_read_the_workers_config(
    volunteer: WorkerProcess, server: ServerProcess, config_dir: Path
) -> None:
    assert_sandboxed(volunteer)
    secret_files = [str(server.token_file()), str(config_dir / "users.toml")]
    assert all(os.path.exists(path) for path in secret_files)

    class Reader:
        @staticmethod
        def parallel_func(path: str) -> Any:
            try:
                with open(path, "rb") as file:
                    return ["read", len(file.read())]
            except OSError as exc:
                return ["refused", type(exc).__name__]

    results = submit(Reader, secret_files).get_results(timeout=TIMEOUT)
    assert {path: value[0] for path, value in results.items()} == dict.fromkeys(
        secret_files, "refused"
    )

    seen = submit(Snoop, [1]).get_results(timeout=TIMEOUT)[1]
    env = seen["env"]
    assert not [key for key, value in env.items() if SECRET in value or "TOKEN" in key], env
    assert {key for key in env if key.startswith("DCPROTO")} <= {"DCPROTO_OUTPUT_DIR"}, env
    assert env["HOME"] != os.environ.get("HOME") and not env["HOME"].startswith(str(config_dir))
    if os.getuid() == 0:
        assert seen["uid"] != 0  # dropped to an unprivileged account
    honest_project_is_exact()


# ---- nothing left behind -----------------------------------------------------------------------


class Detach:
    @staticmethod
    def parallel_func(_: int) -> int:
        import subprocess

        child = subprocess.Popen(["sleep", "300"], start_new_session=True, stdin=subprocess.DEVNULL)
        return child.pid


def test_a_detached_grandchild_is_gone_when_its_task_ends(volunteer: WorkerProcess) -> None:
    submit(Detach, [1]).get_results(timeout=TIMEOUT)

    def sleepers() -> list[int]:
        tree = control.process_tree([volunteer.pid])
        return [pid for pid in tree if _command(pid).startswith("sleep")]

    wait_for(lambda: not sleepers(), 10, "the detached sleep to be killed")
    assert not _anywhere("sleep 300"), "the detached process survived somewhere"
    honest_project_is_exact()


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _anywhere(command: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"^{command}$"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


# ---- the caps ----------------------------------------------------------------------------------


class MemoryHog:
    @staticmethod
    def parallel_func(_: int) -> int:
        hoard = []
        for _ in range(60):  # up to 1.5 GB, 25 MB at a time, touched
            hoard.append(bytearray(25 * 2**20))
        return len(hoard)


class Spinner:
    @staticmethod
    def parallel_func(_: int) -> int:
        n = 0
        while True:
            n += 1


class DiskFiller:
    @staticmethod
    def parallel_func(_: int) -> int:
        import os

        from dcproto import ADDITIONAL_RESULTS

        chunk = b"x" * 2**20
        with open(os.path.join(ADDITIONAL_RESULTS, "fill.bin"), "wb") as file:
            for _ in range(64):
                file.write(chunk)
                file.flush()
        return 64


@pytest.mark.parametrize(
    ("attack", "reason", "says"),
    [
        (MemoryHog, "memory", "300 MiB (--max-memory)"),
        (Spinner, "cpu_time", "--max-task-seconds"),
        (DiskFiller, "disk", "--max-disk"),
    ],
)
def test_a_task_over_a_cap_fails_with_its_reason_and_the_worker_goes_on(
    volunteer: WorkerProcess, attack: type, reason: str, says: str
) -> None:
    failed = failure_of(attack)
    assert failed.reason == reason, failed
    assert says in str(failed), failed
    assert volunteer.proc.poll() is None
    honest_project_is_exact()


# ---- one creator's code never touches another's ------------------------------------------------


class Implant:
    """Creator A: patches builtins and dcproto's own modules in its process, for any later
    project there to run through."""

    @staticmethod
    def parallel_func(_: int) -> str:
        import builtins

        import dcproto.pickling as pickling
        import dcproto.worker.child as child

        builtins.IMPLANT = "A was here"  # type: ignore[attr-defined]
        original_abs = builtins.abs
        builtins.abs = lambda x: -1  # type: ignore[assignment]
        for module in (pickling, child):
            for name in dir(module):
                if name.startswith(("dumps", "loads", "_pickle", "run")):
                    setattr(module, name, lambda *a, **k: None)
        assert original_abs(-2) == 2
        return "planted"


class Victim:
    @staticmethod
    def parallel_func(x: int) -> Any:
        import builtins

        return [abs(-x), getattr(builtins, "IMPLANT", None)]


def test_creator_as_implant_never_reaches_creator_bs_project_on_the_same_worker(
    volunteer: WorkerProcess, server: ServerProcess
) -> None:
    add_server_user(server, "bob")
    implant = submit(Implant, [1, 2, 3])
    with pytest.raises(TaskFailed, match="cannot be sent"):  # A broke its own process...
        implant.get_results(timeout=TIMEOUT)
    # ...and only its own: B's project, next on the same one-slot worker, runs untouched
    results = submit(Victim, list(range(10)), user_name="bob").get_results(timeout=TIMEOUT)
    assert results == {x: [x, None] for x in range(10)}
    honest_project_is_exact("bob")


# ---- the network -------------------------------------------------------------------------------


class Dialer:
    @staticmethod
    def parallel_func(port: int) -> str:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return "connected"
        except OSError as exc:
            return f"refused: {type(exc).__name__}"


@needs_bwrap
def test_a_task_cannot_open_a_connection_without_allow_network(
    volunteer: WorkerProcess, server: ServerProcess
) -> None:
    assert_sandboxed(volunteer)
    # the server's own port is certainly listening on this machine's loopback
    result = submit(Dialer, [server.port]).get_results(timeout=TIMEOUT)[server.port]
    assert result.startswith("refused"), result
    honest_project_is_exact()


@needs_bwrap
def test_allow_network_lets_a_task_connect(
    server: ServerProcess, user: User, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker("--slots", "1", "--allow-network")
    result = submit(Dialer, [server.port]).get_results(timeout=TIMEOUT)[server.port]
    assert result == "connected"
