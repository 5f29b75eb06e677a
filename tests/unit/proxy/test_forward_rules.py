"""Forward-proxy decisions (daemon/proxy/forward.py): targets, P2P rules, link-local refusal."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from dfly.daemon.proxy.forward import (
    UpstreamResolver,
    compile_rules,
    hop_guard,
    never_upstream,
    refuse_link_local,
    target_origin,
    task_keys,
    use_p2p,
)
from dfly.daemon.proxy.registry import BadRequest, Forbidden

RULES = compile_rules([r"blobs/sha256.*", r"\.safetensors$"])
ALLOWED = frozenset({"http://127.0.0.1:8080", "https://files.example.com"})


@pytest.mark.parametrize(
    ("method", "url", "headers", "p2p"),
    [
        ("GET", "http://127.0.0.1:8080/v2/a/blobs/sha256:ab", {}, True),
        ("GET", "https://files.example.com/m/model.safetensors", {}, True),
        ("GET", "https://files.example.com/notes.txt", {}, False),
        ("GET", "https://files.example.com/notes.txt", {"X-Dragonfly-Use-P2P": "true"}, True),
        ("GET", "https://files.example.com/notes.txt", {"X-Dragonfly-Use-P2P": "false"}, False),
        ("HEAD", "https://files.example.com/m/model.safetensors", {}, False),
        ("GET", "https://files.example.com/m/model.safetensors", {"Authorization": "Bearer x"}, False),
        ("GET", "https://files.example.com/m/model.safetensors", {"Cookie": "s=1"}, False),
    ],
)
def test_use_p2p(method: str, url: str, headers: dict[str, str], p2p: bool) -> None:
    assert use_p2p(method, url, headers, RULES) is p2p


def test_registry_blobs_with_checked_credentials_may_go_through_p2p() -> None:
    url = "http://127.0.0.1:8080/v2/a/blobs/sha256:ab"
    assert use_p2p("GET", url, {"Authorization": "Bearer t"}, RULES, credentials_checked=True)
    assert not use_p2p("GET", url, {"Cookie": "s=1"}, RULES, credentials_checked=True)
    assert not use_p2p("HEAD", url, {}, RULES, credentials_checked=True)


def test_targets_must_be_allowed() -> None:
    assert target_origin("http://127.0.0.1:8080/x?y=1", ALLOWED) == "http://127.0.0.1:8080"
    with pytest.raises(Forbidden):
        target_origin("http://127.0.0.1:8081/x", ALLOWED)
    with pytest.raises(BadRequest):
        target_origin("ftp://files.example.com/x", ALLOWED)
    for broken in ("http://[/x", "https://[::1:443/", "http://]/", "http://\uff03x/"):
        with pytest.raises(BadRequest):
            target_origin(broken, ALLOWED)


def test_invalid_rules_are_a_clear_error() -> None:
    with pytest.raises(BadRequest, match="invalid proxy rule"):
        compile_rules(["(unclosed"])


@pytest.mark.parametrize(
    "origin", ["http://169.254.169.254", "http://169.254.1.2:8080", "http://100.100.100.200"]
)
def test_link_local_and_metadata_addresses_are_refused_even_when_allowed(origin: str) -> None:
    with pytest.raises(Forbidden, match="link-local or metadata"):
        asyncio.run(refuse_link_local(origin))


def test_ordinary_addresses_pass() -> None:
    asyncio.run(refuse_link_local("http://127.0.0.1:8080"))


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("169.254.169.254", True),
        ("::ffff:169.254.169.254", True),  # IPv4-mapped: the kernel connects to the IPv4 address
        ("::169.254.169.254", True),  # IPv4-compatible
        ("64:ff9b::a9fe:a9fe", True),  # NAT64 well-known prefix
        ("::ffff:100.100.100.200", True),
        ("fe80::1%eth0", True),
        ("::ffff:127.0.0.1", False),
        ("64:ff9b::808:808", False),
        ("2001:db8::a9fe:a9fe", False),  # another prefix: its last 32 bits are not an IPv4 destination
        ("127.0.0.1", False),
    ],
)
def test_metadata_addresses_are_recognised_in_every_spelling(address: str, refused: bool) -> None:
    assert never_upstream(address) is refused


def test_a_connect_target_on_the_default_port_matches_the_allowed_origin() -> None:
    assert target_origin("https://files.example.com:443/", ALLOWED) == "https://files.example.com"
    with pytest.raises(Forbidden):
        target_origin("https://files.example.com:8443/", ALLOWED)


def test_hop_guard_checks_origin_and_resolved_address() -> None:
    anyone = hop_guard(())  # downloads not started by the proxy (dfget, seed triggers): any host...
    assert anyone.allowed("https", "files.example.com", 443)
    assert anyone.allowed("http", "10.1.2.3", 8080)
    assert not anyone.allowed("http", "169.254.169.254", 80)  # ...but no link-local or metadata address
    assert not anyone.allowed("http", "fe80::1", 80)
    assert anyone.address_refused("169.254.169.254")
    guard = hop_guard(sorted(ALLOWED | {"http://169.254.169.254"}))
    assert guard.allowed("http", "127.0.0.1", 8080)
    assert guard.allowed("https", "files.example.com", 443)  # unresolvable here: left to the connection
    assert not guard.allowed("http", "127.0.0.1", 8081)  # another port
    assert not guard.allowed("https", "storage.example.com", 443)  # a redirect to a host nobody allowed
    assert not guard.allowed("http", "169.254.169.254", 80)  # allowed, but a metadata address
    assert guard.address_refused("::ffff:169.254.169.254")  # and each connection's own address
    assert not guard.address_refused("127.0.0.1")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", None), ("4MiB", 4 << 20), ("64k", 64 << 10), (" 1048576 ", 1 << 20)],
)
def test_the_piece_length_header_is_a_user_fixed_length(value: str, expected: int | None) -> None:
    assert task_keys({"X-Dragonfly-Piece-Length": value}).piece_length == expected


@pytest.mark.parametrize("value", ["3MiB", "32k", "128MiB", "lots", "-1"])
def test_an_invalid_piece_length_header_is_a_bad_request(value: str) -> None:
    with pytest.raises(BadRequest, match="X-Dragonfly-Piece-Length"):
        task_keys({"X-Dragonfly-Piece-Length": value})


def test_the_proxy_client_refuses_a_name_that_resolves_to_a_metadata_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection's own resolution is checked (a second DNS answer can differ from the first)."""
    answers = {"registry.example": "169.254.169.254", "mapped.example": "::ffff:169.254.169.254"}

    async def fake_resolve(
        self: object, host: str, port: int = 0, family: int = 0
    ) -> list[dict[str, object]]:
        return [{"hostname": host, "host": answers.get(host, "127.0.0.1"), "port": port, "family": family,
                 "proto": 0, "flags": 0}]  # fmt: skip

    monkeypatch.setattr(aiohttp.ThreadedResolver, "resolve", fake_resolve)

    async def scenario() -> None:
        resolver = UpstreamResolver()
        for host in answers:
            with pytest.raises(OSError, match="link-local or metadata"):
                await resolver.resolve(host, 80)
        assert (await resolver.resolve("ok.example", 80))[0]["host"] == "127.0.0.1"
        await resolver.close()

    asyncio.run(scenario())
