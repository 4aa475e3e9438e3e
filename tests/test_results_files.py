"""The results writer: results.json's encoding (the fast encoder, and what falls back), and
whole files, written without a temporary one left behind."""

from __future__ import annotations

import datetime
import json
import math
import threading
from pathlib import Path

import pytest

from dcproto import load_results
from dcproto.creator.results import ResultsWriter, results_json
from dcproto.errors import ResultsPathError


def test_plain_results_are_pairs_that_the_standard_decoder_reads_back() -> None:
    results = {1: 2.5, "a": [1, "x", None, True], (3, 4): {"k": -7}}
    data = results_json(results)
    assert data is not None
    assert json.loads(data) == [[1, 2.5], ["a", [1, "x", None, True]], [[3, 4], {"k": -7}]]


def test_non_finite_floats_are_written_as_null() -> None:
    data = results_json({1: math.nan, 2: math.inf, 3: 1.0})
    assert data is not None
    assert json.loads(data) == [[1, None], [2, None], [3, 1.0]]


@pytest.mark.parametrize(
    "value, expected",
    [
        (2**70, 2**70),  # over 64 bits: the standard encoder writes it exactly
        ({1: "a"}, {"1": "a"}),  # int keys: the standard encoder makes them strings
    ],
)
def test_what_the_fast_encoder_refuses_falls_back_to_the_standard_one(
    value: object, expected: object
) -> None:
    data = results_json({"x": value})
    assert data is not None
    assert json.loads(data) == [["x", expected]]


def test_a_value_json_cannot_hold_gives_no_file() -> None:
    assert results_json({1: threading.Lock()}) is None
    assert results_json({1: {2, 3}}) is None


def test_a_datetime_is_written_as_iso_text() -> None:
    when = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
    data = results_json({1: when})
    assert data is not None
    assert json.loads(data) == [[1, "2026-12-01T12:00:00+00:00"]]


def test_the_writer_leaves_whole_files_and_no_temporary_ones(tmp_path: Path) -> None:
    writer = ResultsWriter(tmp_path / "out")
    writer.started("0123abcd")
    writer.task_done(0, {"worker": "w", "attempt": 1, "run": 0.5}, [("plot.png", b"PNG")])
    stats = {"status": "done", "when": datetime.datetime(2026, 12, 1), "rate": math.nan}
    writer.finish(results={1: 2}, status="done", error=None, stats=stats, errors=[{"item": "3"}])
    out = tmp_path / "out"
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {
        "project_id", "tasks.csv", "stats.json", "errors.json", "results.pickle",
        "results.json", "additional_results/plot.png",
    }  # fmt: skip
    assert load_results(out) == {1: 2}
    assert json.loads((out / "stats.json").read_text()) == {
        "status": "done", "when": "2026-12-01T00:00:00", "rate": None,
    }  # fmt: skip
    assert (out / "tasks.csv").read_text().splitlines()[0].startswith("seq,worker")


def test_an_unwritable_results_path_is_refused_at_once(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ResultsPathError, match="cannot be written"):
        ResultsWriter(blocker / "out")


def test_a_start_noted_after_the_end_leaves_tasks_csv_as_the_end_wrote_it(tmp_path: Path) -> None:
    """An attach to a finished project gets its results replayed and Finished before its own
    start is noted: that late start must not reopen (and so empty) tasks.csv."""
    writer = ResultsWriter(tmp_path)
    for seq in range(3):
        writer.task_done(seq, {"worker": "w", "attempt": 1}, [])
    writer.finish(results={1: 2}, status="done", error=None, stats={}, errors=[])
    writer.started("0123abcd")
    rows = (tmp_path / "tasks.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1", "2"]
    assert (tmp_path / "project_id").read_text() == "0123abcd\n"
