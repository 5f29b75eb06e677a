"""dfget's output file: copy with and without copy_file_range, digest check, atomic placing, cleanup."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfly.cli._dfget_client import error_from_event
from dfly.cli._dfget_output import OutputFile
from dfly.common.digest import parse_digest
from dfly.common.errors import DigestMismatch, DownloadTimeout, SourceError, StorageError

DATA = bytes(range(256)) * 1000


@pytest.fixture
def task_fd(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "task"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def temps(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".dfget-" in p.name]


def fill(out: OutputFile, fd: int, piece: int = 100_000) -> None:
    out.allocate(len(DATA))
    for offset in reversed(range(0, len(DATA), piece)):
        out.copy(fd, offset, min(piece, len(DATA) - offset))


@pytest.mark.parametrize("nameless", [True, False])
def test_temporary_name_and_placing(tmp_path: Path, task_fd: int, nameless: bool) -> None:
    out = OutputFile(str(tmp_path / "f.bin"), nameless=nameless)
    assert out.nameless is nameless  # this machine's filesystems all have O_TMPFILE
    assert Path(out.tmp_path).name.startswith(".f.bin.dfget-")
    fill(out, task_fd)
    # nameless: nothing in the directory while it downloads, so a dfget killed outright leaves nothing
    assert temps(tmp_path) == ([] if nameless else [Path(out.tmp_path).name])
    out.verify(parse_digest("sha256:" + hashlib.sha256(DATA).hexdigest()))
    out.place(overwrite=False)
    out.discard()  # after placing: a no-op
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert temps(tmp_path) == []


@pytest.mark.parametrize("err", [errno.EXDEV, errno.ENOSYS, errno.EINVAL])
def test_copy_falls_back_to_pread_pwrite(
    tmp_path: Path, task_fd: int, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    calls = []

    def refuse(*args: object) -> int:
        calls.append(args)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    out = OutputFile(str(tmp_path / "f"))
    fill(out, task_fd)
    out.place(overwrite=False)
    assert (tmp_path / "f").read_bytes() == DATA
    assert len(calls) == 1  # the fallback is remembered


def test_short_task_file_is_an_error(tmp_path: Path, task_fd: int) -> None:
    out = OutputFile(str(tmp_path / "f"))
    with pytest.raises(StorageError, match="task file ended"):
        out.copy(task_fd, len(DATA) - 10, 20)
    out.discard()
    assert temps(tmp_path) == []


def test_digest_mismatch_message(tmp_path: Path, task_fd: int) -> None:
    out = OutputFile(str(tmp_path / "f"))
    fill(out, task_fd)
    with pytest.raises(DigestMismatch, match=r"^digest mismatch: expected crc32:1 got crc32:\d+$"):
        out.verify(parse_digest("crc32:1"))
    out.discard()
    assert list(tmp_path.iterdir()) == [Path(tmp_path / "task")]


@pytest.mark.parametrize("nameless", [True, False])
def test_path_that_appears_meanwhile_is_not_clobbered(tmp_path: Path, task_fd: int, nameless: bool) -> None:
    out = OutputFile(str(tmp_path / "f"), nameless=nameless)
    fill(out, task_fd)
    (tmp_path / "f").write_bytes(b"theirs")
    with pytest.raises(StorageError, match="appeared during the download"):
        out.place(overwrite=False)
    out.discard()
    assert (tmp_path / "f").read_bytes() == b"theirs"
    assert temps(tmp_path) == []


@pytest.mark.parametrize("nameless", [True, False])
def test_overwrite_replaces(tmp_path: Path, task_fd: int, nameless: bool) -> None:
    (tmp_path / "f").write_bytes(b"old")
    out = OutputFile(str(tmp_path / "f"), nameless=nameless)
    fill(out, task_fd)
    out.place(overwrite=True)
    assert (tmp_path / "f").read_bytes() == DATA
    assert temps(tmp_path) == []


def test_temporary_file_needs_the_directory(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot create a temporary file in"):
        OutputFile(str(tmp_path / "missing" / "f"))


def test_hard_link_shares_the_inode(tmp_path: Path, task_fd: int) -> None:
    out = OutputFile(str(tmp_path / "f"))
    out.link_task_file(task_fd, str(tmp_path / "task"))
    out.place(overwrite=False)
    assert (tmp_path / "f").stat().st_ino == (tmp_path / "task").stat().st_ino
    assert temps(tmp_path) == []


def test_hard_link_goes_through_the_passed_fd(tmp_path: Path, task_fd: int) -> None:
    """The daemon passes an open fd of the task file: the link is made to that inode, even when its path
    now names another file (os.link without a dir fd called link(2), which never follows /proc/self/fd)."""
    (tmp_path / "task").rename(tmp_path / "moved")
    (tmp_path / "task").write_bytes(b"another file")
    out = OutputFile(str(tmp_path / "f"))
    out.link_task_file(task_fd, str(tmp_path / "task"))
    out.place(overwrite=False)
    assert (tmp_path / "f").stat().st_ino == (tmp_path / "moved").stat().st_ino
    assert (tmp_path / "f").read_bytes() == DATA


def test_hard_link_cross_device_is_explained(
    tmp_path: Path, task_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", cross)
    out = OutputFile(str(tmp_path / "f"))
    with pytest.raises(StorageError, match="on another filesystem"):
        out.link_task_file(task_fd, str(tmp_path / "task"))
    out.discard()
    assert temps(tmp_path) == []


def test_error_events_map_to_the_error_tree() -> None:
    err = error_from_event(
        {"event": "error", "kind": "source", "message": "origin said no", "status_code": 403}
    )
    assert isinstance(err, SourceError)
    assert (err.status_code, str(err)) == (403, "origin said no (status 403)")
    err = error_from_event(
        {"event": "error", "kind": "source", "message": "got 404 Not Found", "status_code": 404}
    )
    assert str(err) == "got 404 Not Found"
    assert isinstance(
        error_from_event({"event": "error", "kind": "timeout", "message": "m"}), DownloadTimeout
    )
    unknown = error_from_event({"event": "error", "kind": "new-kind", "message": "m"})
    assert (type(unknown).__name__, unknown.exit_code) == ("DflyError", 1)


@pytest.mark.parametrize("nameless", [True, False])
def test_a_directory_that_may_be_written_but_not_read_takes_the_output(
    tmp_path: Path, task_fd: int, nameless: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drop box (mode 0733: write and search, no read): opening it to read failed with EACCES only once
    the whole file was downloaded, when placing it, or after it was placed (the directory's fsync). As
    root no mode refuses us, so the kernel's answer to a non-root user is given here."""
    real_open = os.open

    def no_listing(path: str, flags: int, mode: int = 0o777, **kwargs: object) -> int:
        reads = flags & os.O_TMPFILE != os.O_TMPFILE and not flags & os.O_PATH  # O_TMPFILE needs write only
        if os.fspath(path) == str(tmp_path) and flags & os.O_DIRECTORY and reads:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_listing)
    out = OutputFile(str(tmp_path / "out.bin"), nameless=nameless)
    fill(out, task_fd)
    out.place(overwrite=False)
    monkeypatch.undo()
    assert (tmp_path / "out.bin").read_bytes() == DATA
    assert temps(tmp_path) == []
