"""The safe decoder for workers' pickles and the checks on workers' result file names.

Hostile pickles are built with a helper whose ``__reduce__`` returns whatever the test wants, so
the bytes are exactly what a malicious worker could send; each test then checks that decoding
refuses them *before* anything runs (a marker file the payload would write stays absent).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import fractions
import functools
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from dcproto.errors import SerializationError, UnsafeResult
from dcproto.trust import files, safe
from dcproto.trust.files import (
    MAX_FILE_BYTES_PER_TASK,
    MAX_FILE_NAME,
    MAX_FILES_PER_TASK,
    MAX_NAME_COMPONENT,
    check_file_name,
    check_files,
)
from dcproto.trust.safe import MAX_DECODED_DEPTH, loads_from_worker, safe_loads, trusted_loads

PROTOCOLS = [2, 3, 4, 5, "cloudpickle"]


def dumps(value: object, protocol: int | str) -> bytes:
    if protocol == "cloudpickle":
        return cloudpickle.dumps(value)
    assert isinstance(protocol, int)
    return pickle.dumps(value, protocol=protocol)


class Forge:
    """Pickles as ``reduce``: the tuple a hostile worker's ``__reduce__`` would return."""

    def __init__(self, *reduce: Any) -> None:
        self.reduce = reduce

    def __reduce__(self) -> Any:
        return self.reduce


# --- plain values ---

UTC_PLUS_5_30 = datetime.timezone(datetime.timedelta(hours=5, minutes=30), "IST")

PLAIN_VALUES: list[Any] = [
    0,
    -5,
    2**100,
    -(2**100),
    1.5,
    float("inf"),
    -float("inf"),
    complex(1, -2),
    "",
    "text é 漢字",
    b"",
    b"\x00\xffbytes",
    bytearray(b"ab\x00"),
    bytearray(),
    True,
    False,
    None,
    [1, [2, [3, (4, 5)]], {"k": {6, 7}}],
    (1, "a", (2.5, None)),
    {"a": 1, "b": [1, 2], "c": {"d": frozenset({1, 2})}},
    set(),
    {1, "x", (2, 3)},
    frozenset(),
    frozenset({1.5, "y"}),
    range(3, 100, 7),
    range(10**18),
    slice(1, None, 2),
    datetime.date(2024, 2, 29),
    datetime.time(12, 30, 15, 500),
    datetime.time(1, 2, tzinfo=datetime.UTC),
    datetime.datetime(2020, 1, 2, 3, 4, 5, 678),
    datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC_PLUS_5_30),
    datetime.timedelta(days=-3, seconds=7, microseconds=9),
    datetime.UTC,
    UTC_PLUS_5_30,
    decimal.Decimal("1.10"),
    decimal.Decimal("-Infinity"),
    fractions.Fraction(1, 3),
    fractions.Fraction(-7),
    collections.OrderedDict([("b", 1), ("a", [2])]),
    {1: "one", (2, 3): "pair", -4: None, 2**70: "big"},
    [b"shared"] * 3,
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("value", PLAIN_VALUES, ids=lambda v: type(v).__name__)
def test_plain_values_round_trip(value: object, protocol: int | str) -> None:
    decoded = safe_loads(dumps(value, protocol), what="the result")
    assert decoded == value
    assert type(decoded) is type(value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nan_round_trips(protocol: int | str) -> None:
    decoded = safe_loads(dumps([float("nan"), complex(float("nan"), 1)], protocol), what="r")
    assert math.isnan(decoded[0])
    assert math.isnan(decoded[1].real)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shared_and_cyclic_values_keep_their_shape(protocol: int | str) -> None:
    inner = [1, 2]
    cyclic: list[Any] = [inner, inner]
    cyclic.append(cyclic)
    decoded = safe_loads(dumps(cyclic, protocol), what="r")
    assert decoded[0] is decoded[1]
    assert decoded[2] is decoded


def test_ordered_dict_keeps_its_order() -> None:
    value = collections.OrderedDict([("z", 1), ("a", 2)])
    assert list(safe_loads(pickle.dumps(value, 2), what="r")) == ["z", "a"]


def test_datetime_keeps_its_timezone() -> None:
    value = datetime.datetime(2020, 1, 2, tzinfo=UTC_PLUS_5_30)
    decoded = safe_loads(pickle.dumps(value, 2), what="r")
    assert decoded.utcoffset() == datetime.timedelta(hours=5, minutes=30)
    assert decoded.tzname() == "IST"


def test_import_does_not_import_numpy() -> None:
    code = "import sys, dcproto.trust.safe; assert 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- numpy ---


def numpy_values() -> list[Any]:
    np = pytest.importorskip("numpy")
    return [
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.linspace(0.0, 1.0, 5),
        np.array([True, False, True]),
        np.array([1 + 2j, -3j], dtype=np.complex128),
        np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[D]"),
        np.array([1, 2], dtype="timedelta64[ms]"),
        np.array(
            [(1, 2.5, b"ab"), (3, -1.0, b"c")], dtype=[("a", "<i4"), ("b", "<f8"), ("c", "S2")]
        ),
        np.array([(1, 2.0)], dtype=np.dtype([("a", "i1"), ("b", "f8")], align=True)),
        np.zeros(2, dtype=[("p", [("x", "<f4"), ("y", ">i2")]), ("m", "u1", (2, 3))]),
        np.array(3.5),
        np.array(7, dtype=np.int16),
        np.array([1, "x", None, 2**80], dtype=object),
        np.array([("s", 1)], dtype=[("a", "O"), ("b", "<i8")]),
        np.array(["ab", "c"]),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.arange(10)[::3],
        np.zeros((0, 4), dtype=np.float32),
        np.array([1.5], dtype=np.float16),
        np.float64(1.5),
        np.int32(3),
        np.bool_(True),
        np.complex128(2 - 1j),
        np.datetime64("2020-01-01T12:00"),
        np.dtype([("a", "<i4"), ("b", "O")]),
    ]


def assert_same(np: Any, got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, np.dtype):
        assert got == want
        return
    assert got.dtype == want.dtype
    assert got.dtype.isalignedstruct == want.dtype.isalignedstruct
    assert got.shape == want.shape
    if want.dtype.hasobject:
        assert got.tolist() == want.tolist()
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_numpy_values_round_trip(protocol: int | str) -> None:
    np = pytest.importorskip("numpy")
    for value in numpy_values():
        decoded = safe_loads(dumps(value, protocol), what="the result")
        # Protocols 2-4 turn a big-endian array native, exactly as pickle.loads does.
        assert_same(np, decoded, value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_numpy_arrays_inside_containers_share_dtypes(protocol: int | str) -> None:
    np = pytest.importorskip("numpy")
    dtype = np.dtype([("a", "<i4"), ("b", "<f8")])
    arrays = [np.zeros(2, dtype=dtype), np.ones(3, dtype=dtype), {"k": np.arange(3)}]
    decoded = safe_loads(dumps(arrays, protocol), what="r")
    assert decoded[0].dtype == dtype and decoded[1].dtype == dtype
    np.testing.assert_array_equal(decoded[1], arrays[1])
    np.testing.assert_array_equal(decoded[2]["k"], np.arange(3))


def test_big_endian_array_matches_pickle() -> None:
    np = pytest.importorskip("numpy")
    value = np.array([1, 2], dtype=">i4")
    for protocol in (2, 3, 4, 5):
        data = pickle.dumps(value, protocol=protocol)
        decoded = safe_loads(data, what="r")
        assert decoded.dtype == pickle.loads(data).dtype
        np.testing.assert_array_equal(decoded, value)


def test_numpy_1_and_2_module_names_both_decode() -> None:
    np = pytest.importorskip("numpy")
    import warnings

    values = [np.arange(4.0), np.float64(2.5), np.array([1, "x"], dtype=object)]
    for value in values:
        data = pickle.dumps(value, protocol=2)  # text GLOBALs: module names can be swapped
        for old, new in [(b"numpy._core.", b"numpy.core."), (b"numpy.core.", b"numpy._core.")]:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                decoded = safe_loads(data.replace(old, new), what="r")
            assert_same(np, decoded, value)


def test_numpy_pickle_without_numpy_is_a_clear_error() -> None:
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from dcproto.trust.safe import safe_loads\n"
        "from dcproto.errors import SerializationError, UnsafeResult\n"
        "try:\n"
        "    safe_loads(b\"cnumpy\\ndtype\\n(S'f8'\\nI00\\nI01\\ntR.\", what='r')\n"
        "except UnsafeResult:\n"
        "    raise SystemExit('refused as unsafe')\n"
        "except SerializationError as exc:\n"
        "    assert 'numpy is not installed' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('decoded')\n"
        "assert safe_loads(b'\\x80\\x04]\\x94K\\x01a.', what='r') == [1]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- hostile pickles ---


def marker_payload(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"


def hostile_cases(marker: Path) -> list[tuple[str, Any]]:
    """(expected type name, object whose pickle a hostile worker would send)."""
    return [
        ("builtins.eval", Forge(eval, (marker_payload(marker),))),
        ("builtins.exec", Forge(exec, (marker_payload(marker),))),
        (os.system.__module__ + ".system", Forge(os.system, (f"touch {marker}",))),
        ("builtins.getattr", Forge(getattr, ("abc", "upper"))),
        ("subprocess.Popen", Forge(subprocess.Popen, (["touch", str(marker)],))),
        ("functools.partial", functools.partial(print, 1)),
        ("builtins.type", Forge(type, ("X", (), {}))),
        ("builtins.__import__", Forge(__import__, ("os",))),
    ]


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5, "cloudpickle"])
def test_hostile_globals_are_refused_and_nothing_runs(tmp_path: Path, protocol: int | str) -> None:
    marker = tmp_path / "pwned"
    for type_name, obj in hostile_cases(marker):
        data = cloudpickle.dumps(obj) if protocol == "cloudpickle" else pickle.dumps(obj, protocol)
        with pytest.raises(UnsafeResult) as caught:
            safe_loads(data, what="the result of item 7")
        assert caught.value.type_name == type_name
        message = str(caught.value)
        assert message.startswith(f"the result of item 7 holds a value of type {type_name}")
        assert "trust_workers=True" in message
        assert not marker.exists()


def test_hostile_value_nested_in_plain_data_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    value = {"ok": [1, 2, 3], "bad": [Forge(eval, (marker_payload(marker),))]}
    with pytest.raises(UnsafeResult):
        safe_loads(pickle.dumps(value, 5), what="r")
    assert not marker.exists()


def test_protocol_0_os_system_is_refused() -> None:
    with pytest.raises(UnsafeResult) as caught:
        safe_loads(b"cos\nsystem\n(S'echo hi'\ntR.", what="r")
    assert caught.value.type_name == "os.system"


def test_main_class_is_refused() -> None:
    # What pickle writes for an instance of a class defined in the worker's __main__.
    data = b"\x80\x04\x8c\x08__main__\x94\x8c\x04Evil\x94\x93)\x81."
    with pytest.raises(UnsafeResult) as caught:
        safe_loads(data, what="r")
    assert caught.value.type_name == "__main__.Evil"


def test_class_pickled_by_value_is_refused() -> None:
    @dataclasses.dataclass
    class Local:
        x: int

    with pytest.raises(UnsafeResult) as caught:
        safe_loads(cloudpickle.dumps(Local(1)), what="r")
    assert caught.value.type_name.startswith("cloudpickle")


def test_copyreg_reconstructor_is_refused() -> None:
    data = b"ccopy_reg\n_reconstructor\n(c__builtin__\nobject\nc__builtin__\nobject\nNtR."
    with pytest.raises(UnsafeResult) as caught:
        safe_loads(data, what="r")
    assert caught.value.type_name == "copyreg._reconstructor"


class Plain:
    def __init__(self) -> None:
        self.a = 1


def test_plain_instances_are_refused() -> None:
    # Protocols 0 and 1 go through copyreg._reconstructor, later ones name the class.
    for protocol, type_name in [(0, "copyreg._reconstructor"), (1, "copyreg._reconstructor")]:
        with pytest.raises(UnsafeResult) as caught:
            safe_loads(pickle.dumps(Plain(), protocol=protocol), what="r")
        assert caught.value.type_name == type_name
    for protocol in (2, 3, 4, 5):
        with pytest.raises(UnsafeResult) as caught:
            safe_loads(pickle.dumps(Plain(), protocol=protocol), what="r")
        assert caught.value.type_name == f"{__name__}.Plain"


def test_persistent_id_is_refused() -> None:
    import io

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return "external" if obj == "secret" else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(["secret"])
    with pytest.raises(UnsafeResult) as caught:
        safe_loads(buffer.getvalue(), what="r")
    assert "persistent id" in str(caught.value)


def test_out_of_band_buffer_fails_cleanly() -> None:
    data = pickle.dumps(pickle.PickleBuffer(b"abc"), protocol=5, buffer_callback=lambda b: False)
    with pytest.raises(SerializationError) as caught:
        safe_loads(data, what="r")
    assert not isinstance(caught.value, UnsafeResult)


@pytest.mark.parametrize(
    ("obj", "type_name"),
    [
        (Forge(bytearray, (10**12,)), "builtins.bytearray"),
        (Forge(bytes, (10**12,)), "builtins.bytes"),
        (Forge(frozenset, (range(10**12),)), "builtins.frozenset"),
        (Forge(set, (range(10**12),)), "builtins.set"),
        (Forge(fractions.Fraction, ("1e999999999",)), "fractions.Fraction"),
        ([set], "builtins.set"),
    ],
)
def test_small_pickles_that_would_build_huge_values_are_refused(obj: Any, type_name: str) -> None:
    for protocol in (2, 5):
        with pytest.raises(UnsafeResult) as caught:
            safe_loads(pickle.dumps(obj, protocol=protocol), what="r")
        assert caught.value.type_name == type_name


def test_hostile_numpy_pickles_are_refused() -> None:
    np = pytest.importorskip("numpy")
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    # A structured dtype whose state hides its object field (flags 0): numpy would then build
    # object pointers out of the bytes below, and crash on first use.
    fields = {"a": (np.dtype("O"), 0), "b": (np.dtype("i8"), 8)}
    hidden = Forge(np.dtype, ("V16", False, True), (3, "|", None, ("a", "b"), fields, 16, 1, 0))
    cases: list[Any] = [
        Forge(_frombuffer, (b"A" * 16, hidden, (1,), "C")),
        Forge(np.ndarray, ((2,), np.dtype("O"), b"A" * 16)),
        Forge(_reconstruct, (np.ndarray, (10**9,), b"b")),
        Forge(np.dtype, ("T", False, True)),
        # An object array whose item list is shorter than its shape.
        Forge(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2, 3), np.dtype("O"), False, [1])),
        # A dtype state numpy itself crashes on.
        Forge(np.dtype, ("M8", False, True), (3, "<", (np.dtype("i8"), 5), ("z",), {}, -5, 8, 27)),
        [np.ndarray],
    ]
    for obj in cases:
        for protocol in (2, 5):
            with pytest.raises(UnsafeResult):
                safe_loads(pickle.dumps(obj, protocol=protocol), what="r")
    # The hidden object field comes back as what it is, so numpy refuses raw bytes for it.
    decoded = safe_loads(pickle.dumps(hidden, protocol=5), what="r")
    assert decoded.hasobject


# --- malformed data ---


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80\x05garbage",
        pickle.dumps({"a": [1, 2, 3]}, protocol=5)[:-5],
        pickle.dumps(list(range(100)), protocol=2)[:40],
        b"\x80\x05\x95\xff\xff\xff\xff\x00\x00\x00\x00",
        b"(((((((.",
        b"\x80\x04]a.",
    ],
)
def test_malformed_data_is_a_serialization_error(data: bytes) -> None:
    with pytest.raises(SerializationError) as caught:
        safe_loads(data, what="the result")
    assert not isinstance(caught.value, UnsafeResult)
    assert str(caught.value).startswith("the result cannot be decoded: ")
    assert caught.value.__cause__ is not None


def test_deep_nesting_is_refused_without_a_crash() -> None:
    depth = 100_000
    data = b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."
    with pytest.raises(SerializationError) as caught:
        safe_loads(data, what="the result")
    assert not isinstance(caught.value, UnsafeResult)
    assert "deep" in str(caught.value)


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_nesting_limit_is_exact() -> None:
    assert safe_loads(pickle.dumps(nested(MAX_DECODED_DEPTH)), what="r") == nested(
        MAX_DECODED_DEPTH
    )
    with pytest.raises(SerializationError):
        safe_loads(pickle.dumps(nested(MAX_DECODED_DEPTH + 1)), what="r")


def test_nesting_through_a_shared_value_counts_its_full_depth() -> None:
    # The deep part is first met near the top, then again at the bottom of another chain.
    shared = nested(60)
    value = [shared, nested(50)]
    inner = value[1]
    while inner:
        inner = inner[0]
    inner.append(shared)
    with pytest.raises(SerializationError):
        safe_loads(pickle.dumps(value, protocol=4), what="r")


def test_deeply_nested_dict_keys_and_tuples_are_refused() -> None:
    value: Any = 0
    for _ in range(MAX_DECODED_DEPTH + 5):
        value = ({"k": value},)
    with pytest.raises(SerializationError):
        safe_loads(pickle.dumps(value, protocol=5), what="r")


def test_non_bytes_input_is_a_serialization_error() -> None:
    with pytest.raises(SerializationError):
        safe_loads(12, what="r")  # type: ignore[arg-type]


# --- trusted_loads and loads_from_worker ---


@dataclasses.dataclass
class Point:
    x: int
    y: str


def test_trusted_loads_round_trips_a_class() -> None:
    value = [Point(1, "a"), {"p": Point(2, "b")}]
    assert trusted_loads(cloudpickle.dumps(value), what="r") == value


def test_trusted_loads_maps_errors() -> None:
    with pytest.raises(SerializationError) as caught:
        trusted_loads(b"\x80\x05garbage", what="the result")
    assert str(caught.value).startswith("the result cannot be unpickled here: ")
    assert caught.value.__cause__ is not None


def test_loads_from_worker_picks_the_decoder() -> None:
    data = cloudpickle.dumps(Point(1, "a"))
    assert loads_from_worker(data, trusted=True, what="r") == Point(1, "a")
    with pytest.raises(UnsafeResult) as caught:
        loads_from_worker(data, trusted=False, what="r")
    assert caught.value.type_name == f"{__name__}.Point"
    assert loads_from_worker(pickle.dumps([1, 2]), trusted=False, what="r") == [1, 2]


# --- file names ---


@pytest.mark.parametrize(
    "name", ["a.txt", "dir/sub/x.png", "x.task3", "résumé.pdf", "a..b", ".hidden", "z" * 255]
)
def test_good_file_names(name: str) -> None:
    assert check_file_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "is empty"),
        ("/etc/passwd", "is an absolute path"),
        ("//etc/passwd", "is an absolute path"),
        ("../x", "escapes the results directory"),
        ("a/../../x", "escapes the results directory"),
        ("a/..", "escapes the results directory"),
        ("a/./b", "has a '.' path component"),
        (".", "has a '.' path component"),
        ("a//b", "has an empty path component"),
        ("a/", "has an empty path component"),
        ("a\x00b", "contains a control character"),
        ("a\nb", "contains a control character"),
        ("a\x7fb", "contains a control character"),
        ("a\\b", "contains a backslash"),
        ("..\\x", "contains a backslash"),
        ("C:x", "starts with a drive letter"),
        ("c:/x", "starts with a drive letter"),
        ("\ud800", "is not valid Unicode text"),
        ("x" * (MAX_FILE_NAME + 1), f"is longer than {MAX_FILE_NAME} characters"),
        ("y" * (MAX_NAME_COMPONENT + 1), "has a path component longer than"),
        (5, "is not a string"),
        (b"a.txt", "is not a string"),
        (None, "is not a string"),
    ],
)
def test_bad_file_names(name: object, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_file_name(name)
    message = str(caught.value)
    assert reason in message
    assert message.startswith("file name ")
    assert len(message) < 200
    assert "\x00" not in message and "\n" not in message


def test_files_ok() -> None:
    files = [["a.txt", b"1"], ["dir/b.bin", b""], ("c", b"\x00" * 10)]
    assert check_files(files) == [("a.txt", b"1"), ("dir/b.bin", b""), ("c", b"\x00" * 10)]
    assert check_files([]) == []


def test_files_names_the_first_problem() -> None:
    with pytest.raises(ValueError, match=r"^file 3: name '\.\./x' escapes the results directory$"):
        check_files([["a", b""], ["b", b""], ["c", b""], ["../x", b""], ["/y", b""]])


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"a": b""}, "not a list"),
        ("a", "not a list"),
        ([["a", b"1"], ["a", b"2"]], "file 1: name 'a' appears twice"),
        ([["a", b"1"], ["a", b"2", b"3"]], "file 1: entry is not a"),
        ([["a"]], "file 0: entry is not a"),
        (["a"], "file 0: entry is not a"),
        ([[b"a", b"1"]], "file 0: name b'a' is not a string"),
        ([["a", "text"]], "file 0: data is not bytes"),
        ([["a", bytearray(b"x")]], "file 0: data is not bytes"),
        ([["a\x00" + "b" * 300, b""]], "contains a control character"),
    ],
)
def test_bad_files(files: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_files(files)


def test_too_many_files() -> None:
    files = [[f"f{i}", b""] for i in range(MAX_FILES_PER_TASK + 1)]
    with pytest.raises(ValueError, match="1001 files"):
        check_files(files)
    assert len(check_files(files[:-1])) == MAX_FILES_PER_TASK


def test_too_many_bytes() -> None:
    chunk = b"\x00" * (17 * 1024 * 1024)
    with pytest.raises(
        ValueError, match=f"file 1: the files total more than {MAX_FILE_BYTES_PER_TASK}"
    ):
        check_files([["a", chunk], ["b", chunk]])
    exact = [["a", chunk], ["b", b"\x00" * (MAX_FILE_BYTES_PER_TASK - len(chunk))]]
    assert len(check_files(exact)) == 2


def test_long_names_are_shown_truncated() -> None:
    name = "../" + "q" * 500
    with pytest.raises(ValueError) as caught:
        check_files([[name, b""]])
    assert len(str(caught.value)) < 200


def test_module_exports() -> None:
    assert set(safe.__all__) >= {"safe_loads", "trusted_loads", "loads_from_worker"}
    assert set(files.__all__) >= {"check_files", "check_file_name"}


class _Run:
    trusted = False


@pytest.mark.parametrize(
    "payload",
    [{-1: "a"}, {3: "a"}, {True: "a"}, {0: "a", 1.0: "b"}, {"0": "a"}, {0: "a", 2**70: "b"}],
    ids=["negative", "past-the-end", "bool", "float", "str", "huge"],
)
def test_a_result_naming_an_item_outside_its_task_is_refused(payload: dict[Any, Any]) -> None:
    from dcproto.creator.run import ProjectRun

    items = pickle.dumps(["x", "y", "z"])
    with pytest.raises(ValueError, match="not in the task"):
        ProjectRun._decode_indexed(_Run(), items, pickle.dumps(payload), "a task")  # type: ignore[arg-type]


def test_the_fast_path_maps_every_index_to_its_item() -> None:
    from dcproto.creator.run import ProjectRun

    items = pickle.dumps(["a", "b", "a", "c"])  # an item twice: the later value wins, as before
    payload = pickle.dumps({0: 1, 1: 2, 2: 3, 3: 4})
    results, indexes = ProjectRun._decode_indexed(_Run(), items, payload, "a task")  # type: ignore[arg-type]
    assert results == {"a": 3, "b": 2, "c": 4} and indexes == [0, 1, 2, 3]
    sparse = pickle.dumps({3: "kept", 1: "too"})
    results, indexes = ProjectRun._decode_indexed(_Run(), items, sparse, "a task")  # type: ignore[arg-type]
    assert results == {"c": "kept", "b": "too"} and indexes == [3, 1]
