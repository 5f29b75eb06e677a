"""The origin reader's SO_RCVLOWAT: never above what is still to come, reads kept short of the end."""

from __future__ import annotations

import socket

from dfly.daemon.source.http import LOWAT_MARGIN_BYTES, READ_CHUNK_BYTES, _LowWater


def _lowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


def test_mark_follows_the_rest_of_the_body_and_reads_stay_short_of_it() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    try:
        water = _LowWater(client)
        water.new_piece()
        cap = min(READ_CHUNK_BYTES, client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 4)
        remaining = 4 * 1024 * 1024
        assert water.read_limit(remaining) == remaining - LOWAT_MARGIN_BYTES
        assert _lowat(client) == cap
        near_end = LOWAT_MARGIN_BYTES + 1000
        assert water.read_limit(near_end) == 1000  # mark 1000: a read asks for at most 1000 bytes
        assert _lowat(client) == 1000
        assert water.read_limit(LOWAT_MARGIN_BYTES) == READ_CHUNK_BYTES  # the tail: mark back to 1
        assert _lowat(client) == 1
        server.sendall(b"x" * 10)
        assert client.recv(100) == b"x" * 10  # with the mark at 1, a short body is not held back
    finally:
        for s in (client, server, listener):
            s.close()


def test_without_a_plain_socket_reads_are_not_limited() -> None:
    water = _LowWater(None)
    water.new_piece()
    assert water.read_limit(10 * 1024 * 1024) == READ_CHUNK_BYTES
