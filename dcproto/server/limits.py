"""Per-creator limits: what one identity (token name) may hold on the server at once.

Pure bookkeeping and decisions, no I/O: :class:`Usage` counts, per owner, the running projects
and the bytes of stored results not yet released; :func:`submit_refusal` and
:func:`over_quota` say when a limit is hit. The server keeps a Usage in memory, rebuilds it
from the store when it starts, and asks these functions at Submit and whenever it stores a
result.

The limits apply to every identity, admins included: an admin token is a person's too, and the
operator who wants more room raises the flags. A limit of 0 turns that limit off. The length of
a project's name needs no limit here: the protocol caps it at ``protocol.MAX_NAME`` (200)
characters when the Submit is decoded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

DEFAULT_MAX_PROJECTS_PER_CREATOR = 100
DEFAULT_MAX_CODE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_STORED_RESULT_BYTES = 10 * 1024**3


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's per-creator limits (0: no limit)."""

    max_projects_per_creator: int = DEFAULT_MAX_PROJECTS_PER_CREATOR
    max_code_bytes: int = DEFAULT_MAX_CODE_BYTES
    max_stored_result_bytes: int = DEFAULT_MAX_STORED_RESULT_BYTES

    def __post_init__(self) -> None:
        for name in ("max_projects_per_creator", "max_code_bytes", "max_stored_result_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (no limit) or more")


class Usage:
    """Per owner: running projects, and bytes of stored results not yet released."""

    def __init__(self) -> None:
        self.running: Counter[str] = Counter()
        self.stored: Counter[str] = Counter()
        self._owner: dict[str, str] = {}  # project -> owner, while it runs or holds results
        self._running: set[str] = set()
        self._bytes: dict[str, int] = {}  # project -> its stored result bytes

    def started(self, project_id: str, owner: str) -> None:
        """A project runs (submitted, or resumed after a restart)."""
        if project_id in self._running:
            return
        self._running.add(project_id)
        self._owner[project_id] = owner
        self.running[owner] += 1

    def ended(self, project_id: str) -> None:
        """A project finished; its stored results still count until they are released."""
        if project_id not in self._running:
            return
        self._running.discard(project_id)
        owner = self._owner[project_id]
        self.running[owner] -= 1
        if self.running[owner] <= 0:
            del self.running[owner]
        if project_id not in self._bytes:
            del self._owner[project_id]

    def result_stored(self, project_id: str, nbytes: int, owner: str = "") -> int:
        """A result of ``nbytes`` was stored; returns its owner's total now. ``owner`` is
        used only for a project not known yet (restored at start)."""
        owner = self._owner.setdefault(project_id, owner)
        self._bytes[project_id] = self._bytes.get(project_id, 0) + nbytes
        self.stored[owner] += nbytes
        return self.stored[owner]

    def released(self, project_id: str) -> None:
        """A project's stored results were released (or pruned with it)."""
        nbytes = self._bytes.pop(project_id, 0)
        owner = self._owner.get(project_id)
        if owner is None:
            return
        if nbytes:
            self.stored[owner] -= nbytes
            if self.stored[owner] <= 0:
                del self.stored[owner]
        if project_id not in self._running:
            del self._owner[project_id]

    def owner(self, project_id: str) -> str | None:
        return self._owner.get(project_id)


def submit_refusal(
    limits: Limits, usage: Usage, owner: str, code_bytes: int
) -> tuple[str, str] | None:
    """(reason, message) when ``owner`` may not submit a project of ``code_bytes`` of code
    now; None when it may. The message names the limit and the server flag that sets it."""
    if limits.max_code_bytes and code_bytes > limits.max_code_bytes:
        return (
            "code_too_large",
            f"the project's code is {code_bytes} bytes, more than this server's limit of "
            f"{limits.max_code_bytes} (dcproto-server --max-code-bytes)",
        )
    if limits.max_projects_per_creator and (
        usage.running[owner] >= limits.max_projects_per_creator
    ):
        return (
            "too_many_projects",
            f"{owner or 'this creator'} already has {usage.running[owner]} running projects, "
            f"this server's limit (dcproto-server --max-projects-per-creator); wait for one "
            "to finish or cancel one",
        )
    if over_quota(limits, usage, owner):
        return ("quota", quota_message(limits, usage, owner))
    return None


def over_quota(limits: Limits, usage: Usage, owner: str) -> bool:
    """Whether ``owner``'s stored, unreleased results are past the limit."""
    return bool(limits.max_stored_result_bytes) and (
        usage.stored[owner] >= limits.max_stored_result_bytes
    )


def past_quota(limits: Limits, owner_total: int) -> bool:
    """Whether a result that brought its owner's stored bytes to ``owner_total`` went past the
    limit (its project then fails with reason ``quota``)."""
    return bool(limits.max_stored_result_bytes) and owner_total > limits.max_stored_result_bytes


def quota_message(limits: Limits, usage: Usage, owner: str) -> str:
    return (
        f"the results {owner or 'this creator'} has not fetched yet take "
        f"{usage.stored[owner]} bytes on the server, this server's limit is "
        f"{limits.max_stored_result_bytes} (dcproto-server --max-stored-result-bytes); fetch "
        "the results of finished projects to release them"
    )
