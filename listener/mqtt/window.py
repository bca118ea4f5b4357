"""The in-flight window of one MQTT connection: QoS 1 publishes awaiting PUBACK.

Events are sent as soon as the window has room and each PUBACK makes room for
the next one: a caller never waits for a whole batch to be acknowledged
before it sends more, so the broker's Receive Maximum (20 on a stock
mosquitto) is kept full. Whoever sends (an `AckSink`) is told of each PUBACK
with the token it gave, and of a lost connection once for all it had in
flight. Messages go out in the order they are sent, on one connection: MQTT
keeps that order per topic, so one order's events stay in version order.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import aiomqtt
from paho.mqtt import client as mqtt_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from listener.events import StatusEvent
from listener.fastpath.paho_io import FastPaho
from listener.mqtt.client import CheckedClient, PublishRefused
from listener.mqtt.packets import encode_publish, property_bytes, publish_properties, topic_level_ok

# QoS 1 publishes awaiting PUBACK per connection when the broker announces no
# smaller Receive Maximum (MQTT 5): enough to keep a loopback or LAN link busy.
WINDOW = 1000
PACE_STEP_S = 0.005  # a paced `publish` sends this many seconds' worth at a time
PACE_CATCH_UP = 4  # ... and at most this many steps' worth at once after falling behind


class AckSink(Protocol):
    def acked(self, token: Any, reason: int) -> None:
        """The broker answered the publish sent with `token`; `reason` >= 0x80 is a refusal."""

    def lost(self, reason: str) -> None:
        """The connection is gone: none of this sink's unanswered publishes will be answered."""


def refusal_text(reason: int) -> str:
    try:
        return str(ReasonCode(PacketTypes.PUBACK, identifier=reason))
    except ValueError:  # a code MQTT does not define for PUBACK
        return f"reason code {reason:#04x}"


class Publisher:
    """Publishing on one connection, at most `window` messages awaiting PUBACK."""

    def __init__(self, client: CheckedClient, v5: bool, prefix: str, window: int = WINDOW) -> None:
        self.client = client
        self.v5 = v5
        self.prefix = prefix
        self.window = max(1, min(window, client.receive_maximum)) if v5 else max(1, window)
        self.inflight = 0
        self._pending = client.pending  # message id -> (sink, token); shared with the fast path
        self._waiters: list[asyncio.Future[None]] = []
        self._wake_due = False
        self._loop = asyncio.get_running_loop()
        self._lost = ""  # why the connection is gone; empty while it is up
        client.acker = self._ack

    @property
    def room(self) -> int:
        return 0 if self._lost else self.window - self.inflight

    @property
    def lost(self) -> str:
        return self._lost

    def send(self, events: Sequence[StatusEvent], tokens: Sequence[Any], sink: AckSink) -> None:
        """Write these publishes now (the caller keeps within `room`). Raises
        MqttError if the connection is gone; ValueError for an order id that
        cannot be a topic level (the outbox's parser refuses such ids first)."""
        if self._lost:
            raise aiomqtt.MqttError(self._lost)
        fast = self.client.fast
        if fast is not None:
            rc = self._send_fast(fast, events, tokens, sink)
        else:
            rc = self._send_paho(events, tokens, sink)
        if rc != mqtt_client.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(rc, "Could not publish message")

    def _send_fast(
        self, fast: FastPaho, events: Sequence[StatusEvent], tokens: Sequence[Any], sink: AckSink
    ) -> int:
        """All publishes encoded here and queued in one write on paho's socket."""
        pending, prefix, v5 = self._pending, self.prefix, self.v5
        packets: list[bytes] = []
        for event, token in zip(events, tokens, strict=True):
            if not topic_level_ok(event.order_id):
                raise ValueError(f"order id {event.order_id!r} cannot be a topic level")
            try:
                mid = fast.next_mid()
            except Exception as exc:  # a paho that changed under the same names
                self.client.drop_fast(exc)
                raise aiomqtt.MqttError(f"fast publish path failed: {exc!r}") from exc
            topic = f"{prefix}/{event.order_id}/status".encode()
            props = property_bytes(event) if v5 else None
            packets.append(encode_publish(topic, mid, props, event.payload()))
            pending[mid] = (sink, token)
        self.inflight += len(packets)
        try:
            rc: int = fast.queue_publishes(b"".join(packets))
        except Exception as exc:
            self.client.drop_fast(exc)
            raise aiomqtt.MqttError(f"fast publish path failed: {exc!r}") from exc
        return rc

    def _send_paho(self, events: Sequence[StatusEvent], tokens: Sequence[Any], sink: AckSink) -> int:
        """Each publish through paho's public publish(); stops at the first it refuses."""
        pending, prefix, v5 = self._pending, self.prefix, self.v5
        paho = self.client.paho
        for event, token in zip(events, tokens, strict=True):
            if not topic_level_ok(event.order_id):
                raise ValueError(f"order id {event.order_id!r} cannot be a topic level")
            info = paho.publish(
                f"{prefix}/{event.order_id}/status",
                event.payload(),
                1,
                False,
                publish_properties(event, v5),
            )
            if info.rc != mqtt_client.MQTT_ERR_SUCCESS:
                return info.rc
            pending[info.mid] = (sink, token)
            self.inflight += 1
        return mqtt_client.MQTT_ERR_SUCCESS

    def _ack(self, mid: int, reason: int) -> None:
        entry = self._pending.pop(mid, None)
        if entry is None:
            return
        self.inflight -= 1
        sink, token = entry
        if sink is not None:
            sink.acked(token, reason)
        if not self._wake_due and self._waiters:
            self._wake_due = True  # once per socket read, not once per PUBACK
            self._loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_due = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def waiter(self) -> asyncio.Future[None]:
        """A future done at the next PUBACK or when the connection is lost
        (done already if it is gone). It counts from now, not from when the
        caller first awaits it: a PUBACK read in between (the caller waiting
        on several connections at once) still ends the wait."""
        waiter = self._loop.create_future()
        if self._lost:
            waiter.set_result(None)
        else:
            self._waiters.append(waiter)
        return waiter

    async def changed(self, timeout: float | None) -> bool:
        """Wait until a PUBACK arrives or the connection is lost (True), or `timeout` passes (False)."""
        if self._lost:
            await asyncio.sleep(0.01)  # the link is replacing the connection: let it
            return True
        waiter = self.waiter()
        try:
            async with asyncio.timeout(timeout):
                await waiter
            return True
        except TimeoutError:
            return False
        finally:
            if not waiter.done():
                waiter.cancel()

    def forget(self, sink: AckSink) -> int:
        """Stop routing this sink's PUBACKs (it gave up on them: a timeout);
        their room in the window is freed. Returns how many were dropped."""
        mids = [mid for mid, (owner, _) in self._pending.items() if owner is sink]
        for mid in mids:
            del self._pending[mid]
        self.inflight -= len(mids)
        return len(mids)

    def fail(self, reason: str) -> None:
        """The connection is gone: every sink with publishes in flight hears it once."""
        self._lost = reason
        sinks = {id(sink): sink for sink, _ in self._pending.values() if sink is not None}
        self._pending.clear()
        self.inflight = 0
        for sink in sinks.values():
            sink.lost(reason)
        self._wake()

    async def publish(
        self,
        events: Sequence[StatusEvent],
        timeout: float,
        rate: float = 0.0,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Publish in this order and return once the broker acknowledged all of
        them (for callers outside the outbox: `replay`, tests, benchmarks),
        at most `rate` a second if given (PACE_STEP_S's worth at a time; a
        late wake-up is caught up, never more than PACE_CATCH_UP steps at
        once), the window kept full meanwhile, never waiting for one step's
        last PUBACK before the next step goes; `progress(n)` as the
        acknowledged count grows. Raises MqttError if the connection is lost
        or the broker is silent for `timeout` seconds with publishes
        unanswered, PublishRefused if it refused any."""
        waiting = _Waiting(self._loop)
        pace = _Pace(rate, self._loop)
        sent = reported = 0
        try:
            while True:
                if waiting.gone or self._lost:  # (lost with none of ours in flight: between steps)
                    raise aiomqtt.MqttError(waiting.gone or self._lost)
                if progress is not None and sent - waiting.open > reported:
                    reported = sent - waiting.open
                    progress(reported)
                if sent == len(events) and not waiting.open:
                    break
                if waiting.open and self._loop.time() - waiting.heard > timeout:
                    raise aiomqtt.MqttError("publish timed out: no PUBACK from the broker")
                take = min(self.room, len(events) - sent, pace.allows(sent))
                if take > 0:
                    if not waiting.open:  # the broker's silence counts from the first unanswered
                        waiting.heard = self._loop.time()
                    self.send(events[sent : sent + take], range(sent, sent + take), waiting)
                    waiting.open += take
                    sent += take
                    continue
                held = sent < len(events) and self.room > 0  # by the pace, not the window
                # until a PUBACK, a lost connection, or (held) the pace's next step
                await self.changed(pace.wait(sent) if held else timeout)
        finally:
            if waiting.open:
                self.forget(waiting)
        if waiting.refused:
            reasons = sorted(set(waiting.refused))
            raise PublishRefused(
                f"the broker refused {len(waiting.refused)} publish(es): {', '.join(reasons)}"
            )


class _Pace:
    """At most `rate` publishes a second (0: no limit), a step of
    PACE_STEP_S's worth at a time. What a late wake-up or a full window held
    back goes later, but never more than PACE_CATCH_UP steps at once: a
    pace is there so that a subscriber's queue at the broker does not fill."""

    def __init__(self, rate: float, loop: asyncio.AbstractEventLoop) -> None:
        self.rate = rate
        self.loop = loop
        self.step = max(1, int(rate * PACE_STEP_S))
        self.started = loop.time()  # the pace counts from here; moved up after falling behind (allows)

    def allows(self, sent: int) -> int:
        """How many more may go now, `sent` having gone."""
        if not self.rate:
            return sys.maxsize
        now = self.loop.time()
        self.started = max(self.started, now - (sent + (PACE_CATCH_UP - 1) * self.step) / self.rate)
        return int((now - self.started) * self.rate + 1e-6) + self.step - sent  # (a float's last bit)

    def wait(self, sent: int) -> float:
        """Seconds until a step more is allowed."""
        if not self.rate:
            return 0.0
        return max(0.0, self.started + sent / self.rate - self.loop.time())


class _Waiting:
    """An `AckSink` that counts what is still unanswered (`Publisher.publish`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.open = 0
        self.refused: list[str] = []
        self.gone = ""  # why the connection was lost
        self.heard = 0.0  # the loop's time of the last PUBACK, or of a send with none unanswered

    def acked(self, token: Any, reason: int) -> None:
        self.open -= 1
        self.heard = self.loop.time()
        if reason >= 0x80:
            self.refused.append(refusal_text(reason))

    def lost(self, reason: str) -> None:
        self.gone = reason
        self.open = 0
