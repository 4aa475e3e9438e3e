"""What /proc says of processes: one reader for the worker (caps, pausing, usage) and for its
children (killing what a task left behind). Linux only; elsewhere every lookup finds nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
HAVE_PROC = (PROC / "self" / "stat").exists()
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What /proc/PID/stat says of one process."""

    pid: int
    ppid: int
    state: str  # R, S, D, T (stopped), Z, ...
    ticks: int  # CPU clock ticks: its own and its reaped children's (utime+stime+cutime+cstime)
    start: int  # start time in ticks since boot: with the pid, names the process for good
    rss: int  # bytes resident

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)

    @property
    def cpu(self) -> float:
        """CPU seconds, its own and those of the children it reaped."""
        return self.ticks / CLOCK_TICKS


def read_stat(pid: int) -> ProcStat | None:
    """The process's stat line; None if it is gone (or there is no /proc)."""
    try:
        with open(PROC / str(pid) / "stat", "rb") as file:
            data = file.read()
    except OSError:
        return None
    # the command name (2nd field) may hold spaces and parentheses: split after the last ")"
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return ProcStat(
            pid=pid,
            ppid=int(fields[1]),
            state=fields[0].decode("ascii", "replace"),
            ticks=int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]),
            start=int(fields[19]),
            rss=int(fields[21]) * PAGE_SIZE,
        )
    except (IndexError, ValueError):
        return None


def all_processes() -> dict[int, ProcStat]:
    """Every process this one can see in /proc."""
    found: dict[int, ProcStat] = {}
    try:
        entries = os.scandir(PROC)
    except OSError:
        return found
    with entries:
        for entry in entries:
            if entry.name.isdigit() and (stat := read_stat(int(entry.name))) is not None:
                found[stat.pid] = stat
    return found


def descendants(root: int, table: dict[int, ProcStat] | None = None) -> list[ProcStat]:
    """Every process whose chain of parents leads to ``root`` (not ``root`` itself), from
    ``table`` (by default, every process now)."""
    if table is None:
        table = all_processes()
    children: dict[int, list[ProcStat]] = {}
    for stat in table.values():
        children.setdefault(stat.ppid, []).append(stat)
    found: list[ProcStat] = []
    todo, seen = [root], {root}
    while todo:
        for stat in children.get(todo.pop(), ()):
            if stat.pid not in seen:
                seen.add(stat.pid)
                found.append(stat)
                todo.append(stat.pid)
    return found
