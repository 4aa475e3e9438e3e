"""The server's TLS identity (key + certificate on disk) and the TLS contexts of both sides.

The server keeps an ECDSA P-256 key and a certificate in ``<state dir>/tls/``: a self-signed one
made on first start, or a PEM pair given by the operator (``--tls-cert``/``--tls-key``). Clients
either pin the server's certificate by its SHA-256 fingerprint (``sha256:<64 hex>``; the pin
replaces chain and hostname verification and is checked by :func:`check_pin` right after the
handshake) or verify it against CA certificates like any HTTPS client. :func:`channel_binding`
ties an authentication proof to the certificate of the TLS server it was made for.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # cryptography is imported where keys are made or read: clients never pay
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

from dcproto.errors import CertificateMismatch, ConnectionFailed, IdentityError, UsageError

__all__ = [
    "CERT_FILE",
    "FINGERPRINT_PREFIX",
    "KEY_FILE",
    "TLS_DIR",
    "ServerIdentity",
    "channel_binding",
    "check_pin",
    "client_context",
    "fingerprint",
    "load_identity",
    "load_or_create_identity",
    "normalize_fingerprint",
    "peer_certificate",
    "server_context",
]

FINGERPRINT_PREFIX = "sha256:"
TLS_DIR = "tls"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"

COMMON_NAME = "dcproto server"
VALIDITY = timedelta(days=3650)
BACKDATE = timedelta(days=1)

_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_UNSPECIFIED = frozenset({"", "0.0.0.0", "::"})


def fingerprint(cert_der: bytes) -> str:
    """``"sha256:"`` and the 64 lowercase hex digits of SHA-256 over the DER certificate."""
    return FINGERPRINT_PREFIX + hashlib.sha256(cert_der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """The canonical ``"sha256:<64 lowercase hex>"`` form of a fingerprint typed by a person.

    Accepts the prefix or not, colons between the bytes or not, any case
    (``sha256:AB:CD:...``, ``AB:CD:...``, ``abcd...``). Raises :class:`UsageError` otherwise.
    """
    value = text.strip().lower()
    if value.startswith(FINGERPRINT_PREFIX):
        value = value[len(FINGERPRINT_PREFIX) :]
    value = value.replace(":", "")
    if not _HEX64_RE.fullmatch(value):
        shown = text if len(text) <= 120 else text[:117] + "..."
        raise UsageError(
            f"{shown!r} is not a certificate fingerprint: expected {FINGERPRINT_PREFIX!r} "
            "followed by 32 bytes of hex (64 hex digits, optionally separated by colons)"
        )
    return FINGERPRINT_PREFIX + value


@dataclass(frozen=True)
class ServerIdentity:
    """The server's certificate and key files, its leaf certificate and that one's fingerprint."""

    cert_path: Path
    key_path: Path
    cert_der: bytes = field(repr=False)
    fingerprint: str
    self_signed: bool


def load_or_create_identity(state_dir: Path, hostnames: Sequence[str] = ()) -> ServerIdentity:
    """Load ``state_dir/tls/{cert,key}.pem``, or make a self-signed pair there if not both exist.

    ``hostnames`` (names or IP addresses the server is reached by) go into a new certificate's
    subject alternative names, besides ``localhost``, ``127.0.0.1`` and ``::1``; they are not
    used when the files already exist.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    tls_dir = Path(state_dir) / TLS_DIR
    cert_path = tls_dir / CERT_FILE
    key_path = tls_dir / KEY_FILE
    if cert_path.exists() and key_path.exists():
        return load_identity(cert_path, key_path)
    if isinstance(hostnames, str):
        hostnames = [hostnames]
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed_certificate(key, hostnames)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    try:
        tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(tls_dir, 0o700)
    except OSError as exc:
        raise IdentityError(f"cannot create the TLS directory {tls_dir}: {exc}") from exc
    # The key first: a certificate on disk always has its key next to it.
    _write_atomically(key_path, key_pem, private=True)
    _write_atomically(cert_path, cert_pem, private=False)
    # Read back what is on disk: also proves that ssl accepts the pair.
    return load_identity(cert_path, key_path)


def load_identity(cert_path: Path, key_path: Path) -> ServerIdentity:
    """Load a PEM certificate (or chain, leaf first) and its unencrypted PEM private key.

    Raises :class:`IdentityError` if a file cannot be read or parsed, the key is encrypted, or
    the key does not belong to the leaf certificate.
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_path = Path(cert_path)
    key_path = Path(key_path)
    cert_data = _read(cert_path, "certificate")
    key_data = _read(key_path, "private key")
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError as exc:
        raise IdentityError(
            f"{cert_path} does not hold a PEM certificate ({exc}); expected "
            "'-----BEGIN CERTIFICATE-----' blocks, the server's certificate first"
        ) from exc
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError as exc:
        raise IdentityError(
            f"the private key {key_path} is encrypted: dcproto needs it without a passphrase"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"{key_path} does not hold a usable PEM private key ({exc})") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise IdentityError(
            f"the private key {key_path} does not belong to the certificate {cert_path} "
            "(the first certificate in that file must be the server's own)"
        )
    _check_with_ssl(cert_path, key_path)
    cert_der = leaf.public_bytes(serialization.Encoding.DER)
    return ServerIdentity(
        cert_path=cert_path,
        key_path=key_path,
        cert_der=cert_der,
        fingerprint=fingerprint(cert_der),
        self_signed=leaf.issuer == leaf.subject,
    )


def server_context(identity: ServerIdentity) -> ssl.SSLContext:
    """A TLS >= 1.2 server context presenting ``identity``; clients show no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_NONE
    _load_cert_chain(context, identity.cert_path, identity.key_path)
    return context


def client_context(*, fingerprint: str | None, ca_file: Path | None = None) -> ssl.SSLContext:
    """A TLS >= 1.2 client context.

    With ``fingerprint``, the certificate chain and host name are not verified: the pin replaces
    them and must be checked with :func:`check_pin` after the handshake, before anything is sent
    (``ca_file`` is then not used). Without it, the server's chain is verified against
    ``ca_file`` (or the system's CA certificates) and its name against ``server_hostname``.
    Raises :class:`UsageError` for a malformed fingerprint or an unusable ``ca_file``.
    """
    if fingerprint is not None:
        normalize_fingerprint(fingerprint)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(
                cafile=None if ca_file is None else os.fspath(ca_file)
            )
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot use {ca_file} as CA certificates: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes:
    """The DER certificate the peer presented; :class:`ConnectionFailed` if there is none.

    ``ssl_object`` is what ``writer.get_extra_info("ssl_object")`` returns (``None`` when the
    connection is not TLS).
    """
    if ssl_object is None:
        raise ConnectionFailed("the connection is not protected by TLS")
    try:
        cert_der = ssl_object.getpeercert(binary_form=True)
    except ValueError as exc:  # handshake not done
        raise ConnectionFailed(f"no TLS certificate from the peer: {exc}") from exc
    if not cert_der:
        raise ConnectionFailed("the peer presented no TLS certificate")
    return cert_der


def check_pin(cert_der: bytes, expected: str | None, where: str) -> None:
    """Refuse a server whose certificate is not the pinned one (``expected``; None: CA mode).

    Raises :class:`CertificateMismatch` naming both fingerprints; ``where`` is the address.
    """
    if expected is None:
        return
    pinned = normalize_fingerprint(expected)
    actual = fingerprint(cert_der)
    if not hmac.compare_digest(actual.encode("ascii"), pinned.encode("ascii")):
        raise CertificateMismatch(
            f"the server at {where} presented certificate {actual}, but {pinned} is pinned "
            "for it: refusing to talk to it (if the server's certificate was replaced on "
            "purpose, update the pin with 'dcproto users add ... --fingerprint ...')",
            expected=pinned,
            actual=actual,
        )


def channel_binding(cert_der: bytes) -> bytes:
    """The 32-byte SHA-256 digest of the server's DER certificate (RFC 5929
    ``tls-server-end-point`` style), mixed into authentication proofs so that a proof made for
    one TLS server cannot be replayed to another. The server computes it from its own
    certificate, the client from the one the server presented."""
    return hashlib.sha256(cert_der).digest()


def _self_signed_certificate(
    key: ec.EllipticCurvePrivateKey, hostnames: Sequence[str]
) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names: list[x509.GeneralName] = []
    for name in [*hostnames, "localhost", "127.0.0.1", "::1"]:
        entry = _san_entry(name)
        if entry is not None and entry not in names:
            names.append(entry)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = datetime.now(UTC)
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
    )
    return builder.sign(key, hashes.SHA256())


def _san_entry(name: str) -> x509.GeneralName | None:
    """The subjectAltName entry for a host name or IP address; None for unspecified ones."""
    from cryptography import x509

    name = name.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in _UNSPECIFIED:
        return None
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        if address.is_unspecified:
            return None
        return x509.IPAddress(address)
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise IdentityError(
            f"cannot put the host name {name!r} in the server's certificate: {exc}"
        ) from exc
    return x509.DNSName(ascii_name)


def _write_atomically(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it over ``path``.

    A private file gets mode 0600 whatever the umask; others 0644 less the umask.
    """
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if private:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise IdentityError(f"cannot write {path}: {exc}") from exc
    with contextlib.suppress(OSError):  # make the rename durable where directories can be synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read the server's TLS {what} {path}: {exc}") from exc


def _load_cert_chain(context: ssl.SSLContext, cert_path: Path, key_path: Path) -> None:
    try:
        # The empty password makes an encrypted key fail instead of prompting on the terminal.
        context.load_cert_chain(os.fspath(cert_path), os.fspath(key_path), password=b"")
    except (OSError, ssl.SSLError) as exc:
        raise IdentityError(
            f"TLS cannot use the certificate {cert_path} with the key {key_path}: {exc}"
        ) from exc


def _check_with_ssl(cert_path: Path, key_path: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_cert_chain(context, cert_path, key_path)
