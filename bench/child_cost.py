"""What one project per child process costs a worker: warm throughput, and the first task of
a new project with and without a spare child ready.

    python -m bench.child_cost [--tasks 5000] [--reps 10]

* throughput: ``--tasks`` one-item tasks of one project on a 2-slot :class:`Runner`, all
  submitted at once (as a worker holding many tasks does), after a warm-up; tasks/s.
* a known project's task, one at a time (a warm child): its latency.
* a new project's first task (load and run, as ``Runner.run`` sees it) on a 1-slot runner:
  with a spare ready (a clean child started in the background beforehand), and with none
  (both processes bound to other projects: the idle one is replaced, so the task waits for a
  fresh process). Medians of ``--reps`` fresh runners.

Run against an older ``dcproto`` (``PYTHONPATH=...``) without spares, the new-project figure
is a load into a warm, shared child.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import pickle
import statistics
import sys
import time
from typing import Any

import cloudpickle

from dcproto import protocol as p
from dcproto.worker import runner as runner_module
from dcproto.worker.runner import Runner

_ids = itertools.count(1)
HAS_SPARES = hasattr(runner_module, "SPARES")


class Square:
    @staticmethod
    def f(x: int) -> int:
        return x * x


def project(project_id: str) -> p.Project:
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return p.Project(
        project_id=project_id,
        code=cloudpickle.dumps(Square),
        modules=[],
        parallel="f",
        stop=None,
        only_if=None,
        options={"errors": "raise"},
        owner=project_id,
    )


def task(proj: p.Project, items: list[Any]) -> p.Task:
    return p.Task(
        task_id=next(_ids), project_id=proj.project_id, attempt=1, items=pickle.dumps(items)
    )


async def timed_run(runner: Runner, proj: p.Project, items: list[Any]) -> float:
    started = time.perf_counter()
    outcome = await runner.run(proj, task(proj, items))
    elapsed = time.perf_counter() - started
    assert outcome.outcome == "ok", outcome.error
    return elapsed


async def throughput(n_tasks: int) -> float:
    runner = Runner(2)
    await runner.start()
    try:
        warm = project("warm")
        # warm-up: both children bound and the project known to be short (pipelined)
        for _ in range(3):
            await asyncio.gather(*(timed_run(runner, warm, [i]) for i in range(100)))
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(runner.run(warm, task(warm, [i])) for i in range(n_tasks))
        )
        elapsed = time.perf_counter() - started
        assert all(o.outcome == "ok" for o in outcomes)
        return n_tasks / elapsed
    finally:
        await runner.close()


async def warm_latency(reps: int) -> float:
    runner = Runner(1)
    await runner.start()
    try:
        warm = project("warm")
        await timed_run(runner, warm, [0])
        return statistics.median([await timed_run(runner, warm, [i]) for i in range(reps * 10)])
    finally:
        await runner.close()


async def wait_for_spare(runner: Runner) -> None:
    spares = [c for c in runner._children if getattr(c, "bound", "") is None]
    await asyncio.gather(*(c.ensure_started() for c in spares))
    await asyncio.sleep(0.3)  # the interpreter is up: give it time to import what it needs


async def new_project(reps: int) -> tuple[list[float], list[float]]:
    with_spare: list[float] = []
    without: list[float] = []
    for rep in range(reps):
        runner = Runner(1)
        await runner.start()
        try:
            await timed_run(runner, project(f"first-{rep}"), [1])
            await wait_for_spare(runner)
            with_spare.append(await timed_run(runner, project(f"second-{rep}"), [2]))
            if HAS_SPARES:  # slots + spares processes, all bound: the next one waits a spawn
                await asyncio.sleep(0.3)
                without.append(await timed_run(runner, project(f"third-{rep}"), [3]))
        finally:
            await runner.close()
    return with_spare, without


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def main_async(args: argparse.Namespace) -> None:
    rate = await throughput(args.tasks)
    print(f"throughput, {args.tasks} one-item tasks of one project, 2 slots: {rate:,.0f} tasks/s")
    print(
        f"a known project's task, one at a time (warm child): {ms(await warm_latency(args.reps))}"
    )
    with_spare, without = await new_project(args.reps)
    label = "spare ready" if HAS_SPARES else "shared warm child, no spares (older runner)"
    print(f"a new project's first task, {label}: {ms(statistics.median(with_spare))} (median)")
    if without:
        print(
            "a new project's first task, no spare (replace + spawn): "
            f"{ms(statistics.median(without))} (median)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=10)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
