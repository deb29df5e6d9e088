"""Knowledge gaps: the questions the bot did not answer well, grouped into topics, and answers written for them
turned into knowledge.

Why it is built this way:
- A gap is any turn a person had to step in for: a handoff (offered or asked), an answer the faithfulness guard
  replaced, a thumbs-down, a correction. They are read from the feedback log's read-only connection.
- Grouping uses the retriever's own embedder and scikit-learn: average-linkage agglomerative clustering on cosine
  distance with a distance threshold (no topic count needed; the threshold keeps its meaning whatever the number of
  questions), then one k-means pass seeded with those topics' centroids, which re-homes stragglers. Threshold picked
  on BANKING77 *train* queries (`bench/gaps.py`); `chatapp eval gaps` reports the test split.
- Dismissed, answered and merged questions are kept by message id in a JSON file under data_dir, written atomically,
  so a topic's state survives re-grouping. Answers become FAQ lines in `gaps-answers.jsonl` in the knowledge folder;
  every knowledge file edited here is versioned (who, when, message) under data_dir/knowledge_versions.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from chatapp.config import REPO_ROOT, Settings
from chatapp.knowledge_edit import KnowledgeEditError, KnowledgeEditor
from chatapp.files import atomic_write, file_lock

log = logging.getLogger(__name__)

THRESHOLD = 0.43  # cosine distance; picked on BANKING77 train (bench/gaps.py): best ARI with purity >= 0.75
OUTLIER = 0.5  # a question farther than this from its topic's centre after k-means is a topic of its own
MAX_QUESTIONS = 5000  # the most recent gaps grouped (pairwise distances grow with the square of the count)
BANKING77 = REPO_ROOT.parent / "shared" / "data" / "banking77"


class GapError(KnowledgeEditError):
    """A request that cannot be done as asked; the message says why, for the UI or the terminal."""


# ---- grouping ----------------------------------------------------------------------------------------------------

def group(vectors: np.ndarray, threshold: float = THRESHOLD, outlier: float = OUTLIER) -> np.ndarray:
    """Topic labels 0..k-1 for L2-normalised rows; the number of topics comes from the threshold."""
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.preprocessing import normalize

    n = len(vectors)
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    labels = AgglomerativeClustering(n_clusters=None, distance_threshold=threshold, metric="cosine",
                                     linkage="average").fit_predict(vectors)
    sizes = np.bincount(labels)
    keep = np.flatnonzero(sizes >= 2)
    if len(keep):
        centres = normalize(np.stack([vectors[labels == k].mean(axis=0) for k in keep]))
        km = KMeans(len(keep), init=centres, n_init=1).fit(vectors)
        labels = km.labels_.copy()
        cos = np.einsum("ij,ij->i", vectors, normalize(km.cluster_centers_)[labels])
        far = np.flatnonzero(1 - cos > outlier)
        labels[far] = labels.max() + 1 + np.arange(len(far))
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def purity(truth: list[str], labels: np.ndarray) -> float:
    """Share of questions whose topic's most common intent is their own."""
    from sklearn.metrics.cluster import contingency_matrix

    table = contingency_matrix(truth, labels)
    return float(table.max(axis=0).sum() / table.sum())


# ---- reading gaps from the feedback log ---------------------------------------------------------------------------

def collect(store, since: float | None = None, limit: int = MAX_QUESTIONS) -> list[dict]:
    """The turns the bot did not answer well since ``since`` (newest first), each with why."""
    rows = store.unanswered(since, limit)
    out = []
    for r in rows:
        reasons = [reason for reason, on in (
            (f"handoff: {r['handoff']}", r["handoff"]), ("asked for a person", r["asked"] and not r["handoff"]),
            ("guard replaced the answer", r["guard_replaced"]), ("thumbs down", r["rating"] == -1),
            ("corrected", r["correction"]), ("answered by a person", r["template"] == "agent")) if on]
        by_agent = r["template"] == "agent"  # an agent's reply (chatapp/inbox.py logs it as a turn): the pre-fill
        try:
            retrieved = json.loads(r["retrieved"] or "[]")
        except json.JSONDecodeError:
            retrieved = []
        out.append({"message_id": r["message_id"], "question": r["question"].strip(), "answer": r["answer"],
                    "created_at": r["created_at"], "reasons": reasons,
                    "correction": r["correction"] or (r["answer"] if by_agent else None),
                    "retrieved": [h for h in retrieved if isinstance(h, dict)]})
    return out


@dataclass
class Topic:
    """One group of unanswered questions, as the console and `chatapp gaps` show it."""

    topic_id: str
    label: str  # its most central question
    keywords: list[str]
    count: int
    earlier: int  # questions in the first half of the period
    recent: int  # ... and in the second half
    questions: list[dict] = field(default_factory=list)  # newest first
    passages: list[tuple[str, int]] = field(default_factory=list)  # what the retriever found, most often first
    reasons: dict[str, int] = field(default_factory=dict)
    suggestion: str = ""  # a correction or an agent's reply a person wrote for one of its questions

    @property
    def trend(self) -> str:
        return "rising" if self.recent > self.earlier else "falling" if self.recent < self.earlier else "steady"

    def summary(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "questions"}, "trend": self.trend,
                "examples": [q["question"] for q in self.questions[:5]],
                "answers": [q["answer"] for q in self.questions[:3]]}


def _keywords(docs: list[str], top: int = 3) -> list[list[str]]:
    """The words that set each topic apart from the others (TF-IDF over one document per topic)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        vectorizer = TfidfVectorizer(stop_words="english", max_features=20_000)
        weights = vectorizer.fit_transform(docs)
    except ValueError:  # nothing but stop words
        return [[] for _ in docs]
    terms = vectorizer.get_feature_names_out()
    return [[terms[j] for j in np.argsort(-row.toarray()[0])[:top] if row[0, j] > 0] for row in weights]


def _merged(labels: np.ndarray, ids: list[str], merges: list[list[str]]) -> np.ndarray:
    """Apply the merges people made: every topic holding a question of one merge group becomes one topic."""
    parent = list(range(labels.max() + 1 if len(labels) else 0))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    where = {mid: int(label) for mid, label in zip(ids, labels)}
    for members in merges:
        present = [where[m] for m in members if m in where]
        for other in present[1:]:
            parent[root(other)] = root(present[0])
    return np.array([root(int(label)) for label in labels], dtype=np.int64)


class GapState:
    """Dismissed, answered and merged questions by message id, in one JSON file (atomic writes, file lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        except (OSError, json.JSONDecodeError) as exc:
            raise GapError(f"the gaps state file {self.path} cannot be read ({exc}); move it aside to start over")
        return {"dismissed": data.get("dismissed", {}), "answered": data.get("answered", {}),
                "merges": data.get("merges", [])}

    def update(self, change) -> dict[str, Any]:
        """Read, change (a function of the state dict) and write back, excluding other threads and processes."""
        with self._lock, file_lock(self.path.with_name(self.path.name + ".lock")):
            state = self.load()
            change(state)
            atomic_write(self.path, json.dumps(state, indent=1))
            return state


class GapFinder:
    """Topics over the feedback log and the actions on them; one per app (it caches question embeddings)."""

    def __init__(self, settings: Settings, store, embedder, retriever=None):
        self.settings, self.store, self.embedder, self.retriever = settings, store, embedder, retriever
        self.state = GapState(settings.shared / "gaps" / "state.json")  # topics dismissed/merged for every replica
        self.knowledge = KnowledgeEditor(settings)
        self.threshold = THRESHOLD
        self._vectors: dict[str, np.ndarray] = {}
        self._last: tuple[tuple, np.ndarray] | None = None
        self._lock = threading.Lock()

    def _embed(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
            if missing:
                if len(self._vectors) + len(missing) > 4 * MAX_QUESTIONS:
                    self._vectors.clear()
                for text, vector in zip(missing, self.embedder.encode_queries(missing)):
                    self._vectors[text] = vector
            return np.stack([self._vectors[t] for t in texts]).astype(np.float32)

    def topics(self, since: float | None = None) -> list[Topic]:
        """Open topics (not dismissed, not answered), biggest first."""
        state = self.state.load()
        closed = set(state["dismissed"]) | set(state["answered"])
        gaps = [g for g in collect(self.store, since) if g["message_id"] not in closed]
        if not gaps:
            return []
        vectors = self._embed([g["question"] for g in gaps])
        key = (tuple(g["message_id"] for g in gaps), json.dumps(state["merges"]), self.threshold)
        if self._last is None or self._last[0] != key:  # the same questions again (a click): the same grouping
            ids = [g["message_id"] for g in gaps]
            self._last = (key, _merged(group(vectors, self.threshold), ids, state["merges"]))
        labels = self._last[1]
        start = since or min(g["created_at"] for g in gaps)
        middle = start + (time.time() - start) / 2
        topics = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            centre = vectors[members].mean(axis=0)
            central = gaps[members[int(np.argmax(vectors[members] @ centre))]]
            questions = [gaps[i] for i in members]
            passages = Counter(h.get("title") or h.get("source") or h.get("chunk_id", "?")
                               for q in questions for h in q["retrieved"][:2])
            recent = sum(q["created_at"] >= middle for q in questions)
            topics.append(Topic(
                "t" + hashlib.sha1(central["message_id"].encode()).hexdigest()[:10], central["question"], [],
                len(questions), len(questions) - recent, recent, questions, passages.most_common(5),
                dict(Counter(r for q in questions for r in q["reasons"])),
                next((q["correction"] for q in questions if q["correction"]), "")))
        for topic, words in zip(topics, _keywords([" ".join(q["question"] for q in t.questions) for t in topics])):
            topic.keywords = words
        return sorted(topics, key=lambda t: (-t.count, -t.recent, t.label))

    def find(self, topic_id: str, since: float | None = None) -> Topic:
        topic = next((t for t in self.topics(since) if t.topic_id == topic_id), None)
        if topic is None:
            raise GapError(f"unknown topic {topic_id!r}: the list changed since it was shown; refresh and pick again")
        return topic

    def dismiss(self, topic_id: str, who: str | None = None, since: float | None = None) -> Topic:
        topic = self.find(topic_id, since)
        mark = {"by": who, "at": time.time(), "topic": topic.label}
        self.state.update(lambda s: s["dismissed"].update({q["message_id"]: mark for q in topic.questions}))
        return topic

    def merge(self, topic_id: str, other_id: str, since: float | None = None) -> None:
        if topic_id == other_id:
            raise GapError("pick two different topics to merge")
        topics = {t.topic_id: t for t in self.topics(since)}
        for tid in (topic_id, other_id):
            if tid not in topics:
                raise GapError(f"unknown topic {tid!r}: the list changed since it was shown; refresh and pick again")
        members = [q["message_id"] for tid in (topic_id, other_id) for q in topics[tid].questions]
        self.state.update(lambda s: s["merges"].append(members))

    def write_answer(self, topic_id: str, question: str, answer: str, who: str | None = None,
                     category: str | None = None, since: float | None = None) -> str:
        """Save the answer as an FAQ entry, index it at once, close the topic's questions; returns the entry id."""
        topic = self.find(topic_id, since)
        entry = self.knowledge.add_faq(question or topic.label, answer, category, who,
                                       message=f"answer for gap topic: {topic.label[:100]}")
        if self.retriever is not None:
            self.retriever.refresh()
        mark = {"by": who, "at": time.time(), "faq": entry}
        self.state.update(lambda s: s["answered"].update({q["message_id"]: mark for q in topic.questions}))
        return entry


# ---- command line -------------------------------------------------------------------------------------------------

def _since(text: str | None) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        raise SystemExit(f"--since: not a date: {text!r} (use YYYY-MM-DD)") from None


def cmd_gaps(settings: Settings, args: argparse.Namespace) -> int:
    """`chatapp gaps [--since DATE] [--format table|json]`: the open topics, as the console shows them."""
    from chatapp.embeddings import load_embedder
    from chatapp.feedback import FeedbackError, FeedbackStore

    since = _since(args.since)
    if not settings.database_url and not settings.feedback_db.exists():
        print(f"no feedback database at {settings.feedback_db} yet: nothing to group")
        return 0
    store = FeedbackStore.open(settings)
    try:
        finder = GapFinder(settings, store, load_embedder(settings.retrieval.embedder,
                                                          settings.retrieval.embed_threads))
        finder.threshold = args.threshold
        topics = finder.topics(since)
    except (FeedbackError, GapError) as exc:
        print(f"error: {exc}")
        return 1
    finally:
        store.close()
    if args.format == "json":
        print(json.dumps([t.summary() for t in topics], indent=1, ensure_ascii=False))
        return 0
    print(f"{len(topics)} topics, {sum(t.count for t in topics)} questions")
    print(f"{'count':>5}  {'trend':<7}  {'key words':<30}  topic")
    for t in topics:
        print(f"{t.count:>5}  {t.trend:<7}  {', '.join(t.keywords)[:30]:<30}  {t.label[:90]}")
    return 0


def cmd_eval_gaps(settings: Settings, args: argparse.Namespace) -> int:
    """`chatapp eval gaps`: BANKING77 queries as unanswered questions; topics, ARI and purity against the intents."""
    from sklearn.metrics import adjusted_rand_score

    from chatapp.embeddings import load_embedder

    path = Path(args.data) / f"{args.split}.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:  # the csv module: some texts span lines
            rows = list(csv.DictReader(f))
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror or exc}")
        return 2
    texts, intents = [r["text"] for r in rows], [r["category"] for r in rows]
    embedder = load_embedder(settings.retrieval.embedder, settings.retrieval.embed_threads)
    started = time.perf_counter()
    vectors = embedder.encode_queries(texts)
    embedded = time.perf_counter()
    labels = group(vectors, args.threshold)
    seconds = time.perf_counter() - embedded
    result = {"questions": len(texts), "intents": len(set(intents)), "topics": int(labels.max()) + 1,
              "ari": round(float(adjusted_rand_score(intents, labels)), 3), "purity": round(purity(intents, labels), 3),
              "group_seconds": round(seconds, 2), "embed_seconds": round(embedded - started, 1),
              "threshold": args.threshold, "embedder": embedder.name}
    print(f"BANKING77 {args.split}: {result['questions']:,} questions ({result['intents']} intents, not given)\n"
          f"topics {result['topics']}  ARI {result['ari']:.3f}  purity {result['purity']:.3f}  "
          f"grouping {seconds:.2f} s (embedding {result['embed_seconds']:.1f} s, {embedder.name})")
    if args.json:
        print(json.dumps(result))
    return 0


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Registers `chatapp gaps` and `chatapp eval gaps` (joining the `eval` command another module made)."""
    parser = subparsers.add_parser("gaps", help="the questions the bot could not answer, grouped by topic")
    parser.add_argument("--since", help="only questions asked on or after this date (YYYY-MM-DD)")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help=argparse.SUPPRESS)
    parser.set_defaults(func=cmd_gaps)

    from chatapp.evaluate import eval_targets

    target = eval_targets(subparsers).add_parser("gaps", help="BANKING77: topics, adjusted Rand index and purity against intents")
    target.add_argument("--data", default=str(BANKING77), help=f"folder with test.csv/train.csv (default {BANKING77})")
    target.add_argument("--split", choices=["test", "train"], default="test")
    target.add_argument("--threshold", type=float, default=THRESHOLD, help="cosine distance threshold")
    target.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    target.set_defaults(func=cmd_eval_gaps)
