"""security.tls: all three files or none; an unreadable file is a ConfigError naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dfly.common.errors import ConfigError
from dfly.common.tls import TlsSection, server_credentials


def test_off_by_default_and_all_or_none() -> None:
    assert not TlsSection().enabled
    with pytest.raises(ValidationError, match="together"):
        TlsSection(ca_cert=Path("ca.pem"))


def test_missing_file_names_it(tmp_path: Path) -> None:
    tls = TlsSection(ca_cert=tmp_path / "ca.pem", cert=tmp_path / "c.pem", key=tmp_path / "nope.key")
    with pytest.raises(ConfigError, match=r"security\.tls\.key .*nope\.key"):
        server_credentials(tls)
