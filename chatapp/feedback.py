"""Feedback log: every answer with what produced it, user ratings and corrections, and training-data export.

Why it is built this way:
- One SQLite file (WAL, synchronous=FULL) so a rating the user saw acknowledged survives a crash or power cut.
- One writer thread owns all writes: `log_turn` only enqueues (streaming never waits on disk), concurrent raters
  are group-committed in one transaction (20 sessions at once cost one fsync, not 20), and SQLite never sees two
  writers of ours fighting for the lock.
- If the database cannot be written (locked, read-only, corrupt, disk full), writes go to an fsynced spill file
  next to it and are replayed when it works again; `health()` says what is wrong, in words the UI can show.
- Export writes the dataset formats TRL and LLaMA-Factory read as they are, with personal data redacted by default.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
import uuid
import weakref
from collections import Counter
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from chatapp.config import FeedbackSettings, Settings
from chatapp.redact import Redactor

log = logging.getLogger(__name__)
EXPORT_FORMATS = ("sft", "dpo", "kto", "sharegpt")

# Each entry moves the schema one version up (PRAGMA user_version). Never edit a shipped entry; append a new one.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE turns (
            message_id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            user_message TEXT NOT NULL,
            answer TEXT NOT NULL,
            history TEXT NOT NULL DEFAULT '[]',
            prompt_messages TEXT NOT NULL DEFAULT '[]',
            retrieved TEXT NOT NULL DEFAULT '[]',
            template TEXT NOT NULL DEFAULT '',
            template_version INTEGER NOT NULL DEFAULT 0,
            mode TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '',
            adapter TEXT,
            first_token_ms REAL,
            total_ms REAL,
            handoff TEXT,
            curated INTEGER NOT NULL DEFAULT 0,
            user TEXT
        )""",
        "CREATE INDEX turns_created_at ON turns(created_at)",
        "CREATE INDEX turns_session ON turns(session_id)",
        # The current rating of a message; a later rate() replaces it (guarded by updated_at so replays are safe).
        """CREATE TABLE ratings (
            message_id TEXT PRIMARY KEY,
            rating INTEGER NOT NULL CHECK (rating IN (-1, 0, 1)),
            correction TEXT,
            reason TEXT,
            user TEXT,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX ratings_updated_at ON ratings(updated_at)",
        """CREATE TABLE handoffs (
            handoff_id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL,
            message_id TEXT,
            reason TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX handoffs_created_at ON handoffs(created_at)",
    ],
    # The faithfulness guard's verdict per answer (chatapp/guard.py): what it checked and whether it replaced it.
    [
        "ALTER TABLE turns ADD COLUMN evidence TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE turns ADD COLUMN guard TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE turns ADD COLUMN guard_replaced INTEGER NOT NULL DEFAULT 0",
    ],
    # Conversations a person can take over (chatapp/inbox.py): state, claim, and every message of the transcript.
    [
        """CREATE TABLE conversations (
            conversation_id TEXT PRIMARY KEY,
            state TEXT NOT NULL DEFAULT 'bot' CHECK (state IN ('bot', 'waiting', 'with_agent', 'resolved')),
            reason TEXT,
            language TEXT NOT NULL DEFAULT 'en',
            agent TEXT,
            agent_name TEXT,
            user TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            waiting_since REAL,
            first_human_at REAL,
            handed_at REAL,
            closed_at REAL,
            note TEXT,
            csat INTEGER,
            contact TEXT
        )""",
        "CREATE INDEX conversations_state ON conversations(state, waiting_since)",
        "CREATE INDEX conversations_created_at ON conversations(created_at)",
        """CREATE TABLE conversation_messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL,
            role TEXT NOT NULL,
            text TEXT NOT NULL,
            author TEXT,
            created_at REAL NOT NULL,
            meta TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX conversation_messages_conv ON conversation_messages(conversation_id, id)",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)
_TURN_COLUMNS = (
    "message_id session_id created_at user_message answer history prompt_messages retrieved template "
    "template_version mode model adapter first_token_ms total_ms handoff curated user evidence guard guard_replaced"
).split()
_JSON_COLUMNS = ("history", "prompt_messages", "retrieved", "evidence")
_TURN_DEFAULTS = {"evidence": "[]", "guard": "{}", "guard_replaced": 0}


class FeedbackError(RuntimeError):
    """The feedback store could not do what was asked; the message says why and what to do about it."""


class FeedbackUnavailable(FeedbackError):
    """The database cannot be written now; the item was kept in the spill file and will be saved later."""


class UnknownMessage(FeedbackError):
    """A rating named a message id the log has never seen."""


@dataclass
class TurnRecord:
    """Everything that produced one assistant answer, so it can be rated, debugged and re-rendered for training."""

    message_id: str
    session_id: str
    user_message: str
    answer: str
    history: list[dict] = field(default_factory=list)  # prior messages
    prompt_messages: list[dict] = field(default_factory=list)  # the rendered prompt the model saw
    retrieved: list[dict] = field(default_factory=list)  # [{"chunk_id","score","source","title"}]
    template: str = ""
    template_version: int = 0
    mode: str = ""
    model: str = ""
    adapter: str | None = None
    first_token_ms: float | None = None
    total_ms: float | None = None
    handoff: str | None = None  # reason if a handoff was offered/requested
    curated: bool = False  # answer returned from a curated FAQ/correction
    user: str | None = None
    created_at: float = field(default_factory=time.time)
    evidence: list[dict] = field(default_factory=list)  # [{"text","title","source","chunk_id"}] the prompt quoted
    guard: dict = field(default_factory=dict)  # the guard's verdict: claims checked, unsupported ones, action
    guard_replaced: bool = False  # the model's answer was replaced (extractive quote or handoff offer)


def new_message_id() -> str:
    """A stable, unique id for one assistant message (the UI keeps it next to the message to rate it later)."""
    return uuid.uuid4().hex


@dataclass
class _Op:
    """One queued write. ``done`` is set once it is committed (or has failed; then ``error`` says why)."""

    kind: str  # "turn" | "rate" | "handoff" | "barrier"
    data: dict[str, Any]
    done: threading.Event | None = None
    error: BaseException | None = None


_STOP = _Op("stop", {})


class FeedbackStore:
    """The feedback log. Thread-safe; one instance per process and database file."""

    def __init__(self, db_path: Path, settings: FeedbackSettings | None = None):
        self.db_path = Path(db_path)
        self.settings = settings or FeedbackSettings()
        self.spill_path = self.db_path.with_name(self.db_path.name + ".spill.jsonl")
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, Any]] = {}  # message_id -> turn row not yet in the database
        self._backlog: list[dict[str, Any]] = []  # ops that failed to commit, in order (mirrored in the spill file)
        self._spill_ok = True
        self._health: str | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._load_spill()
        try:
            self._connect()
        except sqlite3.Error as exc:
            self._health = self._describe(exc)
        self._writer = threading.Thread(target=self._run, name=f"feedback-writer:{self.db_path.name}", daemon=True)
        self._writer.start()
        if self._backlog:
            self._queue.put(_Op("barrier", {}))  # replay the spill file now, not at the first new write
        ref = weakref.ref(self)
        atexit.register(lambda: (store := ref()) is not None and store.close())

    # ---- writes -------------------------------------------------------------------------------------------------

    def log_turn(self, record: TurnRecord) -> None:
        """Queue a turn for writing and return at once; a failure shows in `health()`, the record is kept."""
        if not isinstance(record, TurnRecord):
            raise TypeError(f"log_turn needs a TurnRecord, got {type(record).__name__}")
        self._check_open()
        row = _turn_row(record)
        with self._lock:
            self._pending[row["message_id"]] = row
        self._queue.put(_Op("turn", row))

    def rate(
        self,
        message_id: str,
        rating: int,
        correction: str | None = None,
        reason: str | None = None,
        user: str | None = None,
    ) -> None:
        """Set the rating of one message: +1, -1 or 0 (cleared), with an optional correction and reason.

        Each call replaces the previous rating of that message (rating, correction and reason together).
        Returns once committed. Raises `UnknownMessage` for an id never logged, `FeedbackUnavailable` when the
        database cannot be written (the rating is then kept in the spill file and saved later), ValueError for
        bad values. Text is stored exactly as given; escaping is the display's job.
        """
        if not isinstance(message_id, str) or not message_id:
            raise ValueError("message_id must be a non-empty string")
        if isinstance(rating, bool) or rating not in (-1, 0, 1):
            raise ValueError(f"rating must be +1, -1 or 0 (cleared), got {rating!r}")
        for name, value in (("correction", correction), ("reason", reason), ("user", user)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be text or None, got {type(value).__name__}")
        if rating == 0:
            correction = reason = None
        correction = _storable(correction) if correction and correction.strip() else None
        reason, user = _storable(reason), _storable(user)
        self._submit(
            _Op(
                "rate",
                {
                    "message_id": message_id,
                    "rating": rating,
                    "correction": correction,
                    "reason": reason or None,
                    "user": user,
                    "updated_at": time.time(),
                },
            )
        )

    def log_handoff(self, session_id: str, message_id: str | None, reason: str) -> None:
        """Queue a handoff request (user asked for a human, or the bot offered one) and return at once."""
        self._check_open()
        data = {
            "handoff_id": uuid.uuid4().hex,
            "session_id": _storable(str(session_id)),
            "message_id": None if message_id is None else _storable(str(message_id)),
            "reason": _storable(str(reason or "")),
            "created_at": time.time(),
        }
        self._queue.put(_Op("handoff", data))

    def flush(self, timeout: float = 10) -> None:
        """Wait until everything queued so far is committed; raise FeedbackUnavailable if some of it is spilled."""
        self._submit(_Op("barrier", {}), timeout=timeout)
        if self._backlog:
            raise FeedbackUnavailable(
                f"{self._health or 'the feedback database is unavailable'} "
                f"({len(self._backlog)} writes are kept in {self.spill_path} and will be saved later)"
            )

    def health(self) -> str | None:
        """None when writes commit, else a sentence for the UI: what is wrong with the database and what to do."""
        if self._closed:
            return "The feedback store is closed."
        return self._health

    def close(self) -> None:
        """Commit what is queued (or spill it) and stop the writer. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._writer.join(timeout=max(30.0, self.settings.busy_timeout_s * 3))
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---- reads --------------------------------------------------------------------------------------------------

    def turn(self, message_id: str) -> dict | None:
        """One turn with its current rating, or None. Includes turns still queued for writing."""
        with self._lock:
            pending = self._pending.get(message_id)
        if pending is not None:
            return {**_decode_turn(pending), "rating": None, "correction": None, "reason": None, "rated_by": None}
        with self._read() as conn:
            row = conn.execute(
                "SELECT t.*, r.rating, r.correction, r.reason, r.user AS rated_by, r.updated_at AS rated_at "
                "FROM turns t LEFT JOIN ratings r USING (message_id) WHERE t.message_id = ?",
                (message_id,),
            ).fetchone()
        return _decode_turn(dict(row)) if row else None

    def corrections(self, since: float | None = None) -> list[dict]:
        """Current corrections (question, corrected answer): what the example bank loads at start-up."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT t.message_id, t.user_message AS question, r.correction, t.answer, t.history, "
                "t.template, r.updated_at FROM ratings r JOIN turns t USING (message_id) "
                "WHERE r.correction IS NOT NULL AND r.updated_at >= ? ORDER BY r.updated_at",
                (since or 0.0,),
            ).fetchall()
        return [{**dict(r), "history": json.loads(r["history"])} for r in rows]

    def stats(self, since: float | None = None) -> dict:
        """Figures for the dashboard, over turns created at or after ``since`` (epoch seconds; None = all)."""
        since = since or 0.0
        with self._read() as conn:
            turns, sessions, curated, offered, replaced = conn.execute(
                "SELECT count(*), count(DISTINCT session_id), coalesce(sum(curated), 0), count(handoff), "
                "coalesce(sum(guard_replaced), 0) FROM turns WHERE created_at >= ?",
                (since,),
            ).fetchone()
            up, down, corrections = conn.execute(
                "SELECT coalesce(sum(r.rating = 1), 0), coalesce(sum(r.rating = -1), 0), count(r.correction) "
                "FROM ratings r JOIN turns t USING (message_id) WHERE t.created_at >= ?",
                (since,),
            ).fetchone()
            daily = [
                {"day": day, "turns": n, "up": u, "down": d, "up_rate": (u / (u + d)) if u + d else None}
                for day, n, u, d in conn.execute(
                    "SELECT date(t.created_at, 'unixepoch', 'localtime') AS day, count(*), "
                    "coalesce(sum(r.rating = 1), 0), coalesce(sum(r.rating = -1), 0) "
                    "FROM turns t LEFT JOIN ratings r USING (message_id) WHERE t.created_at >= ? "
                    "GROUP BY day ORDER BY day",
                    (since,),
                )
            ]
            first_token = [v for (v,) in conn.execute(
                "SELECT first_token_ms FROM turns WHERE created_at >= ? AND first_token_ms IS NOT NULL", (since,))]
            total = [v for (v,) in conn.execute(
                "SELECT total_ms FROM turns WHERE created_at >= ? AND total_ms IS NOT NULL", (since,))]
            # Same question = same text up to case and surrounding spaces/punctuation. With exactly one max()
            # aggregate, SQLite takes the bare columns from that row: the latest down-voted answer of the group.
            most_downvoted = [dict(r) for r in conn.execute(
                "SELECT t.user_message AS question, sum(r.rating = -1) AS down, sum(r.rating = 1) AS up, "
                "t.answer AS last_answer, t.message_id, max(CASE WHEN r.rating = -1 THEN t.created_at END) AS last_down "
                "FROM ratings r JOIN turns t USING (message_id) WHERE t.created_at >= ? AND r.rating != 0 "
                "GROUP BY lower(trim(t.user_message, ' ?!.' || char(9, 10, 13))) HAVING down > 0 "
                "ORDER BY down DESC, up ASC, last_down DESC LIMIT 10",
                (since,),
            )]
            requested = conn.execute(
                "SELECT count(*) FROM handoffs WHERE created_at >= ?", (since,)).fetchone()[0]
            reasons = Counter()
            for reason, n in conn.execute(
                "SELECT reason, count(*) FROM handoffs WHERE created_at >= ? GROUP BY reason", (since,)):
                reasons[("requested", reason)] += n
            for reason, n in conn.execute(
                "SELECT handoff, count(*) FROM turns WHERE created_at >= ? AND handoff IS NOT NULL GROUP BY handoff",
                (since,)):
                reasons[("offered", reason)] += n
        return {
            "since": since or None,
            "turns": turns,
            "sessions": sessions,
            "curated": curated,
            "guard_replaced": replaced,  # answers the faithfulness guard replaced (an unsupported claim)
            "rated": up + down,
            "up": up,
            "down": down,
            "up_rate": up / (up + down) if up + down else None,
            "corrections": corrections,
            "handoffs_requested": requested,
            "handoffs_offered": offered,
            "handoff_reasons": [
                {"kind": kind, "reason": reason, "count": n} for (kind, reason), n in reasons.most_common()
            ],
            "latency_ms": {
                "first_token_p50": _percentile(first_token, 50),
                "first_token_p95": _percentile(first_token, 95),
                "total_p50": _percentile(total, 50),
                "total_p95": _percentile(total, 95),
                "measured": len(total),
            },
            "daily": daily,
            "most_downvoted": most_downvoted,
            "unsaved": len(self._backlog),
            "health": self.health(),
        }

    def export(
        self, fmt: str, since: datetime | None = None, redact: bool = True, meta: bool = True
    ) -> tuple[list[dict], dict[str, int]]:
        """Rated turns as training records, and how many of each kind of personal data were redacted.

        Formats (TRL reads the first three directly, LLaMA-Factory the last):
        - ``sft``: ``{"messages": [...history, user, assistant]}`` for thumbs-up answers and corrections.
        - ``dpo``: ``{"prompt": [...], "chosen": [correction], "rejected": [original answer]}`` from corrections.
        - ``kto``: ``{"prompt": [...], "completion": [answer], "label": bool}`` from thumbs (a correction is a
          desirable completion too).
        - ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt", "value"}], "system": ...}``, like sft.
        The prompt is the conversation as the user had it (history + question), not the rendered template: the
        tuning step re-renders it with the template recorded in ``meta`` (TRL ignores that extra key; pass
        ``meta=False`` for files with only the format's own keys). ``since`` filters on when the rating was given.
        """
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
        since_ts = since.timestamp() if since is not None else 0.0
        redactor = Redactor(self.settings.redact_patterns, self.settings.phone_regions) if redact else None
        clean = redactor or (lambda text: text)
        records: list[dict] = []
        # Building ~10^5 small dicts re-triggers the cyclic GC over everything built so far (it doubled export time);
        # these records hold no cycles, so pause it for the loop.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            self._export_rows(fmt, since_ts, clean, meta, records)
        finally:
            if gc_was_on:
                gc.enable()
        return records, dict(redactor.counts) if redactor else {}

    def _export_rows(self, fmt: str, since_ts: float, clean, meta: bool, records: list[dict]) -> None:
        # Only the rows and columns this format can use: the rendered prompt is the bulk of a row.
        wanted = {"dpo": "r.correction IS NOT NULL", "kto": "(r.rating != 0 OR r.correction IS NOT NULL)"}.get(
            fmt, "(r.rating = 1 OR r.correction IS NOT NULL)")
        columns = ("t.message_id, t.session_id, t.created_at, t.user_message, t.answer, t.history, t.retrieved, "
                   "t.template, t.template_version, t.mode, t.model, t.adapter, t.curated"
                   + (", t.prompt_messages" if fmt == "sharegpt" else ""))
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {columns}, r.rating, r.correction, r.reason FROM ratings r JOIN turns t USING (message_id) "
                f"WHERE r.updated_at >= ? AND {wanted} ORDER BY r.updated_at",  # the index, no sort
                (since_ts,),
            )
            for row in rows:
                records.extend(_training_records(fmt, row, clean, meta))

    # ---- the writer thread --------------------------------------------------------------------------------------

    def _submit(self, op: _Op, timeout: float | None = None) -> None:
        """Queue ``op`` and wait for the writer to commit it; re-raise its error in the caller's thread."""
        self._check_open()
        op.done = threading.Event()
        self._queue.put(op)
        wait = timeout if timeout is not None else self.settings.busy_timeout_s + 30.0
        if not op.done.wait(wait):
            raise FeedbackError(f"the feedback writer did not answer within {wait:.0f}s ({self._health or 'busy'})")
        if op.error is not None:
            raise op.error

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.settings.retry_every_s if self._backlog or self._health else None)
            except queue.Empty:
                self._commit([])  # retry: reconnect, replay the backlog, clear health()
                continue
            batch = [first]
            while len(batch) < 1000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(op is _STOP for op in batch)
            self._commit([op for op in batch if op is not _STOP])
            if stop:
                return

    def _commit(self, batch: list[_Op]) -> None:
        """Write the backlog then ``batch`` in one transaction; on failure keep both (spill) and tell the waiters."""
        ops = [op for op in batch if op.kind != "barrier"]
        try:
            if self._conn is None:
                self._connect()
            conn = self._conn
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                for data in self._backlog:
                    if error := self._apply(conn, data["op"], data, replay=True):
                        log.error("dropped an unstorable spilled write: %s", error)
                for op in ops:
                    op.error = self._apply(conn, op.kind, op.data, replay=False)
                    if op.error is not None and op.done is None:  # nobody waits for it: at least say so
                        log.error("dropped an unstorable %s: %s", op.kind, op.error)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            self._fail(ops, self._describe(exc))
        except Exception as exc:  # a bug must not kill the writer: keep the data and say so
            self._fail(ops, f"Feedback writer error: {type(exc).__name__}: {exc}")
        else:
            self._health = None
            with self._lock:
                for data in [*self._backlog, *(op.data | {"op": op.kind} for op in ops)]:
                    if data["op"] == "turn":
                        self._pending.pop(data["message_id"], None)
            if self._backlog:
                self._backlog.clear()
                self._truncate_spill()
        for op in batch:
            if op.done is not None:
                op.done.set()

    def _fail(self, ops: list[_Op], problem: str) -> None:
        self._health = problem
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        kept = [{"op": op.kind, **op.data} for op in ops]
        self._backlog.extend(kept)
        self._append_spill(kept)
        where = f"kept in {self.spill_path}" if self._spill_ok else "kept in memory only (the spill file failed)"
        for op in ops:
            op.error = FeedbackUnavailable(f"{problem} Your feedback is {where} and will be saved when it works again.")

    def _apply(self, conn: sqlite3.Connection, kind: str, data: dict[str, Any], replay: bool) -> BaseException | None:
        """Write one op. A problem with this op's data is returned (SQLite rolls back only that statement), so one
        bad record can neither fail its whole batch nor block the spill replay forever; database trouble raises."""
        try:
            return self._write(conn, kind, data, replay)
        except (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, KeyError, TypeError,
                ValueError) as exc:
            return FeedbackError(f"could not store this {kind}: {type(exc).__name__}: {exc}")

    def _write(self, conn: sqlite3.Connection, kind: str, data: dict[str, Any], replay: bool) -> BaseException | None:
        if kind == "turn":
            cols = ", ".join(_TURN_COLUMNS)
            marks = ", ".join("?" for _ in _TURN_COLUMNS)
            updates = ", ".join(f"{c} = excluded.{c}" for c in _TURN_COLUMNS[1:])
            conn.execute(
                f"INSERT INTO turns ({cols}) VALUES ({marks}) ON CONFLICT(message_id) DO UPDATE SET {updates}",
                [data.get(c, _TURN_DEFAULTS.get(c)) for c in _TURN_COLUMNS],  # spilled before a migration: defaults
            )
        elif kind == "rate":
            known = conn.execute("SELECT 1 FROM turns WHERE message_id = ?", (data["message_id"],)).fetchone()
            if not known:
                if replay:
                    return None  # nothing to attach it to; dropping beats blocking every later write
                return UnknownMessage(f"no answer with message id {data['message_id']!r} was logged")
            conn.execute(
                "INSERT INTO ratings (message_id, rating, correction, reason, user, updated_at) "
                "VALUES (:message_id, :rating, :correction, :reason, :user, :updated_at) "
                "ON CONFLICT(message_id) DO UPDATE SET rating = excluded.rating, correction = excluded.correction, "
                "reason = excluded.reason, user = excluded.user, updated_at = excluded.updated_at "
                "WHERE excluded.updated_at >= ratings.updated_at",
                data,
            )
        elif kind == "handoff":
            conn.execute(
                "INSERT OR IGNORE INTO handoffs (handoff_id, session_id, message_id, reason, created_at) "
                "VALUES (:handoff_id, :session_id, :message_id, :reason, :created_at)",
                data,
            )
        return None

    def _connect(self) -> None:
        """Open the writer connection, set durability, migrate the schema. Raises sqlite3.Error with the cause."""
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False,
                               timeout=self.settings.busy_timeout_s)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # "file is not a database" shows here
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                    raise sqlite3.OperationalError("could not switch the feedback database to WAL journaling")
            conn.execute("PRAGMA synchronous = FULL")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this program's {SCHEMA_VERSION}")
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated
            for steps in MIGRATIONS[version:]:
                for statement in steps:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _read(self) -> closing[sqlite3.Connection]:
        """A fresh read-only connection (WAL readers never wait for the writer)."""
        if not self.db_path.exists():
            raise FeedbackError(f"Feedback database {self.db_path} does not exist. {self._health or ''}".strip())
        try:
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=self.settings.busy_timeout_s,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise FeedbackError(self._describe(exc)) from exc
        if version != SCHEMA_VERSION:
            conn.close()
            raise FeedbackError(self._health or f"Feedback database {self.db_path} has schema version {version}, "
                                f"expected {SCHEMA_VERSION}.")
        return _ReadConnection(conn, self._describe)

    def _describe(self, exc: BaseException) -> str:
        """Turn an SQLite error into a sentence an operator can act on."""
        text = str(exc)
        low = text.lower()
        where = f"Feedback database {self.db_path}"
        if "locked" in low or "busy" in low:
            return (f"{where} is locked by another program (waited {self.settings.busy_timeout_s:g}s). "
                    "Close whatever holds it (a DB browser, a stuck process).")
        if "readonly" in low or "read-only" in low or "permission" in low:
            return f"{where} is read-only: check the permissions of the file and its folder."
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return (f"{where} is corrupt ({text}). Stop the app, move the file aside (and its -wal/-shm files) "
                    "to keep it for recovery, then restart to create a new one.")
        if "newer than this program" in low:
            return f"{where} was written by a newer version of this program ({text})."
        if "unable to open" in low:
            return f"{where} cannot be opened: does its folder exist and is it writable? ({text})"
        if "full" in low or "disk i/o" in low:
            return f"{where} cannot be written: the disk is full or failing ({text})."
        return f"{where} error: {text}"

    # ---- spill file ---------------------------------------------------------------------------------------------

    def _append_spill(self, ops: list[dict[str, Any]]) -> None:
        if not ops:
            return
        try:
            with open(self.spill_path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(op) + "\n" for op in ops))
                f.flush()
                os.fsync(f.fileno())
            self._spill_ok = True
        except OSError as exc:
            self._spill_ok = False
            self._health = f"{self._health or ''} The spill file {self.spill_path} failed too ({exc}).".strip()

    def _truncate_spill(self) -> None:
        try:
            if self.spill_path.exists():
                self.spill_path.unlink()
            self._spill_ok = True
        except OSError as exc:  # replay is idempotent, so a leftover file only costs a second replay
            self._health = f"Could not remove {self.spill_path} after saving it: {exc}"

    def _load_spill(self) -> None:
        """Writes left over from a run that could not reach the database are replayed first."""
        if not self.spill_path.exists():
            return
        for line in self.spill_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                op = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write was never acknowledged
            self._backlog.append(op)
            if op.get("op") == "turn":
                self._pending[op["message_id"]] = op

    def _check_open(self) -> None:
        if self._closed:
            raise FeedbackError("the feedback store is closed")


class _ReadConnection(closing):
    """closing() that also turns SQLite errors raised inside the block into FeedbackError with a clear message."""

    def __init__(self, conn: sqlite3.Connection, describe):
        super().__init__(conn)
        self._describe = describe

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if exc is not None and isinstance(exc, sqlite3.Error):
            raise FeedbackError(self._describe(exc)) from exc
        return False


# ---- rows, stats and training records ---------------------------------------------------------------------------

def _storable(text: str | None) -> str | None:
    """Text as given, except lone surrogates (which UTF-8, hence SQLite, cannot hold) become U+FFFD."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _turn_row(record: TurnRecord) -> dict[str, Any]:
    """The row to store, checked here so a bad field fails in the caller, not later in the writer thread."""
    row = asdict(record)
    for name in _JSON_COLUMNS:  # ASCII JSON keeps any string, lone surrogates included, exactly
        row[name] = json.dumps(row[name] or [], default=str)
    for name in ("message_id", "session_id", "user_message", "answer", "template", "mode", "model"):
        row[name] = _storable("" if row[name] is None else str(row[name]))
    for name in ("adapter", "handoff", "user"):
        row[name] = None if row[name] is None else _storable(str(row[name]))
    for name in ("first_token_ms", "total_ms"):
        row[name] = None if row[name] is None else float(row[name])
    row["curated"] = int(bool(row["curated"]))
    row["guard"] = json.dumps(row["guard"] or {}, default=str)
    row["guard_replaced"] = int(bool(row["guard_replaced"]))
    row["template_version"] = int(row["template_version"] or 0)
    row["created_at"] = float(row["created_at"] or time.time())
    if not row["message_id"]:
        raise ValueError("TurnRecord.message_id is empty; use new_message_id()")
    return row


def _decode_turn(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row.pop("op", None)
    for name in _JSON_COLUMNS:
        if isinstance(row.get(name), str):
            row[name] = json.loads(row[name])
    row["curated"] = bool(row.get("curated"))
    if isinstance(row.get("guard"), str):
        row["guard"] = json.loads(row["guard"] or "{}")
    row["guard_replaced"] = bool(row.get("guard_replaced"))
    return row


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    rank = (len(values) - 1) * pct / 100  # linear interpolation, as numpy's default
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def _conversation(history: list[dict], user_message: str) -> list[dict]:
    """History + question as alternating user/assistant messages starting with the user (what chat templates
    and LLaMA-Factory accept): other roles are dropped, a leading greeting is dropped, same-role runs merged."""
    messages: list[dict] = []
    for m in [*history, {"role": "user", "content": user_message}]:
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant") or not isinstance(content, str):
            continue
        if not messages and role == "assistant":
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1] = {"role": role, "content": messages[-1]["content"] + "\n\n" + content}
        else:
            messages.append({"role": role, "content": content})
    return messages


def _training_records(fmt: str, row: sqlite3.Row, clean, with_meta: bool) -> list[dict]:
    """The records one rated turn gives in ``fmt`` (none, one, or two for KTO with a correction)."""
    answer, correction, rating = row["answer"], row["correction"], row["rating"]
    distinct_correction = bool(correction) and correction.strip() != answer.strip()
    good = (correction, "correction") if correction else (answer, "answer") if rating == 1 else None
    # (completion text, where it came from, KTO label) for each record this row gives
    if fmt in ("sft", "sharegpt"):
        wanted = [(good[0], good[1], True)] if good else []
    elif fmt == "dpo":
        wanted = [(correction, "correction", True)] if distinct_correction else []
    else:  # kto: thumbs, and a correction is a desirable completion too
        wanted = []
        if rating in (1, -1) and not (rating == 1 and correction):
            wanted.append((answer, "answer", rating == 1))
        if distinct_correction:
            wanted.append((correction, "correction", True))
    if not wanted:
        return []  # redact nothing that is not exported, so the counts describe the file

    history = json.loads(row["history"])
    prompt = [{"role": m["role"], "content": clean(m["content"])} for m in _conversation(history, row["user_message"])]
    meta = None
    if with_meta:
        meta = {
            "message_id": row["message_id"],
            "session_id": row["session_id"],
            "created_at": row["created_at"],
            "user_message": clean(row["user_message"]),
            "retrieved": [{"chunk_id": str(r.get("chunk_id", "")), "score": float(r.get("score") or 0.0)}
                          for r in json.loads(row["retrieved"]) if isinstance(r, dict)],
            "template": row["template"],
            "template_version": row["template_version"],
            "mode": row["mode"],
            "model": row["model"],
            "adapter": row["adapter"],
            "curated": bool(row["curated"]),
            "rating": rating,
            "reason": clean(row["reason"]),
        }

    out: list[dict] = []
    for text, source, label in wanted:
        completion = [{"role": "assistant", "content": clean(text)}]
        if fmt == "sft":
            record: dict[str, Any] = {"messages": prompt + completion}
        elif fmt == "sharegpt":
            system = next((m.get("content", "") for m in json.loads(row["prompt_messages"])
                           if isinstance(m, dict) and m.get("role") == "system"), "")
            turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in prompt]
            record = {"conversations": turns + [{"from": "gpt", "value": completion[0]["content"]}],
                      "system": clean(system)}
        elif fmt == "dpo":
            record = {"prompt": prompt, "chosen": completion, "rejected": [{"role": "assistant", "content": clean(answer)}]}
        else:
            record = {"prompt": prompt, "completion": completion, "label": label}
        if meta is not None:
            record["meta"] = {**meta, "source": source}
        out.append(record)
    return out


def write_jsonl(records: list[dict], path: Path) -> Path:
    """Write records one JSON object a line, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ---- command line: chatapp feedback export|stats|check ----------------------------------------------------------

def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Register ``feedback export|stats|check`` (chatapp/cli.py calls this); each sets ``func(settings, args) -> int``."""
    parser = subparsers.add_parser("feedback", help="feedback log: stats and training-data export")
    parser.add_argument("--db", type=Path, default=None, help="feedback database (default: settings.feedback_db)")
    actions = parser.add_subparsers(dest="feedback_command", required=True)
    export = actions.add_parser("export", help="export rated answers as training data (redacted by default)")
    export.add_argument("--format", dest="fmt", choices=EXPORT_FORMATS, required=True)
    export.add_argument("--since", type=_parse_since, default=None,
                        help="only ratings given on or after this date (YYYY-MM-DD or ISO date-time)")
    export.add_argument("--out", type=Path, default=None, help="JSONL file to write (default: standard output)")
    export.add_argument("--raw", action="store_true", help="do NOT redact personal data (emails, phones, cards...)")
    export.add_argument("--no-meta", dest="meta", action="store_false",
                        help="only the format's own keys (no 'meta' side field with template/chunk ids)")
    export.set_defaults(func=run_export)
    stats = actions.add_parser("stats", help="counts, thumbs-up rate, latency, most down-voted questions")
    stats.add_argument("--since", type=_parse_since, default=None)
    stats.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    stats.set_defaults(func=run_stats)
    check = actions.add_parser("check", help="integrity check, and save feedback left in the spill file")
    check.set_defaults(func=run_check)


def _parse_since(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM)") from None


def _open(settings: Settings, args: argparse.Namespace) -> FeedbackStore:
    return FeedbackStore(args.db or settings.feedback_db, settings.feedback)


def run_export(settings: Settings, args: argparse.Namespace) -> int:
    db = args.db or settings.feedback_db
    if not Path(db).exists():
        print(f"error: no feedback database at {db}", file=sys.stderr)
        return 1
    store = _open(settings, args)
    try:
        records, counts = store.export(args.fmt, since=args.since, redact=not args.raw, meta=args.meta)
    except FeedbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.out:
        write_jsonl(records, args.out)
    else:
        for record in records:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    where = args.out or "standard output"
    print(f"exported {len(records)} {args.fmt} records to {where}", file=sys.stderr)
    if args.raw:
        print("RAW export: personal data was NOT redacted; handle this file accordingly.", file=sys.stderr)
    else:
        summary = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) or "nothing found"
        print(f"redacted: {summary}", file=sys.stderr)
    return 0


def run_stats(settings: Settings, args: argparse.Namespace) -> int:
    store = _open(settings, args)
    try:
        figures = store.stats(args.since.timestamp() if args.since else None)
    except FeedbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.json:
        print(json.dumps(figures, indent=2, ensure_ascii=False))
        return 0
    lat = figures["latency_ms"]
    rate = f"{figures['up_rate']:.0%}" if figures["up_rate"] is not None else "n/a"
    print(f"turns {figures['turns']} in {figures['sessions']} sessions; rated {figures['rated']} "
          f"(up {figures['up']}, down {figures['down']}, thumbs-up rate {rate}); corrections {figures['corrections']}")
    print(f"handoffs requested {figures['handoffs_requested']}, offered {figures['handoffs_offered']}")
    print(f"latency ms: first token p50 {_ms(lat['first_token_p50'])} p95 {_ms(lat['first_token_p95'])}; "
          f"total p50 {_ms(lat['total_p50'])} p95 {_ms(lat['total_p95'])}")
    for g in figures["most_downvoted"]:
        print(f"  down {g['down']:3d} up {g['up']:3d}  {g['question'][:100]!r}")
    if figures["health"]:
        print(f"WARNING: {figures['health']}", file=sys.stderr)
    return 0


def run_check(settings: Settings, args: argparse.Namespace) -> int:
    store = _open(settings, args)
    try:
        store.flush()  # replays the spill file if there is one
        with store._read() as conn:
            result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    except FeedbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print("integrity: " + "; ".join(result))
    return 0 if result == ["ok"] else 1


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    """``python -m chatapp.feedback ...``: the same commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m chatapp.feedback")
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")
    parser.add_argument("--data-dir", type=Path, default=None)
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    settings = Settings.load(args.config, data_dir=args.data_dir)
    return args.func(settings, args)


if __name__ == "__main__":
    sys.exit(main())
