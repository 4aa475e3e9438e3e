"""How the creator cuts its iterator into tasks (no sockets)."""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Iterator

import pytest

from dcproto.creator.run import pickle_items, task_chunks
from dcproto.errors import UnhashableItemError


def test_a_range_is_cut_into_sub_ranges() -> None:
    chunks = list(task_chunks(range(3, 20, 2), 0, 3))
    assert chunks == [range(3, 9, 2), range(9, 15, 2), range(15, 20, 2)]
    assert [x for chunk in chunks for x in chunk] == list(range(3, 20, 2))


def test_skipping_a_range_is_immediate_even_when_huge() -> None:
    chunks = task_chunks(range(10**20), 10**19, 4)
    assert list(itertools.islice(chunks, 2)) == [
        range(10**19, 10**19 + 4),
        range(10**19 + 4, 10**19 + 8),
    ]


def test_other_iterables_are_cut_into_lists() -> None:
    def items() -> Iterator[str]:
        yield from "abcdefg"

    assert list(task_chunks(items(), 2, 2)) == [["c", "d"], ["e", "f"], ["g"]]
    assert list(task_chunks([], 0, 5)) == []
    assert list(task_chunks(range(0), 0, 5)) == []


def test_a_non_iterable_fails_at_once() -> None:
    with pytest.raises(TypeError):
        task_chunks(5, 0, 1)  # type: ignore[arg-type]


def test_a_sub_range_pickles_small_whatever_its_length() -> None:
    blob = pickle_items(range(10**6, 2 * 10**6))
    assert len(blob) < 64
    assert pickle.loads(blob) == range(10**6, 2 * 10**6)


def test_unhashable_items_are_refused() -> None:
    with pytest.raises(UnhashableItemError):
        pickle_items([(1, 2), [3]])
