"""order-expiry-listener: cancels unpaid orders at their deadline and announces it over MQTT.

The producer API (`OrderClient`) and the error family are importable from here.
They are loaded on first use (PEP 562): `import listener` alone, as every
`order-listener` command does, loads nothing else, so `--help` does not wait
for the Redis client or the logging library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from listener.lazy import names_on_first_use

if TYPE_CHECKING:
    from listener.api import BulkResult, Change, Extension, OrderClient, Switched
    from listener.config import Settings, load_settings
    from listener.errors import (
        BadInput,
        ConfigError,
        ListenerError,
        OrderExists,
        Refused,
        Unavailable,
        UnknownOrder,
    )
    from listener.orders import Order, Reason, Status
    from listener.store import CreateResult
    from listener.switch import PauseState

_HOME = {
    "BadInput": "listener.errors",
    "BulkResult": "listener.api",
    "Change": "listener.api",
    "ConfigError": "listener.errors",
    "CreateResult": "listener.store",
    "Extension": "listener.api",
    "ListenerError": "listener.errors",
    "Order": "listener.orders",
    "OrderClient": "listener.api",
    "OrderExists": "listener.errors",
    "PauseState": "listener.switch",
    "Reason": "listener.orders",
    "Refused": "listener.errors",
    "Settings": "listener.config",
    "Status": "listener.orders",
    "Switched": "listener.api",
    "Unavailable": "listener.errors",
    "UnknownOrder": "listener.errors",
    "load_settings": "listener.config",
}

__all__ = [
    "BadInput",
    "BulkResult",
    "Change",
    "ConfigError",
    "CreateResult",
    "Extension",
    "ListenerError",
    "Order",
    "OrderClient",
    "OrderExists",
    "PauseState",
    "Reason",
    "Refused",
    "Settings",
    "Status",
    "Switched",
    "Unavailable",
    "UnknownOrder",
    "load_settings",
]


__getattr__, __dir__ = names_on_first_use(__name__, _HOME, globals())
