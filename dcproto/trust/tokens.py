"""Per-person tokens with roles: make them, keep their verifiers, and check proofs of possession.

A token is ``NAME.SECRET`` (``SECRET`` = base64url of 32 random bytes, no padding). It is shown
once; the server keeps only a SCRAM-style verifier from which one cannot log in:

* ``client_key = HMAC-SHA256(key=secret, msg=b"dcproto client key\\x00" + name)``
  (the name salts it);
* ``stored_key = SHA-256(client_key)`` -- what the server stores in ``tokens.json``.

In the handshake the server sends a nonce; the client answers with its name and
``proof = client_key XOR HMAC-SHA256(key=stored_key, msg=auth_message)``, where the auth message
binds the nonce, the requested role, the name and the channel (the TLS server certificate). The
server recovers ``client_key`` from the proof and checks that its SHA-256 equals ``stored_key``.
Knowing ``stored_key`` alone (e.g. from a stolen ``tokens.json``) does not let anyone log in.

:class:`TokenStore` keeps the records of one server in ``STATE_DIR/tokens.json`` (mode 0600).
Every read-modify-write holds an exclusive ``flock`` on ``STATE_DIR/tokens.lock`` and re-reads the
file inside it, and every write is atomic (temp file, fsync, ``os.replace``), so concurrent
``dcproto tokens add`` processes and a running server never lose each other's changes.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dcproto.errors import DcprotoError, UsageError
from dcproto.paths import ADMIN_TOKEN_FILE

__all__ = [
    "ADMIN_TOKEN_FILE",
    "NAME_RE",
    "ROLES",
    "TOKENS_FILE",
    "TOKEN_ENV",
    "TokenRecord",
    "TokenStore",
    "auth_message",
    "client_key",
    "make_proof",
    "new_token",
    "parse_token",
    "stored_key",
    "verify_proof",
]

ROLES = ("worker", "creator", "admin")  # in increasing power
TOKENS_FILE = "tokens.json"  # in the server's state dir
LOCK_FILE = "tokens.lock"
TOKEN_ENV = "DCPROTO_TOKEN"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

_SECRET_BYTES = 32
_KEY_BYTES = hashlib.sha256().digest_size
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes in unpadded base64url
_CLIENT_KEY_LABEL = b"dcproto client key\x00"
_AUTH_LABEL = b"dcproto-auth-v1"
_FILE_VERSION = 1
_NOT_A_TOKEN = "not a dcproto token: expected NAME.SECRET as printed by 'dcproto tokens add'"

log = logging.getLogger("dcproto.trust")


# --------------------------------------------------------------------------- tokens and proofs


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid token name {name!r}: use 1 to 64 letters, digits, '-' and '_', "
            "starting with a letter or digit"
        )
    return name


def _check_role(role: object) -> str:
    if not isinstance(role, str) or role not in ROLES:
        raise UsageError(f"invalid role {role!r}: must be one of {', '.join(ROLES)}")
    return role


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def new_token(name: str) -> str:
    """A new token ``NAME.SECRET`` for ``name`` (32 random bytes, base64url without padding)."""
    _check_name(name)
    return f"{name}.{_b64(secrets.token_bytes(_SECRET_BYTES))}"


def parse_token(token: str) -> tuple[str, bytes]:
    """Split a token into its name and its 32-byte secret; :class:`UsageError` if malformed.

    The error message never repeats the token, so a secret cannot leak into logs.
    """
    if not isinstance(token, str):
        raise UsageError(_NOT_A_TOKEN)
    name, sep, text = token.strip().rpartition(".")
    if not sep or not NAME_RE.fullmatch(name) or not _SECRET_RE.fullmatch(text):
        raise UsageError(_NOT_A_TOKEN)
    secret = base64.urlsafe_b64decode(text + "=")
    if len(secret) != _SECRET_BYTES or _b64(secret) != text:
        raise UsageError(_NOT_A_TOKEN)
    return name, secret


def client_key(name: str, secret: bytes) -> bytes:
    """``HMAC-SHA256(key=secret, msg=label + name)``: what the client proves it knows."""
    return hmac.digest(secret, _CLIENT_KEY_LABEL + name.encode("utf-8"), "sha256")


def stored_key(client_key: bytes) -> bytes:
    """``SHA-256(client_key)``: the verifier the server stores (one cannot log in with it)."""
    return hashlib.sha256(client_key).digest()


def auth_message(*, nonce: bytes, role: str, identity: str, channel: bytes) -> bytes:
    """The bytes a proof signs: a label, then nonce, role, identity and channel, each
    length-prefixed (4 bytes, big-endian) so no two different inputs encode alike."""
    parts = [_AUTH_LABEL]
    for value in (nonce, role.encode("utf-8"), identity.encode("utf-8"), channel):
        parts.append(len(value).to_bytes(4, "big"))
        parts.append(bytes(value))
    return b"".join(parts)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def make_proof(token: str, *, nonce: bytes, role: str, channel: bytes) -> tuple[str, bytes]:
    """The client's answer to a server nonce: ``(identity, proof)`` for ``token``."""
    name, secret = parse_token(token)
    ck = client_key(name, secret)
    message = auth_message(nonce=nonce, role=role, identity=name, channel=channel)
    signature = hmac.digest(stored_key(ck), message, "sha256")
    return name, _xor(ck, signature)


def verify_proof(
    stored: bytes, *, identity: str, proof: bytes, nonce: bytes, role: str, channel: bytes
) -> bool:
    """Whether ``proof`` shows knowledge of the client key behind ``stored``. Never raises for
    a malformed proof (wrong type or length): it is simply not valid."""
    if not isinstance(proof, bytes | bytearray) or len(proof) != _KEY_BYTES:
        return False
    if not isinstance(stored, bytes | bytearray) or len(stored) != _KEY_BYTES:
        return False
    try:
        message = auth_message(nonce=nonce, role=role, identity=identity, channel=channel)
    except (UnicodeError, OverflowError, AttributeError, TypeError):
        return False
    ck = _xor(bytes(proof), hmac.digest(bytes(stored), message, "sha256"))
    return hmac.compare_digest(hashlib.sha256(ck).digest(), bytes(stored))


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class TokenRecord:
    """What the server keeps about one token: never the secret, only its verifier."""

    name: str
    role: str
    stored_key: bytes = field(repr=False)
    created_at: float  # time.time()


_Signature = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _parse_file(data: bytes, path: Path) -> dict[str, TokenRecord]:
    """The records of a ``tokens.json``; :class:`DcprotoError` naming ``path`` if invalid."""

    def bad(why: str) -> DcprotoError:
        return DcprotoError(f"corrupt tokens file {path}: {why}")

    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise bad("expected a JSON object")
    if doc.get("version") != _FILE_VERSION:
        raise bad(f"unsupported version {doc.get('version')!r} (expected {_FILE_VERSION})")
    entries = doc.get("tokens")
    if not isinstance(entries, list):
        raise bad("'tokens' must be a list")
    records: dict[str, TokenRecord] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise bad(f"token #{i} is not an object")
        name, role, key_hex, created = (
            entry.get("name"),
            entry.get("role"),
            entry.get("stored_key"),
            entry.get("created_at"),
        )
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise bad(f"token #{i} has an invalid name {name!r}")
        if name in records:
            raise bad(f"token name {name!r} appears twice")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"token {name!r} has an invalid role {role!r}")
        try:
            key = bytes.fromhex(key_hex) if isinstance(key_hex, str) else b""
        except ValueError:
            key = b""
        if len(key) != _KEY_BYTES:
            raise bad(f"token {name!r} has an invalid stored_key")
        if (
            isinstance(created, bool)
            or not isinstance(created, int | float)
            or not math.isfinite(created)
        ):
            raise bad(f"token {name!r} has an invalid created_at")
        records[name] = TokenRecord(name, role, key, float(created))
    return records


def _dump_file(records: dict[str, TokenRecord]) -> bytes:
    doc = {
        "version": _FILE_VERSION,
        "tokens": [
            {
                "name": r.name,
                "role": r.role,
                "stored_key": r.stored_key.hex(),
                "created_at": r.created_at,
            }
            for r in sorted(records.values(), key=lambda r: r.name)
        ],
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a 0600 temp file in the same dir, fsync, ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.chmod(path, 0o600)
    except OSError as exc:
        raise DcprotoError(f"cannot write {path}: {exc}") from exc
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class TokenStore:
    """The tokens of one server: a JSON file in its state dir (or memory only when
    ``state_dir`` is None)."""

    def __init__(self, state_dir: Path | None) -> None:
        self._dir = Path(state_dir) if state_dir is not None else None
        self._records: dict[str, TokenRecord] = {}
        self._signature: _Signature | None = None
        if self._dir is not None:
            self._records, self._signature = self._read()

    @property
    def path(self) -> Path | None:
        """The ``tokens.json`` file, or ``None`` in memory mode."""
        return self._dir / TOKENS_FILE if self._dir is not None else None

    # ----------------------------------------------------------------- queries

    def records(self) -> list[TokenRecord]:
        """All records as last read or written, sorted by name."""
        return sorted(self._records.values(), key=lambda r: r.name)

    def get(self, name: str) -> TokenRecord | None:
        """The record named ``name``, or ``None``."""
        return self._records.get(name)

    # ----------------------------------------------------------------- changes

    def add(self, name: str, role: str) -> str:
        """Add a token for ``name`` with ``role`` and return it (the only time it is shown)."""
        _check_name(name)
        _check_role(role)
        with self._transaction() as records:
            if name in records:
                raise UsageError(f"a token named {name!r} already exists")
            return self._add_to(records, name, role)

    def revoke(self, name: str) -> bool:
        """Remove the token named ``name``; ``False`` if there is none."""
        with self._transaction() as records:
            if name not in records:
                return False
            del records[name]
            return True

    def ensure_admin(self) -> str | None:
        """If there are no tokens at all, add an ``admin`` token (role admin), write it to
        ``STATE_DIR/admin.token`` (mode 0600) and return it; otherwise return ``None``."""
        with self._transaction() as records:
            if records:
                return None
            token = self._add_to(records, "admin", "admin")
            if self._dir is not None:
                # Before tokens.json: if we die in between, the next call makes a new one.
                _write_atomic(self._dir / ADMIN_TOKEN_FILE, (token + "\n").encode("ascii"))
            return token

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since the last read or write (one ``os.stat`` when it
        did not); ``True`` if the set of records changed. A corrupt or unreadable file keeps the
        last good records (with a warning) and returns ``False``."""
        path = self.path
        if path is None:
            return False
        try:
            signature: _Signature | None = _signature(os.stat(path))
        except FileNotFoundError:
            signature = None
        except OSError as exc:
            log.warning("cannot check tokens file %s: %s; keeping the previous tokens", path, exc)
            return False
        if signature == self._signature:
            return False
        try:
            records, signature = self._read()
        except DcprotoError as exc:
            log.warning("%s; keeping the previous tokens", exc)
            # Remember this version so a broken file is reported once, not on every check.
            self._signature = signature
            return False
        self._signature = signature
        if records == self._records:
            return False
        self._records = records
        return True

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _add_to(records: dict[str, TokenRecord], name: str, role: str) -> str:
        token = new_token(name)
        _, secret = parse_token(token)
        records[name] = TokenRecord(name, role, stored_key(client_key(name, secret)), time.time())
        return token

    def _read(self) -> tuple[dict[str, TokenRecord], _Signature | None]:
        """The records in the file and the file's signature; no file means no tokens."""
        path = self.path
        assert path is not None
        try:
            with open(path, "rb") as fh:
                signature = _signature(os.fstat(fh.fileno()))
                data = fh.read()
        except FileNotFoundError:
            return {}, None
        except OSError as exc:
            raise DcprotoError(f"cannot read tokens file {path}: {exc}") from exc
        return _parse_file(data, path), signature

    def _make_dir(self) -> None:
        assert self._dir is not None
        try:
            if self._dir.is_dir():
                return
            self._dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(self._dir, 0o700)
            except FileExistsError:
                return
            os.chmod(self._dir, 0o700)
        except OSError as exc:
            raise DcprotoError(f"cannot create state dir {self._dir}: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict[str, TokenRecord]]:
        """Yield the current records to change in place; write them back if changed.

        On disk: under an exclusive lock on ``tokens.lock``, re-read the file first.
        """
        if self._dir is None:
            records = dict(self._records)
            yield records
            self._records = records
            return
        self._make_dir()
        lock_path = self._dir / LOCK_FILE
        try:
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DcprotoError(f"cannot open lock file {lock_path}: {exc}") from exc
        try:
            try:
                os.fchmod(lock_fd, 0o600)
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise DcprotoError(f"cannot lock {lock_path}: {exc}") from exc
            current, signature = self._read()
            self._records, self._signature = current, signature
            records = dict(current)
            yield records
            if records != current:
                path = self.path
                assert path is not None
                _write_atomic(path, _dump_file(records))
                self._records = records
                try:
                    self._signature = _signature(os.stat(path))
                except OSError:
                    self._signature = None  # forces a re-read on the next check
        finally:
            os.close(lock_fd)  # releases the flock


def read_token_file(path: Path) -> str:
    """The token kept in ``path`` (surrounding whitespace ignored); UsageError if the file
    cannot be read or does not hold a token."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read a token from {path}: {exc}") from exc
    parse_token(text)
    return text
