"""A request body limit for any ASGI app: 413 before the app reads past `max_bytes`.

uvicorn has no such limit of its own. A declared Content-Length over the limit is refused
before the app sees the request; a body without one (chunked) is counted as it arrives.
Before answering, the rest of the body is read and dropped (up to `drain_bytes`): clients
that send a whole body before reading the answer (urllib, requests) then get the 413
rather than a connection reset. Clients that asked to `Expect: 100-continue` never send it.
"""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app, max_bytes: int, drain_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = 32 * max_bytes if drain_bytes is None else drain_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            waits_for_go_ahead = headers.get(b"expect", b"").lower() == b"100-continue"
            if not waits_for_go_ahead and int(declared) <= self.drain_bytes:
                await self._drain(receive)
            return await self._refuse(send)
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await self._drain(receive, already=received)
                await self._refuse(send)

    async def _drain(self, receive, already: int = 0) -> None:
        drained = already
        while drained <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, send) -> None:
        limit = f"{self.max_bytes / 2**20:g} MB"
        body = json.dumps({"error": f"the request body is over the {limit} limit"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
