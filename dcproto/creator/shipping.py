"""Which of the user's modules travel with a project by value.

cloudpickle pickles a class or function by reference when its module can be imported, which a
worker cannot do for the user's own files. While a project's code, items or calls are pickled,
the user's own modules it comes from are registered to be pickled by value instead, unless the
project names them in ``modules`` (installed on the workers)."""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import site
import sys
import sysconfig
import threading
from collections.abc import Iterable, Iterator, Sequence

import cloudpickle


@functools.cache
def _install_roots() -> tuple[str, ...]:
    """Where installed code lives: the standard library and the site-packages dirs."""
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    with contextlib.suppress(Exception):
        roots.update(site.getsitepackages())
    with contextlib.suppress(Exception):
        roots.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(root), "") for root in roots)


_local_modules: dict[str, bool] = {}


def is_local(name: str) -> bool:
    """Whether module ``name`` is the user's own code (a file outside the standard library and
    site-packages, not dcproto): its functions and classes then travel by value, since the
    workers may well not have it. ``__main__`` is pickled by value by cloudpickle anyway."""
    known = _local_modules.get(name)
    if known is not None:
        return known
    module = sys.modules.get(name)
    if module is None:
        return False
    top = name.partition(".")[0]
    file = getattr(module, "__file__", None)
    if (
        name == "__main__"
        or top in sys.stdlib_module_names
        or top == "dcproto"
        or not isinstance(file, str)
    ):
        local = False
    else:
        local = not os.path.realpath(file).startswith(_install_roots())
    _local_modules[name] = local
    return local


def local_bases(cls: type) -> set[str]:
    """The user's own modules that ``cls`` or its base classes are defined in."""
    names = {cls.__module__}
    names.update(base.__module__ for base in cls.__mro__[1:] if is_local(base.__module__))
    return names


_by_value_lock = threading.Lock()
_by_value_users: collections.Counter[str] = collections.Counter()
# (class, modules) -> the modules to register while its project's pickles are made; a project
# pickles its items once per task, so this is looked up far more often than it changes
_shipped: dict[tuple[type, tuple[str, ...]], tuple[str, ...]] = {}
MAX_SHIPPED = 256


@contextlib.contextmanager
def shipped_by_value(cls: type, modules: Sequence[str]) -> Iterator[None]:
    """While active, cloudpickle pickles the modules of the project class and of its user-defined
    bases by value (unless the workers are told to import them), so their classes travel with
    the project's code, items and values alike."""
    key = (cls, tuple(modules))
    names = _shipped.get(key)
    if names is None:
        names = _to_register(local_bases(cls), modules)
        if len(_shipped) >= MAX_SHIPPED:
            _shipped.clear()
        _shipped[key] = names
    if not names:  # e.g. a class of __main__, which cloudpickle ships by value anyway
        yield
        return
    with _registered(names):
        yield


@contextlib.contextmanager
def modules_by_value(names: Iterable[str], modules: Sequence[str]) -> Iterator[None]:
    """While active, the modules ``names`` are pickled by value (``__main__`` already is; those
    the workers are told to import in ``modules`` are not)."""
    with _registered(_to_register(names, modules)):
        yield


def _to_register(names: Iterable[str], modules: Sequence[str]) -> tuple[str, ...]:
    """Those of ``names`` that must be registered: loaded, not ``__main__``, and not of a
    package the workers import themselves."""
    installed = {m.split(".")[0] for m in modules}
    return tuple(
        sorted(
            name
            for name in set(names)
            if name != "__main__" and name in sys.modules and name.split(".")[0] not in installed
        )
    )


@contextlib.contextmanager
def _registered(names: tuple[str, ...]) -> Iterator[None]:
    """Safe across threads: a module stays registered while anyone needs it."""
    with _by_value_lock:
        for name in names:
            _by_value_users[name] += 1
            if _by_value_users[name] == 1:
                cloudpickle.register_pickle_by_value(sys.modules[name])
    try:
        yield
    finally:
        with _by_value_lock:
            for name in names:
                _by_value_users[name] -= 1
                if _by_value_users[name] == 0:
                    del _by_value_users[name]
                    module = sys.modules.get(name)
                    if module is not None:
                        cloudpickle.unregister_pickle_by_value(module)
