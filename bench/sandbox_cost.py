"""What the volunteer's protections cost: ``python -m bench.sandbox_cost``.

On a fresh ``dcproto-server`` per mode, one 2-slot ``dcproto-worker`` with ``--sandbox off``
and with ``--sandbox auto`` (bubblewrap where it works), the way users run them:

* start-up: from starting the worker process to a first one-item result of a new project;
* tasks/s: 5,000 one-item tasks of one project (warm children: the per-task cost);
* new project: a 1-item project right after another project (a clean child per project).

Each repetition starts a new server and worker; the modes take turns; medians are printed.

Ratios within one run compare; machines differ from one session to the next.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.scheduling import Cluster, Identity
from dcproto import Distribute

USER = "sched"


def run(items: Any) -> float:
    cls = Distribute(user_name=USER, iterator=items, parallel_func="parallel_func")(
        type("Cost", (Identity,), {})
    )
    began = time.perf_counter()
    cls().get_results(timeout=300)
    return time.perf_counter() - began


def measure(workdir: Path, mode: str, tasks: int) -> dict[str, float]:
    workdir.mkdir()
    cluster = Cluster(workdir)
    try:
        cluster.start()
        began = time.perf_counter()
        cluster.worker("w", extra=("--sandbox", mode), slots=2)
        run([0])
        startup = time.perf_counter() - began
        new_project = [run([i]) for i in range(3)]
        return {
            "startup_s": startup,
            "new_project_s": statistics.median(new_project),
            "tasks_per_s": tasks / run(range(tasks)),
        }
    finally:
        cluster.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sandbox_cost", description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"off": [], "auto": []}
    with tempfile.TemporaryDirectory(prefix="dcproto-sandbox-cost-") as tmp:
        # the modes take turns, so a change in the machine's load falls on both alike
        for rep in range(args.reps):
            for mode in runs:
                figures = measure(Path(tmp) / f"{mode}-{rep}", mode, args.tasks)
                runs[mode].append(figures)
                print(f"{mode}: {json.dumps(figures)}", flush=True)
    off, auto = (
        {key: statistics.median(r[key] for r in runs[mode]) for key in runs[mode][0]}
        for mode in runs
    )
    print(f"median of {args.reps}: off {json.dumps(off)}, auto {json.dumps(auto)}")
    print(
        f"auto/off: start-up x{auto['startup_s'] / off['startup_s']:.2f}, new project "
        f"x{auto['new_project_s'] / off['new_project_s']:.2f}, tasks/s "
        f"x{auto['tasks_per_s'] / off['tasks_per_s']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
