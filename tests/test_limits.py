"""Per-creator limits (dcproto.server.limits) without sockets."""

from __future__ import annotations

import pytest

from dcproto.server.limits import Limits, Usage, over_quota, past_quota, submit_refusal


def test_running_projects_are_counted_per_owner() -> None:
    limits = Limits(max_projects_per_creator=2)
    usage = Usage()
    usage.started("a1", "alice")
    assert submit_refusal(limits, usage, "alice", 10) is None
    usage.started("a2", "alice")
    usage.started("a2", "alice")  # counted once
    refusal = submit_refusal(limits, usage, "alice", 10)
    assert refusal is not None
    assert refusal[0] == "too_many_projects"
    assert "--max-projects-per-creator" in refusal[1] and "2 running" in refusal[1]
    assert submit_refusal(limits, usage, "bob", 10) is None  # others are unaffected
    usage.ended("a1")
    usage.ended("a1")
    assert submit_refusal(limits, usage, "alice", 10) is None
    assert submit_refusal(Limits(max_projects_per_creator=0), usage, "alice", 10) is None


def test_code_size() -> None:
    limits = Limits(max_code_bytes=100)
    usage = Usage()
    assert submit_refusal(limits, usage, "alice", 100) is None
    refusal = submit_refusal(limits, usage, "alice", 101)
    assert refusal is not None and refusal[0] == "code_too_large"
    assert "--max-code-bytes" in refusal[1]
    assert submit_refusal(Limits(max_code_bytes=0), usage, "alice", 10**9) is None


def test_stored_result_bytes_until_released() -> None:
    limits = Limits(max_stored_result_bytes=1000)
    usage = Usage()
    usage.started("a1", "alice")
    usage.started("b1", "bob")
    assert usage.result_stored("a1", 600) == 600
    assert not past_quota(limits, 600)
    assert usage.result_stored("b1", 900) == 900  # bob's own count
    total = usage.result_stored("a1", 500)
    assert total == 1100 and past_quota(limits, total)
    assert over_quota(limits, usage, "alice") and not over_quota(limits, usage, "bob")
    refusal = submit_refusal(limits, usage, "alice", 1)
    assert refusal is not None and refusal[0] == "quota"
    assert "--max-stored-result-bytes" in refusal[1]
    usage.ended("a1")
    assert usage.stored["alice"] == 1100  # finished, not released: still counts
    usage.released("a1")
    assert usage.stored["alice"] == 0 and usage.owner("a1") is None
    assert submit_refusal(limits, usage, "alice", 1) is None
    # restored at start: a finished project's results, its owner given
    usage.result_stored("old", 300, "carol")
    assert usage.stored["carol"] == 300 and usage.owner("old") == "carol"
    usage.released("old")
    assert usage.stored["carol"] == 0


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        Limits(max_code_bytes=-1)
