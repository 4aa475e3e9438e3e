"""What TLS costs dcproto: the same real-path cluster with TLS on and off, in one run.

    python -m bench.tls_cost [--reps 3] [--quick] [--overhead N] [--payload N]

Two clusters as in ``python -m bench`` (a ``dcproto-server`` subprocess with durable state, one
``dcproto-worker --slots 2`` subprocess, the creator in this process, 127.0.0.1): one on TLS (the
default: the server's self-signed certificate pinned by its fingerprint), one on plain TCP
(``--insecure`` on the server and the worker, ``User(insecure=True)``). Both are up for the
whole run and take turns, one repetition at a time (the order alternating), so a machine that
gets busier or quieter mid-run shifts both alike. Workloads (``bench.workloads``):

* overhead: 10,000 one-item tasks of ``x + 1`` (task_size 1): tasks/s;
* payload: 500 one-item tasks each returning 100 KiB of random bytes: MB/s.

Prints the medians and the ratio TLS / plain (below 1: TLS is slower).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import workloads as w
from bench.dcproto_runner import DcprotoSystem
from bench.harness import run_workload, warm_system

ROOT = Path(__file__).resolve().parent.parent
#: workload -> (its metric in the harness, its label here)
METRICS = {"overhead": ("tasks_per_s", "tasks/s"), "payload": ("mb_per_s", "MB/s")}
MODES = ("TLS", "plain TCP")


def log(message: str) -> None:
    print(f"[tls_cost {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tls_cost", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per mode (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="the quick sizes of python -m bench --quick"
    )
    parser.add_argument("--overhead", type=int, default=None, help="one-item x + 1 tasks")
    parser.add_argument("--payload", type=int, default=None, help="one-item 100 KiB tasks")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per project")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    return args


def measure(
    systems: dict[str, DcprotoSystem], workload: str, sizes: dict[str, Any], reps: int
) -> dict[str, list[float]]:
    """``reps`` timed runs of ``workload`` on each system, taking turns; the metric's values."""
    key = METRICS[workload][0]
    values: dict[str, list[float]] = {mode: [] for mode in systems}
    for rep in range(reps):
        order = list(systems) if rep % 2 == 0 else list(reversed(systems))
        for mode in order:
            result = run_workload(systems[mode], workload, sizes, 1)  # warms, then one timed run
            if "error" in result:
                raise RuntimeError(f"{workload} on {mode}: {result['error']}")
            values[mode].append(result["reps"][0][key])
            log(f"{workload} rep {rep + 1}/{reps} {mode}: {values[mode][-1]:,.1f} {key}")
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = dict(w.QUICK_SIZES if args.quick else w.FULL_SIZES)
    if args.overhead is not None:
        sizes["overhead"] = args.overhead
    if args.payload is not None:
        sizes["payload"] = args.payload
    with tempfile.TemporaryDirectory(prefix="dcproto-tls-cost-") as tmp:
        workdir = Path(tmp)
        # the worker imports bench.workloads; the named users live in a throwaway config dir
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        os.environ["DCPROTO_CONFIG_DIR"] = str(workdir / "config")
        systems: dict[str, DcprotoSystem] = {}
        load_start = os.getloadavg()[0]
        try:
            for mode, user in zip(MODES, ("tlson", "tlsoff"), strict=True):
                where = workdir / user
                where.mkdir()
                system = DcprotoSystem(
                    where, timeout=args.timeout, user=user, insecure=mode != "TLS"
                )
                systems[mode] = system
                started = time.perf_counter()
                system.start()
                warm_system(system)
                log(f"{mode}: up and warm in {time.perf_counter() - started:.2f} s")
            results = {wl: measure(systems, wl, sizes, args.reps) for wl in METRICS}
        except Exception:
            for mode, system in systems.items():
                log(f"{mode} logs:\n{system.log_tail()}")
            raise
        finally:
            for system in systems.values():
                system.close()
        load_end = os.getloadavg()[0]
    print(
        f"dcproto, TLS on and off: one dcproto-server and one dcproto-worker --slots 2 each, "
        f"127.0.0.1, median of {args.reps} alternating repetitions"
    )
    print()
    print("| workload | TLS | plain TCP (--insecure) | TLS / plain |")
    print("|---|---|---|---|")
    for workload, values in results.items():
        unit = METRICS[workload][1]
        tls, plain = (statistics.median(values[mode]) for mode in MODES)
        if workload == "overhead":
            what = f"overhead: {sizes['overhead']:,} one-item tasks of x + 1"
        else:
            what = f"payload: {sizes['payload']:,} one-item tasks of 100 KiB results"
        print(f"| {what} | {tls:,.1f} {unit} | {plain:,.1f} {unit} | {tls / plain:.2f} |")
    print()
    print(
        f"1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end, "
        f"on {os.cpu_count()} CPUs (more than about 2: other work shared the machine)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
