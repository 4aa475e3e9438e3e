"""The benchmark's workloads: module-level functions every system can pickle, and the sizes.

The work per item is calibrated once per run in the bench process (``configure``) and handed to
every other process through environment variables, read when this module is imported, so a
dcproto worker's child, a Pool child, a Dask worker and a Ray worker all do the same work.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

CPU_LOOPS_ENV = "BENCH_CPU_LOOPS"
STOP_LOOPS_ENV = "BENCH_STOP_LOOPS"
STOP_TARGET_ENV = "BENCH_STOP_TARGET"

CPU_LOOPS = int(os.environ.get(CPU_LOOPS_ENV) or 130_000)  # ~10 ms of pure Python
STOP_LOOPS = int(os.environ.get(STOP_LOOPS_ENV) or 260)  # ~20 us
STOP_TARGET = int(os.environ.get(STOP_TARGET_ENV) or 100_000)

SLOTS = 2  # worker slots everywhere
WINDOW = 4 * SLOTS  # chunks in flight for the peers that submit chunk by chunk
PAYLOAD_BYTES = 100 * 1024
FILTER_KEEP_EVERY = 10_000

# late-joiner: two fresh slots warmed on LATE_WARM one-item `plus_one` tasks, then LATE_TASKS
# tasks of LATE_TASK_S each; a third slot is started LATE_JOIN_S after the submit. The same in
# --quick: the figure is about scheduling, not size.
LATE_WARM = 200
LATE_TASKS = 12
LATE_TASK_S = 1.0
LATE_JOIN_S = 0.8

FULL_SIZES: dict[str, Any] = {
    "overhead": 10_000,
    "batched": 1_000_000,
    "batched_task_size": 10_000,
    "cpu": 400,
    "latency": 200,
    "payload": 500,
    "stop_target": 100_000,
    "stop_task_size": 1_000,
    "filter": [10**6, 10**7],
    "filter_task_size": 10_000,
}
QUICK_SIZES: dict[str, Any] = {
    "overhead": 2_000,
    "batched": 200_000,
    "batched_task_size": 10_000,
    "cpu": 100,
    "latency": 50,
    "payload": 100,
    "stop_target": 20_000,
    "stop_task_size": 1_000,
    "filter": [10**5, 10**6],
    "filter_task_size": 10_000,
}

# The workloads, in the order they run and are reported.
WORKLOADS = (
    "overhead", "batched", "cpu", "latency", "payload", "early-stop", "filter", "late-joiner",
    "startup",
)  # fmt: skip


# ---- per-item functions ------------------------------------------------------------------------


def _spin(x: int, loops: int) -> int:
    acc = x
    for i in range(loops):
        acc = (acc * 31 + i) % 1_000_003
    return acc


def plus_one(x: int) -> int:
    return x + 1


def cpu_work(x: int) -> int:
    """About 10 ms of pure-Python work (calibrated)."""
    return _spin(x, CPU_LOOPS)


def payload(x: int) -> bytes:
    """100 KiB of incompressible bytes."""
    return os.urandom(PAYLOAD_BYTES)


def stop_item(x: int) -> bool:
    """About 20 us of work; True for the one item the early-stop workload looks for."""
    _spin(x, STOP_LOOPS)
    return x == STOP_TARGET


def sleep_task(x: int) -> int:
    """A task of ``LATE_TASK_S`` that sleeps rather than spins: the late-joiner figure is then
    about scheduling alone, whatever else loads the machine (and 3 slots fit on 2 CPUs)."""
    time.sleep(LATE_TASK_S)
    return x


def is_true(value: Any) -> bool:
    return bool(value)


def keep_one_in_10k(value: int) -> bool:
    return value % FILTER_KEEP_EVERY == 0


# ---- per-chunk functions (for the peers that batch by hand) -------------------------------------


def apply_chunk(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    return [fn(x) for x in items]


class Batch:
    """A batch of values as one opaque object: Dask serializes a returned list element by
    element (about 70x slower for 10,000 ints here), but an object like this in one pickle."""

    __slots__ = ("values",)

    def __init__(self, values: list[Any]) -> None:
        self.values = values


def apply_chunk_batch(fn: Callable[[Any], Any], items: list[Any]) -> Batch:
    return Batch([fn(x) for x in items])


def first_hit(fn: Callable[[Any], Any], items: list[Any]) -> Any:
    """The first item whose value is truthy, or None; stops at the hit like dcproto does."""
    for x in items:
        if fn(x):
            return x
    return None


def filter_chunk(
    fn: Callable[[Any], Any], keep: Callable[[Any], Any], items: list[Any]
) -> list[tuple[Any, Any]]:
    out = []
    for x in items:
        value = fn(x)
        if keep(value):
            out.append((x, value))
    return out


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items, sliced lazily (like dcproto's task_size)."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


# ---- calibration -------------------------------------------------------------------------------


def _loops_for(seconds: float) -> int:
    probe = 20_000
    best = math.inf
    for _ in range(7):
        started = time.perf_counter()
        _spin(1, probe)
        best = min(best, time.perf_counter() - started)
    return max(1, round(probe * seconds / best))


def configure(stop_target: int) -> dict[str, int]:
    """Calibrate the work per item on this machine and export it to every later process."""
    global CPU_LOOPS, STOP_LOOPS, STOP_TARGET
    CPU_LOOPS = _loops_for(0.010)
    STOP_LOOPS = _loops_for(20e-6)
    STOP_TARGET = stop_target
    os.environ[CPU_LOOPS_ENV] = str(CPU_LOOPS)
    os.environ[STOP_LOOPS_ENV] = str(STOP_LOOPS)
    os.environ[STOP_TARGET_ENV] = str(STOP_TARGET)
    return {"cpu_loops": CPU_LOOPS, "stop_loops": STOP_LOOPS, "stop_target": STOP_TARGET}


# ---- statistics --------------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
