"""Make ``joblib.parallel_config(backend="dcproto")`` work after ``import dcproto``, without
importing joblib.

joblib finds backends by name in ``joblib.parallel.BACKENDS``, and only once joblib is
imported can anything be put there. So ``import dcproto`` calls :func:`install`: if
``joblib.parallel`` is already imported, the name is registered at once; otherwise a finder
at the front of ``sys.meta_path`` waits for ``joblib.parallel`` to be imported (whoever imports
it, whenever), lets the normal machinery load it, registers the name right after the module
has run, and removes itself. Every other import passes through it with one string comparison.

What is registered is a factory that imports :mod:`dcproto.joblib_backend` only when a
``Parallel`` first asks for the backend. ``Parallel(backend="dcproto")`` looks in ``BACKENDS``
directly (``EXTERNAL_BACKENDS``, joblib's table of lazily registered names, is only read by
``parallel_config``), so the factory goes into ``BACKENDS``, which serves both.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Sequence
from typing import Any

NAME = "dcproto"
TARGET = "joblib.parallel"

_lock = threading.Lock()


def backend_factory(*args: Any, **kwargs: Any) -> Any:
    """What joblib calls to make the backend: ``DcprotoBackend(*args, **kwargs)``."""
    from .joblib_backend import DcprotoBackend

    return DcprotoBackend(*args, **kwargs)


def register(parallel: types.ModuleType) -> None:
    """Register the name in an imported ``joblib.parallel`` (unless something already did)."""
    backends = getattr(parallel, "BACKENDS", None)
    register_backend = getattr(parallel, "register_parallel_backend", None)
    if isinstance(backends, dict) and NAME not in backends and callable(register_backend):
        register_backend(NAME, backend_factory)


class _Finder(importlib.abc.MetaPathFinder):
    """Waits for ``joblib.parallel``; see the module docstring."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        spec: importlib.machinery.ModuleSpec | None = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if spec is None or exec_module is None:
            return spec

        def exec_and_register(module: types.ModuleType) -> None:
            exec_module(module)
            _uninstall()
            register(module)

        # a loader that takes no attributes: ``import dcproto.joblib_backend`` registers then
        with contextlib.suppress(AttributeError, TypeError):
            loader.exec_module = exec_and_register  # type: ignore[union-attr]
        return spec


def install() -> None:
    """Register now if joblib is imported, else when it is (see the module docstring)."""
    with _lock:
        parallel = sys.modules.get(TARGET)
        if parallel is not None:
            register(parallel)
            return
        if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _Finder())


def _uninstall() -> None:
    with _lock:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
