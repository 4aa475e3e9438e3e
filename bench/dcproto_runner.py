"""dcproto on its real path: a ``dcproto-server`` subprocess with durable state (a temporary
``--state-dir``), one ``dcproto-worker --slots 2`` subprocess, and the creator library in the
bench process, over TLS on 127.0.0.1 (the server's self-signed certificate, pinned by its
fingerprint; ``insecure=True``: plain TCP, ``--insecure`` on both sides). The creator and the
worker each present a token of their role, made in the server's state dir once it is up. Only
the public API and the CLI are used.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench import workloads as w
from bench.harness import System
from bench.serverctl import Credentials, banner_address, make_credentials
from dcproto import Distribute
from dcproto.users import add_user

MB = 1e6


def console_script(name: str, module: str) -> list[str]:
    """The installed console script next to this interpreter, else ``python -m module``."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def watch_banner(proc: subprocess.Popen[bytes], log: Any, timeout: float) -> tuple[str, int]:
    """Copy the server's stdout to ``log`` (in a thread, for its whole life) and return the
    ``(host, port)`` of its ``dcproto server listening on HOST:PORT`` line."""
    found: queue.Queue[tuple[str, int] | None] = queue.Queue()

    def copy() -> None:
        assert proc.stdout is not None
        seen = False
        for line in proc.stdout:
            with contextlib.suppress(ValueError):  # the log was closed: we are shutting down
                log.write(line)
                log.flush()
            if not seen and (address := banner_address(line.decode(errors="replace"))):
                seen = True
                found.put(address)
        found.put(None)

    threading.Thread(target=copy, name="server-stdout", daemon=True).start()
    try:
        address = found.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"dcproto-server printed no banner in {timeout} s") from None
    if address is None:
        raise RuntimeError(f"dcproto-server exited with {proc.wait()} before listening")
    return address


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

    def __init__(
        self, workdir: Path, timeout: float, user: str = "bench", *, insecure: bool = False
    ) -> None:
        self.workdir = workdir
        self.user = user
        self.timeout = timeout
        self.insecure = insecure  # plain TCP (server, worker and user --insecure), not TLS
        self.credentials: Credentials | None = None
        self.token_setup_s = 0.0
        self.server: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []  # every worker started, in order
        self._extra: dict[str, float] = {}
        self._logs: list[Any] = []
        self._late_reps = 0
        self._late_logs = ""  # the last late-joiner cluster's, if it failed

    # ---- processes ---------------------------------------------------------------------------

    def _popen(
        self, args: list[str], log_name: str, *, pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        """``pipe``: stdout comes back to us (the caller copies it to the log)."""
        log = open(self.workdir / log_name, "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        return subprocess.Popen(
            args, stdout=subprocess.PIPE if pipe else log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def start(self) -> None:
        self.start_server()
        self.worker = self.add_worker("bench-worker", w.SLOTS, "worker.log")
        if self.single(w.plus_one, 0) != 1:
            raise RuntimeError("dcproto: wrong first result")

    def start_server(self) -> None:
        """The server, the two tokens, and the named user in the config dir."""
        state_dir = self.workdir / "state"
        self.server = self._popen(
            [
                *console_script("dcproto-server", "dcproto.server.main"),
                "--host", "127.0.0.1",
                "--port", "0",
                "--state-dir", str(state_dir),
                "--log-level", "WARNING",
                *(["--insecure"] if self.insecure else []),
            ],
            "server.log",
            pipe=True,
        )  # fmt: skip
        host, port = watch_banner(self.server, self._logs[-1], 30)
        began = time.perf_counter()
        creds = make_credentials(state_dir, host, port, self.workdir, prefix=self.user)
        # mostly the wait for the running server to pick up the new tokens (up to 0.5 s)
        self.token_setup_s = time.perf_counter() - began
        if creds.insecure != self.insecure:
            raise RuntimeError(f"dcproto-server: insecure={creds.insecure}, not {self.insecure}")
        self.credentials = creds
        add_user(creds.user(self.user))

    def add_worker(
        self, name: str, slots: int, log_name: str | None = None
    ) -> subprocess.Popen[bytes]:
        """A ``dcproto-worker connect`` process for the running server."""
        creds = self.credentials
        assert creds is not None
        proc = self._popen(
            [
                *console_script("dcproto-worker", "dcproto.worker.worker"),
                "connect", f"{creds.host}:{creds.port}",
                *creds.worker_args(),
                "--slots", str(slots),
                "--name", name,
                "--log-level", "WARNING",
            ],
            log_name or f"{name}.log",
        )  # fmt: skip
        self.workers.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.workers:
            stop_process(proc)
        stop_process(self.server)
        for log in self._logs:
            log.close()

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("server.log", "worker.log", "w1.log", "w2.log", "late.log"):
            path = self.workdir / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}\n" + "\n".join(tail))
        if self._late_logs:
            out.append(f"--- the failed late-joiner cluster\n{self._late_logs}")
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

    def single_as_written(self, x: int) -> Any:
        results_dir = self.workdir / "as-written" / str(x)

        @Distribute(user_name=self.user, iterator=[x], results_path=str(results_dir))
        class PlusOne:
            @staticmethod
            def parallel_func(item: int) -> int:
                return item + 1

        return PlusOne().get_results(timeout=self.timeout)[x]

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

    def late_joiner(self) -> tuple[dict, int | None, float]:
        """A fresh server with two 1-slot workers per repetition (``<workdir>/late-joiner-N``,
        same transport and timeout), warmed; the project is a class submitted with
        ``Distribute`` (``results_path`` in that dir); the third 1-slot worker process is
        started by a timer ``LATE_JOIN_S`` after the submit."""
        self._late_reps += 1
        where = self.workdir / f"late-joiner-{self._late_reps}"
        where.mkdir()
        cluster = DcprotoSystem(
            where, self.timeout, user=f"{self.user}-late{self._late_reps}", insecure=self.insecure
        )
        timer: threading.Timer | None = None
        try:
            cluster.start_server()
            for name in ("w1", "w2"):
                cluster.add_worker(name, 1)
            cluster.map_items(w.plus_one, range(w.LATE_WARM), 1)

            class LateJoiner:
                parallel_func = staticmethod(w.sleep_task)

            project_class = Distribute(
                user_name=cluster.user,
                iterator=range(w.LATE_TASKS),
                task_size=1,
                results_path=where / "results",
            )(LateJoiner)
            timer = threading.Timer(w.LATE_JOIN_S, cluster.add_worker, args=("late", 1))
            began = time.perf_counter()
            timer.start()
            project = project_class()
            try:
                results = project.get_results(timeout=self.timeout)
            except TimeoutError:
                project.cancel()
                raise
            wall = time.perf_counter() - began
            late = int(project.stats.get("per_worker", {}).get("late", 0))
        except Exception:
            self._late_logs = cluster.log_tail()
            raise
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()
            cluster.close()
        return results, late, wall
