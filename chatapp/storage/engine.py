"""Engines for the one database every part of the app shares: SQLite in the data directory by default, Postgres
(psycopg 3) when several replicas share one.

Why it is built this way:
- SQLite keeps the feedback log's durability settings on every connection (WAL, synchronous=FULL, a busy timeout),
  and write transactions start with BEGIN IMMEDIATE so a read-then-write (a claim, a rating of a known turn) holds
  the write lock from its first statement, as the sqlite3 code before it did.
- A second, read-only SQLite engine serves reads: WAL readers never wait for the writer, and a read-only file can
  still be read while writes are refused.
- Postgres gets ``lock_timeout`` = the busy timeout, so a locked table fails a write after the same wait instead of
  hanging the writer thread.
- Errors come back as sentences an operator can act on (`describe_error`), on both engines.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import NullPool, QueuePool

try:  # the Postgres driver; SQLite needs nothing
    import psycopg
    _DRIVER_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, psycopg.Error)
except ImportError:  # pragma: no cover - psycopg is a dependency
    _DRIVER_ERRORS = (sqlite3.Error,)

# Everything a database call can raise that is about the database (not a bug): catch these, describe, spill.
DB_ERRORS: tuple[type[BaseException], ...] = (sa_exc.SQLAlchemyError, OSError, *_DRIVER_ERRORS)


class StorageError(RuntimeError):
    """A database URL or database that cannot be used; the message says why."""


def resolve_url(target: str | Path) -> URL:
    """A database URL from a URL string or an SQLite file path. Only SQLite files and Postgres are supported."""
    if isinstance(target, Path) or "://" not in str(target):
        return URL.create("sqlite", database=str(Path(target).expanduser()))
    try:
        url = make_url(str(target))
    except sa_exc.ArgumentError as exc:
        raise StorageError(f"database URL {target!r} is not a URL: {exc}") from None
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise StorageError("an SQLite database URL needs a file: sqlite:////path/to/feedback.sqlite3")
        return url
    if url.get_backend_name() == "postgresql":
        if not url.database:
            raise StorageError(f"database URL {safe_url(url)} names no database (postgresql+psycopg://HOST/DBNAME)")
        return url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver installed
    raise StorageError(f"database URL {safe_url(url)}: only sqlite:///FILE and postgresql+psycopg://... are supported")


def safe_url(url: URL | str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(str(url)).render_as_string(hide_password=True) if isinstance(url, str) else \
            url.render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return "<invalid URL>"


@dataclass
class Database:
    """One database: ``engine`` for writes (and reads on Postgres), ``reader`` for reads (read-only on SQLite)."""

    url: URL
    engine: Engine
    reader: Engine
    busy_timeout_s: float

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name  # "sqlite" | "postgresql"

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def path(self) -> Path | None:
        """The SQLite file, or None on Postgres."""
        return Path(self.url.database) if self.is_sqlite and self.url.database else None

    @property
    def where(self) -> str:
        """How messages name this database: the file, or the URL without its password."""
        return str(self.path) if self.is_sqlite else safe_url(self.url)

    def dispose(self) -> None:
        """Close pooled connections (after a failure, so the next try opens the file or server afresh)."""
        self.engine.dispose()
        self.reader.dispose()

    def insert(self, table: sa.Table):
        """The dialect's INSERT with ON CONFLICT support (both engines have the same API for it)."""
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    def savepoint(self, conn: Connection):
        """A savepoint around one statement group on Postgres (an error there aborts the whole transaction; SQLite
        rolls back only the failing statement), a no-op context on SQLite."""
        from contextlib import nullcontext

        return conn.begin_nested() if not self.is_sqlite else nullcontext()


def open_database(target: str | Path, busy_timeout_s: float = 5.0, pool_size: int = 5,
                  pooled_reads: bool = False) -> Database:
    """Engines for ``target`` (a URL or an SQLite path). Nothing is connected yet: errors show at first use.
    ``pooled_reads`` keeps SQLite read connections open (a read per answer, as the adapter registry does); without
    it each read opens the file afresh, which the feedback store needs to notice a file moved aside."""
    url = resolve_url(target)
    if url.get_backend_name() == "sqlite":
        path = Path(url.database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url.set(database=str(path)), connect_args={
            "timeout": busy_timeout_s, "check_same_thread": False, "isolation_level": None},
            pool_size=pool_size, max_overflow=20)
        _sqlite_writer_events(engine, busy_timeout_s)

        def read_only() -> sqlite3.Connection:
            conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=busy_timeout_s,
                                   check_same_thread=False, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            return conn

        # A fresh read connection per read, as before: a read-only connection must not outlive a file that is moved
        # aside (the corrupt-file recovery), and opening SQLite costs microseconds.
        reader = sa.create_engine("sqlite://", creator=read_only, poolclass=QueuePool, pool_size=pool_size,
                                  max_overflow=20) \
            if pooled_reads else sa.create_engine("sqlite://", creator=read_only, poolclass=NullPool)
        _sqlite_reader_events(reader)
        return Database(url.set(database=str(path)), engine, reader, busy_timeout_s)
    engine = sa.create_engine(url, pool_size=pool_size, max_overflow=20, pool_pre_ping=True, connect_args={
        "connect_timeout": max(1, int(busy_timeout_s) + 1),
        "options": f"-c lock_timeout={int(busy_timeout_s * 1000)}"})
    return Database(url, engine, engine, busy_timeout_s)


def _sqlite_writer_events(engine: Engine, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def durable(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # "file is not a database" shows here
        mode = dbapi_conn.execute("PRAGMA journal_mode").fetchone()[0].lower()
        if mode != "wal" and dbapi_conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise sqlite3.OperationalError("could not switch the database to WAL journaling")
        dbapi_conn.execute("PRAGMA synchronous = FULL")  # an acknowledged write survives a power cut
        dbapi_conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")

    @event.listens_for(engine, "begin")
    def immediate(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_reader_events(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def deferred(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")  # one snapshot for all statements of a read


def root_cause(exc: BaseException) -> BaseException:
    """The driver's own error inside SQLAlchemy's wrapper (its text is what says locked/corrupt/read-only)."""
    return getattr(exc, "orig", None) or exc


def describe_error(exc: BaseException, where: str, busy_timeout_s: float, what: str = "Database") -> str:
    """An error from either engine as a sentence an operator can act on."""
    cause = root_cause(exc)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    low = str(cause).lower()
    place = f"{what} {where}"
    if "lock timeout" in low or "locked" in low or "busy" in low:
        return (f"{place} is locked by another program (waited {busy_timeout_s:g}s). "
                "Close whatever holds it (a DB browser, a stuck process, a long transaction).")
    if "readonly" in low or "read-only" in low or "permission denied" in low:
        return (f"{place} is read-only: check the permissions of the file and its folder, or the database user's "
                f"grants ({text}).")
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        return (f"{place} is corrupt ({text}). Stop the app, move the file aside (and its -wal/-shm files) "
                "to keep it for recovery, then restart to create a new one.")
    if "newer than this program" in low:
        return f"{place} was written by a newer version of this program ({text})."
    if "unable to open" in low:
        return f"{place} cannot be opened: does its folder exist and is it writable? ({text})"
    if "does not exist" in low and "database" in low:  # before "connection failed", which psycopg's text also says
        return f"{place} does not exist on the server: create it (createdb) or fix the URL ({text})."
    if "connection refused" in low or "could not connect" in low or "connection failed" in low \
            or "server closed the connection" in low or "terminating connection" in low or "timeout expired" in low:
        return f"{place} cannot be reached: is the database server running? ({text})"
    if "password authentication failed" in low:
        return f"{place} refused the login: check the user and password in the database URL."
    if "full" in low or "disk i/o" in low:
        return f"{place} cannot be written: the disk is full or failing ({text})."
    return f"{place} error: {text}"
