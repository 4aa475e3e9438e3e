"""Tests of dcproto.trust.tls: identity files, fingerprints, pinning and CA verification."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from dcproto.errors import CertificateMismatch, ConnectionFailed, IdentityError, UsageError
from dcproto.trust.tls import (
    CERT_FILE,
    FINGERPRINT_PREFIX,
    KEY_FILE,
    TLS_DIR,
    ServerIdentity,
    channel_binding,
    check_pin,
    client_context,
    fingerprint,
    load_identity,
    load_or_create_identity,
    normalize_fingerprint,
    peer_certificate,
    server_context,
)

HEX = "0123456789abcdef" * 4


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> ServerIdentity:
    return load_or_create_identity(tmp_path_factory.mktemp("server"), ["example.test", "10.1.2.3"])


@pytest.fixture(scope="module")
def other_identity(tmp_path_factory: pytest.TempPathFactory) -> ServerIdentity:
    return load_or_create_identity(tmp_path_factory.mktemp("other"))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_identity_with_private_modes_then_load_it(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        created = load_or_create_identity(tmp_path / "state", ["0.0.0.0", "::", ""])
    finally:
        os.umask(old_umask)
    tls_dir = tmp_path / "state" / TLS_DIR
    assert created.cert_path == tls_dir / CERT_FILE
    assert created.key_path == tls_dir / KEY_FILE
    assert created.cert_path.is_file() and created.key_path.is_file()
    assert _mode(created.key_path) == 0o600
    assert _mode(tls_dir) == 0o700
    assert [p.name for p in tls_dir.iterdir() if p.name.endswith(".tmp")] == []
    assert created.self_signed
    assert created.fingerprint == fingerprint(created.cert_der)
    assert created.fingerprint.startswith(FINGERPRINT_PREFIX)
    digits = created.fingerprint[len(FINGERPRINT_PREFIX) :]
    assert len(digits) == 64 and digits == digits.lower()
    int(digits, 16)
    assert len(channel_binding(created.cert_der)) == 32

    again = load_or_create_identity(tmp_path / "state", ["ignored.example"])
    assert again.fingerprint == created.fingerprint
    assert again.cert_der == created.cert_der


def test_certificate_contents(identity: ServerIdentity) -> None:
    cert = x509.load_der_x509_certificate(identity.cert_der)
    assert cert.subject.rfc4514_string() == "CN=dcproto server"
    assert cert.issuer == cert.subject
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.test", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_normalize_fingerprint_variants() -> None:
    canonical = FINGERPRINT_PREFIX + HEX
    colons = ":".join(HEX[i : i + 2] for i in range(0, 64, 2))
    for text in (
        canonical,
        HEX,
        HEX.upper(),
        colons,
        colons.upper(),
        "SHA256:" + colons.upper(),
        f"  sha256:{HEX}\n",
    ):
        assert normalize_fingerprint(text) == canonical, text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        HEX[:-2],
        HEX + "00",
        "sha1:" + HEX[:40],
        "sha256:" + HEX[:-1] + "g",
        "md5:" + HEX,
        "x" * 500,
    ],
)
def test_normalize_fingerprint_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="not a certificate fingerprint"):
        normalize_fingerprint(text)


@contextlib.asynccontextmanager
async def _echo_server(identity: ServerIdentity) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TLS echo server on 127.0.0.1; yields its port and the channel bindings it computed."""
    bindings: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bindings.append(channel_binding(identity.cert_der))
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            data = await reader.read(100)
            writer.write(data)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(identity))
    try:
        yield server.sockets[0].getsockname()[1], bindings
    finally:
        server.close()
        await server.wait_closed()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def test_pinned_round_trip(identity: ServerIdentity) -> None:
    async with _echo_server(identity) as (port, bindings):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1",
                port,
                ssl=client_context(fingerprint=identity.fingerprint),
                server_hostname="127.0.0.1",
            ),
            5,
        )
        try:
            cert_der = peer_certificate(writer.get_extra_info("ssl_object"))
            assert cert_der == identity.cert_der
            check_pin(cert_der, identity.fingerprint, f"127.0.0.1:{port}")
            check_pin(cert_der, identity.fingerprint.upper(), f"127.0.0.1:{port}")
            check_pin(cert_der, None, f"127.0.0.1:{port}")
            writer.write(b"hello tls")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(9), 5) == b"hello tls"
            assert bindings == [channel_binding(cert_der)]
        finally:
            await _close(writer)


def test_check_pin_mismatch(identity: ServerIdentity, other_identity: ServerIdentity) -> None:
    assert other_identity.fingerprint != identity.fingerprint
    with pytest.raises(CertificateMismatch) as info:
        check_pin(other_identity.cert_der, identity.fingerprint, "127.0.0.1:8080")
    error = info.value
    assert isinstance(error, ConnectionFailed)
    assert error.expected == identity.fingerprint
    assert error.actual == other_identity.fingerprint
    message = str(error)
    assert identity.fingerprint in message
    assert other_identity.fingerprint in message
    assert "127.0.0.1:8080" in message


def test_peer_certificate_without_tls() -> None:
    with pytest.raises(ConnectionFailed):
        peer_certificate(None)


def test_client_context_rejects_bad_fingerprint(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        client_context(fingerprint="sha256:nope")
    with pytest.raises(UsageError):
        client_context(fingerprint=None, ca_file=tmp_path / "missing.pem")


async def test_ca_mode(identity: ServerIdentity) -> None:
    async with _echo_server(identity) as (port, _):
        with pytest.raises(ssl.SSLCertVerificationError):
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1",
                    port,
                    ssl=client_context(fingerprint=None),
                    server_hostname="localhost",
                ),
                5,
            )
            await _close(writer)

        context = client_context(fingerprint=None, ca_file=identity.cert_path)
        assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
        for hostname in ("localhost", "127.0.0.1", "example.test"):
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=hostname),
                5,
            )
            try:
                cert_der = peer_certificate(writer.get_extra_info("ssl_object"))
                assert cert_der == identity.cert_der
                writer.write(b"ca")
                await writer.drain()
                assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ca"
            finally:
                await _close(writer)

        with pytest.raises(ssl.SSLCertVerificationError):  # a name not in the certificate
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="elsewhere.test"
                ),
                5,
            )
            await _close(writer)


def test_load_identity_pairs(identity: ServerIdentity, other_identity: ServerIdentity) -> None:
    loaded = load_identity(identity.cert_path, identity.key_path)
    assert loaded.fingerprint == identity.fingerprint
    assert loaded.self_signed
    with pytest.raises(IdentityError, match="does not belong") as info:
        load_identity(identity.cert_path, other_identity.key_path)
    assert str(other_identity.key_path) in str(info.value)


def test_load_identity_chain_uses_leaf(
    tmp_path: Path, identity: ServerIdentity, other_identity: ServerIdentity
) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(identity.cert_path.read_bytes() + other_identity.cert_path.read_bytes())
    loaded = load_identity(chain, identity.key_path)
    assert loaded.fingerprint == identity.fingerprint
    assert loaded.cert_der == identity.cert_der


def test_encrypted_key_is_refused(tmp_path: Path, identity: ServerIdentity) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(identity.key_path.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(IdentityError, match="encrypted"):
        load_identity(identity.cert_path, encrypted)


def test_corrupted_or_missing_files(tmp_path: Path) -> None:
    state = tmp_path / "state"
    created = load_or_create_identity(state)
    garbage = "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"
    created.cert_path.write_text(garbage)
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(state)
    assert str(created.cert_path) in str(info.value)

    created.cert_path.write_text("not a certificate at all\n")
    with pytest.raises(IdentityError, match=re.escape(str(created.cert_path))):
        load_or_create_identity(state)

    with pytest.raises(IdentityError, match="cannot read"):
        load_identity(tmp_path / "nope.pem", created.key_path)

    created.key_path.write_text("garbage\n")
    with pytest.raises(IdentityError):
        load_identity(created.cert_path, created.key_path)


def test_unwritable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(IdentityError, match=re.escape(str(blocker))):
        load_or_create_identity(blocker)
