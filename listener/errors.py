"""The small family of errors the library raises.

The command line maps them to messages and exit codes in one place
(`listener.cli`); anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class ListenerError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class BadInput(ListenerError):
    """The caller gave something malformed: an order id, a timeout, a URL, a line."""

    exit_code = 2


class ConfigError(BadInput):
    """The configuration (environment or flags) is malformed."""


class Refused(ListenerError):
    """An operation the order's current status does not allow. Nothing changed."""

    def __init__(self, order_id: str, operation: str, status: str, reason: str | None) -> None:
        self.order_id = order_id
        self.operation = operation
        self.status = status
        self.reason = reason
        why = f" ({reason})" if reason else ""
        super().__init__(f"order {order_id!r} is {status}{why}: {operation} is not allowed")


class UnknownOrder(ListenerError):
    """No order with that id exists (or its record is past retention)."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        super().__init__(f"order {order_id!r} does not exist")


class OrderExists(ListenerError):
    """`create` of an id that is already taken. Nothing changed."""

    def __init__(self, order_id: str, status: str) -> None:
        self.order_id = order_id
        self.status = status
        super().__init__(f"order {order_id!r} already exists (status {status}); nothing changed")


class Unavailable(ListenerError):
    """Redis or the MQTT broker could not be reached or refused us."""


class BadRecord(ListenerError):
    """Something stored in Redis that no script writes (written by hand, or by
    a broken producer): shown, never acted on."""
