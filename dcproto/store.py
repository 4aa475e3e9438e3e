"""Durable server state in SQLite (WAL mode): the secret, registered devices, project history."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

import platformdirs

SCHEMA_VERSION = 1
SECRET_FILE = "secret"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS projects (
    project_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    creator_device TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,
    stats TEXT
);
"""


def default_state_dir() -> Path:
    return Path(platformdirs.user_data_dir("dcproto")) / "server"


def load_or_create_secret(state_dir: Path) -> str:
    """The server's secret, made on first start and kept (mode 0600) in the state dir."""
    path = state_dir / SECRET_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")
    return secret


def read_secret(state_dir: Path) -> str | None:
    """The secret of a server on this machine, if its state dir is readable by us."""
    try:
        return (state_dir / SECRET_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


class Store:
    """Owns one SQLite database. Calls are short and synchronous; the server batches them."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "state.sqlite3"
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}; this dcproto knows {SCHEMA_VERSION}"
            )
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def known_device(self, device_id: str) -> bool:
        row = self._db.execute("SELECT 1 FROM devices WHERE device_id=?", (device_id,)).fetchone()
        return row is not None

    def device_seen(self, device_id: str, name: str, role: str) -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO devices(device_id, name, role, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
            "name=excluded.name, last_seen=excluded.last_seen",
            (device_id, name, role, now, now),
        )

    def project_submitted(self, project_id: str, name: str, creator_device: str) -> None:
        self._db.execute(
            "INSERT INTO projects(project_id, name, creator_device, submitted_at, status) "
            "VALUES (?, ?, ?, ?, 'running')",
            (project_id, name, creator_device, time.time()),
        )

    def project_finished(self, project_id: str, status: str, stats: dict[str, Any]) -> None:
        self._db.execute(
            "UPDATE projects SET status=?, finished_at=?, stats=? WHERE project_id=?",
            (status, time.time(), json.dumps(stats), project_id),
        )

    def projects(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT project_id, name, status, submitted_at, finished_at FROM projects "
            "ORDER BY submitted_at"
        ).fetchall()
        keys = ("project_id", "name", "status", "submitted_at", "finished_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]
