"""The child process that runs user code for a worker: ``python -m dcproto.child``.

It reads commands from the worker on stdin and answers on the original stdout, which it keeps
on a private descriptor; user code's prints go to stderr. Frames use the wire protocol's header
and msgpack arrays:

* ``["limits", max_memory, max_task_seconds, max_disk]`` -- no answer; the volunteer's caps
  (None: no cap), sent before the load, so they bind user code from its first line.
* ``["load", project_id, code, modules, parallel, stop, only_if, errors, trusted, binding]``
  -- no answer; a load failure is reported by the next ``run`` of that project as outcome
  ``load_error``. A child serves one ``binding`` (one creator) for its whole life: a load for
  another binding is ignored, and a run of a project not loaded is answered ``load_error``
  without running. It keeps the ``MAX_LOADED`` projects used most recently; loading one more
  unloads the least recent. The unpickled code is kept by its content hash, so a project
  whose code is the same as an earlier one's (the same class submitted again) is not
  unpickled twice.
* ``["run", task_id, attempt, project_id, items]`` -> ``["done", task_id, outcome, payload,
  n_items, n_kept, error, stats, files]``.

Before any command, once it has imported what it needs, the child sends ``["ready"]``.

User code may write files into ``$DCPROTO_OUTPUT_DIR``, one directory for the child's life
(the worker sets it); after each task whatever is there is sent back and the directory emptied.

Abandoning: the worker writes (task_id, attempt) records to the abandon pipe (its read end's
descriptor is the first argument), then sends SIGUSR1. The handler reads the pipe and raises
:class:`TaskAbandoned` only if the running task is named and user code is running (never while
a frame is read or written); a task named before it starts is answered ``abandoned`` without
running. So a request is never lost between two tasks, and never hits the wrong task. Either
way the answer's outcome is ``abandoned`` (the worker uses the same path for timeouts).

Nothing is left behind: the child is a subreaper (orphans of what user code starts, even a
double fork or ``setsid``, are re-parented to it), and after each command it stops and kills
every process under it and reaps them, before it answers (one ``waitpid`` when there are none).

Caps (see ``limits``): memory is ``RLIMIT_AS`` for the child's life (soft and hard; inherited
by what it starts), and a ``MemoryError`` ends the task with outcome ``memory``. For each task
a soft ``RLIMIT_CPU`` of the CPU used so far plus ``max_task_seconds`` makes SIGXCPU raise
:class:`CpuTimeExceeded` in user code (outcome ``cpu_time``), and a soft ``RLIMIT_FSIZE`` of
``max_disk`` (SIGXFSZ ignored) makes a larger write fail with EFBIG; that, ENOSPC, or more than
``max_disk`` bytes left in the output dir give outcome ``disk``. Both soft limits are lifted
after the task. User code can raise a soft limit: the worker watches CPU and memory from outside
as well (see :mod:`dcproto.worker.runner`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import importlib
import math
import os
import pickle
import resource
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
from .procfs import ProcStat, all_processes, descendants, read_stat

try:  # the handler as set, without signal.getsignal's enum conversion (30 times slower)
    # no typeshed stub for the private module; same signature as signal.getsignal
    from _signal import getsignal as _handler_of  # type: ignore[import-not-found]
except ImportError:  # not CPython
    _handler_of = signal.getsignal

MAX_OUTPUT_BYTES = 32 * 1024 * 1024  # additional files of one task, in total
MAX_OUTPUT_FILES = 1000
READ_CHUNK = 1 << 16
MAX_REPORTED_ERRORS = 5  # with errors="skip", how many error texts travel back per task
CLEANUP_PATIENCE = 2.0  # seconds to spend stopping and reaping what a task left running


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


# ---- the volunteer's caps ------------------------------------------------------------------


class CpuTimeExceeded(BaseException):
    """Raised inside user code when the task has used its CPU seconds (SIGXCPU); a
    BaseException for the same reason as :class:`TaskAbandoned`."""


class _OverDiskCap(Exception):
    """The task left more than ``max_disk`` bytes in its output dir."""


# the caps of this child (see the "limits" command): None is no cap
_max_memory: int | None = None
_max_task_seconds: float | None = None
_max_disk: int | None = None
_cpu_capped = False  # a task's CPU limit is set: SIGXCPU means it is used up


def _set_limits(command: list[Any]) -> None:
    global _max_memory, _max_task_seconds, _max_disk
    _, _max_memory, _max_task_seconds, _max_disk = command
    if _max_memory is not None:
        # soft and hard: user code (and what it starts) cannot raise it again
        _lower_limit(resource.RLIMIT_AS, int(_max_memory), hard=True)


def _lower_limit(which: int, value: int, *, hard: bool = False) -> None:
    """Set the soft limit (and the hard one with ``hard``) to ``value``, never above the
    hard limit there is."""
    try:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            value = min(value, current_hard)
        resource.setrlimit(which, (value, value if hard else current_hard))
    except (ValueError, OSError):
        pass  # user code may have lowered the hard limit below it: that limit holds


def _lift_limit(which: int) -> None:
    """The soft limit back up to the hard one (unlimited, unless user code lowered it)."""
    try:
        _, current_hard = resource.getrlimit(which)
        resource.setrlimit(which, (current_hard, current_hard))
    except (ValueError, OSError):
        pass


def _on_cpu_limit(signum: int, frame: Any) -> None:
    if _abandonable and _cpu_capped:
        raise CpuTimeExceeded


def _restore_handler(signum: int, handler: Any) -> None:
    """Put ``handler`` back if user code replaced it (in Python) in an earlier task."""
    if _handler_of(signum) != handler:
        signal.signal(signum, handler)


def _cap_task() -> None:
    """This task's CPU and file-size limits (see the module docstring)."""
    global _cpu_capped
    _restore_handler(signal.SIGXCPU, _on_cpu_limit)
    _restore_handler(signal.SIGXFSZ, signal.SIG_IGN)
    if _max_task_seconds is not None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        # whole seconds: the limit falls up to a second after the task's share
        _lower_limit(
            resource.RLIMIT_CPU, math.ceil(usage.ru_utime + usage.ru_stime + _max_task_seconds)
        )
        _cpu_capped = True
    if _max_disk is not None:
        _lower_limit(resource.RLIMIT_FSIZE, int(_max_disk))


def _uncap_task() -> None:
    global _cpu_capped
    if _cpu_capped:
        _cpu_capped = False
        _lift_limit(resource.RLIMIT_CPU)
    if _max_disk is not None:
        _lift_limit(resource.RLIMIT_FSIZE)


def _cap_hit(exc: BaseException | None) -> str | None:
    """The outcome for a cap that ``exc`` (or an exception it was raised from) shows was hit:
    ``memory``, ``cpu_time``, ``disk``; None if none was."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, CpuTimeExceeded):
            return "cpu_time"
        if isinstance(exc, MemoryError) and _max_memory is not None:
            return "memory"
        if isinstance(exc, _OverDiskCap):
            return "disk"
        if isinstance(exc, OSError) and (
            exc.errno in (errno.ENOSPC, errno.EDQUOT)
            or (exc.errno == errno.EFBIG and _max_disk is not None)
        ):
            return "disk"
        exc = exc.__cause__ or exc.__context__
    return None


def size_text(size: float) -> str:
    """Bytes for a person: ``300 MiB``, ``1.5 GiB``, ``512 bytes``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size:.0f} bytes"


def cap_error(outcome: str, limit: float | None, detail: str | None = None) -> dict[str, Any]:
    """The error of a task that hit a cap: ``limit`` is the cap's value (None: none set, e.g.
    the disk was simply full)."""
    if outcome == "memory":
        message = (
            f"the task used more than {size_text(limit)} (--max-memory)"
            if limit is not None
            else "the task ran out of memory"
        )
    elif outcome == "cpu_time":
        message = f"the task used more than {limit:g} s of CPU time (--max-task-seconds)"
    else:
        message = (
            f"the task wrote more than {size_text(limit)} (--max-disk)"
            if limit is not None
            else "the task ran out of disk space"
        )
    error: dict[str, Any] = {"message": message, "reason": outcome}
    if detail:
        error["detail"] = detail[:1000]
    return error


def _cap_answer(outcome: str, n_items: int, exc: BaseException | None = None) -> list[Any]:
    limit = {"memory": _max_memory, "cpu_time": _max_task_seconds, "disk": _max_disk}[outcome]
    detail = None
    if exc is not None and not isinstance(exc, CpuTimeExceeded):
        with contextlib.suppress(Exception):
            detail = "".join(traceback.format_exception_only(exc)).strip()
    return [outcome, b"", n_items, 0, cap_error(outcome, limit, detail), {}, []]


def _tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (as they would travel: their apparent size)."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


# ---- processes user code starts ------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36
_GONE = frozenset("ZXx")  # states of a process that has exited
_HELD = frozenset("ZXxTt")  # ... or is stopped: it can fork no more


def become_subreaper() -> bool:
    """Adopt the orphans of every process under this one (Linux), so that a double fork or
    ``setsid`` cannot take a process out of reach of :func:`kill_tree`."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _send(pid: int, pidfd: int, signum: int) -> None:
    with contextlib.suppress(OSError):  # gone already
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(pid, signum)


def _hold(held: dict[int, int], info: ProcStat) -> None:
    """Stop ``info``'s process, keeping a pidfd on it for the kill: opened while the pid is
    known to name the process scanned, so that a pid reused since is never signalled."""
    try:
        pidfd = os.pidfd_open(info.pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        pidfd = -1  # no pidfds here (or out of descriptors): by pid, as kill(1) would
    if pidfd >= 0:
        now = read_stat(info.pid)
        if now is None or now.start != info.start:
            os.close(pidfd)
            return
    held[info.pid] = pidfd
    _send(info.pid, pidfd, signal.SIGSTOP)


def _proc_is_ours() -> bool:
    """Whether /proc numbers processes as this process sees them: in a pid namespace with
    the host's /proc, a walk from our pid would reach processes that are not ours at all."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def kill_tree(root: int, *, include_root: bool, patience: float = CLEANUP_PATIENCE) -> int:
    """SIGKILL every process under ``root``, in whatever session or group it put itself, and
    ``root`` too with ``include_root`` (if it is still this process's child). All are stopped
    first, rescanning until none is left running, so that none forks behind the scan; then
    all are killed at once. Returns how many processes were killed."""
    if not _proc_is_ours():
        return 0
    held: dict[int, int] = {}  # pid -> pidfd (-1: none)
    deadline = time.monotonic() + patience
    try:
        if include_root:
            info = read_stat(root)
            if info is None or info.ppid != os.getpid() or info.state in _GONE:
                return 0  # reaped, not ours, or dead (its orphans have gone up the tree)
            _hold(held, info)
        while True:
            moving = False
            if root in held and (info := read_stat(root)) is not None and info.state not in _HELD:
                _send(root, held[root], signal.SIGSTOP)  # started again by one under it
                moving = True
            for info in descendants(root):
                if info.state in _GONE:
                    continue
                if info.pid not in held:
                    _hold(held, info)
                    moving = True
                elif info.state not in _HELD:  # started again by another one of them
                    _send(info.pid, held[info.pid], signal.SIGSTOP)
                    moving = True
            if not moving or time.monotonic() > deadline:
                break
            time.sleep(0.0005)
    finally:
        for pid, pidfd in held.items():
            _send(pid, pidfd, signal.SIGKILL)
            if pidfd >= 0:
                os.close(pidfd)
    return len(held)


def end_descendants() -> None:
    """Kill and reap every process under this one: after it, user code has left nothing
    running. One syscall when nothing was started."""
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return
    # (with a /proc not our own, nothing can be found to kill: only reap, without waiting)
    patience = CLEANUP_PATIENCE if kill_tree(os.getpid(), include_root=False) else 0.0
    deadline = time.monotonic() + patience
    while True:  # the killed ones, and their orphans, are ours to reap (we are a subreaper)
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline:
                return  # one stuck in the kernel: the next command's clean-up tries again
            time.sleep(0.0005)


def tree_usage(roots: list[int]) -> dict[int, tuple[float, int | None]]:
    """For each live root: the CPU seconds of its tree (live processes, and what they reaped),
    and the memory of the tree (proportional set size) if it holds more than the root (whose
    own address space RLIMIT_AS caps already), else None."""
    table = all_processes()
    usage: dict[int, tuple[float, int | None]] = {}
    for root in roots:
        info = table.get(root)
        if info is None:
            continue
        tree = [below for below in descendants(root, table) if below.state not in _GONE]
        cpu = info.cpu + sum(below.cpu for below in tree)
        usage[root] = (cpu, sum(map(_memory, [info, *tree])) if tree else None)
    return usage


def _memory(info: ProcStat) -> int:
    """A process's share of the memory it uses (shared pages split between their users)."""
    try:
        with open(f"/proc/{info.pid}/smaps_rollup", "rb") as file:
            for line in file:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return info.rss


MAX_LOADED = 8  # projects a child keeps loaded (the worker's runner mirrors it)
_classes: OrderedDict[bytes, Any] = OrderedDict()  # sha256 of a project's code -> its class


def _unpickled(code: bytes) -> Any:
    """The project class in ``code``, unpickled once per distinct code."""
    digest = hashlib.sha256(code).digest()
    cls = _classes.get(digest)
    if cls is None:
        cls = cloudpickle.loads(code)
        _classes[digest] = cls
        while len(_classes) > MAX_LOADED:
            _classes.popitem(last=False)
    else:
        _classes.move_to_end(digest)
    return cls


class LoadedProject:
    def __init__(self, command: list[Any]) -> None:
        _, self.project_id, code, modules, parallel, stop, only_if, self.errors, trusted, _ = (
            command
        )
        # values for a creator that decodes them with the safe decoder are checked here, so
        # that a value it would refuse fails its own item with a clear error
        self.check_values = not trusted
        self.error: str | None = None
        self.cap: str | None = None  # a cap the load hit: its tasks get that outcome
        try:
            for name in modules:
                importlib.import_module(name)
            cls = _unpickled(code)
            self.parallel = getattr(cls, parallel)
            self.stop = getattr(cls, stop) if stop else None
            self.only_if = getattr(cls, only_if) if only_if else None
        except BaseException as exc:  # any failure to load is reported, never fatal
            self.error = "".join(traceback.format_exception_only(exc)).strip()
            self.cap = _cap_hit(exc)


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


def _failed_item(
    project: LoadedProject, item: Any, exc: BaseException, errors: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """An item raised ``exc``: the task's error if the project says errors="raise", else
    None, the item skipped and its error kept in ``errors`` (the first few only)."""
    if project.errors == "raise":
        return _error_info(item, exc)
    if len(errors) < MAX_REPORTED_ERRORS:
        errors.append(_error_info(item, exc))
    return None


def _by_index(values: list[Any], failed: list[int]) -> dict[int, Any]:
    """``values`` of every item but the ``failed`` ones (ascending), keyed by item index."""
    skipped = set(failed)
    indexes = (i for i in range(len(values) + len(failed)) if i not in skipped)
    return dict(zip(indexes, values, strict=True))


def _pickle_kept(
    kept: dict[int, Any] | list[Any], items: Sequence[Any], check_values: bool
) -> bytes:
    """The kept values: a list of one value per item in order when every item was kept,
    else keyed by their item's index in the task (the creator keeps the items themselves).
    Raises _ValueError naming the item whose value cannot travel."""
    values = kept.values() if isinstance(kept, dict) else kept
    if PLAIN_TYPES.issuperset(map(type, values)):
        # the C pickler is several times faster, and plain values pickle the same either way
        return pickle.dumps(kept, protocol=pickle.HIGHEST_PROTOCOL)
    pairs = kept.items() if isinstance(kept, dict) else enumerate(kept)
    try:
        blob: bytes = cloudpickle.dumps(kept, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        for index, value in pairs:  # find the culprit, to name it in the error
            try:
                cloudpickle.dumps(value)
            except Exception as inner:
                raise _ValueError(items[index], inner) from inner
        raise _ValueError(None, exc) from exc
    if check_values:
        try:
            safe_loads(blob, what="a value")
        except UnsafeResult as exc:
            for index, value in pairs:
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
        if project.cap is not None:  # not the code's fault: another worker may have room
            return _cap_answer(project.cap, 0)
        return ["load_error", b"", 0, 0, {"message": project.error}, {}, []]
    run_time = 0.0
    kept: dict[int, Any] | list[Any] = {}
    left_behind: bool | None = None  # unknown until the task has run
    outcome = "ok"
    error: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = []
    n_items = 0
    n_errors = 0
    files: list[list[Any]] = []
    try:
        _cap_task()
        _abandonable = True
        if _current in _abandoned:  # named between the check before the task and now
            raise TaskAbandoned
        items = pickle.loads(items_blob)
        parallel, stop, only_if = project.parallel, project.stop, project.only_if
        loop_started = time.perf_counter()
        # the loop is timed as a whole: two clock reads per item cost more than x + 1 does
        if stop is None and only_if is None:
            # every value is kept: map at C speed into a list, one value per item in order;
            # an item that raises leaves the values before it in place, and the map goes on
            # after it (list.extend keeps what it appended before the error)
            values: list[Any] = []
            failed: list[int] = []
            rest = iter(items)
            while True:
                failure: BaseException
                try:
                    values.extend(map(parallel, rest))
                except (TaskAbandoned, CpuTimeExceeded):
                    n_items = len(values) + len(failed) + 1
                    raise
                except BaseException as exc:
                    if _cap_hit(exc) is not None:
                        n_items = len(values) + len(failed) + 1
                        raise  # a cap, not the item, ended it: never skipped
                    failure = exc
                else:
                    n_items = len(values) + len(failed)
                    if n_items == len(items):
                        break
                    # map ends without a word when the function raises StopIteration: the
                    # next item is the one that raised it
                    failure = StopIteration("the parallel function raised StopIteration")
                n_items = len(values) + len(failed) + 1
                error = _failed_item(project, items[n_items - 1], failure, errors)
                if error is not None:
                    outcome = "error"
                    break
                failed.append(n_items - 1)
            n_errors = len(failed)
            kept = _by_index(values, failed) if failed else values
        else:
            kept = {}
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
                except (TaskAbandoned, CpuTimeExceeded):
                    raise
                except BaseException as exc:
                    if _cap_hit(exc) is not None:
                        raise  # a cap, not the item, ended it: never skipped
                    error = _failed_item(project, item, exc, errors)
                    if error is not None:
                        outcome = "error"
                        break
                    n_errors += 1
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
        if outcome != "error" or _max_disk is not None:
            left_behind = _left_behind(output_dir)
            if left_behind:
                if _max_disk is not None and _tree_size(output_dir) > _max_disk:
                    raise _OverDiskCap  # the files are dropped
                if outcome != "error":
                    files = _collect_files(output_dir)
        _abandonable = False
    except TaskAbandoned:
        _abandonable = False
        return ["abandoned", b"", n_items, 0, None, {}, []]
    except BaseException as exc:  # items that do not unpickle, unreadable files, caps, ...
        _abandonable = False
        cap = _cap_hit(exc)
        if cap is not None:
            return _cap_answer(cap, n_items, exc)
        return ["error", b"", n_items, 0, _error_info(None, exc), {}, []]
    finally:
        _abandonable = False
        _uncap_task()
        if left_behind is not False and (left_behind or _left_behind(output_dir)):
            _empty(output_dir)
    stats: dict[str, Any] = {"run": run_time, "exec": time.perf_counter() - started}
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
    become_subreaper()
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
    signal.signal(signal.SIGXCPU, _on_cpu_limit)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails: EFBIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when children stop
    output_dir = Path(os.environ.get(OUTPUT_DIR_ENV) or os.path.join(os.getcwd(), "dcproto-out"))
    os.environ[OUTPUT_DIR_ENV] = str(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_frame(answers, msgpack.packb(["ready"]))  # the first task's clock may start now
    bound: str | None = None  # whose projects this child serves: the first load's binding
    projects: OrderedDict[str, LoadedProject] = OrderedDict()  # least recently used first
    while True:
        body = commands.next_body()
        if body is None:
            return
        command = msgpack.unpackb(body, raw=False)
        if command[0] == "limits":
            _set_limits(command)
        elif command[0] == "load":
            binding = command[9]
            if bound is None:
                bound = binding
            # never another creator's: its code would share this process with ours
            if binding == bound and binding is not None and command[1] not in projects:
                projects[command[1]] = LoadedProject(command)
                while len(projects) > MAX_LOADED:
                    projects.popitem(last=False)
                end_descendants()  # unpickling the code may have started processes too
        elif command[0] == "run":
            _, task_id, attempt, project_id, items = command
            _restore_handler(signal.SIGUSR1, _on_abandon)
            _current = (task_id, attempt)
            answer: list[Any]
            if _is_abandoned(_current):
                answer = ["abandoned", b"", 0, 0, None, {}, []]
            elif project_id not in projects:
                message = f"project {project_id!r} is not loaded in this child"
                answer = ["load_error", b"", 0, 0, {"message": message}, {}, []]
            else:
                projects.move_to_end(project_id)
                answer = run_task(projects[project_id], items, output_dir)
            end_descendants()  # before the answer: once it is in, nothing of the task runs
            _abandoned.pop(_current, None)  # answered: a late name for it is moot
            _current = None
            try:
                body = msgpack.packb(["done", task_id, *answer], use_bin_type=True)
            except MemoryError:
                if _max_memory is None:
                    raise
                answer = _cap_answer("memory", answer[2])  # the payload goes with the old one
                body = msgpack.packb(["done", task_id, *answer], use_bin_type=True)
            with contextlib.suppress(BrokenPipeError):
                _write_frame(answers, body)


if __name__ == "__main__":
    main()
