"""The creator library: ``@Distribute`` on a project class, and the handle ``Project()`` returns.

``Project()`` validates the class, connects (to a named server, or to the embedded local one),
submits and returns at once; the iterator is then sliced lazily into tasks on the background
loop, only as fast as the server grants credit. ``await project.results()`` and
``project.get_results()`` both wait on the same future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import itertools
import logging
import pickle
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle

from . import protocol as p
from .client import CreatorClient, background_loop, call, get_client
from .errors import (
    ConfigurationError,
    ConnectionFailed,
    DcprotoError,
    ProjectCancelled,
    ProjectUnrunnable,
    SerializationError,
    TaskFailed,
    UnhashableItemError,
)
from .results import ResultsWriter

log = logging.getLogger("dcproto")

MAX_TASKS_PER_FRAME = 256
MAX_FRAME_PAYLOAD = 8 * 1024 * 1024  # a Tasks frame is cut once its items reach this size


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a project is. ``total_*`` are None until the iterator is exhausted."""

    tasks_done: int
    items_done: int
    items_kept: int
    total_tasks: int | None
    total_items: int | None
    status: str

    @property
    def fraction(self) -> float | None:
        if not self.total_tasks:
            return None if self.total_tasks is None else 1.0
        return self.tasks_done / self.total_tasks


@dataclass(frozen=True, kw_only=True)
class ProjectSpec:
    """Everything ``Distribute`` was told, checked."""

    user_name: str | None
    iterator: Iterable[Any]
    task_size: int
    results_path: Path | None
    parallel_func: str
    stop_func: str | None
    only_if_func: str | None
    modules: tuple[str, ...]
    options: dict[str, Any]
    local_workers: int | None


def _check_function(cls: type, name: str | None, role: str) -> None:
    if name is None:
        return
    if not isinstance(name, str):
        raise ConfigurationError(f"{role} must be the *name* of a method, not {name!r}")
    try:
        attr = inspect.getattr_static(cls, name)
    except AttributeError:
        raise ConfigurationError(
            f"{cls.__name__} has no {role} {name!r}: define it as a @staticmethod or "
            "@classmethod taking one item"
        ) from None
    if not isinstance(attr, staticmethod | classmethod):
        raise ConfigurationError(
            f"{cls.__name__}.{name} ({role}) must be a @staticmethod or @classmethod taking "
            "one item; a plain method would need an instance"
        )


class Distribute:
    """Decorate a project class so that ``Project()`` runs it in parallel.

    ``parallel_func``, ``stop_func`` and ``only_if_func`` are the *names* of static or class
    methods taking one item. With both stop and only-if, stop is tested first on every value
    (a truthy stop ends the project whatever only-if says); only-if then decides what is kept.
    ``user_name=None`` runs on an embedded local server with local worker processes.

    Beyond the original arguments: ``task_timeout`` (seconds per task in a worker),
    ``max_attempts`` (crashes or timeouts of a task before the project fails),
    ``lease_timeout`` (seconds without a sign of life before a worker's tasks are re-issued),
    ``errors`` (``"raise"``: an exception fails the project; ``"skip"``: the item is dropped and
    reported in ``project.errors``) and ``local_workers`` (slots of the embedded default).
    """

    def __init__(
        self,
        user_name: str | None = None,
        iterator: Iterable[Any] | None = None,
        task_size: int = 1,
        results_path: str | Path | None = None,
        parallel_func: str = "parallel_func",
        stop_func: str | None = None,
        only_if_func: str | None = None,
        modules: Sequence[str] = (),
        *,
        task_timeout: float | None = None,
        max_attempts: int = 3,
        lease_timeout: float = 30.0,
        errors: str = "raise",
        local_workers: int | None = None,
    ) -> None:
        if iterator is None:
            raise ConfigurationError("Distribute needs an iterator (any iterable of items)")
        if not isinstance(iterator, Iterable):
            raise ConfigurationError(f"iterator must be iterable, not {type(iterator).__name__}")
        if type(task_size) is not int or task_size < 1:
            raise ConfigurationError(f"task_size must be an integer >= 1, not {task_size!r}")
        if isinstance(modules, str):
            modules = (modules,)
        if not all(isinstance(m, str) and m for m in modules):
            raise ConfigurationError("modules must be a list of module names")
        if errors not in p.ERROR_POLICIES:
            raise ConfigurationError(f"errors must be one of {p.ERROR_POLICIES}, not {errors!r}")
        options = {
            "task_timeout": task_timeout,
            "max_attempts": max_attempts,
            "lease_timeout": lease_timeout,
            "errors": errors,
        }
        from .scheduler import normalize_options

        try:
            normalize_options(options)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self.spec = ProjectSpec(
            user_name=user_name,
            iterator=iterator,
            task_size=task_size,
            results_path=Path(results_path) if results_path is not None else None,
            parallel_func=parallel_func,
            stop_func=stop_func,
            only_if_func=only_if_func,
            modules=tuple(modules),
            options=options,
            local_workers=local_workers,
        )

    def __call__(self, cls: type) -> type[ProjectHandle]:
        if not inspect.isclass(cls):
            raise ConfigurationError("@Distribute decorates a class")
        _check_function(cls, self.spec.parallel_func, "parallel_func")
        _check_function(cls, self.spec.stop_func, "stop_func")
        _check_function(cls, self.spec.only_if_func, "only_if_func")
        namespace = {
            "_spec": self.spec,
            "user_class": cls,
            "__doc__": cls.__doc__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        return type(cls.__name__, (ProjectHandle,), namespace)


def pickle_class(cls: type, modules: Sequence[str]) -> bytes:
    """The class by value, unless workers are told to import its module."""
    module = sys.modules.get(cls.__module__)
    by_value = (
        module is not None
        and cls.__module__ != "__main__"
        and (cls.__module__.split(".")[0] not in {m.split(".")[0] for m in modules})
    )
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(cls, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"the project class {cls.__name__} cannot be pickled: {exc}"
        ) from exc
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


class ProjectHandle:
    """What ``Project()`` returns: a running project. Created by the ``Distribute`` decorator."""

    _spec: ProjectSpec
    user_class: type

    def __init__(self) -> None:
        spec = self._spec
        self.name = self.user_class.__qualname__
        self.project_id: str | None = None
        self.errors: list[dict[str, Any]] = []  # items skipped under errors="skip"
        self.notices: list[str] = []
        self.stats: dict[str, Any] = {}
        self._writer = ResultsWriter(spec.results_path) if spec.results_path else None
        code = pickle_class(self.user_class, spec.modules)
        self._future: concurrent.futures.Future[dict[Any, Any]] = concurrent.futures.Future()
        self._run = _ProjectRun(self, code)
        try:
            call(self._run.start(), timeout=60)
        except DcprotoError:
            raise
        except concurrent.futures.TimeoutError:
            raise ConnectionFailed("timed out submitting the project") from None

    # ---- public API --------------------------------------------------------------------------

    async def results(self) -> dict[Any, Any]:
        """Wait for the project and return ``{item: return value}``.

        Raises TaskFailed (with the item and remote traceback), ProjectCancelled,
        ProjectUnrunnable or ConnectionFailed when the project cannot finish."""
        return await asyncio.wrap_future(self._future)

    def get_results(self, timeout: float | None = None) -> dict[Any, Any]:
        """Blocking form of :meth:`results`; raises TimeoutError after ``timeout`` seconds."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"project {self.name} not finished after {timeout} s") from None

    @property
    def progress(self) -> Progress:
        run = self._run
        return Progress(
            tasks_done=run.tasks_done,
            items_done=run.items_done,
            items_kept=run.items_kept,
            total_tasks=run.total_tasks,
            total_items=run.total_items,
            status=run.status,
        )

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        """Cancel the project: the server stops it and workers abandon its tasks at once."""
        background_loop().call_soon_threadsafe(self._run.cancel)

    def __repr__(self) -> str:
        return f"<{self.name} project {self.project_id} {self._run.status}>"


class _ProjectRun:
    """The project's life on the background loop: feed tasks, take results, finish."""

    def __init__(self, handle: ProjectHandle, code: bytes) -> None:
        self.handle = handle
        self.spec = handle._spec
        self.code = code
        self.client: CreatorClient | None = None
        self.project_id: str | None = None
        self.status = "submitting"
        self.results: dict[Any, Any] = {}
        self.tasks_done = self.items_done = self.items_kept = 0
        self.run_time_total = self.exec_time_total = self.round_trip_total = 0.0
        self.total_tasks: int | None = None
        self.total_items: int | None = None
        self.credit = 0
        self._credit_event = asyncio.Event()
        self._feeder: asyncio.Task[None] | None = None
        self.submitted_at = time.time()
        self.finished = False

    async def start(self) -> None:
        spec = self.spec
        options = dict(spec.options)
        if spec.user_name is None:
            from .local import local_cluster

            cluster = await local_cluster(spec.local_workers)
            host, port, secret = cluster.host, cluster.port, cluster.secret
            options["fail_when_unrunnable"] = True
        else:
            from .users import get_user

            user = get_user(spec.user_name)
            if not user.secret:
                raise ConfigurationError(f"user {spec.user_name!r} has no secret")
            host, port, secret = user.host, user.port, user.secret
        self.client = await get_client(host, port, secret)
        accepted = await self.client.submit(
            {
                "name": self.handle.name,
                "code": self.code,
                "modules": list(spec.modules),
                "parallel": spec.parallel_func,
                "stop": spec.stop_func,
                "only_if": spec.only_if_func,
                "options": options,
            }
        )
        self.project_id = self.handle.project_id = accepted.project_id
        self.client.handlers[accepted.project_id] = self._on_message
        self.status = "running"
        self.credit = accepted.credit
        if self.handle._writer is not None:
            self.handle._writer.started(accepted.project_id, self.handle.name)
        self._feeder = asyncio.create_task(self._feed())

    # ---- feeding tasks -------------------------------------------------------------------------

    async def _feed(self) -> None:
        try:
            iterator: Iterator[Any] = iter(self.spec.iterator)
        except Exception as exc:
            self._fail_locally(DcprotoError(f"the iterator cannot be iterated: {exc}"))
            return
        seq = itertools.count()
        total_tasks = total_items = 0
        size = self.spec.task_size
        while not self.finished:
            while self.credit <= 0 and not self.finished:
                self._credit_event.clear()
                await self._credit_event.wait()
            if self.finished:
                return
            batch: list[list[Any]] = []
            batch_bytes = 0
            exhausted = False
            try:
                while (
                    len(batch) < min(self.credit, MAX_TASKS_PER_FRAME)
                    and batch_bytes < MAX_FRAME_PAYLOAD
                ):
                    items = list(itertools.islice(iterator, size))
                    if not items:
                        exhausted = True
                        break
                    blob = _pickle_items(items)
                    batch.append([next(seq), blob, len(items)])
                    batch_bytes += len(blob)
                    total_items += len(items)
            except DcprotoError as exc:
                self._fail_locally(exc)
                return
            except Exception as exc:
                self._fail_locally(DcprotoError(f"the iterator raised {exc!r}"))
                return
            assert self.client is not None and self.project_id is not None
            try:
                if batch:
                    self.credit -= len(batch)
                    total_tasks += len(batch)
                    self.client.send(p.Tasks(project_id=self.project_id, tasks=batch))
                if exhausted:
                    self.total_tasks, self.total_items = total_tasks, total_items
                    self.client.send(
                        p.End(
                            project_id=self.project_id,
                            total_tasks=total_tasks,
                            total_items=total_items,
                        )
                    )
                    return
                await self.client.drain()
            except (ConnectionFailed, ConnectionError) as exc:
                self._finish(error=ConnectionFailed(str(exc)))
                return
            await asyncio.sleep(0)

    def _fail_locally(self, error: DcprotoError) -> None:
        """The creator side failed (iterator, pickling): cancel on the server, then fail."""
        if self.client is not None and self.project_id is not None:
            with contextlib.suppress(DcprotoError):
                self.client.send(p.Cancel(project_id=self.project_id))
        self._finish(error=error)

    def cancel(self) -> None:
        if self.finished or self.client is None or self.project_id is None:
            return
        with contextlib.suppress(DcprotoError):
            self.client.send(p.Cancel(project_id=self.project_id))

    # ---- messages from the server --------------------------------------------------------------

    def _on_message(self, message: p.Message) -> None:
        if self.finished:
            return
        try:
            match message:
                case p.More():
                    self.credit += message.credit
                    self._credit_event.set()
                case p.TaskDone():
                    self._task_done(message)
                case p.Notice():
                    level = logging.WARNING if message.level == "warning" else logging.INFO
                    log.log(level, "project %s: %s", self.handle.name, message.text)
                    self.handle.notices.append(message.text)
                case p.Finished():
                    self._finished(message)
                case p.Goodbye():
                    self._finish(error=ConnectionFailed(message.reason))
        except DcprotoError as exc:
            self._fail_locally(exc)

    def _task_done(self, message: p.TaskDone) -> None:
        pairs = _unpickle(message.payload, "the results of a task")
        self.results.update(pairs)
        self.tasks_done += 1
        self.items_done += message.n_items
        self.items_kept += message.n_kept
        self.run_time_total += message.stats.get("run", 0.0)
        self.exec_time_total += message.stats.get("exec", 0.0)
        self.round_trip_total += message.stats.get("round_trip", 0.0)
        errors = message.stats.get("errors")
        if errors:
            self.handle.errors.extend(errors)
        writer = self.handle._writer
        if writer is not None:
            writer.task_done(message.seq, message.stats, message.files)

    def _finished(self, message: p.Finished) -> None:
        stats = dict(message.stats)
        self.handle.stats = stats
        if message.status == "done":
            self._finish(result=self.results, stats=stats)
        elif message.status == "stopped":
            assert message.stop is not None
            _, payload = message.stop
            stopped = dict(_unpickle(payload, "the stopping result"))
            self._finish(result=stopped, stats=stats, status="stopped")
        elif message.status == "cancelled":
            self._finish(error=ProjectCancelled(f"project {self.handle.name} was cancelled"))
        else:
            error = message.error or {}
            reason = error.get("reason", "failed")
            text = error.get("message", "the project failed")
            if reason == "unrunnable":
                self._finish(error=ProjectUnrunnable(text), stats=stats)
            else:
                self._finish(
                    error=TaskFailed(
                        f"project {self.handle.name} failed: {text}",
                        reason=reason,
                        attempts=error.get("attempts", 1),
                        item=error.get("item"),
                        remote_traceback=error.get("traceback"),
                        details=error,
                    ),
                    stats=stats,
                )

    def _finish(
        self,
        *,
        result: dict[Any, Any] | None = None,
        error: BaseException | None = None,
        stats: dict[str, Any] | None = None,
        status: str | None = None,
    ) -> None:
        if self.finished:
            return
        self.finished = True
        self._credit_event.set()
        if status is not None:
            self.status = status
        elif error is not None:
            self.status = "cancelled" if isinstance(error, ProjectCancelled) else "failed"
        else:
            self.status = "done"
        if self.client is not None and self.project_id is not None:
            self.client.handlers.pop(self.project_id, None)
        writer = self.handle._writer
        if writer is not None:
            try:
                writer.finish(
                    results=result,
                    status=self.status,
                    error=error,
                    stats=self._stats(stats or {}),
                    errors=self.handle.errors,
                )
            except DcprotoError as exc:
                error = error or exc
        future = self.handle._future
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result if result is not None else {})

    def _stats(self, server: dict[str, Any]) -> dict[str, Any]:
        finished_at = time.time()
        wall = finished_at - self.submitted_at
        first_started_at = None
        if server.get("first_started_at") is not None and server.get("submitted_at") is not None:
            # the server's clock is monotonic; carry its delay over to our wall clock
            first_started_at = self.submitted_at + (
                server["first_started_at"] - server["submitted_at"]
            )
        return {
            "project_id": self.project_id,
            "name": self.handle.name,
            "status": self.status,
            "submitted_at": self.submitted_at,
            "first_started_at": first_started_at,
            "finished_at": finished_at,
            "wall_time": wall,
            "total_tasks": self.total_tasks,
            "total_items": self.total_items,
            "tasks_done": self.tasks_done,
            "items_done": self.items_done,
            "items_kept": self.items_kept,
            "tasks_reissued": server.get("tasks_reissued", 0),
            "duplicates_dropped": server.get("duplicates_dropped", 0),
            "per_worker_tasks": server.get("per_worker", {}),
            "items_per_second": self.items_done / wall if wall > 0 else None,
            "run_time_total": self.run_time_total,
            "exec_time_total": self.exec_time_total,
            "round_trip_total": self.round_trip_total,
        }


def _pickle_items(items: list[Any]) -> bytes:
    for item in items:
        try:
            hash(item)
        except TypeError:
            raise UnhashableItemError(
                f"item {item!r:.200} is not hashable, so it cannot be a key of the results; "
                "yield tuples or frozensets instead of lists or sets"
            ) from None
    try:
        return cloudpickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(f"an item cannot be pickled: {exc}") from exc


def _unpickle(payload: bytes, what: str) -> list[tuple[Any, Any]]:
    try:
        return cloudpickle.loads(payload)
    except Exception as exc:
        raise SerializationError(f"{what} cannot be unpickled here: {exc}") from exc
