"""`pause` and `resume`, the incident switch, on the real servers.

While paused no order is cancelled for timeout, by the sweep or on an
expired event, by any daemon (also one started during the pause), and a
payment after the deadline is accepted; customer cancels go on. `resume`
cancels the unpaid overdue orders at once or after its grace, once each,
and leaves the others to their deadlines. The state shows in `check`,
`show`, /healthz and the metrics; repeating either command changes nothing.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.errors import BadInput, Refused
from listener.keys import PARTS, KeyLayout
from listener.orders import Operation, parse_grace
from listener.servers import free_port
from listener.store import Store
from tests.conftest import CliResult, DaemonProcess, Subscriber, wait_until
from tests.test_metrics import http_get, metric

LAYOUT = KeyLayout("order")


async def overdue(store: Store, client: OrderClient, order_ids: list[str]) -> None:
    """Until every order's deadline has passed by the Redis clock."""
    latest = max([(await client.get(oid)).deadline_ms for oid in order_ids])

    async def passed() -> bool:
        return await store.now_ms() > latest

    await wait_until(passed, 10, "the deadlines to pass")


async def test_while_paused_nothing_is_cancelled_and_late_payments_are_accepted(settings: Settings) -> None:
    ids = [f"pz-{i}" for i in range(40)]  # in every part
    async with OrderClient(settings) as client:
        store = await client.opened()
        paused = await client.pause("provider down", by="tester")
        assert paused.changed and paused.parts_changed == PARTS
        await client.create_many([(oid, 0.1) for oid in ids])
        await overdue(store, client, ids)

        results = await store.sweep(range(PARTS), 5000)
        assert all(r.cancelled == [] and r.dropped == [] and r.next_deadline_ms is None for r in results)
        assert {r.outcome for r in await store.apply_many(Operation.EXPIRE, ids)} == {"held"}
        assert (await client.pay("pz-0")).changed  # the window is held open
        assert (await client.cancel("pz-1")).reason == "customer"
        with pytest.raises(Refused, match="deadline passed while cancellation is paused"):
            await client.extend("pz-2", 60)
        assert (await client.get("pz-2")).status == "created"

        resumed = await client.resume()
        assert resumed.changed and resumed.parts_changed == PARTS
        results = await store.sweep(range(PARTS), 5000)
        cancelled = {oid for r in results for oid, _ in r.cancelled}
        assert cancelled == set(ids) - {"pz-0", "pz-1"}
        assert (await client.get("pz-0")).status == "paid"
        assert (await client.get("pz-5")).reason == "timeout"


async def test_resume_with_a_grace_holds_only_the_overdue_orders(settings: Settings) -> None:
    async with OrderClient(settings) as client:
        store = await client.opened()
        await client.pause()
        await client.create_many([("pg-overdue", 0.1), ("pg-late-payer", 0.1)])
        await overdue(store, client, ["pg-overdue", "pg-late-payer"])
        await client.create("pg-later", timeout=0.6)  # due during the grace, after the resume
        resumed = await client.resume(grace=1.5)
        later = (await client.get("pg-later")).deadline_ms
        assert resumed.at_ms > later

        async def swept() -> set[str]:
            return {oid for r in await store.sweep(range(PARTS), 5000) for oid, _ in r.cancelled}

        assert await swept() == set()
        assert (await client.pay("pg-late-payer")).changed  # still held open

        async def past(ms: int) -> bool:
            return await store.now_ms() > ms

        await wait_until(lambda: past(later), 5, "pg-later's deadline")
        assert await swept() == {"pg-later"}  # due after the resume: at its deadline as usual
        assert (await client.get("pg-overdue")).status == "created"
        await wait_until(lambda: past(resumed.at_ms), 5, "the end of the grace")
        assert await swept() == {"pg-overdue"}
        assert (await client.pause_state()).as_dict() == {"cancellation": "running"}


async def test_repeating_pause_or_resume_changes_nothing(settings: Settings, redis: Redis) -> None:
    async with OrderClient(settings) as client:
        assert not (await client.resume()).changed  # not paused
        first = await client.pause("first", by="a")
        before = await redis.hgetall(LAYOUT.pause(3))
        again = await client.pause("second", by="b")
        assert not again.changed and again.at_ms == first.at_ms
        assert await redis.hgetall(LAYOUT.pause(3)) == before
        state = await client.pause_state()
        assert state.paused and state.first is not None and state.first.reason == "first"
        held = await client.resume(grace=30)
        assert held.changed
        assert not (await client.resume(grace=30)).changed
        assert (await client.pause_state()).as_dict()["cancellation"] == "resuming"
        assert (await client.pause("again")).changed  # a pause during a grace pauses again
        assert (await client.pause_state()).first.reason == "again"  # type: ignore[union-attr]
        await client.resume()
        assert [await redis.exists(LAYOUT.pause(part)) for part in range(PARTS)] == [0] * PARTS
        with pytest.raises(BadInput):
            await client.pause("two\nlines")
        with pytest.raises(BadInput):
            await client.resume(grace=-1)


def test_the_grace_is_checked_before_redis() -> None:
    assert parse_grace("0") == 0 and parse_grace("1.5") == 1500
    for bad in ("-1", "abc", "nan", "2592000.001"):
        with pytest.raises(BadInput):
            parse_grace(bad)


async def test_the_state_shows_in_check_show_healthz_and_metrics(
    settings: Settings,
    cli: Callable[..., Awaitable[CliResult]],
    start_daemon: Callable[..., Awaitable[Daemon]],
) -> None:
    port = free_port()
    daemon = await start_daemon(dataclasses.replace(settings, metrics_addr=f"127.0.0.1:{port}"))
    await asyncio.wait_for(daemon.http_ready.wait(), 5)
    async with OrderClient(settings) as client:
        await client.create("pz-shown", timeout=600)

    paused = await cli("pause", "--reason", "payment provider down")
    assert paused.code == 0 and "paused: no order is cancelled for timeout" in paused.out, paused
    assert "PAUSED since" in paused.out and "payment provider down" in paused.out
    logged = json.loads(paused.err.strip().splitlines()[-1])  # the log line, on stderr
    assert (
        logged["event"] == "cancellation for timeout paused" and logged["reason"] == "payment provider down"
    )
    assert logged["by"] and logged["level"] == "warning"
    again = await cli("pause", "--reason", "other")
    assert again.code == 0 and "already paused" in again.out, again

    checked = await cli("check")
    assert (
        "cancellation for timeout is PAUSED since" in checked.out and "payment provider down" in checked.out
    )
    assert "fix: order-listener resume" in checked.out
    shown = await cli("show", "pz-shown")
    assert shown.code == 0 and "PAUSED" in shown.out
    as_json = json.loads((await cli("show", "pz-shown", "--json")).out)
    assert as_json["status"] == "created" and as_json["cancellation"] == "paused"
    assert as_json["paused_reason"] == "payment provider down" and "@" in as_json["paused_by"]

    async def health() -> dict[str, object]:
        return dict(json.loads((await http_get(port, "/healthz"))[1]))

    async def healthz_says(what: str) -> bool:
        return (await health()).get("cancellation") == what

    await wait_until(lambda: healthz_says("paused"), 10, "/healthz to say paused")
    body = await health()
    assert body["ok"] is True and body["paused_reason"] == "payment provider down"
    text = (await http_get(port, "/metrics"))[1]
    assert metric(text, "order_listener_cancellation_paused") == 1
    assert metric(text, "order_listener_cancellation_paused_since_seconds") > 1e9

    for bad in (("--grace", "-1"), ("--grace", "soon")):
        refused = await cli("resume", *bad)
        assert refused.code == 2 and "grace" in refused.err, refused
    assert (await cli("pause", "--reason", "a\nb")).code == 2
    resumed = await cli("resume")
    assert resumed.code == 0 and "resumed" in resumed.out, resumed
    repeated = await cli("resume")
    assert repeated.code == 0 and "not paused; nothing changed" in repeated.out
    await wait_until(lambda: healthz_says("running"), 10, "/healthz to say running")
    assert metric((await http_get(port, "/metrics"))[1], "order_listener_cancellation_paused") == 0
    assert "cancellation" not in json.loads((await cli("show", "pz-shown", "--json")).out)
    assert "is running (not paused)" in (await cli("check")).out


async def test_two_daemons_one_restarted_during_a_pause(
    settings: Settings,
    cli: Callable[..., Awaitable[CliResult]],
    spawn_daemon: Callable[..., Awaitable[DaemonProcess]],
    subscriber: Subscriber,
) -> None:
    """The Done-when of the switch: nothing cancelled while paused, by either
    daemon, also after one is killed and another started; late payments are
    accepted; after `resume` each unpaid overdue order is cancelled once,
    within a second or two."""
    first, second = await spawn_daemon(), await spawn_daemon()
    await asyncio.gather(first.wait_ready(), second.wait_ready())
    assert (await cli("pause", "--reason", "provider outage")).code == 0
    ids = [f"pd-{i}" for i in range(60)]
    paying = ids[:20]
    async with OrderClient(settings) as client:
        store = await client.opened()
        await client.create_many([(oid, 0.3) for oid in ids])
        first.kill()
        await first.wait()
        third = await spawn_daemon()
        await third.wait_ready()  # its catch-up sweep ran during the pause
        await overdue(store, client, ids)
        # at least two periodic sweeps (every resync interval) of each daemon
        settle = await store.now_ms() + int(2.5 * settings.resync_interval * 1000)

        async def settled() -> bool:
            return await store.now_ms() > settle

        await wait_until(settled, 10, "the daemons to sweep again")
        assert subscriber.cancelled_ids() == set()
        assert {(await client.get(oid)).status for oid in ids} == {"created"}
        for oid in paying:
            assert (await client.pay(oid)).changed  # late, and accepted
        checked = await cli("check")
        assert "cancellation for timeout is PAUSED" in checked.out, checked.out

        resumed_at = await store.now_ms()
        assert (await cli("resume")).code == 0
        unpaid = set(ids) - set(paying)
        await wait_until(lambda: subscriber.cancelled_ids() == unpaid, 5, "the overdue orders cancelled")
        orders = [await client.get(oid) for oid in sorted(unpaid)]
    assert all(order.reason == "timeout" and order.version == 2 for order in orders)
    assert max(order.updated_ms for order in orders) - resumed_at < 2000
    cancellations = collections.Counter(
        event["order_id"] for event in subscriber.unique().values() if event["status"] == "cancelled"
    )
    assert set(cancellations.values()) == {1}  # once each
    assert {e["order_id"] for e in subscriber.with_status("paid")} == set(paying)
    assert second.proc.returncode is None and third.proc.returncode is None


async def test_the_overdue_orders_are_cancelled_punctually_at_the_end_of_the_grace(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    daemons = [await start_daemon(), await start_daemon()]
    ids = [f"pq-{i}" for i in range(200)]
    async with OrderClient(settings) as client:
        store = await client.opened()
        await client.pause("drill")
        await client.create_many([(oid, 0.1) for oid in ids])
        await overdue(store, client, ids)
        resumed = await client.resume(grace=1.0)
        await wait_until(lambda: subscriber.cancelled_ids() == set(ids), 10, "the cancellations")
        orders = [await client.get(oid) for oid in ids]
    late = [order.updated_ms - resumed.at_ms for order in orders]
    assert min(late) >= 0, "cancelled before the grace ended"
    assert max(late) < 250, max(late)
    assert sum(d.scheduler.cancelled + d.listener.cancelled for d in daemons) == len(ids)
