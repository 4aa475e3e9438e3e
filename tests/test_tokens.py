"""Tests of dcproto.trust.tokens: token format, proofs, and the on-disk token store."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import multiprocessing
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcproto.errors import DcprotoError, UsageError
from dcproto.trust.tokens import (
    ADMIN_TOKEN_FILE,
    NAME_RE,
    ROLES,
    TOKEN_ENV,
    TOKENS_FILE,
    TokenRecord,
    TokenStore,
    auth_message,
    client_key,
    make_proof,
    new_token,
    parse_token,
    stored_key,
    verify_proof,
)

NONCE = b"n" * 32
CHANNEL = b"c" * 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _stored_for(token: str) -> bytes:
    name, secret = parse_token(token)
    return stored_key(client_key(name, secret))


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def zero_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- token format


def test_constants() -> None:
    assert ROLES == ("worker", "creator", "admin")
    assert TOKENS_FILE == "tokens.json"
    assert ADMIN_TOKEN_FILE == "admin.token"
    assert TOKEN_ENV == "DCPROTO_TOKEN"
    assert NAME_RE.fullmatch("a" * 64) and not NAME_RE.fullmatch("a" * 65)


def test_new_parse_round_trip() -> None:
    token = new_token("alice-1_x")
    name, secret = parse_token(token)
    assert name == "alice-1_x"
    assert len(secret) == 32
    assert token == f"alice-1_x.{_b64(secret)}"
    assert "=" not in token
    assert parse_token(f"  {token}\n") == (name, secret)
    assert new_token("alice-1_x") != token


@pytest.mark.parametrize("name", ["", "-a", "_a", "a.b", "a b", "é", "a" * 65, "a/b"])
def test_new_token_rejects_bad_names(name: str) -> None:
    with pytest.raises(UsageError):
        new_token(name)


SECRET_TEXT = _b64(bytes(range(32)))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        SECRET_TEXT,
        f".{SECRET_TEXT}",
        f"alice.{SECRET_TEXT[:-1]}",  # 31 bytes and a bit
        f"alice.{_b64(bytes(31))}",
        f"alice.{_b64(bytes(33))}",
        f"alice.{SECRET_TEXT}=",
        f"alice.{SECRET_TEXT}x",
        f"alice.{SECRET_TEXT[:-1]}+",  # not base64url
        f"-alice.{SECRET_TEXT}",
        f"a.b.{SECRET_TEXT}",
        f"al ice.{SECRET_TEXT}",
        f"{'a' * 65}.{SECRET_TEXT}",
        f"alice.{SECRET_TEXT[:-1]}B",  # non-canonical last character
    ],
)
def test_parse_rejects(token: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_token(token)
    message = str(info.value)
    assert message.startswith("not a dcproto token")
    assert SECRET_TEXT[:20] not in message
    if "." in token:
        assert token.rpartition(".")[2] not in message


def test_parse_rejects_non_string() -> None:
    with pytest.raises(UsageError):
        parse_token(b"alice.xyz")  # type: ignore[arg-type]


def test_parse_error_never_contains_secret() -> None:
    token = new_token("bob")
    secret_text = token.rpartition(".")[2]
    for bad in (token + "A", "-" + token, token[:-2], token.replace("bob.", "bob..")):
        with pytest.raises(UsageError) as info:
            parse_token(bad)
        assert secret_text[:16] not in str(info.value)
        assert secret_text[-16:] not in str(info.value)


# --------------------------------------------------------------------------- proofs


def test_auth_message_is_unambiguous() -> None:
    a = auth_message(nonce=b"ab", role="c", identity="d", channel=b"e")
    b = auth_message(nonce=b"a", role="bc", identity="d", channel=b"e")
    assert a != b
    assert a.startswith(b"dcproto-auth-v1")
    assert a == b"dcproto-auth-v1" + b"".join(
        len(x).to_bytes(4, "big") + x for x in (b"ab", b"c", b"d", b"e")
    )


def test_proof_ok() -> None:
    token = new_token("carol")
    identity, proof = make_proof(token, nonce=NONCE, role="creator", channel=CHANNEL)
    assert identity == "carol"
    assert len(proof) == 32
    assert verify_proof(
        _stored_for(token), identity="carol", proof=proof, nonce=NONCE, role="creator",
        channel=CHANNEL,
    )  # fmt: skip


def test_proof_rejections() -> None:
    token = new_token("carol")
    stored = _stored_for(token)
    _, proof = make_proof(token, nonce=NONCE, role="worker", channel=CHANNEL)

    def check(**changes: object) -> bool:
        key = changes.pop("stored", stored)
        args: dict[str, object] = {
            "identity": "carol",
            "proof": proof,
            "nonce": NONCE,
            "role": "worker",
            "channel": CHANNEL,
        }
        args.update(changes)
        return verify_proof(key, **args)  # type: ignore[arg-type]

    assert check()
    # A different token with the same name.
    other = new_token("carol")
    _, other_proof = make_proof(other, nonce=NONCE, role="worker", channel=CHANNEL)
    assert not check(proof=other_proof)
    assert not check(stored=_stored_for(other))
    assert not check(nonce=b"m" * 32)
    assert not check(role="creator")
    assert not check(role="admin")
    assert not check(channel=b"d" * 32)
    assert not check(identity="carol2")
    assert not check(proof=proof[:-1])
    assert not check(proof=proof + b"\x00")
    assert not check(proof=b"")
    assert not check(proof=bytes(32))
    assert not check(identity="\udcff")  # not encodable: False, not an exception
    assert not check(proof="x" * 32)


def test_stored_key_cannot_log_in() -> None:
    token = new_token("dave")
    stored = _stored_for(token)
    message = auth_message(nonce=NONCE, role="admin", identity="dave", channel=CHANNEL)

    # An attacker who stole tokens.json uses the stored key as if it were the client key...
    forged = bytes(
        x ^ y for x, y in zip(stored, hmac.digest(stored, message, "sha256"), strict=True)
    )
    assert not verify_proof(
        stored, identity="dave", proof=forged, nonce=NONCE, role="admin", channel=CHANNEL
    )
    # ... or as if it were the secret of a token.
    _, forged2 = make_proof(f"dave.{_b64(stored)}", nonce=NONCE, role="admin", channel=CHANNEL)
    assert not verify_proof(
        stored, identity="dave", proof=forged2, nonce=NONCE, role="admin", channel=CHANNEL
    )


def test_client_key_is_salted_by_name() -> None:
    secret = bytes(32)
    assert client_key("a", secret) != client_key("b", secret)
    assert len(stored_key(client_key("a", secret))) == 32


# --------------------------------------------------------------------------- the store


def test_store_add_list_get_revoke(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    assert store.records() == []
    t_w = store.add("zed", "worker")
    t_c = store.add("amy", "creator")
    assert [r.name for r in store.records()] == ["amy", "zed"]
    rec = store.get("zed")
    assert isinstance(rec, TokenRecord)
    assert rec.role == "worker"
    assert rec.stored_key == _stored_for(t_w)
    assert rec.created_at > 0
    assert store.get("amy") is not None and store.get("amy").stored_key == _stored_for(t_c)  # type: ignore[union-attr]
    assert store.get("nobody") is None
    assert t_w.rpartition(".")[2] not in repr(rec)

    # The file holds verifiers only, never the tokens.
    text = (tmp_path / "state" / TOKENS_FILE).read_text()
    doc = json.loads(text)
    assert doc["version"] == 1
    assert {e["name"] for e in doc["tokens"]} == {"amy", "zed"}
    assert set(doc["tokens"][0]) == {"name", "role", "stored_key", "created_at"}
    assert t_w.rpartition(".")[2] not in text and t_c.rpartition(".")[2] not in text

    fresh = TokenStore(tmp_path / "state")
    assert fresh.records() == store.records()

    assert store.revoke("zed") is True
    assert store.revoke("zed") is False
    assert store.revoke("nobody") is False
    assert [r.name for r in store.records()] == ["amy"]
    assert [r.name for r in TokenStore(tmp_path / "state").records()] == ["amy"]


def test_store_usage_errors(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.add("eve", "admin")
    with pytest.raises(UsageError, match="already exists"):
        store.add("eve", "worker")
    with pytest.raises(UsageError, match="role"):
        store.add("frank", "superuser")
    with pytest.raises(UsageError):
        store.add("bad.name", "worker")
    assert [r.name for r in store.records()] == ["eve"]


def test_missing_state_dir_reads_as_empty(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "does" / "not" / "exist")
    assert store.records() == []
    assert store.reload_if_changed() is False
    assert not (tmp_path / "does").exists()


def test_file_modes_under_zero_umask(tmp_path: Path, zero_umask: None) -> None:
    state = tmp_path / "state"
    store = TokenStore(state)
    assert store.ensure_admin() is not None
    store.add("worker1", "worker")
    assert _mode(state) == 0o700
    assert _mode(state / TOKENS_FILE) == 0o600
    assert _mode(state / ADMIN_TOKEN_FILE) == 0o600
    assert _mode(state / "tokens.lock") == 0o600
    # No temp files are left behind.
    assert sorted(p.name for p in state.iterdir()) == sorted(
        [ADMIN_TOKEN_FILE, "tokens.lock", TOKENS_FILE]
    )


def test_two_stores_see_each_other(tmp_path: Path) -> None:
    a = TokenStore(tmp_path)
    b = TokenStore(tmp_path)
    assert b.reload_if_changed() is False

    token = a.add("gina", "creator")
    assert b.get("gina") is None
    assert b.reload_if_changed() is True
    rec = b.get("gina")
    assert rec is not None and rec.stored_key == _stored_for(token)
    assert b.reload_if_changed() is False
    assert a.reload_if_changed() is False  # its own write is not a change

    # b is up to date now; a's view is stale but its add re-reads inside the lock.
    b.add("hank", "worker")
    a.add("ivan", "worker")
    assert {r.name for r in TokenStore(tmp_path).records()} == {"gina", "hank", "ivan"}
    assert {r.name for r in a.records()} == {"gina", "hank", "ivan"}

    assert a.revoke("gina") is True
    assert b.reload_if_changed() is True
    assert b.get("gina") is None
    assert b.reload_if_changed() is False

    # A vanished file means no tokens.
    (tmp_path / TOKENS_FILE).unlink()
    assert b.reload_if_changed() is True
    assert b.records() == []


def _add_many(state_dir: str, prefix: str, count: int, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    store = TokenStore(Path(state_dir))
    for i in range(count):
        store.add(f"{prefix}-{i}", ROLES[i % len(ROLES)])


def test_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_add_many, args=(str(state), f"p{n}", 5, start)) for n in range(8)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    names = {r.name for r in TokenStore(state).records()}
    assert names == {f"p{n}-{i}" for n in range(8) for i in range(5)}


def test_ensure_admin(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token = store.ensure_admin()
    assert token is not None
    assert store.ensure_admin() is None
    assert TokenStore(tmp_path).ensure_admin() is None

    text = (tmp_path / ADMIN_TOKEN_FILE).read_text()
    assert parse_token(text) == parse_token(token)
    rec = TokenStore(tmp_path).get("admin")
    assert rec is not None and rec.role == "admin"
    identity, proof = make_proof(text, nonce=NONCE, role="admin", channel=CHANNEL)
    assert identity == "admin"
    assert verify_proof(
        rec.stored_key, identity=identity, proof=proof, nonce=NONCE, role="admin", channel=CHANNEL
    )


def test_ensure_admin_not_when_tokens_exist(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.add("someone", "worker")
    assert TokenStore(tmp_path).ensure_admin() is None
    assert not (tmp_path / ADMIN_TOKEN_FILE).exists()


_GOOD_KEY = "ab" * 32


def _doc(**changes: object) -> str:
    """A tokens.json with one record, some fields changed (``None`` removes the field)."""
    entry: dict[str, object] = {
        "name": "a",
        "role": "admin",
        "stored_key": _GOOD_KEY,
        "created_at": 1,
    }
    entry.update(changes)
    return json.dumps({"version": 1, "tokens": [{k: v for k, v in entry.items() if v is not None}]})


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "\xff\xfe",  # not UTF-8
        "",
        "[]",
        '{"version": 2, "tokens": []}',
        '{"version": 1}',
        '{"version": 1, "tokens": {}}',
        '{"version": 1, "tokens": [1]}',
        _doc(name=None),
        _doc(name="a.b"),
        _doc(role="root"),
        _doc(role=None),
        _doc(stored_key="abcd"),
        _doc(stored_key="zz" * 32),
        _doc(stored_key=None),
        _doc(created_at="yesterday"),
        _doc(created_at=True),
        _doc().replace("[{", "[" + _doc(role="worker").split("[", 1)[1][:-2] + ", {"),  # twice
    ],
)
def test_corrupt_file_raises(tmp_path: Path, content: str) -> None:
    path = tmp_path / TOKENS_FILE
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DcprotoError) as info:
        TokenStore(tmp_path)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, UsageError)


def test_valid_handwritten_file_is_read(tmp_path: Path) -> None:
    (tmp_path / TOKENS_FILE).write_text(
        json.dumps(
            {
                "version": 1,
                "tokens": [
                    {"name": "a", "role": "admin", "stored_key": _GOOD_KEY, "created_at": 5}
                ],
            }
        )
    )
    assert TokenStore(tmp_path).records() == [
        TokenRecord("a", "admin", bytes.fromhex(_GOOD_KEY), 5.0)
    ]


def test_corrupt_file_during_write_raises(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.add("a", "worker")
    (tmp_path / TOKENS_FILE).write_text("{broken")
    with pytest.raises(DcprotoError, match="corrupt"):
        store.add("b", "worker")
    with pytest.raises(DcprotoError, match="corrupt"):
        store.revoke("a")
    with pytest.raises(DcprotoError, match="corrupt"):
        store.ensure_admin()
    assert (tmp_path / TOKENS_FILE).read_text() == "{broken"


def test_reload_keeps_last_good_records_on_corruption(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = TokenStore(tmp_path)
    writer.add("good", "creator")
    reader = TokenStore(tmp_path)
    before = reader.records()
    assert [r.name for r in before] == ["good"]

    (tmp_path / TOKENS_FILE).write_text('{"version": 1, "tokens": [{"name": "half"')
    with caplog.at_level(logging.WARNING, logger="dcproto.trust"):
        assert reader.reload_if_changed() is False
    assert reader.records() == before
    assert any(str(tmp_path / TOKENS_FILE) in r.getMessage() for r in caplog.records)
    assert reader.reload_if_changed() is False  # still broken, still the old records
    assert reader.records() == before

    # Once the file is fixed, the reader picks it up.
    os.unlink(tmp_path / TOKENS_FILE)
    TokenStore(tmp_path).add("new", "worker")
    assert reader.reload_if_changed() is True
    assert [r.name for r in reader.records()] == ["new"]


def test_memory_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = TokenStore(None)
    token = store.ensure_admin()
    assert token is not None
    assert store.ensure_admin() is None
    rec = store.get("admin")
    assert rec is not None and rec.role == "admin" and rec.stored_key == _stored_for(token)
    store.add("w", "worker")
    with pytest.raises(UsageError):
        store.add("w", "worker")
    assert [r.name for r in store.records()] == ["admin", "w"]
    assert store.reload_if_changed() is False
    assert store.revoke("w") is True
    assert store.revoke("w") is False
    assert [r.name for r in store.records()] == ["admin"]
    assert list(tmp_path.iterdir()) == []
