"""What one client may cost the server: body size, body time, body memory, decode memory.

`RequestGuard` wraps any ASGI app and answers, in JSON, for everything a request body can
do wrong before the app has a chance to:
- over `max_bytes`: 413. A declared Content-Length over the limit is refused before the
  app sees the request; a body without one (chunked) is counted as it arrives.
- slower than `body_timeout_s` in all, or silent for `idle_timeout_s`: 408, and the
  connection is closed (a phone on a bad network, or a client that stalls on purpose).
- more body bytes held by all requests together than `body_memory` allows: 503 with
  Retry-After. Bytes count as they arrive, so a client that stalls after one byte holds
  one byte, not a slot.
- a client that goes away: nothing is answered and nothing is logged; whatever the
  request held is released.
- an exception the app did not turn into an answer: 500, logged in one line.
Before a 413 or 503 the rest of the body is read and dropped (up to `drain_bytes`, within
the same deadline): clients that send a whole body before reading the answer (urllib,
requests) then get the answer rather than a connection reset. Clients that asked to
`Expect: 100-continue` never send it.

`MemoryBudget` hands out bytes of a fixed budget, first come, first served, to the
decodes that need them; a request that waits too long gets 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import deque

from starlette.requests import ClientDisconnect

log = logging.getLogger("mnist_cnn.serve")


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class ServerBusy(Exception):
    """Over a memory budget: the client should come back in `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def json_response_messages(status: int, message: str, extra: dict | None = None) -> tuple:
    """The two ASGI messages of a JSON error answer that closes the connection."""
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.encode(), str(v).encode()) for k, v in (extra or {}).items()]
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


class RequestGuard:
    def __init__(
        self,
        app,
        max_bytes: int,
        body_memory: int,
        body_timeout_s: float,
        idle_timeout_s: float,
        drain_bytes: int | None = None,
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.body_memory = body_memory
        self.body_timeout_s = body_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.drain_bytes = 32 * max_bytes if drain_bytes is None else drain_bytes
        self.body_bytes_held = 0  # by all requests together, each counted twice (see below)
        self._lock = threading.Lock()

    def _hold(self, n: int) -> bool:
        with self._lock:
            if self.body_bytes_held + n > self.body_memory:
                return False
            self.body_bytes_held += n
            return True

    def _release(self, n: int) -> None:
        with self._lock:
            self.body_bytes_held -= n

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        held = 0
        body_done = False
        started = False

        async def timed_receive():
            """The next message, within the body's deadline while the body is incoming."""
            nonlocal body_done
            if body_done:
                return await receive()
            left = min(deadline - loop.time(), self.idle_timeout_s)
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise BodyTimeout from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        received = 0

        async def guarded_receive():
            nonlocal received, held
            message = await timed_receive()
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                received += chunk
                if received > self.max_bytes:
                    raise BodyTooLarge
                # Twice the bytes: the body as received, and the copy the app makes of
                # the image in it (a form's file, base64 decoded).
                if not self._hold(2 * chunk):
                    raise ServerBusy(
                        "the server holds as many uploads as its memory allows: "
                        "try again in a moment",
                        retry_after=1,
                    )
                held += 2 * chunk
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def refuse(status: int, message: str, extra: dict | None = None, drain=True):
            if started:
                return
            if drain and not body_done:  # once it is all in, receive waits for a disconnect
                await self._drain(timed_receive, received)
            for part in json_response_messages(status, message, extra):
                await send(part)

        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length", b"")
        try:
            if declared.isdigit() and int(declared) > self.max_bytes:
                waits_for_go_ahead = headers.get(b"expect", b"").lower() == b"100-continue"
                drain = not waits_for_go_ahead and int(declared) <= self.drain_bytes
                return await refuse(413, self._too_large(), drain=drain)
            await self.app(scope, guarded_receive, tracked_send)
        except BodyTooLarge:
            await refuse(413, self._too_large())
        except BodyTimeout:
            seconds = f"{self.body_timeout_s:g}"
            await refuse(
                408,
                f"the request body did not arrive in time (all of it within {seconds} s, "
                f"no pause over {self.idle_timeout_s:g} s): send it again, at once",
                drain=False,
            )
        except ServerBusy as exc:
            await refuse(503, exc.message, {"retry-after": exc.retry_after})
        except (ClientDisconnect, ConnectionError):
            pass  # the client went away: nobody to answer
        except Exception as exc:
            log.error("%s %s: internal error: %s: %s", scope.get("method"), scope.get("path"),
                      type(exc).__name__, exc)  # fmt: skip
            await refuse(500, f"internal error ({type(exc).__name__})", drain=False)
        finally:
            if held:
                self._release(held)

    def _too_large(self) -> str:
        return f"the request body is over the {self.max_bytes / 2**20:g} MB limit"

    async def _drain(self, receive, already: int) -> None:
        drained = already
        try:
            while drained <= self.drain_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    return
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
        except BodyTimeout:
            return


class MemoryBudget:
    """`capacity` bytes, granted first come, first served, to whoever holds them at once.

    A request for more than the capacity waits for all of it; a small one (at most a
    hundredth of it: an ordinary photo) that fits goes ahead of those waiting, so a queue
    of big pictures does not hold up everyone else. Async: waiting holds no thread. One
    budget per event loop (the app may be run by several, one at a time).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.small = capacity // 100
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def _grant(self) -> None:
        while self._waiters:
            amount, future = self._waiters[0]
            if future.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if self.used + amount > self.capacity:
                return
            self._waiters.popleft()
            self.used += amount
            future.set_result(amount)

    async def acquire(self, amount: int, timeout_s: float) -> int:
        """Hold `amount` bytes (at most the capacity); TimeoutError after `timeout_s`."""
        amount = max(0, min(amount, self.capacity))
        fits = self.used + amount <= self.capacity
        if fits and (not self._waiters or amount <= self.small):
            self.used += amount
            return amount
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((amount, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(future.result())  # granted just as the wait ended
            else:
                future.cancel()
                self._grant()  # those behind may fit now
            raise

    def release(self, amount: int) -> None:
        self.used -= amount
        self._grant()
