"""Feedback log: every answer with what produced it, user ratings and corrections, and training-data export.

Why it is built this way:
- One database (chatapp/storage: SQLite with WAL and synchronous=FULL by default, or a shared Postgres), so a
  rating the user saw acknowledged survives a crash or power cut and every replica sees it.
- One writer thread owns all writes: `log_turn` only enqueues (streaming never waits on disk), concurrent raters
  are group-committed in one transaction (20 sessions at once cost one fsync, not 20), and the database never sees
  two writers of ours fighting for the lock.
- If the database cannot be written (locked, read-only, corrupt, unreachable, disk full), writes go to an fsynced
  spill file and are replayed when it works again; `health()` says what is wrong, in words the UI can show.
- Export writes the dataset formats TRL and LLaMA-Factory read as they are (chatapp/feedback_export.py), with
  personal data redacted by default; the command line is chatapp/feedback_cli.py.
"""
from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from chatapp.config import FeedbackSettings, Settings
from chatapp.feedback_export import EXPORT_FORMATS, training_records, write_jsonl
from chatapp.feedback_stats import dashboard_figures, unanswered_turns
from chatapp.redact import Redactor
from chatapp.storage import (
    DB_ERRORS,
    MIGRATIONS,
    SCHEMA_VERSION,
    Database,
    StorageError,
    check_version,
    describe_error,
    migrate,
    open_database,
    schema_version,
)
from chatapp.storage.schema import handoffs, ratings, turns

log = logging.getLogger(__name__)
__all__ = ["EXPORT_FORMATS", "MIGRATIONS", "SCHEMA_VERSION", "FeedbackError", "FeedbackStore", "FeedbackUnavailable",
           "TurnRecord", "UnknownMessage", "new_message_id", "write_jsonl"]
_TURN_COLUMNS = [c.name for c in turns.columns]
_JSON_COLUMNS = ("history", "prompt_messages", "retrieved", "evidence")
_TURN_DEFAULTS = {"evidence": "[]", "guard": "{}", "guard_replaced": 0}
_RATING_COLUMNS = ("message_id", "rating", "correction", "reason", "user", "updated_at")
_HANDOFF_COLUMNS = ("handoff_id", "session_id", "message_id", "reason", "created_at")
# A problem with one op's data (not with the database): it is reported for that op, the batch still commits.
_DATA_ERRORS = (sa_exc.IntegrityError, sa_exc.DataError, KeyError, TypeError, ValueError)


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
    """The feedback log. Thread-safe; one instance per process and database.

    ``target`` is an SQLite file path (the spill file goes next to it) or a database URL; a Postgres URL needs a
    local ``spill_path`` (`FeedbackStore.open(settings)` picks one in the data directory).
    """

    def __init__(self, target: Path | str, settings: FeedbackSettings | None = None, spill_path: Path | None = None):
        self.settings = settings or FeedbackSettings()
        try:
            self._db: Database = open_database(target, self.settings.busy_timeout_s, pool_size=2)
        except StorageError as exc:
            raise FeedbackError(str(exc)) from None
        self.db_path: Path | None = self._db.path  # None on Postgres
        self._statements = _write_statements(self._db)
        if spill_path is None:
            if self.db_path is None:
                raise FeedbackError("a Postgres feedback store needs a local spill_path for writes it cannot save yet")
            spill_path = self.db_path.with_name(self.db_path.name + ".spill.jsonl")
        self.spill_path = Path(spill_path)
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, Any]] = {}  # message_id -> turn row not yet in the database
        self._backlog: list[dict[str, Any]] = []  # ops that failed to commit, in order (mirrored in the spill file)
        self._spill_ok = True
        self._health: str | None = None
        self._ready = False  # connected and migrated
        self._conn: Connection | None = None  # the writer's own connection (a pool checkout per batch cost ~1 ms)
        self._schema_seen = False  # Postgres: the schema was current once (it never goes back)
        self._closed = False
        self._load_spill()
        try:
            self._connect()
        except (*DB_ERRORS, StorageError) as exc:
            self._health = self._describe(exc)
        self._writer = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._writer.start()
        if self._backlog:
            self._queue.put(_Op("barrier", {}))  # replay the spill file now, not at the first new write
        ref = weakref.ref(self)
        atexit.register(lambda: (store := ref()) is not None and store.close())

    @classmethod
    def open(cls, settings: Settings) -> "FeedbackStore":
        """The app's store: ``settings.database_url`` (Postgres or SQLite), else the data directory's SQLite file."""
        spill = None if not settings.database_url else settings.data_dir / "feedback.spill.jsonl"
        return cls(settings.database, settings.feedback, spill_path=spill)

    @property
    def where(self) -> str:
        """The database as messages name it (a file, or a URL without its password)."""
        return self._db.where

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
        self._submit(_Op("rate", {"message_id": message_id, "rating": rating, "correction": correction,
                                  "reason": reason or None, "user": user, "updated_at": time.time()}))

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
        if self._conn is not None and not self._writer.is_alive():
            self._conn.close()
            self._conn = None
        self._db.dispose()

    # ---- reads --------------------------------------------------------------------------------------------------

    def turn(self, message_id: str) -> dict | None:
        """One turn with its current rating, or None. Includes turns still queued for writing."""
        with self._lock:
            pending = self._pending.get(message_id)
        if pending is not None:
            return {**_decode_turn(pending), "rating": None, "correction": None, "reason": None, "rated_by": None}
        query = (sa.select(turns, ratings.c.rating, ratings.c.correction, ratings.c.reason,
                           ratings.c.user.label("rated_by"), ratings.c.updated_at.label("rated_at"))
                 .select_from(turns.outerjoin(ratings, ratings.c.message_id == turns.c.message_id))
                 .where(turns.c.message_id == message_id))
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        return _decode_turn(dict(row)) if row else None

    def corrections(self, since: float | None = None) -> list[dict]:
        """Current corrections (question, corrected answer): what the example bank reads, on every replica."""
        query = (sa.select(turns.c.message_id, turns.c.user_message.label("question"), ratings.c.correction,
                           turns.c.answer, turns.c.history, turns.c.template, ratings.c.updated_at)
                 .select_from(ratings.join(turns, ratings.c.message_id == turns.c.message_id))
                 .where(ratings.c.correction.is_not(None), ratings.c.updated_at >= (since or 0.0))
                 .order_by(ratings.c.updated_at))
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        return [{**dict(r), "history": json.loads(r["history"])} for r in rows]

    def stats(self, since: float | None = None) -> dict:
        """Figures for the dashboard, over turns created at or after ``since`` (epoch seconds; None = all)."""
        with self._read() as conn:
            figures = dashboard_figures(conn, since or 0.0)
        return {**figures, "unsaved": len(self._backlog), "health": self.health()}

    def unanswered(self, since: float | None = None, limit: int = 5000) -> list[dict]:
        """Turns the bot did not answer well, newest first (chatapp/gaps.py groups them into topics)."""
        with self._read() as conn:
            return unanswered_turns(conn, since or 0.0, limit)

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
        t, r = turns, ratings
        wanted = {"dpo": r.c.correction.is_not(None),
                  "kto": sa.or_(r.c.rating != 0, r.c.correction.is_not(None))}.get(
            fmt, sa.or_(r.c.rating == 1, r.c.correction.is_not(None)))
        columns = [t.c[name] for name in ("message_id", "session_id", "created_at", "user_message", "answer",
                                          "history", "retrieved", "template", "template_version", "mode", "model",
                                          "adapter", "curated")]
        if fmt == "sharegpt":
            columns.append(t.c.prompt_messages)
        query = (sa.select(*columns, r.c.rating, r.c.correction, r.c.reason)
                 .select_from(r.join(t, r.c.message_id == t.c.message_id))
                 .where(r.c.updated_at >= since_ts, wanted).order_by(r.c.updated_at))  # the index, no sort
        with self._read() as conn:
            for row in conn.execution_options(yield_per=2000).execute(query).mappings():
                records.extend(training_records(fmt, row, clean, meta))

    def check(self) -> list[str]:
        """The database's own integrity check (SQLite); on Postgres, that every table answers. ["ok"] when fine."""
        self.flush()  # replays the spill file if there is one
        with self._read() as conn:
            if self._db.is_sqlite:
                return [row[0] for row in conn.exec_driver_sql("PRAGMA integrity_check")]
            for table in (turns, ratings, handoffs):
                conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
        return ["ok"]

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
            if not self._ready or self._conn is None:
                self._connect()
            conn = self._conn
            assert conn is not None
            with conn.begin():  # SQLite: BEGIN IMMEDIATE
                for data in self._backlog:
                    if error := self._apply(conn, data["op"], data, replay=True):
                        log.error("dropped an unstorable spilled write: %s", error)
                for op in ops:
                    op.error = self._apply(conn, op.kind, op.data, replay=False)
                    if op.error is not None and op.done is None:  # nobody waits for it: at least say so
                        log.error("dropped an unstorable %s: %s", op.kind, op.error)
        except (*DB_ERRORS, StorageError) as exc:
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
        self._ready = False
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception:  # pragma: no cover - closing a broken connection
            pass
        self._conn = None
        try:
            self._db.dispose()  # the next try opens the file (maybe a new one) or the server afresh
        except Exception:  # pragma: no cover - closing a broken connection
            pass
        kept = [{"op": op.kind, **op.data} for op in ops]
        self._backlog.extend(kept)
        self._append_spill(kept)
        where = f"kept in {self.spill_path}" if self._spill_ok else "kept in memory only (the spill file failed)"
        for op in ops:
            op.error = FeedbackUnavailable(f"{problem} Your feedback is {where} and will be saved when it works again.")

    def _apply(self, conn: Connection, kind: str, data: dict[str, Any], replay: bool) -> BaseException | None:
        """Write one op. A problem with this op's data is returned (only that op is rolled back: SQLite undoes the
        statement, Postgres its savepoint), so one bad record can neither fail its whole batch nor block the spill
        replay forever; database trouble raises."""
        try:
            with self._db.savepoint(conn):
                return self._write(conn, kind, data, replay)
        except _DATA_ERRORS as exc:
            return FeedbackError(f"could not store this {kind}: {type(exc).__name__}: {exc}")
        except sa_exc.StatementError as exc:
            if isinstance(exc, sa_exc.DBAPIError):
                raise
            return FeedbackError(f"could not store this {kind}: {exc}")  # a value the driver cannot send

    def _write(self, conn: Connection, kind: str, data: dict[str, Any], replay: bool) -> BaseException | None:
        stmts = self._statements
        if kind == "turn":
            conn.execute(stmts["turn"], {c: data.get(c, _TURN_DEFAULTS.get(c)) for c in _TURN_COLUMNS})  # spilled
            # before a migration: defaults
        elif kind == "rate":
            if conn.execute(stmts["known"], {"mid": data["message_id"]}).first() is None:
                if replay:
                    return None  # nothing to attach it to; dropping beats blocking every later write
                return UnknownMessage(f"no answer with message id {data['message_id']!r} was logged")
            conn.execute(stmts["rate"], {c: data[c] for c in _RATING_COLUMNS})
        elif kind == "handoff":
            conn.execute(stmts["handoff"], {c: data[c] for c in _HANDOFF_COLUMNS})
        return None

    def _connect(self) -> None:
        """Migrate, then open the writer's connection (chatapp/storage sets the durability settings on it)."""
        migrate(self._db)
        self._conn = self._db.engine.connect()
        self._ready = True

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read connection (SQLite: read-only, and WAL readers never wait for the writer); database errors
        inside the block become FeedbackError with a clear message."""
        if self.db_path is not None and not self.db_path.exists():
            raise FeedbackError(f"Feedback database {self.db_path} does not exist. {self._health or ''}".strip())
        try:
            with self._db.reader.connect() as conn:
                if not self._schema_seen:
                    version = schema_version(conn)
                    if version != SCHEMA_VERSION:
                        check_version(version)
                        raise FeedbackError(self._health or f"Feedback database {self.where} has schema version "
                                            f"{version}, expected {SCHEMA_VERSION}.")
                    self._schema_seen = not self._db.is_sqlite  # an SQLite file can be swapped under us
                yield conn
        except (*DB_ERRORS, StorageError) as exc:
            raise FeedbackError(self._describe(exc)) from exc

    def _describe(self, exc: BaseException) -> str:
        """Turn a database error into a sentence an operator can act on."""
        return describe_error(exc, self.where, self.settings.busy_timeout_s, "Feedback database")

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


def _write_statements(db: Database) -> dict[str, Any]:
    """The writer's statements, built once: building SQLAlchemy statements per write cost ~3 ms each (10x the
    commit), while a prebuilt one is compiled once and reused from the cache."""
    turn = db.insert(turns)
    turn = turn.on_conflict_do_update(index_elements=[turns.c.message_id], set_={
        c: turn.excluded[c] for c in _TURN_COLUMNS if c != "message_id"})
    rate = db.insert(ratings)
    rate = rate.on_conflict_do_update(
        index_elements=[ratings.c.message_id], set_={c: rate.excluded[c] for c in _RATING_COLUMNS[1:]},
        where=rate.excluded.updated_at >= ratings.c.updated_at)
    return {
        "turn": turn,
        "rate": rate,
        "known": sa.select(sa.literal(1)).select_from(turns).where(turns.c.message_id == sa.bindparam("mid")),
        "handoff": db.insert(handoffs).on_conflict_do_nothing(index_elements=[handoffs.c.handoff_id]),
    }


# ---- rows ------------------------------------------------------------------------------------------------------

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


def main(argv: list[str] | None = None) -> int:
    """``python -m chatapp.feedback ...``: the feedback commands without the rest of the CLI (chatapp/feedback_cli.py)."""
    from chatapp.feedback_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
