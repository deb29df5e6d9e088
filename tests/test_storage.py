"""The storage layer on both engines: URLs, durability settings, versioned migrations (an SQLite file written by the
sqlite3 code before this layer migrates in place), text that Postgres cannot hold as-is, replicas migrating together."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa

from chatapp.storage import SCHEMA_VERSION, StorageError, migrate, open_database, resolve_url, schema_version
from chatapp.storage import schema as t

REPO = Path(__file__).resolve().parent.parent

# The schema exactly as chatapp/feedback.py created it with sqlite3 before the storage layer (PRAGMA user_version 1..3).
OLD_SQLITE_MIGRATIONS = [
    ["""CREATE TABLE turns (message_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, created_at REAL NOT NULL,
        user_message TEXT NOT NULL, answer TEXT NOT NULL, history TEXT NOT NULL DEFAULT '[]',
        prompt_messages TEXT NOT NULL DEFAULT '[]', retrieved TEXT NOT NULL DEFAULT '[]',
        template TEXT NOT NULL DEFAULT '', template_version INTEGER NOT NULL DEFAULT 0, mode TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '', adapter TEXT, first_token_ms REAL, total_ms REAL, handoff TEXT,
        curated INTEGER NOT NULL DEFAULT 0, user TEXT)""",
     "CREATE INDEX turns_created_at ON turns(created_at)",
     "CREATE INDEX turns_session ON turns(session_id)",
     """CREATE TABLE ratings (message_id TEXT PRIMARY KEY, rating INTEGER NOT NULL CHECK (rating IN (-1, 0, 1)),
        correction TEXT, reason TEXT, user TEXT, updated_at REAL NOT NULL)""",
     "CREATE INDEX ratings_updated_at ON ratings(updated_at)",
     """CREATE TABLE handoffs (handoff_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, message_id TEXT,
        reason TEXT NOT NULL, created_at REAL NOT NULL)""",
     "CREATE INDEX handoffs_created_at ON handoffs(created_at)"],
    ["ALTER TABLE turns ADD COLUMN evidence TEXT NOT NULL DEFAULT '[]'",
     "ALTER TABLE turns ADD COLUMN guard TEXT NOT NULL DEFAULT '{}'",
     "ALTER TABLE turns ADD COLUMN guard_replaced INTEGER NOT NULL DEFAULT 0"],
    ["""CREATE TABLE conversations (conversation_id TEXT PRIMARY KEY, state TEXT NOT NULL DEFAULT 'bot'
        CHECK (state IN ('bot', 'waiting', 'with_agent', 'resolved')), reason TEXT, language TEXT NOT NULL DEFAULT 'en',
        agent TEXT, agent_name TEXT, user TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
        waiting_since REAL, first_human_at REAL, handed_at REAL, closed_at REAL, note TEXT, csat INTEGER, contact TEXT)""",
     "CREATE INDEX conversations_state ON conversations(state, waiting_since)",
     "CREATE INDEX conversations_created_at ON conversations(created_at)",
     """CREATE TABLE conversation_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL,
        role TEXT NOT NULL, text TEXT NOT NULL, author TEXT, created_at REAL NOT NULL, meta TEXT NOT NULL DEFAULT '{}')""",
     "CREATE INDEX conversation_messages_conv ON conversation_messages(conversation_id, id)"],
]


def old_sqlite_db(path: Path, version: int) -> None:
    """An SQLite file as the old code left it at ``version``, with a rated turn (and a conversation from v3)."""
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for steps in OLD_SQLITE_MIGRATIONS[:version]:
            for statement in steps:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("INSERT INTO turns (message_id, session_id, created_at, user_message, answer, history, user) "
                     "VALUES ('m1', 's1', 1700000000.5, 'Where is my parcel?', 'It ships tomorrow.', "
                     "'[{\"role\": \"user\", \"content\": \"hi\"}]', 'ann')")
        conn.execute("INSERT INTO ratings VALUES ('m1', -1, 'Parcels ship within 2 days.', 'wrong', 'ann', 1700000001)")
        if version >= 3:
            conn.execute("INSERT INTO conversations (conversation_id, state, created_at, updated_at, waiting_since) "
                         "VALUES ('c1', 'waiting', 1700000000, 1700000000, 1700000002)")
            conn.execute("INSERT INTO conversation_messages (conversation_id, role, text, created_at, meta) "
                         "VALUES ('c1', 'customer', 'a person please', 1700000002, '{}')")
    conn.close()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_sqlite_file_from_the_old_code_migrates_in_place(tmp_path, version):
    from chatapp.feedback import FeedbackStore
    from chatapp.inbox import Inbox

    db = tmp_path / "feedback.sqlite3"
    old_sqlite_db(db, version)
    store = FeedbackStore(db)
    try:
        store.flush()
        assert store.health() is None
        got = store.turn("m1")
        assert got["correction"] == "Parcels ship within 2 days." and got["history"] == [{"role": "user", "content": "hi"}]
        assert got["evidence"] == [] and got["guard"] == {} and got["guard_replaced"] is False  # v2 defaults
        assert [c["question"] for c in store.corrections()] == ["Where is my parcel?"]
    finally:
        store.close()
    inbox = Inbox(db)
    try:
        if version >= 3:
            assert [c.conversation_id for c in inbox.open_conversations()] == ["c1"]
            assert inbox.messages("c1")[0].text == "a person please"
        message = inbox.add(inbox.ensure("c2").conversation_id, "customer", "hello")
        assert message.id >= 1
    finally:
        inbox.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_connections_carry_the_durability_settings(tmp_path):
    db = open_database(tmp_path / "x.sqlite3", busy_timeout_s=2.5)
    migrate(db)
    with db.engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert raw.execute("PRAGMA busy_timeout").fetchone()[0] == 2500
    with db.reader.connect() as conn:  # reads go through a read-only connection
        with pytest.raises(sa.exc.OperationalError, match="readonly"):
            conn.execute(sa.insert(t.locks).values(name="x", owner="y", expires_at=0))
    db.dispose()


@pytest.mark.postgres
def test_postgres_migrates_versions_and_refuses_a_newer_schema(pg_url, postgres):
    db = open_database(pg_url)
    assert migrate(db) == 0 and migrate(db) == SCHEMA_VERSION
    with db.engine.connect() as conn:
        assert schema_version(conn) == SCHEMA_VERSION
        names = set(sa.inspect(conn).get_table_names())
    assert {"turns", "ratings", "handoffs", "conversations", "conversation_messages", "app_state", "locks"} <= names
    postgres.sql(f"UPDATE chatapp_schema SET version = {SCHEMA_VERSION + 1}", database=pg_url.rsplit("/", 1)[1])
    with pytest.raises(StorageError, match="newer"):
        migrate(db)
    db.dispose()


@pytest.mark.postgres
def test_postgres_keeps_any_text_exactly(pg_url):
    db = open_database(pg_url)
    migrate(db)
    tricky = "nul\x00 esc\ue000 both\ue0000 \ue000\ue000 end\ue000"
    with db.engine.begin() as conn:
        conn.execute(sa.insert(t.handoffs).values(handoff_id="h", session_id=tricky, reason="\x00", created_at=1.0))
    with db.engine.connect() as conn:
        row = conn.execute(sa.select(t.handoffs.c.session_id, t.handoffs.c.reason)).one()
        stored = conn.execute(sa.text("SELECT session_id FROM handoffs")).scalar_one()
    assert tuple(row) == (tricky, "\x00") and "\x00" not in stored
    db.dispose()


MIGRATE = textwrap.dedent("""
    import sys
    from chatapp.storage import migrate, open_database
    print(migrate(open_database(sys.argv[1])))
""")


@pytest.mark.postgres
def test_replicas_starting_together_migrate_once(pg_url):
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, pg_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in results]
    found = sorted(int(out.strip()) for out, _ in results)
    assert found.count(0) >= 1 and set(found) <= {0, SCHEMA_VERSION}  # whoever was first found it empty
    db = open_database(pg_url)
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM chatapp_schema")).scalar_one() == 1
    db.dispose()


def test_urls_are_checked_with_clear_messages(tmp_path):
    assert resolve_url(tmp_path / "a.sqlite3").get_backend_name() == "sqlite"
    assert resolve_url("postgresql://u:pw@h/db").drivername == "postgresql+psycopg"
    for bad, words in [("mysql://u@h/db", "only sqlite"), ("postgresql+psycopg://u@h", "names no database"),
                       ("sqlite://", "needs a file")]:
        with pytest.raises(StorageError, match=words):
            resolve_url(bad)
