"""Knowledge documents in the shared database (chatapp/shared_knowledge.py): replicas with their own knowledge
folders (no shared mount) index the same knowledge; an edit, a gap answer or a deletion on one reaches the other at
its next refresh without it embedding anything. Real Postgres, real MiniLM, real FAISS."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from chatapp.config import REPO_ROOT, Settings
from chatapp.knowledge_edit import KnowledgeEditError, KnowledgeEditor
from chatapp.retrieval import Retriever
from conftest import CountingEmbedder, free_port

GIFT_CARDS = ("# Gift cards\n\nGift cards never expire and can be used for any order, including sale items. "
              "Lost gift cards can be replaced with the receipt.\n")


def replica(tmp_path: Path, name: str, url: str) -> Settings:
    """One replica: its own data directory and its own local knowledge folder; only the database is shared."""
    settings = Settings(data_dir=tmp_path / name / "data", database_url=url)
    settings.retrieval.knowledge_dir = tmp_path / name / "knowledge"
    return settings


def rows(url: str, sql: str) -> list[tuple]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_knowledge_edited_on_replica_a_is_found_by_replica_b_without_embedding(tmp_path, pg_url, minilm):
    settings_a, settings_b = replica(tmp_path, "a", pg_url), replica(tmp_path, "b", pg_url)
    kb_a, kb_b = settings_a.retrieval.knowledge_dir, settings_b.retrieval.knowledge_dir
    kb_a.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "knowledge" / "refunds-and-returns.md", kb_a)
    embed_a, embed_b = CountingEmbedder(minilm), CountingEmbedder(minilm)
    a = Retriever.open(settings_a, embed_a)
    assert a.last_report.sync.published == ["refunds-and-returns.md"] and embed_a.passages > 0
    b = Retriever.open(settings_b, embed_b)  # a new replica with an empty folder: everything from the database
    assert b.last_report.sync.written == ["refunds-and-returns.md"] and len(b) == len(a)
    assert embed_b.passages == 0 and (kb_b / "refunds-and-returns.md").read_bytes() == \
        (kb_a / "refunds-and-returns.md").read_bytes()

    # an article saved in A's console and a gap answer written on A: B finds both after its refresh
    editor_a = KnowledgeEditor(settings_a)
    editor_a.save("gift-cards.md", GIFT_CARDS, who="ann", message="new article")
    entry = editor_a.add_faq("Can I change the delivery address after ordering?",
                             "Yes, until the parcel ships: write to us with the order number.", who="ann")
    a.refresh()
    assert not b.data.files.get("gift-cards.md") and b.needs_refresh()
    report = b.refresh()
    assert sorted(report.added) == ["gaps-answers.jsonl", "gift-cards.md"]
    assert report.embedded_chunks == 0 and report.shared_chunks >= 2 and embed_b.passages == 0
    assert b.search("Do gift cards expire?").hits[0].source == "gift-cards.md"
    assert b.search("I want my parcel sent to another address").hits[0].chunk_id == entry
    assert rows(pg_url, "SELECT updated_by FROM knowledge_documents WHERE path = 'gift-cards.md'") == [("ann",)]

    # B's console reads the database's text, so A's save is what it edits (and what "changed since" checks)
    editor_b = KnowledgeEditor(settings_b)
    text, sha = editor_b.read("gift-cards.md")
    assert text == GIFT_CARDS
    editor_a.save("gift-cards.md", GIFT_CARDS + "\nGift cards cannot be exchanged for cash.\n", who="ann")
    a.refresh()  # A embeds the new chunk (as its console does after a save)
    with pytest.raises(KnowledgeEditError, match="changed since you opened it"):
        editor_b.save("gift-cards.md", text + "\nBob's line.\n", who="bob", base_sha=sha)
    b.refresh()
    assert "exchanged for cash" in b.search("Can I swap a gift card for cash?").hits[0].text
    assert embed_b.passages == 0

    # gap answers written on both replicas, neither having refreshed since: both are kept
    editor_b.add_faq("Do you ship to Norway?", "Yes, in 5 to 7 working days.", who="bob")
    editor_a.add_faq("Do you ship to Iceland?", "Not yet.", who="ann")
    [(answers,)] = rows(pg_url, "SELECT text FROM knowledge_documents WHERE path = 'gaps-answers.jsonl'")
    assert [json.loads(line)["question"] for line in answers.splitlines()] == [
        "Can I change the delivery address after ordering?", "Do you ship to Norway?", "Do you ship to Iceland?"]

    # a file deleted from A's folder is deleted on B at its refresh
    (kb_a / "gift-cards.md").unlink()
    assert a.refresh().sync.published == ["gift-cards.md"]
    report = b.refresh()
    assert report.sync.removed == ["gift-cards.md"] and report.removed == ["gift-cards.md"]
    assert not (kb_b / "gift-cards.md").exists()
    assert all(h.source != "gift-cards.md" for h in b.search("Do gift cards expire?").hits)
    assert rows(pg_url, "SELECT deleted FROM knowledge_documents WHERE path = 'gift-cards.md'") == [(1,)]


@pytest.mark.postgres
def test_a_file_edited_outside_the_app_is_published_and_the_later_change_wins(tmp_path, pg_url, minilm):
    settings_a, settings_b = replica(tmp_path, "a", pg_url), replica(tmp_path, "b", pg_url)
    kb_a, kb_b = settings_a.retrieval.knowledge_dir, settings_b.retrieval.knowledge_dir
    for kb in (kb_a, kb_b):  # both images ship the same file
        kb.mkdir(parents=True)
        (kb / "hours.md").write_text("# Opening hours\n\nWe are open 9 to 5 on weekdays.\n")
    a, b = Retriever.open(settings_a, minilm), Retriever.open(settings_b, minilm)
    assert a.last_report.sync.published == ["hours.md"] and b.last_report.sync.published == []

    # edited by hand in B's folder: published at B's refresh, written into A's folder at A's
    (kb_b / "hours.md").write_text("# Opening hours\n\nWe are open 8 to 8, every day.\n")
    assert b.refresh().sync.published == ["hours.md"]
    assert a.refresh().sync.written == ["hours.md"] and "8 to 8" in (kb_a / "hours.md").read_text()

    # changed in A's folder first, then on B (published first): B's later change wins, A's text is kept aside
    (kb_a / "hours.md").write_text("# Opening hours\n\nA's version.\n")
    past = time.time() - 60
    os.utime(kb_a / "hours.md", (past, past))
    (kb_b / "hours.md").write_text("# Opening hours\n\nB's version, the later one.\n")
    b.refresh()
    report = a.refresh().sync
    assert report.conflicts == ["hours.md"] and report.written == ["hours.md"]
    assert "B's version" in (kb_a / "hours.md").read_text()
    [kept] = (settings_a.data_dir / "knowledge_conflicts").iterdir()
    assert kept.name.startswith("hours.md.") and kept.name.endswith(".local") and "A's version" in kept.read_text()
    assert a.refresh().sync.conflicts == []  # settled


def test_the_sqlite_default_keeps_the_folder_as_the_only_truth(tmp_path, minilm):
    settings = Settings(data_dir=tmp_path / "data")
    settings.retrieval.knowledge_dir = tmp_path / "knowledge"
    settings.retrieval.knowledge_dir.mkdir()
    (settings.retrieval.knowledge_dir / "hours.md").write_text("# Opening hours\n\nWe are open 9 to 5.\n")
    retriever = Retriever.open(settings, minilm)
    assert retriever.knowledge is None and retriever.last_report.sync is None and KnowledgeEditor(settings).shared is None
    KnowledgeEditor(settings).save("hours.md", "# Opening hours\n\nWe are open 9 to 6.\n", who="ann")
    assert retriever.refresh().changed == ["hours.md"] and retriever.shared_problem is None
    assert not (settings.data_dir / "knowledge_sync.json").exists()
    assert not (settings.data_dir / "feedback.sqlite3").exists()  # nothing copied into a database


def test_an_unreachable_database_leaves_the_local_index_answering(tmp_path, minilm):
    settings = replica(tmp_path, "a", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/chatapp")
    settings.feedback.busy_timeout_s = 1.0
    settings.retrieval.knowledge_dir.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "knowledge" / "refunds-and-returns.md", settings.retrieval.knowledge_dir)
    retriever = Retriever.open(settings, minilm)
    assert "cannot be reached" in retriever.shared_problem and "this replica's knowledge folder" in \
        retriever.shared_problem
    assert retriever.search("How long do I have to return an item?").hits[0].source == "refunds-and-returns.md"
    with pytest.raises(KnowledgeEditError, match="Not saved: .*cannot be reached"):
        KnowledgeEditor(settings).save("refunds-and-returns.md", "# Returns\n\nThirty days.\n", who="ann")
    assert "Thirty days" not in (settings.retrieval.knowledge_dir / "refunds-and-returns.md").read_text()
    assert not retriever.needs_refresh()


def test_the_app_with_its_database_down_answers_from_the_local_index_and_says_why(tmp_path, tiny_model_dir):
    from chatapp.bot import Bot, Session

    settings = replica(tmp_path, "a", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/chatapp")
    settings.model.name, settings.model.backend, settings.model.threads = str(tiny_model_dir), "transformers", 2
    settings.generation.max_new_tokens, settings.generation.temperature = 16, 0.0
    settings.feedback.busy_timeout_s = 1.0
    settings.retrieval.knowledge_dir.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "knowledge" / "refunds-and-returns.md", settings.retrieval.knowledge_dir)
    bot = Bot.create(settings)
    assert "Knowledge database" in bot.status() and "cannot be reached" in bot.status()
    final = list(bot.answer("How long do I have to return an item?", Session()))[-1]
    assert final.done and "refunds-and-returns.md" in [h.source for h in final.citations]


def test_a_published_document_is_only_written_inside_the_folder(tmp_path):
    from chatapp.shared_knowledge import KnowledgeSync, valid_path

    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"  # the same sync on SQLite (replicas on one machine)
    settings_a, settings_b = replica(tmp_path, "a", url), replica(tmp_path, "b", url)
    kb_a, kb_b = settings_a.retrieval.knowledge_dir, settings_b.retrieval.knowledge_dir
    (kb_a / "faq").mkdir(parents=True)
    (kb_a / "faq" / "shipping.jsonl").write_text('{"question": "Do you ship abroad?", "answer": "Yes."}\n')
    assert KnowledgeSync(settings_a).sync().published == ["faq/shipping.jsonl"]
    outside = tmp_path / "outside"
    outside.mkdir()
    kb_b.mkdir(parents=True)
    (kb_b / "faq").symlink_to(outside)  # B's folder has a symlinked subfolder where A has a real one
    assert KnowledgeSync(settings_b).sync().written == [] and not list(outside.iterdir())
    assert valid_path("faq/shipping.jsonl") and valid_path("returns.md")
    assert not any(valid_path(p) for p in ("../returns.md", "/etc/returns.md", ".git/x.md", "faq/.hidden.md",
                                           "faq//x.md", "run.sh", "faq\\x.md", ""))
