"""Replays of a project's stored results to a creator that attaches, streamed in bounded memory.

An Attach is answered with Attached at once; the project's stored results follow as TaskDone
(then Finished if it has ended), read from the store a page at a time and only while the
connection keeps reading: the server asks :meth:`Replays.step` for the next messages when the
transport's write buffer has room (asyncio's pause_writing / resume_writing), so a creator that
never reads holds one page and one transport buffer, however many Attach frames it sends.

One connection streams one replay at a time; the others it asked for wait their turn (at most
``MAX_REPLAYS`` in all: past that the server closes the connection with ``too_many_requests``),
and an Attach of a project whose replay is already under way or waiting starts none.

Ordering: nothing live about a project (a new TaskDone, or Finished) overtakes its replay. From
the Attach on, such messages for a project that is replaying or waiting to on this connection
are held back (:meth:`Replays.hold`) and sent right after the replay. Results accepted before
the Attach are either on disk (the server commits before it takes the Attach) or, while the
disk fails, in the snapshot of unsaved results the Replay is given. A live result may also be
read from the disk by the replay: the creator drops seqs it already has.

No I/O here: the store's pages come through a function, and the messages go back to the server.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import protocol as p

log = logging.getLogger("dcproto.server")

MAX_REPLAYS = 64  # replays one connection may have asked for and not yet received
STEP_BYTES = 1024 * 1024  # stored results read and queued per step (one result at least)

#: ``(project_id, after_seq, max_bytes)`` -> the next stored results (TaskDone fields, ``seq``
#: included; a damaged one with ``payload`` None and the reason under ``damaged``), [] at the end
PageReader = Callable[[str, int, int], list[dict[str, Any]]]


class TooManyReplays(Exception):
    """A connection asked for more replays than :data:`MAX_REPLAYS` at once."""


@dataclass(eq=False, slots=True)
class Replay:
    project_id: str
    last: p.Message | None  # sent after the results: Finished of a project that has ended
    unsaved: dict[int, dict[str, Any]]  # accepted before the Attach, not on disk then: by seq
    held: list[p.Message] = field(default_factory=list)  # live messages held back meanwhile
    held_bytes: int = 0
    after_seq: int = -1  # the stored results up to this seq have been sent
    stored_done: bool = False


def _size(message: p.Message) -> int:
    """About what ``message`` takes in memory (its large fields)."""
    size = 256
    if isinstance(message, p.TaskDone):
        size += len(message.payload) + len(message.items)
    elif isinstance(message, p.Finished) and message.stop is not None:
        size += len(message.stop[1]) + len(message.stop[2])
    return size


class Replays:
    """One connection's replays: the first one streams, the others wait their turn."""

    def __init__(self, limit: int = MAX_REPLAYS) -> None:
        self.limit = limit
        self._queue: OrderedDict[str, Replay] = OrderedDict()
        self.held_bytes = 0  # of live messages held back, all replays together

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, project_id: object) -> bool:
        return project_id in self._queue

    def add(self, replay: Replay) -> bool:
        """Queue ``replay``; False if one for its project is under way or waiting already (it
        covers this one too). Raises TooManyReplays when the connection has asked for too
        many."""
        if replay.project_id in self._queue:
            return False
        if len(self._queue) >= self.limit:
            raise TooManyReplays(f"more than {self.limit} replays asked for at once")
        self._queue[replay.project_id] = replay
        return True

    def hold(self, message: p.Message) -> bool:
        """Hold back a live TaskDone or Finished of a project that replays or waits to; True if
        it was held (the caller must not send it)."""
        if not isinstance(message, p.TaskDone | p.Finished):
            return False
        replay = self._queue.get(message.project_id)
        if replay is None:
            return False
        size = _size(message)
        replay.held.append(message)
        replay.held_bytes += size
        self.held_bytes += size
        return True

    def clear(self) -> None:
        self._queue.clear()
        self.held_bytes = 0

    def step(self, read_page: PageReader, budget: int = STEP_BYTES) -> list[p.Message]:
        """The next messages of the streaming replay: a page of stored results (about
        ``budget`` bytes), or, once they are all out, the unsaved ones, its last message and
        the live ones held back, and that replay is over. [] only when none is left."""
        while self._queue:
            messages = self._step(read_page, budget)
            if messages:
                return messages
        return []

    def _step(self, read_page: PageReader, budget: int) -> list[p.Message]:
        replay = next(iter(self._queue.values()))
        project_id = replay.project_id
        messages: list[p.Message] = []
        if not replay.stored_done:
            page = read_page(project_id, replay.after_seq, budget)
            if page:
                for result in page:
                    replay.after_seq = result["seq"]
                    replay.unsaved.pop(result["seq"], None)  # it reached the disk meanwhile
                    damaged = result.pop("damaged", None)
                    if damaged is not None:  # e.g. after a power loss: say so; the creator
                        log.error("%s", damaged)  # sees it is missing results, never wrong ones
                        messages.append(
                            p.Notice(project_id=project_id, level="warning", text=damaged)
                        )
                        continue
                    messages.append(p.TaskDone(project_id=project_id, **result))
                return messages
            replay.stored_done = True
        messages += [p.TaskDone(project_id=project_id, **r) for r in replay.unsaved.values()]
        if replay.last is not None:
            messages.append(replay.last)
        messages += replay.held
        self.held_bytes -= replay.held_bytes
        del self._queue[project_id]
        return messages
