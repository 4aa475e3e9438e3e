"""Scale test of the server: many light simulated workers against one ``dcproto-server``.

    python -m bench.scale [--workers 1000] [--projects 4] [--tasks-per-project 20000] [--memory]
                          [--small-tasks N] [--no-big-small] [--insecure] [--profile server.prof]

A real ``dcproto-server`` subprocess on 127.0.0.1 (a fresh ``--state-dir`` in a temp dir for its
TLS identity and tokens, and its durable state unless ``--memory``) serves N simulated workers
that all live in this process, on one asyncio loop, each on its own TLS connection (the server's
self-signed certificate pinned by the fingerprint it records; ``--insecure``: plain TCP on both
sides). A simulated worker speaks the wire protocol itself: it runs the handshake
(``open_session``: TLS, then the token proof, one slot) with a worker token, grants
``Credit(1)`` and answers every Task at once with an ``ok`` Result that hands the credit back;
it ignores Project and Abandon. The connects are timed: handshakes per second, TLS included.
The projects come through the public creator API (``Distribute`` + ``Project()``, user ``scale``
with a creator token under a temp ``$DCPROTO_CONFIG_DIR``), all submitted at the same time, over
``range(K)`` with task_size 1.

Each item is ``(project_no, i, t)`` where ``t`` is ``time.monotonic()`` taken when the creator
slices the item from its lazy generator (system-wide clock on Linux, so comparable across
processes). A worker records ``time.monotonic() - t`` on receipt: the **push latency**. It is
split in two, using the moment the worker last handed its credit back (``ready``):

* *queued* = ``max(0, ready - t)``: the task existed before this worker could take it, so it
  waited for worker credit (in practice in the server's queue, which the creators keep filled
  up to their credit window);
* *transit* = ``receipt - max(t, ready)``: from the moment both the task existed and the worker
  had handed its credit back, to the task arriving: the credit's way to the server, the
  server's turn, the task's way back (both processes' event loops included). When the task
  was sliced after the worker was ready, the creator -> server hop is in it too.

Two scenarios run on the same server and worker fleet:

1. **equal**: ``--projects`` projects of ``--tasks-per-project`` tasks each: their completion
   times, and the tasks each one got while all of them ran (from the moment the last one got
   its first task, to the first finish), which fair rotation keeps equal;
2. **big + small**: one project of ``--tasks-per-project`` tasks and one of ``--small-tasks``
   submitted together: the small one must finish long before the big one.

Also: throughput (tasks / time from the first submission to the last finish), the server's peak
RSS (``/proc/PID/status`` VmRSS, sampled), the TCP connections it holds, and the CPU used by
the server, by this process and by everything else on the machine (to tell the bottleneck, and
how noisy the box was). ``--profile PATH`` runs the server under ``cProfile`` (stopped with
SIGINT, which it handles gracefully) and prints its top entries. Every result is checked to be
exact.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import pickle
import pstats
import queue
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from bench.serverctl import Credentials, banner_address, make_credentials_async
from dcproto import protocol as p
from dcproto.connection import Endpoint, open_session
from dcproto.creator.creator import Distribute
from dcproto.users import CONFIG_DIR_ENV, add_user

USER = "scale"
STARTUP_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: ``python -c`` program: the server under cProfile (wall-clock timer, cProfile's default: the
#: CPU-time one costs a system call per event and distorts more; on a busy box, though, wall
#: time charges whatever ran when the server was descheduled).
PROFILED_SERVER = """
import cProfile, sys
from dcproto.server.main import main
profile = cProfile.Profile()
profile.enable()
try:
    code = main(sys.argv[2:])
finally:
    profile.disable()
    profile.dump_stats(sys.argv[1])
sys.exit(code)
"""


# ---- the server subprocess -------------------------------------------------------------------


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit to ``wanted`` (capped by the hard limit); a child
    spawned afterwards inherits it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class ServerProcess:
    """``python -m dcproto.server.main`` on 127.0.0.1 and a free port, maybe under cProfile."""

    def __init__(
        self,
        directory: Path,
        *,
        memory: bool = False,
        insecure: bool = False,
        heartbeat: float = 30.0,
        profile: Path | None = None,
    ) -> None:
        self.state_dir = directory / "state"
        self.log_path = directory / "server.log"
        if profile is None:
            command = [sys.executable, "-m", "dcproto.server.main"]
        else:
            command = [sys.executable, "-c", PROFILED_SERVER, str(profile)]
        command += [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--state-dir",
            str(self.state_dir),
            "--heartbeat",
            str(heartbeat),
            "--log-level",
            "WARNING",
        ]
        if memory:
            command.append("--memory")
        if insecure:
            command.append("--insecure")
        with open(self.log_path, "w", encoding="utf-8") as log_file:
            self.proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        self.pid = self.proc.pid
        self.stop_hung = False  # SIGINT did not stop it in time
        self.host, self.port = self._wait_listening()

    def _wait_listening(self) -> tuple[str, int]:
        lines: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:  # keeps reading, so the pipe never fills up
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, name="server-stdout", daemon=True).start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.kill()
                raise RuntimeError(f"the server did not start; its log:\n{self.log()}")
            address = banner_address(line)
            if address is not None:
                return address

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def rss_kib(self) -> int:
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
        return 0.0

    def connections(self) -> int:
        """Established TCP connections the server holds (its fds matched in /proc/net/tcp*)."""
        inodes: set[str] = set()
        fd_dir = f"/proc/{self.pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"{fd_dir}/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        count = 0
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError), open(f"/proc/{self.pid}/net/{table}") as fh:
                next(fh, None)  # header
                for line in fh:
                    fields = line.split()
                    if fields[3] == "01" and fields[9] in inodes:  # ESTABLISHED
                        count += 1
        return count

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT (a graceful stop, which also lets cProfile write its file), then SIGKILL.

        Stop the server only once it is quiet: on Python 3.11 its timer task swallows the
        shutdown's cancellation when a client event (say, a disconnect) sets its wake-up event
        in the same turn (``asyncio.wait_for`` returns the inner result instead of raising
        CancelledError), and ``Server.stop()`` then waits forever."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stop_hung = True
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


# ---- simulated workers -----------------------------------------------------------------------

#: One task receipt: (project_no, i, t_sliced, t_received, t_ready).
Receipt = tuple[int, int, float, float, float]


class SimWorker:
    """One light protocol-level worker with one slot: answers each Task at once."""

    __slots__ = (
        "fleet",
        "heartbeat_interval",
        "last_sent",
        "name",
        "proto",
        "reader",
        "ready",
        "tasks",
        "writer",
    )

    def __init__(self, fleet: Fleet, name: str) -> None:
        self.fleet = fleet
        self.name = name
        self.ready = 0.0  # when it last handed its credit back
        self.last_sent = 0.0
        self.tasks = 0

    async def connect(self, endpoint: Endpoint) -> None:
        self.reader, self.writer, self.proto, welcome = await open_session(
            endpoint, role="worker", device_id=None, name=self.name, slots=1
        )
        self.heartbeat_interval = welcome.heartbeat_interval
        self.proto.send(p.Credit(credit=1))
        self._write(credit=True)

    def _write(self, *, credit: bool) -> None:
        """Send what is queued; ``credit``: it hands credit back (Credit, or Results)."""
        data = self.proto.data_to_send()
        if data:
            self.writer.write(data)
            self.last_sent = time.monotonic()
            if credit:
                self.ready = self.last_sent

    async def run(self) -> None:
        reader, proto, fleet = self.reader, self.proto, self.fleet
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                now = time.monotonic()
                answered = False
                for message in proto.receive_data(data):
                    if type(message) is p.Task:
                        items = self._receive(message, now, fleet.records)
                        if fleet.work > 0:  # a task that takes time: answer it later
                            # durations spread 0.5x-1.5x: real tasks do not finish in lockstep
                            took = fleet.work * random.uniform(0.5, 1.5)
                            loop.call_later(took, self._answer_later, message, items)
                        else:
                            self._answer(message, items)
                            answered = True
                    # Project, Abandon, Heartbeat: nothing to do
                self._write(credit=answered)
                if proto.state is p.State.CLOSED:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            fleet.lost += 0 if fleet.closing else 1
            self.writer.close()

    def _receive(self, task: p.Task, now: float, records: list[Receipt]) -> list[Any]:
        items = cloudpickle.loads(task.items)
        ready = self.ready
        for project_no, i, t in items:
            records.append((project_no, i, t, now, ready))
        self.tasks += 1
        return items

    def _answer_later(self, task: p.Task, items: list[Any]) -> None:
        if self.proto.state is p.State.READY:
            self._answer(task, items)
            self._write(credit=True)

    def _answer(self, task: p.Task, items: list[Any]) -> None:
        self.proto.send(
            p.Result(
                task_id=task.task_id,
                attempt=task.attempt,
                outcome="ok",
                # values keyed by the item's index in the task, as real workers send them
                payload=pickle.dumps(dict(enumerate(items)), protocol=pickle.HIGHEST_PROTOCOL),
                n_items=len(items),
                n_kept=len(items),
                error=None,
                stats={"run": 0.0, "exec": 0.0},
                files=[],
                credit=1,
            )
        )

    def heartbeat(self) -> None:
        if self.proto.state is p.State.READY:
            self.proto.send(p.Heartbeat())
            self._write(credit=False)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proto.state is p.State.READY:
                self.proto.send(p.Goodbye(reason="bench done"))
                self._write(credit=False)
        self.writer.close()


@dataclass
class Fleet:
    """The simulated workers of this process, and the receipts they record."""

    workers: list[SimWorker] = field(default_factory=list)
    records: list[Receipt] = field(default_factory=list)
    lost: int = 0
    closing: bool = False
    connect_seconds: float = 0.0
    work: float = 0.0  # mean seconds a task takes before its Result (0: answered at once)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self, n: int, endpoint: Endpoint, *, concurrency: int = 64) -> None:
        """Connect ``n`` workers to ``endpoint`` (TLS unless it is insecure, then the token
        proof), at most ``concurrency`` handshakes at a time (so the listen backlog never
        overflows into SYN retransmits)."""
        gate = asyncio.Semaphore(concurrency)
        started = time.monotonic()

        async def one(index: int) -> SimWorker:
            async with gate:
                worker = SimWorker(self, f"sim{index:05d}")
                await worker.connect(endpoint)
                return worker

        self.workers = list(await asyncio.gather(*(one(i) for i in range(n))))
        self.connect_seconds = time.monotonic() - started
        self._tasks = [asyncio.create_task(w.run()) for w in self.workers]
        if self.workers:
            interval = self.workers[0].heartbeat_interval  # the server's, from Welcome
            self._tasks.append(asyncio.create_task(self._heartbeats(interval)))

    async def _heartbeats(self, interval: float) -> None:
        """Keep idle workers from looking silent to the server (any frame counts)."""
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for worker in self.workers:
                if now - worker.last_sent >= interval / 2:
                    worker.heartbeat()

    async def close(self) -> None:
        self.closing = True
        for worker in self.workers:
            worker.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task


# ---- projects through the public creator API -------------------------------------------------


class Echo:
    """The project class. Never run: the simulated workers answer in its place."""

    @staticmethod
    def parallel_func(x: Any) -> Any:
        return x


def stamped(project_no: int, n: int) -> Iterator[tuple[int, int, float]]:
    """``(project_no, i, t)``, ``t`` taken as the creator slices the item (lazily, on credit)."""
    for i in range(n):
        yield (project_no, i, time.monotonic())


def make_project(project_no: int, n: int) -> type:
    cls = type(f"Scale{project_no}", (Echo,), {})
    # modules=["bench"] (the simulated workers import nothing anyway) keeps Project() from
    # registering this module for pickling by value: with several threads submitting at once,
    # one thread's unregister undoes another's and cloudpickle raises ValueError.
    return Distribute(
        user_name=USER, iterator=stamped(project_no, n), task_size=1, modules=["bench"]
    )(cls)


def check_exact(project_no: int, n: int, results: dict[Any, Any]) -> None:
    """Raise AssertionError unless ``results`` is exactly ``{(no, i, t): (no, i, t)}``, i < n."""
    if len(results) != n:
        raise AssertionError(f"project {project_no}: {len(results)} results, expected {n}")
    indexes = sorted(key[1] for key in results)
    if indexes != list(range(n)):
        raise AssertionError(f"project {project_no}: wrong item indexes")
    for key, value in results.items():
        if key != value or key[0] != project_no:
            raise AssertionError(f"project {project_no}: wrong result {key!r} -> {value!r}")


# ---- measuring -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of already sorted ``values`` (nearest rank)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, int(q * len(values) + 0.5) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50": percentile(values, 0.50),
        "p99": percentile(values, 0.99),
        "max": values[-1] if values else float("nan"),
        "mean": sum(values) / len(values) if values else float("nan"),
    }


@dataclass
class Sampler:
    """Samples the server's RSS and connections while a scenario runs."""

    server: ServerProcess
    interval: float = 0.1
    peak_rss_kib: int = 0
    peak_connections: int = 0
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        rounds = 0
        while True:
            self.peak_rss_kib = max(self.peak_rss_kib, self.server.rss_kib())
            if rounds % 5 == 0:  # a readlink per fd: not every round
                self.peak_connections = max(self.peak_connections, self.server.connections())
            rounds += 1
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.peak_rss_kib = max(self.peak_rss_kib, self.server.rss_kib())
        self.peak_connections = max(self.peak_connections, self.server.connections())


@dataclass
class ScenarioResult:
    name: str
    sizes: list[int]
    wall: float  # first submission to last project finished
    done_at: list[float]  # per project, seconds after the first submission
    tasks_per_second: float
    latency: dict[str, float]
    queued: dict[str, float]
    transit: dict[str, float]
    transit_steady: dict[str, float]  # tasks whose worker handed credit back during the run
    first_task_at: list[float]  # per project, its first task's receipt after the first submit
    overlap: tuple[float, float]  # all projects running: last first task .. first finish
    overlap_counts: list[int]  # tasks each project got within the overlap
    peak_rss_kib: int
    peak_connections: int
    server_cpu: float  # server CPU seconds / wall seconds
    bench_cpu: float  # this process's CPU seconds / wall seconds (all threads)
    other_cpu: float  # every other process on the machine, likewise (a shared box is noisy)

    @property
    def share_spread(self) -> float:
        """Largest deviation of a project's overlap count from the mean, as a fraction."""
        counts = self.overlap_counts
        mean = sum(counts) / len(counts) if counts else 0
        return max(abs(c - mean) for c in counts) / mean if mean else float("nan")


def machine_cpu_seconds() -> float:
    """CPU seconds all processes on this machine have used (busy jiffies in /proc/stat)."""
    with contextlib.suppress(OSError), open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / CLK_TCK  # guest time is already in user
    return 0.0


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_scenario(
    name: str, sizes: list[int], fleet: Fleet, server: ServerProcess, work: float = 0.0
) -> ScenarioResult:
    """Submit one project per entry of ``sizes`` at the same time; wait; check; measure.
    ``work``: the seconds each task takes on its simulated worker."""
    loop = asyncio.get_running_loop()
    fleet.records = []
    fleet.work = work
    classes = [make_project(no, n) for no, n in enumerate(sizes)]
    sampler = Sampler(server)
    sampler.start()
    cpu0, own0, all0 = server.cpu_seconds(), _own_cpu(), machine_cpu_seconds()
    t0 = time.monotonic()
    handles = await asyncio.gather(*(loop.run_in_executor(None, cls) for cls in classes))

    async def finish(no: int, handle: Any) -> float:
        results = await handle.results()
        seen = time.monotonic()
        check_exact(no, sizes[no], results)
        # the server's clock is monotonic too (system-wide): its own finish time is exact
        finished_at = handle.stats.get("finished_at")
        return (finished_at if isinstance(finished_at, float) else seen) - t0

    done_at = list(await asyncio.gather(*(finish(no, h) for no, h in enumerate(handles))))
    wall = max(done_at)
    server_cpu, own_cpu = server.cpu_seconds() - cpu0, _own_cpu() - own0
    other_cpu = machine_cpu_seconds() - all0 - server_cpu - own_cpu
    await sampler.stop()

    records = fleet.records
    if len(records) < sum(sizes):
        raise AssertionError(f"{len(records)} receipts for {sum(sizes)} tasks")
    # Fairness is judged over the overlap: from the moment every project has had a task (the
    # first-submitted one gets a head start of its submission lead) to the first finish.
    first_task_at = [float("inf")] * len(sizes)
    for project_no, _, _, received, _ in records:
        first_task_at[project_no] = min(first_task_at[project_no], received - t0)
    overlap = (max(first_task_at), min(done_at))
    counts = [0] * len(sizes)
    for project_no, _, _, received, _ in records:
        if overlap[0] <= received - t0 <= overlap[1]:
            counts[project_no] += 1
    return ScenarioResult(
        name=name,
        sizes=sizes,
        wall=wall,
        done_at=done_at,
        tasks_per_second=sum(sizes) / wall,
        latency=summary([r[3] - r[2] for r in records]),
        queued=summary([max(0.0, r[4] - r[2]) for r in records]),
        transit=summary([r[3] - max(r[2], r[4]) for r in records]),
        # without each worker's first task, which waits for the initial fill of all of them
        transit_steady=summary([r[3] - max(r[2], r[4]) for r in records if r[4] >= t0]),
        first_task_at=first_task_at,
        overlap=overlap,
        overlap_counts=counts,
        peak_rss_kib=sampler.peak_rss_kib,
        peak_connections=sampler.peak_connections,
        server_cpu=server_cpu / wall,
        bench_cpu=own_cpu / wall,
        other_cpu=max(0.0, other_cpu / wall),
    )


@dataclass
class Report:
    workers: int
    memory: bool
    connect_seconds: float
    idle_rss_kib: int
    idle_connections: int
    scenarios: list[ScenarioResult]
    workers_lost: int
    server_stop_hung: bool = False
    profile_top: str | None = None
    tls: bool = True  # False: plain TCP (--insecure)

    @property
    def handshakes_per_second(self) -> float:
        """Worker connects (TCP, TLS unless insecure, the token proof, Welcome) per second."""
        return self.workers / max(self.connect_seconds, 1e-9)


async def run(
    *,
    workers: int,
    equal: list[int],
    big_small: list[int] | None,
    paced: tuple[list[int], float] | None = None,
    memory: bool = False,
    insecure: bool = False,
    heartbeat: float = 30.0,
    profile: Path | None = None,
    directory: Path | None = None,
) -> Report:
    """Start a server and a fleet, run the scenarios, stop everything, return the numbers.
    Sets ``$DCPROTO_CONFIG_DIR`` to a private directory for the duration (and restores it).
    TLS unless ``insecure``; the fleet presents a worker token, the creators a creator token."""
    raise_nofile(2 * workers + 1024)  # before spawning: the server inherits it
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dc-scale-")))
        config_dir = directory / "config"
        previous = os.environ.get(CONFIG_DIR_ENV)
        os.environ[CONFIG_DIR_ENV] = str(config_dir)
        stack.callback(_restore_env, CONFIG_DIR_ENV, previous)
        server = ServerProcess(
            directory,
            memory=memory,
            insecure=insecure,
            heartbeat=heartbeat,
            profile=profile,
        )
        stack.callback(server.kill)
        creds: Credentials = await make_credentials_async(
            server.state_dir, server.host, server.port, directory, prefix=USER
        )
        if creds.insecure != insecure:
            raise RuntimeError(f"the server runs with insecure={creds.insecure}, not {insecure}")
        add_user(creds.user(USER))
        fleet = Fleet()
        try:
            await fleet.start(workers, creds.endpoint(creds.worker_token))
            idle_rss, idle_connections = server.rss_kib(), server.connections()
            scenarios = [await run_scenario(f"{len(equal)} equal projects", equal, fleet, server)]
            if big_small:
                scenarios.append(await run_scenario("big + small", big_small, fleet, server))
            if paced:
                sizes, work = paced
                label = f"{len(sizes)} projects, {work * 1000:g} ms tasks"
                scenarios.append(await run_scenario(label, sizes, fleet, server, work))
        finally:
            await fleet.close()
            await asyncio.sleep(0.5)  # let the disconnects settle first (see ServerProcess.stop)
            server.stop(timeout=20.0)
        report = Report(
            workers=workers,
            memory=memory,
            tls=not insecure,
            connect_seconds=fleet.connect_seconds,
            idle_rss_kib=idle_rss,
            idle_connections=idle_connections,
            scenarios=scenarios,
            workers_lost=fleet.lost,
            server_stop_hung=server.stop_hung,
        )
        if profile is not None and profile.exists():
            report.profile_top = profile_top(profile)
        return report


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def profile_top(path: Path, n: int = 25) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(n)
    stats.sort_stats("cumulative").print_stats(n)
    return out.getvalue()


# ---- report ----------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def markdown(report: Report) -> str:
    state = "memory (--memory)" if report.memory else "durable (SQLite --state-dir)"
    transport = "TLS" if report.tls else "plain TCP (--insecure)"
    kind = "TLS + token" if report.tls else "token (no TLS)"
    header = "| metric | " + " | ".join(s.name for s in report.scenarios) + " |"
    lines = [
        f"Server state: {state}; connections: {transport}; {report.workers} simulated workers "
        f"(1 slot each) in one process; connected in {report.connect_seconds:.2f} s "
        f"({report.handshakes_per_second:.0f} {kind} handshakes/s); idle server "
        f"RSS {report.idle_rss_kib / 1024:.1f} MiB holding {report.idle_connections} TCP "
        "connections; "
        f"workers dropped by the server: {report.workers_lost}"
        + ("; the server ignored SIGINT and was killed." if report.server_stop_hung else "."),
        "",
        header,
        "|" + " --- |" * (len(report.scenarios) + 1),
    ]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    scenarios = report.scenarios
    row("tasks (per project)", [" + ".join(str(n) for n in s.sizes) for s in scenarios])
    row("results exact", ["yes" for _ in scenarios])
    row("wall, first submit to last finish (s)", [f"{s.wall:.2f}" for s in scenarios])
    row("throughput (tasks/s)", [f"{s.tasks_per_second:,.0f}" for s in scenarios])
    parts = (
        ("latency", "push latency"),
        ("queued", "queued"),
        ("transit", "transit"),
        ("transit_steady", "transit, steady state"),
    )
    for part, label in parts:
        row(
            f"{label} p50 / p99 / max (ms)",
            [
                " / ".join(_ms(getattr(s, part)[k]) for k in ("p50", "p99", "max"))
                for s in scenarios
            ],
        )
    row("project finish times (s)", [", ".join(f"{d:.2f}" for d in s.done_at) for s in scenarios])
    row(
        "first task received (s)",
        [", ".join(f"{t:.3f}" for t in s.first_task_at) for s in scenarios],
    )
    row(
        "tasks per project while all ran (overlap)",
        [
            f"{', '.join(map(str, s.overlap_counts))} ({s.overlap[0]:.2f}-{s.overlap[1]:.2f} s)"
            for s in scenarios
        ],
    )
    row("largest deviation from equal share", [f"{s.share_spread:.1%}" for s in scenarios])
    row(
        "small finished at / big finished at",
        [f"{s.done_at[1] / s.done_at[0]:.2f}" if len(s.sizes) == 2 else "-" for s in scenarios],
    )
    row("server peak RSS (MiB)", [f"{s.peak_rss_kib / 1024:.1f}" for s in scenarios])
    row("server TCP connections held (peak)", [str(s.peak_connections) for s in scenarios])
    row("server CPU (cores)", [f"{s.server_cpu:.2f}" for s in scenarios])
    row("bench process CPU (cores)", [f"{s.bench_cpu:.2f}" for s in scenarios])
    row(
        f"other processes' CPU (cores, of {os.cpu_count()})",
        [f"{s.other_cpu:.2f}" for s in scenarios],
    )
    lines += [
        "",
        "push latency = worker receipt - creator slicing time; queued = the part before the "
        "worker had credit back (waiting for worker credit); transit = receipt - max(sliced, "
        "worker ready); steady state = without each worker's first task of the run (the first "
        "round goes out to every idle worker at once as the projects start).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--projects", type=int, default=4)
    parser.add_argument("--tasks-per-project", type=int, default=20000)
    parser.add_argument(
        "--small-tasks", type=int, default=None, help="the small project (default: a tenth)"
    )
    parser.add_argument("--no-big-small", action="store_true", help="skip the big+small run")
    parser.add_argument(
        "--task-ms",
        type=float,
        default=100.0,
        help="the paced run: tasks take this long on average on their worker (0 skips it)",
    )
    parser.add_argument("--memory", action="store_true", help="server state in memory only")
    parser.add_argument(
        "--insecure", action="store_true", help="plain TCP instead of TLS (server and workers)"
    )
    parser.add_argument("--heartbeat", type=float, default=30.0, help="server --heartbeat")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the server to PATH")
    args = parser.parse_args(argv)
    k = args.tasks_per_project
    small = args.small_tasks if args.small_tasks is not None else max(1, k // 10)
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        report = runner.run(
            run(
                workers=args.workers,
                equal=[k] * args.projects,
                big_small=None if args.no_big_small else [k, small],
                paced=None if not args.task_ms else ([k // 4] * args.projects, args.task_ms / 1000),
                memory=args.memory,
                insecure=args.insecure,
                heartbeat=args.heartbeat,
                profile=args.profile,
            )
        )
    print(markdown(report))
    if report.profile_top:
        print("\nServer profile (cProfile):\n")
        print(report.profile_top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
