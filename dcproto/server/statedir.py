"""The server's state dir: private modes, the one-server lock, and the record of where the
server can be reached (read by ``dcproto tokens add`` to print join lines)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..paths import SERVER_FILE
from .store import DB_FILE, StateError

LOCK_FILE = "server.lock"
PRIVATE_FILES = (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm")


def prepare(state_dir: Path) -> None:
    """Create ``state_dir`` if needed and make it and the database files private (0700 and
    0600, whatever the umask): they hold everyone's code, data and token verifiers."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state_dir, 0o700)
        for name in PRIVATE_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(state_dir / name, 0o600)
    except OSError as exc:
        raise StateError(f"cannot use state dir {state_dir}: {exc}") from exc


class StateDirLock:
    """An exclusive lock on a state dir, held for the server's life: a second server on the
    same dir refuses to start instead of corrupting the first one's state. The kernel drops
    the lock when the process dies, so a killed server never leaves it behind."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Raises StateError naming the other server's pid when the dir is taken."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot lock {self.path}: {exc}") from exc
        handle = os.fdopen(fd, "r+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = handle.read().strip() or "?"
            handle.close()
            raise StateError(
                f"another dcproto server (pid {other}) is using state dir {self.path.parent}; "
                "stop it first, or give this one another --state-dir"
            ) from None
        except OSError as exc:
            handle.close()
            raise StateError(f"cannot lock {self.path}: {exc}") from exc
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass(frozen=True)
class ServerRecord:
    """Where clients reach the server and how they trust it."""

    address: str  # HOST:PORT as other machines should use it
    fingerprint: str | None  # of the TLS certificate; None on plain TCP
    insecure: bool

    def join_line(self, name: str, token: str) -> str:
        """The command that adds this server as user ``name`` with ``token``."""
        words = ["dcproto", "users", "add", name, self.address, "--token", token]
        if self.fingerprint is not None:
            words += ["--fingerprint", self.fingerprint]
        if self.insecure:
            words.append("--insecure")
        return shlex.join(words)


def write_record(state_dir: Path, record: ServerRecord) -> None:
    data: dict[str, Any] = {
        "address": record.address,
        "fingerprint": record.fingerprint,
        "insecure": record.insecure,
    }
    path = state_dir / SERVER_FILE
    tmp = path.with_name(f".{SERVER_FILE}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc}") from exc


def read_record(state_dir: Path) -> ServerRecord | None:
    """The record of the last server started on ``state_dir``; None if there is none."""
    try:
        data = json.loads((state_dir / SERVER_FILE).read_text(encoding="utf-8"))
        return ServerRecord(
            address=str(data["address"]),
            fingerprint=None if data.get("fingerprint") is None else str(data["fingerprint"]),
            insecure=bool(data.get("insecure", False)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
