"""The local API socket's group and mode are set on the socket just bound, never through a link: a
socket swapped for a symlink between bind and chmod (a directory others can write to) must not make the
daemon, often root, chmod or chown the link's target."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from dfly.daemon.local_api import set_socket_access


def test_the_socket_gets_its_group_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        set_socket_access(path, os.getgid(), 0o660)
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == os.getgid()


def test_a_symlink_in_the_sockets_place_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "shadow"
    target.write_text("secret")
    target.chmod(0o600)
    path = tmp_path / "d.sock"
    path.symlink_to(target)
    with pytest.raises(OSError, match="no longer the socket"):
        set_socket_access(path, os.getgid(), 0o666)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
