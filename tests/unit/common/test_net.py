"""listen_socket: `::` is every interface (IPv4 too), a specific address only itself."""

from __future__ import annotations

import socket

import pytest

from dfly.common.net import host_port, listen_socket


def reaches(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_ipv4_address_listens_on_ipv4() -> None:
    with listen_socket("127.0.0.1", 0) as sock:
        assert not sock.getblocking()
        assert reaches("127.0.0.1", sock.getsockname()[1])


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no dual-stack IPv6 sockets here")
def test_unspecified_ipv6_address_takes_ipv4_and_ipv6() -> None:
    with listen_socket("::", 0) as sock:
        port = sock.getsockname()[1]
        assert reaches("127.0.0.1", port)
        assert reaches("::1", port)


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 here")
def test_a_specific_ipv6_address_is_ipv6_only() -> None:
    with listen_socket("::1", 0) as sock:
        port = sock.getsockname()[1]
        assert reaches("::1", port)
        assert not reaches("127.0.0.1", port)


def test_a_taken_port_is_the_bind_oserror() -> None:
    with listen_socket("127.0.0.1", 0) as sock, pytest.raises(OSError, match="Address already in use"):
        listen_socket("127.0.0.1", sock.getsockname()[1])


def test_host_port_brackets_ipv6_addresses_only() -> None:
    assert host_port("10.0.0.1", 8002) == "10.0.0.1:8002"
    assert host_port("::", 8002) == "[::]:8002"
    assert host_port("fe80::1", 443) == "[fe80::1]:443"
    assert host_port("registry.example", 443) == "registry.example:443"
