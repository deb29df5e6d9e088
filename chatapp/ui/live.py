"""Live updates that cost almost nothing while nothing happens: the customer's page learns that an agent wrote (or
that its place in the queue moved), and an agent's inbox that a conversation changed, through one long-poll request
each (`POST live/customer`, `POST /staff/live/inbox`), then asks its own Gradio handler once for what arrived.

Why not a gr.Timer: every tick of every open page was a Gradio request; 20 open chats polling once a second made the
bot's answers wait for the CPU (bench/handoff.py: delivery p95 18 s). A waiting request here costs one indexed query
every `recheck_s` (so a message written by another process or replica is seen too) and wakes at once when this
process writes (the `Notifier`). The answer carries no text, only "something changed" and a cursor: what the page
shows still comes from the customer's own Gradio session, which only ever holds the customer's own conversation.

A customer's request is authorised by the signed per-browser token the chat keeps (chatapp.access.BrowserTokens),
and, for a conversation bound to a login, by that login's session cookie; the inbox's by a staff session cookie.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from chatapp.access import BrowserTokens

log = logging.getLogger(__name__)
SLOW_S = 2.0  # a store call or a delivery slower than this is logged: the live path should take well under a second

INBOX = "inbox"  # notified by every write: what the agents' inbox shows may have changed
QUEUE = "queue"  # notified when a conversation joins or leaves the queue: waiting customers' places may move
SHOWN_TO_CUSTOMER = ("agent", "system")  # the roles the page renders on arrival (its own turns it renders itself)
MAX_BODY = 2048

# The page side, run by a `js=` event after the page loaded (and after Clear, with the new token): a loop of
# long-polls; each answer that says "changed" clicks the hidden #live-refresh button, whose Gradio handler renders
# the new message. Same origin, no library. A 403 (a token the server does not accept) ends the loop.
CUSTOMER_JS = """(token) => {
  const live = window.chatappLive = window.chatappLive || {run: 0};
  if (!token || live.token === token) return [];
  live.token = token;
  const run = ++live.run;
  const url = new URL('live/customer', location.origin + location.pathname.replace(/[^/]*$/, '')).href;
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  (async () => {
    let after = 0, position = null, backoff = 1000;
    while (live.run === run) {
      try {
        const r = await fetch(url, {method: 'POST', credentials: 'same-origin',
          headers: {'Content-Type': 'application/json'}, body: JSON.stringify({token, after, position})});
        if (r.status === 403 || r.status === 400 || r.status === 404) return;  // not for this page: stop
        if (!r.ok) { await sleep(backoff = Math.min(backoff * 2, 30000)); continue; }
        const d = await r.json();
        backoff = 1000; after = d.after; position = d.position;
        const button = document.getElementById('live-refresh');
        if (d.changed && live.run === run && button) button.click();
      } catch (e) { await sleep(backoff = Math.min(backoff * 2, 30000)); }
    }
  })();
  return [];
}"""

# The inbox side: the same loop; `cid` is the conversation the agent has open (set by STAFF_PICK_JS), so its
# transcript stays live even after it left the queue. Every answer redraws (an unchanged draw sends nothing), which
# also keeps the waiting times current.
STAFF_JS = """() => {
  const live = window.chatappInbox = window.chatappInbox || {cid: null};
  if (live.running) return [];
  live.running = true;
  const url = new URL('live/inbox', location.origin + location.pathname.replace(/[^/]*$/, '')).href;
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  (async () => {
    let since = null, backoff = 1000;
    while (true) {
      live.abort = new AbortController();
      try {
        const r = await fetch(url, {method: 'POST', credentials: 'same-origin', signal: live.abort.signal,
          headers: {'Content-Type': 'application/json'}, body: JSON.stringify({since, cid: live.cid})});
        if (r.status === 401 || r.status === 403 || r.status === 404) { live.running = false; return; }
        if (!r.ok) { await sleep(backoff = Math.min(backoff * 2, 30000)); continue; }
        const d = await r.json();
        backoff = 1000; since = d.since;
        const button = document.getElementById('inbox-live-refresh');
        if (button) button.click();
      } catch (e) { if (e.name !== 'AbortError') await sleep(backoff = Math.min(backoff * 2, 30000)); }
    }
  })();
  return [];
}"""

STAFF_PICK_JS = """(cid) => {
  const live = window.chatappInbox = window.chatappInbox || {cid: null};
  if (live.cid !== cid) { live.cid = cid; if (live.abort) live.abort.abort(); }
  return [];
}"""


class Notifier:
    """Wakes the requests waiting on a key (a conversation id, or INBOX). Thread-safe: writes happen on Gradio's
    worker threads, the waiters live on the server's event loop. Owned by the server; holds only who is waiting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def notify(self, *keys: str) -> None:
        with self._lock:
            waiters = {w for key in keys for w in self._waiters.get(key, ())}
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # the loop closed (server stopping)
                loop.call_soon_threadsafe(event.set)

    @contextlib.contextmanager
    def listen(self, *keys: str) -> Iterator[asyncio.Event]:
        """An event set whenever one of `keys` is notified (clear it after each wake-up), for the block's duration."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            for key in keys:
                self._waiters.setdefault(key, set()).add(waiter)
        try:
            yield waiter[1]
        finally:
            with self._lock:
                for key in keys:
                    self._waiters.get(key, set()).discard(waiter)
                    if not self._waiters.get(key):
                        self._waiters.pop(key, None)

    def wake_all(self) -> None:
        """Wake every waiter (the server is stopping: held requests answer now instead of holding up the exit)."""
        with self._lock:
            keys = list(self._waiters)
        self.notify(*keys)

    def waiting(self) -> int:
        with self._lock:
            return len({w for ws in self._waiters.values() for w in ws})


class LiveInbox:
    """The bot's inbox, unchanged, that also wakes the live requests after each write it makes. Everything else is
    passed through, so this works with any store that has the Inbox's public methods."""

    WRITES = frozenset({"add", "close_by_customer", "rate_conversation"})
    QUEUE_WRITES = frozenset({"request_person", "claim", "reply", "hand_back", "resolve", "leave_contact"})

    def __init__(self, inbox: Any, notifier: Notifier):
        self.inner, self.notifier = inbox, notifier

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if (name in self.WRITES or name in self.QUEUE_WRITES) and callable(attr):
            keys = (INBOX, QUEUE) if name in self.QUEUE_WRITES else (INBOX,)

            def write(conversation_id: str, *args: Any, **kwargs: Any) -> Any:
                result = attr(conversation_id, *args, **kwargs)
                self.notifier.notify(conversation_id, *keys)
                return result
            return write
        if name == "set_rating" and callable(attr):
            def rate(message_id: str, rating: int) -> Any:
                result = attr(message_id, rating)
                self.notifier.notify(INBOX)
                return result
            return rate
        return attr


class _Stopping(Exception):
    """The server is closing: the request is answered at once."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request) -> dict | JSONResponse:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        return _error(413, "The request is too large.")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        return _error(400, "The request body must be JSON.")
    return body if isinstance(body, dict) else _error(400, "The request body must be a JSON object.")


class LiveRoutes:
    """The two long-poll routes of one server. `login(request, surface)` names the signed-in user of the customer
    ('customer') or staff ('staff') app for a request (None: not signed in); `staff_open` is True when the console
    needs no login (no staff accounts: localhost only)."""

    def __init__(self, bot: Any, tokens: BrowserTokens, notifier: Notifier,
                 login: Callable[[Request, str], str | None], staff_open: bool,
                 hold_s: float = 20.0, recheck_s: float = 0.5, queue_check_s: float = 5.0):
        self.bot, self.tokens, self.notifier, self.login, self.staff_open = bot, tokens, notifier, login, staff_open
        self.hold_s, self.recheck_s, self.queue_check_s = hold_s, recheck_s, queue_check_s
        # store calls never run on the event loop (a write lock held by another process must not stall the server)
        self._pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="live")
        self.closed = False

    async def _run(self, fn: Callable, *args: Any) -> Any:
        if self.closed:
            raise _Stopping
        started = time.monotonic()
        result = await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        if time.monotonic() - started > SLOW_S:
            log.warning("live: %s took %.1f s (the store or this server is overloaded)",
                        getattr(fn, "__name__", fn), time.monotonic() - started)
        return result

    def close(self) -> None:
        """Answer the held requests now (a stopping server waits for open requests) and stop the store threads."""
        self.closed = True
        self.notifier.wake_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _wait(self, event: asyncio.Event) -> bool:
        """Until notified or `recheck_s` passed; True when notified."""
        try:
            await asyncio.wait_for(event.wait(), self.recheck_s)
        except asyncio.TimeoutError:
            return False
        event.clear()
        return True

    async def customer(self, request: Request) -> JSONResponse:
        try:
            return await self._customer(request)
        except _Stopping:
            return _error(503, "The server is restarting; this page reconnects by itself.")

    async def inbox(self, request: Request) -> JSONResponse:
        try:
            return await self._inbox(request)
        except _Stopping:
            return _error(503, "The server is restarting; this page reconnects by itself.")

    async def _customer(self, request: Request) -> JSONResponse:
        """{token, after, position} -> {after, position, changed}: held until a message for the page (an agent's
        reply, a note about the conversation) is stored after `after`, its queue position differs, or `hold_s`."""
        body = await _body(request)
        if isinstance(body, JSONResponse):
            return body
        token, after, position = body.get("token"), body.get("after", 0), body.get("position")
        if not isinstance(after, int) or isinstance(after, bool) or after < 0 or \
                not (position is None or (isinstance(position, int) and not isinstance(position, bool))):
            return _error(400, "`after` must be a message number (0 or more) and `position` a number or null.")
        inbox = self.bot.inbox
        if inbox is None:
            return _error(404, "Live replies are off: the conversation store is unavailable.")
        if not self.tokens.valid(token):
            return _error(403, "This chat is not recognised; reload the page to start a new one.")
        cid = self.tokens.conversation_id(token)
        conversation = await self._run(inbox.get, cid)
        if conversation is not None and conversation.user and conversation.user != self.login(request, "customer"):
            return _error(403, "This conversation belongs to another account.")
        deadline, next_queue_check = time.monotonic() + self.hold_s, 0.0
        with self.notifier.listen(cid, QUEUE) as woke:
            notified = True
            while True:
                new = await self._run(inbox.messages, cid, after)
                if new:
                    after = new[-1].id
                    if any(m.role in SHOWN_TO_CUSTOMER for m in new):  # the page redraws its place too
                        late = time.time() - new[-1].created_at
                        if late > SLOW_S:
                            log.warning("live: a message reached its page's live request %.1f s after it was "
                                        "stored", late)
                        position = await self._run(inbox.queue_position, cid)
                        return JSONResponse({"after": after, "position": position, "changed": True})
                if notified or time.monotonic() >= next_queue_check:  # the queue moves when others are taken
                    next_queue_check = time.monotonic() + self.queue_check_s
                    now_at = await self._run(inbox.queue_position, cid)
                    if now_at != position:
                        return JSONResponse({"after": after, "position": now_at, "changed": True})
                if self.closed or time.monotonic() >= deadline or await request.is_disconnected():
                    return JSONResponse({"after": after, "position": position, "changed": False})
                notified = await self._wait(woke)
                if self.closed:
                    return JSONResponse({"after": after, "position": position, "changed": False})

    async def _inbox(self, request: Request) -> JSONResponse:
        """{since, cid} -> {since, changed}: held until the open conversations (or the one the agent has open)
        differ from the state `since` names, or `hold_s`. Keeps the agent counted as signed in while it waits."""
        user = self.login(request, "staff")
        if user is None and not self.staff_open:
            return _error(401, "Sign in to the staff console first.")
        if not self.staff_open and self.bot.accounts.role(user) not in ("agent", "admin"):
            return _error(403, "Only support agents can follow the inbox.")
        body = await _body(request)
        if isinstance(body, JSONResponse):
            return body
        since, cid = body.get("since"), body.get("cid")
        if not (since is None or isinstance(since, str)) or not (cid is None or isinstance(cid, str)) or \
                len(cid or "") > 64:
            return _error(400, "`since` and `cid` must be strings or null.")
        inbox = self.bot.inbox
        if inbox is None:
            return _error(404, "The inbox is unavailable: the conversation store could not be opened.")
        agent, deadline, seen_at = user or "staff", time.monotonic() + self.hold_s, 0.0
        with self.notifier.listen(INBOX) as woke:
            while True:
                if time.monotonic() - seen_at >= 5.0:  # presence: often enough for agent_seen_s, rarely a write
                    seen_at = time.monotonic()
                    await self._run(inbox.seen, agent)
                computed_at = time.monotonic()
                state = await self._run(inbox_state, inbox, cid)
                if state != since:
                    return JSONResponse({"since": state, "changed": True})
                if self.closed or time.monotonic() >= deadline or await request.is_disconnected():
                    return JSONResponse({"since": state, "changed": False})
                await self._wait(woke)
                if self.closed:
                    return JSONResponse({"since": state, "changed": False})
                pause = self.recheck_s / 2 - (time.monotonic() - computed_at)
                if pause > 0:  # a burst of writes (20 chats with the bot) costs a fingerprint per quarter second
                    await asyncio.sleep(pause)


def inbox_state(inbox: Any, cid: str | None) -> str:
    """A short fingerprint of what the inbox shows: the open conversations, their states, agents and last change,
    and the opened one's. Equal fingerprints: nothing to redraw."""
    items = inbox.open_conversations()
    parts = [(c.conversation_id, c.state, c.agent, c.updated_at) for c in items]
    if cid and cid not in {c.conversation_id for c in items}:
        opened = inbox.get(cid)
        if opened is not None:
            parts.append((cid, opened.state, opened.agent, opened.updated_at))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]
