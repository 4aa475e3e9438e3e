"""The peers, each with two worker slots, and the subprocess that runs one of them.

    python -m bench.peers --peer NAME --workloads a,b --reps N --sizes JSON

The bench runs every peer in its own subprocess so that a hung peer can be killed; this
prints one ``@@bench {json}`` line per event (import, start-up, each repetition, each
workload) for the parent to read.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from bench import workloads as w
from bench.harness import (
    Handle,
    System,
    Unsupported,
    run_workload,
    warm_system,
    windowed_early_stop,
    windowed_filter,
)

MARK = "@@bench "
FIXED_TWO = "cannot add a worker: 2 processes throughout"


def fixed_late_joiner(
    map_fn: Callable[[Callable[[Any], Any], list[Any]], list[Any]],
) -> tuple[dict, None, float]:
    """The late-joiner on a pool that cannot grow: the same tasks on its 2 processes."""
    map_fn(w.plus_one, list(range(w.LATE_WARM)))
    items = list(range(w.LATE_TASKS))
    began = time.perf_counter()
    values = map_fn(w.sleep_task, items)
    wall = time.perf_counter() - began
    return dict(zip(items, values, strict=True)), None, wall


def ray_sleep(x: int) -> tuple[int, str]:
    """``sleep_task`` in a Ray worker, with the node it ran on."""
    import ray

    return w.sleep_task(x), ray.get_runtime_context().get_node_id()


class Serial(System):
    """A plain loop in one process: the baseline."""

    name = "serial"
    has_startup = False

    def start(self) -> None:
        pass

    def map_items(self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int) -> dict:
        return {x: fn(x) for x in items}

    def single(self, fn: Callable[[Any], Any], x: Any) -> Any:
        return fn(x)

    def early_stop(
        self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int
    ) -> tuple[Any, float]:
        for x in items:
            if fn(x):
                return x, time.perf_counter()
        raise RuntimeError("early stop: no item matched")

    def late_joiner(self) -> tuple[dict, int | None, float]:
        raise Unsupported("one process: no worker slots to add to")

    def filter(
        self,
        fn: Callable[[Any], Any],
        keep: Callable[[Any], Any],
        items: Iterable[Any],
        task_size: int,
    ) -> dict:
        out = {}
        for x in items:
            value = fn(x)
            if keep(value):
                out[x] = value
        return out


class Pool(System):
    """``multiprocessing.Pool(2)``: ``map`` with a chunksize, ``imap_unordered`` + terminate."""

    name = "pool"

    def __init__(self) -> None:
        self._pool: Any = None

    def _get(self) -> Any:
        if self._pool is None:  # after an early stop terminated it
            self._pool = multiprocessing.Pool(w.SLOTS)
        return self._pool

    def start(self) -> None:
        self._get().apply(w.plus_one, (0,))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def map_items(self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int) -> dict:
        items = list(items)
        return dict(zip(items, self._get().map(fn, items, chunksize=task_size), strict=True))

    def single(self, fn: Callable[[Any], Any], x: Any) -> Any:
        return self._get().apply(fn, (x,))

    def early_stop(
        self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int
    ) -> tuple[Any, float]:
        pool = self._get()
        hits = pool.imap_unordered(functools.partial(w.first_hit, fn), w.chunks(items, task_size))
        for hit in hits:
            if hit is not None:
                answered = time.perf_counter()
                pool.terminate()
                pool.join()
                self._pool = None
                return hit, answered
        raise RuntimeError("early stop: no item matched")

    def filter(
        self,
        fn: Callable[[Any], Any],
        keep: Callable[[Any], Any],
        items: Iterable[Any],
        task_size: int,
    ) -> dict:
        out: dict[Any, Any] = {}
        work = functools.partial(w.filter_chunk, fn, keep)
        for pairs in self._get().imap_unordered(work, w.chunks(items, task_size)):
            out.update(pairs)
        return out

    def late_joiner(self) -> tuple[dict, int | None, float]:
        return fixed_late_joiner(lambda fn, items: self._get().map(fn, items, chunksize=1))

    def note(self, workload: str) -> str | None:
        return FIXED_TWO if workload == "late-joiner" else None


class _Futures(System):
    """Shared by the peers whose early stop and filter go through ``run_windowed``."""

    def early_stop(
        self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int
    ) -> tuple[Any, float]:
        return windowed_early_stop(self, fn, items, task_size)  # type: ignore[arg-type]

    def filter(
        self,
        fn: Callable[[Any], Any],
        keep: Callable[[Any], Any],
        items: Iterable[Any],
        task_size: int,
    ) -> dict:
        return windowed_filter(self, fn, keep, items, task_size)  # type: ignore[arg-type]


class PPE(_Futures):
    """``concurrent.futures.ProcessPoolExecutor(2)``."""

    name = "ppe"

    def start(self) -> None:
        self.ex = concurrent.futures.ProcessPoolExecutor(max_workers=w.SLOTS)
        self.ex.submit(w.plus_one, 0).result()

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)

    def map_items(self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int) -> dict:
        items = list(items)
        return dict(zip(items, self.ex.map(fn, items, chunksize=task_size), strict=True))

    def single(self, fn: Callable[[Any], Any], x: Any) -> Any:
        return self.ex.submit(fn, x).result()

    def late_joiner(self) -> tuple[dict, int | None, float]:
        return fixed_late_joiner(lambda fn, items: list(self.ex.map(fn, items)))

    def note(self, workload: str) -> str | None:
        return FIXED_TWO if workload == "late-joiner" else None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Handle:
        return self.ex.submit(fn, *args)

    def wait_first(self, handles: list[Handle]) -> tuple[list[Handle], list[Handle]]:
        done, rest = concurrent.futures.wait(handles, return_when="FIRST_COMPLETED")
        return list(done), list(rest)

    def get(self, handle: Handle) -> Any:
        return handle.result()

    def cancel(self, handles: list[Handle]) -> None:
        for handle in handles:
            handle.cancel()


class Dask(_Futures):
    """Dask distributed: ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``."""

    name = "dask"

    def __init__(self) -> None:
        import dask.distributed

        self.dd = dask.distributed

    def start(self) -> None:
        self.cluster = self.dd.LocalCluster(
            n_workers=w.SLOTS, threads_per_worker=1, processes=True, dashboard_address=None
        )
        self.client = self.dd.Client(self.cluster)
        self.client.submit(w.plus_one, 0, pure=False).result()

    def close(self) -> None:
        self.client.close()
        self.cluster.close()

    def map_items(self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int) -> dict:
        items = list(items)
        if task_size == 1:
            values = self.client.gather(self.client.map(fn, items, pure=False))
            return dict(zip(items, values, strict=True))
        batches = list(w.chunks(items, task_size))
        # one opaque Batch per task: a plain list result is serialized element by element
        futures = self.client.map(functools.partial(w.apply_chunk_batch, fn), batches, pure=False)
        values = [v for batch in self.client.gather(futures) for v in batch.values]
        return dict(zip(items, values, strict=True))

    def single(self, fn: Callable[[Any], Any], x: Any) -> Any:
        return self.client.submit(fn, x, pure=False).result()

    def late_joiner(self) -> tuple[dict, int | None, float]:
        """A fresh 2-worker LocalCluster per repetition; ``cluster.scale(3)`` at the join."""
        cluster = self.dd.LocalCluster(
            n_workers=w.SLOTS, threads_per_worker=1, processes=True, dashboard_address=None
        )
        try:
            client = self.dd.Client(cluster, set_as_default=False)
            try:
                client.gather(client.map(w.plus_one, range(w.LATE_WARM), pure=False))
                first = set(client.scheduler_info()["workers"])
                items = list(range(w.LATE_TASKS))
                began = time.perf_counter()
                futures = client.map(w.sleep_task, items, pure=False)
                time.sleep(max(0.0, began + w.LATE_JOIN_S - time.perf_counter()))
                cluster.scale(w.SLOTS + 1)
                values = client.gather(futures)
                wall = time.perf_counter() - began
                where = client.who_has(futures)
                late = sum(1 for f in futures if set(where[f.key]) - first)
            finally:
                client.close()
        finally:
            cluster.close()
        return dict(zip(items, values, strict=True)), late, wall

    def submit(self, fn: Callable[..., Any], *args: Any) -> Handle:
        return self.client.submit(fn, *args, pure=False)

    def wait_first(self, handles: list[Handle]) -> tuple[list[Handle], list[Handle]]:
        done, rest = self.dd.wait(handles, return_when="FIRST_COMPLETED")
        return list(done), list(rest)

    def get(self, handle: Handle) -> Any:
        return handle.result()

    def cancel(self, handles: list[Handle]) -> None:
        if handles:
            self.client.cancel(handles)


class Ray(_Futures):
    """Ray: ``ray.init(num_cpus=2)``, one remote call per item or per chunk."""

    name = "ray"

    def __init__(self) -> None:
        import ray

        self.ray = ray
        self._remote: dict[Any, Any] = {}
        self._cluster: Any = None  # a ray.cluster_utils.Cluster once the late-joiner ran
        self._late_note: str | None = None

    def _r(self, fn: Callable[..., Any]) -> Any:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        return self._remote[fn]

    def start(self) -> None:
        self.ray.init(num_cpus=w.SLOTS)
        self.ray.get(self._r(w.plus_one).remote(0))

    def close(self) -> None:
        self.ray.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()

    def late_joiner(self) -> tuple[dict, int | None, float]:
        """``ray.init(num_cpus=2)`` cannot grow: the run moves (once, for good: the head has the
        same 2 CPUs) to Ray's local multi-node utility, a head of 2 CPUs, and each repetition
        adds a 1-CPU node at the join and removes it after. Without the utility: 2 CPUs."""
        if self._cluster is None and self._late_note is None:
            try:
                from ray.cluster_utils import Cluster
            except ImportError as exc:
                self._late_note = f"cannot express a late worker locally ({exc}): 2 CPUs throughout"
            else:
                self.ray.shutdown()
                self._cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": w.SLOTS})
                self.ray.init(address=self._cluster.address)
                self._late_note = (
                    "the third slot is a second local node, `ray.cluster_utils.Cluster"
                    "(head_node_args={'num_cpus': 2}).add_node(num_cpus=1)` (Ray's multi-node "
                    "test utility: `ray.init(num_cpus=2)` cannot grow); add_node blocks until "
                    "the node's raylet is up"
                )
        self.ray.get([self._r(w.plus_one).remote(i) for i in range(w.LATE_WARM)])
        items = list(range(w.LATE_TASKS))
        began = time.perf_counter()
        refs = [self._r(ray_sleep).remote(i) for i in items]
        node = None
        if self._cluster is not None:
            time.sleep(max(0.0, began + w.LATE_JOIN_S - time.perf_counter()))
            node = self._cluster.add_node(num_cpus=1)  # in the main thread: Ray requires it
        try:
            pairs = self.ray.get(refs)
            wall = time.perf_counter() - began
        finally:
            if node is not None:
                self._cluster.remove_node(node)
        values = dict(zip(items, [value for value, _ in pairs], strict=True))
        if node is None:
            return values, None, wall
        return values, sum(1 for _, where in pairs if where == node.node_id), wall

    def note(self, workload: str) -> str | None:
        return self._late_note if workload == "late-joiner" else None

    def map_items(self, fn: Callable[[Any], Any], items: Iterable[Any], task_size: int) -> dict:
        items = list(items)
        if task_size == 1:
            remote = self._r(fn)
            values = self.ray.get([remote.remote(x) for x in items])
            return dict(zip(items, values, strict=True))
        remote = self._r(w.apply_chunk)
        refs = [remote.remote(fn, batch) for batch in w.chunks(items, task_size)]
        values = [v for batch in self.ray.get(refs) for v in batch]
        return dict(zip(items, values, strict=True))

    def single(self, fn: Callable[[Any], Any], x: Any) -> Any:
        return self.ray.get(self._r(fn).remote(x))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Handle:
        return self._r(fn).remote(*args)

    def wait_first(self, handles: list[Handle]) -> tuple[list[Handle], list[Handle]]:
        return self.ray.wait(handles, num_returns=1)

    def get(self, handle: Handle) -> Any:
        return self.ray.get(handle)

    def cancel(self, handles: list[Handle]) -> None:
        for handle in handles:
            self.ray.cancel(handle)


PEERS: dict[str, type[System]] = {
    "serial": Serial,
    "pool": Pool,
    "ppe": PPE,
    "dask": Dask,
    "ray": Ray,
}
LABELS = {
    "dcproto": "dcproto",
    "serial": "serial loop",
    "pool": "mp.Pool",
    "ppe": "ProcessPoolExecutor",
    "dask": "Dask distributed",
    "ray": "Ray",
}


def emit(event: str, **data: Any) -> None:
    print(MARK + json.dumps({"event": event, **data}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", required=True, choices=sorted(PEERS))
    parser.add_argument("--workloads", required=True)
    parser.add_argument("--reps", type=int, required=True)
    parser.add_argument("--sizes", required=True, help="JSON")
    parser.add_argument("--no-startup", action="store_true", help="a restart: do not report it")
    args = parser.parse_args()
    sizes = json.loads(args.sizes)
    started = time.perf_counter()
    try:
        system = PEERS[args.peer]()
    except ImportError as exc:
        emit("skip", reason=f"{type(exc).__name__}: {exc}")
        return 0
    emit("import", seconds=time.perf_counter() - started)
    started = time.perf_counter()
    system.start()
    startup = time.perf_counter() - started
    warm_system(system)
    if not args.no_startup:
        emit("startup", seconds=startup if system.has_startup else None)
    for workload in args.workloads.split(","):
        if not workload:
            continue
        emit("begin", workload=workload)

        def on_rep(rep: int, workload: str = workload) -> None:
            emit("rep", workload=workload, rep=rep)

        result = run_workload(system, workload, sizes, args.reps, on_rep)
        emit("workload", workload=workload, result=result)
    system.close()
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
