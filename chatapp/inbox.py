"""Conversations a person takes over: states (bot -> waiting -> with_agent -> bot | resolved), every message of the
transcript, claims, agent presence, and the operator figures.

Stored in the feedback database (tables from the third migration in chatapp/feedback.py), so a restart loses nothing
and `chatapp feedback` backups hold it too. Thread-safe: one connection behind a lock; state changes are single
transactions, so two agents claiming at once get one winner. No UI code.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

STATES = ("bot", "waiting", "with_agent", "resolved")
OPEN = ("waiting", "with_agent")


class InboxError(RuntimeError):
    """An inbox action that cannot be done; the message says why, in words an agent can act on."""


class Forbidden(InboxError):
    """The conversation belongs to someone else."""


@dataclass
class Message:
    id: int
    conversation_id: str
    role: str  # customer | bot | agent | system
    text: str
    author: str = ""
    created_at: float = 0.0
    meta: dict = field(default_factory=dict)


@dataclass
class Conversation:
    conversation_id: str
    state: str = "bot"
    reason: str | None = None
    language: str = "en"
    agent: str | None = None
    agent_name: str | None = None
    user: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    waiting_since: float | None = None
    first_human_at: float | None = None
    handed_at: float | None = None
    closed_at: float | None = None
    note: str | None = None
    csat: int | None = None
    contact: str | None = None
    last_message: str = ""


_CONV_COLUMNS = [f for f in Conversation.__dataclass_fields__ if f != "last_message"]


class Inbox:
    """The conversation store. Every method is safe to call from any thread."""

    def __init__(self, db_path: Path, busy_timeout_s: float = 5.0, agent_seen_s: float = 30.0):
        from chatapp.feedback import MIGRATIONS, SCHEMA_VERSION

        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self.agent_seen_s = agent_seen_s
        self._seen: dict[str, float] = {}
        with self._lock:
            self._conn.execute("PRAGMA journal_mode = WAL")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:  # the feedback store may not have opened the file yet
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                    for steps in MIGRATIONS[version:]:
                        for statement in steps:
                            self._conn.execute(statement)
                    self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- reading --------------------------------------------------------------------------------------------------

    def get(self, conversation_id: str) -> Conversation | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM conversations WHERE conversation_id = ?",
                                     (conversation_id,)).fetchone()
            last = self._conn.execute(
                "SELECT text FROM conversation_messages WHERE conversation_id = ? AND role != 'system' "
                "ORDER BY id DESC LIMIT 1", (conversation_id,)).fetchone()
        if row is None:
            return None
        return Conversation(**{k: row[k] for k in _CONV_COLUMNS}, last_message=last["text"] if last else "")

    def messages(self, conversation_id: str, after: int = 0) -> list[Message]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM conversation_messages WHERE conversation_id = ? AND id > ? ORDER BY id",
                (conversation_id, after)).fetchall()
        return [Message(r["id"], r["conversation_id"], r["role"], r["text"], r["author"] or "", r["created_at"],
                        json.loads(r["meta"] or "{}")) for r in rows]

    def open_conversations(self) -> list[Conversation]:
        """Waiting ones first, oldest first (the queue), then the ones agents have."""
        with self._lock:
            ids = [r[0] for r in self._conn.execute(
                "SELECT conversation_id FROM conversations WHERE state IN ('waiting', 'with_agent') "
                "ORDER BY state = 'with_agent', waiting_since, created_at")]
        return [c for c in map(self.get, ids) if c is not None]

    def queue_position(self, conversation_id: str) -> int | None:
        """1 for the next conversation an agent should take; None when it is not waiting."""
        with self._lock:
            row = self._conn.execute("SELECT state, waiting_since FROM conversations WHERE conversation_id = ?",
                                     (conversation_id,)).fetchone()
            if row is None or row["state"] != "waiting":
                return None
            ahead = self._conn.execute("SELECT count(*) FROM conversations WHERE state = 'waiting' AND "
                                       "waiting_since < ?", (row["waiting_since"],)).fetchone()[0]
        return ahead + 1

    # ---- the customer's side --------------------------------------------------------------------------------------

    def ensure(self, conversation_id: str, user: str | None = None) -> Conversation:
        """The conversation, created on first use; a logged-in customer only ever opens their own."""
        now = time.time()
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO conversations (conversation_id, user, created_at, updated_at) "
                               "VALUES (?, ?, ?, ?)", (conversation_id, user, now, now))
            conversation = self.get(conversation_id)
        assert conversation is not None
        if conversation.user and conversation.user != user:
            raise Forbidden("This conversation belongs to another account.")
        return conversation

    def add(self, conversation_id: str, role: str, text: str, author: str = "", meta: dict | None = None) -> Message:
        now = time.time()
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO conversation_messages (conversation_id, role, text, author, created_at, meta) "
                "VALUES (?, ?, ?, ?, ?, ?)", (conversation_id, role, text, author, now, json.dumps(meta or {})))
            self._conn.execute("UPDATE conversations SET updated_at = ? WHERE conversation_id = ?",
                               (now, conversation_id))
        return Message(cur.lastrowid, conversation_id, role, text, author, now, meta or {})

    def request_person(self, conversation_id: str, reason: str, language: str = "en") -> Conversation:
        """Put the conversation in the queue (a second request keeps its place)."""
        now = time.time()
        with self._lock:
            self._conn.execute(
                "UPDATE conversations SET state = 'waiting', reason = ?, language = ?, waiting_since = ?, "
                "agent = NULL, agent_name = NULL, closed_at = NULL, updated_at = ? "
                "WHERE conversation_id = ? AND state NOT IN ('waiting', 'with_agent')",
                (reason, language, now, now, conversation_id))
            conversation = self.get(conversation_id)
        assert conversation is not None
        return conversation

    def leave_contact(self, conversation_id: str, contact: str, text: str) -> None:
        with self._lock:
            self._conn.execute("UPDATE conversations SET contact = ? WHERE conversation_id = ?",
                               (contact, conversation_id))
            self.add(conversation_id, "customer", text, meta={"contact": contact, "offline": True})

    def close_by_customer(self, conversation_id: str) -> None:
        """The customer ended the chat; a conversation no person touched counts as contained."""
        now = time.time()
        with self._lock:
            self._conn.execute("UPDATE conversations SET state = 'resolved', closed_at = ?, updated_at = ? "
                               "WHERE conversation_id = ? AND state = 'bot'", (now, now, conversation_id))

    def rate_conversation(self, conversation_id: str, csat: int) -> None:
        if not 1 <= int(csat) <= 5:
            raise InboxError("A rating is 1 to 5.")
        with self._lock:
            self._conn.execute("UPDATE conversations SET csat = ? WHERE conversation_id = ?",
                               (int(csat), conversation_id))

    def set_rating(self, message_id: str, rating: int) -> None:
        """Show the customer's 👍/👎 on the bot message in the agent's transcript."""
        with self._lock:
            self._conn.execute("UPDATE conversation_messages SET meta = json_set(meta, '$.rating', ?) "
                               "WHERE role = 'bot' AND json_extract(meta, '$.message_id') = ?", (rating, message_id))

    # ---- the agent's side -----------------------------------------------------------------------------------------

    def seen(self, agent: str) -> None:
        """An agent's console is open (it polls); agents seen lately count as signed in."""
        with self._lock:
            self._seen[agent] = time.monotonic()

    def agents_online(self) -> list[str]:
        with self._lock:
            now = time.monotonic()
            return sorted(a for a, t in self._seen.items() if now - t <= self.agent_seen_s)

    def claim(self, conversation_id: str, agent: str, name: str) -> Conversation:
        with self._lock:
            current = self._require(conversation_id)
            if current.state == "with_agent" and current.agent != agent:
                raise InboxError(f"{current.agent_name or current.agent} already has this conversation.")
            if current.state not in OPEN:
                raise InboxError(f"This conversation is {_said(current.state)}; there is nothing to claim.")
            self._conn.execute("UPDATE conversations SET state = 'with_agent', agent = ?, agent_name = ?, "
                               "updated_at = ? WHERE conversation_id = ?", (agent, name, time.time(), conversation_id))
            if current.state == "waiting":
                self.add(conversation_id, "system", f"{name} joined the conversation.")
            return self._require(conversation_id)

    def reply(self, conversation_id: str, agent: str, name: str, text: str) -> Message:
        """An agent's message to the customer; refused unless this agent has the conversation."""
        text = (text or "").strip()
        if not text:
            raise InboxError("Write a reply first.")
        with self._lock:
            current = self._require(conversation_id)
            if current.state not in OPEN:
                raise InboxError(f"Not sent: this conversation was already {_said(current.state)}.")
            if current.state == "waiting":
                current = self.claim(conversation_id, agent, name)
            if current.agent != agent:
                raise InboxError(f"Not sent: {current.agent_name or current.agent} has this conversation.")
            if current.first_human_at is None:
                self._conn.execute("UPDATE conversations SET first_human_at = ? WHERE conversation_id = ?",
                                   (time.time(), conversation_id))
            return self.add(conversation_id, "agent", text, author=name, meta={"agent": agent})

    def hand_back(self, conversation_id: str, agent: str, note: str = "") -> Conversation:
        return self._end(conversation_id, agent, "bot", note, "handed the conversation back to the bot")

    def resolve(self, conversation_id: str, agent: str, note: str = "") -> Conversation:
        return self._end(conversation_id, agent, "resolved", note, "marked the conversation resolved")

    def _end(self, conversation_id: str, agent: str, state: str, note: str, what: str) -> Conversation:
        with self._lock:
            current = self._require(conversation_id)
            if current.state not in OPEN:
                raise InboxError(f"This conversation was already {_said(current.state)}.")
            if current.state == "with_agent" and current.agent != agent:
                raise InboxError(f"{current.agent_name or current.agent} has this conversation.")
            now = time.time()
            self._conn.execute("UPDATE conversations SET state = ?, note = ?, handed_at = ?, closed_at = ?, "
                               "updated_at = ? WHERE conversation_id = ?",
                               (state, note or None, now, now if state == "resolved" else None, now, conversation_id))
            self.add(conversation_id, "system", f"{current.agent_name or agent} {what}.",
                     meta={"note": note} if note else None)
            return self._require(conversation_id)

    def _require(self, conversation_id: str) -> Conversation:
        conversation = self.get(conversation_id)
        if conversation is None:
            raise InboxError("No such conversation.")
        return conversation

    # ---- operator figures -----------------------------------------------------------------------------------------

    def figures(self, since: float = 0.0) -> dict:
        """Per day and for the period: containment, handoff rate, first human reply p50/p95 (s), satisfaction."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT c.created_at, c.waiting_since, c.first_human_at, c.csat FROM conversations c WHERE "
                "c.created_at >= ? AND EXISTS (SELECT 1 FROM conversation_messages m WHERE "
                "m.conversation_id = c.conversation_id AND m.role = 'customer')", (since,)).fetchall()
        days: dict[str, list] = {}
        for row in rows:
            days.setdefault(dt.date.fromtimestamp(row["created_at"]).isoformat(), []).append(row)
        return {"period": _figures(rows), "days": {day: _figures(r) for day, r in sorted(days.items())}}


def _figures(rows: list) -> dict:
    total = len(rows)
    handed = [r for r in rows if r["waiting_since"] is not None]
    waits = sorted(r["first_human_at"] - r["waiting_since"] for r in handed if r["first_human_at"])
    ratings = [r["csat"] for r in rows if r["csat"]]
    return {
        "conversations": total,
        "containment": (total - len(handed)) / total if total else None,
        "handoff_rate": len(handed) / total if total else None,
        "first_reply_p50_s": _pct(waits, 50), "first_reply_p95_s": _pct(waits, 95),
        "csat": sum(ratings) / len(ratings) if ratings else None, "csat_n": len(ratings),
    }


def _pct(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(pct / 100 * len(values) + 0.5) - 1))]


def _said(state: str) -> str:
    return {"bot": "handed back to the bot", "resolved": "resolved", "waiting": "waiting",
            "with_agent": "taken by an agent"}[state]


_DAYS = "mon tue wed thu fri sat sun".split()
_HOURS = re.compile(r"^(?:(mon|tue|wed|thu|fri|sat|sun)(?:-(mon|tue|wed|thu|fri|sat|sun))?\s+)?"
                    r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


def within_hours(spec: str, now: dt.datetime | None = None) -> bool:
    """`spec` like "09:00-17:00" or "mon-fri 09:00-17:00" ("" = always); anything else is a ValueError."""
    spec = spec.strip().lower()
    if not spec:
        return True
    match = _HOURS.match(spec)
    if not match:
        raise ValueError(f"support hours {spec!r}: expected e.g. 09:00-17:00 or mon-fri 09:00-17:00")
    first, last, h1, m1, h2, m2 = match.groups()
    now = now or dt.datetime.now()
    if first and _DAYS[now.weekday()] not in _DAYS[_DAYS.index(first):_DAYS.index(last or first) + 1]:
        return False
    return f"{h1}:{m1}" <= now.strftime("%H:%M") < f"{h2}:{m2}"
