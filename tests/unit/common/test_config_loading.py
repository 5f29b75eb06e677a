"""load_config: the file, then environment variables, then command-line flags; validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from dfly.common.config import load_config
from dfly.common.errors import ConfigError
from dfly.daemon.config import DaemonConfig

PREFIX = "DFLY_DFDAEMON"


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("upload:\n  slots: 10\n  rate_limit_bytes_per_s: 5\n")
    environ = {f"{PREFIX}__UPLOAD__SLOTS": "20", f"{PREFIX}__SEED_PEER__ENABLE": "false"}
    config = load_config(DaemonConfig, path, PREFIX, environ, flags={"seed_peer.enable": True})
    assert config.upload.slots == 20
    assert config.upload.rate_limit_bytes_per_s == 5
    assert config.seed_peer.enable is True


def test_a_flag_is_validated_with_the_rest_of_the_config(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("upload:\n  disable_shared: true\n")
    with pytest.raises(ConfigError, match="a seed peer must upload"):
        load_config(DaemonConfig, path, PREFIX, {}, flags={"seed_peer.enable": True})
