"""dcproto on its real path: a ``dcproto-server`` subprocess with durable state (a temporary
``--state-dir``), one ``dcproto-worker --slots 2`` subprocess, and the creator library in the
bench process, over TCP on 127.0.0.1. Only the public API and the CLI are used.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench import workloads as w
from bench.harness import System
from dcproto import Distribute
from dcproto.users import User, add_user

MB = 1e6


def console_script(name: str, module: str) -> list[str]:
    """The installed console script next to this interpreter, else ``python -m module``."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dcproto-server exited with {proc.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.005)
    raise RuntimeError(f"dcproto-server not listening on {port} after {timeout} s")


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class PeakRss:
    """Samples the summed RSS of process groups in a thread; keeps the peaks (bytes)."""

    def __init__(self, groups: dict[str, Callable[[], list[Any]]], interval: float = 0.05):
        self.groups = groups
        self.interval = interval
        self.peaks = dict.fromkeys(groups, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, procs: dict[str, list[Any]]) -> None:
        import psutil

        for name, group in procs.items():
            total = 0
            for proc in group:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peaks[name] = max(self.peaks[name], total)

    def _run(self) -> None:
        tick = 0
        procs: dict[str, list[Any]] = {}
        while True:
            if tick % 10 == 0:  # children come and go rarely: look them up every 10 samples
                procs = {name: find() for name, find in self.groups.items()}
            self._sample(procs)
            tick += 1
            if self._stop.wait(self.interval):
                procs = {name: find() for name, find in self.groups.items()}
                self._sample(procs)
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class DcprotoSystem(System):
    name = "dcproto"

    def __init__(self, workdir: Path, timeout: float, user: str = "bench") -> None:
        self.workdir = workdir
        self.user = user
        self.timeout = timeout
        self.secret = secrets.token_urlsafe(16)
        self.server: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self._extra: dict[str, float] = {}
        self._logs: list[Any] = []

    # ---- processes ---------------------------------------------------------------------------

    def _popen(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / log_name, "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def start(self) -> None:
        port = free_port()
        self.server = self._popen(
            [
                *console_script("dcproto-server", "dcproto.server.server"),
                "--host", "127.0.0.1",
                "--port", str(port),
                "--secret", self.secret,
                "--state-dir", str(self.workdir / "state"),
                "--log-level", "WARNING",
            ],
            "server.log",
        )  # fmt: skip
        wait_listening(port, self.server, 30)
        add_user(User(name=self.user, host="127.0.0.1", port=port, secret=self.secret))
        self.worker = self._popen(
            [
                *console_script("dcproto-worker", "dcproto.worker.worker"),
                "connect", f"127.0.0.1:{port}",
                "--secret", self.secret,
                "--slots", str(w.SLOTS),
                "--name", "bench-worker",
                "--log-level", "WARNING",
            ],
            "worker.log",
        )  # fmt: skip
        if self.single(w.plus_one, 0) != 1:
            raise RuntimeError("dcproto: wrong first result")

    def close(self) -> None:
        stop_process(self.worker)
        stop_process(self.server)
        for log in self._logs:
            log.close()

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("server.log", "worker.log"):
            path = self.workdir / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(out)

    # ---- projects ----------------------------------------------------------------------------

    def _run(
        self,
        items: Iterable[Any],
        task_size: int,
        parallel: Callable[[Any], Any],
        stop: Callable[[Any], Any] | None = None,
        only_if: Callable[[Any], Any] | None = None,
    ) -> dict:
        attrs: dict[str, Any] = {"parallel_func": staticmethod(parallel)}
        if stop is not None:
            attrs["stop_func"] = staticmethod(stop)
        if only_if is not None:
            attrs["only_if_func"] = staticmethod(only_if)
        project_class = Distribute(
            user_name=self.user,
            iterator=items,
            task_size=task_size,
            parallel_func="parallel_func",
            stop_func="stop_func" if stop is not None else None,
            only_if_func="only_if_func" if only_if is not None else None,
        )(type("BenchProject", (), attrs))
        project = project_class()
        try:
            return project.get_results(timeout=self.timeout)
        except TimeoutError:
            project.cancel()
            raise

    def map_items(self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int) -> dict:
        return self._run(items, task_size, fn)

    def single(self, fn: Callable[[Any], Any], x: Any) -> Any:
        return self._run([x], 1, fn)[x]

    def early_stop(
        self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int
    ) -> tuple[Any, float]:
        results = self._run(items, task_size, fn, stop=w.is_true)
        answered = time.perf_counter()
        hits = [item for item, value in results.items() if value]
        if len(hits) != 1:
            raise RuntimeError(f"early stop: {len(results)} results, hits {hits[:5]}")
        return hits[0], answered

    def filter(
        self,
        fn: Callable[[Any], Any],
        keep: Callable[[Any], Any],
        items: Iterable[Any],
        task_size: int,
    ) -> dict:
        try:
            import psutil
        except ImportError:
            self._extra = {}
            return self._run(items, task_size, fn, only_if=keep)
        assert self.server is not None and self.worker is not None
        server, worker, me = (psutil.Process(p) for p in (self.server.pid, self.worker.pid, None))

        def worker_tree() -> list[Any]:
            with contextlib.suppress(psutil.Error):
                return [worker, *worker.children(recursive=True)]
            return []

        baseline = me.memory_info().rss
        groups = {"server": lambda: [server], "worker": worker_tree, "creator": lambda: [me]}
        with PeakRss(groups) as rss:
            results = self._run(items, task_size, fn, only_if=keep)
        self._extra = {
            "server_peak_mb": rss.peaks["server"] / MB,
            "worker_peak_mb": rss.peaks["worker"] / MB,
            "creator_peak_mb": rss.peaks["creator"] / MB,
            "creator_growth_mb": max(0, rss.peaks["creator"] - baseline) / MB,
        }
        return results

    def last_extra(self) -> dict[str, float]:
        return self._extra
