"""load_config: the file, then environment variables, then command-line flags; validated once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dfly.common.config import load_config
from dfly.common.errors import ConfigError
from dfly.daemon.config import DaemonConfig
from dfly.scheduler.config import SchedulerConfig

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


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\xff\xfe\x00x: 1\n", "is not UTF-8 text (byte 0)"),
        (b"upload:\n\tslots: 1\n", "not valid YAML at line 2, column 1"),
        (b"upload: {slots: 99999999999}\n", "upload.slots"),
        (b"upload: {rate_limit_bytes_per_s: 99999999999999999999999}\n", "upload.rate_limit_bytes_per_s"),
        (b'storage: {dir: ""}\n', "storage.dir"),
        (b'local_api: {socket: " "}\n', "local_api.socket"),
        (b'local_api: {mode: "660"}\n', "'660' is not an octal mode: write it with a leading 0, e.g. 0660"),
        # YAML reads an unquoted 440 as decimal: 0o670, group-writable; it was taken silently
        (
            b"local_api: {mode: 440}\n",
            "440 is a decimal number here: write the mode in octal with a leading 0",
        ),
        (b'scheduler: {addrs: ["127.0.0.1:99999"]}\n', "must be host:port"),
        (b'scheduler: {addrs: ["[::1:8002"]}\n', "must be host:port"),
        (b'scheduler: {addrs: ["::1:8002"]}\n', "must be host:port"),
        (b'scheduler: {addrs: ["http://127.0.0.1:8002"]}\n', "must be host:port"),
    ],
)
def test_bad_config_files_are_one_line_naming_the_problem(
    tmp_path: Path, content: bytes, fragment: str
) -> None:
    path = tmp_path / "d.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
        load_config(DaemonConfig, path, PREFIX, {})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["0660", '"0660"', '"0o660"'])
def test_a_socket_mode_is_octal_quoted_or_not(tmp_path: Path, text: str) -> None:
    """A quoted "0660" (as chmod takes it) was read as decimal 660 and refused as above 511."""
    path = tmp_path / "d.yaml"
    path.write_text(f"local_api: {{mode: {text}}}\n")
    assert load_config(DaemonConfig, path, PREFIX, {}).local_api.mode == 0o660


def test_a_decimal_socket_mode_from_the_environment_is_refused_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="440 is a decimal number here"):
        load_config(DaemonConfig, None, PREFIX, {f"{PREFIX}__LOCAL_API__MODE": "440"})
    assert (
        load_config(DaemonConfig, None, PREFIX, {f"{PREFIX}__LOCAL_API__MODE": "0440"}).local_api.mode
        == 0o440
    )
    assert load_config(DaemonConfig, None, PREFIX, {f"{PREFIX}__UPLOAD__SLOTS": "440"}).upload.slots == 440


def test_good_scheduler_addresses_pass(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text('scheduler: {addrs: ["127.0.0.1:8002", "[::1]:8002", "scheduler.example:65535"]}\n')
    assert len(load_config(DaemonConfig, path, PREFIX, {}).scheduler.addrs) == 3


def test_the_schedulers_message_limit_is_what_grpc_takes(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("max_message_bytes: 99999999999\n")
    with pytest.raises(ConfigError, match="max_message_bytes"):
        load_config(SchedulerConfig, path, "DFLY_SCHEDULER", {})
