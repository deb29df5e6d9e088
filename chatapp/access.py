"""Who may do what: staff roles from the auth config, the staff login check (slowed down after failures), staff
sessions that expire, and the signed per-browser token a customer's conversation is bound to (its key in the
shared database when replicas share one, so a customer moved to another replica keeps their conversation).

No UI code: the web layer hands these to Gradio (`auth=`, the mounted app's token table) and asks `role()`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import threading
import time
from pathlib import Path

from chatapp.config import Settings, UISettings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
ROLES = ("customer", "agent", "admin")


def is_local(host: str) -> bool:
    """True when only this machine can reach the server (then an unconfigured console may stay open)."""
    return host in LOCAL_HOSTS or host.startswith("127.")


class Accounts:
    """The configured logins and their roles: admins and agents work in the staff console, the rest are customers."""

    def __init__(self, ui: UISettings, fail_free: int = 3, max_delay_s: float = 8.0):
        self.passwords = dict(ui.auth)
        self.admins, self.agents = set(ui.admins), set(ui.agents)
        self.names = dict(ui.display_names)
        self.fail_free, self.max_delay_s = fail_free, max_delay_s
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def staff(self) -> set[str]:
        return {u for u in self.passwords if u in self.admins or u in self.agents}

    @property
    def customers(self) -> set[str]:
        return set(self.passwords) - self.staff

    def role(self, user: str | None) -> str | None:
        """'admin', 'agent', 'customer' or None; with no staff accounts configured the (local) console user is admin."""
        if not self.staff:
            return "admin"
        if user in self.admins:
            return "admin"
        if user in self.agents:
            return "agent"
        return "customer" if user in self.passwords else None

    def display_name(self, user: str | None) -> str:
        return self.names.get(user or "", "") or (user or "Support").replace("_", " ").title()

    def _check(self, user: str, password: str, allowed: set[str]) -> bool:
        expected = self.passwords.get(user)
        ok = expected is not None and hmac.compare_digest(expected.encode(), (password or "").encode())
        return ok and user in allowed

    def _delay(self, user: str) -> float:
        """Seconds a login attempt for `user` waits: nothing for the first few failures, then doubling."""
        with self._lock:
            fails = self._failures.get(user, 0)
        return 0.0 if fails < self.fail_free else min(self.max_delay_s, 0.5 * 2 ** (fails - self.fail_free))

    def _record(self, user: str, ok: bool) -> None:
        with self._lock:
            if ok:
                self._failures.pop(user, None)
            else:
                self._failures[user] = self._failures.get(user, 0) + 1

    def checker(self, allowed: set[str]):
        """An async Gradio `auth` callable for the users in `allowed`; it awaits (never blocks the server) when slowed."""
        async def check(user: str, password: str) -> bool:
            delay = self._delay(user)
            if delay:
                await asyncio.sleep(delay)
            ok = self._check(user, password, allowed)
            self._record(user, ok)
            return ok

        return check


class ExpiringTokens(dict):
    """Gradio's session-token table with a lifetime: a staff login stops working `ttl_s` after it was made."""

    def __init__(self, ttl_s: float):
        super().__init__()
        self.ttl_s = ttl_s
        self._issued: dict[str, float] = {}

    def __setitem__(self, token: str, user: str) -> None:
        self._issued[token] = time.time()
        super().__setitem__(token, user)

    def _expired(self, token) -> bool:
        issued = self._issued.get(token)
        if issued is not None and time.time() - issued > self.ttl_s:
            super().pop(token, None)
            self._issued.pop(token, None)
            return True
        return False

    def get(self, token, default=None):
        return default if self._expired(token) else super().get(token, default)

    def __contains__(self, token) -> bool:
        return not self._expired(token) and super().__contains__(token)

    def __getitem__(self, token):
        if self._expired(token):
            raise KeyError(token)
        return super().__getitem__(token)


class BrowserKeyError(RuntimeError):
    """The token key cannot be read or stored; the message says where and why."""


BROWSER_KEY_STATE = "browser_token_key"  # its row in the database's app_state table


def database_browser_key(target: str | Path, busy_timeout_s: float = 5.0, initial: bytes | None = None) -> bytes:
    """The token key kept in the database's ``app_state``: created by whichever replica asks first (an insert that
    does nothing if the row exists, then a read of the row), so replicas starting together agree on one key.
    `initial`: the key to store if there is none yet (a single install's file, so its customers' tokens stay valid)."""
    from chatapp.storage import DB_ERRORS, StorageError, describe_error, migrate, open_database
    from chatapp.storage.state import get_state, put_state

    try:
        db = open_database(target, busy_timeout_s, pool_size=1)
    except StorageError as exc:
        raise BrowserKeyError(f"the customer token key cannot be read: {exc}") from exc
    try:
        migrate(db)
        with db.engine.begin() as conn:
            fresh = json.dumps({"key": initial.hex() if initial else secrets.token_hex(32)})
            put_state(db, conn, BROWSER_KEY_STATE, fresh, replace=False)
            value = get_state(conn, BROWSER_KEY_STATE)
        return bytes.fromhex(json.loads(value)["key"])
    except (*DB_ERRORS, StorageError) as exc:
        raise BrowserKeyError("the customer token key cannot be read from the database: "
                              + describe_error(exc, db.where, busy_timeout_s)) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise BrowserKeyError(f"the customer token key in {db.where} (app_state row "
                              f"{BROWSER_KEY_STATE!r}) is not a hex key: {exc}; delete the row to make a new one "
                              "(open customer chats then start afresh)") from exc
    finally:
        db.dispose()


class BrowserTokens:
    """Signed per-browser tokens. The browser keeps `nonce.signature`; the conversation id staff see is a hash of it,
    so neither a guessed token (bad signature) nor a conversation id read off a screen or an export opens a chat."""

    def __init__(self, key: Path | bytes):
        """`key`: the key itself, or a file holding it in hex (created on first use)."""
        self.key = key if isinstance(key, bytes) else self._file_key(key)

    @classmethod
    def open(cls, settings: Settings) -> "BrowserTokens":
        """The app's tokens: with ``database_url`` (replicas) the key is the database's, so every replica checks the
        tokens every other one issued; else the data directory's ``browser.key``, as a single install always had."""
        if settings.database_url:
            return cls(database_browser_key(settings.database_url, settings.feedback.busy_timeout_s))
        return cls(settings.data_dir / "browser.key")

    @staticmethod
    def _file_key(key_file: Path) -> bytes:
        try:
            key_file.parent.mkdir(parents=True, exist_ok=True)
            if not key_file.exists():
                key_file.write_text(secrets.token_hex(32))
                key_file.chmod(0o600)
            return bytes.fromhex(key_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise BrowserKeyError(f"the customer token key file {key_file} cannot be used: {exc}") from exc

    def _sign(self, nonce: str) -> str:
        return hmac.new(self.key, nonce.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self) -> str:
        nonce = secrets.token_hex(16)
        return f"{nonce}.{self._sign(nonce)}"

    def valid(self, token: object) -> bool:
        if not isinstance(token, str) or token.count(".") != 1 or len(token) > 80:
            return False
        nonce, signature = token.split(".")
        return len(nonce) == 32 and hmac.compare_digest(signature, self._sign(nonce))

    def conversation_id(self, token: str) -> str:
        return hashlib.sha256(b"conversation:" + token.encode()).hexdigest()[:32]

    def browser_secret(self) -> str:
        """The key the browser's localStorage value is encrypted with: stable across restarts, so a reload after one
        still finds the conversation."""
        return hashlib.sha256(b"browser-state:" + self.key).hexdigest()[:32]
