"""The mirror's access check for a registry not in `proxy.public_registries`: the swarm's copy of a
blob goes to a client only if the registry says yes to that client's own HEAD of it.

The real mirror in process, a swarm that holds the blob, and an origin as the registry: 2xx and a
redirect to storage on another origin mean yes; a redirect within the registry (an SSO gateway's login
page) means no, and so does any other answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfly.daemon.proxy.server import RegistryMirror
from dfly.devtools.origin import Origin
from dfly.devtools.scripted_swarm import ScriptedSwarm, ask_mirror

pytestmark = pytest.mark.timeout(30)

BLOB = b"private layer " * 700
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
PATH = f"v2/team/app/blobs/{DIGEST}"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "registry") as running:
        yield running


def _pull(registry: Origin, swarm: ScriptedSwarm) -> tuple[int, bytes]:
    head = f"GET /{PATH} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n".encode()
    return ask_mirror(lambda: RegistryMirror(swarm, registry.base_url, [registry.base_url]), head)


def test_a_redirect_to_storage_on_another_origin_lets_the_client_have_it(
    registry: Origin, tmp_path: Path
) -> None:
    registry.add_redirect(PATH, f"http://localhost:{registry.port}/storage/blob", 307)  # another origin
    status, body = _pull(registry, ScriptedSwarm.holding(tmp_path / "task", BLOB, len(BLOB)))
    assert (status, body) == (200, BLOB)


def test_a_redirect_within_the_registry_is_a_refusal(registry: Origin, tmp_path: Path) -> None:
    registry.add_redirect(PATH, f"/login?next=/{PATH}", 302)  # an SSO gateway's login page
    swarm = ScriptedSwarm.holding(tmp_path / "task", BLOB, len(BLOB))
    status, body = _pull(registry, swarm)
    assert status == 403
    assert BLOB not in body
    assert not swarm.requests  # the swarm's copy was never touched


def test_a_client_the_registry_answers_no_gets_that_answer(registry: Origin, tmp_path: Path) -> None:
    status, body = _pull(
        registry, ScriptedSwarm.holding(tmp_path / "task", BLOB, len(BLOB))
    )  # nothing at the path: 404
    assert status == 404
    assert BLOB not in body
