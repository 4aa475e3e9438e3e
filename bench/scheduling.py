"""Scheduling scenarios with real processes: who gets which task, and how fast far workers go.

``python -m bench.scheduling`` runs each case on a fresh ``dcproto-server`` with 1-slot
``dcproto-worker`` processes, the way users run them (TLS, tokens, a project class submitted
with ``Distribute``), and prints one line per case with the figure to compare with its ideal:

* ``late-joiner``: two workers warmed on tiny tasks, then 12 tasks of 1 s; a third worker
  joins 0.8 s after the submit. Ideal about 4-5 s, the third worker doing its share.
* ``second-worker``: one worker, 2 tasks of 3 s; a second joins at 0.5 s. Ideal about 4 s.
* ``small-project``: projects of 200, 20 and 2 tasks of 0.05 s submitted at once to two
  warmed workers. Ideal: the 2-task project done in about 0.1 s.
* ``max-tasks``: a ``--tasks 3`` worker joins two warmed ones on a 30-task project of 0.2 s
  tasks. Ideal: it runs 3 and exits before the project ends.
* ``far``: one-item tasks through a relay adding ``d`` ms each way (``bench.relay``), as
  tasks/s and as a share of the same run without the relay. Target: 80% at a 100 ms round trip.
* ``long-lease``: a 6 s task under ``lease_timeout=2``: one start, no re-issue.
* ``memory``: the server's RSS after N and 4N finished one-item tasks (``--memory-tasks``).

Timings depend on the machine; compare a case with its ideal, and ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.dcproto_runner import console_script, stop_process, watch_banner
from bench.relay import DelayRelay
from bench.serverctl import Credentials, make_credentials
from dcproto import Distribute
from dcproto.users import CONFIG_DIR_ENV, add_user

USER = "sched"


class Sleep:
    """Tasks that sleep ``x`` seconds (the item), or return at once for 0."""

    @staticmethod
    def parallel_func(x: float) -> float:
        if x:
            time.sleep(x)
        return x


class Identity:
    @staticmethod
    def parallel_func(x: int) -> int:
        return x


class Cluster:
    """A server and its 1-slot workers, in ``workdir``; workers may go through a relay."""

    def __init__(self, workdir: Path, *, profile_dir: Path | None = None) -> None:
        self.workdir = workdir
        # set: the server and the workers run under cProfile, writing NAME.prof there
        self.profile_dir = profile_dir
        self.server: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.creds: Credentials | None = None
        self._logs: list[Any] = []

    def start(self) -> None:
        state = self.workdir / "state"
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        self.server = subprocess.Popen(
            [*self._command("server", "dcproto-server", "dcproto.server.main"), "--port", "0",
             "--state-dir", str(state), "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        host, port = watch_banner(self.server, log, 30)
        self.creds = make_credentials(state, host, port, self.workdir, prefix=USER)
        os.environ[CONFIG_DIR_ENV] = str(self.workdir / "config")
        add_user(self.creds.user(USER))

    def worker(
        self,
        name: str,
        *,
        port: int | None = None,
        tasks: int | None = None,
        extra: tuple[str, ...] = (),
        slots: int = 1,
    ) -> Any:
        assert self.creds is not None
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        proc = subprocess.Popen(
            [*self._command(name, "dcproto-worker", "dcproto.worker.worker"), "connect",
             f"127.0.0.1:{port or self.creds.port}", *self.creds.worker_args(),
             "--slots", str(slots), "--name", name, "--log-level", "WARNING",
             *(["--tasks", str(tasks)] if tasks else []), *extra],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.workers.append(proc)
        return proc

    def _command(self, name: str, script: str, module: str) -> list[str]:
        if self.profile_dir is None:
            return console_script(script, module)
        out = self.profile_dir / f"{name}.prof"
        return [sys.executable, "-m", "cProfile", "-o", str(out), "-m", module]

    def server_rss_mib(self) -> float:
        assert self.server is not None
        for line in Path(f"/proc/{self.server.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        for proc in self.workers:
            stop_process(proc, grace=5)
        stop_process(self.server)
        for log in self._logs:
            log.close()


def project(items: Any, **options: Any) -> Any:
    cls = Distribute(user_name=USER, parallel_func="parallel_func", **options)(
        type("SchedProject", (Sleep,), {})
    )
    return cls()


def run(items: Any, timeout: float = 300, **options: Any) -> tuple[dict[Any, Any], Any, float]:
    began = time.perf_counter()
    handle = project(items, iterator=items, task_size=1, **options)
    results = handle.get_results(timeout=timeout)
    return results, handle, time.perf_counter() - began


def warm(cluster: Cluster, n: int = 200) -> None:
    run([0] * n)


def later(delay: float, action: Callable[[], Any]) -> threading.Timer:
    timer = threading.Timer(delay, action)
    timer.start()
    return timer


def per_worker(handle: Any) -> dict[str, int]:
    return dict(handle.stats.get("per_worker", {}))


@contextlib.contextmanager
def cluster(workdir: Path, name: str) -> Iterator[Cluster]:
    path = workdir / name
    path.mkdir()
    c = Cluster(path)
    try:
        c.start()
        yield c
    finally:
        c.close()


def late_joiner(workdir: Path) -> dict[str, Any]:
    with cluster(workdir, "late-joiner") as c:
        for name in ("w1", "w2"):
            c.worker(name)
        warm(c)
        later(0.8, lambda: c.worker("late"))
        _, handle, seconds = run([1.0] * 12)
        return {"seconds": seconds, "split": per_worker(handle), "ideal": "4-5 s"}


def second_worker(workdir: Path) -> dict[str, Any]:
    with cluster(workdir, "second-worker") as c:
        c.worker("w1")
        warm(c, 20)
        later(0.5, lambda: c.worker("w2"))
        _, handle, seconds = run([3.0, 3.0])
        return {"seconds": seconds, "split": per_worker(handle), "ideal": "about 4 s"}


def small_project(workdir: Path) -> dict[str, Any]:
    with cluster(workdir, "small-project") as c:
        for name in ("w1", "w2"):
            c.worker(name)
        warm(c)
        times: dict[int, float] = {}

        def one(n: int) -> None:
            times[n] = run([0.05] * n)[2]

        threads = [threading.Thread(target=one, args=(n,)) for n in (200, 20, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {"seconds_2": times[2], "seconds_20": times[20], "seconds_200": times[200],
                "ideal": "2-task project in about 0.1 s"}  # fmt: skip


def max_tasks(workdir: Path) -> dict[str, Any]:
    with cluster(workdir, "max-tasks") as c:
        for name in ("w1", "w2"):
            c.worker(name)
        warm(c)
        began = time.perf_counter()
        capped = c.worker("capped", tasks=3)
        exited: list[float] = []

        def wait_exit() -> None:
            capped.wait(120)
            exited.append(time.perf_counter() - began)

        watcher = threading.Thread(target=wait_exit)
        watcher.start()
        _, handle, seconds = run([0.2] * 30)
        watcher.join(130)
        return {"split": per_worker(handle), "capped_exit_s": exited[0] if exited else None,
                "project_s": seconds, "ideal": "capped runs 3, exits before the end"}  # fmt: skip


def throughput(c: Cluster, n: int) -> float:
    _, _, seconds = run([0] * n)
    return n / seconds


def far(workdir: Path, n: int, delays_ms: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with cluster(workdir, "far-lan") as c:
        for name in ("w1", "w2"):
            c.worker(name)
        warm(c)
        out["lan_tasks_s"] = throughput(c, n)
    for delay in delays_ms:
        with cluster(workdir, f"far-{delay:g}") as c:
            assert c.creds is not None
            loop = asyncio.new_event_loop()
            relay = DelayRelay(("127.0.0.1", c.creds.port), delay / 1000)
            port = loop.run_until_complete(relay.start())
            thread = threading.Thread(target=loop.run_forever, daemon=True)
            thread.start()
            try:
                for name in ("w1", "w2"):
                    c.worker(name, port=port)
                warm(c)
                rate = throughput(c, n)
            finally:
                asyncio.run_coroutine_threadsafe(relay.close(), loop).result(10)
                loop.call_soon_threadsafe(loop.stop)
            out[f"rtt_{2 * delay:g}ms_tasks_s"] = rate
            out[f"rtt_{2 * delay:g}ms_share"] = rate / out["lan_tasks_s"]
    return out


def long_lease(workdir: Path) -> dict[str, Any]:
    with cluster(workdir, "long-lease") as c:
        c.worker("w1")
        _, handle, seconds = run([6.0], lease_timeout=2.0)
        stats = handle.stats
        return {"seconds": seconds, "tasks_reissued": stats.get("tasks_reissued"),
                "ideal": "one start, about 6 s"}  # fmt: skip


def memory(workdir: Path, n: int) -> dict[str, Any]:
    """The server's RSS while one project of 4n one-item tasks runs, after n and after 4n
    tasks are done (before the project ends: what it keeps per finished task shows)."""
    with cluster(workdir, "memory") as c:
        for name in ("w1", "w2"):
            c.worker(name)
        warm(c)
        before = c.server_rss_mib()
        cls = Distribute(user_name=USER, iterator=range(4 * n), parallel_func="parallel_func")(
            type("Numbers", (Identity,), {})
        )
        handle = cls()
        samples: dict[str, float] = {}
        for mark in (n, 2 * n, 4 * n - 200):
            while handle.progress.tasks_done < mark:
                time.sleep(0.05)
            samples[f"rss_mib_at_{mark}_done"] = c.server_rss_mib()
        handle.get_results(timeout=600)
        per_task = samples[f"rss_mib_at_{4 * n - 200}_done"] - samples[f"rss_mib_at_{n}_done"]
        per_task *= 2**20 / (3 * n - 200)
        return {"rss_mib_warm": before, **samples, "bytes_per_finished_task": per_task}


CASES = ["late-joiner", "second-worker", "small-project", "max-tasks", "far", "long-lease",
         "memory"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduling", description=__doc__)
    parser.add_argument("cases", nargs="*", default=CASES, choices=CASES)
    parser.add_argument("--far-tasks", type=int, default=5000)
    parser.add_argument("--far-delays", default="10,50", help="ms each way, comma-separated")
    parser.add_argument("--memory-tasks", type=int, default=50_000)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dcproto-sched-") as tmp:
        workdir = Path(tmp)
        for case in args.cases:
            if case == "far":
                delays = [float(d) for d in args.far_delays.split(",") if d]
                figures[case] = far(workdir, args.far_tasks, delays)
            elif case == "memory":
                figures[case] = memory(workdir, args.memory_tasks)
            else:
                figures[case] = globals()[case.replace("-", "_")](workdir)
            print(f"{case}: {json.dumps(figures[case], default=str)}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
