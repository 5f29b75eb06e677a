"""security.tls: all three files or none; an unreadable file is a ConfigError naming it."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from dfly.common.errors import ConfigError
from dfly.common.tls import TlsSection, check_files, piece_server_context, server_credentials
from dfly.devtools.pki import make_pki


def test_off_by_default_and_all_or_none() -> None:
    assert not TlsSection().enabled
    # an empty value (`cert: ""`, `DFLY_..._CERT=`) is unset: it was the current directory
    assert not TlsSection.model_validate({"ca_cert": "", "cert": " ", "key": ""}).enabled
    with pytest.raises(ValidationError, match="together"):
        TlsSection(ca_cert=Path("ca.pem"))


def test_missing_file_names_it(tmp_path: Path) -> None:
    tls = TlsSection(ca_cert=tmp_path / "ca.pem", cert=tmp_path / "c.pem", key=tmp_path / "nope.key")
    with pytest.raises(ConfigError, match=r"security\.tls\.key .*nope\.key"):
        server_credentials(tls)


def test_files_that_are_not_what_their_key_says_are_named(tmp_path: Path) -> None:
    """Empty or swapped PEM files: gRPC only logged "Invalid private key" and failed to bind."""
    pki = make_pki(tmp_path / "pki", ["peer", "other"])
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    good = {"ca_cert": pki["ca"], "cert": pki["peer"], "key": pki["peer.key"]}
    check_files(TlsSection.model_validate(good))  # a real set passes
    cases = [
        ({**good, "ca_cert": empty}, r"security\.tls\.ca_cert .* no usable PEM"),
        ({**good, "key": empty}, r"security\.tls\.cert .* / key .*empty\.pem"),
        ({**good, "key": pki["other.key"]}, r"not a PEM certificate with its unencrypted private key"),
    ]
    for files, message in cases:
        with pytest.raises(ConfigError, match=message):
            server_credentials(TlsSection.model_validate(files))


def test_certificates_that_would_fail_every_handshake_are_refused_at_start(tmp_path: Path) -> None:
    """Expired, not yet valid, from another CA, or a CA file without a CA: the process started, then
    retried handshakes for ever, the reason only in gRPC's own log lines on the other side."""
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    pki = make_pki(tmp_path / "pki", ["peer"])
    expired = make_pki(tmp_path / "old", ["peer"], leaf_valid=(now - 3 * day, now - day))
    future = make_pki(tmp_path / "new", ["peer"], leaf_valid=(now + day, now + 3 * day))
    rogue = make_pki(tmp_path / "rogue", ["peer"])
    cases = [
        ({"ca_cert": expired["ca"], "cert": expired["peer"], "key": expired["peer.key"]}, "expired on"),
        ({"ca_cert": future["ca"], "cert": future["peer"], "key": future["peer.key"]}, "is not valid before"),
        ({"ca_cert": pki["ca"], "cert": rogue["peer"], "key": rogue["peer.key"]}, "was not issued by"),
        ({"ca_cert": pki["peer"], "cert": pki["peer"], "key": pki["peer.key"]}, "holds no CA certificate"),
    ]
    for files, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_files(TlsSection.model_validate(files))


def test_an_encrypted_key_is_named_for_pieces_too_and_never_prompts(tmp_path: Path) -> None:
    """With `pieces` on, the ssl module asked for a passphrase on the terminal (or printed 'cannot read
    None') before the files were checked."""
    pki = make_pki(tmp_path / "pki", ["peer"])
    key = serialization.load_pem_private_key(pki["peer.key"].read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    tls = TlsSection(ca_cert=pki["ca"], cert=pki["peer"], key=encrypted, pieces=True)
    with pytest.raises(ConfigError, match=r"security\.tls\.cert .* / key .*encrypted\.key"):
        piece_server_context(tls)
