"""Registry-mirror routing (daemon/proxy/registry.py): request kinds, upstream choice, refusals."""

from __future__ import annotations

import pytest

from dfly.daemon.proxy.registry import (
    BadRequest,
    Forbidden,
    blob_url,
    choose_upstream,
    normalize_upstream,
    registry_blob,
    route,
)

DIGEST = "sha256:" + "ab" * 32
ALLOWED = frozenset({"http://127.0.0.1:5000", "https://registry.example.com"})


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("GET", "/v2/", "ping"),
        ("HEAD", "/v2", "ping"),
        ("GET", f"/v2/demo/app/blobs/{DIGEST}", "blob"),
        ("GET", f"/v2/library/a-b/c_d/blobs/{DIGEST}", "blob"),
        ("HEAD", f"/v2/demo/app/blobs/{DIGEST}", "pass"),
        ("GET", "/v2/demo/app/manifests/1", "pass"),
        ("GET", "/v2/demo/app/blobs/sha256:short", "pass"),
        ("PUT", "/v2/demo/app/blobs/uploads/x", "pass"),
    ],
)
def test_route(method: str, path: str, kind: str) -> None:
    assert route(method, path).kind == kind


@pytest.mark.parametrize("path", ["/etc/passwd", "/v2/a/../../x", "/v2/a//b", "/v2/a%2f..%2fb", "/"])
def test_paths_that_could_leave_the_registry_api_are_refused(path: str) -> None:
    with pytest.raises(BadRequest):
        route("GET", path)


def test_blob_route_carries_name_and_digest() -> None:
    what = route("GET", f"/v2/demo/app/blobs/{DIGEST}")
    assert (what.name, what.digest) == ("demo/app", DIGEST)
    assert (
        blob_url("http://127.0.0.1:5000", what.name, what.digest)
        == f"http://127.0.0.1:5000/v2/demo/app/blobs/{DIGEST}"
    )


@pytest.mark.parametrize(
    ("value", "normal"),
    [
        ("127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http://127.0.0.1:5000/", "http://127.0.0.1:5000"),
        ("registry.example.com", "https://registry.example.com"),
        ("HTTPS://registry.example.com:443", "https://registry.example.com"),  # default ports dropped
        ("registry.example.com:443", "https://registry.example.com"),
        ("http://files.example.com:80/", "http://files.example.com"),
        ("https://files.example.com:80", "https://files.example.com:80"),
        ("docker.io", "https://registry-1.docker.io"),  # Docker Hub's API host, as containerd uses
        ("https://docker.io", "https://registry-1.docker.io"),
        ("https://index.docker.io", "https://registry-1.docker.io"),  # Dragonfly's default mirror: was a
        # task of its own per layer, and not allowed for containerd's `ns=docker.io` pulls
        ("https://bücher.example", "https://xn--bcher-kva.example"),  # as allowed_hosts lists it
    ],
)
def test_normalize_upstream(value: str, normal: str) -> None:
    assert normalize_upstream(value) == normal


@pytest.mark.parametrize(
    "value",
    [
        "ftp://h",
        "http://h/path",
        "http://",
        "http://h:99999",
        "[",
        "http://[",
        "http://[::1",
        "http://]",
        "\uff03x",
        "http://user:secret@registry.example.com",  # was accepted, the credentials never used
        "https://token@registry.example.com",
    ],
)
def test_bad_upstreams(value: str) -> None:
    with pytest.raises(BadRequest):
        normalize_upstream(value)


def test_header_then_ns_then_default() -> None:
    default = "https://registry.example.com"
    assert (
        choose_upstream("http://127.0.0.1:5000", "registry.example.com", default, ALLOWED)
        == "http://127.0.0.1:5000"
    )
    assert choose_upstream(None, "127.0.0.1%3A5000", default, ALLOWED) == "http://127.0.0.1:5000"
    assert choose_upstream(None, None, default, ALLOWED) == default


@pytest.mark.parametrize(
    "hint", ["http://169.254.169.254", "http://127.0.0.1:6000", "https://127.0.0.1:5000"]
)
def test_upstreams_not_allowed_are_forbidden(hint: str) -> None:
    with pytest.raises(Forbidden):
        choose_upstream(hint, None, "", ALLOWED)


def test_no_upstream_at_all_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="X-Dragonfly-Registry"):
        choose_upstream(None, None, "", ALLOWED)


def test_registry_blob_of_an_absolute_urls_path() -> None:
    blob = registry_blob("GET", f"/v2/demo/app/blobs/{DIGEST}")
    assert blob is not None
    assert (blob.name, blob.digest) == ("demo/app", DIGEST)
    assert registry_blob("HEAD", f"/v2/demo/app/blobs/{DIGEST}") is None
    assert registry_blob("GET", "/files/model.bin") is None  # not a registry path: no error either


def test_containerds_ns_for_docker_hub_is_its_api_host() -> None:
    """containerd pulling `docker.io/library/x` through a mirror sends `ns=docker.io`."""
    allowed = frozenset({normalize_upstream("https://registry-1.docker.io")})
    assert choose_upstream(None, "docker.io", "", allowed) == "https://registry-1.docker.io"
    assert blob_url(choose_upstream(None, "docker.io", "", allowed), "library/x", DIGEST) == (
        f"https://registry-1.docker.io/v2/library/x/blobs/{DIGEST}"
    )


def test_a_bare_ns_host_is_plain_http_when_only_that_is_allowed() -> None:
    allowed = frozenset({"http://10.0.0.5:5000", "https://registry.example.com"})
    assert choose_upstream(None, "10.0.0.5:5000", "", allowed) == "http://10.0.0.5:5000"
    assert choose_upstream(None, "registry.example.com", "", allowed) == "https://registry.example.com"
    with pytest.raises(Forbidden):  # a scheme given explicitly is taken as given
        choose_upstream("https://10.0.0.5:5000", None, "", allowed)


def test_a_huge_bad_upstream_is_not_echoed_whole() -> None:
    """A 7,000-character host name was quoted twice in the 400's body (14 KB)."""
    with pytest.raises(BadRequest) as info:
        normalize_upstream("https://" + "a_" * 3500)
    assert len(str(info.value)) < 300
