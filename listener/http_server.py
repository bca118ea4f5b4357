"""/metrics and /healthz over HTTP, off unless ``ORDER_LISTENER_METRICS_ADDR``
(host:port) is set: a small asyncio server in the daemon's loop, so /healthz
reads the live state."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

from listener import logs
from listener.metrics import CONTENT_TYPE, Metrics
from listener.urls import parse_addr

log = logs.get("listener.http_server")


async def serve(
    addr: str,
    metrics: Metrics,
    healthy: Callable[[], dict[str, bool]],
    started: asyncio.Event | None = None,
    details: Callable[[], dict[str, object]] | None = None,
) -> None:
    """Serve /metrics and /healthz until cancelled. /healthz answers 200 while
    every check of `healthy` is true; `details` adds facts that do not decide
    it (whether cancellation is paused)."""
    host, port = parse_addr(addr)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, body, ctype = "200 OK", metrics.render(), CONTENT_TYPE
            elif path == "/healthz":
                checks = healthy()
                ok = all(checks.values())
                status = "200 OK" if ok else "503 Service Unavailable"
                body = json.dumps({"ok": ok, **checks, **(details() if details else {})}).encode()
                ctype = "application/json"
            else:
                status, body, ctype = "404 Not Found", b"try /metrics or /healthz\n", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics and health served", addr=f"{host}:{port}", paths=["/metrics", "/healthz"])
    if started is not None:
        started.set()
    async with server:
        await server.serve_forever()
