"""dfget's output file: a temporary file next to the output, filled piece by piece, placed atomically.

Rules (DESIGN.md §3 "Output"):
- The temporary file is created by dfget, as the user, in the output's directory (mode 0644 minus umask):
  nameless (`O_TMPFILE`) where the filesystem allows, so a dfget killed outright (SIGKILL, OOM) leaves
  nothing behind; else named `.{name}.dfget-{random}`. Pieces are copied from the daemon's read-only task
  fd with copy_file_range, falling back to pread/pwrite where the kernel or filesystem cannot.
- Placing: whole-file digest check (reading the temporary file), fsync, then `link` (fails if the path
  appeared meanwhile) or, with --overwrite, `rename` (a nameless file is linked to the temporary name
  first); then the directory is fsynced (skipped where it may be written but not read: a drop box).
- `discard()` (any failure, Ctrl-C) removes the temporary file; nothing is ever left at the path.
- `--force-hard-link`: the temporary name is a hard link to the task file itself (same inode as the
  cache); refused with a clear message when the kernel will not link it.
Standard library only.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from dfly.common.errors import DigestMismatch, StorageError

if TYPE_CHECKING:
    from dfly.common.digest import Digest

_EARLY_WRITEBACK_MIN_BYTES = 64 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range, to start writeback of copied pieces early (the final fsync then has
    little left to do: measured 0.3 s of a 1 GiB download otherwise). None where unavailable."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_COPY_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}
# A nameless file is given its name through /proc/self/fd (linkat with AT_SYMLINK_FOLLOW); without
# /proc it could never be placed, so it is not used.
_CAN_LINK_FDS = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
_NO_TMPFILE_ERRNOS = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}
_LINK_UNSUPPORTED_ERRNOS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS}
_READ_CHUNK = 1024 * 1024


def _open_nameless(directory: str) -> int | None:
    """An O_TMPFILE in `directory`, or None where its filesystem has none (other errors raise)."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE_ERRNOS:
            return None
        raise


def _directory_handle(directory: str) -> int:
    """An O_PATH fd of `directory` for the *at calls: it needs no read permission, so a directory we may
    write and search but not list (mode 0733, a drop box) takes the output too."""
    return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


class OutputFile:
    """The temporary file behind one output path."""

    def __init__(self, path: str, *, nameless: bool = True) -> None:
        self.path = os.path.abspath(path)
        directory, name = os.path.split(self.path)
        self.directory = directory
        tmp_name = f".{name}.dfget-{os.urandom(6).hex()}"
        if len(os.fsencode(tmp_name)) > 255:  # NAME_MAX: a long output name leaves no room for the suffix
            tmp_name = f".dfget-{os.urandom(6).hex()}"
        self.tmp_path = os.path.join(directory, tmp_name)
        self._fd: int | None = None
        self._use_copy_file_range = True
        self._writeback: Callable[[int, int, int, int], int] | None = None
        self.linked = False
        self._placed = False
        self.nameless = False
        try:
            if nameless and _CAN_LINK_FDS:
                self._fd = _open_nameless(directory)
                self.nameless = self._fd is not None
            if self._fd is None:
                self._fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot create a temporary file in {directory}: {_reason(exc)}") from None

    @property
    def _shown(self) -> str:
        """The temporary file as messages name it."""
        return f"the temporary file in {self.directory}" if self.nameless else self.tmp_path

    def allocate(self, content_length: int) -> None:
        if content_length >= _EARLY_WRITEBACK_MIN_BYTES:
            self._writeback = _sync_file_range()
        try:
            os.ftruncate(self._require_fd(), content_length)
        except OSError as exc:
            raise StorageError(f"cannot size {self._shown}: {_reason(exc)}") from None

    def link_task_file(self, task_fd: int, task_path: str) -> None:
        """Make the temporary name a hard link to the task file: through the passed fd (the very inode
        the daemon opened), else through its path if that still names the same inode."""
        self._close_fd()
        if self.nameless:
            self.nameless = False  # the name below is the task file's: no bytes of ours to lose
        else:
            os.unlink(self.tmp_path)
        name = os.path.basename(self.tmp_path)
        reasons: list[OSError] = []
        dir_fd = _directory_handle(self.directory)
        try:
            # With a dir fd, CPython calls linkat(2), which follows the /proc magic link with
            # AT_SYMLINK_FOLLOW; a plain link(2) would try to link the symlink itself and always fail.
            for source in (f"/proc/self/fd/{task_fd}", task_path):
                try:
                    os.link(source, name, dst_dir_fd=dir_fd, follow_symlinks=True)
                except OSError as exc:
                    reasons.append(exc)
                    continue
                if _same_inode(os.stat(name, dir_fd=dir_fd), os.fstat(task_fd)):
                    self.linked = True
                    return
                os.unlink(name, dir_fd=dir_fd)  # the path names another file now (replaced meanwhile)
                reasons.append(OSError(errno.ESTALE, f"{task_path} is no longer the task's file"))
        finally:
            os.close(dir_fd)
        first = reasons[0].errno  # the fd's attempt decides: it names the exact file
        if first == errno.EXDEV:
            why = f"the daemon's cache ({task_path}) is on another filesystem than {self.directory}"
        elif first in _LINK_UNSUPPORTED_ERRNOS | {errno.EACCES}:
            why = (
                f"not permitted to link {task_path} (owned by the daemon and not writable by you, see "
                "fs.protected_hardlinks, or links unsupported here)"
            )
        else:
            why = "; ".join(_reason(exc) for exc in reasons)
        raise StorageError(f"--force-hard-link: cannot hard-link the task file: {why}")

    def copy(self, src_fd: int, offset: int, length: int) -> None:
        """Copy bytes [offset, offset+length) of the task file to the same offset of the output."""
        dst_fd = self._require_fd()
        done = 0
        while done < length:
            count = length - done
            pos = offset + done
            try:
                if self._use_copy_file_range:
                    n = os.copy_file_range(src_fd, dst_fd, count, pos, pos)
                else:
                    data = os.pread(src_fd, min(count, _READ_CHUNK), pos)
                    n = os.pwrite(dst_fd, data, pos) if data else 0
            except OSError as exc:
                if self._use_copy_file_range and exc.errno in _COPY_FALLBACK_ERRNOS:
                    self._use_copy_file_range = False
                    continue
                raise StorageError(f"cannot copy into {self._shown}: {_reason(exc)}") from None
            if n == 0:
                raise StorageError(f"the task file ended at byte {pos}, expected {offset + length}")
            done += n
        if self._writeback is not None:
            self._writeback(dst_fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # starts writeback, no wait

    def verify(self, expected: Digest) -> None:
        """Raise DigestMismatch unless the temporary file's bytes have the expected digest."""
        from dfly.common.digest import file_digest

        source = f"/proc/self/fd/{self._require_fd()}" if self.nameless else self.tmp_path
        try:
            got = file_digest(source, expected.algorithm)
        except OSError as exc:
            raise StorageError(f"cannot read {self._shown}: {_reason(exc)}") from None
        if got.value != expected.value:
            raise DigestMismatch(f"digest mismatch: expected {expected} got {got}")

    def place(self, *, overwrite: bool) -> None:
        """fsync, then move the temporary file to the output path atomically, then fsync the directory."""
        try:
            if self._fd is not None:
                os.fsync(self._fd)
            if self.nameless:
                self._name_it(overwrite)
                self._placed = True
                self._fsync_directory()
                return
            self._close_fd()
            if overwrite:
                os.replace(self.tmp_path, self.path)
            else:
                self._link_no_clobber()
            self._placed = True
            self._fsync_directory()
        except FileExistsError:
            raise StorageError(f"{self.path} appeared during the download; not overwritten") from None
        except OSError as exc:
            raise StorageError(f"cannot place {self.path}: {_reason(exc)}") from None

    def _name_it(self, overwrite: bool) -> None:
        """Give the nameless file its output name (through the temporary name when overwriting)."""
        source = f"/proc/self/fd/{self._require_fd()}"
        dir_fd = _directory_handle(self.directory)
        try:
            if not overwrite:  # linkat fails if the path appeared meanwhile: never clobbered
                os.link(source, os.path.basename(self.path), dst_dir_fd=dir_fd, follow_symlinks=True)
            else:
                tmp = os.path.basename(self.tmp_path)
                os.link(source, tmp, dst_dir_fd=dir_fd, follow_symlinks=True)
                try:
                    os.replace(tmp, os.path.basename(self.path), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except BaseException:  # a signal or Ctrl-C between the two calls too: no name left behind
                    os.unlink(tmp, dir_fd=dir_fd)
                    raise
        finally:
            os.close(dir_fd)
            self._close_fd()

    def _link_no_clobber(self) -> None:
        try:
            os.link(self.tmp_path, self.path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _LINK_UNSUPPORTED_ERRNOS:
                raise
            # Filesystems without hard links: check, then rename (a small window instead of none).
            if os.path.lexists(self.path):
                raise FileExistsError(errno.EEXIST, "exists", self.path) from None
            os.rename(self.tmp_path, self.path)
            return
        os.unlink(self.tmp_path)

    def _fsync_directory(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except PermissionError:  # a directory we may write but not read (a drop box): the file is placed
            return  # and itself synced; only its name's durability is left to the kernel
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Remove the temporary file (idempotent; errors ignored: this runs on the failure path)."""
        self._close_fd()
        if self._placed or self.nameless:  # a nameless file goes with its last descriptor
            return
        try:
            os.unlink(self.tmp_path)
        except OSError:
            pass

    def _require_fd(self) -> int:
        if self._fd is None:
            raise StorageError(f"{self._shown} is not open for writing")
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
