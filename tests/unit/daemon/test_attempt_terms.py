"""AttemptTerms: one download attempt serves every client attached to it, each with its own options."""

from __future__ import annotations

import asyncio

from dfly.daemon.attempt_terms import AttemptTerms
from dfly.daemon.task_request import TaskRequest

URL = "http://origin.example/f"


def test_a_later_deadline_extends_the_attempt_and_an_earlier_one_does_not() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        terms = AttemptTerms.of(TaskRequest(URL, timeout_s=0.05), loop.time())
        async with terms.watch():
            terms.attach(TaskRequest(URL, timeout_s=60), loop.time())
            terms.attach(TaskRequest(URL, timeout_s=1), loop.time())
            await asyncio.sleep(0.2)  # past the first client's deadline: the attempt goes on
        assert terms.deadline > loop.time() + 50
        assert terms.timed_out().message.startswith("download timed out after 60")

    asyncio.run(main())


def test_the_origin_is_allowed_once_any_client_allows_it() -> None:
    terms = AttemptTerms.of(TaskRequest(URL, disable_back_to_source=True), 0.0)
    assert not terms.origin_allowed
    terms.attach(TaskRequest(URL, disable_back_to_source=True), 0.0)
    assert not terms.origin_allowed
    terms.attach(TaskRequest(URL), 0.0)
    assert terms.origin_allowed


def test_a_client_joining_after_the_time_is_up_changes_nothing() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        terms = AttemptTerms.of(TaskRequest(URL, timeout_s=0.01, disable_back_to_source=True), loop.time())
        try:
            async with terms.watch():
                await asyncio.sleep(1)
        except TimeoutError:
            pass
        deadline = terms.deadline
        terms.attach(TaskRequest(URL, timeout_s=60), loop.time())
        assert terms.deadline == deadline
        assert not terms.origin_allowed

    asyncio.run(main())
