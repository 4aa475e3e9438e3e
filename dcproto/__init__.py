"""dcproto: run a function over many items on whatever machines you have."""

from __future__ import annotations

import os
from pathlib import Path

from . import _joblib_hook
from .creator.creator import Distribute, Progress, ProjectHandle, attach
from .creator.results import load_results
from .errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionFailed,
    DcprotoError,
    ProjectCancelled,
    ProjectError,
    ProjectUnrunnable,
    ResultsPathError,
    SerializationError,
    TaskFailed,
    UnhashableItemError,
)
from .executor import Executor, ExecutorBroken, RemoteCallError
from .paths import OUTPUT_DIR_ENV

__version__ = "0.1.0"

# joblib.parallel_config(backend="dcproto"), without importing joblib here
_joblib_hook.install()


def output_dir() -> Path:
    """The directory the running task may write additional result files to.

    Files written there come back to the creator under ``results_path/additional_results/``.
    Only meaningful inside a task (the parallel, stop or only-if function)."""
    value = os.environ.get(OUTPUT_DIR_ENV)
    if not value:
        raise RuntimeError("output_dir() is only available while a dcproto task runs")
    return Path(value)


class _AdditionalResults(os.PathLike[str]):
    """``ADDITIONAL_RESULTS``: the running task's output directory, as a path-like constant
    (``os.path.join(ADDITIONAL_RESULTS, "plot.png")`` works as in the original library)."""

    def __fspath__(self) -> str:
        return str(output_dir())

    def __str__(self) -> str:
        return self.__fspath__()

    def __truediv__(self, other: str) -> Path:
        return output_dir() / other

    def __repr__(self) -> str:
        return "dcproto.ADDITIONAL_RESULTS"


ADDITIONAL_RESULTS = _AdditionalResults()

__all__ = [
    "ADDITIONAL_RESULTS",
    "AuthenticationFailed",
    "ConfigurationError",
    "ConnectionFailed",
    "DcprotoError",
    "Distribute",
    "Executor",
    "ExecutorBroken",
    "Progress",
    "ProjectCancelled",
    "ProjectError",
    "ProjectHandle",
    "ProjectUnrunnable",
    "RemoteCallError",
    "ResultsPathError",
    "SerializationError",
    "TaskFailed",
    "UnhashableItemError",
    "attach",
    "load_results",
    "output_dir",
]
