"""The event log and `replay`, against a real redis-server, mosquitto and daemons."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from listener import event_log as event_log_module
from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.event_log import EventLog, events_of, parse_since, publish_again
from listener.events import LOG_FIELD, StatusEvent, from_logged, iso_ms
from listener.events import logged as log_value
from listener.keys import PARTS, KeyLayout
from listener.servers import ServerProcess
from tests.conftest import CliResult, Subscriber, compact, env_for, redis_clock_past, wait_until, watch_topic
from tests.test_script_inputs import ids_in_part

LAYOUT = KeyLayout()


async def log_entries(redis: Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of the event log of every part; a log key of another type is left out."""
    async with redis.pipeline(transaction=False) as pipe:
        for part in range(PARTS):
            pipe.xrange(LAYOUT.event_log(part))
        replies = await pipe.execute(raise_on_error=False)
    return [entry for reply in replies if not isinstance(reply, Exception) for entry in reply]


async def logged(redis: Redis) -> list[tuple[bytes, bytes]]:
    """Every event in the event log of every part: (entry id, value)."""
    return [
        (entry_id, value)
        for entry_id, fields in await log_entries(redis)
        for _, value in events_of(fields)  # an entry: a round trip's events
    ]


async def field_names(redis: Redis) -> set[bytes]:
    """The field names of every event log entry of every part."""
    return {name for _, fields in await log_entries(redis) for name in fields}


async def wait_logged(redis: Redis, count: int) -> None:
    async def enough() -> bool:
        return len(await logged(redis)) >= count

    await wait_until(enough, 15, f"{count} event log entries")


def per_order_versions(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    versions: dict[str, list[int]] = defaultdict(list)
    for event in events:
        versions[str(event["order_id"])].append(int(event["version"]))
    return versions


async def test_replay_gives_exactly_the_events_published_since_a_time(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    cli: Callable[..., Awaitable[CliResult]],
    redis: Redis,
    mqtt_server_proc: ServerProcess,
) -> None:
    await start_daemon()
    async with OrderClient(settings) as client:
        await client.create_many([(f"early-{i:02d}", 0.3) for i in range(25)])
        await wait_until(lambda: len(subscriber.events) >= 50, 15, "the first 50 events")
        await wait_logged(redis, 50)
        before = subscriber.events[:]
        since_ms = await client.store.now_ms() + 1
        await wait_until(lambda: redis_clock_past(client, since_ms), 5, "a millisecond to pass")
        await client.create_many([(f"later-{i:02d}", 0.3) for i in range(25)])
        await wait_until(lambda: len(subscriber.events) >= 100, 15, "the next 50 events")
        await wait_logged(redis, 100)
    after = subscriber.events[50:]
    assert all(str(e["order_id"]).startswith("early-") for e in before)
    assert len(after) == 50 and all(str(e["order_id"]).startswith("later-") for e in after)

    for since in (str(since_ms / 1000), iso_ms(since_ms)):
        replay = await cli("replay", "--since", since)
        assert replay.code == 0, replay.err
        lines = replay.out.splitlines()
        # exactly the payloads published since then, byte for byte, none before
        assert sorted(lines) == sorted(compact(e) for e in after)
        replayed = [json.loads(line) for line in lines]
        assert all(v == [1, 2] for v in per_order_versions(replayed).values())
        assert len(per_order_versions(replayed)) == 25

    # --until: the other half
    start_ms = min(int(entry_id.split(b"-")[0]) for entry_id, _ in await logged(redis))
    first = await cli("replay", "--since", str(start_ms / 1000), "--until", iso_ms(since_ms))
    assert first.code == 0, first.err
    assert sorted(first.out.splitlines()) == sorted(compact(e) for e in before)

    # --order narrows it to one order
    one = await cli("replay", "--since", iso_ms(since_ms), "--order", "later-07")
    assert one.code == 0, one.err
    assert one.out.splitlines() == [compact(e) for e in subscriber.of("later-07")]

    # --since EVENT_ID: the events after that one (also those logged in the
    # same millisecond in other parts: each is after it or before it, once)
    lines = (await cli("replay", "--since", iso_ms(since_ms))).out.splitlines()
    pivot = json.loads(lines[20])["event_id"]
    rest = await cli("replay", "--since", pivot)
    assert rest.code == 0, rest.err
    assert rest.out.splitlines() == lines[21:]
    async with OrderClient(settings) as client:
        log = EventLog(await client.opened(), settings.event_log_retention_ms)
        for index, line in enumerate(lines):
            ref = parse_since(json.loads(line)["event_id"])
            assert [e.payload().decode() async for e in log.events(ref)] == lines[index + 1 :]

    # --publish: a subscriber connected now receives the same event_ids and payloads
    async with watch_topic(settings, "orders/+/status", "replay-newcomer") as seen:
        published = await cli("replay", "--since", iso_ms(since_ms), "--publish")
        assert published.code == 0, published.err
        await wait_until(lambda: len(seen) >= 50, 10, "the 50 replayed events")
        await asyncio.sleep(0)  # nothing else is due; the count is checked below
    got = [compact(r.event) for r in seen]
    assert len(got) == len(lines), (len(got), len(lines), published.err)
    assert got == lines, [(a[:30], b[:30]) for a, b in zip(got, lines, strict=True) if a != b]
    assert "published 50 event(s) again" in published.err
    # the daemon does not log its own events' replays: the log holds each published event once
    entries = await logged(redis)
    assert len(entries) == 100
    assert len({from_logged(value).event_id for _, value in entries}) == 100
    assert await field_names(redis) == {LOG_FIELD}  # a round trip's events in one field, a line each


async def test_malformed_since_is_bad_input_and_too_old_says_how_far_back(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    cli: Callable[..., Awaitable[CliResult]],
    redis: Redis,
) -> None:
    for bad in ("yesterday", "2026-11-24T15:00:00", "2026-13-01T00:00:00Z", "a/b/c", "-5", ""):
        result = await cli("replay", "--since", bad)
        assert result.code == 2, (bad, result)
        assert "--since" in result.err
    assert (await cli("replay", "--since", "0", "--until", "soon")).code == 2
    assert (await cli("replay", "--since", "0", "--order", "bad id")).code == 2
    assert (await cli("replay")).code == 2
    for bad_rate in ("fast", "-1", "nan", "2e6"):
        result = await cli("replay", "--since", "0", "--publish", "--rate", bad_rate)
        assert result.code == 2 and "--rate must be" in result.err, (bad_rate, result)
    without_publish = await cli("replay", "--since", "0", "--rate", "100")
    assert without_publish.code == 2 and "--rate goes with --publish" in without_publish.err

    empty = await cli("replay", "--since", "0")
    assert empty.code == 1 and "event log is empty" in empty.err

    await start_daemon()
    async with OrderClient(settings) as client:
        await client.create("old-1", timeout=0.2)
        await wait_until(lambda: len(subscriber.of("old-1")) >= 2, 10, "old-1's events")
    await wait_logged(redis, 2)
    too_old = await cli("replay", "--since", "2026-01-01T00:00:00Z")
    assert too_old.code == 1 and too_old.out == ""
    assert "older than what the event log keeps: it goes back to" in too_old.err
    # within the retention is fine, also when nothing was published then
    recent = await cli("replay", "--since", str(int(await client.store.now_ms() / 1000) - 3600))
    assert recent.code == 0, recent.err
    assert recent.out.splitlines() == [compact(e) for e in subscriber.of("old-1")]
    unknown = await cli("replay", "--since", "old-1/1/9/paid/paid")
    assert unknown.code == 1 and "not in the event log" in unknown.err


@pytest.mark.fastpath  # its publisher is the daemon's: fast path and fallback
async def test_replay_publishes_at_its_rate(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    cli: Callable[..., Awaitable[CliResult]],
    redis: Redis,
) -> None:
    """`replay --publish --rate R`: no faster than R a second (a replay most
    often follows a subscriber that fell behind); `--rate 0`: no pace."""
    await start_daemon()
    async with OrderClient(settings) as client:
        since_ms = await client.store.now_ms()
        await client.create_many([(f"paced-{i:03d}", 600) for i in range(200)])
    await wait_until(lambda: len(subscriber.events) >= 200, 15, "the 200 `created` events")
    await wait_logged(redis, 200)
    rate = 200.0
    async with watch_topic(settings, "orders/+/status", "replay-paced") as seen:
        paced = await cli("replay", "--since", iso_ms(since_ms), "--publish", "--rate", f"{rate:g}")
        assert paced.code == 0, paced.err
        await wait_until(lambda: len(seen) >= 200, 10, "the 200 replayed events")
    assert "published 200 event(s) again, with their event_ids, at most 200 a second" in paced.err
    # one event per 5 ms step at this rate: the 199 after the first no faster than the pace
    # (unpaced they take some 20 ms; the slack is for a first receipt delayed on a busy machine)
    assert seen[-1].at - seen[0].at >= 199 / rate * 0.8
    unpaced = await cli("replay", "--since", iso_ms(since_ms), "--publish", "--rate", "0")
    assert unpaced.code == 0, unpaced.err
    assert unpaced.err.strip().endswith("published 200 event(s) again, with their event_ids")


async def test_a_replay_holds_a_page_of_the_log_at_a_time(
    settings: Settings, subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`replay --publish` takes the selected events a page at a time (a day's
    log need not fit in memory): here pages of 7 of 20, each published before
    the next is read, every event received once."""
    monkeypatch.setattr(event_log_module, "REPLAY_PAGE", 7)
    taken = 0

    async def selected() -> AsyncIterator[StatusEvent]:
        nonlocal taken
        for n in range(20):
            taken += 1
            yield StatusEvent(f"paged-{n:02d}", "created", None, "created", 1, 1795564749929, 1795564749929)

    ahead: list[int] = []  # taken from the source beyond what the broker acknowledged, at each count
    count, pace = await publish_again(settings, selected(), lambda done: ahead.append(taken - done), rate=0)
    assert (count, pace) == (20, 0)
    await wait_until(lambda: len(subscriber.with_status("created")) >= 20, 10, "the 20 events")
    assert sorted(str(e["order_id"]) for e in subscriber.events) == [f"paged-{n:02d}" for n in range(20)]
    assert ahead and max(ahead) <= 7, ahead


async def test_the_log_is_trimmed_by_time(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    cli: Callable[..., Awaitable[CliResult]],
    redis: Redis,
) -> None:
    # Long enough that the `kept` replay below comes within the retention of
    # its --since on a busy machine (older starts are refused when the log
    # cannot show it reaches back); trimming keeps the retention again as a margin.
    retention_ms = 3000
    short = dataclasses.replace(settings, event_log_retention=retention_ms / 1000)
    daemon = await start_daemon(short)
    async with OrderClient(settings) as client:
        # 150 events of one part fill the first node(s) of its stream (100
        # entries or 4 kB each at most): trimming removes whole nodes
        ids = ids_in_part(3, 150, "trim")
        await client.create_many([(oid, 600) for oid in ids])
        await wait_logged(redis, 150)
        first_ms = min(int(entry_id.split(b"-")[0]) for entry_id, _ in await logged(redis))
        now = await client.store.now_ms()
        since_ms = now + 2 * retention_ms
        await wait_until(lambda: redis_clock_past(client, since_ms), 10, "the retention and its margin")
        await client.change_many("cancel", ids)
        await wait_until(lambda: len(subscriber.events) >= 300, 15, "300 events")

        async def trimmed() -> bool:
            entries = await logged(redis)
            return len({from_logged(v).event_id for _, v in entries}) >= 150 and len(entries) < 300

        await wait_until(trimmed, 15, "the created events to be trimmed away")
        cancels = [compact(e) for e in subscriber.with_status("cancelled")]
        env_short = {"ORDER_LISTENER_EVENT_LOG_RETENTION": str(retention_ms / 1000)}
        gone = await cli("replay", "--since", str(first_ms / 1000), env=env_for(settings, **env_short))
        assert gone.code == 1 and "goes back to" in gone.err
        kept = await cli("replay", "--since", str(since_ms / 1000), env=env_for(settings, **env_short))
        assert kept.code == 0, kept.err
        assert sorted(kept.out.splitlines()) == sorted(cancels)
    await wait_until(lambda: daemon.outbox.published >= 300, 5, "the daemon to count what it published")


async def test_no_event_log_at_zero_retention(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    cli: Callable[..., Awaitable[CliResult]],
    redis: Redis,
) -> None:
    off = dataclasses.replace(settings, event_log_retention=0)
    await start_daemon(off)
    async with OrderClient(settings) as client:
        await client.create("off-1", timeout=0.2)
        await wait_until(lambda: len(subscriber.of("off-1")) >= 2, 10, "off-1's events")
    assert await logged(redis) == []
    off_env = env_for(settings, ORDER_LISTENER_EVENT_LOG_RETENTION="0")
    nothing = await cli("replay", "--since", "0", env=off_env)
    assert nothing.code == 1 and "event log is empty" in nothing.err


@pytest.mark.parametrize("daemons", [2])
async def test_with_several_daemons_each_event_is_logged_once(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    redis: Redis,
    daemons: int,
) -> None:
    for _ in range(daemons):
        await start_daemon()
    async with OrderClient(settings) as client:
        await client.create_many([(f"many-{i:02d}", 0.3) for i in range(40)])
        await wait_until(lambda: len(subscriber.unique()) >= 80, 15, "80 distinct events")
    await wait_logged(redis, 80)
    entries = await logged(redis)
    ids = [from_logged(value).event_id for _, value in entries]
    assert len(ids) == len(set(ids)) == 80
    assert set(ids) == set(subscriber.unique())


async def test_a_refused_append_loses_the_log_entry_never_the_event(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    redis: Redis,
) -> None:
    """A log key of another type (written by hand) refuses the appends of its
    part: the events go out and leave the outbox all the same, and the other
    parts are logged."""
    broken, fine = ids_in_part(5, 1, "broken")[0], ids_in_part(6, 1, "fine")[0]
    await redis.set(LAYOUT.event_log(5), "not a stream")
    await start_daemon()
    async with OrderClient(settings) as client:
        await client.create_many([(broken, 0.2), (fine, 0.2)])
        await wait_until(lambda: len(subscriber.events) >= 4, 10, "both orders' events")
        await wait_logged(redis, 2)
        assert await redis.xlen(LAYOUT.outbox(5)) == 0 and await redis.xlen(LAYOUT.outbox_created(5)) == 0
        assert await redis.get(LAYOUT.event_log(5)) == b"not a stream"
        assert [from_logged(v).order_id for _, v in await logged(redis)] == [fine, fine]


async def test_entries_of_the_earlier_format_are_replayed_beside_the_current_one(
    settings: Settings, redis: Redis
) -> None:
    """A log written by an earlier version holds its events in fields "0",
    "1", ...; the current one in one field, a line each. After an upgrade
    the log holds both: replay reads both, in order, and `--since EVENT_ID`
    finds an event in either."""
    ids = ids_in_part(4, 5, "mixed")
    events = [
        StatusEvent(oid, "created", None, "created", 1, 1_000 + n, 1_000 + n, deadline_ms=901_000 + n)
        for n, oid in enumerate(ids)
    ]
    key = LAYOUT.event_log(4)
    older = {str(n): log_value(event) for n, event in enumerate(events[:3])}
    await redis.xadd(key, older)  # type: ignore[arg-type]
    await redis.xadd(key, {LOG_FIELD: b"\n".join(log_value(event) for event in events[3:])})
    async with OrderClient(settings) as client:
        log = EventLog(await client.opened(), settings.event_log_retention_ms)
        since = await client.store.now_ms() - 60_000
        assert [e.event_id async for e in log.events(since)] == [e.event_id for e in events]
        for index, event in enumerate(events):
            after = [e.event_id async for e in log.events(parse_since(event.event_id))]
            assert after == [e.event_id for e in events[index + 1 :]]
