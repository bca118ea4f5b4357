"""What the broker says it dropped: mosquitto's ``$SYS/broker/publish/messages/dropped``.

A mosquitto left at its defaults queues at most 1,000 QoS 1 messages for a
subscriber beyond those in flight to it and drops the rest, telling neither
the publisher (its PUBACK is the same) nor the subscriber. A status
subscriber that falls behind in a burst, or is offline with a persistent
session, loses events that way, and the daemon cannot prevent it. But
mosquitto publishes its total of dropped messages (every topic, every
client, since it started) as a retained ``$SYS`` message every
``sys_interval`` seconds (10 by default): the daemon reads it, so that the
operator learns it from the daemon's metrics and log, with the fix.

Brokers that publish no such topic, or refuse it to this user, report
nothing; a mosquitto whose ACL file does not grant the topic even confirms
the subscription and then sends nothing. So a watch that got no count
within NO_COUNT_AFTER_S of subscribing says so once, with that grant. A
broker that closes the connection on the subscription (some managed ones
do for topics a user may not read) costs one session: the link does not
ask again (mqtt/link.py). The payload is untrusted like any MQTT message:
anything but a whole number is ignored, said once.

Each warning also says how to give subscribers what they may have missed:
the `replay` command for the event log from before the drops, paced so that
the replay does not overflow the same queue again. mosquitto publishes the
count only when it changed, at its next `$SYS` tick: the drops happened
after the count before (the last change, which may be days old) and within
a tick of the count that shows them. So the replay starts at the later of
the two, the latter taken as REPLAY_LOOKBACK_S (for ticks of up to 50 s;
mosquitto's default is 10), less REPLAY_MARGIN_S.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from listener import logs
from listener.events import iso_ms

log = logs.get("listener.mqtt")

DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
WARN_EVERY_S = 60.0  # the metric counts every drop; the log says so at most once a minute
NO_COUNT_AFTER_S = 30.0  # mosquitto publishes $SYS every sys_interval (10 s), retained
FIX = (
    "raise max_queued_messages in mosquitto.conf (0: no limit; max_queued_bytes bounds the memory), "
    "or make every status subscriber keep up; the count covers every topic and client of the broker"
)
# The drops that a count shows happened at most this long before it arrived
# (a `sys_interval` of up to 50 s, and the count's way to us).
REPLAY_LOOKBACK_S = 60.0
# The event log's entries carry Redis' clock, the count's time this machine's:
# a replay starts this much earlier still.
REPLAY_MARGIN_S = 10.0
GRANT = f"mosquitto with an acl_file: grant this user `topic read {DROPPED_TOPIC}`"


class DropWatch:
    """Turns the broker's running total into the drops since the last value:
    `on_new(count)` for each increase, and a warning at most every
    WARN_EVERY_S with what came since the last one (what came within it is
    said by `tick`, called every few seconds, once the time has come). The
    first value (the broker's drops before this daemon connected) is a
    baseline, said once if not 0; a lower value means the broker restarted,
    and counts from 0. With `replay` (the event log is on), a warning of new
    drops carries the command that publishes the events again from before
    them (`drops_began`; `wall`: the time of day, for that)."""

    def __init__(
        self,
        on_new: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        replay: bool = False,
    ) -> None:
        self.on_new = on_new
        self.clock = clock
        self.wall = wall
        self.replay = replay
        self.read_at: float | None = None  # the time of day of the last count
        self.unsaid_since: float | None = None  # when the first drops not said yet may have begun
        self.last: int | None = None
        self.unsaid = 0
        self.said_at: float | None = None
        self.bad_said = False
        self.subscribed_at: float | None = None  # the subscription confirmed, no count yet
        self.none_said = False  # that no count came, or that the broker refused the subscription

    @property
    def watched(self) -> bool:
        """A count has come from the broker."""
        return self.last is not None

    def subscribed(self) -> None:
        if self.last is None and self.subscribed_at is None:
            self.subscribed_at = self.clock()

    def refused(self) -> None:
        """The broker refused the subscription (its SUBACK): said once."""
        if not self.none_said:
            self.none_said = True
            log.info(
                "the broker does not let this user read its dropped-messages count: not watched",
                topic=DROPPED_TOPIC,
                fix=GRANT,
            )

    def tick(self) -> None:
        """Say drops held back by the once-a-minute rule once the minute is
        over, and that no count came, once, NO_COUNT_AFTER_S after subscribing."""
        now = self.clock()
        self._say_if_due(now)
        since = self.subscribed_at
        if self.last is None and since is not None and now - since >= NO_COUNT_AFTER_S and not self.none_said:
            self.none_said = True
            log.info(
                f"no count of dropped messages from the broker within {NO_COUNT_AFTER_S:g} s: not watched "
                "(brokers other than mosquitto publish none)",
                topic=DROPPED_TOPIC,
                fix=GRANT,
            )

    def seen(self, payload: object) -> None:
        value = read_count(payload)
        if value is None:
            if not self.bad_said:
                self.bad_said = True
                log.warning(
                    "the broker's dropped-messages count is not a whole number: ignored",
                    topic=DROPPED_TOPIC,
                    payload=_shown(payload),
                )
            return
        last, self.last = self.last, value
        read_before, self.read_at = self.read_at, self.wall()
        if last is None:
            if value:
                log.warning(
                    "the broker dropped messages before this daemon connected",
                    dropped=value,
                    fix=FIX,
                )
            return
        new = value - last if value >= last else value
        if new <= 0:
            return
        self.on_new(new)
        if not self.unsaid:
            self.unsaid_since = drops_began(read_before, self.read_at)
        self.unsaid += new
        self._say_if_due(self.clock())

    def _say_if_due(self, now: float) -> None:
        """The drops not said yet, unless the last warning is less than WARN_EVERY_S old."""
        if not self.unsaid or (self.said_at is not None and now - self.said_at < WARN_EVERY_S):
            return
        again = {}
        if self.replay and self.unsaid_since is not None:
            again["replay"] = replay_command(self.unsaid_since)
        log.warning(
            "the broker dropped messages: a subscriber's queue at the broker is full",
            dropped=self.unsaid,
            broker_total=self.last,
            fix=FIX,
            **again,
        )
        self.unsaid, self.said_at, self.unsaid_since = 0, now, None


def drops_began(count_before: float | None, count_now: float) -> float:
    """The earliest time of day the drops a count shows can have begun: after
    the count before it (`None`: none since this daemon connected), and
    within REPLAY_LOOKBACK_S of this one."""
    earliest = count_now - REPLAY_LOOKBACK_S
    return earliest if count_before is None else max(count_before, earliest)


def replay_command(began: float) -> str:
    """The command that publishes the logged events again from REPLAY_MARGIN_S
    before `began` (a time of day), at the pace the daemon gives a backlog."""
    since = iso_ms(math.floor((began - REPLAY_MARGIN_S) * 1000))
    return f"order-listener replay --since {since} --publish"


def _shown(payload: object) -> str:
    if isinstance(payload, bytes | bytearray | str):
        return repr(payload[:60])
    return repr(payload)[:60]


def read_count(payload: object) -> int | None:
    """A whole number of at most 20 ASCII digits (mosquitto's counters are 64-bit)."""
    if isinstance(payload, bytearray):
        payload = bytes(payload)
    if isinstance(payload, str):
        payload = payload.encode("ascii", errors="replace")
    if isinstance(payload, bytes) and 0 < len(payload) <= 20 and payload.isdigit():
        return int(payload)
    return None
