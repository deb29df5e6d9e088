"""Per-address throttling of the customer endpoints: a token bucket per client IP for the requests that make the
server work (a chat message, a poll, a live request, an upload), and a cap on the live requests one address holds
open at once. Over the limit the request gets HTTP 429 with a message saying to wait, and `Retry-After`; the app and
everyone else's chats carry on.

Why: the customer chat is open to anyone who reaches it, and each message costs the model's CPU on 2 cores; one
script sending messages in a loop would otherwise take the bot from every other customer. The staff console
(`/staff/...`) has logins and is not throttled here. Page assets and the config are not counted, so a reload is free.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

COUNTED = ("/gradio_api/queue/join", "/gradio_api/run/", "/gradio_api/call/", "/gradio_api/upload",
           "/live/customer")
HELD = "/live/customer"
MESSAGE = "Too many requests from your address. Please wait a few seconds and try again."


@dataclass
class _Bucket:
    tokens: float
    at: float
    held: int = 0


class Throttle:
    """Token buckets by client address: `burst` requests at once, refilled at `per_s`; `per_s` <= 0 turns it off.
    Thread-safe; forgets addresses idle long enough to be full again (memory stays bounded)."""

    def __init__(self, per_s: float, burst: int, max_held: int, clock: Callable[[], float] = time.monotonic):
        self.per_s, self.burst, self.max_held, self.clock = per_s, max(1, int(burst)), max(1, int(max_held)), clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def on(self) -> bool:
        return self.per_s > 0

    def _bucket(self, address: str, now: float) -> _Bucket:
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) > 10_000:
                self._forget(now)
            bucket = self._buckets[address] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.per_s)
        bucket.at = now
        return bucket

    def _forget(self, now: float) -> None:
        full_after = self.burst / self.per_s
        for address in [a for a, b in self._buckets.items() if not b.held and now - b.at > full_after]:
            del self._buckets[address]

    def allow(self, address: str) -> float:
        """0 when the request may go on (one token taken), else the seconds until it would be allowed."""
        if not self.on:
            return 0.0
        with self._lock:
            bucket = self._bucket(address, self.clock())
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.per_s

    def hold(self, address: str) -> bool:
        """Count a long-lived request; False when the address already holds `max_held` (then do not release)."""
        if not self.on:
            return True
        with self._lock:
            bucket = self._bucket(address, self.clock())
            if bucket.held >= self.max_held:
                return False
            bucket.held += 1
            return True

    def clear(self) -> None:
        """Forget every address (a changed limit then applies from a full bucket)."""
        with self._lock:
            self._buckets = {a: _Bucket(float(self.burst), b.at, b.held) for a, b in self._buckets.items() if b.held}

    def release(self, address: str) -> None:
        if not self.on:
            return
        with self._lock:
            bucket = self._buckets.get(address)
            if bucket is not None and bucket.held > 0:
                bucket.held -= 1


class ThrottleMiddleware:
    """ASGI middleware applying a Throttle to the customer apps' counted paths (under `/` and `/widget`)."""

    def __init__(self, app: Any, throttle: Throttle):
        self.app, self.throttle = app, throttle

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        if not self.throttle.on or not path or path.startswith("/staff"):
            await self.app(scope, receive, send)
            return
        local = path[len("/widget"):] if path.startswith("/widget/") else path
        if not local.startswith(COUNTED):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("unknown", 0))[0]
        wait_s = self.throttle.allow(address)
        if wait_s:
            await _refuse(send, wait_s)
            return
        if not local.startswith(HELD):
            await self.app(scope, receive, send)
            return
        if not self.throttle.hold(address):
            await _refuse(send, 5.0, "Too many chats are open from your address. Close some and try again.")
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.throttle.release(address)


async def _refuse(send: Callable, wait_s: float, message: str = MESSAGE) -> None:
    """HTTP 429 in the shape both Gradio's client (`detail`) and the live script (`error`) read."""
    body = json.dumps({"error": message, "detail": message}).encode()
    await send({"type": "http.response.start", "status": 429, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(max(1, round(wait_s))).encode())]})
    await send({"type": "http.response.body", "body": body})
