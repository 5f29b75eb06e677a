"""TrustedSchedulers: IPs match directly; host names match what they resolve to, cached for a while."""

from __future__ import annotations

import asyncio
import socket

from dfly.daemon.services import TRUST_RESOLVE_TTL_S, TRUST_STALE_MAX_S, TrustedSchedulers

TRY_AGAIN = ["(the resolver says: try again)"]


class Resolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, name: str) -> list[str]:
        self.calls.append(name)
        if name not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if self.answers[name] == TRY_AGAIN:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return self.answers[name]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def allows(trusted: TrustedSchedulers, caller: str) -> bool:
    return asyncio.run(trusted.allows(caller))


def test_ip_entries_match_without_resolving() -> None:
    resolver = Resolver({})
    trusted = TrustedSchedulers(["10.0.0.5", "fd00::7"], resolve=resolver)
    assert allows(trusted, "10.0.0.5")
    assert allows(trusted, "fd00:0::7")
    assert allows(trusted, "::ffff:10.0.0.5")  # an IPv4 caller seen by a dual-stack listener
    assert not allows(trusted, "10.0.0.6")
    assert not allows(trusted, "")
    assert resolver.calls == []


def test_a_name_trusts_its_addresses_and_is_resolved_again_after_the_ttl() -> None:
    resolver, clock = Resolver({"scheduler.svc": ["10.1.1.1", "10.1.1.2"]}), Clock()
    trusted = TrustedSchedulers(["scheduler.svc"], resolve=resolver, clock=clock)
    assert allows(trusted, "10.1.1.2")
    assert not allows(trusted, "10.9.9.9")
    assert resolver.calls == ["scheduler.svc"]  # cached
    resolver.answers["scheduler.svc"] = ["10.9.9.9"]  # the scheduler moved
    clock.now += TRUST_RESOLVE_TTL_S
    assert allows(trusted, "10.9.9.9")
    assert not allows(trusted, "10.1.1.2")
    assert resolver.calls == ["scheduler.svc", "scheduler.svc"]


def test_a_name_that_does_not_resolve_trusts_nobody() -> None:
    trusted = TrustedSchedulers(["gone.example"], resolve=Resolver({}))
    assert not allows(trusted, "127.0.0.1")


class SlowResolver(Resolver):
    """Answers once `answer` is set (a resolver waiting out its own timeouts until then)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        super().__init__(answers)
        self.answer = asyncio.Event()
        self.asked_twice = asyncio.Event()

    async def __call__(self, name: str) -> list[str]:
        self.calls.append(name)
        if len(self.calls) == 2:
            self.asked_twice.set()
        await self.answer.wait()
        return self.answers[name]


def test_callers_checked_meanwhile_share_one_lookup() -> None:
    async def main() -> None:
        resolver = SlowResolver({"scheduler.svc": ["10.1.1.1"]})
        trusted = TrustedSchedulers(["scheduler.svc"], resolve=resolver)
        checks = [asyncio.ensure_future(trusted.allows("10.1.1.1")) for _ in range(5)]
        await asyncio.sleep(0)
        resolver.answer.set()
        assert await asyncio.gather(*checks) == [True] * 5
        assert resolver.calls == ["scheduler.svc"]

    asyncio.run(main())


def test_a_lookup_that_hangs_is_given_up_well_inside_the_trigger_timeout() -> None:
    """The scheduler's DownloadTask deadline is 10 s: a resolver that hangs trusts nobody after the
    lookup's own bound, instead of the call timing out and the seed being taken for unreachable."""

    async def main() -> None:
        trusted = TrustedSchedulers(["scheduler.svc"], resolve=SlowResolver({}), timeout_s=0.05)
        assert not await asyncio.wait_for(trusted.allows("10.1.1.1"), 5)

    asyncio.run(main())


def test_a_name_whose_lookups_fail_for_a_while_keeps_its_last_addresses_for_a_while() -> None:
    """A resolver that times out or says "try again" keeps the last answer, for at most
    TRUST_STALE_MAX_S after it: a scheduler's old address is not trusted for ever."""
    resolver, clock = Resolver({"scheduler.svc": ["10.1.1.1"]}), Clock()
    trusted = TrustedSchedulers(["scheduler.svc"], resolve=resolver, clock=clock)
    assert allows(trusted, "10.1.1.1")
    resolver.answers["scheduler.svc"] = TRY_AGAIN  # DNS unreachable for a while
    clock.now += TRUST_RESOLVE_TTL_S
    assert allows(trusted, "10.1.1.1")
    clock.now += TRUST_STALE_MAX_S
    assert not allows(trusted, "10.1.1.1")
    assert len(resolver.calls) == 3


def test_a_name_that_no_longer_exists_trusts_nobody_at_once() -> None:
    resolver, clock = Resolver({"scheduler.svc": ["10.1.1.1"]}), Clock()
    trusted = TrustedSchedulers(["scheduler.svc"], resolve=resolver, clock=clock)
    assert allows(trusted, "10.1.1.1")
    del resolver.answers["scheduler.svc"]  # the record was deleted (the address may go to someone else)
    clock.now += TRUST_RESOLVE_TTL_S
    assert not allows(trusted, "10.1.1.1")


def test_names_are_looked_up_together_and_a_leaving_caller_ends_no_lookup() -> None:
    async def main() -> None:
        resolver = SlowResolver({"a.svc": ["10.1.1.1"], "b.svc": ["10.2.2.2"]})
        trusted = TrustedSchedulers(["a.svc", "b.svc"], resolve=resolver)
        leaving = asyncio.ensure_future(trusted.allows("10.2.2.2"))
        await asyncio.wait_for(resolver.asked_twice.wait(), 5)
        assert sorted(resolver.calls) == ["a.svc", "b.svc"]  # both asked before either answered
        leaving.cancel()  # its scheduler call timed out
        staying = asyncio.ensure_future(trusted.allows("10.2.2.2"))
        await asyncio.sleep(0)
        resolver.answer.set()
        assert await staying
        assert len(resolver.calls) == 2  # the second caller took over the lookups in flight

    asyncio.run(main())
