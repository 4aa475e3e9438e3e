"""Tests for dcproto.users: the named-server (users.toml) store."""

from __future__ import annotations

import os
import stat
import sys
import tomllib
from pathlib import Path

import pytest

from dcproto import users
from dcproto.errors import DcprotoError, UnknownUserError, UsageError
from dcproto.users import (
    DEFAULT_PORT,
    User,
    add_user,
    config_path,
    get_user,
    load_users,
    parse_address,
    remove_user,
    set_device_id,
)


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "config" / "nested"
    monkeypatch.setenv("DCPROTO_CONFIG_DIR", str(directory))
    return directory


def test_config_path_uses_env(config_dir: Path) -> None:
    assert config_path() == config_dir / "users.toml"


def test_config_path_falls_back_to_platformdirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DCPROTO_CONFIG_DIR")
    monkeypatch.setattr(users.platformdirs, "user_config_dir", lambda app: f"/cfg/{app}")
    assert config_path() == Path("/cfg/dcproto/users.toml")


PIN = "sha256:" + "ab" * 32


def test_missing_file_means_no_users(config_dir: Path) -> None:
    assert load_users() == {}
    assert not config_dir.exists()


def test_round_trip_add_list_remove(config_dir: Path) -> None:
    home = User(name="home", host="127.0.0.1", port=9000, token="s3cret", fingerprint=PIN)
    lab = User(name="lab.gpu-1_a", host="::1")
    add_user(home)
    add_user(lab)

    loaded = load_users()
    assert list(loaded) == ["home", "lab.gpu-1_a"]
    assert loaded["home"] == home
    assert loaded["lab.gpu-1_a"] == lab
    assert loaded["lab.gpu-1_a"].port == DEFAULT_PORT
    assert get_user("home") == home

    with (config_dir / "users.toml").open("rb") as fh:
        raw = tomllib.load(fh)
    assert raw["users"]["home"] == {
        "host": "127.0.0.1",
        "port": 9000,
        "token": "s3cret",
        "fingerprint": PIN,
    }
    assert raw["users"]["lab.gpu-1_a"] == {"host": "::1", "port": DEFAULT_PORT}

    remove_user("home")
    assert list(load_users()) == ["lab.gpu-1_a"]
    remove_user("lab.gpu-1_a")
    assert load_users() == {}


def test_file_format_matches_documented_layout(config_dir: Path) -> None:
    add_user(User(name="home", host="127.0.0.1", token="x", insecure=True, device_id="dev-1"))
    text = (config_dir / "users.toml").read_text(encoding="utf-8")
    assert (
        '[users.home]\nhost = "127.0.0.1"\nport = 8080\ntoken = "x"\ninsecure = true\n'
        'device_id = "dev-1"\n' in text
    )


def test_explicit_path_argument(tmp_path: Path, config_dir: Path) -> None:
    path = tmp_path / "elsewhere" / "u.toml"
    add_user(User(name="a", host="h"), path)
    assert list(load_users(path)) == ["a"]
    assert get_user("a", path).host == "h"
    set_device_id("a", "d", path)
    assert get_user("a", path).device_id == "d"
    remove_user("a", path)
    assert load_users(path) == {}
    assert not (config_dir / "users.toml").exists()


def test_replace(config_dir: Path) -> None:
    add_user(User(name="a", host="h1", port=1))
    add_user(User(name="b", host="h2"))
    add_user(User(name="a", host="h3", port=2, token="new"))
    loaded = load_users()
    assert list(loaded) == ["a", "b"]  # replacing keeps the position
    assert loaded["a"] == User(name="a", host="h3", port=2, token="new")

    with pytest.raises(UsageError, match="already exists"):
        add_user(User(name="a", host="h4"), replace=False)
    assert get_user("a").host == "h3"
    add_user(User(name="c", host="h5"), replace=False)
    assert get_user("c").host == "h5"


def test_set_device_id(config_dir: Path) -> None:
    add_user(User(name="home", host="h", token="s"))
    set_device_id("home", "dev-42")
    assert get_user("home") == User(name="home", host="h", token="s", device_id="dev-42")
    set_device_id("home", "dev-43")
    assert get_user("home").device_id == "dev-43"
    with pytest.raises(UnknownUserError):
        set_device_id("nope", "x")


@pytest.mark.parametrize(
    "token",
    [
        'with "quotes"',
        "back\\slash\\",
        '\\"',
        "unicode: héllo ✓ 日本 🐍",
        "ctrl: \x00\x01\x1f\x7f\t\n\r\b\f end",
        "'''\"\"\"",
        "",
    ],
)
def test_token_survives_round_trip(token: str) -> None:
    add_user(User(name="s", host="h", token=token, device_id=token + "!"))
    user = get_user("s")
    assert user.token == token
    assert user.device_id == token + "!"


def test_lone_surrogate_is_rejected() -> None:
    with pytest.raises(UsageError, match="surrogate"):
        add_user(User(name="s", host="h", token="\ud800"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_file_mode_is_0600(config_dir: Path) -> None:
    path = config_dir / "users.toml"
    add_user(User(name="a", host="h", token="s"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)
    set_device_id("a", "d")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_no_temp_files_left_behind(config_dir: Path) -> None:
    add_user(User(name="a", host="h"))
    add_user(User(name="b", host="h"))
    remove_user("a")
    assert sorted(p.name for p in config_dir.iterdir()) == ["users.toml"]


def test_corrupt_file(config_dir: Path) -> None:
    config_dir.mkdir(parents=True)
    path = config_dir / "users.toml"
    path.write_text("[users.home\nhost = 1\n", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_users()
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, tomllib.TOMLDecodeError)
    assert str(info.value.__cause__) in str(info.value)
    with pytest.raises(UsageError):
        add_user(User(name="a", host="h"))
    assert path.read_text(encoding="utf-8").startswith("[users.home\n")  # left untouched


def test_file_not_utf8(config_dir: Path) -> None:
    config_dir.mkdir(parents=True)
    (config_dir / "users.toml").write_bytes(b'[users.a]\nhost = "\xff"\n')
    with pytest.raises(UsageError, match=r"users\.toml"):
        load_users()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("users = 3\n", "must be a table"),
        ("[users]\nhome = 3\n", "must be a table"),
        ("[users.home]\nport = 1\n", "no host"),
        ('[users.home]\nhost = "h"\nport = "80"\n', "invalid port"),
        ('[users.home]\nhost = "h"\nport = 70000\n', "invalid port"),
        ('[users.home]\nhost = "h"\nsecert = "x"\n', "unknown keys: secert"),
        ('[users.home]\nhost = "h"\ntoken = 5\n', "token"),
        ('[users.home]\nhost = "h"\nsecret = "x"\n', "from before tokens"),
        ('[users.home]\nhost = "h"\ninsecure = "yes"\n', "insecure"),
        ('[users."bad name"]\nhost = "h"\n', "invalid user name"),
    ],
)
def test_invalid_file_contents(config_dir: Path, content: str, match: str) -> None:
    config_dir.mkdir(parents=True)
    (config_dir / "users.toml").write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=match) as info:
        load_users()
    assert "users.toml" in str(info.value)


def test_port_defaults_when_missing_from_file(config_dir: Path) -> None:
    config_dir.mkdir(parents=True)
    (config_dir / "users.toml").write_text('[users.home]\nhost = "h"\n', encoding="utf-8")
    assert get_user("home").port == DEFAULT_PORT


def test_unknown_user_message_lists_names_and_hint() -> None:
    add_user(User(name="alpha", host="h"))
    add_user(User(name="beta", host="h"))
    with pytest.raises(UnknownUserError) as info:
        get_user("gamma")
    message = str(info.value)
    assert "'gamma'" in message
    assert "alpha, beta" in message
    assert "join line" in message
    assert isinstance(info.value, UsageError)
    assert isinstance(info.value, DcprotoError)


def test_unknown_user_with_no_users() -> None:
    with pytest.raises(UnknownUserError, match="no users are configured") as info:
        get_user("x")
    assert "dcproto users add" in str(info.value)
    with pytest.raises(UnknownUserError):
        remove_user("x")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", ("example.com", DEFAULT_PORT)),
        ("example.com:9000", ("example.com", 9000)),
        ("  10.0.0.1:1  ", ("10.0.0.1", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:8081", ("::1", 8081)),
        ("[::1]", ("::1", DEFAULT_PORT)),
        ("[fe80::1%eth0]:7", ("fe80::1%eth0", 7)),
        ("::1", ("::1", DEFAULT_PORT)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


def test_parse_address_default_port() -> None:
    assert parse_address("h", default_port=1234) == ("h", 1234)
    assert parse_address("[::1]", default_port=1234) == ("::1", 1234)
    assert parse_address("h:5", default_port=1234) == ("h", 5)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty host"),
        ("   ", "empty host"),
        (":8080", "empty host"),
        ("[]:8080", "empty host"),
        ("[]", "empty host"),
        ("host:", "not an integer"),
        ("host:abc", "not an integer"),
        ("host:+80", "not an integer"),
        ("host:-1", "not an integer"),
        ("host:8_0", "not an integer"),
        ("host:٨٠", "not an integer"),
        ("[::1]:x", "not an integer"),
        ("host:0", "not in 1..65535"),
        ("host:65536", "not in 1..65535"),
        ("[::1]:99999", "not in 1..65535"),
        ("[::1", "missing ']'"),
        ("[::1]8080", "unexpected"),
    ],
)
def test_parse_address_errors(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse_address(text)


def test_address_property_round_trips() -> None:
    assert User(name="a", host="127.0.0.1", port=9).address == "127.0.0.1:9"
    assert User(name="a", host="example.com").address == "example.com:8080"
    v6 = User(name="a", host="::1", port=9)
    assert v6.address == "[::1]:9"
    assert parse_address(v6.address) == ("::1", 9)


@pytest.mark.parametrize(
    "name",
    ["", "has space", "a/b", "a:b", 'q"uote', "ünï", "-flag", ".", "..", "a\n", "a]b", "x=y"],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(UsageError, match="invalid user name"):
        User(name=name, host="h")


@pytest.mark.parametrize("name", ["a", "A9", "home", "my.server", "x-1_y.z", "9lives"])
def test_valid_names(name: str) -> None:
    add_user(User(name=name, host="h"))
    assert get_user(name).name == name


@pytest.mark.parametrize("port", [0, 65536, -1, True, "80", 80.0])
def test_invalid_user_port(port: object) -> None:
    with pytest.raises(UsageError, match="invalid port"):
        User(name="a", host="h", port=port)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["", " h", "h "])
def test_invalid_user_host(host: str) -> None:
    with pytest.raises(UsageError, match="invalid host"):
        User(name="a", host=host)


def test_user_is_frozen() -> None:
    user = User(name="a", host="h")
    with pytest.raises(AttributeError):
        user.host = "x"  # type: ignore[misc]
