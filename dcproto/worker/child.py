"""The child process that runs user code for a worker: ``python -m dcproto.child``.

It reads commands from the worker on stdin and answers on the original stdout, which it keeps
on a private descriptor; user code's prints go to stderr. Frames use the wire protocol's header
and msgpack arrays:

* ``["load", project_id, code, modules, parallel, stop, only_if, errors]`` -- no answer; a load
  failure is reported by the next ``run`` of that project as outcome ``load_error``.
* ``["run", task_id, attempt, project_id, items]`` -> ``["done", task_id, outcome, payload,
  n_items, n_kept, error, stats, files]``.

User code may write files into ``$DCPROTO_OUTPUT_DIR``, one directory for the child's life
(the worker sets it); after each task whatever is there is sent back and the directory emptied.

Abandoning: the worker writes (task_id, attempt) records to the abandon pipe (its read end's
descriptor is the first argument), then sends SIGUSR1. The handler reads the pipe and raises
:class:`TaskAbandoned` only if the running task is named and user code is running (never while
a frame is read or written); a task named before it starts is answered ``abandoned`` without
running. So a request is never lost between two tasks, and never hits the wrong task. Either
way the answer's outcome is ``abandoned`` (the worker uses the same path for timeouts).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import shutil
import signal
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cloudpickle
import msgpack

from ..errors import UnsafeResult
from ..paths import OUTPUT_DIR_ENV
from ..pickling import PLAIN_TYPES
from ..protocol import HEADER, Decoder
from ..trust.safe import safe_loads

MAX_OUTPUT_BYTES = 32 * 1024 * 1024  # additional files of one task, in total
MAX_OUTPUT_FILES = 1000
MAX_LOADED_PROJECTS = 16
READ_CHUNK = 1 << 16
MAX_REPORTED_ERRORS = 5  # with errors="skip", how many error texts travel back per task


class TaskAbandoned(BaseException):
    """Raised inside user code when the worker abandons the task (BaseException so that a
    user's ``except Exception`` does not swallow it)."""


_abandonable = False  # user code of the current task is running
_current: tuple[int, int] | None = None  # the task being run
_abandon_fd: int | None = None
MAX_ABANDON_NAMES = 4096  # names of tasks the child has not reached yet
_abandoned: dict[tuple[int, int], None] = {}
_RECORD_SIZE = 12  # task_id: u64, attempt: u32, big-endian


def _read_abandons() -> None:
    """Take in the names on the abandon pipe (each write is one whole record)."""
    if _abandon_fd is None:
        return
    while True:
        try:
            data = os.read(_abandon_fd, _RECORD_SIZE * 256)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            return
        for offset in range(0, len(data) - _RECORD_SIZE + 1, _RECORD_SIZE):
            key = (
                int.from_bytes(data[offset : offset + 8], "big"),
                int.from_bytes(data[offset + 8 : offset + 12], "big"),
            )
            _abandoned[key] = None
        while len(_abandoned) > MAX_ABANDON_NAMES:
            del _abandoned[next(iter(_abandoned))]


def _on_abandon(signum: int, frame: Any) -> None:
    _read_abandons()
    if _abandonable and _current in _abandoned:
        raise TaskAbandoned


def _is_abandoned(key: tuple[int, int]) -> bool:
    """Whether ``key`` was named on the pipe (forgetting the name: it is answered now)."""
    _read_abandons()
    return _abandoned.pop(key, False) is None


class LoadedProject:
    def __init__(self, command: list[Any]) -> None:
        _, self.project_id, code, modules, parallel, stop, only_if, self.errors, trusted = command
        # values for a creator that decodes them with the safe decoder are checked here, so
        # that a value it would refuse fails its own item with a clear error
        self.check_values = not trusted
        self.error: str | None = None
        try:
            for name in modules:
                importlib.import_module(name)
            cls = cloudpickle.loads(code)
            self.parallel = getattr(cls, parallel)
            self.stop = getattr(cls, stop) if stop else None
            self.only_if = getattr(cls, only_if) if only_if else None
        except BaseException as exc:  # any failure to load is reported, never fatal
            self.error = "".join(traceback.format_exception_only(exc)).strip()


def _error_info(item: Any, exc: BaseException) -> dict[str, Any]:
    try:
        item_text = repr(item)
    except Exception:
        item_text = f"<unrepresentable {type(item).__name__}>"
    return {
        "message": "".join(traceback.format_exception_only(exc)).strip(),
        "item": item_text[:1000],
        "traceback": "".join(traceback.format_exception(exc))[-20000:],
        "type": type(exc).__name__,
    }


def _pickle_kept(kept: dict[int, Any], items: Sequence[Any], check_values: bool) -> bytes:
    """The kept values, keyed by their item's index in the task (the creator keeps the items
    themselves). Raises _ValueError naming the item whose value cannot travel."""
    if PLAIN_TYPES.issuperset(map(type, kept.values())):
        # the C pickler is several times faster, and plain values pickle the same either way
        return pickle.dumps(kept, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        blob = cloudpickle.dumps(kept, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        for index, value in kept.items():  # find the culprit, to name it in the error
            try:
                cloudpickle.dumps(value)
            except Exception as inner:
                raise _ValueError(items[index], inner) from inner
        raise _ValueError(None, exc) from exc
    if check_values:
        try:
            safe_loads(blob, what="a value")
        except UnsafeResult as exc:
            for index, value in kept.items():
                try:
                    safe_loads(
                        cloudpickle.dumps(value), what=f"the value for {items[index]!r:.200}"
                    )
                except UnsafeResult as inner:
                    raise _ValueError(items[index], inner, reason="unsafe_type") from inner
            raise _ValueError(None, exc, reason="unsafe_type") from exc
    return blob


class _ValueError(Exception):
    def __init__(self, item: Any, cause: BaseException, reason: str = "unpicklable") -> None:
        if reason == "unsafe_type":
            super().__init__(str(cause))
        else:
            super().__init__(f"the return value cannot be pickled: {cause}")
        self.item = item
        self.reason = reason


def _left_behind(output_dir: Path) -> bool:
    """Whether the task left files in its output dir (or removed the dir): one cheap syscall
    for the common case of a task that wrote nothing."""
    try:
        with os.scandir(output_dir) as entries:
            return next(entries, None) is not None
    except FileNotFoundError:
        return True


def _empty(output_dir: Path) -> None:
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)


def _collect_files(output_dir: Path) -> list[list[Any]]:
    files: list[list[Any]] = []
    total = 0
    for path in sorted(output_dir.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        total += len(data)
        if total > MAX_OUTPUT_BYTES or len(files) >= MAX_OUTPUT_FILES:
            raise OSError(
                f"additional result files exceed {MAX_OUTPUT_BYTES} bytes "
                f"or {MAX_OUTPUT_FILES} files for one task"
            )
        files.append([path.relative_to(output_dir).as_posix(), data])
    return files


def run_task(project: LoadedProject, items_blob: bytes, output_dir: Path) -> list[Any]:
    """Run one task; returns [outcome, payload, n_items, n_kept, error, stats, files]."""
    global _abandonable
    started = time.perf_counter()
    if project.error is not None:
        return ["load_error", b"", 0, 0, {"message": project.error}, {}, []]
    run_time = 0.0
    kept: dict[Any, Any] = {}
    left_behind: bool | None = None  # unknown until the task has run
    outcome = "ok"
    error: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = []
    n_items = 0
    n_errors = 0
    files: list[list[Any]] = []
    try:
        _abandonable = True
        if _current in _abandoned:  # named between the check before the task and now
            raise TaskAbandoned
        items = pickle.loads(items_blob)
        parallel, stop, only_if = project.parallel, project.stop, project.only_if
        loop_started = time.perf_counter()
        # the loop is timed as a whole: two clock reads per item cost more than x + 1 does
        for index, item in enumerate(items):
            n_items += 1
            try:
                value = parallel(item)
                if stop is not None and stop(value):
                    outcome = "stop"
                    kept = {index: value}
                    break
                if only_if is None or only_if(value):
                    kept[index] = value
            except TaskAbandoned:
                raise
            except BaseException as exc:
                if project.errors == "raise":
                    outcome, error = "error", _error_info(item, exc)
                    break
                n_errors += 1
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append(_error_info(item, exc))
        run_time = time.perf_counter() - loop_started
        if outcome == "error":
            payload = b""
        else:
            try:
                payload = _pickle_kept(kept, items, project.check_values)
            except _ValueError as exc:
                outcome, payload = "error", b""
                error = _error_info(exc.item, exc)
                error["reason"] = exc.reason
        if outcome != "error":
            left_behind = _left_behind(output_dir)
            if left_behind:
                files = _collect_files(output_dir)
        _abandonable = False
    except TaskAbandoned:
        _abandonable = False
        return ["abandoned", b"", n_items, 0, None, {}, []]
    except BaseException as exc:  # items that do not unpickle, unreadable files, ...
        _abandonable = False
        return ["error", b"", n_items, 0, _error_info(None, exc), {}, []]
    finally:
        _abandonable = False
        if left_behind is not False and (left_behind or _left_behind(output_dir)):
            _empty(output_dir)
    stats = {"run": run_time, "exec": time.perf_counter() - started}
    if n_errors:
        stats["errors"] = errors
        stats["n_errors"] = n_errors
    n_kept = len(kept) if outcome != "error" else 0
    return [outcome, payload, n_items, n_kept, error, stats, files]


class _CommandReader:
    """Frames from the worker's command pipe, reading as much as is there at once (one
    syscall per command in the common case instead of two)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # the worker is trusted and its frames are bounded by the server's: no limit here
        # beyond what the 4-byte header can say
        self.decoder = Decoder(max_frame=2 ** (8 * HEADER.size) - 1)

    def next_body(self) -> bytes | None:
        """The next frame's body; None when the worker has closed the pipe."""
        while (body := self.decoder.next_frame()) is None:
            chunk = os.read(self.fd, READ_CHUNK)  # a pipe holds 64 KiB: no point asking more
            if not chunk:
                return None
            self.decoder.append(chunk)
        return body


def _write_frame(fd: int, body: bytes) -> None:
    """Header and body in one writev, without joining them (a body may be megabytes)."""
    parts = [memoryview(HEADER.pack(len(body))), memoryview(body)]
    while parts:
        written = os.writev(fd, parts)
        while parts and written >= len(parts[0]):
            written -= len(parts[0])
            parts.pop(0)
        if parts and written:
            parts[0] = parts[0][written:]


def main() -> None:
    global _abandon_fd, _current
    if len(sys.argv) > 1:
        _abandon_fd = int(sys.argv[1])
        os.set_blocking(_abandon_fd, False)
    # Keep the command channel private: user prints must not corrupt it.
    commands = _CommandReader(os.dup(0))
    answers = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGUSR1, _on_abandon)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when children stop
    output_dir = Path(os.environ.get(OUTPUT_DIR_ENV) or os.path.join(os.getcwd(), "dcproto-out"))
    os.environ[OUTPUT_DIR_ENV] = str(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    projects: OrderedDict[str, LoadedProject] = OrderedDict()
    while True:
        body = commands.next_body()
        if body is None:
            return
        command = msgpack.unpackb(body, raw=False)
        if command[0] == "load":
            projects[command[1]] = LoadedProject(command)
            projects.move_to_end(command[1])
            while len(projects) > MAX_LOADED_PROJECTS:
                projects.popitem(last=False)
        elif command[0] == "run":
            _, task_id, attempt, project_id, items = command
            project = projects.get(project_id)
            # user code may have replaced the handler in an earlier task
            signal.signal(signal.SIGUSR1, _on_abandon)
            if project is not None:
                projects.move_to_end(project_id)  # the runner mirrors this LRU order
            _current = (task_id, attempt)
            if _is_abandoned(_current):
                answer = ["abandoned", b"", 0, 0, None, {}, []]
            elif project is None:
                answer = ["load_error", b"", 0, 0, {"message": "project not loaded"}, {}, []]
            else:
                answer = run_task(project, items, output_dir)
            _abandoned.pop(_current, None)  # answered: a late name for it is moot
            _current = None
            body = msgpack.packb(["done", task_id, *answer], use_bin_type=True)
            with contextlib.suppress(BrokenPipeError):
                _write_frame(answers, body)


if __name__ == "__main__":
    main()
