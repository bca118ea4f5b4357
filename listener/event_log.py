"""The event log: the events the broker acknowledged, kept for `replay`.

The outbox reader appends the events its lanes' PUBACKs acknowledged to each
part's stream ``<prefix>:{P}:log`` in the round trip that deletes their
outbox entries (listener.outbox_pump, Deletes.queue_log): one entry per part
and round trip, its id the publish time by the Redis clock, its field `e`
the events in PUBACK order, one per line (events.logged; entries written
by earlier versions hold them in fields "0", "1", ...). Only the holder of a
lane's lease deletes its entries, so an event is logged once however many
daemons run; the trimming is by time (XADD MINID, whole stream nodes),
ORDER_LISTENER_EVENT_LOG_RETENTION.

`replay` merges the parts by (entry id, part, place in the entry), so events of one order
come in the order they were published: version order.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from listener.errors import BadInput, ListenerError
from listener.events import LOG_FIELD, StatusEvent, from_logged, iso_ms
from listener.keys import PARTS, KeyLayout, part_of
from listener.orders import ORDER_ID_PATTERN
from listener.store import Store

PAGE = 2000  # entries read per part and round trip
RECENT = 100_000  # event ids remembered to drop a repeated log entry (a retried append)
SCAN_LIMIT = 1_000_000  # events looked through for the event of `--since EVENT_ID`

_EVENT_ID = re.compile(rf"({ORDER_ID_PATTERN.pattern})/([0-9]{{1,16}})/([0-9]{{1,16}})/([a-z]+)/([a-z]+)")
_UNIX = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")


class NotRetained(ListenerError):
    """What replay was asked for is older than what the event log keeps."""


@dataclass(frozen=True)
class EventRef:
    """An event named by its event_id (`--since EVENT_ID`)."""

    event_id: str
    order_id: str
    created_ms: int


def parse_time(text: str, what: str) -> int:
    """ISO 8601 with a zone (``2026-11-24T15:00:00Z``, ``...+01:00``) or Unix
    seconds (``1795532400``, decimals allowed): Unix ms. BadInput otherwise."""
    value = text.strip()
    if _UNIX.fullmatch(value):
        return round(float(value) * 1000)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise BadInput(
            f"{what} {text!r} is not a time: give ISO 8601 with a zone (2026-11-24T15:00:00Z, "
            "2026-11-24T16:00:00+01:00) or Unix seconds (1795532400)"
        )
    return math.floor(moment.timestamp() * 1000)


def parse_since(text: str) -> int | EventRef:
    """`--since`: a time (Unix ms), or the event_id of an event (the events after it)."""
    if "/" in text:
        match = _EVENT_ID.fullmatch(text.strip())
        if match is None:
            raise BadInput(
                f"--since {text!r} is not an event_id (<order id>/<created ms>/<version>/<status>/<reason>)"
            )
        return EventRef(text.strip(), match.group(1), int(match.group(2)))
    return parse_time(text, "--since")


def _id(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class EventLog:
    """Reads the event log of one Redis (or Redis Cluster)."""

    def __init__(self, store: Store, retention_ms: int) -> None:
        self.store = store
        self.redis = store.redis
        self.layout: KeyLayout = store.layout
        self.retention_ms = retention_ms

    async def _first_ids(self, parts: Sequence[int]) -> list[bytes | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in parts:
                pipe.xrange(self.layout.event_log(part), "-", "+", count=1)
            replies = await pipe.execute()
        return [reply[0][0] if reply else None for reply in replies]

    async def _find(self, ref: EventRef) -> tuple[bytes, int]:
        """Where the event `ref` is in the log (entry id, place), looked for
        from its order's creation on."""
        key = self.layout.event_log(part_of(ref.order_id))
        start = f"{ref.created_ms}-0"
        looked = 0
        prefix = ref.order_id.encode() + b"|"
        while looked < SCAN_LIMIT:
            entries = cast("list[Any]", await self.redis.xrange(key, start, "+", count=PAGE))
            for entry_id, fields in entries:
                events = events_of(fields)
                for index, value in events:
                    if value.startswith(prefix):
                        try:
                            if from_logged(value).event_id == ref.event_id:
                                return bytes(entry_id), index
                        except ValueError:
                            pass
                looked += len(events)
            if len(entries) < PAGE:
                break
            start = "(" + entries[-1][0].decode()
        raise NotRetained(
            f"event {ref.event_id!r} is not in the event log: it was published before what the log "
            "keeps (ORDER_LISTENER_EVENT_LOG_RETENTION), or never; replay --since a time instead"
        )

    async def _check_horizon(self, since_ms: int, parts: Sequence[int]) -> None:
        """Refuse a start older than what the log surely keeps: within the
        retention everything is there; before it, only if each part's log
        reaches back that far (its first entry is no later than `since_ms`)."""
        now = await self.store.now_ms()
        if since_ms >= now - self.retention_ms:
            return
        firsts = await self._first_ids(parts)
        if all(first is None for first in firsts):
            raise NotRetained(
                "the event log is empty: no daemon logged an event yet, or the log is off "
                "(ORDER_LISTENER_EVENT_LOG_RETENTION=0)"
            )
        later = [_id(first)[0] for first in firsts if first is not None and _id(first)[0] > since_ms]
        if later:
            back_to = max(now - self.retention_ms, min(later)) if self.retention_ms else max(later)
            raise NotRetained(
                f"--since {iso_ms(since_ms)} is older than what the event log keeps: it goes back to "
                f"{iso_ms(back_to)} (ORDER_LISTENER_EVENT_LOG_RETENTION={self.retention_ms / 1000:g} s); "
                "give a later --since"
            )

    async def events(
        self, since: int | EventRef, until_ms: int | None = None, order_id: str | None = None
    ) -> AsyncIterator[StatusEvent]:
        """The logged events from `since` (a time: at or after it; an event: after
        it) to `until_ms` (before it), of one order or all, in the order they
        were published. Raises NotRetained before the first event if the log
        no longer holds all of them."""
        parts = [part_of(order_id)] if order_id is not None else list(range(PARTS))
        skip: tuple[int, bytes, int] | None = None  # the event's own entry: its events up to it
        if isinstance(since, EventRef):
            after, index = await self._find(since)
            # after it in the merged order (entry id, part, place): its own
            # entry from the next event, an entry of a later part with the
            # same id whole, one of an earlier part not at all
            pivot = part_of(since.order_id)
            start = {part: ("(" if part < pivot else "") + after.decode() for part in parts}
            skip = (pivot, after, index)
            since_ms = _id(after)[0]
        else:
            start = dict.fromkeys(parts, f"{since}-0")
            since_ms = since
        await self._check_horizon(since_ms, parts)
        end = f"({until_ms}-0" if until_ms is not None else "+"
        prefix = b"" if order_id is None else order_id.encode() + b"|"

        def keep(value: bytes) -> bool:
            return value.startswith(prefix)

        async for event in self._merged(parts, start, end, keep, skip):
            yield event

    async def _merged(
        self,
        parts: list[int],
        start: dict[int, str],
        end: str,
        keep: Callable[[bytes], bool],
        skip: tuple[int, bytes, int] | None,
    ) -> AsyncIterator[StatusEvent]:
        """The parts' entries merged by (entry id, part), each entry's events
        in their order, a page per part at a time; `skip` (part, entry id,
        place): that entry's events up to and including it are left out. A
        value that makes no event (written by hand) is skipped."""
        buffers: dict[int, deque[tuple[bytes, dict[bytes, bytes]]]] = {part: deque() for part in parts}
        done: set[int] = set()
        seen = _Seen()

        async def refill(wanted: list[int]) -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                for part in wanted:
                    pipe.xrange(self.layout.event_log(part), start[part], end, count=PAGE)
                replies: list[Any] = await pipe.execute()
            for part, entries in zip(wanted, replies, strict=True):
                buffers[part].extend(entries)
                if len(entries) < PAGE:
                    done.add(part)
                else:
                    start[part] = "(" + entries[-1][0].decode()

        await refill(parts)
        while True:
            empty = [part for part in parts if not buffers[part] and part not in done]
            if empty:
                await refill(empty)
            # (the order `--since EVENT_ID` counts "after" in: entry id, part, place)
            heads = [(_id(buffers[part][0][0]), part) for part in parts if buffers[part]]
            if not heads:
                return
            _, part = min(heads)
            entry_id, fields = buffers[part].popleft()
            first = skip[2] + 1 if skip is not None and (part, entry_id) == skip[:2] else 0
            for event in _entry_events(fields, first, keep):
                if seen.first_time(event.event_id):
                    yield event


class _Seen:
    """The event ids given lately: an append sent again after a lost reply
    (the same events in a later entry) is given once."""

    def __init__(self) -> None:
        self.recent: deque[str] = deque()
        self.ids: set[str] = set()

    def first_time(self, event_id: str) -> bool:
        if event_id in self.ids:
            return False
        self.ids.add(event_id)
        self.recent.append(event_id)
        if len(self.recent) > RECENT:
            self.ids.discard(self.recent.popleft())
        return True


def _entry_events(
    fields: dict[bytes, bytes], first: int, keep: Callable[[bytes], bool]
) -> Iterator[StatusEvent]:
    """The events of one log entry from place `first` on that `keep`
    takes; a value that makes no event (written by hand) is left out."""
    for index, value in events_of(fields):
        if index < first or not keep(value):
            continue
        try:
            event = from_logged(value)
        except ValueError:
            continue
        yield event


def events_of(fields: dict[bytes, bytes]) -> list[tuple[int, bytes]]:
    """The events of a log entry, (place, value), in their order: the lines
    of its field `e`; in an entry written before that field, its fields
    "0", "1", ... by number (a field whose name is not a number, written by
    hand, is left out)."""
    lines = fields.get(LOG_FIELD)
    if lines is not None:
        return list(enumerate(lines.split(b"\n")))
    return sorted((int(name), value) for name, value in fields.items() if name.isdigit() and len(name) < 8)


REPLAY_PAGE = 10_000  # events a replay holds at a time: a day's log need not fit in memory


async def publish_again(
    settings: Any,
    events: AsyncIterable[StatusEvent],
    progress: Callable[[int], None] | None = None,
    rate: float | None = None,
) -> tuple[int, float]:
    """Publish `events` again, in this order, QoS 1, on their topics with the
    same payloads and event_ids, at most `rate` a second (0: as fast as the
    broker acknowledges; None: the pace the daemon gives a `created` backlog
    on this broker, outbox_pump.auto_rate), the broker's window kept full;
    REPLAY_PAGE of them taken from `events` at a time; `progress(n)` as the
    broker acknowledges them. Returns how many were published and the pace
    kept (0: none). MQTT is loaded here only. The daemon's fast publish path
    when it can run (listener.fastpath.paho_io), its fallback otherwise.

    Why a pace: a replay most often follows events a broker dropped because
    a subscriber fell behind; sent at the broker's full speed, the replay
    overflows the same subscriber's queue again."""
    import aiomqtt

    from listener.config import FastPathSetting
    from listener.errors import Unavailable
    from listener.fastpath import FastPaths
    from listener.mqtt import Publisher, default_client_id
    from listener.mqtt.client import make_publishing_client
    from listener.outbox_pump import auto_rate
    from listener.urls import mqtt_target

    fast_paths = FastPaths(enabled=settings.fast_paths is FastPathSetting.AUTO)
    client = make_publishing_client(settings, fast_paths, identifier=default_client_id("replay"))
    published = 0
    try:
        async with client:
            publisher = Publisher(client, settings.mqtt_protocol == "5", settings.topic_prefix)
            pace = auto_rate([publisher.window]) if rate is None else rate

            def page_progress(done: int) -> None:
                if progress is not None:
                    progress(published + done)

            async for page in _pages(events, REPLAY_PAGE):
                await publisher.publish(page, timeout=10.0, rate=pace, progress=page_progress)
                published += len(page)
            return published, pace
    except aiomqtt.MqttError as exc:
        raise Unavailable(
            f"replay to the MQTT broker at {mqtt_target(settings.mqtt_url).shown} failed: {exc}; "
            f"{published} event(s) or more were published before the failure"
        ) from None


async def _pages(events: AsyncIterable[StatusEvent], size: int) -> AsyncIterator[list[StatusEvent]]:
    page: list[StatusEvent] = []
    async for event in events:
        page.append(event)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page
