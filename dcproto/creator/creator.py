"""The creator library: ``@Distribute`` on a project class, and the handle ``Project()`` returns.

``Project()`` validates the class, connects (to a named server, or to the embedded local one),
submits and returns at once; the iterator is then sliced lazily into tasks on the background
loop, only as fast as the server grants credit. ``await project.results()`` and
``project.get_results()`` both wait on the same future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import io
import logging
import pickle
import sys
import threading
import types
from collections import ChainMap
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cloudpickle

from .. import protocol as p
from ..connection import Endpoint
from ..errors import (
    ConfigurationError,
    ConnectionFailed,
    ProjectCancelled,
    ProjectError,
    SerializationError,
    UsageError,
)
from ..options import normalize_options
from .client import background_loop, call
from .results import ResultsWriter
from .run import ProjectRun
from .shipping import shipped_by_value

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
    # an iterable, or a zero-argument callable making a fresh one for each Project()
    iterator: Iterable[Any] | Callable[[], Iterable[Any]]
    task_size: int
    results_path: Path | None
    parallel_func: str
    stop_func: str | None
    only_if_func: str | None
    modules: tuple[str, ...]
    options: dict[str, Any]
    local_workers: int | None
    reconnect_timeout: float = 300.0
    endpoint: Endpoint | None = None  # a server given by address, not by user_name
    # a handle by project id alone (no project class): it has no iterator to feed from
    by_id: bool = False
    # by id: attach also to a project whose creator had not sent all its items (to cancel
    # it); else such a project is refused, untouched, since nothing here could finish it
    allow_unfed: bool = False
    release: bool = True  # tell the server to drop the results once they are here
    progress: bool = True  # a bar while get_results() / results() waits, on a terminal


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

    ``iterator`` is any iterable, or a zero-argument callable that returns a fresh one for
    each ``Project()`` (``iterator=lambda: my_generator()``). An iterator (a generator, say)
    is used up by the first ``Project()``, so a second one is refused with UsageError.

    Beyond the original arguments: ``task_timeout`` (seconds per task in a worker),
    ``max_attempts`` (crashes or timeouts of a task before the project fails),
    ``max_reissues`` (times a task may go back to the queue unanswered -- its worker vanished,
    fell silent or held it too long -- before the project fails with the last cause),
    ``lease_timeout`` (seconds without a sign of life before a worker's tasks are re-issued),
    ``errors`` (``"raise"``: an exception fails the project; ``"skip"``: the item is dropped and
    reported in ``project.errors``), ``local_workers`` (slots of the embedded default) and
    ``reconnect_timeout`` (seconds to keep trying when the connection to the server drops; the
    project re-attaches and goes on; past it, ``results()`` raises ConnectionFailed) and
    ``trust_workers``: by default a worker's values are decoded with an allow-list of plain
    types (numbers, str, bytes, containers, datetime, Decimal, Fraction, numpy arrays), so a
    hostile worker cannot run code in this process; ``True`` unpickles them fully (any type
    comes back, and any worker of the server can run code here). The embedded default, whose
    only worker is this machine's, trusts its workers unless told ``trust_workers=False``.
    ``progress``: while ``get_results()`` or ``await results()`` waits, draw a progress bar on
    stderr if it is a terminal (never otherwise); ``False`` turns it off for this project
    class (each call may still say ``progress=``).
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
        max_reissues: int = 20,
        lease_timeout: float = 30.0,
        errors: str = "raise",
        local_workers: int | None = None,
        reconnect_timeout: float = 300.0,
        trust_workers: bool | None = None,
        progress: bool = True,
    ) -> None:
        if iterator is None:
            raise ConfigurationError("Distribute needs an iterator (any iterable of items)")
        if not isinstance(iterator, Iterable) and not callable(iterator):
            raise ConfigurationError(
                "iterator must be an iterable or a zero-argument callable returning one, "
                f"not {type(iterator).__name__}"
            )
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
            "max_reissues": max_reissues,
            "lease_timeout": lease_timeout,
            "errors": errors,
            "trust_workers": user_name is None if trust_workers is None else trust_workers,
        }

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
            reconnect_timeout=reconnect_timeout,
            progress=bool(progress),
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


_cloudpickle_code_reduce = cloudpickle.Pickler.dispatch_table[types.CodeType]
_DYNAMIC_FILENAME = "<dynamic-code>"  # what cloudpickle puts in place of a code's file name


def _code_reduce_keeping_filename(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, but with its real file name in place of
    ``<dynamic-code>``, so that a traceback on a worker names the user's file (and, when the
    file is there too, shows the line)."""
    rebuild, args = _cloudpickle_code_reduce(code)
    args = list(args)
    for index, arg in enumerate(args):
        if arg == _DYNAMIC_FILENAME and isinstance(arg, str):
            args[index] = code.co_filename
            break
    return rebuild, tuple(args)


class _ClassPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no types
    dispatch_table = ChainMap(
        {types.CodeType: _code_reduce_keeping_filename}, cloudpickle.Pickler.dispatch_table
    )


def pickle_class(cls: type, modules: Sequence[str]) -> bytes:
    """The class by value, unless workers are told to import its module. Its functions keep
    their file names (cloudpickle would say ``<dynamic-code>``), for remote tracebacks."""
    with shipped_by_value(cls, modules):
        try:
            buffer = io.BytesIO()
            _ClassPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(cls)
            return buffer.getvalue()
        except Exception as exc:
            raise SerializationError(
                f"the project class {cls.__name__} cannot be pickled: {exc}"
            ) from exc


class _Default:
    """Marks an argument left out (None is a meaningful user_name: the embedded default)."""


DEFAULT = _Default()


class ProjectHandle:
    """What ``Project()`` returns: a running project. Created by the ``Distribute`` decorator."""

    _spec: ProjectSpec
    user_class: type
    # what runs the project on the background loop (dcproto.Executor's handle subclasses it)
    _run_class: type[ProjectRun] = ProjectRun

    def __init__(self, *, _attach_to: str | None = None) -> None:
        # by id alone, the project's own name comes with the server's list of projects
        by_id = self._spec.by_id and _attach_to is not None
        self.name: str = (
            _attach_to if by_id and _attach_to is not None else self.user_class.__qualname__
        )
        iterable, taken = _iterable_for(self._spec, self.name)
        self._spec = spec = dataclasses.replace(self._spec, iterator=iterable)
        self.project_id: str | None = None
        self.errors: list[dict[str, Any]] = []  # items skipped under errors="skip"
        self.notices: list[str] = []
        self.stats: dict[str, Any] = {}
        try:
            self._writer = ResultsWriter(spec.results_path) if spec.results_path else None
            self._future: concurrent.futures.Future[dict[Any, Any]] = concurrent.futures.Future()
            if _attach_to is None:
                self._run = self._run_class(self, pickle_class(self.user_class, spec.modules))
                if self._run.start_nowait():  # the connection is up: no need to wait
                    return
                starting = self._run.start()
            else:
                self._run = ProjectRun(self, b"")
                starting = self._run.start_attached(_attach_to)
            try:
                call(starting, timeout=60)
            except concurrent.futures.TimeoutError:
                raise ConnectionFailed("timed out reaching the server") from None
        except BaseException:
            _give_back(taken)  # nothing was taken from it: a later Project() may use it
            raise
        if self._run._feeder is None:
            _give_back(taken)  # attached to a project that needs no feeding

    @classmethod
    def attach(
        cls, project_id: str, *, user_name: str | _Default | None = DEFAULT
    ) -> ProjectHandle:
        """A handle on a project submitted earlier, perhaps by a process that has exited.

        Results delivered so far are replayed. If the project was still being fed when its
        creator went away, feeding resumes where the server's stored tasks end, by skipping
        that many items of this class's iterator, so the iterator must yield the same items
        in the same order (a range, a list, a deterministic generator)."""
        spec = cls._spec
        if not isinstance(user_name, _Default):
            spec = dataclasses.replace(spec, user_name=user_name)
        handle = cls.__new__(cls)
        handle._spec = spec
        ProjectHandle.__init__(handle, _attach_to=project_id)
        return handle

    # ---- public API --------------------------------------------------------------------------

    async def results(self, *, progress: bool | None = None) -> dict[Any, Any]:
        """Wait for the project and return ``{item: return value}``.

        Raises TaskFailed (with the item and remote traceback), ProjectCancelled,
        ProjectUnrunnable or ConnectionFailed when the project cannot finish. While it waits,
        a progress bar is drawn on stderr if that is a terminal, unless ``progress=False``
        (default: the ``progress`` given to ``Distribute``)."""
        future = asyncio.wrap_future(self._future)
        if not future.done() and self._bar_wanted(progress):
            from .progress import wait_showing_async

            await wait_showing_async(self, future)
        return await future

    def get_results(
        self, timeout: float | None = None, *, progress: bool | None = None
    ) -> dict[Any, Any]:
        """Blocking form of :meth:`results`; raises TimeoutError after ``timeout`` seconds.

        Interrupted (Ctrl-C), it raises KeyboardInterrupt; left uncaught, that prints one line
        saying where the project is (and how to get its results) instead of a traceback."""
        try:
            if not self._future.done() and self._bar_wanted(progress):
                from .progress import wait_showing

                wait_showing(self, timeout)
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"project {self.name} not finished after {timeout} s") from None
        except KeyboardInterrupt as exc:
            _mark_interrupt(exc, self._interrupted_text())
            raise

    def as_completed(self, timeout: float | None = None) -> Iterator[tuple[Any, Any]]:
        """``(item, value)`` pairs as the results arrive: every result once, those that came
        before the call first. It ends when the project does, and then raises the project's
        error as :meth:`get_results` would (a failed or cancelled project: after yielding the
        results that came). ``timeout``: seconds for the whole iteration, then TimeoutError.
        ``async for item, value in project`` is the same on an event loop. Each iteration
        is independent: several may run at once, in threads or tasks."""
        from .stream import _Completed

        return _Completed(self, timeout)

    def __aiter__(self) -> AsyncIterator[tuple[Any, Any]]:
        from .stream import _Completed

        return _Completed(self)

    def _bar_wanted(self, progress: bool | None) -> bool:
        from .progress import bar_wanted

        return bar_wanted(self._spec.progress if progress is None else progress)

    def _interrupted_text(self) -> str:
        spec, run = self._spec, self._run
        if self.done():
            return f"interrupted; project {self.name} had ended"
        if spec.user_name is None and spec.endpoint is None:
            return f"interrupted; project {self.name} ends with this process"
        server = (
            f"--server {spec.endpoint.host}:{spec.endpoint.port}"
            if spec.endpoint is not None
            else f"--user {spec.user_name}"
        )
        if run.total_tasks is not None or spec.by_id:
            return (
                f"interrupted; project {self.name} goes on on the server; its results: "
                f"dcproto projects results {self.project_id} {server}"
            )
        return (
            f"interrupted while project {self.name} was still sending its items; it waits "
            f"on the server for the rest: {self.user_class.__qualname__}.attach("
            f"{self.project_id!r}, user_name={spec.user_name!r}) sends them and waits for "
            "the results"
        )

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


def attach(
    project_id: str,
    *,
    user_name: str | None = None,
    results_path: str | Path | None = None,
    endpoint: Endpoint | None = None,
) -> ProjectHandle:
    """A handle on a project by id alone (no project class), on the named server
    ``user_name`` or at ``endpoint``: it receives the project's results but cannot feed tasks.

    A project whose creator had not sent all its items (no End on the server) is refused with
    ProjectError, untouched: only that creator's class, with its iterator, can send the rest
    (``TheClass.attach(project_id, user_name=...)``), so waiting here could never end."""
    return _attach_by_id(project_id, user_name, endpoint, results_path)


def cancel_project(
    project_id: str,
    *,
    user_name: str | None = None,
    endpoint: Endpoint | None = None,
    timeout: float = 30.0,
) -> tuple[str, bool]:
    """Cancel a project by id, fed completely or not. Returns its final status and whether it
    had ended before (then nothing is cancelled, and its results stay on the server)."""
    handle = _attach_by_id(project_id, user_name, endpoint, None, allow_unfed=True, release=False)
    run = handle._run
    if run.attached_status != "running":  # ended already: nothing to cancel, nothing to fetch
        background_loop().call_soon_threadsafe(run.detach)
        return str(run.attached_status), True
    handle.cancel()
    try:
        handle.get_results(timeout, progress=False)
    except ProjectCancelled:
        return "cancelled", False
    except ProjectError:
        pass
    return run.status, True  # it ended otherwise before the Cancel reached the server


def _attach_by_id(
    project_id: str,
    user_name: str | None,
    endpoint: Endpoint | None,
    results_path: str | Path | None,
    *,
    allow_unfed: bool = False,
    release: bool = True,
) -> ProjectHandle:
    spec = ProjectSpec(
        user_name=user_name,
        iterator=(),
        task_size=1,
        results_path=Path(results_path) if results_path is not None else None,
        parallel_func="parallel_func",
        stop_func=None,
        only_if_func=None,
        modules=(),
        options={},
        local_workers=None,
        endpoint=endpoint,
        by_id=True,
        allow_unfed=allow_unfed,
        release=release,
    )
    cls = cast(
        "type[ProjectHandle]",
        type("Attached", (ProjectHandle,), {"_spec": spec, "user_class": _Attached}),
    )
    handle = cls.__new__(cls)
    ProjectHandle.__init__(handle, _attach_to=project_id)
    return handle


class _Attached:
    """Stands in for the project class of a project attached to by id."""


# ---- iterators: one Project() each ---------------------------------------------------------------

_taken_lock = threading.Lock()
# id -> the iterator a Project() feeds from; kept referenced so that its id stays its own
_taken: dict[int, Any] = {}


def _iterable_for(spec: ProjectSpec, name: str) -> tuple[Iterable[Any], int | None]:
    """The iterable one Project() feeds from, and the id under which it was taken (an
    iterator can be used up only once: a second Project() of it would run on nothing)."""
    source: Any = spec.iterator
    if not isinstance(source, Iterable) and callable(source):
        try:
            source = source()
        except Exception as exc:
            raise ConfigurationError(f"the iterator function of {name} raised {exc!r}") from exc
        if not isinstance(source, Iterable):
            raise ConfigurationError(
                f"the iterator function of {name} returned a {type(source).__name__}, "
                "not an iterable"
            )
    if not isinstance(source, Iterator):
        return source, None  # a range, a list...: iterated afresh by each Project()
    with _taken_lock:
        if id(source) in _taken:
            raise UsageError(
                f"the iterator of {name} is a {type(source).__name__}, already used up by an "
                f"earlier {name}() (or attach): a second one would run on nothing. Pass a "
                "function that makes a fresh one instead: iterator=lambda: make_items(), or a "
                "list or range"
            )
        _taken[id(source)] = source
    return source, id(source)


def _give_back(taken: int | None) -> None:
    if taken is not None:
        with _taken_lock:
            _taken.pop(taken, None)


# ---- Ctrl-C --------------------------------------------------------------------------------------


def _mark_interrupt(exc: KeyboardInterrupt, text: str) -> None:
    """Have ``exc``, if nobody catches it, print ``text`` on one line instead of a traceback
    (the process still exits as interrupted: status 130 in a shell)."""
    exc._dcproto_text = text  # type: ignore[attr-defined]
    previous = sys.excepthook
    if getattr(previous, "_dcproto_interrupt", False):
        return

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        text = getattr(value, "_dcproto_text", None)
        if text is None:
            previous(kind, value, tb)
        else:
            print(f"dcproto: {text}", file=sys.stderr)

    excepthook._dcproto_interrupt = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
