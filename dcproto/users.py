"""Named servers ("users"): alias -> address, token, certificate pin and device id, kept in
``users.toml`` (mode 0600: it holds tokens)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import tempfile
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from .connection import Endpoint
from .errors import ConfigurationError, UnknownUserError, UsageError

__all__ = [
    "CONFIG_DIR_ENV",
    "DEFAULT_PORT",
    "USERS_FILE",
    "User",
    "add_user",
    "closest_name",
    "config_path",
    "get_user",
    "load_users",
    "parse_address",
    "remove_user",
    "set_device_id",
]

DEFAULT_PORT = 8080
CONFIG_DIR_ENV = "DCPROTO_CONFIG_DIR"
USERS_FILE = "users.toml"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_PORT_RE = re.compile(r"[0-9]+")
_FIELDS = ("host", "port", "token", "fingerprint", "insecure", "device_id")
_ADD_HINT = "add one with the join line its server's admin gives you (dcproto users add ...)"


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid user name {name!r}: use letters, digits, '-', '_' and '.' only, "
            "starting with a letter or digit"
        )


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"invalid port {port!r}: must be an integer from 1 to 65535")
    return port


@dataclass(frozen=True, kw_only=True)
class User:
    """A named server: where it is, how to trust it (a pinned certificate fingerprint, else
    the CA chain; ``insecure``: plain TCP), the token to present and our device id there."""

    name: str
    host: str
    port: int = DEFAULT_PORT
    token: str | None = field(default=None, repr=False)
    fingerprint: str | None = None
    insecure: bool = False
    device_id: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not isinstance(self.host, str) or not self.host or self.host != self.host.strip():
            raise UsageError(f"invalid host {self.host!r} for user {self.name!r}")
        _check_port(self.port)
        for name in ("token", "fingerprint", "device_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise UsageError(f"{name} of user {self.name!r} must be a string")
        if not isinstance(self.insecure, bool):
            raise UsageError(f"insecure of user {self.name!r} must be true or false")

    def endpoint(self) -> Endpoint:
        """How to connect; :class:`ConfigurationError` if no token is kept for this user."""
        if not self.token:
            raise ConfigurationError(
                f"user {self.name!r} has no token; add it again with its join line "
                "(dcproto users add NAME HOST:PORT --token ...)"
            )
        return Endpoint(
            host=self.host,
            port=self.port,
            token=self.token,
            fingerprint=self.fingerprint,
            insecure=self.insecure,
        )

    @property
    def address(self) -> str:
        """``host:port``, with an IPv6 host in brackets so :func:`parse_address` reads it back."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` into ``(host, port)``.

    A bare IPv6 address without brackets (``::1``) is taken as a host with the default port.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"invalid address {text!r}: missing ']' after IPv6 host")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UsageError(f"invalid address {text!r}: unexpected {rest!r} after ']'")
        port_text: str | None = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, None
    if not host:
        raise UsageError(f"invalid address {text!r}: empty host")
    if port_text is None:
        return host, default_port
    if not _PORT_RE.fullmatch(port_text):
        raise UsageError(f"invalid address {text!r}: port {port_text!r} is not an integer")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise UsageError(f"invalid address {text!r}: port {port} is not in 1..65535")
    return host, port


def config_path() -> Path:
    """The users file: ``$DCPROTO_CONFIG_DIR/users.toml`` or the platform config dir's."""
    env = os.environ.get(CONFIG_DIR_ENV)
    base = Path(env).expanduser() if env else Path(platformdirs.user_config_dir("dcproto"))
    return base / USERS_FILE


def _user_from_table(name: str, table: object, path: Path) -> User:
    if not isinstance(table, Mapping):
        raise UsageError(f"{path}: [users.{name}] must be a table")
    unknown = sorted(set(table) - set(_FIELDS) - {"secret"})
    if unknown:
        raise UsageError(f"{path}: [users.{name}] has unknown keys: {', '.join(unknown)}")
    if "host" not in table:
        raise UsageError(f"{path}: [users.{name}] has no host")
    if "secret" in table:
        raise UsageError(
            f"{path}: [users.{name}] holds a secret from before tokens; add it again with "
            "the join line its server's admin gives you (dcproto users add ... --token ...)"
        )
    try:
        return User(
            name=name,
            host=table["host"],
            port=table.get("port", DEFAULT_PORT),
            token=table.get("token"),
            fingerprint=table.get("fingerprint"),
            insecure=table.get("insecure", False),
            device_id=table.get("device_id"),
        )
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc


_parsed: dict[Path, tuple[tuple[int, int, int], dict[str, User]]] = {}


def load_users(path: Path | None = None) -> dict[str, User]:
    """All users in the file, in file order; a missing file means no users."""
    path = config_path() if path is None else path
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read users file {path}: {exc}") from exc
    # every Project() looks its user up: parse the file again only when it was rewritten
    # (writes replace it, so the inode changes too)
    version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    cached = _parsed.get(path)
    if cached is not None and cached[0] == version:
        return dict(cached[1])
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"cannot parse users file {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot parse users file {path}: not valid UTF-8 ({exc})") from exc
    except OSError as exc:
        raise UsageError(f"cannot read users file {path}: {exc}") from exc
    users = data.get("users", {})
    if not isinstance(users, Mapping):
        raise UsageError(f"{path}: 'users' must be a table")
    parsed = {name: _user_from_table(name, table, path) for name, table in users.items()}
    _parsed[path] = (version, parsed)
    return dict(parsed)


def get_user(name: str, path: Path | None = None) -> User:
    """The user called ``name``; :class:`UnknownUserError` if there is none."""
    path = config_path() if path is None else path
    users = load_users(path)
    try:
        return users[name]
    except KeyError:
        raise _unknown(name, users, path) from None


def add_user(user: User, path: Path | None = None, *, replace: bool = True) -> None:
    """Store ``user``, overwriting one of the same name unless ``replace`` is false."""
    path = config_path() if path is None else path
    users: dict[str, User | None] = (
        _users_for_change(user.name, path) if replace else dict(load_users(path))
    )
    if not replace and user.name in users:
        raise UsageError(f"user {user.name!r} already exists in {path}")
    users[user.name] = user  # a replaced user keeps its place
    _write_users(_present(users), path)


def remove_user(name: str, path: Path | None = None) -> None:
    """Delete the user called ``name``; :class:`UnknownUserError` if there is none."""
    path = config_path() if path is None else path
    users = _users_for_change(name, path)
    if name not in users:
        raise _unknown(name, _present(users), path)
    del users[name]
    _write_users(_present(users), path)


def _present(users: Mapping[str, User | None]) -> dict[str, User]:
    return {key: user for key, user in users.items() if user is not None}


def _users_for_change(name: str, path: Path) -> dict[str, User | None]:
    """The users in the file, in file order, about to have ``name`` replaced or removed. When
    only the entry of ``name`` cannot be loaded (say, a secret from before tokens) it is None
    here instead of an error: replacing or removing it works, as the error about it advises."""
    try:
        return dict(load_users(path))
    except UsageError as error:
        try:
            with path.open("rb") as fh:
                tables = tomllib.load(fh).get("users")
        except (OSError, ValueError):
            raise error from None
        if not isinstance(tables, Mapping) or name not in tables:
            raise
        try:
            return {
                key: None if key == name else _user_from_table(key, table, path)
                for key, table in tables.items()
            }
        except UsageError:
            raise error from None


def set_device_id(name: str, device_id: str, path: Path | None = None) -> None:
    """Record the device id a worker was given by the server of user ``name``."""
    path = config_path() if path is None else path
    users = load_users(path)
    if name not in users:
        raise _unknown(name, users, path)
    users[name] = dataclasses.replace(users[name], device_id=device_id)
    _write_users(users, path)


def closest_name(name: str, names: Iterable[str]) -> str | None:
    """The known name ``name`` is most likely a typo of (difflib), or None."""
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown(name: str, users: Mapping[str, User], path: Path) -> UnknownUserError:
    known = f"known users: {', '.join(users)}" if users else "no users are configured"
    close = closest_name(name, users)
    guess = f"did you mean {close!r}? " if close else ""
    return UnknownUserError(f"no user named {name!r}; {guess}({known}; file {path}); {_ADD_HINT}")


# -- writing -------------------------------------------------------------------------------

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        cp = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif cp < 0x20 or cp == 0x7F:
            out.append(f"\\u{cp:04X}")
        elif 0xD800 <= cp <= 0xDFFF:
            raise UsageError(f"cannot store {value!r}: it contains a lone surrogate")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.fullmatch(key) else _toml_string(key)


def _dump_users(users: Mapping[str, User]) -> str:
    lines = ["# dcproto named servers (users). Holds tokens: keep this file private."]
    for user in users.values():
        lines += ["", f"[users.{_toml_key(user.name)}]"]
        for name in _FIELDS:
            value = getattr(user, name)
            if value is not None and not (name == "insecure" and value is False):
                lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _write_users(users: Mapping[str, User], path: Path) -> None:
    """Write atomically (temp file in the same dir, then ``os.replace``) with mode 0600."""
    data = _dump_users(users).encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UsageError(f"cannot write users file {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o600)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write users file {path}: {exc}") from exc
        raise
