"""The link to the broker: connections kept up with reconnects, subscriptions, incoming messages.

aiomqtt's reconnect pattern is a loop around ``async with Client(...)``; the
link runs that loop (under `supervise`, with backoff), subscribes, hands
incoming messages to a handler and gives publishers the current connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiomqtt

from listener import logs
from listener.config import FastPathSetting, Settings
from listener.events import StatusEvent
from listener.fastpath import FastPaths
from listener.mqtt.client import (
    CheckedClient,
    default_client_id,
    is_failure,
    make_publishing_client,
)
from listener.mqtt.drops import DROPPED_TOPIC, DropWatch
from listener.mqtt.window import WINDOW, Publisher
from listener.supervise import Service, supervise
from listener.urls import mqtt_target

log = logs.get("listener.mqtt")

Handler = Callable[[aiomqtt.Message], Awaitable[None]]


# `auto` connections: a broker that allows fewer than UNTUNED_INFLIGHT
# messages in flight per connection (its defaults: docs/design.md, "The broker
# as installed") holds one connection to that many unacknowledged publishes,
# which bounds what it carries per PUBACK round trip. Spread over several
# connections the lanes keep about this many in flight in all. A power of
# two divides the outbox lanes (keys.PARTS) evenly.
UNTUNED_INFLIGHT = 64
AUTO_CONNECTIONS_MAX = 8


def connections_for(receive_maximum: int | None) -> int:
    """The connections `auto` opens for a broker announcing `receive_maximum`
    (None: MQTT 3.1.1, where the broker does not say; one connection)."""
    count = 1
    if receive_maximum is not None:
        while count * receive_maximum < UNTUNED_INFLIGHT and count < AUTO_CONNECTIONS_MAX:
            count *= 2
    return count


@dataclass
class Connection:
    """The connections of one session, all up together."""

    publishers: list[Publisher]


class MqttLink:
    """Keeps the connections to the broker; publishers borrow the current ones.

    Connection 0 subscribes and receives; with more connections (set, or
    `auto` for a broker with a small Receive Maximum) publish-only ones share
    the publishing, each taking whole outbox lanes (`part`), so an order's
    events stay on one connection, in order."""

    def __init__(
        self,
        settings: Settings,
        service: Service,
        *,
        subscriptions: Sequence[str] = (),
        handler: Handler | None = None,
        fast_paths: FastPaths | None = None,
        drops: DropWatch | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.subscriptions = list(subscriptions)
        self.handler = handler
        self.drops = drops  # reads what the broker says it dropped (mqtt/drops.py)
        self._drops_asking = False  # a session asked for the count and has had no answer yet
        self.v5 = settings.mqtt_protocol == "5"
        self.configured = settings.mqtt_connections  # None: auto, from the first CONNACK
        self._auto_cap = AUTO_CONNECTIONS_MAX  # lowered when the broker refuses one under auto
        self.count = self.configured or 1  # the connections of the current (or last) session
        persistent = bool(settings.mqtt_client_id)
        self._identifier = settings.mqtt_client_id or default_client_id("daemon")
        self._persistent = persistent
        self._current: Connection | None = None
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()
        self.fast_paths = fast_paths or FastPaths(enabled=settings.fast_paths is FastPathSetting.AUTO)

    async def run(self) -> None:
        await supervise("mqtt", self.service, self._session)

    def _make(self, index: int) -> CheckedClient:
        if index == 0:
            identifier, persistent = self._identifier, self._persistent
        else:  # publish only: no session state worth keeping
            identifier, persistent = f"{self._identifier}-p{index}", False
        return make_publishing_client(
            self.settings, self.fast_paths, identifier=identifier, persistent=persistent
        )

    async def _session(self) -> None:
        main = self._make(0)
        if self.handler is not None:
            # PUBACK a message only once the handler has applied it to Redis,
            # so the broker redelivers what a crash or an outage interrupted.
            main.paho.manual_ack_set(True)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(main)
            clients = [main, *await self._open_more(stack, main)]
            self.count = len(clients)
            for topic in self.subscriptions:
                granted = await main.subscribe(topic, qos=1)
                if any(is_failure(code) for code in granted):
                    log.error(
                        "the broker refused the subscription; logistics messages will not arrive",
                        topic=topic,
                        reason=[str(code) for code in granted],
                        fix="allow this user to subscribe to the topic (broker ACL)",
                    )
            if self.drops is not None:
                await self._watch_drops(main, self.drops)
            prefix = self.settings.topic_prefix
            connection = Connection([Publisher(c, self.v5, prefix, WINDOW) for c in clients])
            self._current = connection
            self.connected.set()
            self.subscribed.set()
            self.service.ok()
            log.info(
                "mqtt connected",
                broker=mqtt_target(self.settings.mqtt_url).shown,
                subscriptions=self.subscriptions,
                connections=self.count,
                window=connection.publishers[0].window,
            )
            reason = "connection closed"
            try:
                await self._receive_until_lost(clients)
            except BaseException as exc:  # also a stop (cancelled) or a failing handler
                reason = str(exc) or type(exc).__name__
                raise
            finally:
                for publisher in connection.publishers:
                    publisher.fail(f"connection to the broker lost while publishing ({reason})")
                self.connected.clear()
                self._current = None

    async def _open_more(self, stack: contextlib.AsyncExitStack, main: CheckedClient) -> list[CheckedClient]:
        """The publish-only connections beside `main`: as many as configured, or
        for `auto` as the Receive Maximum in main's CONNACK asks for. A set
        count is what the operator asked for: a refusal fails the session like
        any other. Under `auto` the daemon goes on with the connections the
        broker accepted (a limit on connections per user, an ACL on client
        ids), says so once, and asks for no more than that from then on."""
        if self.configured is not None:
            wanted = self.configured
        else:
            wanted = min(self._auto_cap, connections_for(main.receive_maximum if self.v5 else None))
        opened: list[CheckedClient] = []
        for index in range(1, wanted):
            client = self._make(index)
            try:
                await stack.enter_async_context(client)
            except aiomqtt.MqttError as exc:
                if self.configured is not None:
                    raise
                self._auto_cap = index
                log.warning(
                    "the broker refused another publish connection; publishing over fewer",
                    connections=index,
                    wanted=wanted,
                    error=str(exc),
                    fix=f"allow this user {wanted} connections and the client ids "
                    f"{self._identifier}-p1 ... -p{wanted - 1}, or set ORDER_LISTENER_MQTT_CONNECTIONS",
                )
                break
            opened.append(client)
        return opened

    async def _receive_until_lost(self, clients: list[CheckedClient]) -> None:
        """Hand incoming messages to the handler until a connection is lost
        (each client's message iterator raises MqttError then)."""
        tasks = [
            asyncio.ensure_future(self._receive(client, index == 0)) for index, client in enumerate(clients)
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise aiomqtt.MqttError("connection to the broker closed")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_drops(self, main: CheckedClient, watch: DropWatch) -> None:
        """Subscribe to the broker's count of dropped messages (QoS 0: a lost
        one is replaced by the next; retained: the current count comes at once).
        A session that ended while it asked (a broker that closes the
        connection on a topic it will not serve) was the last to ask: the
        count is not worth a daemon that cannot stay connected."""
        if self._drops_asking:
            self.drops = None
            log.warning(
                "the connection to the broker ended as the daemon asked for its dropped-messages "
                "count: not asked again, not watched",
                topic=DROPPED_TOPIC,
            )
            return
        self._drops_asking = True
        granted = await main.subscribe(DROPPED_TOPIC, qos=0)
        self._drops_asking = False
        if any(is_failure(code) for code in granted):
            watch.refused()
        else:
            watch.subscribed()

    async def _receive(self, client: CheckedClient, main: bool) -> None:
        async for message in client.messages:
            if not main:
                continue
            if self.drops is not None and message.topic.value == DROPPED_TOPIC:
                self.drops.seen(message.payload)
                if message.qos:  # subscribed at QoS 0; a broker that sends more gets its ack
                    client.paho.ack(message.mid, message.qos)
            elif self.handler is not None:
                await self.handler(message)
                client.paho.ack(message.mid, message.qos)

    async def connection(self) -> Connection:
        while True:
            await self.connected.wait()
            if self._current is not None:
                return self._current

    async def publish(self, events: Sequence[StatusEvent], timeout: float = 10.0, *, part: int = 0) -> None:
        """Publish with QoS 1, in this order, and return once the broker
        acknowledged all of them. `part` (an outbox lane) picks the connection.
        Raises MqttError if the connection is lost or the broker is silent for
        `timeout` seconds, PublishRefused if it refused any."""
        connection = await self.connection()
        publishers = connection.publishers
        await publishers[part % len(publishers)].publish(events, timeout)
