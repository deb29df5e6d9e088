"""One web server for both surfaces: the customer chat at `/` (and its widget view at `/widget`, with `/widget.js`),
the staff console at `/staff`, each its own Gradio app with its own login (gr.mount_gradio_app on one FastAPI app).

Why separate apps: a Gradio app exposes every event of its Blocks as an API endpoint, so the only way to keep staff
functions (exports, the inbox) away from customers is to never put them in the customer's Blocks.

Beside them, the live routes (chatapp/ui/live.py): `POST /live/customer` (and `/widget/live/customer`) tells a
customer's page that an agent wrote, `POST /staff/live/inbox` tells an agent's inbox that a conversation changed.
The server owns the notifier that wakes them when this process writes a message.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time

import gradio as gr
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

from chatapp.access import ExpiringTokens
from chatapp.bot import Bot
from chatapp.ui.live import LiveInbox, LiveRoutes, Notifier
from chatapp.ui.throttle import Throttle, ThrottleMiddleware

log = logging.getLogger(__name__)

WIDGET_JS = """(function () {
  var me = document.currentScript, base = new URL(me.src).origin;
  var frame = document.createElement('iframe');
  frame.src = base + '/widget/'; frame.title = 'Support chat';
  frame.style.cssText = 'position:fixed;right:20px;bottom:84px;width:380px;height:580px;max-height:80vh;border:0;' +
    'border-radius:12px;box-shadow:0 6px 24px rgba(0,0,0,.25);display:none;z-index:2147483646;background:#fff';
  var button = document.createElement('button');
  button.textContent = me.getAttribute('data-label') || 'Chat with us'; button.id = 'chatapp-widget-button';
  button.style.cssText = 'position:fixed;right:20px;bottom:20px;padding:14px 18px;border:0;border-radius:28px;' +
    'background:#2563eb;color:#fff;font:600 15px system-ui,sans-serif;cursor:pointer;z-index:2147483647';
  button.onclick = function () { frame.style.display = frame.style.display === 'none' ? 'block' : 'none'; };
  document.body.appendChild(frame); document.body.appendChild(button);
})();
"""


def widget_snippet(base_url: str) -> str:
    """What the shop pastes into its pages: a floating button that opens the chat, or the bare iframe."""
    base = base_url.rstrip("/")
    return (f'<!-- floating button -->\n<script src="{base}/widget.js" data-label="Chat with us" async></script>\n\n'
            f'<!-- or the chat inline -->\n<iframe src="{base}/widget/" title="Support chat" '
            'style="width:380px;height:580px;border:0"></iframe>')


class Server:
    """The running app: `start()` returns once it accepts connections; `close()` stops it."""

    def __init__(self, bot: Bot, host: str = "127.0.0.1", port: int = 7860):
        from chatapp.ui import build_customer, build_staff

        self.bot, self.host, self.port = bot, host, port
        accounts = bot.accounts
        # every write to the inbox wakes the live requests waiting on it (a bot served twice keeps one notifier)
        self.notifier = bot.inbox.notifier if isinstance(bot.inbox, LiveInbox) else Notifier()
        if bot.inbox is not None and not isinstance(bot.inbox, LiveInbox):
            bot.inbox = LiveInbox(bot.inbox, self.notifier)
        self.customer, self.widget, self.staff = build_customer(bot), build_customer(bot, widget=True), build_staff(bot)
        self.app = FastAPI()
        ui = bot.settings.ui
        self.throttle = Throttle(ui.throttle_per_s, ui.throttle_burst, ui.throttle_live)
        self.app.add_middleware(ThrottleMiddleware, throttle=self.throttle)  # the customer endpoints, per address
        self.app.get("/widget.js", include_in_schema=False)(
            lambda: Response(WIDGET_JS, media_type="application/javascript"))
        staff_auth = accounts.checker(accounts.staff) if accounts.staff else None
        customer_auth = accounts.checker(set(accounts.passwords)) if accounts.customers else None
        self._mounted: dict[str, FastAPI] = {}
        self.live = LiveRoutes(bot, bot.browser_tokens, self.notifier,
                               self._login, staff_open=not accounts.staff)
        # before the mounts: Starlette matches routes in order, and /staff/... would otherwise be the console's
        for path in ("/live/customer", "/widget/live/customer"):
            self.app.post(path, include_in_schema=False)(self.live.customer)
        self.app.post("/staff/live/inbox", include_in_schema=False)(self.live.inbox)
        common = dict(ssr_mode=False, footer_links=["api"], show_error=True)
        # most specific first: Starlette matches mounts in order
        for name, blocks, path, auth, extra in (
                ("staff", self.staff, "/staff", staff_auth, {"auth_message": "Support staff sign-in"}),
                ("widget", self.widget, "/widget", customer_auth, {}),
                ("customer", self.customer, "/", customer_auth, {})):
            gr.mount_gradio_app(self.app, blocks, path, auth=auth, **common, **extra)
            self._mounted[name] = self.app.routes[-1].app
        for route in self.app.routes:  # staff logins expire; customers' need not
            if getattr(route, "path", None) == "/staff":
                route.app.tokens = ExpiringTokens(bot.settings.ui.staff_session_s)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.share_url: str | None = None

    def _login(self, request, surface: str) -> str | None:
        """Who is signed in to the customer apps ('customer') or the console ('staff') on this request: Gradio's own
        session cookie, looked up in the mounted app's token table (so an expired staff login counts as none)."""
        names = ("customer", "widget") if surface == "customer" else ("staff",)
        for name in names:
            app = self._mounted.get(name)
            if app is None:
                continue
            token = request.cookies.get(f"access-token-{app.cookie_id}") or \
                request.cookies.get(f"access-token-unsecure-{app.cookie_id}")
            user = app.tokens.get(token) if token else None
            if user:
                return user
        return None

    @property
    def local_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 60) -> "Server":
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="web-server")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise OSError(f"the web server could not listen on {self.host}:{self.port}")
            if time.monotonic() > deadline:
                raise OSError(f"the web server did not start within {timeout:.0f} s")
            time.sleep(0.05)
        return self

    def share(self) -> str | None:
        """A temporary public link through Gradio's tunnel; None when it cannot be made (offline, blocked)."""
        try:
            from gradio.networking import setup_tunnel

            self.share_url = setup_tunnel("127.0.0.1", self.port, secrets.token_urlsafe(32), None, None)
        except Exception as exc:
            log.info("share link not created: %s", exc)
            self.share_url = None
        return self.share_url

    def close(self) -> None:
        self.live.close()  # first: held live requests answer, so the server need not wait for them
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
        for blocks in (self.customer, self.widget, self.staff):
            try:
                blocks.close()
            except Exception:
                log.debug("closing blocks", exc_info=True)
