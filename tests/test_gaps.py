"""Knowledge gaps: which turns count as gaps, grouping them into topics, dismiss/merge/answer state that persists,
answers written for a topic becoming knowledge the retriever finds for a paraphrase, article edits (validated,
versioned, conflict-safe), the CLI, and the tab in a real browser (write the answer) and over its API (who may)."""
from __future__ import annotations

import json
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest

from chatapp.config import REPO_ROOT, FeedbackSettings, Settings
from chatapp.feedback import FeedbackStore, TurnRecord, new_message_id
from chatapp.gaps import GapError, GapFinder, _merged, collect, group, purity
from chatapp.knowledge_edit import ANSWERS_FILE, KnowledgeEditor
from conftest import serve_tab

CRYPTO = ["Can I pay with bitcoin?", "Do you accept bitcoin as payment?", "Is paying in bitcoin possible?",
          "Can I use cryptocurrency like bitcoin to pay?"]
WRAP = ["Do you offer gift wrapping?", "Can you gift wrap my order?", "Is gift wrapping available for orders?"]
XSS = "<img src=x onerror=\"window.__xss=1\"> do you do gift wrapping?"
CORRECTION = "Yes: we accept Bitcoin at checkout through our payment partner."


def has_guard_column() -> bool:
    return "guard_replaced" in TurnRecord.__dataclass_fields__


def log(store: FeedbackStore, question: str, rating: int | None = None, correction: str | None = None,
        ago_days: float = 0.0, **fields) -> str:
    record = TurnRecord(new_message_id(), "s1", question, f"Sorry, I am not sure about: {question}",
                        retrieved=[{"chunk_id": "shipping.md#0", "title": "Shipping", "source": "shipping.md"}],
                        created_at=time.time() - ago_days * 86400, **fields)
    store.log_turn(record)
    if rating is not None:
        store.flush()
        store.rate(record.message_id, rating, correction=correction)
    return record.message_id


def fill(store: FeedbackStore) -> dict[str, str]:
    ids = {"crypto0": log(store, CRYPTO[0], handoff="low_confidence", ago_days=20),
           "crypto1": log(store, CRYPTO[1], -1, CORRECTION, ago_days=2),
           "crypto2": log(store, CRYPTO[2], handoff="asked_for_human", ago_days=1),
           "crypto3": log(store, CRYPTO[3], -1)}
    for i, q in enumerate(WRAP):
        ids[f"wrap{i}"] = log(store, q, -1, ago_days=i)
    ids["xss"] = log(store, XSS, -1)
    ids["fine"] = log(store, "How long does shipping take?", 1)  # answered well: not a gap
    ids["plain"] = log(store, "What are your opening hours?")  # not rated, no handoff: not a gap
    if has_guard_column():
        ids["guard"] = log(store, "Is bitcoin accepted?", guard_replaced=True)
    store.flush()
    return ids


@pytest.fixture(scope="module")
def embedder():
    from chatapp.embeddings import load_embedder

    return load_embedder("minilm")


@pytest.fixture
def setup(tmp_path, embedder):
    """A feedback log with gaps, a knowledge folder with one shipped article, the real retriever over it."""
    from chatapp.retrieval import Retriever

    settings = Settings(data_dir=tmp_path / "var")
    settings.retrieval.knowledge_dir = tmp_path / "knowledge"
    settings.retrieval.knowledge_dir.mkdir()
    shutil.copy(REPO_ROOT / "knowledge" / "shipping.md", settings.retrieval.knowledge_dir)
    store = FeedbackStore(settings.feedback_db, FeedbackSettings(busy_timeout_s=0.5))
    ids = fill(store)
    retriever = Retriever.open(settings, embedder)
    yield SimpleNamespace(settings=settings, store=store, ids=ids, retriever=retriever,
                          finder=GapFinder(settings, store, embedder, retriever))
    store.close()


def test_group_finds_topics_without_being_told_how_many():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32))
    points = np.concatenate([c + 0.15 * rng.normal(size=(20, 32)) for c in centres])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    labels = group(points)
    truth = [str(i // 20) for i in range(60)]
    assert labels.max() + 1 == 3 and purity(truth, labels) == 1.0
    assert group(points[:1]).tolist() == [0] and len(group(points[:0])) == 0
    assert _merged(np.array([0, 1, 2]), ["a", "b", "c"], [["a", "c"], ["zz"]]).tolist() == [0, 1, 0]


def test_collect_takes_handoffs_thumbs_down_corrections_and_guard(setup):
    gaps = {g["message_id"]: g for g in collect(setup.store)}
    ids = setup.ids
    assert ids["fine"] not in gaps and ids["plain"] not in gaps
    assert gaps[ids["crypto0"]]["reasons"] == ["handoff: low_confidence"]
    assert gaps[ids["crypto1"]]["reasons"] == ["thumbs down", "corrected"]
    assert gaps[ids["crypto1"]]["correction"] == CORRECTION
    if has_guard_column():
        assert gaps[ids["guard"]]["reasons"] == ["guard replaced the answer"]
    assert ids["crypto0"] not in {g["message_id"] for g in collect(setup.store, since=time.time() - 7 * 86400)}


def test_a_question_a_person_answered_is_a_gap_prefilled_with_the_agents_reply(setup):
    """chatapp/conversations.py logs an agent's reply to a question the bot could not answer as a turn (template
    "agent", rated up): it is a gap, and the reply pre-fills the topic's answer."""
    from chatapp.feedback import TurnRecord, new_message_id

    record = TurnRecord(new_message_id(), "conv-1", "Do you ship to Iceland?", "Yes, in 7-10 business days.",
                        template="agent", model="agent:ann", user="ann")
    setup.store.log_turn(record)
    setup.store.rate(record.message_id, 1, reason="agent reply", user="ann")
    setup.store.flush()
    gap = {g["message_id"]: g for g in collect(setup.store)}[record.message_id]
    assert gap["reasons"] == ["answered by a person"] and gap["correction"] == "Yes, in 7-10 business days."
    topic = next(t for t in setup.finder.topics() if any(q["message_id"] == record.message_id for q in t.questions))
    assert topic.suggestion == "Yes, in 7-10 business days."


def test_topics_dismiss_merge_and_state_survives_a_restart(setup):
    topics = setup.finder.topics()
    crypto = next(t for t in topics if CRYPTO[1] in [q["question"] for q in t.questions])
    assert {q["question"] for q in crypto.questions} >= set(CRYPTO)
    assert crypto.suggestion == CORRECTION and crypto.count >= 4
    assert crypto.passages[0][0] == "Shipping" and "bitcoin" in crypto.keywords
    assert crypto.trend == "rising" and crypto.summary()["trend"] == "rising"
    wrap = next(t for t in topics if WRAP[0] in [q["question"] for q in t.questions])
    assert wrap.topic_id != crypto.topic_id

    with pytest.raises(GapError, match="unknown topic"):
        setup.finder.dismiss("t-nope")
    with pytest.raises(GapError, match="two different"):
        setup.finder.merge(wrap.topic_id, wrap.topic_id)
    setup.finder.merge(crypto.topic_id, wrap.topic_id)
    merged = [t for t in setup.finder.topics() if WRAP[0] in [q["question"] for q in t.questions]]
    assert CRYPTO[0] in [q["question"] for q in merged[0].questions]

    setup.finder.dismiss(merged[0].topic_id, who="ann")
    again = GapFinder(setup.settings, setup.store, setup.finder.embedder)  # a restart: state from the file
    assert not any(q["question"] in CRYPTO + WRAP for t in again.topics() for q in t.questions)
    state = json.loads((setup.settings.data_dir / "gaps" / "state.json").read_text())
    assert state["dismissed"][setup.ids["wrap0"]]["by"] == "ann"


def test_an_answer_written_for_a_topic_is_found_for_a_paraphrase(setup):
    paraphrase = "do you take crypto payments such as bitcoin"
    assert all(h.source != ANSWERS_FILE for h in setup.retriever.search(paraphrase).hits)
    crypto = next(t for t in setup.finder.topics() if CRYPTO[1] in [q["question"] for q in t.questions])
    with pytest.raises(ValueError, match="must both be filled"):
        setup.finder.write_answer(crypto.topic_id, crypto.label, "   ")
    entry = setup.finder.write_answer(crypto.topic_id, crypto.label, crypto.suggestion, who="ann", category="payment")
    hit = setup.retriever.search(paraphrase).hits[0]
    assert hit.chunk_id == entry and hit.answer == CORRECTION
    assert not any(crypto.topic_id == t.topic_id for t in setup.finder.topics())  # answered: closed
    line = json.loads((setup.settings.retrieval.knowledge_dir / ANSWERS_FILE).read_text().splitlines()[0])
    assert line["author"] == "ann" and line["category"] == "payment" and line["question"] == crypto.label
    history = setup.finder.knowledge.history(ANSWERS_FILE)
    assert [(v["version"], v["who"]) for v in history] == [(1, "ann")]


def test_article_edits_are_validated_versioned_and_conflict_safe(tmp_path):
    settings = Settings(data_dir=tmp_path / "var")
    settings.retrieval.knowledge_dir = tmp_path / "kb"
    settings.retrieval.knowledge_dir.mkdir()
    (settings.retrieval.knowledge_dir / "a.md").write_text("# Returns\n\nWithin 30 days.\n")
    editor = KnowledgeEditor(settings)
    assert editor.articles() == ["a.md"]
    text, sha = editor.read("a.md")
    for rel in ("../outside.md", "/etc/passwd", "a.exe", ""):
        with pytest.raises(ValueError, match="not an article"):
            editor.path(rel)
    with pytest.raises(ValueError, match="empty"):
        editor.save("a.md", "  \n", "ann", base_sha=sha)
    assert editor.save("a.md", text + "\nNo receipt needed.\n", "ann", "receipts", base_sha=sha) == 2
    with pytest.raises(ValueError, match="changed since you opened it"):
        editor.save("a.md", "# Other\n\ntext\n", "bob", base_sha=sha)  # stale: bob loaded the old text
    history = editor.history("a.md")
    assert [(v["version"], v["who"], v["message"]) for v in history] == [
        (1, None, "before the first edit in the console"), (2, "ann", "receipts")]
    assert "No receipt needed" in (settings.retrieval.knowledge_dir / "a.md").read_text()
    with pytest.raises(ValueError, match="at most"):
        editor.add_faq("q" * 501, "a")


def test_cli_gaps_and_eval_gaps(setup, tmp_path, capsys):
    from chatapp.cli import main

    flags = ["--data-dir", str(setup.settings.data_dir), "--knowledge-dir", str(setup.settings.retrieval.knowledge_dir)]
    assert main([*flags, "gaps", "--format", "json"]) == 0
    topics = json.loads(capsys.readouterr().out)
    assert any(set(CRYPTO) <= set(t["examples"]) | {CRYPTO[0]} for t in topics) and "trend" in topics[0]
    assert main([*flags, "gaps", "--since", "2999-01-01"]) == 0
    assert "0 topics" in capsys.readouterr().out

    data = tmp_path / "b77"
    data.mkdir()
    rows = [(q, "crypto") for q in CRYPTO] + [(q, "wrap") for q in WRAP] + [("Where is my\nnew card?", "card")]
    import csv

    with open(data / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "category"), *rows])
    assert main([*flags, "eval", "gaps", "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["questions"] == 8 and result["intents"] == 3 and result["ari"] == 1.0


def serve_gaps(setup, auth=None):
    from chatapp.ui.staff import gaps_tab

    bot = SimpleNamespace(feedback=setup.store, retriever=setup.retriever, settings=setup.settings, problems={},
                          is_admin=lambda request=None: not auth or getattr(request, "username", None) == "admin")
    return serve_tab("Knowledge gaps", gaps_tab, bot, auth)


@pytest.mark.slow
def test_only_admins_change_knowledge_over_the_api(setup):
    from gradio_client import Client

    demo, url = serve_gaps(setup, auth=[("admin", "pw"), ("agent", "pw")])
    try:
        topic_id = setup.finder.topics()[0].topic_id
        agent = Client(url, auth=("agent", "pw"), verbose=False)
        status = agent.predict(topic_id, "Q?", "An answer.", "", "all", api_name="/gaps_save")[0]
        assert "Only administrators" in status and not (setup.settings.retrieval.knowledge_dir / ANSWERS_FILE).exists()
        assert "Only administrators" in agent.predict(topic_id, "all", api_name="/gaps_dismiss")[0]
        assert "Only administrators" in agent.predict("shipping.md", "# x\n\ny\n", "", "", api_name="/gaps_article_save")[1]
        admin = Client(url, auth=("admin", "pw"), verbose=False)
        assert "unknown topic" in admin.predict("t-gone", "Q?", "A.", "", "all", api_name="/gaps_save")[0]
        assert "Not saved" in admin.predict("shipping.md", "", "", "", api_name="/gaps_article_save")[1]
        body, _, sha, _ = admin.predict("shipping.md", api_name="/gaps_article_load")
        _, note = admin.predict("shipping.md", body + "\n## Pickup\n\nCollect from the store.\n", sha, "pickup",
                                api_name="/gaps_article_save")
        assert "version 2" in note and "re-indexed" in note
        assert setup.retriever.search("can I collect my order from the store").hits[0].source == "shipping.md"
    finally:
        demo.close()


@pytest.mark.slow
def test_write_the_answer_from_the_console(setup, browser):
    demo, url = serve_gaps(setup)
    page = browser.new_page()
    try:
        page.goto(url)
        page.locator("#gaps-list table").wait_for(timeout=30_000)
        assert page.evaluate("window.__xss") is None
        shown = next(t for t in setup.finder.topics() if XSS in [q["question"] for q in t.questions])
        page.locator("#gaps-topic input").click()
        page.get_by_role("option").filter(has_text=shown.label[:30]).first.click()
        page.locator("#gaps-details").get_by_text("<img src=x", exact=False).first.wait_for()  # as text, not HTML
        page.locator("#gaps-topic input").click()
        page.get_by_role("option").filter(has_text="bitcoin").first.click()
        answer = page.locator("#gaps-answer textarea")
        page.wait_for_function("() => document.querySelector('#gaps-answer textarea').value.length > 0")
        assert answer.input_value() == CORRECTION  # pre-filled from the correction
        page.locator("#gaps-details").get_by_text("Bot answered", exact=False).first.wait_for()
        answer.fill("")
        page.locator("#gaps-save").click()
        page.locator("#gaps-status").get_by_text("must both be filled", exact=False).wait_for(timeout=20_000)
        answer.fill("Yes, we take Bitcoin at checkout (through our payment partner).")
        page.locator("#gaps-save").click()
        try:
            page.locator("#gaps-status").get_by_text("indexed", exact=False).wait_for(timeout=90_000)
        except Exception:
            raise AssertionError(f"no success message; the status says: {page.inner_text('#gaps-status')!r}")
        assert page.evaluate("window.__xss") is None
        hit = setup.retriever.search("is it ok to pay using bitcoin").hits[0]
        assert hit.source == ANSWERS_FILE and "Bitcoin at checkout" in hit.answer
    finally:
        page.close()
        demo.close()
