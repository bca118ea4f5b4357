"""order-expiry-listener: cancels unpaid orders at their deadline and announces it over MQTT.

The producer API (`OrderClient`) and the error family are importable from here.
"""

from listener.api import BulkResult, Change, OrderClient
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

__all__ = [
    "BadInput",
    "BulkResult",
    "Change",
    "ConfigError",
    "CreateResult",
    "ListenerError",
    "Order",
    "OrderClient",
    "OrderExists",
    "Reason",
    "Refused",
    "Settings",
    "Status",
    "Unavailable",
    "UnknownOrder",
    "load_settings",
]
