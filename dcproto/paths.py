"""Where things live that more than one role must agree on: the server's state dir, and the
environment variable that tells a task where to write its extra files."""

from __future__ import annotations

from pathlib import Path

import platformdirs

SECRET_FILE = "secret"
OUTPUT_DIR_ENV = "DCPROTO_OUTPUT_DIR"


def default_state_dir() -> Path:
    return Path(platformdirs.user_data_dir("dcproto")) / "server"


def read_secret(state_dir: Path) -> str | None:
    """The secret of a server on this machine, if its state dir is readable by us."""
    try:
        return (state_dir / SECRET_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None
