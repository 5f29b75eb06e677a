"""The CA behind HTTPS interception (`proxy.hijack_https`) and the per-host certificates it issues.

Rules:
- The CA is the configured `cert`/`key` pair (PEM files), or one generated on first use and kept in the
  daemon's storage directory (`proxy-ca.crt`, `proxy-ca.key` mode 0600, written atomically) so clients
  that were told to trust it keep working across restarts. Clients must trust that CA certificate.
- Each intercepted authority (host:port) gets a server TLS context whose certificate names the host (as a
  DNS name, or an IP address for a literal), signed by the CA, valid from an hour ago for 90 days. One EC
  key serves every host certificate; contexts are cached, and `authority_of` maps a context back to the
  authority it was made for (the intercepted request's upstream).
- Loading a CA that is not a CA, or whose key does not match, is a ConfigError naming the file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dfly.common.errors import ConfigError

GENERATED_CERT = "proxy-ca.crt"
GENERATED_KEY = "proxy-ca.key"
LEAF_DAYS = 90
CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _new_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dfly proxy CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def load_or_create_ca(
    cert_file: str, key_file: str, storage_dir: Path
) -> tuple[x509.Certificate, CaKey, Path]:
    """The CA (certificate, key, certificate path): the configured files, else the generated pair."""
    if not cert_file:
        cert_path, key_path = storage_dir / GENERATED_CERT, storage_dir / GENERATED_KEY
        if not cert_path.exists() or not key_path.exists():
            storage_dir.mkdir(parents=True, exist_ok=True)
            new_cert, new_key = _new_ca(datetime.datetime.now(datetime.UTC))
            _write_atomically(key_path, _pem_key(new_key), 0o600)
            _write_atomically(cert_path, new_cert.public_bytes(serialization.Encoding.PEM), 0o644)
            return new_cert, new_key, cert_path
    else:
        cert_path, key_path = Path(cert_file), Path(key_file)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"proxy.hijack_https: cannot load the CA {cert_path} / {key_path}: {exc}") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"proxy.hijack_https: {key_path} must be an EC or RSA private key")
    key: CaKey = loaded
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"proxy.hijack_https: {cert_path} is not a CA certificate")
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ConfigError(f"proxy.hijack_https: {key_path} is not the key of {cert_path}")
    return cert, key, cert_path


class HostCertificates:
    """Server TLS contexts for intercepted authorities, each with a certificate signed by the CA."""

    def __init__(self, ca_cert: x509.Certificate, ca_key: CaKey, work_dir: Path) -> None:
        self.ca_cert, self.ca_key = ca_cert, ca_key
        self.work_dir = work_dir
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._authorities: dict[int, str] = {}

    def context_for(self, authority: str, host: str) -> ssl.SSLContext:
        """The server context presenting a certificate for `host` (cached per authority)."""
        context = self._contexts.get(authority)
        if context is None:
            context = self._make_context(host)
            self._contexts[authority] = context
            self._authorities[id(context)] = authority
        return context

    def authority_of(self, context: object) -> str | None:
        return self._authorities.get(id(context)) if context is not None else None

    def _make_context(self, host: str) -> ssl.SSLContext:
        now = datetime.datetime.now(datetime.UTC)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.ca_cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.ca_cert.public_bytes(
            serialization.Encoding.PEM
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        # ssl loads chains only from files: a private temporary file, removed at once.
        self.work_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.work_dir, prefix=".leaf-", suffix=".pem")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, chain + _pem_key(self._leaf_key))
            os.close(fd)
            context.load_cert_chain(tmp)
        finally:
            os.unlink(tmp)
        return context
