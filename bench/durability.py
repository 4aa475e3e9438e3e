"""What durability costs and how fast dcproto recovers, on real processes over 127.0.0.1.

    python -m bench.durability [--tasks 10000] [--workers 4]

1. throughput of a 10,000-task project (``x + 1``, task_size 1) on a server with durable
   state and on one with ``--memory``;
2. time from a worker's SIGKILL to its task running again on another worker;
3. time from a server restart (after SIGKILL) to every worker connected again.

Every server runs with a fresh ``--state-dir`` and TLS (its self-signed certificate, pinned by
the fingerprint it records in ``server.json``); workers present a worker token from a file, the
creator a creator token. A restarted server keeps its certificate and tokens (same state dir).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.serverctl import Credentials, banner_address, make_credentials
from dcproto import Distribute
from dcproto.users import add_user


class Server:
    """A ``dcproto-server`` on 127.0.0.1; ``credentials``: its tokens, made on its first start
    in ``state_dir`` (pass them back to a restart on the same dir)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        memory: bool = False,
        port: int = 0,
        credentials: Credentials | None = None,
    ) -> None:
        args = [
            sys.executable,
            "-m",
            "dcproto.server.main",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-dir",
            str(state_dir),
            "--heartbeat",
            "1",
            "--log-level",
            "INFO",
        ]
        if memory:
            args.append("--memory")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[tuple[float, str]] = []
        self.started = time.perf_counter()
        listening = threading.Event()
        self.port = 0

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append((time.perf_counter(), line))
                found = banner_address(line)
                if found and not listening.is_set():
                    self.port = found[1]
                    listening.set()

        threading.Thread(target=read, daemon=True).start()
        if not listening.wait(10):
            raise RuntimeError("server did not start")
        self.listening_at = time.perf_counter()
        if credentials is None:
            credentials = make_credentials(state_dir, "127.0.0.1", self.port, state_dir.parent)
        self.credentials = credentials.with_port(self.port)
        add_user(self.credentials.user("bench"))

    def joins_after(self, since: float) -> list[float]:
        return [t for t, line in self.lines if t >= since and "joined as worker" in line]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def start_worker(server: Server, slots: int = 1, name: str = "") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dcproto.worker.worker",
            "connect",
            f"127.0.0.1:{server.port}",
            *server.credentials.worker_args(),
            "--slots",
            str(slots),
            "--name",
            name or f"w{server.port}",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def cluster(state_dir: Path, *, memory: bool, workers: int) -> Iterator[Server]:
    server = Server(state_dir, memory=memory)
    procs = [start_worker(server, 1, f"w{i}") for i in range(workers)]
    deadline = time.perf_counter() + 20
    while len(server.joins_after(0)) < workers and time.perf_counter() < deadline:
        time.sleep(0.05)
    try:
        yield server
    finally:
        stop(procs)
        server.kill()


def plus_one(x: int) -> int:
    return x + 1


def throughput(tasks: int, workers: int, memory: bool, reps: int) -> float:
    with (
        tempfile.TemporaryDirectory() as tmp,
        cluster(Path(tmp, "state"), memory=memory, workers=workers),
    ):
        rates = []
        for _ in range(reps):

            @Distribute(user_name="bench", iterator=range(tasks), task_size=1)
            class Overhead:
                parallel_func = staticmethod(plus_one)

            started = time.perf_counter()
            results = Overhead().get_results(timeout=600)
            rates.append(tasks / (time.perf_counter() - started))
            assert len(results) == tasks
        return statistics.median(rates)


def marker_task(path: str) -> int:
    Path(path, f"{os.getpid()}-{time.time()}").touch()
    time.sleep(3)
    return 1


def reissue_latency() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        marks = Path(tmp, "marks")
        marks.mkdir()
        server = Server(Path(tmp, "state"))
        first = start_worker(server, 1, "first")
        while not server.joins_after(0):
            time.sleep(0.02)

        @Distribute(user_name="bench", iterator=[str(marks)], task_size=1)
        class Marker:
            parallel_func = staticmethod(marker_task)

        project = Marker()
        while not list(marks.iterdir()):
            time.sleep(0.005)
        second = start_worker(server, 1, "second")
        while len(server.joins_after(0)) < 2:
            time.sleep(0.02)
        time.sleep(0.3)  # the second worker is connected and idle
        killed_at = time.time()
        os.killpg(first.pid, signal.SIGKILL)
        while len(list(marks.iterdir())) < 2:
            time.sleep(0.002)
        restarted = max(float(p.name.split("-", 1)[1]) for p in marks.iterdir())
        project.get_results(timeout=30)
        stop([second])
        first.wait()
        server.kill()
        return restarted - killed_at


def reconnect_time(workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp, "state"))
        port = server.port
        procs = [start_worker(server, 1, f"w{i}") for i in range(workers)]
        while len(server.joins_after(0)) < workers:
            time.sleep(0.05)
        server.kill()
        time.sleep(1.0)  # the server is down for a second
        server = Server(Path(tmp, "state"), port=port, credentials=server.credentials)
        while len(server.joins_after(server.listening_at)) < workers:
            time.sleep(0.01)
        back = max(server.joins_after(server.listening_at)) - server.listening_at
        stop(procs)
        server.kill()
        return back


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes, 1 slot each")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("DCPROTO_CONFIG_DIR", tempfile.mkdtemp(prefix="dcproto-bench-"))
    durable = throughput(args.tasks, args.workers, memory=False, reps=args.reps)
    memory = throughput(args.tasks, args.workers, memory=True, reps=args.reps)
    reissue = statistics.median(reissue_latency() for _ in range(3))
    back = statistics.median(reconnect_time(4) for _ in range(3))
    print(f"| measure ({args.workers} worker processes x 1 slot, TLS) | value |")
    print("|---|---|")
    print(f"| {args.tasks:,} tasks of x + 1, durable state | {durable:,.0f} tasks/s |")
    print(f"| {args.tasks:,} tasks of x + 1, --memory | {memory:,.0f} tasks/s |")
    print(f"| durable / memory | {durable / memory:.2f} |")
    print(f"| worker SIGKILL -> its task running on another worker | {reissue * 1000:.0f} ms |")
    print(f"| server restart -> all 4 workers connected again | {back * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
