"""results.json as the results writer encodes it: the fast encoder, and what falls back."""

from __future__ import annotations

import datetime
import json
import math
import threading

import pytest

from dcproto.creator.results import results_json


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
