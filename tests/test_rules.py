"""Pure rules (no servers): transition table, validation, events, key layout, bulk parsing."""

from __future__ import annotations

import pytest

from listener.bulk import parse_lines
from listener.config import load_settings
from listener.errors import BadInput, ConfigError
from listener.events import StatusEvent, iso_ms
from listener.keys import PARTS, KeyLayout, part_of
from listener.logistics import Dropped, order_id_from_topic, parse_report
from listener.orders import (
    Operation,
    Outcome,
    Reason,
    Status,
    decide,
    parse_timeout,
    validate_order_id,
)
from listener.urls import mqtt_target, redact, redis_target

S = Status


@pytest.mark.parametrize(
    ("operation", "status", "reason", "expected"),
    [
        (Operation.PAY, S.CREATED, Reason.CREATED, Outcome.DONE),
        (Operation.PAY, S.PAID, Reason.PAID, Outcome.ALREADY),
        (Operation.PAY, S.DELIVERED, Reason.DELIVERED, Outcome.ALREADY),
        (Operation.PAY, S.CANCELLED, Reason.TIMEOUT, Outcome.REFUSED),
        (Operation.EXPIRE, S.CREATED, Reason.CREATED, Outcome.DONE),
        (Operation.EXPIRE, S.CANCELLED, Reason.TIMEOUT, Outcome.ALREADY),
        (Operation.EXPIRE, S.PAID, Reason.PAID, Outcome.REFUSED),
        (Operation.CANCEL, S.CREATED, Reason.CREATED, Outcome.DONE),
        (Operation.CANCEL, S.CANCELLED, Reason.TIMEOUT, Outcome.ALREADY),
        (Operation.CANCEL, S.PAID, Reason.PAID, Outcome.REFUSED),
        (Operation.DELIVER, S.PAID, Reason.PAID, Outcome.DONE),
        (Operation.DELIVER, S.DELIVERED, Reason.LOGISTICS, Outcome.ALREADY),
        (Operation.DELIVER, S.CREATED, Reason.CREATED, Outcome.REFUSED),
        (Operation.REFUND, S.PAID, Reason.PAID, Outcome.DONE),
        (Operation.REFUND, S.DELIVERED, Reason.DELIVERED, Outcome.DONE),
        (Operation.REFUND, S.CANCELLED, Reason.REFUND, Outcome.ALREADY),
        (Operation.REFUND, S.CANCELLED, Reason.RETURNED, Outcome.ALREADY),
        (Operation.REFUND, S.CANCELLED, Reason.TIMEOUT, Outcome.REFUSED),
        (Operation.REFUND, S.CREATED, Reason.CREATED, Outcome.REFUSED),
        (Operation.LOGISTICS_RETURNED, S.DELIVERED, Reason.LOGISTICS, Outcome.DONE),
        (Operation.LOGISTICS_RETURNED, S.PAID, Reason.PAID, Outcome.REFUSED),
        (Operation.LOGISTICS_DELIVERED, S.PAID, Reason.PAID, Outcome.DONE),
    ],
)
def test_transition_table(operation: Operation, status: Status, reason: Reason, expected: Outcome) -> None:
    assert decide(operation, status, reason) is expected


@pytest.mark.parametrize("good", ["a", "A-1_b.c:d", "x" * 128, "0"])
def test_valid_ids(good: str) -> None:
    assert validate_order_id(good) == good


@pytest.mark.parametrize(
    ("bad", "message"),
    [("", "empty"), ("x" * 129, "at most 128"), ("a b", "not allowed"), ("a/b", "'/'"), ("ü", "not allowed")],
)
def test_invalid_ids(bad: str, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        validate_order_id(bad)


def test_timeouts() -> None:
    assert parse_timeout("0.1") == 100
    assert parse_timeout("1.2345") == 1234
    assert parse_timeout(2592000) == 2592000 * 1000
    for bad in ("0.09", "2592000.5", "-1", "abc", "inf", ""):
        with pytest.raises(BadInput):
            parse_timeout(bad)


def test_event_payload_and_time_format() -> None:
    event = StatusEvent("A-1", "created", None, "created", 1, 1795564800123, 1795564800123, 1795566600123)
    body = event.as_dict()
    assert body == {
        "event_id": "A-1/1795564800123/1/created/created",
        "order_id": "A-1",
        "status": "created",
        "previous": None,
        "reason": "created",
        "at": iso_ms(1795564800123),
        "version": 1,
        "deadline": iso_ms(1795566600123),
    }
    assert body["event_id"] == "A-1/1795564800123/1/created/created"
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(1795564800123).endswith(".123Z")
    assert event.topic("orders") == "orders/A-1/status"


def test_key_layout_and_timer_parsing() -> None:
    layout = KeyLayout("order")
    part = part_of("A-1")
    assert 0 <= part < PARTS
    assert layout.timer("A-1") == f"order:{{{part}}}:t:A-1"
    assert layout.parse_timer(layout.timer("A-1")) == "A-1"
    assert layout.parse_timer(layout.order("A-1")) is None
    assert layout.parse_timer("order:{99}:t:A-1") is None
    assert layout.parse_timer(f"other:{{{part}}}:t:A-1") is None
    assert KeyLayout("shop.eu").parse_timer(KeyLayout("shop.eu").timer("a:b:c")) == "a:b:c"


def test_bulk_parsing() -> None:
    parsed = parse_lines(["a 1", "", "# c", "b", "bad id x", "c zz", "a 2"], 5000)
    assert [(line.number, line.order_id, line.timeout_ms) for line in parsed.lines] == [
        (1, "a", 1000),
        (4, "b", 5000),
    ]
    assert [p.number for p in parsed.bad] == [5, 6]
    assert [p.number for p in parsed.repeated] == [7]


def test_settings_validation_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="ORDER_LISTENER_DEFAULT_TIMEOUT"):
        load_settings(default_timeout=0)
    with pytest.raises(ConfigError, match="ORDER_LISTENER_TOPIC_PREFIX"):
        load_settings(topic_prefix="orders/#")
    with pytest.raises(ConfigError, match="ORDER_LISTENER_MQTT_PROTOCOL"):
        load_settings(mqtt_protocol="4")


def test_urls() -> None:
    assert redis_target("redis://u:p@h:1/3").db == 3
    assert redis_target("rediss://h").tls
    assert redis_target("unix:///run/redis.sock?db=2").db == 2
    target = mqtt_target("mqtts://user:pa%40ss@broker")
    assert (target.host, target.port, target.tls, target.password) == ("broker", 8883, True, "pa@ss")
    assert "pa%40ss" not in target.shown and "***" in target.shown
    assert redact("redis://:secret@h:6379/0") == "redis://:***@h:6379/0"
    for bad in ("http://h", "redis://", "redis://h/x"):
        with pytest.raises(ValueError, match=r"Redis URL|no host|not a number"):
            redis_target(bad)


def test_logistics_parsing() -> None:
    assert order_id_from_topic("logistics/+/status", "logistics/A-1/status") == "A-1"
    assert order_id_from_topic("logistics/+/status", "logistics/A-1/x/status") is None
    report = parse_report("logistics/+/status", "logistics/A-1/status", b'{"status": "returned"}')
    assert (report.order_id, report.status) == ("A-1", "returned")
    for payload, reason in [
        (b"{", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"status": 3}', "string"),
        (b"x" * 5000, "larger"),
    ]:
        with pytest.raises(Dropped, match=reason):
            parse_report("logistics/+/status", "logistics/A-1/status", payload)
    with pytest.raises(Dropped, match="not allowed"):
        parse_report("logistics/+/status", "logistics/a b/status", b'{"status": "delivered"}')
