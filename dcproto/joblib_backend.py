"""The joblib backend "dcproto": ``Parallel`` batches run as calls of a :class:`dcproto.Executor`.

``import dcproto`` registers the name (lazily: see :mod:`dcproto._joblib_hook`), so::

    with joblib.parallel_config(backend="dcproto"):                    # the embedded default
        ...
    with joblib.parallel_config(backend="dcproto", user_name="home"):  # a named server
        GridSearchCV(..., n_jobs=-1).fit(X, y)

Keyword arguments after the name go to the backend: ``user_name``, ``modules`` (``joblib`` is
always added: workers need it to run a batch) and any other :class:`~dcproto.Executor` option.
Each ``Parallel`` call is one project. ``n_jobs=-1`` means the workers' slots (never fewer than
two, so that joblib does not fall back to running here); a positive ``n_jobs`` caps the
batches handed out at once. Nested ``Parallel`` calls inside a batch run sequentially on the
worker. Importing this module imports joblib.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from joblib.parallel import (
    AutoBatchingMixin,
    ParallelBackendBase,
    SequentialBackend,
    register_parallel_backend,
)

from ._joblib_hook import NAME
from .executor import Executor, capacity

__all__ = ["DcprotoBackend"]


class DcprotoBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's ``ParallelBackendBase`` on a :class:`dcproto.Executor` (one per Parallel call)."""

    # batches travel over the network: aim at longer ones than joblib's local backends
    MIN_IDEAL_BATCH_DURATION = 0.5
    MAX_IDEAL_BATCH_DURATION = 5.0
    default_n_jobs = -1
    supports_retrieve_callback = True
    supports_inner_max_num_threads = False
    supports_sharedmem = False

    def __init__(
        self,
        user_name: str | None = None,
        *,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        modules: Sequence[str] = (),
        **executor_options: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if isinstance(modules, str):
            modules = (modules,)
        self.user_name = user_name
        self.modules = ("joblib", *(m for m in modules if m != "joblib"))
        self.executor_options = executor_options
        self._executor: Executor | None = None
        self._slots: int | None = None
        self.parallel: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        # never pickle the executor (joblib ships the nested backend, not this one, but still)
        return (DcprotoBackend, (self.user_name,))

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        if self._slots is None:
            local_workers = self.executor_options.get("local_workers")
            self._slots = capacity(self.user_name, local_workers=local_workers)
        return max(self._slots + 1 + n_jobs, 2)

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **backend_kwargs: Any,
    ) -> int:
        """Start this Parallel call's executor; joblib's own options (memmapping, temp
        folder, context) mean nothing here and are ignored."""
        effective = self.effective_n_jobs(n_jobs)
        self.parallel = parallel
        if self._executor is None:
            # -1: as many as the workers have slots, followed as they come and go
            max_workers = None if n_jobs is None or n_jobs == -1 else effective
            self._executor = Executor(
                self.user_name,
                max_workers=max_workers,
                modules=self.modules,
                **self.executor_options,
            )
        return effective

    def submit(self, func: Any, callback: Any = None) -> Any:
        if self._executor is None:
            raise RuntimeError("the dcproto backend is not configured (no Parallel call)")
        future = self._executor._submit_calls(func, [((), {})], also=_batch_callables(func))[0]
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out: Any) -> Any:
        return out.result()

    def terminate(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self._slots = None
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the batches not started and the project (workers abandon the running
        ones); with ``ensure_ready``, a fresh executor for what comes next."""
        if self._executor is not None:
            self._executor._abort()
            self._executor = None
        if ensure_ready and self.parallel is not None:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)

    def get_nested_backend(self) -> tuple[Any, int | None]:
        # a batch runs in one worker slot: nested Parallel calls stay in it
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


def _batch_callables(batch: Any) -> Iterator[Any]:
    """The functions and arguments inside a joblib batch (``BatchedCalls.items``), so that
    those from the user's own modules travel by value."""
    items = getattr(batch, "items", None)
    if not isinstance(items, list):
        return
    for item in items:
        if isinstance(item, tuple) and len(item) == 3:
            func, args, kwargs = item
            yield func
            if isinstance(args, tuple | list):
                yield from args
            if isinstance(kwargs, dict):
                yield from kwargs.values()


register_parallel_backend(NAME, DcprotoBackend)
