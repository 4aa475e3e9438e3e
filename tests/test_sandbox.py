"""Tests for the worker's sandbox: what a child process started through
:func:`dcproto.worker.sandbox.launch` can see and do, with real processes (bubblewrap ones are
skipped where bwrap is not installed or does not work)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pickle
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import project_message, task_message

from dcproto import protocol as p
from dcproto.paths import OUTPUT_DIR_ENV
from dcproto.users import CONFIG_DIR_ENV
from dcproto.worker import sandbox as sandbox_module
from dcproto.worker.runner import KILL_GRACE, Runner
from dcproto.worker.sandbox import (
    Sandbox,
    SandboxOptions,
    SandboxUnavailable,
    launch,
    probe,
)

SECRET = "dcp_secret_token_do_not_leak"
IS_ROOT = os.geteuid() == 0


# --------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch dir a child dropped to nobody can walk into (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="dcproto-sandbox-test-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Credentials in the environment and a world-readable users.toml in the config dir (so
    that only the sandbox, not its file mode, keeps it from the child)."""
    config = tmp_path / "config"
    config.mkdir()
    users = config / "users.toml"
    users.write_text(f'[users.home]\nhost = "example.org"\ntoken = "{SECRET}"\n')
    config.chmod(0o755)
    users.chmod(0o644)
    monkeypatch.setenv(CONFIG_DIR_ENV, str(config))
    monkeypatch.setenv("DCPROTO_TOKEN", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("SSH_AUTH_SOCK", "/run/user/0/ssh-" + SECRET)
    monkeypatch.setenv("PYTHONSTARTUP", "/nonexistent/" + SECRET)
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("TZ", "UTC")
    return users


@pytest.fixture(scope="module")
def bwrap_sandbox() -> Sandbox:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed")
    sandbox = probe(SandboxOptions(mode="auto"))
    if sandbox.bwrap is None:
        pytest.skip(f"bubblewrap does not work on this machine: {sandbox.description}")
    return sandbox


def with_options(sandbox: Sandbox, **options: Any) -> Sandbox:
    return dataclasses.replace(sandbox, options=dataclasses.replace(sandbox.options, **options))


def run_child(sandbox: Sandbox, base: Path, code: str, *, timeout: float = 60) -> Any:
    """Run ``code`` (which prints one JSON value last) in a child; returns that value."""
    how = launch(
        sandbox,
        child_dir=base / "home",
        output_dir=base / "out",
        argv=[sys.executable, "-c", textwrap.dedent(code)],
    )
    done = subprocess.run(
        how.argv,
        env=how.env,
        cwd=how.cwd,
        preexec_fn=how.preexec_fn,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# what a child looks at: its environment, ids, and what it may read, write and reach
LOOK_AROUND = """
import json, os, socket, sys

def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return type(exc).__name__

def write(path):
    with open(path, "w") as f:
        f.write("x")

def read(path):
    with open(path) as f:
        f.read()

found = {
    "env": dict(os.environ),
    "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()],
    "cwd": os.getcwd(),
    "pid": os.getpid(),
    "root": sorted(os.listdir("/root")) if os.path.isdir("/root") else None,
    "home": sorted(os.listdir("/home")) if os.path.isdir("/home") else None,
    "read": {path: attempt(lambda: read(path)) for path in ARGS["read"]},
    "write": {path: attempt(lambda: write(path)) for path in ARGS["write"]},
    "exists": {path: os.path.exists(path) for path in ARGS["exists"]},
    "caps": [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")],
}
if ARGS.get("port"):
    found["connect"] = attempt(lambda: socket.create_connection(("127.0.0.1", ARGS["port"]), 5))
print(json.dumps(found))
"""


def look_around(sandbox: Sandbox, base: Path, **args: Any) -> dict[str, Any]:
    for key in ("read", "write", "exists"):
        args.setdefault(key, [])
    code = f"ARGS = {json.dumps(args)!r}\nARGS = __import__('json').loads(ARGS)\n{LOOK_AROUND}"
    result: dict[str, Any] = run_child(sandbox, base, code)
    return result


def interpreter_names_under(root: str) -> set[str]:
    """The entries of ``root`` a sandbox mounts back for the interpreter (e.g. /root/.pyenv)."""
    names = set()
    for path in sandbox_module._real_dirs(sandbox_module._interpreter_paths()):
        if path.startswith(root + "/"):
            names.add(path[len(root) + 1 :].split("/")[0])
    return names


def assert_scrubbed(env: dict[str, str], child_dir: Path, output_dir: Path) -> None:
    assert SECRET not in json.dumps(env)
    assert [name for name in env if name.startswith("DCPROTO_")] == [OUTPUT_DIR_ENV]
    assert env[OUTPUT_DIR_ENV] == str(output_dir)
    for name in ("AWS_SECRET_ACCESS_KEY", "SSH_AUTH_SOCK", "PYTHONSTARTUP", CONFIG_DIR_ENV):
        assert name not in env
    assert env["LC_ALL"] == "C.UTF-8" and env["TZ"] == "UTC" and env["PATH"]
    assert env["HOME"] == str(child_dir)
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        assert Path(env[name]).is_relative_to(child_dir)
    for name in ("XDG_RUNTIME_DIR", "TMPDIR"):
        assert Path(env[name]).is_relative_to(child_dir)


# --------------------------------------------------------------------------------------------
# launch(): the environment, in every mode
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("secrets")
@pytest.mark.parametrize("mode", ["auto", "required", "off"])
def test_launch_scrubs_the_environment(mode: str, base: Path) -> None:
    options = SandboxOptions(mode=mode)
    if mode == "off":
        sandbox = Sandbox(options)
    else:  # as probe finds it where bwrap works (launch does not run it)
        nobody = (pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
        sandbox = Sandbox(options, "/usr/bin/bwrap", nobody if IS_ROOT else None, True)
    child_dir, output_dir = base / "home", base / "out"
    how = launch(sandbox, child_dir=child_dir, output_dir=output_dir, argv=["python", "-c", ""])
    assert_scrubbed(how.env, child_dir, output_dir)
    assert SECRET not in " ".join(how.argv)
    assert how.cwd == str(child_dir)
    assert child_dir.is_dir() and output_dir.is_dir()
    assert child_dir.stat().st_mode & 0o077 == 0  # private to the child
    if sandbox.run_as is not None:
        assert child_dir.stat().st_uid == sandbox.run_as[0]
        assert output_dir.stat().st_uid == sandbox.run_as[0]
    if mode == "off":
        assert how.argv == ["python", "-c", ""]
    else:
        assert sandbox.bwrap in how.argv and "--unshare-net" in how.argv


def test_a_real_child_without_sandbox_gets_the_scrubbed_environment(
    secrets: Path, base: Path
) -> None:
    sandbox = probe(SandboxOptions(mode="off"))
    assert sandbox.bwrap is None and sandbox.description.startswith("sandbox: none (off)")
    found = look_around(sandbox, base)
    assert_scrubbed(found["env"], base / "home", base / "out")
    assert found["cwd"] == str(base / "home")
    if IS_ROOT and sandbox.run_as is None:  # the interpreter is out of nobody's reach
        assert "cannot start the interpreter" in sandbox.description
    if sandbox.run_as is not None:
        assert found["ids"][:3] == [sandbox.run_as[0], sandbox.run_as[0], sandbox.run_as[1]]
        assert found["read"] == {} and "running as nobody" in sandbox.description


# --------------------------------------------------------------------------------------------
# probe(): modes
# --------------------------------------------------------------------------------------------


def test_required_without_bwrap_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    with pytest.raises(SandboxUnavailable, match="bubblewrap not found"):
        probe(SandboxOptions(mode="required"))
    auto = probe(SandboxOptions(mode="auto"))
    assert auto.bwrap is None and not auto.pid_namespace
    assert auto.description.startswith("sandbox: none (bubblewrap not found)")


def test_required_with_a_broken_bwrap_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace"):
        probe(SandboxOptions(mode="required"))
    auto = probe(SandboxOptions(mode="auto"))
    assert auto.bwrap is None
    assert "bubblewrap does not work here" in auto.description


def test_off_never_uses_bwrap() -> None:
    sandbox = probe(SandboxOptions(mode="off"))
    assert sandbox.bwrap is None and not sandbox.pid_namespace


def test_probe_finds_a_working_bwrap(bwrap_sandbox: Sandbox) -> None:
    assert bwrap_sandbox.pid_namespace
    assert bwrap_sandbox.description.startswith("sandbox: bubblewrap (read-only system")
    assert "no network" in bwrap_sandbox.description
    if IS_ROOT:
        assert bwrap_sandbox.run_as is not None
        assert bwrap_sandbox.description.endswith("running as nobody)")
    assert probe(SandboxOptions(mode="required")).bwrap is not None


# --------------------------------------------------------------------------------------------
# A real child under bubblewrap
# --------------------------------------------------------------------------------------------


def test_sandboxed_child_sees_no_secret(bwrap_sandbox: Sandbox, secrets: Path, base: Path) -> None:
    found = look_around(
        bwrap_sandbox,
        base,
        read=[str(secrets)],
        exists=[str(secrets.parent), f"/proc/{os.getpid()}/environ"],
    )
    assert_scrubbed(found["env"], base / "home", base / "out")
    assert found["read"] == {str(secrets): "FileNotFoundError"}
    # its own pid namespace: the worker's /proc entry (and environment) is not there
    assert found["exists"][f"/proc/{os.getpid()}/environ"] is False
    assert found["pid"] < 10
    # /root and /home are empty but for what the interpreter needs, mounted back
    assert set(found["root"]) <= interpreter_names_under("/root")
    if found["home"] is not None:
        assert set(found["home"]) <= interpreter_names_under("/home")


def test_config_dir_is_hidden_outside_the_hidden_roots(
    bwrap_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, base: Path
) -> None:
    """A config dir outside /tmp, /home and /root is hidden on its own account."""
    config = Path(tempfile.mkdtemp(prefix="dcproto-config-"))
    try:
        config.chmod(0o755)
        users = config / "users.toml"
        users.write_text(f'token = "{SECRET}"\n')
        users.chmod(0o644)  # readable by anyone: only the sandbox hides it
        monkeypatch.setenv(CONFIG_DIR_ENV, str(config))
        monkeypatch.setattr(sandbox_module, "_HIDDEN_ROOTS", ("/home", "/root"))
        found = look_around(bwrap_sandbox, base, read=[str(users)], exists=[str(config)])
        assert found["read"] == {str(users): "FileNotFoundError"}
        assert found["exists"] == {str(config): True}  # an empty dir in its place
    finally:
        shutil.rmtree(config, ignore_errors=True)


def test_code_deep_in_a_hidden_root_is_reachable_by_the_dropped_child(
    bwrap_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, base: Path
) -> None:
    """A venv or a source checkout two levels under /tmp (or /home) is mounted back into the
    sandbox; the dirs above it must be walkable by nobody, not made 0700 root by bubblewrap
    (which had the worker of a checkout under /tmp fall back to no sandbox at all)."""
    deep = Path(tempfile.mkdtemp(prefix="dcproto-deep-")) / "a" / "site"
    try:
        deep.mkdir(parents=True)
        deep.chmod(0o755)
        (deep / "deep_module.py").write_text("WHERE = 'deep'\n")
        (deep / "deep_module.py").chmod(0o644)
        interpreter_paths = sandbox_module._interpreter_paths
        monkeypatch.setattr(
            sandbox_module, "_interpreter_paths", lambda: [*interpreter_paths(), str(deep)]
        )
        code = f"import json, sys; sys.path.insert(0, {str(deep)!r}); "
        code += "from deep_module import WHERE; print(json.dumps(WHERE))"
        assert run_child(bwrap_sandbox, base, code) == "deep"
    finally:
        shutil.rmtree(deep.parent.parent, ignore_errors=True)


def test_sandboxed_child_writes_only_its_own_dirs(bwrap_sandbox: Sandbox, base: Path) -> None:
    outside = base / "outside"
    outside.mkdir(mode=0o777)
    outside.chmod(0o777)  # writable by anyone: only the sandbox stops the child
    targets = {
        "home": str(base / "home" / "file"),
        "out": str(base / "out" / "file"),
        "tmp": "/tmp/file",
        "outside": str(outside / "file"),
        "etc": "/etc/dcproto-sandbox-test",
        "venv": os.path.join(sys.prefix, "dcproto-sandbox-test"),
        "package": str(Path(sandbox_module.__file__).parent / "dcproto-sandbox-test"),
    }
    found = look_around(bwrap_sandbox, base, write=list(targets.values()))
    result = {name: found["write"][path] for name, path in targets.items()}
    assert result["home"] == result["out"] == result["tmp"] == "ok"
    for name in ("etc", "venv", "package"):
        assert result[name] != "ok", name
        assert not os.path.exists(targets[name])
    # the rest of the runner's workdir is not there (an empty tmpfs): nothing reaches the host
    assert not (outside / "file").exists()
    assert not Path("/tmp/file").exists()
    assert (base / "home" / "file").read_text() == "x"
    assert (base / "out" / "file").read_text() == "x"


@pytest.fixture
def listener() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


def test_sandboxed_child_has_no_network(bwrap_sandbox: Sandbox, base: Path, listener: int) -> None:
    found = look_around(bwrap_sandbox, base, port=listener)
    assert found["connect"] != "ok"
    # and the listener is there: the same connection from here works
    socket.create_connection(("127.0.0.1", listener), 5).close()


def test_allow_network(bwrap_sandbox: Sandbox, base: Path, listener: int) -> None:
    sandbox = with_options(bwrap_sandbox, allow_network=True)
    assert (
        "--unshare-net"
        not in launch(sandbox, child_dir=base / "h", output_dir=base / "o", argv=["true"]).argv
    )
    found = look_around(sandbox, base, port=listener)
    assert found["connect"] == "ok"


@pytest.mark.skipif(not IS_ROOT, reason="the drop to nobody is for a worker running as root")
def test_sandboxed_child_runs_as_nobody(bwrap_sandbox: Sandbox, base: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    assert bwrap_sandbox.run_as is not None
    uid, gid = bwrap_sandbox.run_as
    assert uid == nobody.pw_uid
    found = look_around(bwrap_sandbox, base)
    assert found["ids"] == [uid, uid, gid, []]
    assert found["caps"] == ["0000000000000000"]
    assert (base / "home").stat().st_uid == uid


def test_max_disk_caps_the_output_dir(bwrap_sandbox: Sandbox, base: Path) -> None:
    sandbox = with_options(bwrap_sandbox, max_disk=1 << 20)
    assert "output capped" in sandbox_module._describe(sandbox)
    code = """
    import errno, json, os
    path = os.path.join(os.environ["DCPROTO_OUTPUT_DIR"], "big")
    try:
        with open(path, "wb") as f:
            f.write(b"x" * (1 << 19))
            f.flush()
            small = "ok"
            f.write(b"x" * (2 << 20))
            f.flush()
        print(json.dumps([small, "ok"]))
    except OSError as exc:
        print(json.dumps([small, errno.errorcode[exc.errno]]))
    """
    assert run_child(sandbox, base, code) == ["ok", "ENOSPC"]
    assert list((base / "out").iterdir()) == []  # a tmpfs of the sandbox's own


def test_multiprocessing_works_in_the_sandbox(bwrap_sandbox: Sandbox, base: Path) -> None:
    code = """
    import json, multiprocessing
    multiprocessing.Lock()  # a POSIX semaphore: needs a writable /dev/shm
    with multiprocessing.Pool(2) as pool:
        print(json.dumps(pool.map(abs, [-1, -2])))
    """
    assert run_child(bwrap_sandbox, base, code) == [1, 2]


def test_pipes_and_passed_fds_survive_into_the_sandbox(bwrap_sandbox: Sandbox, base: Path) -> None:
    read_end, write_end = os.pipe()
    code = """
    import os, sys
    fd = int(sys.argv[1])
    from_pipe = os.read(fd, 100)
    from_stdin = sys.stdin.readline().strip()
    print(from_pipe.decode(), from_stdin, flush=True)
    """
    how = launch(
        bwrap_sandbox,
        child_dir=base / "home",
        output_dir=base / "out",
        argv=[sys.executable, "-c", textwrap.dedent(code), str(read_end)],
        pass_fds=(read_end,),
    )
    os.write(write_end, b"through-the-fd")
    done = subprocess.run(
        how.argv,
        env=how.env,
        cwd=how.cwd,
        pass_fds=how.pass_fds,
        input="through-stdin\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    os.close(read_end)
    os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["through-the-fd", "through-stdin"]


def start(sandbox: Sandbox, base: Path, code: str) -> subprocess.Popen[str]:
    how = launch(
        sandbox,
        child_dir=base / "home",
        output_dir=base / "out",
        argv=[sys.executable, "-c", textwrap.dedent(code)],
    )
    return subprocess.Popen(
        how.argv, env=how.env, cwd=how.cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_signals_reach_the_sandboxed_child(bwrap_sandbox: Sandbox, base: Path) -> None:
    """The runner signals the process it started (the forwarder): SIGUSR1 must reach the
    child, and the child's way of ending must come back as the process's own."""
    code = """
    import os, signal, sys, time
    signal.signal(signal.SIGUSR1, lambda *_: os._exit(5))
    print("ready", flush=True)
    time.sleep(60)
    """
    child = start(bwrap_sandbox, base, code)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGUSR1)
    assert child.wait(30) == 5
    child = start(bwrap_sandbox, base, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert child.wait(30) == -signal.SIGSEGV


def test_killing_the_process_kills_the_sandbox(bwrap_sandbox: Sandbox, base: Path) -> None:
    child = start(bwrap_sandbox, base, "print('ready', flush=True)\nwhile True: pass")
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    child.kill()
    child.wait(30)
    # the sandboxed process held the pipe too: end of file only once it is gone as well
    ready, _, _ = select.select([child.stdout], [], [], 10)
    assert ready, "the sandboxed process outlived the one the runner started"
    assert child.stdout.read() == ""


# --------------------------------------------------------------------------------------------
# The runner with a bubblewrap sandbox
# --------------------------------------------------------------------------------------------


class Inspect:
    @staticmethod
    def f(x: Any) -> Any:
        import os
        import time

        if x == "spin":
            while True:
                pass
        if x == "marked-sleep":
            with open(os.path.join(os.environ["DCPROTO_OUTPUT_DIR"], "started"), "w"):
                pass
            time.sleep(100)
        return {
            "uid": os.getuid(),
            "home": os.environ.get("HOME"),
            "cwd": os.getcwd(),
            "token": os.environ.get("DCPROTO_TOKEN"),
            "dcproto": sorted(name for name in os.environ if name.startswith("DCPROTO_")),
        }


def make_project(**options: Any) -> p.Project:
    return project_message(Inspect, project_id="inspect", owner="creator", **options)


def make_task(project: p.Project, item: Any) -> p.Task:
    return task_message(project, [item])


@pytest.fixture
async def sandboxed_runner(bwrap_sandbox: Sandbox, secrets: Path) -> AsyncIterator[Runner]:
    runner = Runner(1, sandbox=bwrap_sandbox)
    await runner.start()
    yield runner
    await runner.close()


def project_pids(runner: Runner, project: p.Project) -> list[int]:
    """The pids the runner knows its project's children by (bwrap's forwarders)."""
    return [
        c.process.pid
        for c in runner._children
        if c.bound == project.project_id and c.process is not None and c.alive
    ]


async def test_runner_under_bwrap(sandboxed_runner: Runner, bwrap_sandbox: Sandbox) -> None:
    project = make_project()
    outcome = await sandboxed_runner.run(project, make_task(project, "look"))
    assert outcome.outcome == "ok", outcome.error
    seen = pickle.loads(outcome.payload)[0]
    assert seen["token"] is None and seen["dcproto"] == [OUTPUT_DIR_ENV]
    assert seen["home"] == seen["cwd"]
    assert Path(seen["home"]).is_relative_to(sandboxed_runner.workdir)
    if bwrap_sandbox.run_as is not None:
        assert seen["uid"] == bwrap_sandbox.run_as[0]


async def test_runner_under_bwrap_times_out_python_code_without_a_kill(
    sandboxed_runner: Runner,
) -> None:
    """The abandon signal goes through the forwarder: the child gives up and is kept."""
    project = make_project(task_timeout=3.0)  # more than a slow machine's child start-up
    assert (await sandboxed_runner.run(project, make_task(project, "warm-up"))).outcome == "ok"
    before = project_pids(sandboxed_runner, project)
    started = time.monotonic()
    outcome = await sandboxed_runner.run(project, make_task(project, "spin"))
    assert outcome.outcome == "timeout"
    assert time.monotonic() - started < 3.0 + KILL_GRACE  # given up, not killed
    after = await sandboxed_runner.run(project, make_task(project, "next"))
    assert after.outcome == "ok"
    assert project_pids(sandboxed_runner, project) == before


async def test_runner_under_bwrap_abandons_a_running_task(sandboxed_runner: Runner) -> None:
    project = make_project()
    assert (await sandboxed_runner.run(project, make_task(project, "warm-up"))).outcome == "ok"
    before = project_pids(sandboxed_runner, project)
    task = make_task(project, "marked-sleep")
    running = asyncio.create_task(sandboxed_runner.run(project, task))
    deadline = time.monotonic() + 30
    while not any(
        c.output_dir is not None and (c.output_dir / "started").exists()
        for c in sandboxed_runner._children
    ):
        assert time.monotonic() < deadline, "the task never started"
        await asyncio.sleep(0.01)
    started = time.monotonic()
    assert sandboxed_runner.abandon(task.task_id)
    assert (await running).outcome == "abandoned"
    assert time.monotonic() - started < KILL_GRACE
    assert (await sandboxed_runner.run(project, make_task(project, "next"))).outcome == "ok"
    assert project_pids(sandboxed_runner, project) == before
