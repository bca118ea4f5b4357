"""JSON Schemas (draft 2020-12) of what goes over MQTT, shipped with the package.

``status-event``: the payload of every ``<prefix>/<order_id>/status`` event
the daemon publishes. ``logistics-message``: what the daemon accepts on
``logistics/<order_id>/status``. Other programs can validate against them:

    from listener import schemas
    from jsonschema import Draft202012Validator

    Draft202012Validator(schemas.load("status-event")).validate(event)
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

NAMES = ("status-event", "logistics-message")


def load(name: str) -> dict[str, Any]:
    """The schema `name` ("status-event", "logistics-message"; a ".schema.json"
    suffix is accepted) as a dict."""
    stem = name.removesuffix(".json").removesuffix(".schema")
    if stem not in NAMES:
        raise ValueError(f"no schema {name!r}; there are: {', '.join(NAMES)}")
    text = (resources.files("listener") / "schemas" / f"{stem}.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
