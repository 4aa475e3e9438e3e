"""Who may hold a connection before logging in, who must slow down, and what gets logged.

Pure decisions, no sockets and no clock: ``now`` is passed in. The server asks these and acts.

* :class:`Admission` counts *unauthenticated* connections (accepted, no successful Hello yet,
  including those still in the TLS handshake) in total and per peer address. When a cap is
  reached, the oldest unauthenticated connection (of that address for the per-address cap) is
  the one to close, so a flood of idle sockets never locks an honest client out.
* It also keeps, per address, a count of failed logins: past a few within a window, each further
  failure is answered only after a growing delay, and new connections from the address are
  refused (``slow_down``) until that delay has passed. A successful login resets the address.
* :class:`LogLimiter` lets through at most one refusal line per address per interval and counts
  the others, for the next line to report.
* :func:`peer_text` is how any text a peer chose appears in a log line: escaped and truncated.

State per address is kept in bounded LRU maps. An IPv6 peer is keyed by its /64 network: one
host usually holds a whole /64, and must not get a fresh allowance per address.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_MAX_UNAUTHENTICATED = 512
DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS = 64
FAILURES_ALLOWED = 5  # failed logins from one address within FAILURE_WINDOW answered at once
FAILURE_WINDOW = 60.0
FIRST_DELAY = 0.5  # the delay after the first failure past the allowance; doubles each time
MAX_DELAY = 5.0
MAX_ADDRESSES = 4096  # addresses remembered (failures, log lines); the least recent go first
LOG_INTERVAL = 10.0  # at most one refusal line per address per this many seconds
PEER_TEXT_LIMIT = 100  # characters of a peer's text shown in a log line

TOTAL = "total"
PER_ADDRESS = "per-address"


def address_key(host: str) -> str:
    """The key a peer's limits are kept under: the IPv4 address (also when mapped into IPv6),
    or the /64 network of an IPv6 address; the text itself when it is no IP address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def peer_text(text: object, limit: int = PEER_TEXT_LIMIT) -> str:
    """``text`` fit for one log line: as is when it is short and printable, otherwise its
    ``repr()`` (no line breaks or control characters survive), cut to ``limit`` characters."""
    value = text if isinstance(text, str) else str(text)
    if len(value) <= limit and value.isprintable():
        return value
    shown = repr(value)
    if len(shown) > limit:
        shown = shown[: limit - 3] + "..."
    return shown


@dataclass(frozen=True)
class Eviction:
    """An unauthenticated connection to close because ``cap`` (TOTAL or PER_ADDRESS) of
    ``limit`` connections was reached."""

    conn_id: str
    address: str
    cap: str
    limit: int


@dataclass
class _Failures:
    count: int = 0
    window_start: float = 0.0
    delay: float = 0.0
    blocked_until: float = float("-inf")


class Admission:
    def __init__(
        self,
        *,
        max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
        max_per_address: int = DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
        failures_allowed: int = FAILURES_ALLOWED,
        failure_window: float = FAILURE_WINDOW,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        if max_unauthenticated < 1 or max_per_address < 1:
            raise ValueError("the caps on unauthenticated connections must be at least 1")
        self.max_unauthenticated = max_unauthenticated
        self.max_per_address = max_per_address
        self.failures_allowed = failures_allowed
        self.failure_window = failure_window
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.max_addresses = max_addresses
        # unauthenticated connections, oldest first: conn id -> address key
        self._pending: OrderedDict[str, str] = OrderedDict()
        self._by_address: dict[str, OrderedDict[str, None]] = {}
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    # unauthenticated connections ---------------------------------------------------------------

    @property
    def unauthenticated(self) -> int:
        return len(self._pending)

    def unauthenticated_from(self, address: str) -> int:
        return len(self._by_address.get(address, ()))

    def opened(self, conn_id: str, address: str) -> list[Eviction]:
        """A connection was accepted from ``address`` (an :func:`address_key`). Returns the
        connections to close to stay within the caps (never the new one: it is the youngest)."""
        self._pending[conn_id] = address
        self._by_address.setdefault(address, OrderedDict())[conn_id] = None
        evictions = []
        same = self._by_address[address]
        if len(same) > self.max_per_address:
            oldest = next(iter(same))
            self.done(oldest)
            evictions.append(Eviction(oldest, address, PER_ADDRESS, self.max_per_address))
        if len(self._pending) > self.max_unauthenticated:
            oldest, where = next(iter(self._pending.items()))
            self.done(oldest)
            evictions.append(Eviction(oldest, where, TOTAL, self.max_unauthenticated))
        return evictions

    def done(self, conn_id: str) -> None:
        """The connection logged in or is gone: it no longer counts (idempotent)."""
        address = self._pending.pop(conn_id, None)
        if address is None:
            return
        same = self._by_address[address]
        del same[conn_id]
        if not same:
            del self._by_address[address]

    # failed logins -----------------------------------------------------------------------------

    def failed(self, address: str, now: float) -> float:
        """A login from ``address`` failed: the seconds to wait before answering it (0: at
        once). Past the allowance, each failure doubles the delay (up to ``max_delay``) and
        refuses new connections from the address until it has passed."""
        entry = self._touch(address)
        if now - entry.window_start > self.failure_window and now >= entry.blocked_until:
            entry.count, entry.window_start, entry.delay = 0, now, 0.0
        entry.count += 1
        if entry.count <= self.failures_allowed:
            return 0.0
        entry.delay = self.first_delay if entry.delay == 0 else min(self.max_delay, entry.delay * 2)
        entry.blocked_until = max(entry.blocked_until, now + entry.delay)
        return entry.delay

    def succeeded(self, address: str) -> None:
        """A login from ``address`` succeeded: its failures are forgotten."""
        self._failures.pop(address, None)

    def penalty(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try again (0: it may now)."""
        entry = self._failures.get(address)
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until - now)

    def failures(self, address: str) -> int:
        entry = self._failures.get(address)
        return 0 if entry is None else entry.count

    def _touch(self, address: str) -> _Failures:
        entry = self._failures.get(address)
        if entry is None:
            entry = self._failures[address] = _Failures()
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(address)
        return entry


class LogLimiter:
    """At most one line per key (an address) per ``interval``; the lines held back are counted
    and reported by the next line let through, or by :meth:`overdue`."""

    def __init__(self, interval: float = LOG_INTERVAL, max_keys: int = MAX_ADDRESSES) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: OrderedDict[str, float] = OrderedDict()  # key -> when a line last went out
        self._held: dict[str, int] = {}  # key -> lines held back since then

    def allow(self, key: str, now: float) -> int | None:
        """None: hold this line back. Otherwise log it, with the count of lines held back since
        the last one (0: none)."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            gone, _ = self._last.popitem(last=False)
            self._held.pop(gone, None)
        return self._held.pop(key, 0)

    def overdue(self, now: float) -> list[tuple[str, int]]:
        """Keys whose held-back lines have waited an interval with no line to report them:
        (key, count) for a summary line each (which counts as that key's line)."""
        due = [
            (key, count)
            for key, count in self._held.items()
            if now - self._last.get(key, float("-inf")) >= self.interval
        ]
        for key, _ in due:
            del self._held[key]
            self._last[key] = now
            self._last.move_to_end(key)
        return due
