"""Writes a project's ``results_path/``: results, statistics and the files tasks produced.

Layout (stable; ``load_results`` reads it back):

* ``results.pickle`` -- the ``{item: value}`` dict, pickled (keys keep their types)
* ``results.json`` -- the same as a list of ``[item, value]`` pairs, when JSON can hold them
  (a non-finite float is written as null)
* ``stats.json`` -- times, counts, per-worker tasks, items/s (see the README)
* ``tasks.csv`` -- one line per finished task: seq, worker, attempt, run, exec, round trip
* ``errors.json`` -- the items skipped under ``errors="skip"``, with their tracebacks
* ``additional_results/`` -- files tasks wrote to their output dir; a name two tasks both
  wrote gets the task's number added (``plot.task7.png``) instead of being overwritten
* ``project_id`` -- the server's id of the project
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import cloudpickle
import orjson

from ..errors import ResultsPathError

ADDITIONAL_DIR = "additional_results"
RESULTS_PICKLE = "results.pickle"


def load_results(results_path: str | os.PathLike[str]) -> dict[Any, Any]:
    """The ``{item: value}`` dict a finished project wrote to ``results_path``: give that
    directory, or its ``results.pickle`` itself."""
    path = Path(results_path)
    if path.is_dir():
        path = path / RESULTS_PICKLE
    with open(path, "rb") as handle:
        results: dict[Any, Any] = pickle.load(handle)
    return results


class ResultsWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResultsPathError(f"results_path {path} cannot be written: {exc}") from exc
        # a syscall, not a probe file: it says no for a read-only file system too
        if not os.access(path, os.W_OK | os.X_OK):
            raise ResultsPathError(f"results_path {path} cannot be written: permission denied")
        self._tasks_csv: Any = None
        self._csv: Any = None
        self._written: set[str] = set()
        self._finished = False  # finish() ran: an attach's late started() must not reopen

    def _guard(self, what: str) -> Any:
        return _Guard(self.path, what)

    def started(self, project_id: str) -> None:
        """The project's id, and tasks.csv opened: done while the first tasks are out, so that
        the files a project's end writes are the only ones on the caller's path."""
        with self._guard("project_id"):
            (self.path / "project_id").write_text(project_id + "\n", encoding="utf-8")
        self._open_tasks_csv()

    def _open_tasks_csv(self) -> None:
        if self._csv is not None or self._finished:
            return
        with self._guard("tasks.csv"):
            self._tasks_csv = open(self.path / "tasks.csv", "w", newline="", encoding="utf-8")  # noqa: SIM115
            self._csv = csv.writer(self._tasks_csv)
            self._csv.writerow(["seq", "worker", "attempt", "run", "exec", "round_trip"])

    def task_done(self, seq: int, stats: dict[str, Any], files: list[tuple[str, bytes]]) -> None:
        """``files``: names already checked by :func:`dcproto.trust.safe.check_files`."""
        self._open_tasks_csv()
        if self._csv is not None:
            with self._guard("tasks.csv"):
                self._csv.writerow(
                    [
                        seq,
                        stats.get("worker"),
                        stats.get("attempt"),
                        _round(stats.get("run")),
                        _round(stats.get("exec")),
                        _round(stats.get("round_trip")),
                    ]
                )
        for name, data in files:
            self._write_file(seq, name, data)

    def _write_file(self, seq: int, name: str, data: bytes) -> None:
        relative = PurePosixPath(name)
        key = relative.as_posix()
        if key in self._written:
            stem, suffix = relative.stem, relative.suffix
            tag = f"task{seq}"
            for n in itertools.count(2):
                candidate = relative.with_name(f"{stem}.{tag}{suffix}")
                if candidate.as_posix() not in self._written:
                    break
                tag = f"task{seq}-{n}"
            relative, key = candidate, candidate.as_posix()
        self._written.add(key)
        target = self.path / ADDITIONAL_DIR / relative
        with self._guard(key):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def finish(
        self,
        *,
        results: dict[Any, Any] | None,
        status: str,
        error: BaseException | None,
        stats: dict[str, Any],
        errors: list[dict[str, Any]],
    ) -> None:
        self._finished = True
        if self._tasks_csv is not None:
            self._tasks_csv.close()
            self._tasks_csv = self._csv = None
        if error is not None:
            stats = {**stats, "error": str(error)}
        self._write("stats.json", _indented_json(stats))
        if errors:
            self._write("errors.json", _indented_json(errors))
        if results is None:
            return
        self._write(RESULTS_PICKLE, cloudpickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL))
        data = results_json(results)
        if data is None:
            (self.path / "results.json").unlink(missing_ok=True)
            return
        self._write("results.json", data)

    def _write(self, name: str, data: bytes) -> None:
        """``name`` replaced at once (a reader never sees half of it), without an fsync: a
        crash may lose the file, never leave it cut short."""
        target = os.path.join(self.path, name)
        with self._guard(name):
            with open(target + ".tmp", "wb") as handle:
                handle.write(data)
            os.replace(target + ".tmp", target)


def _json(
    value: Any, *, indent: bool = False, default: Callable[[Any], Any] | None = None
) -> bytes:
    """``value`` as JSON with orjson, or with the standard encoder where orjson refuses what
    that one writes (an int over 64 bits, a dict with int keys). Raises TypeError or
    ValueError if neither can write it."""
    try:
        return orjson.dumps(value, default=default, option=orjson.OPT_INDENT_2 if indent else None)
    except TypeError:
        text = json.dumps(value, indent=2 if indent else None, default=default)
        return text.encode("utf-8")


def _indented_json(value: Any) -> bytes:
    """Readable JSON for the small files; what JSON cannot hold is written as its str."""
    return _json(value, indent=True, default=str)


def results_json(results: dict[Any, Any]) -> bytes | None:
    """``results`` as a JSON array of ``[item, value]`` pairs, or None if JSON cannot hold
    them. Non-finite floats become null (JSON has no NaN; results.pickle keeps them), but for
    results only the standard encoder can write, which writes NaN."""
    try:
        return _json(list(results.items()))
    except (TypeError, ValueError):
        return None


class _Guard:
    """Turn an OSError while writing into a ResultsPathError naming the file."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if isinstance(exc, OSError):
            raise ResultsPathError(f"cannot write {self.what} under {self.path}: {exc}") from exc
        return False


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value
