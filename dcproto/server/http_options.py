"""What ``--http-host``, ``--http-port`` and ``--http-require-token`` ask for: kept apart from
:mod:`.http` so that a server without a dashboard never imports aiohttp."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_HTTP_HOST = "127.0.0.1"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` names only this machine: ``localhost`` or a loopback address."""
    if host is None:
        return False
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HttpOptions:
    host: str = DEFAULT_HTTP_HOST
    port: int = 0  # 0: any free port
    require_token: bool = False  # also on a loopback bind

    @property
    def tokens_required(self) -> bool:
        """Every request needs an admin token: asked for, or the bind is not loopback."""
        return self.require_token or not is_loopback(self.host)


class HttpListenError(OSError):
    """The HTTP port could not be bound."""
