"""Conversations a person takes over: states (bot -> waiting -> with_agent -> bot | resolved), every message of the
transcript, claims, agent presence, and the operator figures.

Stored in the app's database (chatapp/storage: the feedback SQLite file, or the Postgres every replica shares), so a
restart loses nothing, `chatapp feedback` backups hold it too, and an agent on one replica answers a customer on
another. Thread-safe, and safe across processes: every state change is one transaction that reads the conversation
with a row lock (Postgres) or under the write lock (SQLite BEGIN IMMEDIATE), so two agents claiming at once, on one
replica or two, get one winner. Which agents are signed in is in the database too. No UI code.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from chatapp.storage import DB_ERRORS, Database, StorageError, describe_error, migrate, open_database
from chatapp.storage.schema import agent_presence, conversation_messages, conversations

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
    """The conversation store. Every method is safe to call from any thread (and any replica).

    ``target`` is the SQLite file (as before) or a database URL."""

    def __init__(self, target: Path | str, busy_timeout_s: float = 5.0, agent_seen_s: float = 30.0):
        self.agent_seen_s = agent_seen_s
        self._lock = threading.RLock()  # in-process writers queue here instead of on the database's lock
        self._seen_written: dict[str, float] = {}  # agent -> when this process last stored their presence
        try:
            self._db: Database = open_database(target, busy_timeout_s)
            migrate(self._db)  # the feedback store may not have opened the database yet
        except (*DB_ERRORS, StorageError) as exc:
            where = str(target) if isinstance(target, Path) or "://" not in str(target) else "the database"
            raise InboxError(describe_error(exc, where, busy_timeout_s, "Inbox database")) from exc

    def close(self) -> None:
        self._db.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One transaction holding the write lock (SQLite) for a read-check-write; in-process writers wait here."""
        with self._lock, self._db.engine.begin() as conn:
            yield conn

    def _reading(self):
        return self._db.reader.connect() if self._db.is_sqlite else self._db.engine.connect()

    # ---- reading --------------------------------------------------------------------------------------------------

    def get(self, conversation_id: str) -> Conversation | None:
        with self._reading() as conn:
            return self._get(conn, conversation_id)

    def _get(self, conn: Connection, conversation_id: str, for_update: bool = False) -> Conversation | None:
        query = sa.select(conversations).where(conversations.c.conversation_id == conversation_id)
        if for_update and not self._db.is_sqlite:
            query = query.with_for_update()  # another replica's claim waits for this transaction
        row = conn.execute(query).mappings().first()
        if row is None:
            return None
        m = conversation_messages
        last = conn.execute(sa.select(m.c.text).where(m.c.conversation_id == conversation_id, m.c.role != "system")
                            .order_by(m.c.id.desc()).limit(1)).scalar()
        return Conversation(**{k: row[k] for k in _CONV_COLUMNS}, last_message=last or "")

    def messages(self, conversation_id: str, after: int = 0) -> list[Message]:
        m = conversation_messages
        with self._reading() as conn:
            rows = conn.execute(sa.select(m).where(m.c.conversation_id == conversation_id, m.c.id > after)
                                .order_by(m.c.id)).mappings().all()
        return [Message(r["id"], r["conversation_id"], r["role"], r["text"], r["author"] or "", r["created_at"],
                        json.loads(r["meta"] or "{}")) for r in rows]

    def open_conversations(self) -> list[Conversation]:
        """Waiting ones first, oldest first (the queue), then the ones agents have."""
        c = conversations
        with self._reading() as conn:
            ids = conn.execute(sa.select(c.c.conversation_id).where(c.c.state.in_(OPEN)).order_by(
                sa.case((c.c.state == "with_agent", 1), else_=0), c.c.waiting_since, c.c.created_at)).scalars().all()
            found = [self._get(conn, i) for i in ids]
        return [x for x in found if x is not None]

    def queue_position(self, conversation_id: str) -> int | None:
        """1 for the next conversation an agent should take; None when it is not waiting."""
        c = conversations
        with self._reading() as conn:
            row = conn.execute(sa.select(c.c.state, c.c.waiting_since)
                               .where(c.c.conversation_id == conversation_id)).first()
            if row is None or row.state != "waiting":
                return None
            ahead = conn.execute(sa.select(sa.func.count()).where(
                c.c.state == "waiting", c.c.waiting_since < row.waiting_since)).scalar_one()
        return ahead + 1

    # ---- the customer's side --------------------------------------------------------------------------------------

    def ensure(self, conversation_id: str, user: str | None = None) -> Conversation:
        """The conversation, created on first use; a logged-in customer only ever opens their own."""
        now = time.time()
        with self._write() as conn:
            conn.execute(self._db.insert(conversations).values(
                conversation_id=conversation_id, user=user, created_at=now, updated_at=now)
                .on_conflict_do_nothing(index_elements=[conversations.c.conversation_id]))
            conversation = self._get(conn, conversation_id)
        assert conversation is not None
        if conversation.user and conversation.user != user:
            raise Forbidden("This conversation belongs to another account.")
        return conversation

    def add(self, conversation_id: str, role: str, text: str, author: str = "", meta: dict | None = None) -> Message:
        with self._write() as conn:
            return self._add(conn, conversation_id, role, text, author, meta)

    def _add(self, conn: Connection, conversation_id: str, role: str, text: str, author: str = "",
             meta: dict | None = None) -> Message:
        now = time.time()
        new_id = conn.execute(sa.insert(conversation_messages).values(
            conversation_id=conversation_id, role=role, text=text, author=author, created_at=now,
            meta=json.dumps(meta or {}))).inserted_primary_key[0]
        self._update(conn, conversation_id, updated_at=now)
        return Message(new_id, conversation_id, role, text, author, now, meta or {})

    @staticmethod
    def _update(conn: Connection, conversation_id: str, *where, **values) -> None:
        conn.execute(sa.update(conversations).where(conversations.c.conversation_id == conversation_id, *where)
                     .values(**values))

    def request_person(self, conversation_id: str, reason: str, language: str = "en") -> Conversation:
        """Put the conversation in the queue (a second request keeps its place)."""
        now = time.time()
        with self._write() as conn:
            self._update(conn, conversation_id, conversations.c.state.not_in(OPEN), state="waiting", reason=reason,
                         language=language, waiting_since=now, agent=None, agent_name=None, closed_at=None,
                         updated_at=now)
            conversation = self._get(conn, conversation_id)
        assert conversation is not None
        return conversation

    def leave_contact(self, conversation_id: str, contact: str, text: str) -> None:
        with self._write() as conn:
            self._update(conn, conversation_id, contact=contact)
            self._add(conn, conversation_id, "customer", text, meta={"contact": contact, "offline": True})

    def close_by_customer(self, conversation_id: str) -> None:
        """The customer ended the chat; a conversation no person touched counts as contained."""
        now = time.time()
        with self._write() as conn:
            self._update(conn, conversation_id, conversations.c.state == "bot", state="resolved", closed_at=now,
                         updated_at=now)

    def rate_conversation(self, conversation_id: str, csat: int) -> None:
        if not 1 <= int(csat) <= 5:
            raise InboxError("A rating is 1 to 5.")
        with self._write() as conn:
            self._update(conn, conversation_id, csat=int(csat))

    def set_rating(self, message_id: str, rating: int) -> None:
        """Show the customer's 👍/👎 on the bot message in the agent's transcript."""
        m = conversation_messages
        with self._write() as conn:
            # meta is JSON text on both engines: narrow with LIKE (message ids are hex), then check it exactly
            rows = conn.execute(sa.select(m.c.id, m.c.meta).where(
                m.c.role == "bot", m.c.meta.like(f"%{_like_escape(message_id)}%", escape="\\"))).all()
            for row_id, meta_text in rows:
                meta = json.loads(meta_text or "{}")
                if meta.get("message_id") == message_id:
                    meta["rating"] = rating
                    conn.execute(sa.update(m).where(m.c.id == row_id).values(meta=json.dumps(meta)))

    # ---- the agent's side -----------------------------------------------------------------------------------------

    def seen(self, agent: str) -> None:
        """An agent's console is open (it polls); agents seen lately count as signed in, on every replica. Stored at
        most every few seconds per agent (a poll a second must not cost a write a second)."""
        now = time.time()
        with self._lock:
            if now - self._seen_written.get(agent, 0.0) < min(5.0, self.agent_seen_s / 3):
                return
            self._seen_written[agent] = now
        with self._write() as conn:
            stmt = self._db.insert(agent_presence).values(agent=agent, seen_at=now)
            conn.execute(stmt.on_conflict_do_update(index_elements=[agent_presence.c.agent],
                                                    set_={"seen_at": stmt.excluded.seen_at}))

    def agents_online(self) -> list[str]:
        cutoff = time.time() - self.agent_seen_s
        with self._reading() as conn:
            return sorted(conn.execute(sa.select(agent_presence.c.agent)
                                       .where(agent_presence.c.seen_at >= cutoff)).scalars())

    def claim(self, conversation_id: str, agent: str, name: str) -> Conversation:
        with self._write() as conn:
            return self._claim(conn, conversation_id, agent, name)

    def _claim(self, conn: Connection, conversation_id: str, agent: str, name: str) -> Conversation:
        current = self._require(conn, conversation_id)
        if current.state == "with_agent" and current.agent != agent:
            raise InboxError(f"{current.agent_name or current.agent} already has this conversation.")
        if current.state not in OPEN:
            raise InboxError(f"This conversation is {_said(current.state)}; there is nothing to claim.")
        self._update(conn, conversation_id, state="with_agent", agent=agent, agent_name=name, updated_at=time.time())
        if current.state == "waiting":
            self._add(conn, conversation_id, "system", f"{name} joined the conversation.")
        return self._require(conn, conversation_id)

    def reply(self, conversation_id: str, agent: str, name: str, text: str) -> Message:
        """An agent's message to the customer; refused unless this agent has the conversation."""
        text = (text or "").strip()
        if not text:
            raise InboxError("Write a reply first.")
        with self._write() as conn:
            current = self._require(conn, conversation_id)
            if current.state not in OPEN:
                raise InboxError(f"Not sent: this conversation was already {_said(current.state)}.")
            if current.state == "waiting":
                current = self._claim(conn, conversation_id, agent, name)
            if current.agent != agent:
                raise InboxError(f"Not sent: {current.agent_name or current.agent} has this conversation.")
            if current.first_human_at is None:
                self._update(conn, conversation_id, first_human_at=time.time())
            return self._add(conn, conversation_id, "agent", text, author=name, meta={"agent": agent})

    def hand_back(self, conversation_id: str, agent: str, note: str = "") -> Conversation:
        return self._end(conversation_id, agent, "bot", note, "handed the conversation back to the bot")

    def resolve(self, conversation_id: str, agent: str, note: str = "") -> Conversation:
        return self._end(conversation_id, agent, "resolved", note, "marked the conversation resolved")

    def _end(self, conversation_id: str, agent: str, state: str, note: str, what: str) -> Conversation:
        with self._write() as conn:
            current = self._require(conn, conversation_id)
            if current.state not in OPEN:
                raise InboxError(f"This conversation was already {_said(current.state)}.")
            if current.state == "with_agent" and current.agent != agent:
                raise InboxError(f"{current.agent_name or current.agent} has this conversation.")
            now = time.time()
            self._update(conn, conversation_id, state=state, note=note or None, handed_at=now,
                         closed_at=now if state == "resolved" else None, updated_at=now)
            self._add(conn, conversation_id, "system", f"{current.agent_name or agent} {what}.",
                      meta={"note": note} if note else None)
            return self._require(conn, conversation_id)

    def _require(self, conn: Connection, conversation_id: str) -> Conversation:
        conversation = self._get(conn, conversation_id, for_update=True)
        if conversation is None:
            raise InboxError("No such conversation.")
        return conversation

    # ---- operator figures -----------------------------------------------------------------------------------------

    def figures(self, since: float = 0.0) -> dict:
        """Per day and for the period: containment, handoff rate, first human reply p50/p95 (s), satisfaction."""
        c, m = conversations, conversation_messages
        has_customer = sa.exists().where(m.c.conversation_id == c.c.conversation_id, m.c.role == "customer")
        with self._reading() as conn:
            rows = conn.execute(sa.select(c.c.created_at, c.c.waiting_since, c.c.first_human_at, c.c.csat)
                                .where(c.c.created_at >= since, has_customer)).mappings().all()
        days: dict[str, list] = {}
        for row in rows:
            days.setdefault(dt.date.fromtimestamp(row["created_at"]).isoformat(), []).append(row)
        return {"period": _figures(rows), "days": {day: _figures(r) for day, r in sorted(days.items())}}


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


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
