"""CPU per task in every process of dcproto's path: ``python -m bench.cpu_per_task``.

A real ``dcproto-server`` (TLS, durable state) and one ``dcproto-worker --slots 2`` (the default
sandbox), the creator in this process, one project of ``--tasks`` one-item tasks of ``x + 1``,
submitted as a class defined here with ``Distribute``, in two forms:

* ``plain``: no ``results_path``;
* ``readme``: ``results_path`` set, as the README shows.

CPU time is read from ``/proc`` (user + system, the process and its reaped children) for the
server, the worker, the worker's children (every process under the worker) and, for the
creator, this whole process (``time.process_time``, all its threads). Divided by the tasks, it
is the figure that survives a change of machine better than a rate: track it from run to run
in ``docs/benchmarks.md``. Medians of ``--reps`` projects on one warmed server and worker.

``--pin`` runs the server alone on the first CPU and the worker, its children and this
process on the others (every thread of each process, set once all are up): what a deployment
with the server on its own machine gets, measured on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.scheduling import USER, Cluster
from bench.workloads import FILTER_KEEP_EVERY
from dcproto import Distribute, ProjectHandle
from dcproto.worker.control import process_tree

TICK = 1 / os.sysconf("SC_CLK_TCK")
PROCESSES = ("server", "worker", "children", "creator")


class PlusOne:
    @staticmethod
    def parallel_func(x: int) -> int:
        return x + 1


class PlusOneKeepRare(PlusOne):
    """The filter workload's shape: keep one value in FILTER_KEEP_EVERY."""

    @staticmethod
    def keep(value: int) -> bool:
        return value % FILTER_KEEP_EVERY == 0


def cpu_seconds(cluster: Cluster) -> dict[str, float]:
    assert cluster.server is not None
    [worker] = cluster.workers
    server = sum(s.ticks for s in process_tree([cluster.server.pid]).values())
    tree = process_tree([worker.pid])
    own = tree[worker.pid].ticks if worker.pid in tree else 0
    below = sum(s.ticks for pid, s in tree.items() if pid != worker.pid)
    return {
        "server": server * TICK,
        "worker": own * TICK,
        "children": below * TICK,
        "creator": time.process_time(),
    }


def pin(pids: list[int], cpus: set[int]) -> None:
    """Bind every thread of each process in ``pids`` to ``cpus``."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), cpus)


def pin_apart(cluster: Cluster) -> None:
    """The server alone on CPU 0; the worker's tree and this process on the rest."""
    assert cluster.server is not None
    [worker] = cluster.workers
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    pin(list(process_tree([cluster.server.pid])), {cpus[0]})
    pin([*process_tree([worker.pid]), os.getpid()], set(cpus[1:]))


def plus_one_project(
    items: int, results_path: Path | None, task_size: int = 1, *, filtered: bool = False
) -> type[ProjectHandle]:
    """A fresh project class over ``range(items)``, as a user's script declares one."""
    base = PlusOneKeepRare if filtered else PlusOne
    return Distribute(
        user_name=USER,
        iterator=range(items),
        task_size=task_size,
        results_path=str(results_path) if results_path else None,
        only_if_func="keep" if filtered else None,
        progress=False,
    )(type("PlusOne", (base,), {}))


def one_project(
    cluster: Cluster,
    tasks: int,
    results_path: Path | None,
    task_size: int = 1,
    *,
    filtered: bool = False,
) -> dict[str, float]:
    """CPU per task of one project; with ``task_size > 1``, ns of CPU per item instead."""
    items = tasks * task_size
    cls = plus_one_project(items, results_path, task_size, filtered=filtered)
    before = cpu_seconds(cluster)
    began = time.perf_counter()
    results = cls().get_results(timeout=600)
    wall = time.perf_counter() - began
    after = cpu_seconds(cluster)
    kept = range(FILTER_KEEP_EVERY - 1, items, FILTER_KEEP_EVERY) if filtered else range(items)
    assert results == {x: x + 1 for x in kept}
    scale = 1e6 / tasks if task_size == 1 else 1e9 / items
    figures = {name: (after[name] - before[name]) * scale for name in PROCESSES}
    figures["total"] = sum(figures[name] for name in PROCESSES)
    figures["tasks_per_s" if task_size == 1 else "items_per_s"] = items / wall
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_per_task", description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sandbox", default="auto", choices=("auto", "off"))
    parser.add_argument(
        "--task-size", type=int, default=1, help="items per task; above 1, ns of CPU per item"
    )
    parser.add_argument(
        "--filter",
        action="store_true",
        help=f"an only_if function keeping one value in {FILTER_KEEP_EVERY:,} (the filter shape)",
    )
    parser.add_argument(
        "--pin", action="store_true", help="the server alone on one CPU, the rest on the others"
    )
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dcproto-cpu-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            cluster.start()
            cluster.worker("w", slots=2, extra=("--sandbox", args.sandbox))
            one_project(cluster, 500, None)  # warm: children, connections, caches
            if args.pin:
                pin_apart(cluster)
            for form in ("plain", "readme"):
                runs = []
                for rep in range(args.reps):
                    path = Path(tmp) / f"results-{form}-{rep}" if form == "readme" else None
                    runs.append(
                        one_project(cluster, args.tasks, path, args.task_size, filtered=args.filter)
                    )
                report[form] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        finally:
            cluster.close()
    per_item = args.task_size > 1
    shape = f"tasks of {args.task_size:,} items" if per_item else "one-item tasks"
    unit = "ns of CPU per item" if per_item else "µs of CPU per task"
    rate = "items_per_s" if per_item else "tasks_per_s"
    pinned = "; server pinned to its own CPU" if args.pin else ""
    print(
        f"{args.tasks:,} {shape}, medians of {args.reps}, --sandbox {args.sandbox}{pinned}; {unit}"
    )
    header = " ".join(f"{name:>9}" for name in (*PROCESSES, "total"))
    print(f"{'form':8} {header}   {rate.replace('_per_s', '/s')}")
    for form, figures in report.items():
        cells = " ".join(f"{figures[name]:9.0f}" for name in (*PROCESSES, "total"))
        print(f"{form:8} {cells}   {figures[rate]:9,.0f}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
