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
        (b'scheduler: {addrs: ["bad host:8002"]}\n', "must be host:port"),  # were retried forever
        (b'scheduler: {addrs: ["[1::zz]:8002"]}\n', "must be host:port"),
        (b'scheduler: {addrs: ["a:8002", "a:8002"]}\n', "a scheduler address is listed twice"),
        (b'host: {advertise_ip: "fd00::1"}\n', "host.advertise_ip fd00::1 is IPv6 but piece.ip 0.0.0.0"),
        (b'host: {hostname: ""}\n', "host.hostname"),
        (b'host: {hostname: "a\\nb"}\n', "host.hostname: Value error, must be printable text"),
        (b'host: {location: "a\\x00b"}\n', "host.location"),
        (b'host: {advertise_ip: "::"}\n', "host.advertise_ip: Value error, :: is a wildcard, not an address"),
        (b'host: {advertise_ip: "0.0.0.0"}\n', "0.0.0.0 is a wildcard"),
        (b'host: {advertise_ip: "ff02::1"}\n', "ff02::1 is a multicast address"),
        # a key written twice: YAML keeps the last silently, undoing the first unseen
        (
            b"upload:\n  slots: 10\nscheduler: {}\nupload:\n  slots: 1\n",
            "not valid YAML at line 4, column 1: key 'upload' appears twice in one mapping",
        ),
        (b"upload: {slots: 10, slots: 1}\n", "key 'slots' appears twice"),
        (b"scheduler: {keepalive_interval_s: 0.000001}\n", "scheduler.keepalive_interval_s"),  # a busy core
        # Python cannot hold these: RecursionError, ValueError tracebacks
        (b"upload: " + b"[" * 5000 + b"]" * 5000 + b"\n", "not valid YAML: nested too deeply"),
        (b"upload: {slots: " + b"9" * 5000 + b"}\n", "not valid YAML: Exceeds the limit"),
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


def test_a_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("upload:\n  <<: {slots: 10, rate_limit_bytes_per_s: 5}\n  slots: 20\n")
    config = load_config(DaemonConfig, path, PREFIX, {})
    assert (config.upload.slots, config.upload.rate_limit_bytes_per_s) == (20, 5)


def test_a_hostname_with_a_byte_that_is_not_utf8_is_refused() -> None:
    """The environment gives such a byte as a lone surrogate: it passed, then the daemon's first announce
    and its stop failed on it with tracebacks, and the storage was never closed cleanly."""
    environ = {f"{PREFIX}__HOST__HOSTNAME": "node\udcff"}
    with pytest.raises(ConfigError, match=re.escape("host.hostname")):
        load_config(DaemonConfig, None, PREFIX, environ)


def test_an_environment_value_python_cannot_hold_is_one_line_too() -> None:
    environ = {f"{PREFIX}__UPLOAD__SLOTS": "[" * 5000 + "]" * 5000}
    with pytest.raises(ConfigError, match=re.escape("upload.slots")) as info:
        load_config(DaemonConfig, None, PREFIX, environ)
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


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (
            "storage: {commit_interval_s: .inf}",
            "storage.commit_interval_s",
            "Input should be a finite number",
        ),
        ("gc: {interval_s: .nan}", "gc.interval_s", "Input should be a finite number"),
        # finite, but past what timers take (queue.get raised OverflowError in the writer thread)
        (
            "download: {no_parent_timeout_s: 1e300}",
            "download.no_parent_timeout_s",
            "at most 31622400 seconds",
        ),
        ("metrics: {port: true}", "metrics.port", "a number is needed, not true"),
        ("control: {port: yes}", "control.port", "a number is needed, not true"),  # YAML 1.1's yes
        ("download: {max_parents: false}", "download.max_parents", "a number is needed, not false"),
        ("upload: {first_pass_hold_s: .inf}", "upload.first_pass_hold_s", "finite"),
    ],
)
def test_numbers_are_finite_durations_bounded_and_never_booleans(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    """Each was accepted: `.inf` as commit_interval_s then failed every download with OverflowError and
    tracebacks in the log; `port: true` listened on port 1."""
    path = tmp_path / "d.yaml"
    path.write_text(f"scheduler: {{addrs: ['127.0.0.1:8002']}}\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(DaemonConfig, path, "DFLY_TEST_NONE")
    assert str(info.value).startswith(f"invalid config key {key}: "), info.value
    assert reason in str(info.value)


def test_the_environment_gets_the_same_number_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("scheduler: {addrs: ['127.0.0.1:8002']}\n")
    monkeypatch.setenv("DFLY_TEST__CONTROL__PORT", "yes")
    with pytest.raises(ConfigError, match=r"control\.port: Value error, a number is needed, not true"):
        load_config(DaemonConfig, path, "DFLY_TEST")
    monkeypatch.setenv("DFLY_TEST__CONTROL__PORT", "4000")
    monkeypatch.setenv("DFLY_TEST__GC__TASK_TTL_S", ".inf")
    with pytest.raises(ConfigError, match=r"gc\.task_ttl_s: Input should be a finite number"):
        load_config(DaemonConfig, path, "DFLY_TEST")


def test_the_scheduler_config_gets_the_same_rules(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("metrics: {port: on}\n")
    with pytest.raises(ConfigError, match=r"metrics\.port: Value error, a number is needed, not true"):
        load_config(SchedulerConfig, path, "DFLY_TEST_NONE")


def test_a_text_key_from_the_environment_takes_the_value_as_written() -> None:
    """YAML would read `::` as a mapping, `123456` and `1234` as numbers, `no` as false, `#secret` as
    nothing: a text key takes the variable's text."""
    environ = {
        f"{PREFIX}__METRICS__IP": "::",
        f"{PREFIX}__PROXY__BASIC_AUTH_USERNAME": "admin",
        f"{PREFIX}__PROXY__BASIC_AUTH_PASSWORD": "#secret: 1",
        f"{PREFIX}__HOST__HOSTNAME": "1234",
        f"{PREFIX}__HOST__IDC": "no",
    }
    config = load_config(DaemonConfig, None, PREFIX, environ)
    assert config.metrics.ip == "::"
    assert config.proxy.basic_auth_password == "#secret: 1"
    assert (config.host.hostname, config.host.idc) == ("1234", "no")
    scheduler = load_config(SchedulerConfig, None, "DFLY_SCHEDULER", {"DFLY_SCHEDULER__METRICS__IP": "::"})
    assert scheduler.metrics.ip == "::"


def test_a_list_key_from_the_environment_takes_one_value_or_a_yaml_list() -> None:
    one = load_config(DaemonConfig, None, PREFIX, {f"{PREFIX}__SCHEDULER__ADDRS": "10.0.0.1:8002"})
    assert one.scheduler.addrs == ["10.0.0.1:8002"]
    several = {f"{PREFIX}__SCHEDULER__ADDRS": "[10.0.0.1:8002, 10.0.0.2:8002]"}
    assert load_config(DaemonConfig, None, PREFIX, several).scheduler.addrs == [
        "10.0.0.1:8002",
        "10.0.0.2:8002",
    ]


def test_other_keys_from_the_environment_are_still_read_as_yaml_and_checked() -> None:
    config = load_config(DaemonConfig, None, PREFIX, {f"{PREFIX}__UPLOAD__SLOTS": "7"})
    assert config.upload.slots == 7
    with pytest.raises(ConfigError, match=r"metrics\.ip: Value error, 'not-an-ip' is not an IP address"):
        load_config(DaemonConfig, None, PREFIX, {f"{PREFIX}__METRICS__IP": "not-an-ip"})
    with pytest.raises(ConfigError, match=r"invalid config key metrics\.nope"):
        load_config(DaemonConfig, None, PREFIX, {f"{PREFIX}__METRICS__NOPE": "1"})


def test_a_text_key_unquotes_a_yaml_quoted_value_and_drops_a_trailing_newline() -> None:
    """What used to be the only way to give a number as text ('"123456"') keeps working, and a secret
    mounted from a file keeps no newline."""
    environ = {
        f"{PREFIX}__PROXY__BASIC_AUTH_USERNAME": "'ops'",
        f"{PREFIX}__PROXY__BASIC_AUTH_PASSWORD": '"123456"',
        f"{PREFIX}__HOST__HOSTNAME": "node-7\n",
        f"{PREFIX}__STORAGE__DIR": "/var/lib/#dfly",  # a path key is text too
    }
    config = load_config(DaemonConfig, None, PREFIX, environ)
    assert (config.proxy.basic_auth_username, config.proxy.basic_auth_password) == ("ops", "123456")
    assert config.host.hostname == "node-7"
    assert str(config.storage.dir) == "/var/lib/#dfly"


def test_an_empty_variable_clears_a_list_key() -> None:
    """`VAR=` is no pattern at all (an empty one matched every host and URL), and an empty scheduler
    list is still refused by its own check."""
    environ = {f"{PREFIX}__PROXY__RULES": "", f"{PREFIX}__PROXY__HIJACK_HTTPS__HOSTS": " "}
    config = load_config(DaemonConfig, None, PREFIX, environ)
    assert (config.proxy.rules, config.proxy.hijack_https.hosts) == ([], [])
    with pytest.raises(ConfigError, match=r"scheduler\.addrs: .*at least one scheduler address"):
        load_config(DaemonConfig, None, PREFIX, {f"{PREFIX}__SCHEDULER__ADDRS": ""})


def test_one_list_value_that_starts_with_a_bracket_is_one_item() -> None:
    environ = {f"{PREFIX}__SCHEDULER__ADDRS": "[::1]:8002", f"{PREFIX}__PROXY__RULES": "[0-9a-f]{64}"}
    config = load_config(DaemonConfig, None, PREFIX, environ)
    assert (config.scheduler.addrs, config.proxy.rules) == (["[::1]:8002"], ["[0-9a-f]{64}"])
    quoted = {f"{PREFIX}__PROXY__RULES": r"['\.bin(\?|$)', '\.whl$']"}
    assert load_config(DaemonConfig, None, PREFIX, quoted).proxy.rules == [r"\.bin(\?|$)", r"\.whl$"]
    with pytest.raises(ConfigError, match=r"^invalid config key proxy\.rules: .* \(quote the items"):
        load_config(DaemonConfig, None, PREFIX, {f"{PREFIX}__PROXY__RULES": r"[\.bin(\?|$), \.whl$]"})


def test_a_section_with_every_key_commented_out_has_its_defaults(tmp_path: Path) -> None:
    """YAML reads such a section as null: it was refused ("Input should be a valid dictionary or instance
    of GcSection"), for the daemon and the scheduler alike."""
    path = tmp_path / "d.yaml"
    path.write_text("gc:\n  # interval_s: 900\nsecurity:\n  tls:\n")
    assert load_config(DaemonConfig, path, "DFLY_TEST_NONE").gc == DaemonConfig().gc
    path.write_text("scheduling:\n  # retry_limit: 5\n")
    assert load_config(SchedulerConfig, path, "DFLY_TEST_NONE").scheduling == SchedulerConfig().scheduling
    path.write_text("gc:\n  interval_s:\n")  # a key without a value is still an error
    with pytest.raises(ConfigError, match=r"gc\.interval_s"):
        load_config(DaemonConfig, path, "DFLY_TEST_NONE")


def test_a_seed_is_not_counted_failed_before_its_trigger_may_end(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("scheduling: {seed_register_timeout_s: 1}\nseed_trigger: {timeout_s: 60}\n")
    with pytest.raises(ConfigError, match=r"seed_register_timeout_s \(1\) must be above seed_trigger"):
        load_config(SchedulerConfig, path, "DFLY_TEST_NONE")
