"""What every system implements, and the workloads written once against it.

A ``System`` is dcproto or one of its peers with two worker slots. ``run_workload`` warms it on
a tiny version of the workload, then times ``reps`` repetitions and keeps every repetition's
metrics plus their medians. It runs in the bench process for dcproto and in a subprocess for
each peer (``bench.peers``), so both sides are measured by the same code.
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from bench import workloads as w

Handle = Any


class Unsupported(Exception):
    """The system cannot express this workload; the message says why (shown in the report)."""


class Windowed(Protocol):
    """A peer that submits chunk by chunk, with at most ``WINDOW`` chunks in flight."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Handle: ...
    def wait_first(self, handles: list[Handle]) -> tuple[list[Handle], list[Handle]]: ...
    def get(self, handle: Handle) -> Any: ...
    def cancel(self, handles: list[Handle]) -> None: ...


class System:
    """dcproto or a peer. ``start`` brings it up and returns once a first one-item result is
    back (that is what "start-up" measures everywhere)."""

    name = "system"
    has_startup = True

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def map_items(self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int) -> dict:
        """``{item: fn(item)}``, ``task_size`` consecutive items per task."""
        raise NotImplementedError

    def single(self, fn: Callable[[Any], Any], x: Any) -> Any:
        """One item submitted alone and waited for."""
        raise NotImplementedError

    def single_as_written(self, x: int) -> Any:
        """``x + 1`` computed the way the system's users write one call: for dcproto a class
        of the user's script with ``results_path`` set, as the README shows; for the others,
        their usual call (the same as :meth:`single`)."""
        return self.single(w.plus_one, x)

    def early_stop(
        self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int
    ) -> tuple[Any, float]:
        """The first item with a truthy ``fn(item)``, and ``perf_counter()`` when it was known;
        the rest of the work is cancelled (after that moment)."""
        raise NotImplementedError

    def filter(
        self,
        fn: Callable[[Any], Any],
        keep: Callable[[Any], Any],
        items: Iterable[Any],
        task_size: int,
    ) -> dict:
        """``{item: fn(item)}`` for the items whose value ``keep`` accepts."""
        raise NotImplementedError

    def last_extra(self) -> dict[str, float]:
        """Extra metrics of the last ``filter`` call (dcproto: peak RSS)."""
        return {}

    def late_joiner(self) -> tuple[dict, int | None, float]:
        """Two fresh slots warmed on ``LATE_WARM`` one-item ``plus_one`` tasks; then
        ``LATE_TASKS`` one-item ``sleep_task`` tasks over ``range(LATE_TASKS)`` are submitted
        and a third slot joins ``LATE_JOIN_S`` later. Returns ``{item: value}``, the number of
        tasks the late slot ran (None: no late slot could be added) and the seconds from the
        submit to the last result."""
        raise Unsupported(f"{self.name} has no late-joiner")

    def note(self, workload: str) -> str | None:
        """What this system did differently on ``workload`` (a footnote in the report)."""
        return None


def run_windowed(
    backend: Windowed,
    fn: Callable[..., Any],
    args: Iterator[tuple[Any, ...]],
    on_result: Callable[[Any], bool],
    window: int = w.WINDOW,
) -> float | None:
    """Submit ``fn(*a)`` for each ``a`` with at most ``window`` in flight; ``on_result`` sees
    every value and returns True to stop, which cancels the rest. Returns when it stopped."""
    pending: list[Handle] = []
    exhausted = False
    while True:
        while not exhausted and len(pending) < window:
            nxt = next(args, None)
            if nxt is None:
                exhausted = True
            else:
                pending.append(backend.submit(fn, *nxt))
        if not pending:
            return None
        done, pending = backend.wait_first(pending)
        for handle in done:
            if on_result(backend.get(handle)):
                stopped = time.perf_counter()
                backend.cancel(pending)
                return stopped


def windowed_early_stop(
    backend: Windowed, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int
) -> tuple[Any, float]:
    found: list[Any] = []

    def on_result(hit: Any) -> bool:
        if hit is not None:
            found.append(hit)
            return True
        return False

    args = ((fn, chunk) for chunk in w.chunks(items, task_size))
    stopped = run_windowed(backend, w.first_hit, args, on_result)
    if stopped is None:
        raise RuntimeError("early stop: no item matched")
    return found[0], stopped


def windowed_filter(
    backend: Windowed,
    fn: Callable[[Any], Any],
    keep: Callable[[Any], Any],
    items: Iterable[Any],
    task_size: int,
) -> dict:
    out: dict[Any, Any] = {}

    def on_result(pairs: list[tuple[Any, Any]]) -> bool:
        out.update(pairs)
        return False

    args = ((fn, keep, chunk) for chunk in w.chunks(items, task_size))
    run_windowed(backend, w.filter_chunk, args, on_result)
    return out


# ---- the workloads -----------------------------------------------------------------------------


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(f"wrong results: {what}")


def _overhead(system: System, sizes: dict[str, Any]) -> dict[str, float]:
    n = sizes["overhead"]
    started = time.perf_counter()
    results = system.map_items(w.plus_one, range(n), 1)
    wall = time.perf_counter() - started
    _check(len(results) == n and results[n - 1] == n, "overhead")
    return {"wall_s": wall, "tasks_per_s": n / wall}


def _batched(system: System, sizes: dict[str, Any]) -> dict[str, float]:
    n = sizes["batched"]
    started = time.perf_counter()
    results = system.map_items(w.plus_one, range(n), sizes["batched_task_size"])
    wall = time.perf_counter() - started
    _check(len(results) == n and results[n - 1] == n, "batched")
    return {"wall_s": wall, "items_per_s": n / wall}


def _cpu(system: System, sizes: dict[str, Any]) -> dict[str, float]:
    n = sizes["cpu"]
    started = time.perf_counter()
    results = system.map_items(w.cpu_work, range(n), 1)
    wall = time.perf_counter() - started
    _check(len(results) == n, "cpu: count")
    return {"wall_s": wall}


def _latency(system: System, sizes: dict[str, Any]) -> dict[str, float]:
    samples, as_written = [], []
    for i in range(sizes["latency"]):
        started = time.perf_counter()
        value = system.single(w.plus_one, i)
        samples.append(time.perf_counter() - started)
        _check(value == i + 1, "latency")
        started = time.perf_counter()
        value = system.single_as_written(i)
        as_written.append(time.perf_counter() - started)
        _check(value == i + 1, "latency as written")
    return {
        "median_ms": statistics.median(samples) * 1000,
        "p99_ms": w.percentile(samples, 99) * 1000,
        "as_written_median_ms": statistics.median(as_written) * 1000,
    }


def _payload(system: System, sizes: dict[str, Any]) -> dict[str, float]:
    n = sizes["payload"]
    started = time.perf_counter()
    results = system.map_items(w.payload, range(n), 1)
    wall = time.perf_counter() - started
    _check(len(results) == n, "payload: count")
    _check(all(len(v) == w.PAYLOAD_BYTES for v in results.values()), "payload: sizes")
    return {"wall_s": wall, "mb_per_s": n * w.PAYLOAD_BYTES / 1e6 / wall}


def _early_stop(system: System, sizes: dict[str, Any]) -> dict[str, float]:
    started = time.perf_counter()
    hit, answered = system.early_stop(w.stop_item, range(10**9), sizes["stop_task_size"])
    _check(hit == w.STOP_TARGET, f"early stop found {hit!r}")
    value = system.single(w.plus_one, 0)
    free = time.perf_counter()
    _check(value == 1, "early stop: following item")
    return {"answer_s": answered - started, "free_again_s": free - answered}


def _filter(system: System, sizes: dict[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for n in sizes["filter"]:
        started = time.perf_counter()
        results = system.filter(w.plus_one, w.keep_one_in_10k, range(n), sizes["filter_task_size"])
        wall = time.perf_counter() - started
        _check(len(results) == n // w.FILTER_KEEP_EVERY, f"filter kept {len(results)}")
        _check(all((k + 1) % w.FILTER_KEEP_EVERY == 0 for k in results), "filter: keys")
        metrics[f"{n}.wall_s"] = wall
        metrics[f"{n}.items_per_s"] = n / wall
        for key, value in system.last_extra().items():
            metrics[f"{n}.{key}"] = value
    return metrics


def _late_joiner(system: System, sizes: dict[str, Any]) -> dict[str, float]:
    results, late, wall = system.late_joiner()
    _check(results == {i: i for i in range(w.LATE_TASKS)}, "late-joiner")
    out = {"wall_s": wall}
    if late is not None:
        out["late_tasks"] = float(late)
    return out


def _warm(system: System, workload: str, sizes: dict[str, Any]) -> None:
    """A tiny, untimed version of the workload (imports, first pickles, code paths)."""
    slots = w.SLOTS
    if workload == "overhead":
        system.map_items(w.plus_one, range(4 * slots), 1)
    elif workload == "batched":
        system.map_items(w.plus_one, range(1000), 100)
    elif workload == "cpu":
        system.map_items(w.cpu_work, range(2 * slots), 1)
    elif workload == "latency":
        for i in range(3):
            system.single(w.plus_one, i)
    elif workload == "payload":
        system.map_items(w.payload, range(2 * slots), 1)
    elif workload == "early-stop":
        system.early_stop(w.plus_one, range(10**9), sizes["stop_task_size"])  # hit at item 0
        system.single(w.plus_one, 0)
    elif workload == "filter":
        system.filter(w.plus_one, w.keep_one_in_10k, range(20_000), sizes["filter_task_size"])
    # late-joiner: every repetition warms slots of its own


def warm_system(system: System) -> None:
    """Once after start-up: both slots busy for a moment, then a burst of tiny items."""
    system.map_items(w.cpu_work, range(4 * w.SLOTS), 1)
    system.map_items(w.plus_one, range(100), 1)


RUNNERS: dict[str, Callable[[System, dict[str, Any]], dict[str, float]]] = {
    "overhead": _overhead,
    "batched": _batched,
    "cpu": _cpu,
    "latency": _latency,
    "payload": _payload,
    "early-stop": _early_stop,
    "filter": _filter,
    "late-joiner": _late_joiner,
}


def medians(reps: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in reps[0] if all(k in r for r in reps)]
    return {k: statistics.median(r[k] for r in reps) for k in keys}


def run_workload(
    system: System,
    workload: str,
    sizes: dict[str, Any],
    reps: int,
    on_rep: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Warm, then ``reps`` timed repetitions: ``{"reps": [...], "median": {...}}``, or
    ``{"error": ...}`` with whatever repetitions finished, or ``{"unsupported": why}``; with
    ``"note"`` when the system says it ran the workload its own way."""
    done: list[dict[str, float]] = []
    try:
        _warm(system, workload, sizes)
        for rep in range(reps):
            done.append(RUNNERS[workload](system, sizes))
            if on_rep is not None:
                on_rep(rep)
    except Unsupported as exc:
        return {"unsupported": str(exc)}
    except Exception as exc:
        out: dict[str, Any] = {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
            "reps": done,
        }
        if done:
            out["median"] = medians(done)
        if note := system.note(workload):
            out["note"] = note
        return out
    out = {"reps": done, "median": medians(done)}
    if note := system.note(workload):
        out["note"] = note
    return out
