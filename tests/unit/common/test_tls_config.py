"""security.tls: all three files or none; an unreadable file is a ConfigError naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dfly.common.errors import ConfigError
from dfly.common.tls import TlsSection, check_files, server_credentials
from dfly.devtools.pki import make_pki


def test_off_by_default_and_all_or_none() -> None:
    assert not TlsSection().enabled
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
