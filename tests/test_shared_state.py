"""What replicas share through the database, on both engines: the adapter registry's active version (a promotion or
rollback on one replica is what the other serves next), the re-tune lock (one replica at a time, freed when its
holder is killed), and a registry.json from before the database imported once."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from chatapp.adapters import AdapterRegistry
from chatapp.config import Settings
from chatapp.storage import migrate, open_database
from chatapp.storage.locks import LockHeld, hold
from conftest import CountingEmbedder

REPO = Path(__file__).resolve().parent.parent


def replica(tmp_path: Path, name: str, db_target) -> Settings:
    """One replica's settings: its own data dir, the shared folder and database."""
    settings = Settings(data_dir=tmp_path / name)
    settings.shared_dir = tmp_path / "shared"
    settings.database_url = "" if isinstance(db_target, Path) else db_target
    if isinstance(db_target, Path):  # SQLite: one machine, one file every process opens
        settings.database_url = f"sqlite:///{db_target}"
    return settings


def fake_adapter(folder: Path) -> Path:
    """The files the registry checks (it never loads the weights)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def test_a_promotion_on_one_replica_is_served_by_the_other(tmp_path, db_target):
    a = AdapterRegistry(replica(tmp_path, "a", db_target))
    b = AdapterRegistry(replica(tmp_path, "b", db_target))
    assert a.root == b.root == tmp_path / "shared" / "adapters"
    source = fake_adapter(tmp_path / "src")
    v1, v2 = a.add(source, {"note": 1}).version, b.add(source, {"note": 2}).version
    assert (v1, v2) == ("v0001", "v0002") and [i.version for i in a.list()] == ["v0001", "v0002"]
    assert b.active() is None
    a.promote(v1, user="boss")
    assert b.active().version == "v0001"  # at B's next answer, no restart
    b.promote(v2)
    assert a.active().version == "v0002"
    a.rollback(reason="worse")
    assert b.active().version == "v0001" and b.previous() == [None]
    assert [e["action"] for e in b.history()] == ["promote", "promote", "rollback"]


def test_concurrent_promotions_on_two_replicas_lose_no_event(tmp_path, db_target):
    a = AdapterRegistry(replica(tmp_path, "a", db_target))
    b = AdapterRegistry(replica(tmp_path, "b", db_target))
    source = fake_adapter(tmp_path / "src")
    versions = [a.add(source, {}).version for _ in range(3)]
    start = threading.Barrier(4)

    def promoter(registry: AdapterRegistry, n: int) -> None:
        start.wait()
        for i in range(10):
            registry.promote(versions[(n + i) % 3], reason=f"{n}/{i}")

    threads = [threading.Thread(target=promoter, args=(r, n)) for n, r in enumerate([a, b, a, b])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = a.history()
    reasons = {e["reason"] for e in events}
    # every promotion that changed the active version is recorded (one that found it already active is a no-op)
    assert len(events) == len(reasons) and len(events) >= 10
    assert b.active().version == events[-1]["version"]


def test_an_older_registry_file_is_imported_once(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    source = fake_adapter(tmp_path / "src")
    first = AdapterRegistry(settings)
    first.add(source, {})
    first.add(source, {})
    # a data directory from before the database: the state was adapters/registry.json
    (settings.adapters_dir / "registry.json").write_text(json.dumps(
        {"active": "v0002", "previous": [None, "v0001"], "events": [{"action": "promote", "version": "v0002"}]}))
    settings.database_url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"  # a database that never saw a state
    registry = AdapterRegistry(settings)
    assert registry.active().version == "v0002" and registry.previous() == [None, "v0001"]
    registry.rollback()
    assert AdapterRegistry(settings).active().version == "v0001"  # the file is not read again


HOLDER = textwrap.dedent("""
    import sys, time
    from chatapp.storage import migrate, open_database
    from chatapp.storage.locks import hold
    db = open_database(sys.argv[1])
    migrate(db)
    with hold(db, "tune", owner="replica-1", ttl_s=1.0):
        print("held", flush=True)
        time.sleep(600)
""")


def test_one_replica_tunes_at_a_time_and_a_killed_one_frees_the_lock(tmp_path, db_target):
    target = str(db_target)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, target], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO)
    db = open_database(db_target)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        migrate(db)
        with pytest.raises(LockHeld) as refused:
            with hold(db, "tune", owner="replica-2"):
                pass
        assert refused.value.owner == "replica-1"
        time.sleep(1.5)  # longer than the lease: the holder's heartbeat keeps it (SQLite)
        with pytest.raises(LockHeld):
            with hold(db, "tune", owner="replica-2"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        deadline = time.time() + 10
        while True:
            try:
                with hold(db, "tune", owner="replica-2"):
                    break
            except LockHeld:
                assert time.time() < deadline, "a killed holder kept the lock"
                time.sleep(0.2)
        with hold(db, "other-job", owner="replica-2"):  # names are independent
            pass
    finally:
        holder.kill()
        db.dispose()


def test_tune_lock_refuses_a_second_replica_with_a_clear_message(tmp_path, db_target):
    from chatapp.tuning.records import TuningError
    from chatapp.tuning.run import tune_lock

    a, b = replica(tmp_path, "a", db_target), replica(tmp_path, "b", db_target)
    with tune_lock(a):
        with pytest.raises(TuningError, match="another replica is tuning"):
            with tune_lock(b):
                pass
    with tune_lock(b):  # released
        pass


def test_a_correction_on_one_replica_is_in_the_others_next_render(tmp_path, db_target):
    from chatapp.prompts import PromptManager, PromptError

    a = PromptManager(replica(tmp_path, "a", db_target))
    b = PromptManager(replica(tmp_path, "b", db_target))
    question = "Can I pay for my order with cryptocurrency?"
    before = {e["id"] for e in b.examples("support")}
    new_id = a.add_example(question, "No, we accept credit cards, PayPal and gift cards.", source="correction")
    assert new_id in {e["id"] for e in b.examples("support")} - before  # B's very next read, no restart
    found = b.find_curated(question)
    assert found is not None and found["id"] == new_id and found["score"] >= 0.92
    rendered = b.render("support", question=question, history=[], hits=[], mode="few_shot")
    assert new_id in [e["id"] for e in rendered.examples]

    # two replicas adding at once: every example is kept (one locked transaction each)
    start = threading.Barrier(2)
    added: list[str] = []

    def add_many(manager: PromptManager, n: int) -> None:
        start.wait()
        for i in range(10):
            added.append(manager.add_example(f"question {n}/{i}?", f"answer {n}/{i}", source="agent"))

    threads = [threading.Thread(target=add_many, args=(m, n)) for n, m in enumerate([a, b])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = {e["id"] for e in a.examples("support")}
    assert set(added) <= ids and len(added) == 20

    # an edit whose base is stale is refused on the other replica too
    text, revision = a.bank_text("support")
    b.add_example("one more?", "yes", source="agent")
    with pytest.raises(PromptError, match="changed while you were editing"):
        a.save_bank("support", text + "\n", base_revision=revision)


def test_an_older_bank_folder_is_imported_once(tmp_path):
    from chatapp.prompts import PromptManager

    settings = Settings(data_dir=tmp_path / "data")
    legacy = settings.data_dir / "prompt_banks"
    legacy.mkdir(parents=True)
    row = {"id": "feedback-1", "question": "Old question?", "answer": "Old answer.", "curated": True}
    (legacy / "support.jsonl").write_text(json.dumps(row) + "\n")
    prompts = PromptManager(settings)
    assert [e["id"] for e in prompts.examples("support")] == ["feedback-1"]
    (legacy / "support.jsonl").write_text("")  # the database is the copy now: the file is not read again
    assert [e["id"] for e in PromptManager(settings).examples("support")] == ["feedback-1"]


def test_replicas_build_the_same_index_from_the_databases_embeddings(tmp_path, db_target, minilm):
    import shutil

    from chatapp.config import REPO_ROOT
    from chatapp.retrieval import Retriever

    kb = tmp_path / "shared" / "knowledge"  # the knowledge folder every replica mounts
    kb.mkdir(parents=True)
    for name in ("refunds-and-returns.md", "shipping.md"):
        shutil.copy(REPO_ROOT / "knowledge" / name, kb)
    settings_a, settings_b = replica(tmp_path, "a", db_target), replica(tmp_path, "b", db_target)
    for s in (settings_a, settings_b):
        s.retrieval.knowledge_dir = kb
    embed_a, embed_b = CountingEmbedder(minilm), CountingEmbedder(minilm)
    a = Retriever.open(settings_a, embed_a)
    assert a.last_report.embedded_chunks == len(a) > 5 and embed_a.passages > 0
    b = Retriever.open(settings_b, embed_b)  # a new replica: its own index folder, nothing embedded
    assert embed_b.passages == 0 and b.last_report.shared_chunks == len(b) == len(a)
    question = "How long do I have to return an item?"
    hits_a = [h.chunk_id for h in a.search(question).hits]
    assert hits_a and [h.chunk_id for h in b.search(question).hits] == hits_a

    # knowledge added on one replica reaches the other at its next refresh, still without embedding there
    (kb / "gift-cards.md").write_text("# Gift cards\n\nGift cards never expire and can be used for any order, "
                                      "including sale items. Lost gift cards can be replaced with the receipt.\n")
    assert a.refresh().embedded_chunks >= 1
    assert b.needs_refresh()
    report = b.refresh()
    assert report.added == ["gift-cards.md"] and report.embedded_chunks == 0 and report.shared_chunks >= 1
    assert embed_b.passages == 0
    top = b.search("Do gift cards expire?").hits[0]
    assert top.source == "gift-cards.md"


# ---- the customer page's token key ----------------------------------------------------------------------------------

@pytest.mark.postgres
def test_replicas_on_one_database_check_each_others_customer_tokens(tmp_path, pg_url):
    """A customer moved to another replica keeps their conversation: every replica's key is the database's, created
    once even when replicas start together."""
    from chatapp.access import BrowserTokens

    settings = [replica(tmp_path, name, pg_url) for name in "abcdef"]
    opened: list = [None] * len(settings)

    def start(k: int) -> None:
        opened[k] = BrowserTokens.open(settings[k])

    threads = [threading.Thread(target=start, args=(k,)) for k in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({tokens.key for tokens in opened}) == 1  # one key, whoever inserted it
    a, b = opened[0], BrowserTokens.open(replica(tmp_path, "b-restarted", pg_url))
    token = a.issue()
    assert b.valid(token) and a.valid(b.issue())
    assert b.conversation_id(token) == a.conversation_id(token) and b.browser_secret() == a.browser_secret()
    forged = token[:-1] + ("1" if token[-1] == "0" else "0")
    assert not b.valid(forged)
    assert not any((tmp_path / name / "browser.key").exists() for name in "abcdef")


def test_without_a_database_url_the_key_stays_the_data_directorys_file(tmp_path):
    from chatapp.access import BrowserTokens

    settings = Settings(data_dir=tmp_path / "data")
    tokens = BrowserTokens.open(settings)
    key_file = tmp_path / "data" / "browser.key"
    assert tokens.key == bytes.fromhex(key_file.read_text())
    assert BrowserTokens.open(settings).valid(tokens.issue())  # the same key after a restart
    assert not (tmp_path / "data" / "feedback.sqlite3").exists()  # nothing went to the database


@pytest.mark.postgres
def test_a_token_key_database_that_cannot_be_used_is_named_in_a_clear_message(tmp_path, postgres, pg_url):
    from chatapp.access import BrowserKeyError, BrowserTokens
    from chatapp.benchutil import free_port

    down = replica(tmp_path, "a", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/chatapp")
    with pytest.raises(BrowserKeyError, match="token key cannot be read from the database.*cannot be reached"):
        BrowserTokens.open(down)
    with pytest.raises(BrowserKeyError, match="does not exist on the server"):
        BrowserTokens.open(replica(tmp_path, "b", postgres.url("no_such_database")))
    BrowserTokens.open(replica(tmp_path, "c", pg_url))
    postgres.sql("UPDATE app_state SET value = '{\"key\": \"not hex\"}' WHERE key = 'browser_token_key'",
                 database=pg_url.rsplit("/", 1)[1])
    with pytest.raises(BrowserKeyError, match="app_state row 'browser_token_key'.*not a hex key"):
        BrowserTokens.open(replica(tmp_path, "d", pg_url))
