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


@contextlib.contextmanager
def shipped_by_value(cls: type, modules: Sequence[str]) -> Iterator[None]:
    """While active, cloudpickle pickles the modules of the project class and of its user-defined
    bases by value (unless the workers are told to import them), so their classes travel with
    the project's code, items and values alike."""
    with modules_by_value(local_bases(cls), modules):
        yield


@contextlib.contextmanager
def modules_by_value(names: Iterable[str], modules: Sequence[str]) -> Iterator[None]:
    """While active, the modules ``names`` are pickled by value (``__main__`` already is; those
    the workers are told to import in ``modules`` are not)."""
    with contextlib.ExitStack() as stack:
        for name in sorted(set(names)):
            stack.enter_context(_module_by_value(name, modules))
        yield


@contextlib.contextmanager
def _module_by_value(name: str, modules: Sequence[str]) -> Iterator[None]:
    """Safe across threads: the module stays registered while anyone needs it."""
    module = sys.modules.get(name)
    if (
        module is None
        or name == "__main__"
        or name.split(".")[0] in {m.split(".")[0] for m in modules}
    ):
        yield
        return
    with _by_value_lock:
        _by_value_users[name] += 1
        if _by_value_users[name] == 1:
            cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        with _by_value_lock:
            _by_value_users[name] -= 1
            if _by_value_users[name] == 0:
                del _by_value_users[name]
                cloudpickle.unregister_pickle_by_value(module)
