"""The MQTT side, one concern a module:

- `packets`: PUBLISH packets for status events, encoded by hand (pure);
- `client`: one connection (aiomqtt's client, with our PUBACK routing);
- `window`: the in-flight window of one connection (QoS 1, Receive Maximum);
- `link`: the connections kept up, subscriptions and incoming messages.

paho's private parts that the fast publish path uses live apart, in
`listener.fastpath.paho_io`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from listener.lazy import names_on_first_use

if TYPE_CHECKING:
    from listener.mqtt.client import PublishRefused, default_client_id, make_client
    from listener.mqtt.link import Connection, MqttLink
    from listener.mqtt.window import AckSink, Publisher

# Loaded on first use (PEP 562), as the package `listener` does: importing a
# module of this package (`packets`, which the fast path in
# listener.fastpath.paho_io uses) must not load `client`, which imports that
# fast path, halfway through its own import.
_HOME = {
    "AckSink": "listener.mqtt.window",
    "Connection": "listener.mqtt.link",
    "MqttLink": "listener.mqtt.link",
    "PublishRefused": "listener.mqtt.client",
    "Publisher": "listener.mqtt.window",
    "default_client_id": "listener.mqtt.client",
    "make_client": "listener.mqtt.client",
}

__all__ = [
    "AckSink",
    "Connection",
    "MqttLink",
    "PublishRefused",
    "Publisher",
    "default_client_id",
    "make_client",
]


__getattr__, __dir__ = names_on_first_use(__name__, _HOME, globals())
