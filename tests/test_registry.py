"""The session registry against a real nats-server's JetStream KV: revisions keep one
owner per session id across an outage longer than the TTL."""

from __future__ import annotations

import asyncio

import nats
import pytest

from daemon.registry import SessionRegistry

TTL_S = 1.0


@pytest.fixture
async def two_registries(nats_server, request):
    bucket = f"reg_{request.node.name[:20].replace('[', '_').replace(']', '_')}"
    conns = [await nats.connect(nats_server.url) for _ in range(2)]
    regs = [SessionRegistry(nc, bucket, TTL_S) for nc in conns]
    for r in regs:
        await r.start()
    yield regs
    for nc in conns:
        await nc.close()


async def entry_owner(reg: SessionRegistry, sid: str) -> str:
    return (await reg._kv.get(sid)).value.decode()


async def test_refresh_renews_and_release_frees(two_registries):
    a, b = two_registries
    await a.claim("s1")
    for _ in range(3):  # refreshed well within the TTL: it never expires
        await asyncio.sleep(TTL_S / 2)
        assert await a.refresh(["s1"]) == []
    assert await entry_owner(b, "s1") == a.owner
    await a.release("s1")
    await b.claim("s1")  # free again
    assert await entry_owner(a, "s1") == b.owner


async def test_an_id_claimed_elsewhere_during_an_outage_is_lost_not_overwritten(two_registries):
    a, b = two_registries
    await a.claim("s2")
    await asyncio.sleep(TTL_S + 0.8)  # a could not refresh (NATS away): the entry expired
    await b.claim("s2")  # another daemon took the id meanwhile
    assert await a.refresh(["s2"]) == ["s2"]  # a learns it lost the id...
    assert await entry_owner(b, "s2") == b.owner  # ...and did not overwrite b's claim
    await a.release("s2")  # nor does its release delete it
    assert await entry_owner(b, "s2") == b.owner


async def test_an_expired_entry_nobody_took_is_claimed_again(two_registries):
    a, b = two_registries
    await a.claim("s3")
    await asyncio.sleep(TTL_S + 0.8)
    assert await a.refresh(["s3"]) == []
    assert await entry_owner(b, "s3") == a.owner
    with pytest.raises(Exception, match="another daemon"):
        await b.claim("s3")
