"""Events in: the carrier's parcel status on ``logistics/<order_id>/status``.

``{"status": "delivered"}`` delivers a paid order (reason logistics),
``{"status": "returned"}`` refunds and cancels a delivered one (reason
returned). Anything else is logged with the reason and dropped: the daemon
keeps running. A redelivered message changes nothing (the scripts are
idempotent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiomqtt

from listener import logs
from listener.errors import BadInput
from listener.orders import Operation, validate_order_id
from listener.store import Store, TransitionResult
from listener.supervise import Service, describe, supervise

log = logs.get("listener.logistics")

MAX_PAYLOAD = 4096
_OPERATIONS = {
    "delivered": Operation.LOGISTICS_DELIVERED,
    "returned": Operation.LOGISTICS_RETURNED,
}


class Dropped(Exception):
    """A logistics message we cannot act on; the text says why."""


@dataclass(frozen=True)
class ParcelReport:
    order_id: str
    status: str


def order_id_from_topic(topic_filter: str, topic: str) -> str | None:
    """The level of `topic` where `topic_filter` has its single '+'."""
    wanted = topic_filter.split("/")
    levels = topic.split("/")
    if "+" not in wanted or len(wanted) != len(levels):
        return None
    return levels[wanted.index("+")]


def parse_report(topic_filter: str, topic: str, payload: bytes) -> ParcelReport:
    """Validate one message; raises Dropped with the reason."""
    if len(payload) > MAX_PAYLOAD:
        raise Dropped(f"payload of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Dropped(f"payload is not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("status"), str):
        raise Dropped('payload must be a JSON object with a string "status"')
    order_id = order_id_from_topic(topic_filter, topic)
    if order_id is None:
        raise Dropped(f"topic {topic!r} does not match {topic_filter!r}")
    try:
        validate_order_id(order_id)
    except BadInput as exc:
        raise Dropped(str(exc)) from None
    return ParcelReport(order_id, body["status"])


class LogisticsHandler:
    def __init__(self, store: Store, topic_filter: str, redis_service: Service) -> None:
        self.store = store
        self.topic_filter = topic_filter
        self.redis_service = redis_service
        # handled: reached an order (applied, repeated, or refused by its status);
        # dropped: not acted on (malformed, invalid id, ignored status, unknown order).
        self.handled = 0
        self.dropped = 0

    async def __call__(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        try:
            report = parse_report(self.topic_filter, topic, payload)
        except Dropped as exc:
            self.dropped += 1
            log.warning("logistics message dropped", topic=topic, reason=str(exc))
            return
        operation = _OPERATIONS.get(report.status)
        if operation is None:
            self.dropped += 1
            log.info("logistics status ignored", order_id=report.order_id, status=report.status)
            return

        # The broker gets our PUBACK only after this: keep trying until Redis takes it.
        async def apply() -> TransitionResult:
            result = await self.store.apply(operation, report.order_id)
            self.redis_service.ok()
            return result

        try:
            outcome = await supervise("logistics", self.redis_service, apply)
        except Exception as exc:  # e.g. a malformed order record; outages are retried in supervise
            # dropped, not raised: an error here would end the broker session and
            # the same message would come back (it is not acknowledged) forever
            self.dropped += 1
            log.error("logistics message could not be applied", order_id=report.order_id, error=describe(exc))
            return
        if outcome.outcome == "unknown":
            self.dropped += 1
            log.warning(
                "logistics message for an unknown order dropped",
                order_id=report.order_id,
                parcel=report.status,
            )
            return
        self.handled += 1
        fields = {"order_id": report.order_id, "parcel": report.status, "status": outcome.status}
        if outcome.outcome == "done":
            log.info("logistics applied", **fields, version=outcome.version)
        elif outcome.outcome == "already":
            log.debug("logistics repeated; nothing changed", **fields)
        else:
            log.warning("logistics message refused by the order's status", **fields)
