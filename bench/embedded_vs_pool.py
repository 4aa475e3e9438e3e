"""10,000 items, task_size 100, on dcproto's embedded default next to multiprocessing.Pool.

    python -m bench.embedded_vs_pool [--items 10000] [--task-size 100] [--work 2000] [--reps 3]

Prints the median wall time of each (start-up timed apart from the work) and the ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

from dcproto import Distribute

WORK = int(os.environ.get("BENCH_WORK", "2000"))


def work(x: int) -> int:
    total = 0
    for i in range(WORK):
        total += (x * i) % 7
    return total


def run_dcproto(items: int, task_size: int, slots: int) -> float:
    @Distribute(iterator=range(items), task_size=task_size, local_workers=slots)
    class Bench:
        parallel_func = staticmethod(work)

    started = time.perf_counter()
    results = Bench().get_results(timeout=600)
    elapsed = time.perf_counter() - started
    assert len(results) == items
    return elapsed


def run_pool(pool: multiprocessing.pool.Pool, items: int, task_size: int) -> float:
    started = time.perf_counter()
    results = dict(
        zip(range(items), pool.map(work, range(items), chunksize=task_size), strict=True)
    )
    elapsed = time.perf_counter() - started
    assert len(results) == items
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--task-size", type=int, default=100)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    started = time.perf_counter()
    run_dcproto(args.slots, 1, args.slots)  # warm-up: starts the embedded server and worker
    dc_startup = time.perf_counter() - started
    started = time.perf_counter()
    with multiprocessing.Pool(args.slots) as pool:
        pool.map(work, range(args.slots))
        pool_startup = time.perf_counter() - started
        pool_times = [run_pool(pool, args.items, args.task_size) for _ in range(args.reps)]
    dc_times = [run_dcproto(args.items, args.task_size, args.slots) for _ in range(args.reps)]
    serial_started = time.perf_counter()
    for x in range(args.items):
        work(x)
    serial = time.perf_counter() - serial_started

    dc, pool_median = statistics.median(dc_times), statistics.median(pool_times)
    print(f"{args.items} items, task_size {args.task_size}, {args.slots} slots, work={WORK}")
    print("| runner | start-up s | median wall s | items/s |")
    print("|---|---|---|---|")
    print(f"| serial loop | - | {serial:.3f} | {args.items / serial:,.0f} |")
    print(
        f"| multiprocessing.Pool | {pool_startup:.3f} | {pool_median:.3f} | "
        f"{args.items / pool_median:,.0f} |"
    )
    print(f"| dcproto embedded | {dc_startup:.3f} | {dc:.3f} | {args.items / dc:,.0f} |")
    print(f"dcproto / Pool wall-time ratio: {dc / pool_median:.2f}")


if __name__ == "__main__":
    main()
