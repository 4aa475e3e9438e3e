"""A project's options: their defaults and their checks, shared by the creator (which checks
them at decoration) and the server (which checks them again at submit)."""

from __future__ import annotations

import math
from typing import Any

from . import protocol as p

#: A worker renews its leases by heartbeats sent a few times per lease: a shorter lease could
#: expire on a healthy worker whenever a heartbeat is late by a scheduling hiccup.
MIN_LEASE_TIMEOUT = 1.0

DEFAULT_OPTIONS: dict[str, Any] = {
    "lease_timeout": 30.0,  # seconds without a sign of life before a worker's tasks move on
    "task_timeout": None,  # seconds one task may run in a worker's child process
    "max_attempts": 3,  # crashes or timeouts of one task before the project fails
    # times one task may go back to the queue without an answer (its worker vanished, went
    # silent or held it too long) before the project fails: ends a livelock with its reason
    "max_reissues": 20,
    "errors": "raise",  # an exception in user code: "raise" fails the project, "skip" drops it
    "fail_when_unrunnable": False,  # fail at once when no connected worker can run it
    # decode workers' values with full pickle (code may run) instead of the safe decoder
    "trust_workers": False,
}


def normalize_options(options: dict[str, Any]) -> dict[str, Any]:
    """Known options with defaults filled in; raises ValueError on a bad value."""
    merged = dict(DEFAULT_OPTIONS)
    merged.update({k: v for k, v in options.items() if k in DEFAULT_OPTIONS})
    if not _positive(merged["lease_timeout"]):
        raise ValueError("lease_timeout must be a positive number")
    if merged["lease_timeout"] < MIN_LEASE_TIMEOUT:
        raise ValueError(
            f"lease_timeout must be at least {MIN_LEASE_TIMEOUT:g} s: a worker renews its "
            "leases by heartbeats, which a shorter lease would not leave time for"
        )
    timeout = merged["task_timeout"]
    if timeout is not None and not _positive(timeout):
        raise ValueError("task_timeout must be a positive number or None")
    if type(merged["max_attempts"]) is not int or merged["max_attempts"] < 1:
        raise ValueError("max_attempts must be an integer >= 1")
    if type(merged["max_reissues"]) is not int or not 1 <= merged["max_reissues"] <= p.MAX_INT:
        raise ValueError("max_reissues must be an integer >= 1")
    if merged["errors"] not in p.ERROR_POLICIES:
        raise ValueError(f"errors must be one of {p.ERROR_POLICIES}")
    merged["fail_when_unrunnable"] = bool(merged["fail_when_unrunnable"])
    if type(merged["trust_workers"]) is not bool:
        raise ValueError("trust_workers must be True or False")
    return merged


def _positive(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0
