"""The volunteer in control: pausing the task processes, noticing the owner's own use of the
machine, and capping the tasks' CPU share.

Everything here works on process trees: the worker's child processes and whatever they started
(found by walking ``/proc``), so a task cannot escape a pause or a CPU cap by forking. Pausing is
SIGSTOP / SIGCONT: nothing is killed, a paused task goes on where it stopped. The CPU cap is a
cgroup's CPU quota when the worker can make one (cgroup v1 ``cpu.cfs_quota_us`` or v2
``cpu.max``), else a duty cycle: SIGSTOP / SIGCONT in 100 ms periods, sized from the CPU time
the tasks are measured to use.

Linux only for the measurements; elsewhere pausing signals the child processes alone, usage
figures are None, and ``--when-idle`` does nothing (a warning says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .procfs import (
    CLOCK_TICKS,
    HAVE_PROC,
    PROC,
    ProcStat,
    all_processes,
    descendants,
    read_stat,
)

log = logging.getLogger("dcproto.worker")


# --when-idle: the machine counts as busy when what is not ours uses more than IDLE_THRESHOLD
# cores for BUSY_SAMPLES seconds in a row, and as idle again after IDLE_SAMPLES quiet seconds
IDLE_INTERVAL = 1.0
IDLE_THRESHOLD = 0.2
BUSY_SAMPLES = 2
IDLE_SAMPLES = 8
OWNER_ACTIVITY = "owner activity"

DUTY_PERIOD = 0.1  # seconds: one run-then-stop cycle of the duty-cycle CPU cap
DUTY_WINDOW = 10  # periods over which the tasks' CPU use is measured
DUTY_MIN_SHARE = 0.02  # the least share of a period the tasks run, however hungry
TREE_REFRESH = 0.5  # seconds between two walks of /proc for new descendants
CGROUP_PERIOD_US = 100_000


# ---- /proc ---------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s children, from each of its threads' children list."""
    found: list[int] = []
    with contextlib.suppress(OSError), os.scandir(PROC / str(pid) / "task") as threads:
        for thread in threads:
            children = PROC / str(pid) / "task" / thread.name / "children"
            with contextlib.suppress(OSError, ValueError), open(children, "rb") as file:
                found += [int(child) for child in file.read().split()]
    return found


# /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN): a tree costs a few reads, not a scan of
# every process on the machine
HAVE_CHILDREN_LISTS = (PROC / str(os.getpid()) / "task" / str(os.getpid()) / "children").exists()


def process_tree(roots: Iterable[int]) -> dict[int, ProcStat]:
    """``roots`` and all their descendants alive now (empty without /proc)."""
    if HAVE_CHILDREN_LISTS:
        found: dict[int, ProcStat] = {}
        todo = list(roots)
        while todo:
            pid = todo.pop()
            if pid not in found and (stat := read_stat(pid)) is not None:
                found[pid] = stat
                todo.extend(_children(pid))
        return found
    table = all_processes()
    found = {pid: table[pid] for pid in roots if pid in table}
    for root in list(found):
        found.update((below.pid, below) for below in descendants(root, table))
    return found


def tree_pids(roots: Iterable[int]) -> list[int]:
    """``roots`` and their descendants; without /proc, ``roots`` alone."""
    roots = list(roots)
    return list(process_tree(roots)) if HAVE_PROC else roots


def signal_pids(pids: Iterable[int], signum: int) -> int:
    """Send ``signum`` to each pid (never to this process); how many got it."""
    me, sent = os.getpid(), 0
    for pid in pids:
        if pid > 0 and pid != me:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
                sent += 1
    return sent


class CpuMeter:
    """CPU seconds a changing tree of processes used between two samples.

    Each process counts with its reaped children (cutime, cstime), so a short-lived helper a
    task ran still counts. A process gone since the last sample whose parent is still in the
    tree was reaped by it: its time moved into the parent's, so its last count is taken off
    (it was counted already). One reaped by someone else loses only its last moments."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, int], tuple[int, int]] | None = None  # key -> (ppid, ticks)

    def sample(self, procs: Iterable[ProcStat]) -> float:
        now = {stat.key: (stat.ppid, stat.ticks) for stat in procs}
        last, self._last = self._last, now
        if last is None:
            return 0.0
        used = 0
        for key, (_, ticks) in now.items():
            before = last.get(key)
            used += ticks - (before[1] if before is not None else 0)
        alive = {pid for pid, _ in now}
        for key, (ppid, ticks) in last.items():
            if key not in now and ppid in alive:
                used -= ticks
        return max(0, used) / CLOCK_TICKS


def machine_busy_seconds() -> float | None:
    """CPU seconds every core of the machine has spent busy since boot (from /proc/stat)."""
    try:
        with open(PROC / "stat", "rb") as file:
            first = file.readline().split()
    except OSError:
        return None
    if not first or first[0] != b"cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy
    values = [int(v) for v in first[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def cpu_count() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


# ---- the owner's activity ----------------------------------------------------------------------


class IdleMonitor:
    """Samples the machine each second; ``on_change(True)`` once what is not this worker or
    its tasks has used more than ``threshold`` cores ``busy_samples`` seconds in a row, and
    ``on_change(False)`` once it has stayed below for ``idle_samples`` seconds."""

    def __init__(
        self,
        on_change: Callable[[bool], None],
        *,
        threshold: float = IDLE_THRESHOLD,
        busy_samples: int = BUSY_SAMPLES,
        idle_samples: int = IDLE_SAMPLES,
        interval: float = IDLE_INTERVAL,
    ) -> None:
        self.on_change = on_change
        self.threshold = threshold
        self.busy_samples = busy_samples
        self.idle_samples = idle_samples
        self.interval = interval
        self.busy = False
        self.other = 0.0  # cores used by others over the latest interval
        self._ours = CpuMeter()
        self._machine: float | None = None
        self._when = 0.0

    @staticmethod
    def available() -> bool:
        return HAVE_PROC and machine_busy_seconds() is not None

    def sample(self) -> float:
        """Cores the rest of the machine used since the last sample."""
        loop_time = asyncio.get_running_loop().time()
        machine = machine_busy_seconds() or 0.0
        # the worker itself too: sending many small results costs CPU that is not the owner's
        ours = self._ours.sample(process_tree([os.getpid()]).values())
        last, self._machine = self._machine, machine
        elapsed, self._when = loop_time - self._when, loop_time
        if last is None or elapsed <= 0:
            return 0.0
        return max(0.0, (machine - last - ours) / elapsed)

    async def run(self) -> None:
        self.sample()
        busy_run = idle_run = 0
        while True:
            await asyncio.sleep(self.interval)
            self.other = self.sample()
            if self.other > self.threshold:
                busy_run, idle_run = busy_run + 1, 0
            else:
                busy_run, idle_run = 0, idle_run + 1
            if not self.busy and busy_run >= self.busy_samples:
                self.busy = True
                log.info("the machine is busy (%.0f%% of a core not ours)", self.other * 100)
                self.on_change(True)
            elif self.busy and idle_run >= self.idle_samples:
                self.busy = False
                log.info("the machine is idle again")
                self.on_change(False)


# ---- the CPU cap -------------------------------------------------------------------------------


class CpuCap:
    """Keeps the tasks' processes at most at ``percent`` of the whole machine."""

    description = ""

    async def run(self, roots: Callable[[], list[int]], control: ProcessControl) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Undo what the cap set up (the processes are gone or continued)."""


class CgroupCap(CpuCap):
    """A cgroup with a CPU quota; the task processes are moved into it as they appear (their
    descendants are born in it)."""

    def __init__(self, path: Path, procs_file: Path, parent_procs: Path, description: str) -> None:
        self.path = path
        self.procs_file = procs_file
        self.parent_procs = parent_procs
        self.description = description
        self._moved: set[tuple[int, int]] = set()

    @classmethod
    def create(cls, percent: float, cpus: int) -> CgroupCap | str:
        """The cap in a new cgroup, or why none could be made."""
        quota = max(1000, int(CGROUP_PERIOD_US * cpus * percent / 100))
        name = f"dcproto-worker-{os.getpid()}"
        reasons = []
        for version, parent in _cgroup_parents():
            _remove_stale(parent)
            path = parent / name
            try:
                path.mkdir(exist_ok=True)
                if version == 1:
                    (path / "cpu.cfs_period_us").write_text(str(CGROUP_PERIOD_US))
                    (path / "cpu.cfs_quota_us").write_text(str(quota))
                    setting = f"cpu.cfs_quota_us {quota} per {CGROUP_PERIOD_US} us"
                else:
                    (path / "cpu.max").write_text(f"{quota} {CGROUP_PERIOD_US}")
                    setting = f"cpu.max {quota} {CGROUP_PERIOD_US}"
            except OSError as exc:
                reasons.append(f"{path}: {exc.strerror or exc}")
                with contextlib.suppress(OSError):
                    path.rmdir()
                continue
            description = f"cgroup v{version} {path} ({setting})"
            return cls(path, path / "cgroup.procs", parent / "cgroup.procs", description)
        return "; ".join(reasons) or "no cgroup with the cpu controller is mounted"

    async def run(self, roots: Callable[[], list[int]], control: ProcessControl) -> None:
        while True:
            for stat in process_tree(roots()).values():
                if stat.key not in self._moved and stat.state != "Z":
                    try:
                        self.procs_file.write_text(str(stat.pid))
                        self._moved.add(stat.key)
                    except OSError as exc:  # gone meanwhile, or not movable: try it again
                        log.debug("cannot move %d into %s: %s", stat.pid, self.path, exc)
            await asyncio.sleep(TREE_REFRESH / 2)

    def close(self) -> None:
        # whatever a task left running goes back to our own cgroup, then the group goes
        with contextlib.suppress(OSError):
            for pid in self.procs_file.read_text().split():
                with contextlib.suppress(OSError):
                    self.parent_procs.write_text(pid)
        try:
            self.path.rmdir()
        except OSError as exc:
            log.warning("cannot remove the cgroup %s: %s", self.path, exc.strerror or exc)


def _cgroup_parents() -> list[tuple[int, Path]]:
    """(version, directory) where this process's cgroup with the cpu controller is, v1 first."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    paths: dict[str, str] = {}  # controller list ("" for v2) -> this process's path in it
    for line in own:
        _, controllers, path = line.split(":", 2)
        paths[controllers] = path
    found: list[tuple[int, Path]] = []
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        mount, kind, options = Path(fields[1]), fields[2], fields[3].split(",")
        if kind == "cgroup" and "cpu" in options:
            own_path = next((p for c, p in paths.items() if "cpu" in c.split(",")), "/")
            candidates = [mount / own_path.lstrip("/"), mount]
            found += [(1, c) for c in dict.fromkeys(candidates) if c.is_dir()]
        elif kind == "cgroup2":
            directory = mount / paths.get("", "/").lstrip("/")
            with contextlib.suppress(OSError):
                if "cpu" in (directory / "cgroup.controllers").read_text().split():
                    # children get the cpu controller only if this group hands it down
                    subtree = directory / "cgroup.subtree_control"
                    if "cpu" not in subtree.read_text().split():
                        subtree.write_text("+cpu")
                    found.append((2, directory))
    found.sort(key=lambda item: item[0])
    return found


def _remove_stale(parent: Path) -> None:
    """Empty groups a killed worker left behind (an empty cgroup's rmdir is all it takes)."""
    with contextlib.suppress(OSError):
        for entry in parent.glob("dcproto-worker-*"):
            pid = entry.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not (PROC / pid).exists():
                with contextlib.suppress(OSError):
                    entry.rmdir()


class DutyCycleCap(CpuCap):
    """SIGCONT, run a share of each 100 ms period, SIGSTOP: the share is the cap over what the
    tasks use while they run (measured over the last second)."""

    def __init__(self, percent: float, cpus: int) -> None:
        self.target = cpus * percent / 100  # cores
        self.share = 1.0
        self.stops = 0  # periods the tasks were stopped in (for the tests and the logs)
        self.description = (
            f"stopping and continuing the task processes in {DUTY_PERIOD * 1000:.0f} ms periods"
        )

    async def run(self, roots: Callable[[], list[int]], control: ProcessControl) -> None:
        loop = asyncio.get_running_loop()
        meter = CpuMeter()
        window: deque[tuple[float, float]] = deque(maxlen=DUTY_WINDOW)
        pids: list[int] = []
        refreshed = -TREE_REFRESH
        stopped = False
        try:
            while True:
                start = loop.time()
                if start - refreshed >= TREE_REFRESH:
                    pids, refreshed = tree_pids(roots()), start
                if stopped and not control.paused:
                    signal_pids(pids, signal.SIGCONT)
                stopped = False
                running = self.share * DUTY_PERIOD
                await asyncio.sleep(running)
                ran = loop.time() - start
                if self.share < 1.0 and not control.paused:
                    signal_pids(pids, signal.SIGSTOP)
                    stopped = True
                    self.stops += 1
                await asyncio.sleep(max(0.0, start + DUTY_PERIOD - loop.time()))
                used = meter.sample(s for pid in pids if (s := read_stat(pid)) is not None)
                if control.paused:
                    window.clear()  # stopped by the pause: says nothing about their appetite
                    continue
                window.append((used, ran))
                cpu, on = sum(u for u, _ in window), sum(r for _, r in window)
                appetite = cpu / on if on > 0 else 0.0  # cores the tasks use while running
                self.share = 1.0 if appetite <= self.target else self.target / appetite
                self.share = max(DUTY_MIN_SHARE, self.share)
        finally:
            if stopped and not control.paused:
                signal_pids(tree_pids(roots()), signal.SIGCONT)


def make_cpu_cap(percent: float, cpus: int | None = None) -> CpuCap:
    """A cgroup's quota if one can be made here, else the duty cycle; logs which."""
    cpus = cpus or cpu_count()
    made = CgroupCap.create(percent, cpus)
    if isinstance(made, CgroupCap):
        log.info("CPU limit %g%% of %d CPUs: %s", percent, cpus, made.description)
        return made
    cap = DutyCycleCap(percent, cpus)
    log.info("CPU limit %g%% of %d CPUs: no cgroup (%s); %s", percent, cpus, made, cap.description)
    return cap


# ---- all of it, for the worker ---------------------------------------------------------------


class ProcessControl:
    """Pauses and continues the task processes (``roots()``: the child pids), runs the CPU
    cap and the idle monitor, and measures what the tasks use."""

    def __init__(
        self,
        roots: Callable[[], list[int]],
        *,
        cpu_limit: float | None = None,
        when_idle: Callable[[bool], None] | None = None,
    ) -> None:
        self.roots = roots
        self.cpu_limit = cpu_limit
        self.paused = False
        self.cap: CpuCap | None = None
        self.monitor: IdleMonitor | None = None
        self._on_idle_change = when_idle
        self._tasks: list[asyncio.Task[None]] = []
        self._usage_meter = CpuMeter()
        self._usage_when: float | None = None
        self._closed = False

    def start(self) -> None:
        """Start the cap and the idle monitor (in the running loop)."""
        if self._closed:
            return
        self._spawn(self._keep_paused())
        if self.cpu_limit is not None and self.cpu_limit < 100:
            self.cap = make_cpu_cap(self.cpu_limit)
            self._spawn(self.cap.run(self.roots, self))
        if self._on_idle_change is not None:
            if IdleMonitor.available():
                self.monitor = IdleMonitor(self._on_idle_change)
                self._spawn(self.monitor.run())
            else:
                log.warning("--when-idle needs /proc (Linux): the tasks run regardless")
        self.usage()  # the first figures count from here

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        task.add_done_callback(_log_failure)
        self._tasks.append(task)

    def pause(self) -> int:
        """SIGSTOP every task process; how many were stopped."""
        if self._closed:
            return 0
        self.paused = True
        return signal_pids(tree_pids(self.roots()), signal.SIGSTOP)

    async def _keep_paused(self) -> None:
        """Stop what started since the pause (a child that was still starting, say)."""
        while True:
            await asyncio.sleep(1.0)
            if self.paused:
                procs = process_tree(self.roots()).values()
                signal_pids((s.pid for s in procs if s.state not in "TtZ"), signal.SIGSTOP)

    def resume(self) -> int:
        self.paused = False
        return signal_pids(tree_pids(self.roots()), signal.SIGCONT)

    def usage(self) -> dict[str, Any]:
        """The tasks' CPU (share of the whole machine, in percent) since the last call, and
        their resident memory now; None where this system cannot tell."""
        if not HAVE_PROC:
            return {"cpu_percent": None, "rss_bytes": None}
        procs = process_tree(self.roots())
        used = self._usage_meter.sample(procs.values())
        now = time.monotonic()
        last, self._usage_when = self._usage_when, now
        cpu = None
        if last is not None and now > last:
            cpu = round(100 * used / (now - last) / cpu_count(), 1)
        return {"cpu_percent": cpu, "rss_bytes": sum(s.rss for s in procs.values())}

    def release(self) -> None:
        """Continue every task process and stop capping and pausing (the worker is leaving:
        its tasks must be able to give up)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self.paused or self.cap is not None:
            self.paused = False
            signal_pids(tree_pids(self.roots()), signal.SIGCONT)

    async def close(self) -> None:
        self.release()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self.cap is not None:
            self.cap.close()
            self.cap = None


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("process control failed", exc_info=task.exception())
