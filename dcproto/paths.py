"""Where things live that more than one role must agree on: the server's state dir, and the
environment variable that tells a task where to write its extra files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import platformdirs

SERVER_FILE = "server.json"  # written by the server: its address and certificate pin
ADMIN_TOKEN_FILE = "admin.token"  # the first admin token, mode 0600
OUTPUT_DIR_ENV = "DCPROTO_OUTPUT_DIR"


def default_state_dir() -> Path:
    return Path(platformdirs.user_data_dir("dcproto")) / "server"


@dataclass(frozen=True)
class LocalServer:
    """What a client on the server's own machine may read from its state dir."""

    token: str | None
    fingerprint: str | None
    insecure: bool


def read_local_server(state_dir: Path) -> LocalServer | None:
    """The admin token and certificate pin of a server of ours on this machine, if its state
    dir is readable by us (the same account); None otherwise."""
    try:
        record = json.loads((state_dir / SERVER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        token = (state_dir / ADMIN_TOKEN_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        token = None
    if not isinstance(record, dict):
        return None
    fingerprint = record.get("fingerprint")
    return LocalServer(
        token=token,
        fingerprint=fingerprint if isinstance(fingerprint, str) else None,
        insecure=record.get("insecure") is True,
    )
