"""Where the time goes on dcproto's path: ``python -m bench.profile_path``.

The same set-up as :mod:`bench.cpu_per_task` (a TLS server, one 2-slot worker with the default
sandbox, a project class with ``results_path`` submitted from this process), with the server
and the worker under cProfile, and this process's calling thread and its client event loop
thread profiled while one project of ``--tasks`` one-item tasks runs (or, with
``--one-item-projects N``, while N one-item projects run one after the other). Prints each process's
top functions by own time (``--top``), and keeps the ``.prof`` files with ``--keep DIR``
(``python -m pstats FILE`` reads them). The worker's children are not profiled: their share is
in :mod:`bench.cpu_per_task`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from bench.cpu_per_task import plus_one_project
from bench.scheduling import Cluster
from dcproto.creator.client import background_loop


def project(tasks: int, results_path: Path, task_size: int = 1) -> None:
    plus_one_project(tasks * task_size, results_path, task_size)().get_results(timeout=600)


def on_loop(action: str, profiler: cProfile.Profile) -> None:
    """Enable or disable ``profiler`` in the client's event loop thread (cProfile is per
    thread)."""
    done = threading.Event()

    def switch() -> None:
        getattr(profiler, action)()
        done.set()

    background_loop().call_soon_threadsafe(switch)
    done.wait(10)


def report(title: str, stats: pstats.Stats, top: int) -> None:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    print(f"\n==== {title} ====")
    print("\n".join(lines[:3] + lines[-(top + 1) :]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_path", description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--task-size", type=int, default=1, help="items per task")
    parser.add_argument(
        "--one-item-projects",
        type=int,
        default=0,
        metavar="N",
        help="profile N one-item projects in a row (the round trip) instead of one big one",
    )
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--keep", type=Path, help="a directory to keep the .prof files in")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dcproto-profile-") as tmp:
        profiles = Path(tmp) / "profiles"
        profiles.mkdir()
        cluster = Cluster(Path(tmp), profile_dir=profiles)
        caller, loop = cProfile.Profile(), cProfile.Profile()
        try:
            cluster.start()
            cluster.worker("worker", slots=2)
            project(500, Path(tmp) / "warm")
            on_loop("enable", loop)
            caller.enable()
            if args.one_item_projects:
                for n in range(args.one_item_projects):
                    project(1, Path(tmp) / f"results-{n}")
            else:
                project(args.tasks, Path(tmp) / "results", args.task_size)
            caller.disable()
            on_loop("disable", loop)
        finally:
            cluster.close()  # SIGTERM: the server and the worker write their profiles
        for name in ("server", "worker"):
            path = profiles / f"{name}.prof"
            if path.exists():
                report(f"{name} (the whole run)", pstats.Stats(str(path)), args.top)
            else:
                print(f"\n==== {name}: no profile written ====")
        report("creator: the client's event loop thread", pstats.Stats(loop), args.top)
        report("creator: the calling thread", pstats.Stats(caller), args.top)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in profiles.iterdir():
                shutil.copy(path, args.keep / path.name)
            loop.dump_stats(args.keep / "creator-loop.prof")
            caller.dump_stats(args.keep / "creator-caller.prof")
    return 0


if __name__ == "__main__":
    sys.exit(main())
