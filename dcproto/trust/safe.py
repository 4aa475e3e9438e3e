"""Decode what a worker sends without letting the worker run code here.

Workers are volunteers' machines: untrusted. Their results arrive as pickles, and unpickling
runs whatever the pickle names (a ``__reduce__`` that returns ``eval`` is enough), so this
module's one job is to turn a worker's bytes into plain values, or to refuse. It does that with
an allow-list unpickler (:func:`safe_loads`), keeps full unpickling (:func:`trusted_loads`) for
projects that set ``trust_workers=True``. Result files are checked in :mod:`dcproto.trust.files`.

Beyond the allow-list itself, the safe decoder:

* never hands out a global that could build something dangerous from a small pickle: ``set``,
  ``frozenset``, ``bytes``, ``bytearray``, ``Fraction`` and ``_codecs.encode`` are replaced by
  wrappers that take only the arguments honest pickles pass (no ``bytearray(10**12)``, no
  ``frozenset(range(10**12))``, no ``Fraction("1e999999999")``), and ``numpy.ndarray`` is only
  accepted as the first argument of numpy's ``_reconstruct`` (calling it with an object dtype
  and a raw buffer makes object pointers out of the worker's bytes);
* never calls numpy's ``dtype.__setstate__``: it trusts the flags in the pickle (a structured
  dtype that hides an object field turns raw bytes into object pointers) and some malformed
  states crash it outright. Each dtype is instead built by numpy's checked constructors from the
  parts of its pickled state. Intercepting BUILD needs the pure-Python unpickler, so a pickle
  that names numpy is decoded again with it; pickles without numpy stay on the fast C one;
* refuses values nested more than :data:`MAX_DECODED_DEPTH` containers deep, so later code
  walking the value recursively cannot overflow the stack.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import datetime
import decimal
import fractions
import importlib
import io
import itertools
import pickle
import re
import struct
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import cloudpickle

from dcproto.errors import SerializationError, UnsafeResult

__all__ = [
    "MAX_DECODED_DEPTH",
    "loads_from_worker",
    "safe_loads",
    "trusted_loads",
]

MAX_DECODED_DEPTH = 100  # nesting of containers in a decoded value (guard against stack bombs)

_REFUSAL_HINT = (
    "a worker's pickle could run code on this machine. Return plain values (numbers, str, "
    "bytes, containers, datetime, Decimal, Fraction, numpy arrays), or set trust_workers=True "
    "on the project if you trust every worker"
)


def _refused(what: str, type_name: str) -> UnsafeResult:
    return UnsafeResult(
        f"{what} holds a value of type {type_name}, which the safe decoder refuses: "
        + _REFUSAL_HINT,
        type_name=type_name,
    )


def _refused_call(what: str, type_name: str, detail: str) -> UnsafeResult:
    return UnsafeResult(
        f"{what} builds {type_name} from {detail}, which the safe decoder refuses: no honest "
        "pickle does that",
        type_name=type_name,
    )


class _Restricted:
    """A stand-in the decoder hands out instead of a real global: calling it checks the
    arguments first. Immutable, and refused if it ends up in a decoded value by itself."""

    __slots__ = ("_call", "type_name")
    type_name: str
    _call: Callable[..., Any]

    def __init__(self, type_name: str, call: Callable[..., Any]) -> None:
        object.__setattr__(self, "type_name", type_name)
        object.__setattr__(self, "_call", call)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{self.type_name} stand-in is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{self.type_name} stand-in is read-only")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise _Refusal(self.type_name, "keyword arguments")
        return self._call(*args)

    def __repr__(self) -> str:
        return f"<safe stand-in for {self.type_name}>"


class _Refusal(Exception):
    """Raised by a stand-in; turned into :class:`UnsafeResult` with the caller's ``what``."""

    def __init__(self, type_name: str, detail: str) -> None:
        super().__init__(type_name, detail)
        self.type_name = type_name
        self.detail = detail


class _NumpyNeeded(Exception):
    """The fast C unpickler met a numpy name: decode again with the numpy-aware one."""


# --- stand-ins for plain globals: the argument shapes honest pickles use, nothing else ---

_LATIN1 = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1"})


def _is_latin1(encoding: object) -> bool:
    return type(encoding) is str and encoding.lower() in _LATIN1


def _codecs_encode(*args: Any) -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1").
    if len(args) != 2 or type(args[0]) is not str or type(args[1]) is not str:
        raise _Refusal("_codecs.encode", "arguments other than (str, 'latin1')")
    if args[1].lower() not in _LATIN1:
        raise _Refusal("_codecs.encode", f"the codec {args[1][:40]!r}")
    return codecs.encode(args[0], "latin-1")


def _is_bytes_like(value: object) -> bool:
    return type(value) in (bytes, bytearray)


def _bytes(*args: Any) -> bytes:
    # Protocol 2 pickles b"" as bytes().
    if not args:
        return b""
    if len(args) == 1 and _is_bytes_like(args[0]):
        return bytes(args[0])
    raise _Refusal("builtins.bytes", "arguments other than () or (bytes,)")


def _bytearray(*args: Any) -> bytearray:
    if not args:
        return bytearray()
    if len(args) == 1 and _is_bytes_like(args[0]):
        return bytearray(args[0])
    if len(args) == 2 and type(args[0]) is str and _is_latin1(args[1]):
        return bytearray(args[0], "latin-1")
    raise _Refusal("builtins.bytearray", "arguments other than (), (bytes,) or (str, 'latin-1')")


def _collection_arg(type_name: str, args: tuple[Any, ...]) -> Iterable[Any]:
    # Protocols 2 and 3 pickle set/frozenset as set([items]); never from a range or the like.
    if not args:
        return ()
    if len(args) == 1 and type(args[0]) in (list, tuple):
        items: Iterable[Any] = args[0]
        return items
    raise _Refusal(type_name, "arguments other than () or (list,)")


def _set(*args: Any) -> set[Any]:
    return set(_collection_arg("builtins.set", args))


def _frozenset(*args: Any) -> frozenset[Any]:
    return frozenset(_collection_arg("builtins.frozenset", args))


def _fraction(*args: Any) -> fractions.Fraction:
    # Fraction pickles as Fraction("n/d"); an exponent ("1e999999999") would cost unbounded time.
    if len(args) == 1 and type(args[0]) is str and len(args[0]) <= 10_000:
        if "e" in args[0] or "E" in args[0]:
            raise _Refusal("fractions.Fraction", "a string with an exponent")
        return fractions.Fraction(args[0])
    if 1 <= len(args) <= 2 and all(type(a) is int for a in args):
        return fractions.Fraction(*args)
    raise _Refusal("fractions.Fraction", "arguments other than (str,), (int,) or (int, int)")


_PLAIN_GLOBALS: dict[tuple[str, str], object] = {
    ("builtins", "complex"): complex,
    ("builtins", "range"): range,
    ("builtins", "slice"): slice,
    ("builtins", "set"): _Restricted("builtins.set", _set),
    ("builtins", "frozenset"): _Restricted("builtins.frozenset", _frozenset),
    ("builtins", "bytes"): _Restricted("builtins.bytes", _bytes),
    ("builtins", "bytearray"): _Restricted("builtins.bytearray", _bytearray),
    ("_codecs", "encode"): _Restricted("_codecs.encode", _codecs_encode),
    ("datetime", "date"): datetime.date,
    ("datetime", "time"): datetime.time,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
    ("decimal", "Decimal"): decimal.Decimal,
    ("fractions", "Fraction"): _Restricted("fractions.Fraction", _fraction),
    ("collections", "OrderedDict"): collections.OrderedDict,
}

# --- numpy: imported only when a pickle names it ---

# (module, name) -> (module in numpy < 2, module in numpy >= 2, attribute)
_NUMPY_FUNCTIONS: dict[tuple[str, str], tuple[str, str, str]] = {
    (mod, name): (f"numpy.core.{sub}", f"numpy._core.{sub}", name)
    for sub, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"))
    for mod in (f"numpy.core.{sub}", f"numpy._core.{sub}")
} | {
    (mod, "_frombuffer"): ("numpy.core.numeric", "numpy._core.numeric", "_frombuffer")
    for mod in ("numpy.core.numeric", "numpy._core.numeric")
}
_NUMPY_NAMES = frozenset(_NUMPY_FUNCTIONS) | {("numpy", "ndarray"), ("numpy", "dtype")}

# dtype codes a worker may send: bool, ints, floats, complex, datetimes, object, bytes, str, void
# (void covers structured and subarray dtypes). Not StringDType ("T") nor user dtypes.
_DTYPE_CODE = re.compile(r"[biufcmMOSUV][0-9]{0,6}")
_DATETIME_UNIT = re.compile(r"generic|[YMWDhms]|[munpfa]s")
_NPY_ALIGNED_STRUCT = 0x80  # dtype flag: a struct laid out with align=True


class _Numpy:
    """numpy's globals as the safe decoder hands them out, built once numpy is imported."""

    def __init__(self) -> None:
        import numpy as np

        self.np = np
        new = int(np.__version__.split(".", 1)[0]) >= 2
        real: dict[str, Any] = {}
        for old_mod, new_mod, attr in _NUMPY_FUNCTIONS.values():
            real[attr] = getattr(importlib.import_module(new_mod if new else old_mod), attr)
        self._reconstruct = real["_reconstruct"]
        self._scalar = real["scalar"]
        self._frombuffer = real["_frombuffer"]
        self.ndarray_ref = _Restricted("numpy.ndarray", self._call_ndarray)
        calls = {
            "_reconstruct": self._call_reconstruct,
            "scalar": self._call_scalar,
            "_frombuffer": self._call_frombuffer,
        }
        self.globals: dict[tuple[str, str], object] = {
            key: _Restricted(f"{key[0]}.{key[1]}", calls[key[1]]) for key in _NUMPY_FUNCTIONS
        }
        self.globals[("numpy", "ndarray")] = self.ndarray_ref
        self.globals[("numpy", "dtype")] = _Restricted("numpy.dtype", self._call_dtype)

    @staticmethod
    def _call_ndarray(*args: Any) -> Any:
        raise _Refusal("numpy.ndarray", "a direct call (arrays come from _reconstruct)")

    def _call_reconstruct(self, *args: Any) -> Any:
        # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") followed by BUILD.
        if len(args) != 3 or args[0] is not self.ndarray_ref:
            raise _Refusal("numpy._reconstruct", "a type other than numpy.ndarray")
        if args[1] != (0,) or args[2] not in (b"b", "b"):
            raise _Refusal("numpy._reconstruct", "a shape or dtype other than (0,), b'b'")
        return self._reconstruct(self.np.ndarray, (0,), b"b")

    def _plain_dtype(self, dtype: object) -> bool:
        return isinstance(dtype, self.np.dtype) and not dtype.hasobject and dtype.itemsize > 0

    def _call_scalar(self, *args: Any) -> Any:
        # numpy pickles a scalar such as np.float64(1.5) as scalar(dtype, its bytes).
        if len(args) != 2 or not self._plain_dtype(args[0]) or type(args[1]) is not bytes:
            raise _Refusal("numpy.scalar", "arguments other than (dtype, bytes)")
        if len(args[1]) != args[0].itemsize:
            raise _Refusal("numpy.scalar", "bytes of the wrong size for its dtype")
        return self._scalar(args[0], args[1])

    def _call_frombuffer(self, *args: Any) -> Any:
        # Protocol 5 pickles a contiguous array as _frombuffer(data, dtype, shape, order).
        if len(args) != 4 or type(args[0]) not in (bytes, bytearray):
            raise _Refusal("numpy._frombuffer", "arguments other than (bytes, dtype, shape, order)")
        data, dtype, shape, order = args
        if not self._plain_dtype(dtype) or order not in ("C", "F"):
            raise _Refusal("numpy._frombuffer", "a dtype or order numpy does not write")
        if _count(shape) * dtype.itemsize != len(data):
            raise _Refusal("numpy._frombuffer", "a shape that does not match its bytes")
        return self._frombuffer(data, dtype, shape, order)

    def array_state(self, inst: Any, state: object) -> tuple[Any, ...]:
        """Check the state BUILD is about to give an array from ``_reconstruct``: numpy's own
        ``ndarray.__setstate__`` reads past the end of a list that is too short for the shape,
        and takes the data's size on trust in other ways."""
        np = self.np
        fresh = (
            type(inst) is np.ndarray
            and inst.shape == (0,)
            and inst.dtype == np.int8
            and inst.base is None
        )
        if not fresh:
            raise _Refusal("numpy.ndarray", "a state given to an array that already has one")
        if type(state) is not tuple or len(state) != 5:
            raise _Refusal("numpy.ndarray", "an array state numpy does not write")
        version, shape, dtype, fortran, data = state
        if version != 1 or type(fortran) not in (bool, int) or fortran not in (0, 1):
            raise _Refusal("numpy.ndarray", "an array state numpy does not write")
        if not isinstance(dtype, np.dtype):
            raise _Refusal("numpy.ndarray", "an array state numpy does not write")
        count = _count(shape)
        if dtype.hasobject:
            if type(data) is not list or len(data) != count:
                raise _Refusal("numpy.ndarray", "a list of items that does not match its shape")
        elif type(data) is not bytes or len(data) != count * dtype.itemsize:
            raise _Refusal("numpy.ndarray", "bytes that do not match its shape and dtype")
        elif dtype.itemsize == 0 and count:
            raise _Refusal("numpy.ndarray", "items of size zero")
        return (1, shape, dtype, bool(fortran), data)

    def _call_dtype(self, *args: Any) -> Any:
        # numpy pickles a dtype as dtype("f8", False, True) followed by BUILD.
        if not 1 <= len(args) <= 3 or any(type(a) is not bool for a in args[1:]):
            raise _Refusal("numpy.dtype", "arguments other than (code, align, copy)")
        code = args[0]
        if type(code) is not str:
            raise _Refusal("numpy.dtype", "a type code that is not a string")
        if not _DTYPE_CODE.fullmatch(code):
            raise _Refusal("numpy.dtype", f"the type code {code[:40]!r}")
        align = args[1] if len(args) > 1 else False
        return self.np.dtype(code, align=align, copy=True)

    def dtype_from_state(self, inst: Any, state: object) -> Any:
        """The dtype that BUILD with ``state`` would make of ``inst``, built by numpy's checked
        constructors from the state's parts. numpy's own ``dtype.__setstate__`` is never called:
        it trusts the flags, offsets and sizes in the state, and some states crash it."""
        np = self.np
        bad = "a dtype state numpy does not write"
        if type(state) is not tuple or len(state) not in (8, 9) or state[0] != len(state) - 5:
            raise _Refusal("numpy.dtype", bad)
        endian, subarray, names, fields, elsize, _alignment, flags = state[1:8]
        if endian not in ("<", ">", "|", "=") or type(elsize) is not int or type(flags) is not int:
            raise _Refusal("numpy.dtype", bad)
        kind = inst.kind
        if subarray is not None:
            # A subarray dtype such as ("<f8", (2, 3)).
            if names is not None or fields is not None or kind != "V":
                raise _Refusal("numpy.dtype", bad)
            if type(subarray) is not tuple or len(subarray) != 2:
                raise _Refusal("numpy.dtype", bad)
            base, shape = subarray
            if not isinstance(base, np.dtype) or type(shape) is not tuple:
                raise _Refusal("numpy.dtype", bad)
            if not all(type(n) is int for n in shape):
                raise _Refusal("numpy.dtype", bad)
            return np.dtype((base, shape))
        if names is not None:
            # A structured dtype; numpy's dict constructor checks offsets, size and overlaps.
            if kind != "V" or type(names) is not tuple or type(fields) is not dict:
                raise _Refusal("numpy.dtype", bad)
            formats: list[Any] = []
            offsets: list[int] = []
            titles: list[Any] = []
            for name in names:
                entry = fields.get(name) if type(name) is str else None
                if type(entry) is not tuple or len(entry) not in (2, 3):
                    raise _Refusal("numpy.dtype", bad)
                if not isinstance(entry[0], np.dtype) or type(entry[1]) is not int:
                    raise _Refusal("numpy.dtype", bad)
                formats.append(entry[0])
                offsets.append(entry[1])
                titles.append(entry[2] if len(entry) == 3 else None)
            spec: dict[str, Any] = {
                "names": list(names),
                "formats": formats,
                "offsets": offsets,
                "itemsize": elsize,
            }
            if any(t is not None for t in titles):
                spec["titles"] = titles
            return np.dtype(spec, align=bool(flags & _NPY_ALIGNED_STRUCT))
        if fields is not None:
            raise _Refusal("numpy.dtype", bad)
        if kind in "mM":
            # Version 4 carries the unit: (metadata, (b"s", 25, 1, 1)) for "M8[25s]".
            unit = state[8][1] if len(state) == 9 and type(state[8]) is tuple else None
            if type(unit) is not tuple or len(unit) != 4 or type(unit[0]) is not bytes:
                raise _Refusal("numpy.dtype", bad)
            name, count = unit[0].decode("ascii", "replace"), unit[1]
            if not _DATETIME_UNIT.fullmatch(name) or type(count) is not int or count < 1:
                raise _Refusal("numpy.dtype", bad)
            code = f"{kind}8" if name == "generic" else f"{kind}8[{count}{name}]"
        else:
            if elsize not in (-1, inst.itemsize):
                raise _Refusal("numpy.dtype", bad)
            code = inst.str[1:]
        byte_order = "|" if inst.byteorder == "|" else endian
        return np.dtype(code).newbyteorder("=" if byte_order == "|" else byte_order)


def _count(shape: object) -> int:
    """The number of items of an array of ``shape``, which must be a tuple of ints >= 0."""
    if type(shape) is not tuple or len(shape) > 64:
        raise _Refusal("numpy.ndarray", "a shape that is not a short tuple of ints")
    count = 1
    for n in shape:
        if type(n) is not int or n < 0:
            raise _Refusal("numpy.ndarray", "a shape that is not a short tuple of ints")
        count *= n
    return count


_numpy: _Numpy | None = None


def _get_numpy() -> _Numpy | None:
    global _numpy
    if _numpy is None:
        try:
            _numpy = _Numpy()
        except ImportError:
            return None
    return _numpy


# --- the unpicklers ---


def _normalize(module: str, name: str) -> tuple[str, str]:
    """Python 2 names (``__builtin__``, ``copy_reg``) as protocol 0-2 pickles write them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _resolve(module: str, name: str, *, with_numpy: bool) -> object:
    module, name = _normalize(module, name)
    found = _PLAIN_GLOBALS.get((module, name))
    if found is not None:
        return found
    if (module, name) in _NUMPY_NAMES:
        if not with_numpy:
            raise _NumpyNeeded
        numpy = _get_numpy()
        if numpy is None:  # the C pass found numpy importable; it still is
            raise SerializationError(_NO_NUMPY)
        return numpy.globals[(module, name)]
    raise _Refusal(f"{module}.{name}"[:200], "")


_NO_NUMPY = "it holds numpy values but numpy is not installed here"


class _PersistentId(Exception):
    """The pickle holds a persistent id: a reference to something outside it."""


def _refuse_persistent_id(pid: object) -> Any:
    raise _PersistentId


class _FastUnpickler(pickle.Unpickler):
    """The C unpickler with the allow-list; gives up (for the numpy-aware one) on numpy names."""

    def find_class(self, module: str, name: str, /) -> Any:
        return _resolve(module, name, with_numpy=False)

    def persistent_load(self, pid: Any, /) -> Any:
        return _refuse_persistent_id(pid)


class _Memo(dict[Any, Any]):
    """The pure-Python unpickler's memo, remembering where each dtype was stored so that a
    dtype rebuilt at BUILD can replace it."""

    def __init__(self, dtype_type: type) -> None:
        super().__init__()
        self.dtype_type = dtype_type
        self.dtype_keys: dict[int, list[Any]] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if isinstance(value, self.dtype_type):
            self.dtype_keys.setdefault(id(value), []).append(key)

    def replace(self, old: Any, new: Any) -> None:
        for key in self.dtype_keys.pop(id(old), ()):
            if self.get(key) is old:
                self[key] = new


# the pure-Python unpickler's own BUILD, for everything but numpy's types
_PLAIN_BUILD: Callable[[Any], None] = vars(pickle._Unpickler)["load_build"]


class _NumpyUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with the allow-list including numpy, rebuilding dtypes at
    BUILD instead of trusting ``dtype.__setstate__`` with the worker's state."""

    # set up by pickle._Unpickler.load(), which typeshed does not describe
    stack: list[Any]
    read: Callable[[int], bytes]
    append: Callable[[Any], None]

    def __init__(self, data: bytes, numpy: _Numpy) -> None:
        super().__init__(io.BytesIO(data))
        self._np = numpy
        self._size = len(data)
        self.memo = _Memo(numpy.np.dtype)

    def find_class(self, module: str, name: str) -> Any:
        return _resolve(module, name, with_numpy=True)

    def persistent_load(self, pid: Any) -> Any:
        return _refuse_persistent_id(pid)

    def _load_build(self) -> None:
        stack = self.stack
        inst = stack[-2] if len(stack) >= 2 else None
        np = self._np.np
        if isinstance(inst, np.ndarray):
            inst.__setstate__(self._np.array_state(inst, stack.pop()))
            return
        if isinstance(inst, np.generic):
            raise _Refusal("numpy.generic", "a state (numpy never pickles scalars with one)")
        if not isinstance(inst, np.dtype):
            _PLAIN_BUILD(self)
            return
        state = stack.pop()
        # inst stays as its constructor made it (the pickle may already refer to it); the value
        # from here on is a new dtype built from the state's checked parts.
        rebuilt = self._np.dtype_from_state(inst, state)
        stack[-1] = rebuilt
        self.memo.replace(inst, rebuilt)

    def _load_bytearray8(self) -> None:
        # The pure-Python original allocates (and zeroes) the announced size before reading.
        (size,) = struct.unpack("<Q", self.read(8))
        if size > self._size:
            raise pickle.UnpicklingError("pickle data was truncated")
        data = self.read(size)
        if len(data) != size:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(bytearray(data))

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(vars(pickle._Unpickler)["dispatch"])
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8


# --- after decoding: depth, and no stand-in left as a value ---


def _children(obj: object, numpy: _Numpy | None) -> Iterable[Any] | None:
    """The values directly inside ``obj`` if it is a container, else ``None``."""
    if isinstance(obj, list | tuple | set | frozenset):
        return obj
    if isinstance(obj, collections.OrderedDict):
        # BUILD can give an OrderedDict instance attributes: walk them too.
        return itertools.chain(itertools.chain.from_iterable(obj.items()), vars(obj).values())
    if isinstance(obj, dict):
        return itertools.chain.from_iterable(obj.items())
    if isinstance(obj, slice):
        return (obj.start, obj.stop, obj.step)
    if isinstance(obj, _Restricted):
        raise _Refusal(obj.type_name, "")
    if isinstance(obj, fractions.Fraction):
        # BUILD can set a Fraction's slots; it must still hold two ints.
        if type(obj.numerator) is not int or type(obj.denominator) is not int:
            raise _Refusal("fractions.Fraction", "parts that are not ints")
        return None
    if numpy is not None and isinstance(obj, numpy.np.ndarray) and obj.dtype.hasobject:
        items: list[Any] = obj.reshape(-1).tolist()
        return items
    return None


# Values that are never containers, skipped quickly by the walk below.
_LEAF_TYPES = frozenset(
    {int, float, str, bytes, bool, type(None), complex, bytearray, range, decimal.Decimal}
    | {datetime.date, datetime.time, datetime.datetime, datetime.timedelta, datetime.timezone}
)


def _only_leaves(values: Iterable[Any]) -> bool:
    """Whether no value is a container (the check runs at C speed)."""
    return _LEAF_TYPES.issuperset(map(type, values))


def _check_depth(value: object, numpy: _Numpy | None) -> None:
    """Raise if containers nest more than MAX_DECODED_DEPTH deep; also refuse stand-ins found
    as values. Depth is the longest chain of containers, each shared container walked once.
    Cycles are legal (pickle makes them): a chain stops where it would repeat a container, and
    a container's depth is measured from where the walk first met it."""
    if type(value) is list and _only_leaves(value):
        return  # the usual payload, one plain value per item: no walk needed
    if type(value) is dict and _only_leaves(value) and _only_leaves(value.values()):
        return  # {index: plain value}: no walk needed
    root_children = _children(value, numpy)
    if root_children is None:
        return
    # id -> (height, the container): holding it keeps temporary containers (the item tuples of
    # a structured object array) alive, so their ids are not reused during the walk.
    heights: dict[int, tuple[int, object]] = {}
    active: set[int] = {id(value)}
    # Each frame: the container, an iterator over its children, the best child height so far.
    frames: list[list[Any]] = [[value, iter(root_children), 0]]
    while frames:
        frame = frames[-1]
        pushed = False
        for child in frame[1]:
            if type(child) in _LEAF_TYPES:
                continue
            child_id = id(child)
            done = heights.get(child_id)
            if done is not None:
                frame[2] = max(frame[2], done[0])
                continue
            if child_id in active:
                continue  # a cycle: legal, and not deeper for it
            grandchildren = _children(child, numpy)
            if grandchildren is None:
                continue
            if len(frames) >= MAX_DECODED_DEPTH:
                raise _TooDeep
            active.add(child_id)
            frames.append([child, iter(grandchildren), 0])
            pushed = True
            break
        if pushed:
            continue
        frames.pop()
        obj_id = id(frame[0])
        active.discard(obj_id)
        height = frame[2] + 1
        if height + len(frames) > MAX_DECODED_DEPTH:
            raise _TooDeep
        heights[obj_id] = (height, frame[0])
        if frames:
            frames[-1][2] = max(frames[-1][2], height)


class _TooDeep(Exception):
    pass


def _decode(data: bytes) -> Any:
    numpy: _Numpy | None = None
    try:
        value = _FastUnpickler(io.BytesIO(data), buffers=None).load()
    except _NumpyNeeded:
        numpy = _get_numpy()
        if numpy is None:
            raise SerializationError(
                "it holds numpy values but numpy is not installed here"
            ) from None
        value = _NumpyUnpickler(data, numpy).load()
    _check_depth(value, numpy)
    return value


def safe_loads(data: bytes, *, what: str) -> Any:
    """Unpickle a worker's ``data`` allowing only plain values (see the module docstring).

    Raises :class:`UnsafeResult` naming the refused type, or :class:`SerializationError` if
    ``data`` is not a pickle this decoder can read. Nothing the pickle names outside the
    allow-list is ever imported or called.
    """
    try:
        return _decode(data)
    except UnsafeResult:
        raise
    except _Refusal as exc:
        if exc.detail:
            raise _refused_call(what, exc.type_name, exc.detail) from None
        raise _refused(what, exc.type_name) from None
    except _PersistentId:
        raise UnsafeResult(
            f"{what} holds a persistent id (a reference to an object outside the pickle), "
            "which the safe decoder refuses: " + _REFUSAL_HINT,
            type_name="<persistent id>",
        ) from None
    except _TooDeep:
        raise SerializationError(
            f"{what} cannot be decoded: it nests containers more than {MAX_DECODED_DEPTH} deep"
        ) from None
    except SerializationError as exc:
        raise SerializationError(f"{what} cannot be decoded: {exc}") from exc
    except Exception as exc:
        raise SerializationError(f"{what} cannot be decoded: {exc}") from exc


def trusted_loads(data: bytes, *, what: str) -> Any:
    """Unpickle ``data`` with full trust (cloudpickle), for projects with ``trust_workers``."""
    try:
        return cloudpickle.loads(data)
    except Exception as exc:
        raise SerializationError(f"{what} cannot be unpickled here: {exc}") from exc


def loads_from_worker(data: bytes, *, trusted: bool, what: str) -> Any:
    """Decode a worker's pickle: :func:`trusted_loads` if ``trusted``, else :func:`safe_loads`."""
    if trusted:
        return trusted_loads(data, what=what)
    return safe_loads(data, what=what)


# --- result file names ---
