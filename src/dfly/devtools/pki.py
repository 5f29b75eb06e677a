"""A throw-away PKI for tests and local clusters: one CA, and certificates it signs for 127.0.0.1.

`make_pki(dir, names)` writes `ca.pem`, and `<name>.pem` / `<name>.key` per name, each valid for
127.0.0.1, ::1 and localhost (plus any `ips` given: a server in a test's network namespace), for client
and server use. Never use these files outside tests.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path


def make_pki(
    directory: Path,
    names: list[str],
    *,
    ca_name: str = "dfly test CA",
    ips: Sequence[str] = (),
    leaf_valid: tuple[datetime.datetime, datetime.datetime] | None = None,
) -> dict[str, Path]:
    """Write a CA and one certificate + key per name; returns {"ca": path, name: cert, name + ".key": key}.
    `leaf_valid`: the named certificates' validity window (default: from 5 minutes ago for 2 days)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    addresses = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1", *ips)]
    sans = x509.SubjectAlternativeName([*addresses, x509.DNSName("localhost")])
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before((leaf_valid or valid)[0])
            .not_valid_after((leaf_valid or valid)[1])
            .add_extension(sans, critical=False)
            .add_extension(usage, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}.key"] = directory / f"{name}.key"
        paths[f"{name}.key"].write_bytes(pem_key(key))
        paths[f"{name}.key"].chmod(0o600)
    return paths
