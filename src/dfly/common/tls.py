"""mTLS for the control plane (`security.tls`): daemon ↔ scheduler gRPC and the daemon's control port.

Rules:
- Off unless `ca_cert`, `cert` and `key` are all set (PEM files); setting only some is a config error.
- With it on, every gRPC server of the process asks for a client certificate signed by `ca_cert` and
  refuses callers without one; every client presents its own and checks the server's against the same
  CA and the address it dials (so certificates need the IPs or names the others use: SANs).
- Piece transfer (port 4005) is a separate switch, `security.tls.pieces` (off by default): with it on,
  the piece server asks every child for a certificate from the same CA and each child checks its
  parent's against the address it dials. It costs sendfile: bytes pass through the TLS layer in user
  space (measured in bench/piece_tls.py, docs/benchmarks.md).
- Files are read once at start (a new certificate needs a restart); a missing or unreadable file, or
  one that is not what its key says (a PEM bundle with a CA certificate, a certificate issued by it and
  valid now, its unencrypted private key), is a ConfigError naming it: gRPC itself only failed to bind,
  or retried handshakes for ever with its own log lines.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from pydantic import field_validator, model_validator

from dfly.common.config import StrictModel
from dfly.common.errors import ConfigError


class TlsSection(StrictModel):
    ca_cert: Path | None = None  # PEM bundle of the CA that signs every member of the cluster
    cert: Path | None = None  # this process's certificate (PEM)
    key: Path | None = None  # its private key (PEM, unencrypted)
    pieces: bool = False  # also mTLS on piece transfer (port 4005): no sendfile, more CPU per byte

    @field_validator("ca_cert", "cert", "key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`cert: ""` (or DFLY_..._CERT= in the environment) is no file, not the current directory."""
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _all_or_none(self) -> TlsSection:
        given = [self.ca_cert is not None, self.cert is not None, self.key is not None]
        if any(given) and not all(given):
            raise ValueError("security.tls needs ca_cert, cert and key together (or none of them)")
        if self.pieces and not all(given):
            raise ValueError("security.tls.pieces needs ca_cert, cert and key")
        return self

    @property
    def enabled(self) -> bool:
        return self.ca_cert is not None


class SecuritySection(StrictModel):
    tls: TlsSection = TlsSection()


def _read(path: Path | None, what: str) -> bytes:
    assert path is not None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read security.tls.{what} {path}: {exc.strerror or exc}") from None


def check_files(tls: TlsSection) -> None:
    """ConfigError naming the key whose file is not a usable PEM (checked with the ssl module)."""
    for path, what in ((tls.key, "key"), (tls.cert, "cert"), (tls.ca_cert, "ca_cert")):
        _read(path, what)  # readable at all (names the file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(tls.ca_cert))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"security.tls.ca_cert {tls.ca_cert} holds no usable PEM certificate: {exc}"
        ) from None
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key), password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"security.tls.cert {tls.cert} / key {tls.key}: not a PEM certificate with its unencrypted "
            f"private key: {exc}"
        ) from None
    _check_certificates(tls)


def _check_certificates(tls: TlsSection) -> None:
    """The certificate is valid now and chains (through any intermediates in its file) to a CA
    certificate of `ca_cert`: otherwise every handshake fails later, and only gRPC's log says why."""
    try:
        chain = x509.load_pem_x509_certificates(_read(tls.cert, "cert"))
        authorities = x509.load_pem_x509_certificates(_read(tls.ca_cert, "ca_cert"))
    except ValueError as exc:
        raise ConfigError(f"security.tls: cannot parse a certificate: {exc}") from None
    leaf, now = chain[0], datetime.datetime.now(datetime.UTC)
    if now < leaf.not_valid_before_utc:
        raise ConfigError(f"security.tls.cert {tls.cert} is not valid before {leaf.not_valid_before_utc}")
    if now > leaf.not_valid_after_utc:
        raise ConfigError(f"security.tls.cert {tls.cert} expired on {leaf.not_valid_after_utc}")
    roots = [cert for cert in authorities if _is_ca(cert)]
    if not roots:
        raise ConfigError(f"security.tls.ca_cert {tls.ca_cert} holds no CA certificate")
    current = leaf
    for _ in range(len(chain)):  # leaf, then each intermediate of its file that issued the previous one
        if any(_issued_by(current, root) for root in roots):
            return
        issuer = next((c for c in chain[1:] if _issued_by(current, c)), None)
        if issuer is None:
            break
        current = issuer
    raise ConfigError(f"security.tls.cert {tls.cert} was not issued by security.tls.ca_cert {tls.ca_cert}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def server_credentials(tls: TlsSection) -> grpc.ServerCredentials:
    """Server side: our certificate, and a client certificate from the CA required."""
    check_files(tls)
    pair = (_read(tls.key, "key"), _read(tls.cert, "cert"))
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read(tls.ca_cert, "ca_cert"), require_client_auth=True
    )


def channel_credentials(tls: TlsSection) -> grpc.ChannelCredentials:
    """Client side: trust only the cluster's CA, and present our certificate."""
    check_files(tls)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_cert, "ca_cert"),
        private_key=_read(tls.key, "key"),
        certificate_chain=_read(tls.cert, "cert"),
    )


def add_port(server: grpc.aio.Server, address: str, tls: TlsSection) -> int:
    """Bind `address` (`ip:port`, `[ip6]:port`) on `server`, with mTLS when configured; returns the
    port. A fixed port that is taken, or an address not on this host, raises OSError with the OS's reason
    (grpc itself only raises RuntimeError "Failed to bind")."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Port 0 too: an address not on this host is our one-line error, not gRPC core's log line first.
    socket.create_server((host, int(port)), family=family).close()
    if tls.enabled:
        return server.add_secure_port(address, server_credentials(tls))
    return server.add_insecure_port(address)


def aio_channel(
    target: str, tls: TlsSection, options: list[tuple[str, int]] | None = None
) -> grpc.aio.Channel:
    """A channel to `target`, with mTLS when configured."""
    if tls.enabled:
        return grpc.aio.secure_channel(target, channel_credentials(tls), options=options)
    return grpc.aio.insecure_channel(target, options=options)


def _ssl_context(tls: TlsSection, purpose: ssl.Purpose) -> ssl.SSLContext:
    check_files(tls)  # first: names the key of a bad file (and an encrypted key never prompts below)
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cadata=_read(tls.ca_cert, "ca_cert").decode("ascii", "replace"))
        context.load_cert_chain(str(tls.cert), str(tls.key), password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"security.tls: cannot use {tls.cert} / {tls.key} / {tls.ca_cert}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"security.tls: cannot read {exc.filename}: {exc.strerror or exc}") from None
    return context


def piece_server_context(tls: TlsSection) -> ssl.SSLContext | None:
    """For the piece server: our certificate, a child certificate from the CA required; None = plain."""
    return _ssl_context(tls, ssl.Purpose.CLIENT_AUTH) if tls.enabled and tls.pieces else None


def piece_client_context(tls: TlsSection) -> ssl.SSLContext | None:
    """For connections to parents: their certificate checked against the CA and the dialled address."""
    return _ssl_context(tls, ssl.Purpose.SERVER_AUTH) if tls.enabled and tls.pieces else None
