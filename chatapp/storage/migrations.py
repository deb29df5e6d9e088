"""Versioned schema migrations, run on both engines. Each entry moves the schema one version up; never edit a
shipped entry, append a new one (an entry describes the tables as they were then, so it is a snapshot, not the
current `schema.py`).

The version lives where each engine keeps it: SQLite's ``PRAGMA user_version`` (so databases written by the
sqlite3 code before this layer migrate in place, and an older program refuses a newer file), Postgres's
``chatapp_schema`` table. Migrating holds the database's write lock (SQLite BEGIN IMMEDIATE, a Postgres advisory
lock), so replicas starting together migrate once; Postgres DDL is transactional, so a failed step leaves nothing.
"""
from __future__ import annotations

from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from chatapp.storage.engine import Database, StorageError

_LOCK_KEY = 0x63686174  # "chat": the advisory lock replicas take while migrating


def _add_column(conn: Connection, table: str, column: sa.Column) -> None:
    """ALTER TABLE ... ADD COLUMN, with the column spelled in the connection's dialect."""
    sa.Table(table, sa.MetaData(), column)  # a column is compiled as part of a table
    spec = conn.dialect.ddl_compiler(conn.dialect, None).get_column_specification(column)
    conn.exec_driver_sql(f"ALTER TABLE {conn.dialect.identifier_preparer.quote(table)} ADD COLUMN {spec}")


def _v1_feedback(conn: Connection) -> None:
    md = sa.MetaData()
    t = sa.Table(
        "turns", md,
        sa.Column("message_id", sa.Text, primary_key=True),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("user_message", sa.Text, nullable=False),
        sa.Column("answer", sa.Text, nullable=False),
        *(sa.Column(c, sa.Text, nullable=False, server_default="[]") for c in ("history", "prompt_messages",
                                                                              "retrieved")),
        sa.Column("template", sa.Text, nullable=False, server_default=""),
        sa.Column("template_version", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("mode", sa.Text, nullable=False, server_default=""),
        sa.Column("model", sa.Text, nullable=False, server_default=""),
        sa.Column("adapter", sa.Text),
        sa.Column("first_token_ms", sa.Double),
        sa.Column("total_ms", sa.Double),
        sa.Column("handoff", sa.Text),
        sa.Column("curated", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("user", sa.Text),
    )
    sa.Index("turns_created_at", t.c.created_at)
    sa.Index("turns_session", t.c.session_id)
    # The current rating of a message; a later rate() replaces it (guarded by updated_at so replays are safe).
    r = sa.Table(
        "ratings", md,
        sa.Column("message_id", sa.Text, primary_key=True),
        sa.Column("rating", sa.Integer, sa.CheckConstraint("rating IN (-1, 0, 1)"), nullable=False),
        sa.Column("correction", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("user", sa.Text),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    sa.Index("ratings_updated_at", r.c.updated_at)
    h = sa.Table(
        "handoffs", md,
        sa.Column("handoff_id", sa.Text, primary_key=True),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    sa.Index("handoffs_created_at", h.c.created_at)
    md.create_all(conn, checkfirst=False)


def _v2_guard(conn: Connection) -> None:
    """The faithfulness guard's verdict per answer (chatapp/guard.py): what it checked, whether it replaced it."""
    _add_column(conn, "turns", sa.Column("evidence", sa.Text, nullable=False, server_default="[]"))
    _add_column(conn, "turns", sa.Column("guard", sa.Text, nullable=False, server_default="{}"))
    _add_column(conn, "turns", sa.Column("guard_replaced", sa.Integer, nullable=False, server_default=sa.text("0")))


def _v3_inbox(conn: Connection) -> None:
    """Conversations a person can take over (chatapp/inbox.py): state, claim, every message of the transcript."""
    md = sa.MetaData()
    c = sa.Table(
        "conversations", md,
        sa.Column("conversation_id", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, sa.CheckConstraint("state IN ('bot', 'waiting', 'with_agent', 'resolved')"),
                  nullable=False, server_default="bot"),
        sa.Column("reason", sa.Text),
        sa.Column("language", sa.Text, nullable=False, server_default="en"),
        sa.Column("agent", sa.Text),
        sa.Column("agent_name", sa.Text),
        sa.Column("user", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        *(sa.Column(n, sa.Double) for n in ("waiting_since", "first_human_at", "handed_at", "closed_at")),
        sa.Column("note", sa.Text),
        sa.Column("csat", sa.Integer),
        sa.Column("contact", sa.Text),
    )
    sa.Index("conversations_state", c.c.state, c.c.waiting_since)
    sa.Index("conversations_created_at", c.c.created_at)
    m = sa.Table(
        "conversation_messages", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("conversation_id", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("author", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("meta", sa.Text, nullable=False, server_default="{}"),
        sqlite_autoincrement=True,
    )
    sa.Index("conversation_messages_conv", m.c.conversation_id, m.c.id)
    md.create_all(conn, checkfirst=False)


def _v4_shared_state(conn: Connection) -> None:
    """What replicas must agree on: agents signed in, small shared values (adapter registry), leases (re-tune)."""
    md = sa.MetaData()
    sa.Table("agent_presence", md, sa.Column("agent", sa.Text, primary_key=True),
             sa.Column("seen_at", sa.Double, nullable=False))
    sa.Table("app_state", md, sa.Column("key", sa.Text, primary_key=True),
             sa.Column("value", sa.Text, nullable=False), sa.Column("updated_at", sa.Double, nullable=False))
    sa.Table("locks", md, sa.Column("name", sa.Text, primary_key=True), sa.Column("owner", sa.Text, nullable=False),
             sa.Column("expires_at", sa.Double, nullable=False))
    md.create_all(conn, checkfirst=False)


def _v5_example_banks(conn: Connection) -> None:
    """Example banks as edited or extended at run time (corrections, agent replies): every replica renders with them."""
    md = sa.MetaData()
    sa.Table("example_banks", md, sa.Column("bank", sa.Text, primary_key=True),
             sa.Column("text", sa.Text, nullable=False), sa.Column("revision", sa.Text, nullable=False),
             sa.Column("updated_at", sa.Double, nullable=False))
    md.create_all(conn, checkfirst=False)


def _v6_chunk_embeddings(conn: Connection) -> None:
    """Knowledge chunk vectors by embedding settings and text hash (chatapp/shared_index.py): replicas embed once."""
    md = sa.MetaData()
    sa.Table("chunk_embeddings", md, sa.Column("key", sa.Text, primary_key=True),
             sa.Column("digest", sa.Text, primary_key=True), sa.Column("n_views", sa.Integer, nullable=False),
             sa.Column("vectors", sa.LargeBinary, nullable=False), sa.Column("created_at", sa.Double, nullable=False))
    md.create_all(conn, checkfirst=False)


def _v7_prompt_versions(conn: Connection) -> None:
    """Saved prompt template versions, so every replica renders and edits the same ones (they were files)."""
    md = sa.MetaData()
    sa.Table("prompt_versions", md, sa.Column("name", sa.Text, primary_key=True),
             sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
             sa.Column("text", sa.Text, nullable=False),
             sa.Column("message", sa.Text, nullable=False, server_default=""),
             sa.Column("base_version", sa.Integer), sa.Column("author", sa.Text),
             sa.Column("created_at", sa.Double, nullable=False))
    md.create_all(conn, checkfirst=False)


def _v8_knowledge_documents(conn: Connection) -> None:
    """The knowledge folder's files in the database (chatapp/shared_knowledge.py): replicas need no shared mount."""
    md = sa.MetaData()
    sa.Table("knowledge_documents", md, sa.Column("path", sa.Text, primary_key=True),
             sa.Column("text", sa.Text, nullable=False), sa.Column("sha256", sa.Text, nullable=False),
             sa.Column("updated_at", sa.Double, nullable=False), sa.Column("updated_by", sa.Text),
             sa.Column("deleted", sa.Integer, nullable=False, server_default=sa.text("0")))
    md.create_all(conn, checkfirst=False)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1_feedback, _v2_guard, _v3_inbox, _v4_shared_state,
                                                   _v5_example_banks, _v6_chunk_embeddings, _v7_prompt_versions,
                                                   _v8_knowledge_documents]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: Connection) -> int:
    """The version the database is at (0 = empty)."""
    if conn.dialect.name == "sqlite":
        return int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())
    if conn.execute(sa.text("SELECT to_regclass('chatapp_schema')")).scalar() is None:
        return 0
    return int(conn.execute(sa.text("SELECT coalesce(max(version), 0) FROM chatapp_schema")).scalar_one())


def _set_version(conn: Connection, version: int) -> None:
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(f"PRAGMA user_version = {int(version)}")
        return
    conn.execute(sa.text("CREATE TABLE IF NOT EXISTS chatapp_schema (version INTEGER NOT NULL)"))
    conn.execute(sa.text("DELETE FROM chatapp_schema"))
    conn.execute(sa.text("INSERT INTO chatapp_schema (version) VALUES (:v)"), {"v": int(version)})


def check_version(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StorageError(f"schema version {version} is newer than this program's {SCHEMA_VERSION}")


def migrate(db: Database) -> int:
    """Bring the database to SCHEMA_VERSION (once, whoever starts first); refuse one newer than this program.
    Returns the version it was at."""
    with db.engine.connect() as conn:
        if db.is_sqlite:  # read without BEGIN IMMEDIATE: an up-to-date database needs no write lock
            found = int(conn.connection.driver_connection.execute("PRAGMA user_version").fetchone()[0])
        else:
            found = schema_version(conn)
            conn.rollback()
    check_version(found)
    if found == SCHEMA_VERSION:
        return found
    if db.is_sqlite:
        with db.engine.begin() as conn:  # BEGIN IMMEDIATE: one migrating process at a time
            _run_steps(conn)
        return found
    with db.engine.connect() as conn:
        # The lock is taken before the migrating transaction starts (not inside it): a transaction that starts after
        # another replica's migration committed sees its tables in the catalog; one already open may not.
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
        conn.commit()
        try:
            with conn.begin():
                _run_steps(conn)
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
            conn.commit()
    return found


def _run_steps(conn: Connection) -> None:
    version = schema_version(conn)  # another process may have migrated meanwhile
    check_version(version)
    for step in MIGRATIONS[version:]:
        step(conn)
    if version != SCHEMA_VERSION:
        _set_version(conn, SCHEMA_VERSION)
