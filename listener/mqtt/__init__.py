"""The MQTT side, one concern a module:

- `packets`: PUBLISH packets for status events, encoded by hand (pure);
- `client`: one connection (aiomqtt's client, with our PUBACK routing);
- `window`: the in-flight window of one connection (QoS 1, Receive Maximum);
- `link`: the connections kept up, subscriptions and incoming messages.

paho's private parts that the fast publish path uses live apart, in
`listener.fastpath.paho_io`.
"""

from listener.mqtt.client import PublishRefused, default_client_id, make_client
from listener.mqtt.link import Connection, MqttLink
from listener.mqtt.window import AckSink, Publisher

__all__ = [
    "AckSink",
    "Connection",
    "MqttLink",
    "PublishRefused",
    "Publisher",
    "default_client_id",
    "make_client",
]
