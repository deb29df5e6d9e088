"""`chatapp db copy --to URL`: a single install's SQLite file (turns, ratings, handoffs, conversations, an example
bank, the customer token key) copied into a real Postgres and read back through the stores the app uses; a target that holds rows is refused
unless --replace; the copy is all or nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from chatapp.access import BrowserTokens
from chatapp.cli import main
from chatapp.config import FeedbackSettings, Settings
from chatapp.example_banks import BankStore
from chatapp.feedback import FeedbackStore, TurnRecord, new_message_id
from chatapp.inbox import Inbox

FAST = FeedbackSettings(busy_timeout_s=0.5, retry_every_s=0.2)


def sqlite_install(data: Path, n_turns: int) -> dict:
    """What a single install's database holds after some use, written through the app's own stores."""
    db = data / "feedback.sqlite3"
    store = FeedbackStore(db, FAST)
    records = [TurnRecord(new_message_id(), f"s{k % 7}", f"question {k}: zero\x00byte, ünïcode ✓", f"answer {k}",
                          history=[{"role": "user", "content": f"earlier {k}"}], retrieved=[{"chunk_id": f"c{k}"}],
                          template="default", template_version=2, adapter="v0001" if k % 2 else None,
                          first_token_ms=100.0 + k, guard={"action": "kept"}, guard_replaced=k % 5 == 0)
               for k in range(n_turns)]
    for record in records:
        store.log_turn(record)
    store.flush()
    store.rate(records[0].message_id, -1, correction="The right answer.", reason="wrong", user="ann")
    store.rate(records[1].message_id, 1, user="bob")
    store.log_handoff("s2", records[2].message_id, "asked_for_human")
    store.flush()
    sample = [records[k].message_id for k in (0, 1, 2, n_turns - 1)]
    turns = {mid: store.turn(mid) for mid in sample}
    stats = store.stats()
    store.close()
    inbox = Inbox(db)
    inbox.ensure("conv-1", user="cust")
    inbox.add("conv-1", "customer", "Where is my parcel?")
    inbox.request_person("conv-1", "asked_for_human")
    inbox.reply("conv-1", "ann", "Ann", "Hello, I am looking into it.")
    inbox.ensure("conv-2")
    inbox.add("conv-2", "bot", "Refunds take 5 days.", meta={"sources": ["refunds.md"]})
    messages = {cid: inbox.messages(cid) for cid in ("conv-1", "conv-2")}
    inbox.close()
    BankStore(db).update("support", lambda current: '{"question": "q", "answer": "a"}\n')
    return {"turns": turns, "stats": stats, "messages": messages, "ids": sample}


@pytest.mark.postgres
def test_an_sqlite_install_copied_to_postgres_reads_back_the_same_through_the_stores(tmp_path, pg_url, capsys):
    data = tmp_path / "data"
    before = sqlite_install(data, n_turns=1203)  # more than two batches of 500
    token = BrowserTokens.open(Settings(data_dir=data)).issue()  # a customer's open chat on the single install
    assert main(["--data-dir", str(data), "db", "copy", "--to", pg_url, "--batch", "500"]) == 0
    out = capsys.readouterr().out
    counts = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in out.splitlines()
              if line.startswith("  ")}
    assert counts["turns"] == 1203 and counts["ratings"] == 2 and counts["handoffs"] == 1
    assert counts["conversations"] == 2 and counts["conversation_messages"] == 4 and counts["example_banks"] == 1
    assert "feedback.sqlite3 -> postgresql+psycopg://" in out
    assert f"customer token key: copied from {data / 'browser.key'}" in out
    replica = Settings(data_dir=tmp_path / "replica", database_url=pg_url)
    assert BrowserTokens.open(replica).valid(token)  # the customer's chat still opens on the replicas

    store = FeedbackStore(pg_url, FAST, spill_path=tmp_path / "spill.jsonl")
    try:
        for mid in before["ids"]:
            assert store.turn(mid) == before["turns"][mid]  # every column, the NUL byte included
        assert store.corrections()[0]["correction"] == "The right answer."
        assert store.stats() == before["stats"]
    finally:
        store.close()
    inbox = Inbox(pg_url)
    try:
        for cid, messages in before["messages"].items():
            assert inbox.messages(cid) == messages
        assert inbox.get("conv-1").agent == "ann" and inbox.get("conv-1").state == "with_agent"
        added = inbox.add("conv-1", "customer", "Thanks!")  # Postgres numbers new messages after the copied ones
        assert added.id > max(m.id for m in before["messages"]["conv-1"] + before["messages"]["conv-2"])
    finally:
        inbox.close()
    assert BankStore(pg_url).get("support")[0] == '{"question": "q", "answer": "a"}\n'

    # a target that holds rows is refused, and left as it was
    assert main(["--data-dir", str(data), "db", "copy", "--to", pg_url]) == 1
    err = capsys.readouterr().err
    assert "already holds rows" in err and "turns (1,203)" in err and "--replace" in err
    assert len(Inbox(pg_url).messages("conv-1")) == 4  # the message added after the copy is still there
    assert main(["--data-dir", str(data), "db", "copy", "--to", pg_url, "--replace"]) == 0
    assert Inbox(pg_url).messages("conv-1") == before["messages"]["conv-1"]


@pytest.mark.postgres
def test_a_copy_that_fails_half_way_leaves_the_target_empty(tmp_path, pg_url, postgres, capsys):
    """One transaction: rows of the first tables are not left behind when a later table fails."""
    data = tmp_path / "data"
    sqlite_install(data, n_turns=20)
    dbname = pg_url.rsplit("/", 1)[1]
    from chatapp.storage import migrate, open_database

    migrate(open_database(pg_url))
    # a constraint one SQLite row breaks, on the table copied last (the tables go in name order)
    postgres.sql("ALTER TABLE turns ADD CONSTRAINT no_19 CHECK (user_message NOT LIKE 'question 19:%')",
                 database=dbname)
    assert main(["--data-dir", str(data), "db", "copy", "--to", pg_url]) == 1
    assert "nothing was copied" in capsys.readouterr().err
    for table in ("conversations", "conversation_messages", "example_banks", "handoffs", "ratings", "turns"):
        assert postgres.sql(f"SELECT count(*) FROM {table}", database=dbname) == [(0,)], table


def test_a_missing_source_or_a_bad_target_is_a_clear_error(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "none"), "db", "copy", "--to", "sqlite:////tmp/x.sqlite3"]) == 1
    assert "no database at" in capsys.readouterr().err and not (tmp_path / "none" / "feedback.sqlite3").exists()
    sqlite_install(tmp_path / "data", n_turns=3)
    assert main(["--data-dir", str(tmp_path / "data"), "db", "copy", "--to", "mysql://u@h/db"]) == 2
    assert "only sqlite" in capsys.readouterr().err
    same = f"sqlite:///{tmp_path / 'data' / 'feedback.sqlite3'}"
    assert main(["--data-dir", str(tmp_path / "data"), "db", "copy", "--to", same]) == 1
    assert "the same database" in capsys.readouterr().err
