"""dfget flag parsing and validation: exit 2 cases with their message, durations, headers, defaults."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dfly.cli import dfget
from dfly.cli._dfget_output import OutputFile
from dfly.common.errors import UsageError
from dfly.common.ids import DEFAULT_FILTERED_QUERY_PARAMS

URL = "http://origin.test/a/file.bin"
SHA = "sha256:" + "ab" * 32


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = dfget.main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--digest", "md5:abc"], "invalid digest"),
        (["--digest", "sha256:abc"], "expected 64 hex characters"),
        (["--digest", "crc32:-1"], "invalid crc32 digest"),
        (["--digest", "crc32:²"], "invalid crc32 digest"),  # str.isdigit() takes it; int() does not
        (["--digest", "crc32:١٢٣"], "invalid crc32 digest"),  # other scripts' digits
        (["--piece-length", "3MiB"], "must be a power of two"),
        (["--piece-length", "32KiB"], "must be a power of two"),
        (["--piece-length", "big"], "invalid size"),
        (["--timeout", "10x"], "invalid duration"),
        (["--timeout", "0s"], "must be positive"),
        (["--timeout", "1000000d"], "longer than a year"),  # overflowed time_t with a traceback
        (["--timeout", "99999999999999999999999"], "longer than a year"),
        (["-H", "NoColon"], "invalid header"),
        (["-H", ": empty-name"], "invalid header"),
        (["-H", "Range: bytes=0-1"], "header 'Range' cannot be set"),  # was dropped: the whole file, exit 0
        (["-H", "host: other"], "header 'host' cannot be set"),
        (["-H", "If-None-Match: x"], "header 'If-None-Match' cannot be set"),
        (["--overwrite", "--force-hard-link"], "--overwrite cannot be combined with --force-hard-link"),
    ],
)
def test_invalid_flags_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], fragment: str
) -> None:
    code, err = run(capsys, URL, "-O", str(tmp_path / "out"), "-e", str(tmp_path / "no.sock"), *extra)
    assert code == 2
    assert err.startswith("dfget: ")
    assert err.count("\n") == 1
    assert fragment in err


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://origin.test/f", "unsupported URL scheme"),
        ("http:///no-host", "URL has no host"),
        ("http://origin.test:99999/f", "invalid URL"),
        ("origin.test/f", "is not a URL: expected http(s)://host/"),
        ("notaurl?token=s3cret", "'notaurl?…' is not a URL"),
    ],
)
def test_invalid_urls_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str, fragment: str
) -> None:
    code, err = run(capsys, url, "-O", str(tmp_path / "out"))
    assert code == 2
    assert fragment in err


def test_output_checks(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run(capsys, URL, "-O", str(tmp_path / "missing-dir" / "out"))
    assert code == 2
    assert f"output directory {tmp_path / 'missing-dir'} does not exist" in err
    (tmp_path / "a-file").write_bytes(b"")
    code, err = run(capsys, URL, "-O", str(tmp_path / "a-file" / "out"))
    assert code == 2
    assert f"output directory {tmp_path / 'a-file'} is not a directory" in err
    # found only after the whole download: "cannot place ...: File name too long", exit 1
    code, err = run(capsys, URL, "-O", str(tmp_path / ("n" * 256)))
    assert (code, err) == (
        2,
        f"dfget: output file name is longer than 255 bytes, the most {tmp_path} takes\n",
    )
    code, err = run(capsys, URL, "-O", str(tmp_path / "no\ndir" / "x"))  # one line, the newline escaped
    assert (code, err) == (2, f"dfget: output directory {tmp_path}/no\\ndir does not exist\n")
    code, err = run(capsys, URL, "-O", str(tmp_path / "out"), "-e", "")
    assert (code, err) == (2, "dfget: daemon socket is empty (-e / DFGET_ENDPOINT)\n")
    code, err = run(capsys, URL, "-O", str(tmp_path))
    assert code == 2
    assert "is a directory" in err
    code, err = run(
        capsys, URL, "-O", ""
    )  # abspath("") is the working directory: not "output  is a directory"
    assert code == 2
    assert err == "dfget: output path is empty (-O)\n"
    existing = tmp_path / "existing"
    existing.write_bytes(b"keep")
    code, err = run(capsys, URL, "-O", str(existing))
    assert code == 2
    assert "already exists (use --overwrite" in err
    assert existing.read_bytes() == b"keep"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    code, err = run(capsys, URL, "-O", str(dangling))
    assert code == 2
    assert "already exists" in err
    code, err = run(capsys, URL, "-O", str(tmp_path / "newdir") + "/")  # a trailing slash names a directory
    assert (code, err) == (2, f"dfget: output {tmp_path}/newdir/ ends with /: it must name a file\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # as /dev/null would be: --overwrite must not rename a regular file over it
    code, err = run(capsys, URL, "-O", str(fifo), "--overwrite")
    assert code == 2
    assert "is not a regular file" in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_long_output_name_still_gets_a_temporary_file(tmp_path: Path) -> None:
    out = OutputFile(str(tmp_path / ("n" * 250)), nameless=False)  # NAME_MAX 255: ".<name>.dfget-<hex>" …
    try:
        assert os.path.exists(out.tmp_path)
    finally:
        out.discard()


def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, URL)
    assert code == 2
    assert "-O/--output" in err
    code, err = run(capsys, URL, "-O", "x", "--no-such-flag")
    assert code == 2
    # Dragonfly's `--filter 'a&b'` was taken as an abbreviation of --filtered-query-param: one filter
    # named "a&b", exit 0; long options are taken only spelled out
    code, err = run(capsys, URL, "-O", "x", "--filter", "a&b")
    assert (code, err) == (2, "dfget: unrecognized arguments: --filter a&b (see dfget --help)\n")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert dfget.main(["-V"]) == 0
    assert capsys.readouterr().out.startswith("dfget ")


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFGET_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    opts = dfget.parse_args([URL, "-O", "out.bin"])
    assert opts.output == str(tmp_path / "out.bin")
    assert opts.endpoint == "/run/dfly/dfdaemon.sock"
    assert opts.timeout_s == 7200
    assert opts.filtered_query_params == DEFAULT_FILTERED_QUERY_PARAMS
    assert (opts.digest, opts.piece_length, opts.headers) == (None, None, {})
    assert opts.progress
    assert (opts.overwrite, opts.force_hard_link, opts.disable_back_to_source) == (False, False, False)


def test_flags_are_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFGET_ENDPOINT", "/tmp/from-env.sock")
    argv = [URL, "-O", str(tmp_path / "o"), "--digest", SHA.upper().replace("SHA256", "sha256")]
    argv += ["--filtered-query-param", "token", "--filtered-query-param", "ns", "--piece-length", "1MiB"]
    argv += ["-H", "X-A: 1", "--header", "x-a: 2", "--timeout", "1h30m", "--no-progress", "--overwrite"]
    opts = dfget.parse_args(argv)
    assert opts.endpoint == "/tmp/from-env.sock"
    assert str(opts.digest) == SHA
    assert opts.filtered_query_params == (*DEFAULT_FILTERED_QUERY_PARAMS, "token")
    assert opts.piece_length == 1024 * 1024
    assert opts.headers == {"X-A": "1, 2"}
    assert (opts.timeout_s, opts.timeout_text) == (5400, "1h30m")
    assert not opts.progress
    assert opts.overwrite
    assert dfget.parse_args([*argv, "-e", "/x.sock"]).endpoint == "/x.sock"


def test_no_default_filters_keeps_only_user_filters(tmp_path: Path) -> None:
    argv = [URL, "-O", str(tmp_path / "o"), "--no-default-filters", "--filtered-query-param", "sig"]
    assert dfget.parse_args(argv).filtered_query_params == ("sig",)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("2h", 7200),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("1d", 86400),
        ("90", 90),
        (" 2H ", 7200),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert dfget.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10x", "-5s", "1h 30m", "0", "0ms", "h1"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        dfget.parse_duration(text)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["A: b"], {"A": "b"}),
        (["A:b"], {"A": "b"}),
        (["X-Url: http://h:1/p"], {"X-Url": "http://h:1/p"}),
        (["Empty:"], {"Empty": ""}),
        (["Accept: a", "accept: b", "ACCEPT: c"], {"Accept": "a, b, c"}),
        (["A: 1", "B: 2"], {"A": "1", "B": "2"}),
    ],
)
def test_parse_headers(values: list[str], expected: dict[str, str]) -> None:
    assert dfget.parse_headers(values) == expected


@pytest.mark.parametrize("text", ["no colon", ": v", "Bad Name: v", "\t: x"])
def test_parse_headers_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="invalid header"):
        dfget.parse_headers([text])
