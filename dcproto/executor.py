"""``dcproto.Executor``: a :class:`concurrent.futures.Executor` whose calls run on dcproto workers.

One Executor is one project. ``submit`` pickles the call (cloudpickle) and queues it here; the
project's feeder (on the background loop) takes calls from the queue only while fewer than
``max_workers`` tasks are out, so a call still queued is *pending*: ``future.cancel()`` removes
it, and it never becomes a task. Once handed to the project the call is *running* and cannot
be cancelled (as with :class:`concurrent.futures.ProcessPoolExecutor`). ``shutdown`` lets the
feeder end the project once the queue is empty.

Each call runs on a worker inside a wrapper that catches its exception, so a task always
returns, per call, ``(True, pickled value)`` or ``(False, pickled exception, type name,
message, traceback, pickled args)``: an exception fails only its own future. Values and
exceptions are decoded here under the project's trust rule (the embedded default trusts its
own workers; a named server's are decoded with the allow-list unless ``trust_workers=True``):
trusted, the original exception object comes back; untrusted, built-in exception types (and
dcproto's own) are rebuilt from their plain arguments, anything else becomes
:class:`RemoteCallError`. Either way the remote traceback is chained as ``__cause__``.

A task whose child process crashes or overruns ``task_timeout`` is retried (``max_attempts``);
after that the project fails, and with it every call not yet done: their futures get
:class:`ExecutorBroken` (a :class:`concurrent.futures.BrokenExecutor`) and ``submit`` raises it.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import functools
import io
import itertools
import pickle
import threading
import time
import traceback
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar

import cloudpickle

from . import errors as _errors
from .creator.client import background_loop, call
from .creator.creator import (
    Distribute,
    Progress,
    ProjectHandle,
    _ClassPickler,
)
from .creator.run import FRAME_OVERHEAD, FeedPaused, ProjectRun
from .creator.shipping import is_local, modules_by_value
from .errors import DcprotoError, ProjectError, SerializationError
from .pickling import PLAIN_TYPES
from .trust.safe import loads_from_worker, safe_loads

__all__ = ["Executor", "ExecutorBroken", "RemoteCallError"]

P = ParamSpec("P")
T = TypeVar("T")

SLOT_DEPTH = 2  # without max_workers: tasks out at once per worker slot
CAPACITY_POLL = 1.0  # seconds between looks at a named server's slots, while calls wait
MAX_TRACEBACK = 20_000  # characters of a remote traceback kept

# what a worker sends back for one call: (True, value) or (False, exception, ...)
Outcome = tuple[Any, ...]


class RemoteCallError(DcprotoError):
    """A call raised an exception that cannot be rebuilt here: its type is not a built-in one
    and the workers are not trusted (or its pickle would not load). ``type_name`` is the
    exception's ``module.QualName``, ``remote_traceback`` the worker's traceback."""

    def __init__(self, message: str, *, type_name: str, remote_traceback: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class ExecutorBroken(DcprotoError, concurrent.futures.BrokenExecutor):
    """The executor's project ended before this call was done (a task crashed or timed out
    ``max_attempts`` times, the server went away for good, the project was cancelled); the
    project's own error is the ``__cause__``. The executor takes no more calls."""


class _RemoteTraceback(Exception):
    """Chained as ``__cause__`` of a call's exception: prints the worker's traceback."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


# ---- on the worker ------------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    if type(value) in PLAIN_TYPES:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]


def _must_propagate(exc: BaseException) -> bool:
    """The worker's own signals (the task abandoned, the worker interrupted) are not the
    call's outcome: they must reach the worker."""
    return isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TaskAbandoned"


def _error_outcome(exc: BaseException) -> Outcome:
    kind = type(exc)
    type_name = f"{kind.__module__}.{kind.__qualname__}"
    message = "".join(traceback.format_exception_only(exc)).strip()
    text = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK:]
    try:
        exc_blob = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        exc_blob = b""
    try:
        args_blob = pickle.dumps(exc.args, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        args_blob = b""
    return (False, exc_blob, type_name, message, text, args_blob)


def _run_call(blob: bytes) -> Outcome:
    try:
        fn, args, kwargs = cloudpickle.loads(blob)
        value = fn(*args, **kwargs)
    except BaseException as exc:
        if _must_propagate(exc):
            raise
        return _error_outcome(exc)
    try:
        return (True, _dumps(value))
    except Exception as exc:
        error = SerializationError(
            f"the return value ({type(value).__name__}) cannot be pickled: {exc}"
        )
        error.__cause__ = exc
        return _error_outcome(error)


# ---- calls and jobs -----------------------------------------------------------------------------


class _Call:
    __slots__ = ("blob", "future")

    def __init__(self, future: concurrent.futures.Future[Any], blob: bytes) -> None:
        self.future = future
        self.blob = blob


class _Job:
    """Calls that travel as one task (``map``'s chunks); one item of the project."""

    __slots__ = ("calls", "job_id")

    def __init__(self, job_id: int, calls: list[_Call]) -> None:
        self.job_id = job_id
        self.calls = calls


class _State:
    """What the Executor (any thread), its project's feeder and its results (the background
    loop) share. Plain data under one lock; futures are completed outside it."""

    def __init__(self, max_workers: int | None) -> None:
        self.lock = threading.Lock()
        self.loop = background_loop()
        self.queue: deque[_Job] = deque()
        self.in_flight: dict[int, list[concurrent.futures.Future[Any]]] = {}
        self.job_ids = itertools.count()
        self.max_workers = max_workers
        self.capacity = 1  # the workers' slots, when max_workers is None
        self.shut = False  # no more submits; the project ends once the queue is empty
        self.broken: BaseException | None = None
        self.closed = False  # the project has finished
        self.waiter: asyncio.Future[None] | None = None  # the paused feeder's (loop only)
        self.wake_scheduled = False
        self.max_job_bytes = 0

    @property
    def limit(self) -> int:
        """The most tasks out at once: ``max_workers``, or twice the workers' slots (each slot
        then has its next task at hand when it finishes one: no round trip between them)."""
        if self.max_workers is not None:
            return self.max_workers
        return SLOT_DEPTH * max(self.capacity, 1)

    # ---- any thread ------------------------------------------------------------------------

    def check_open(self) -> None:
        """Raise ExecutorBroken or RuntimeError if no call may be added."""
        if self.broken is not None:
            raise ExecutorBroken(f"the executor is broken: {self.broken}") from self.broken
        if self.shut:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def add(self, calls: list[_Call]) -> None:
        with self.lock:
            self.check_open()
            self.queue.append(_Job(next(self.job_ids), calls))
        self.wake()

    def shutdown(self, cancel_futures: bool) -> None:
        with self.lock:
            self.shut = True
            dropped = list(self.queue) if cancel_futures else []
            if cancel_futures:
                self.queue.clear()
        for job in dropped:
            for each in job.calls:
                each.future.cancel()
        self.wake()

    def set_capacity(self, slots: int) -> None:
        with self.lock:
            grew = slots > self.capacity
            self.capacity = slots
        if grew:
            self.wake()

    def wake(self) -> None:
        """Let the paused feeder ask for items again (from any thread, the loop's too)."""
        with self.lock:
            if self.waiter is None or self.wake_scheduled:
                return
            self.wake_scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
            self.loop.call_soon_threadsafe(self._wake_on_loop)

    # ---- the background loop ---------------------------------------------------------------

    def _wake_on_loop(self) -> None:
        with self.lock:
            waiter, self.waiter = self.waiter, None
            self.wake_scheduled = False
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def next_item(self) -> tuple[int, tuple[bytes, ...]]:
        """The project iterator's ``__next__``: the next job not cancelled, as an item; raises
        FeedPaused while nothing may go out, StopIteration once shut down and drained."""
        with self.lock:
            while not self.closed and self.broken is None:
                if not self.queue:
                    if self.shut:
                        raise StopIteration
                    break
                if len(self.in_flight) >= self.limit:
                    break
                job = self.queue.popleft()
                live = [c for c in job.calls if c.future.set_running_or_notify_cancel()]
                if not live:
                    continue  # every call of it was cancelled: it never becomes a task
                self.in_flight[job.job_id] = [c.future for c in live]
                return job.job_id, tuple(c.blob for c in live)
            else:
                raise StopIteration
            waiter: asyncio.Future[None] = self.loop.create_future()
            self.waiter = waiter
            self.wake_scheduled = False
        raise FeedPaused(waiter)

    def delivered(self, results: dict[Any, Any], trusted: bool) -> None:
        """A task's results arrived: ``{(job_id, blobs): [outcome, ...]}``."""
        for key, outcomes in results.items():
            job_id = key[0] if isinstance(key, tuple) and key else None
            with self.lock:
                futures = self.in_flight.pop(job_id, None) if type(job_id) is int else None
            if futures is None:
                continue
            if not isinstance(outcomes, list) or len(outcomes) != len(futures):
                for future in futures:
                    _complete(future, error=SerializationError("a malformed result for a call"))
                continue
            for future, outcome in zip(futures, outcomes, strict=True):
                try:
                    value = _decode_outcome(outcome, trusted)
                except BaseException as exc:
                    _complete(future, error=exc)
                else:
                    _complete(future, value=value)
        self.wake()

    def finished(self, error: BaseException | None) -> None:
        """The project ended: whatever is not done now never will be."""
        with self.lock:
            self.closed = self.shut = True
            if error is not None and self.broken is None:
                self.broken = error
            left = [f for futures in self.in_flight.values() for f in futures]
            left += [c.future for job in self.queue for c in job.calls]
            self.in_flight.clear()
            self.queue.clear()
        if left:
            cause = error or ProjectError("the project ended with calls not done")
            broken = ExecutorBroken(f"the executor's project ended: {cause}")
            broken.__cause__ = cause
            for future in left:
                if future.running() or future.set_running_or_notify_cancel():
                    _complete(future, error=broken)
        self._wake_on_loop()


def _complete(
    future: concurrent.futures.Future[Any],
    *,
    value: Any = None,
    error: BaseException | None = None,
) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def _decode_outcome(outcome: Any, trusted: bool) -> Any:
    """The value of one call, or raise its exception (rebuilt as the trust rule allows)."""
    if not isinstance(outcome, tuple | list) or not outcome:
        raise SerializationError("a malformed result for a call")
    if outcome[0] is True and len(outcome) == 2 and isinstance(outcome[1], bytes):
        return loads_from_worker(outcome[1], trusted=trusted, what="the call's value")
    if outcome[0] is not False or len(outcome) != 6:
        raise SerializationError("a malformed result for a call")
    _, exc_blob, type_name, message, text, args_blob = outcome
    if not all(isinstance(b, bytes) for b in (exc_blob, args_blob)) or not all(
        isinstance(s, str) for s in (type_name, message, text)
    ):
        raise SerializationError("a malformed result for a call")
    error: BaseException | None = None
    if trusted and exc_blob:
        with contextlib.suppress(Exception):
            loaded = loads_from_worker(exc_blob, trusted=True, what="the call's exception")
            if isinstance(loaded, BaseException):
                error = loaded
    if error is None:
        error = _rebuild_exception(type_name, args_blob)
    if error is None:
        error = RemoteCallError(message, type_name=type_name, remote_traceback=text)
    error.__cause__ = _RemoteTraceback(f'\n"""\n{text}"""')
    raise error


def _rebuild_exception(type_name: str, args_blob: bytes) -> BaseException | None:
    """A built-in (or dcproto) exception from its type's name and its plain arguments,
    decoded with the allow-list: nothing a worker names is imported or run."""
    module, _, name = type_name.rpartition(".")
    namespaces = {"builtins": builtins, "dcproto.errors": _errors}
    namespace = namespaces.get(module)
    kind = getattr(namespace, name, None) if namespace is not None and name.isidentifier() else None
    if not (isinstance(kind, type) and issubclass(kind, BaseException)) or not args_blob:
        return None
    try:
        args = safe_loads(args_blob, what="an exception's arguments")
        if not isinstance(args, tuple):
            return None
        return kind(*args)
    except Exception:
        return None


# ---- what runs on the workers, and the project around it --------------------------------------


class _Feed:
    """The project's iterator: an iterable (so the project does not keep it as taken) whose
    iterator asks the shared state on every ``next``."""

    def __init__(self, state: _State) -> None:
        self._state = state

    def __iter__(self) -> Iterator[tuple[int, tuple[bytes, ...]]]:
        return _FeedIterator(self._state)


class _FeedIterator:
    def __init__(self, state: _State) -> None:
        self._state = state

    def __iter__(self) -> _FeedIterator:
        return self

    def __next__(self) -> tuple[int, tuple[bytes, ...]]:
        return self._state.next_item()


class _ExecutorRun(ProjectRun):
    """A project run that hands each task's results to the calls' futures as they come (and
    keeps none), and breaks the executor when the project ends early."""

    def _task_done(self, message: Any) -> None:
        super()._task_done(message)
        done, self.results = self.results, {}
        _state_of(self).delivered(done, self.trusted)

    def _finish(
        self,
        *,
        result: dict[Any, Any] | None = None,
        error: BaseException | None = None,
        stats: dict[str, Any] | None = None,
        status: str | None = None,
    ) -> None:
        super()._finish(result=result, error=error, stats=stats, status=status)
        _state_of(self).finished(error)


def _state_of(run: ProjectRun) -> _State:
    state = getattr(run.handle, "_state", None)
    assert isinstance(state, _State)
    return state


class _ExecutorHandle(ProjectHandle):
    _run_class = _ExecutorRun
    _state: _State


# ---- modules shipped by value ----------------------------------------------------------------


def _module_of(obj: Any) -> str | None:
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    if isinstance(obj, types.FunctionType | types.BuiltinFunctionType | type):
        module = obj.__module__
    else:
        module = type(obj).__module__
    return module if isinstance(module, str) else None


def _local_modules_of(objects: Iterable[Any]) -> set[str]:
    """The user's own modules that the callables, classes and arguments come from (one level
    deep: a function, a partial's function and arguments, an object's class)."""
    names: set[str] = set()
    for obj in objects:
        parts = [obj]
        if isinstance(obj, functools.partial):
            parts += [obj.func, *obj.args, *obj.keywords.values()]
        elif isinstance(obj, types.MethodType):
            parts.append(type(obj.__self__))
        for part in parts:
            name = _module_of(part)
            if name is not None and is_local(name):
                names.add(name)
    return names


def _pickle_call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    _ClassPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump((fn, args, kwargs))
    return buffer.getvalue()


# ---- the Executor ---------------------------------------------------------------------------


class Executor(concurrent.futures.Executor):
    """Run calls on dcproto workers: a :class:`concurrent.futures.Executor`.

    ``user_name``: the named server, or None for the embedded local server and workers.
    ``max_workers``: the most tasks (calls, or ``map`` chunks) handed to the project at once;
    a call queued beyond them is pending and can be cancelled. None: twice the workers' slots,
    so that each slot has its next task at hand (on a named server the slots are looked at
    again every second while calls wait). ``modules``: modules the workers must be able to
    import; only workers that can get the tasks. ``trust_workers``: as for
    :class:`dcproto.Distribute` (None: trusted on the embedded default only); untrusted,
    values come back through the allow-list and exceptions as built-in types or
    :class:`RemoteCallError`. The other options are :class:`~dcproto.Distribute`'s.

    Functions and classes from your own modules (not installed ones) travel by value; name
    the installed packages your calls need in ``modules``.
    """

    class _Calls:
        """What the workers run: one item is ``(job id, (pickled call, ...))``."""

        @staticmethod
        def run(item: tuple[int, tuple[bytes, ...]]) -> list[Outcome]:
            return [_run_call(blob) for blob in item[1]]

    def __init__(
        self,
        user_name: str | None = None,
        *,
        max_workers: int | None = None,
        modules: Sequence[str] = (),
        trust_workers: bool | None = None,
        task_timeout: float | None = None,
        max_attempts: int = 3,
        max_reissues: int = 20,
        lease_timeout: float = 30.0,
        local_workers: int | None = None,
        reconnect_timeout: float = 300.0,
    ) -> None:
        if max_workers is not None and (type(max_workers) is not int or max_workers < 1):
            raise ValueError(f"max_workers must be an integer > 0 or None, not {max_workers!r}")
        if isinstance(modules, str):
            modules = (modules,)
        _not_on_the_loop("create a dcproto.Executor")
        self._modules = tuple(modules)
        self._state = state = _State(max_workers)
        spec = Distribute(
            user_name,
            iterator=_Feed(state),
            task_size=1,
            parallel_func="run",
            modules=(__name__, *self._modules),
            task_timeout=task_timeout,
            max_attempts=max_attempts,
            max_reissues=max_reissues,
            lease_timeout=lease_timeout,
            errors="raise",
            local_workers=local_workers,
            reconnect_timeout=reconnect_timeout,
            trust_workers=trust_workers,
        ).spec
        namespace = {
            "_spec": spec,
            "user_class": Executor._Calls,
            "_state": state,
            "__module__": __name__,
            "__qualname__": "Executor._Calls",
        }
        handle_class = type("_Calls", (_ExecutorHandle,), namespace)
        self._handle: ProjectHandle = handle_class()
        try:
            run = self._handle._run
            assert run.client is not None
            state.max_job_bytes = (run.client.proto.max_frame - FRAME_OVERHEAD) // 4
            if max_workers is None:
                state.set_capacity(call(_slots(spec.user_name, spec.local_workers, run), 30))
                if spec.user_name is not None:
                    asyncio.run_coroutine_threadsafe(_watch_capacity(state, run), state.loop)
        except BaseException:
            state.shutdown(cancel_futures=True)
            raise
        self._finalizer = weakref.finalize(self, state.shutdown, True)

    # ---- the concurrent.futures API -------------------------------------------------------

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Schedule ``fn(*args, **kwargs)``; its future completes with the value, or with the
        exception it raised (its original type, with the worker's traceback as the cause)."""
        return self._submit_calls(fn, [(args, kwargs)])[0]

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """``fn`` over the iterables' items in step, results in order. Every call is submitted
        at once; ``chunksize`` calls travel (and run, in order) as one task. ``timeout``
        (seconds from this call) bounds the wait: past it, the next result raises
        TimeoutError. Closing the iterator early cancels the calls not yet started."""
        if type(chunksize) is not int or chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        end = None if timeout is None else timeout + time.monotonic()
        futures: list[concurrent.futures.Future[T]] = []
        calls: Iterator[tuple[tuple[Any, ...], dict[str, Any]]] = (
            (args, {}) for args in zip(*iterables, strict=False)
        )
        while chunk := list(itertools.islice(calls, chunksize)):
            futures.extend(self._submit_calls(fn, chunk))
        return _results_in_order(futures, end)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls; ``cancel_futures`` cancels those not started. The project ends
        once the rest are done; ``wait`` waits for that."""
        self._state.shutdown(cancel_futures)
        if wait and not _on_the_loop():
            with contextlib.suppress(BaseException):
                self._handle._future.result()

    # ---- beyond it ------------------------------------------------------------------------

    @property
    def max_workers(self) -> int:
        """The most tasks handed to the project at once, now (see the class docstring)."""
        return self._state.limit

    @property
    def project_id(self) -> str | None:
        return self._handle.project_id

    @property
    def progress(self) -> Progress:
        """The project's progress: a task is one ``submit``, or one chunk of ``map``."""
        return self._handle.progress

    def _submit_calls(
        self,
        fn: Callable[..., T],
        calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
        *,
        also: Iterable[Any] = (),
    ) -> list[concurrent.futures.Future[T]]:
        """Futures for ``fn`` over ``calls``, queued as one task when they fit (else several).
        ``also``: more objects whose (local) modules must travel by value."""
        state = self._state
        state.check_open()
        jobs: list[list[_Call]] = [[]]
        size = 0
        futures: list[concurrent.futures.Future[T]] = []
        for args, kwargs in calls:
            future: concurrent.futures.Future[T] = concurrent.futures.Future()
            futures.append(future)
            objects = [fn, *args, *kwargs.values(), *also]
            try:
                with modules_by_value(_local_modules_of(objects), self._modules):
                    blob = _pickle_call(fn, args, kwargs)
            except Exception as exc:
                future.set_exception(
                    _chained(SerializationError(f"the call cannot be pickled: {exc}"), exc)
                )
                continue
            if len(blob) > state.max_job_bytes:
                future.set_exception(
                    SerializationError(
                        f"the call pickles to {len(blob)} bytes, more than a task may carry "
                        f"({state.max_job_bytes})"
                    )
                )
                continue
            if jobs[-1] and size + len(blob) > state.max_job_bytes:
                jobs.append([])
                size = 0
            jobs[-1].append(_Call(future, blob))
            size += len(blob)
        for job in jobs:
            if job:
                state.add(job)
        return futures

    def _abort(self) -> None:
        """Cancel the calls not started and the project: workers abandon the running ones,
        whose futures then fail with ExecutorBroken."""
        self._state.shutdown(cancel_futures=True)
        self._handle.cancel()

    def __repr__(self) -> str:
        state = self._state
        status = "broken" if state.broken else "shut down" if state.shut else "running"
        return (
            f"<dcproto.Executor {status} project={self.project_id} max_workers={state.limit} "
            f"queued={len(state.queue)} in_flight={len(state.in_flight)}>"
        )


def _results_in_order(
    futures: list[concurrent.futures.Future[T]], end: float | None
) -> Iterator[T]:
    try:
        futures.reverse()  # pop from the end: each result is let go once yielded
        while futures:
            future = futures.pop()
            if end is None:
                yield future.result()
            else:
                yield future.result(end - time.monotonic())
    finally:
        for future in futures:
            future.cancel()


def _chained(error: DcprotoError, cause: BaseException) -> DcprotoError:
    error.__cause__ = cause
    return error


def _on_the_loop() -> bool:
    try:
        return asyncio.get_running_loop() is background_loop()
    except RuntimeError:
        return False


def _not_on_the_loop(what: str) -> None:
    if _on_the_loop():
        raise RuntimeError(f"cannot {what} on dcproto's own event loop (in a future's callback)")


async def _slots(user_name: str | None, local_workers: int | None, run: ProjectRun) -> int:
    """The slots of the workers: the embedded worker's, or those a named server has now."""
    if user_name is None:
        from .creator.local import local_cluster

        cluster = await local_cluster(local_workers)
        return cluster.worker.slots
    assert run.client is not None
    return _count_slots(await run.client.list_workers())


def _count_slots(rows: list[dict[str, Any]]) -> int:
    return sum(
        row["slots"]
        for row in rows
        if isinstance(row, dict) and type(row.get("slots")) is int and not row.get("paused")
    )


async def _watch_capacity(state: _State, run: ProjectRun) -> None:
    """While calls wait, look at the server's slots again now and then: workers come and go."""
    while not state.closed:
        await asyncio.sleep(CAPACITY_POLL)
        if state.closed or not state.queue or run.client is None:
            continue
        try:
            rows = await asyncio.wait_for(run.client.list_workers(), 10)
        except (DcprotoError, TimeoutError):
            continue
        state.set_capacity(_count_slots(rows))


def capacity(user_name: str | None = None, *, local_workers: int | None = None) -> int:
    """The slots of the workers ``user_name`` has now (the embedded default's: its worker's)."""
    _not_on_the_loop("ask for the capacity")

    async def look() -> int:
        if user_name is None:
            from .creator.local import local_cluster

            return (await local_cluster(local_workers)).worker.slots
        from .creator.client import get_client
        from .users import get_user

        client = await get_client(get_user(user_name).endpoint())
        return _count_slots(await client.list_workers())

    return call(look(), 30)
