"""Fixtures for the integration tests: real server and worker processes on 127.0.0.1.

* ``server`` -- a ``python -m dcproto.server.main --port 0`` process (``make_server`` for one with
  other options), killed at teardown;
* ``start_worker(*extra_args)`` -- ``python -m dcproto.worker.worker connect 127.0.0.1:PORT``
  processes, each in its own session so teardown can kill it together with its child processes;
* ``config_dir`` / ``user`` -- a private ``$DCPROTO_CONFIG_DIR`` and a user "home" for ``server``.

When a test fails, the logs of its server and workers are printed at teardown.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import pickle
import queue
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import cloudpickle
import pytest

from dcproto import protocol as p
from dcproto.connection import Endpoint
from dcproto.paths import ADMIN_TOKEN_FILE
from dcproto.server.statedir import read_record
from dcproto.trust.tls import channel_binding, check_pin, client_context, peer_certificate
from dcproto.trust.tokens import TokenStore, make_proof
from dcproto.users import User, add_user

HEARTBEAT = 0.5
STARTUP_TIMEOUT = 10.0
LISTENING = "dcproto server listening on "


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the process and everything in its session (it was started as a session leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the children of a worker too, even if it died
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


_TOKENS: dict[tuple[Path, str], str] = {}  # (state dir, name) -> token
TIMEOUT = 20.0  # a raw peer's waits: generous, so a failure shows as a timeout


# ---- raw protocol peers -----------------------------------------------------------------------


def raw_socket(server: ServerProcess, timeout: float = 5) -> ssl.SSLSocket:
    """A TLS connection to ``server`` whose certificate is checked against its pin."""
    context = client_context(fingerprint=server.fingerprint)
    plain = socket.create_connection((server.host, server.port), timeout=timeout)
    sock = context.wrap_socket(plain, server_hostname=server.host)
    check_pin(peer_certificate(sock), server.fingerprint, server.address)
    return sock


def hello_for(
    server: ServerProcess,
    challenge: p.Challenge,
    role: str,
    *,
    token: str | None = None,
    slots: int = 0,
    name: str = "raw",
) -> p.Hello:
    """A Hello proving ``token`` (default: a creator's, or a worker's for role worker)."""
    if token is None:
        token = server.add_token(role, role)
    cert = (server.state_dir / "tls" / "cert.pem").read_text()
    channel = channel_binding(ssl.PEM_cert_to_DER_cert(cert))
    identity, proof = make_proof(token, nonce=challenge.nonce, role=role, channel=channel)
    return p.Hello(
        version=p.PROTOCOL_VERSION,
        role=role,
        identity=identity,
        proof=proof,
        device_id=None,
        name=name,
        slots=slots,
    )


class RawPeer:
    """One authenticated protocol connection driven by the test, under the shared token of its
    role, or under a token of its own (``token_name``). A thread sends Heartbeats, so the server
    does not drop the peer while the test waits; received Heartbeats are skipped."""

    def __init__(
        self, server: ServerProcess, role: str, slots: int = 0, *, token_name: str | None = None
    ) -> None:
        self.sock = raw_socket(server)
        self._decoder = p.Decoder()
        self._inbox: deque[p.Message] = deque()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self.closed = False  # the server closed the connection
        challenge = self.receive(5)
        assert isinstance(challenge, p.Challenge), challenge
        token = None if token_name is None else server.add_token(token_name, role)
        name = token_name or f"raw-{role}"
        self.send(hello_for(server, challenge, role, token=token, slots=slots, name=name))
        welcome = self.receive(5)
        assert isinstance(welcome, p.Welcome), welcome
        self._beats = threading.Thread(
            target=self._heartbeats, args=(welcome.heartbeat_interval / 3,), daemon=True
        )
        self._beats.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._beats.is_alive():
            self._beats.join(timeout=5)
        self.sock.close()

    def _heartbeats(self, interval: float) -> None:
        beat = p.encode(p.Heartbeat())
        while not self._stop.wait(interval):
            try:
                self.send_raw(beat)
            except OSError:
                return

    def send_raw(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def send(self, *messages: p.Message) -> None:
        """All ``messages`` in one write."""
        self.send_raw(b"".join(p.encode(m) for m in messages))

    def _pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for data and take in what arrives."""
        if not self.sock.pending():  # bytes TLS already decrypted never wake select()
            readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not readable:
                return
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        for body in self._decoder.feed(data):
            message = p.decode(body)
            if not isinstance(message, p.Heartbeat):
                self._inbox.append(message)

    def receive(self, timeout: float) -> p.Message | None:
        """The next message but Heartbeats; None once the server has closed. Fails the test
        after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._inbox:
            if self.closed:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no message from the server within {timeout} s")
            self._pump(remaining)
        return self._inbox.popleft()

    def receive_until(
        self, last: Callable[[p.Message], bool], timeout: float = TIMEOUT
    ) -> list[p.Message]:
        """Messages up to and including the first one for which ``last`` is true."""
        deadline = time.monotonic() + timeout
        messages: list[p.Message] = []
        while True:
            message = self.receive(max(0.0, deadline - time.monotonic()))
            if message is None:
                pytest.fail(f"the server closed the connection; so far: {messages}")
            messages.append(message)
            if last(message):
                return messages

    def until_closed(self, timeout: float = TIMEOUT) -> list[p.Message]:
        """Every message until the server closes the connection."""
        messages: list[p.Message] = []
        while (message := self.receive(timeout)) is not None:
            messages.append(message)
        return messages

    def quiet_for(self, seconds: float) -> list[p.Message]:
        """Whatever arrives within ``seconds`` but Heartbeats (the connection stays open)."""
        deadline = time.monotonic() + seconds
        while not self.closed and (remaining := deadline - time.monotonic()) > 0:
            self._pump(remaining)
        messages = list(self._inbox)
        self._inbox.clear()
        return messages


# ---- server -------------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    host: str
    port: int
    proc: subprocess.Popen[str]
    state_dir: Path
    log_path: Path
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def token(self) -> str:
        """The admin token the server made on its first start."""
        return (self.state_dir / ADMIN_TOKEN_FILE).read_text(encoding="utf-8").strip()

    @property
    def fingerprint(self) -> str:
        record = read_record(self.state_dir)
        assert record is not None and record.fingerprint is not None
        return record.fingerprint

    def add_token(self, name: str, role: str) -> str:
        """A new token of ``role`` (cached by state dir and name: a restarted server on the
        same dir has the same tokens), as ``dcproto tokens add`` makes it."""
        key = (self.state_dir, name)
        if key not in _TOKENS:
            _TOKENS[key] = TokenStore(self.state_dir).add(name, role)
        return _TOKENS[key]

    def token_file(self, name: str = "volunteer", role: str = "worker") -> Path:
        path = self.state_dir.parent / f"{name}.token"
        if not path.exists():
            path.write_text(self.add_token(name, role) + "\n", encoding="utf-8")
        return path

    def endpoint(self, token: str | None = None) -> Endpoint:
        return Endpoint(
            host="127.0.0.1",
            port=self.port,
            token=token or self.add_token("creator", "creator"),
            fingerprint=self.fingerprint,
        )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


def _limit_open_files(nofile: int) -> None:  # runs in the child, before exec
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def _start_server(
    directory: Path,
    heartbeat: float,
    port: int,
    state_dir: Path | None,
    extra: Sequence[str],
    nofile: int | None = None,
) -> ServerProcess:
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "server.log"
    state_dir = state_dir or directory / "state"
    # Text mode, one line each: the reader thread below sees the banner as soon as it is printed.
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dcproto.server.main",
                "--port",
                str(port),
                "--state-dir",
                str(state_dir),
                "--heartbeat",
                str(heartbeat),
                "--log-level",
                "INFO",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            # a hard and soft limit on open files the server cannot raise (like `ulimit -n`)
            preexec_fn=None if nofile is None else functools.partial(_limit_open_files, nofile),
        )
    lines: list[str] = []
    banner: queue.Queue[str | None] = queue.Queue()

    def read_stdout() -> None:  # keeps draining, so the pipe never fills up
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            banner.put(line)
        banner.put(None)

    threading.Thread(target=read_stdout, name="server-stdout", daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            line = banner.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            _kill_group(proc)
            pytest.fail(
                f"the server did not print {LISTENING!r} within {STARTUP_TIMEOUT} s; "
                f"stdout: {''.join(lines)!r}; log:\n{log_path.read_text()}"
            )
        if LISTENING in line:
            host, _, port = line.split(LISTENING, 1)[1].strip().rpartition(":")
            return ServerProcess(host, int(port), proc, state_dir, log_path, lines)


@pytest.fixture
def make_server(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ServerProcess]]:
    """``make_server(heartbeat=, port=, state_dir=, extra=, nofile=)`` starts another server
    process (on a free port and with a fresh state dir unless told otherwise; ``nofile``: its
    soft and hard limit on open files)."""
    started: list[ServerProcess] = []
    numbers = itertools.count(1)

    def make(
        *,
        heartbeat: float = HEARTBEAT,
        port: int = 0,
        state_dir: Path | None = None,
        extra: Sequence[str] = (),
        nofile: int | None = None,
    ) -> ServerProcess:
        directory = tmp_path / f"server-{next(numbers)}"
        server = _start_server(directory, heartbeat, port, state_dir, extra, nofile)
        started.append(server)
        return server

    yield make
    for server in started:
        _kill_group(server.proc)
        if _failed(request):
            print(f"\n==== server {server.address} log ====\n{server.log()}")


@pytest.fixture
def server(make_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A real ``dcproto.server.main`` process with a short heartbeat, on a free port."""
    return make_server()


# ---- workers ------------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def log(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def connections(self) -> int:
        """How often this worker has (re)connected so far."""
        return self.log().count("connected to ")

    def wait_connected(self, count: int = 1, timeout: float = STARTUP_TIMEOUT) -> None:
        wait_for(
            lambda: self.connections() >= count or self.proc.poll() is not None,
            timeout,
            f"worker {self.name} to connect",
        )
        if self.connections() < count:
            pytest.fail(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()}")


@pytest.fixture
def start_worker(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., WorkerProcess]]:
    """``start_worker(*extra_args, wait=True, server=None)`` starts a worker process for
    ``server`` (by default the ``server`` fixture's).

    It is named ``worker-N`` (the name shows in the project stats) and, unless ``wait`` is
    false, has connected when this returns. Extra arguments come last, so they win."""
    started: list[WorkerProcess] = []
    numbers = itertools.count(1)

    def start(
        *extra_args: str, wait: bool = True, server: ServerProcess | None = None
    ) -> WorkerProcess:
        if server is None:
            server = request.getfixturevalue("server")
        name = f"worker-{next(numbers)}"
        stdout_path = tmp_path / f"{name}.out"
        stderr_path = tmp_path / f"{name}.log"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dcproto.worker.worker",
                    "connect",
                    f"127.0.0.1:{server.port}",
                    "--token-file",
                    str(server.token_file()),
                    "--fingerprint",
                    server.fingerprint,
                    "--slots",
                    "2",
                    "--name",
                    name,
                    *extra_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        worker = WorkerProcess(name, proc, stdout_path, stderr_path)
        started.append(worker)
        if wait:
            worker.wait_connected()
        return worker

    yield start
    for worker in started:
        with contextlib.suppress(ProcessLookupError):
            if worker.proc.poll() is None:
                os.kill(worker.pid, signal.SIGCONT)  # a test may have frozen it
        _kill_group(worker.proc)
        if _failed(request):
            print(f"\n==== {worker.name} (exit {worker.proc.returncode}) log ====\n{worker.log()}")
            print(f"==== {worker.name} stdout ====\n{worker.output()}")


# ---- named servers ------------------------------------------------------------------------------


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private ``$DCPROTO_CONFIG_DIR`` (subprocesses inherit it)."""
    directory = tmp_path / "config"
    monkeypatch.setenv("DCPROTO_CONFIG_DIR", str(directory))
    return directory


def server_user(server: ServerProcess, name: str, token: str) -> User:
    """A user (named server) ``name`` for ``server``, presenting ``token``."""
    return User(
        name=name,
        host="127.0.0.1",
        port=server.port,
        token=token,
        fingerprint=server.fingerprint,
    )


def add_server_user(
    server: ServerProcess, name: str, *, role: str = "creator", token_name: str | None = None
) -> User:
    """:func:`server_user` with a new token of ``role`` (named ``token_name``, by default
    ``name``), saved in the config dir."""
    added = server_user(server, name, server.add_token(token_name or name, role))
    add_user(added)
    return added


@pytest.fixture
def user(server: ServerProcess, config_dir: Path) -> User:
    """The user (named server) "home" for ``server``, with the creator token "creator"."""
    return add_server_user(server, "home", token_name="creator")


# ---- messages for a runner, without a server ----------------------------------------------------

_task_ids = itertools.count(1)


def payload_by_index(payload: bytes) -> dict[int, Any]:
    """A result payload as ``{index: value}``, whichever of its two forms the worker sent
    (a list of one value per item, or the dict of the kept ones)."""
    kept = pickle.loads(payload)
    if type(kept) is list:
        return dict(enumerate(kept))
    assert type(kept) is dict, type(kept)
    return kept


def project_message(
    cls: type,
    *,
    project_id: str = "proj",
    parallel: str = "f",
    stop: str | None = None,
    only_if: str | None = None,
    modules: list[str] | None = None,
    code: bytes | None = None,
    owner: str | None = None,
    **options: Any,
) -> p.Project:
    """The Project a worker's runner gets for ``cls`` (shipped by value with its module: a
    child cannot import a test module). ``owner``: by default a creator of its own, named
    after the project, so that each project gets a child of its own."""
    cloudpickle.register_pickle_by_value(sys.modules[cls.__module__])
    options.setdefault("errors", "raise")
    return p.Project(
        project_id=project_id,
        code=cloudpickle.dumps(cls) if code is None else code,
        modules=modules or [],
        parallel=parallel,
        stop=stop,
        only_if=only_if,
        options=options,
        owner=f"creator-{project_id}" if owner is None else owner,
    )


def task_message(project: p.Project, items: list[Any], *, task_id: int | None = None) -> p.Task:
    """A first attempt at ``items`` of ``project``, with a new task id unless given."""
    return p.Task(
        task_id=next(_task_ids) if task_id is None else task_id,
        project_id=project.project_id,
        attempt=1,
        items=pickle.dumps(items),
    )
