"""Search the knowledge base: FAISS (dense) led, BM25 breaking the dense near-ties, aware of the conversation, and
the rule that hands a conversation to a person.

How a question is searched (each step measured by ``chatapp eval retrieval``, MiniLM):
1. the business/product under discussion is found in the conversation (the most recent mention of a known entity,
   fuzzy-matched: "allen bell" finds ALLENBELL) and candidates are restricted to its chunks plus the general ones;
   this is what matters most on DSTC11 dev (BM25 R@1 0.12 -> 0.42, dense 0.12 -> 0.87);
2. the last user message is the query; a short follow-up ("and on Sundays?") is prefixed with the previous user turn;
3. dense scores: an FAQ is scored on its question and its answer (mean of both cosines), an article chunk on its
   heading + text. The fused score is that cosine plus ``retrieval.bm25_weight`` (0.03) x BM25's coverage of the
   query (its score over the most the query's terms could score: 0..1), with the entity's own name left out of the
   BM25 query when the search is restricted to it. So BM25 only reorders candidates whose cosines are within 0.03.
   Measured: weighted RRF (BM25 weight 0.25, k 10, the earlier fusion) cost R@1 everywhere on paraphrased
   questions - DSTC11 dev 0.835 vs dense 0.867, BANKING77 (one FAQ per intent, 3,080 test queries) 0.719 vs 0.729,
   CLINC150 as an FAQ set (held out: never used to choose) 0.792 vs 0.813 - and BM25 / best candidate's score in
   place of coverage let one common word ("here", "order") overturn near-ties. Now: DSTC11 0.867 (= dense),
   BANKING77 0.730 (dense 0.729, BM25 0.510), CLINC150 0.812 (dense 0.813: 4 of 4,500 near-ties lost). On
   paraphrases BM25 adds little either way; it is kept for exact terms dense misses (names, codes) and for its own
   top-N among the candidates of an unrestricted search (``bm25_weight = 0`` ranks by dense alone);
4. confidence is the cosine between the question and the closest FAQ question (or article chunk). Below a calibrated
   threshold the bot offers a person instead of guessing. The FAQ threshold is tuned where a knowledge base has one
   question per answer (BANKING77 train queries against one FAQ per intent, CLINC150 val against one FAQ per
   banking/credit-card intent; <= 4% false handoff on both): 0.44 gives false handoff 0.02 on BANKING77 test
   (0.159 at the earlier 0.60, which had been tuned against ~100 paraphrases per intent) and 0.038 on CLINC150
   banking/credit-card test against one FAQ per intent, with CLINC150 out-of-scope recall 0.958 / 0.965 against
   those FAQs (0.835 against all 3,000 train queries as FAQs, 0.962 at 0.60). Broader or conversational questions
   sit lower: all 150 CLINC intents as FAQs 0.137 false handoff, DSTC11 dev last turns 0.271 (0.642 at 0.60).
   Asking for a person, in English or Chinese, hands off at once.

FAISS: exact ``IndexFlatIP`` up to ``retrieval.approximate_above`` vectors, IVF (or HNSW) above.

On disk (``settings.index_dir``): ``manifest.json`` names one generation of ``records-<g>.jsonl``, ``vectors-<g>.npy``
and ``index-<g>.faiss``; each file is written to a temp name and renamed, the manifest last, so a crash leaves the
previous generation whole. BM25 is rebuilt from the records on load (a fraction of a second for 12k FAQs).
"""
from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import faiss
import numpy as np
from scipy import sparse
from tqdm.auto import tqdm

from chatapp.config import Settings
from chatapp.embeddings import Embedder, load_embedder
from chatapp.knowledge import Chunk, Problems, parse_file, read_text, scan_folder

log = logging.getLogger(__name__)

SCHEMA = 1
# Handoff thresholds per embedder, from `chatapp eval retrieval`. FAQ: the lower of the thresholds tuned (<= 4% false
# handoff) on BANKING77 train and CLINC150 val against one FAQ question per intent (minilm: 0.494 and 0.437; e5 not
# re-tuned since, its 0.87 came from CLINC val against all train queries as FAQs). Doc: ABCD customer turns vs CLINC
# oos_val against the default knowledge/ articles. Settings override.
CALIBRATED_HANDOFF = {
    "minilm": {"faq": 0.44, "doc": 0.30},
    "e5": {"faq": 0.87, "doc": 0.82},
}


# --------------------------------------------------------------------------------------------------- results

@dataclass
class Hit:
    chunk_id: str
    source: str
    title: str
    text: str
    score: float  # fused score (cosine + bm25_weight x BM25 coverage): only the order means something
    kind: str  # "doc" | "faq"
    answer: str | None = None  # the curated answer for FAQ hits
    entity: str | None = None  # business/product the chunk is about, if known
    similarity: float = 0.0  # cosine between the question and the chunk's question/text: comparable across queries


@dataclass
class SearchResult:
    hits: list[Hit]
    query: str  # the query actually searched, with the entity it was restricted to: "[ALLENBELL] is the wifi free?"
    confidence: float  # cosine of the best match (FAQ question or article chunk)
    handoff: str | None  # None, "asked_for_human", or "low_confidence"
    curated: Hit | None  # a near-certain FAQ match whose answer may be returned as-is
    threshold: float = 0.0  # the handoff threshold that applied to the best match
    entity: str | None = None  # the business/product the conversation is about


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    embedded_chunks: int = 0
    shared_chunks: int = 0  # vectors another replica embedded, read from the database (chatapp/shared_index.py)
    total_chunks: int = 0
    rebuilt: str | None = None  # why everything was re-embedded, if it was
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def changed_anything(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.rebuilt)

    def summary(self) -> str:
        parts = [f"{self.total_chunks} chunks indexed"]
        if self.rebuilt:
            parts.append(f"rebuilt: {self.rebuilt}")
        parts.append(f"{len(self.added)} files added, {len(self.changed)} changed, {len(self.removed)} removed, "
                     f"{self.unchanged} unchanged; {self.embedded_chunks} chunks embedded in {self.seconds:.1f} s"
                     + (f" ({self.shared_chunks} more from the shared database)" if self.shared_chunks else ""))
        if self.warnings:
            parts.append(f"{len(self.warnings)} warnings")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------------- text pieces

STOPWORDS = frozenset(
    "a an the is are was were be been am do does did you your yours i me my we our us it its of to in on at for with "
    "and or but can could would will shall should may might there this that these those have has had any what how "
    "which who whom when where why if so as by from about into than then them they their he she his her not no "
    "please hi hello thanks thank just also".split()
)
TOKEN = re.compile(r"[a-z0-9]+|[\u3400-\u9fff\uf900-\ufaff]")


def tokenize(text: str) -> list[str]:
    """Lowercase words without stopwords; CJK text as single characters, so BM25 also works for Chinese."""
    return [t for t in TOKEN.findall(text.lower()) if t not in STOPWORDS]


HUMAN_REQUEST = re.compile(
    r"\b(?:talk|speak|chat)\s+(?:to|with)\s+(?:a|an|the|some|your|real|actual|live)?\s*(?:real\s+|live\s+|actual\s+)?"
    r"(?:human|person|people|agent|representative|rep|operator|someone|somebody|staff|manager|supervisor)\b"
    r"|\b(?:connect|transfer|put)\s+me\s+(?:through\s+)?(?:to|with)\b"
    r"|\b(?:real|live|actual)\s+(?:human|person|agent|representative)\b"
    r"|\bhuman\s+(?:being|agent|support|representative|please)\b"
    r"|\b(?:want|need|get|give\s+me|request)\s+(?:a|an|to\s+talk\s+to\s+an?)?\s*(?:human|representative|operator|"
    r"customer\s+service\s+agent|support\s+agent)\b"
    r"|^\s*(?:an?\s+)?(?:agent|human|representative|operator|person)[\s,.!]*(?:please|pls|now)?[\s.!]*$"
    r"|转人工|人工客服|人工服务|真人|客服人员|接线员|(?:找|要|转|接|联系)(?:个|一下)?(?:人工(?!智能)|客服)"
    r"|(?:跟|和|与)(?:真)?人(?:说话|聊|谈|沟通)",
    re.I,
)


def asks_for_human(message: str) -> bool:
    """An explicit request for a person (EN/ZH). Deliberately narrow: "transfer money to a person" is not one."""
    return bool(HUMAN_REQUEST.search(message))


class BM25Index:
    """rank_bm25's Okapi statistics (idf with its epsilon floor, k1, b) turned into one sparse docs x terms matrix,
    so scoring a query is a column sum, not a Python loop over every document."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        from rank_bm25 import BM25Okapi

        corpus = [tokenize(t) or ["\0"] for t in texts]  # rank_bm25 divides by the corpus length
        self.vocab: dict[str, int] = {}
        self.term_max = np.zeros(0, dtype=np.float32)
        if not corpus:
            self.matrix = sparse.csc_matrix((0, 0), dtype=np.float32)
            return
        stats = BM25Okapi(corpus, k1=k1, b=b)
        rows, cols, values = [], [], []
        doc_len = np.asarray(stats.doc_len, dtype=np.float32)
        norm = k1 * (1 - b + b * doc_len / max(stats.avgdl, 1e-9))
        for doc, freqs in enumerate(stats.doc_freqs):
            for word, tf in freqs.items():
                col = self.vocab.setdefault(word, len(self.vocab))
                rows.append(doc)
                cols.append(col)
                values.append(stats.idf[word] * tf * (k1 + 1) / (tf + norm[doc]))
        self.matrix = sparse.csc_matrix((np.asarray(values, np.float32), (rows, cols)),
                                        shape=(len(corpus), len(self.vocab)))
        # A term's largest possible contribution to any document (idf x (k1 + 1), its limit as tf grows).
        self.term_max = np.zeros(len(self.vocab), dtype=np.float32)
        for word, col in self.vocab.items():
            self.term_max[col] = max(stats.idf[word], 0.0) * (k1 + 1)

    def _columns(self, query: str, skip: frozenset[str] = frozenset()) -> list[int]:
        return [self.vocab[t] for t in tokenize(query) if t in self.vocab and t not in skip]

    def scores(self, query: str, skip: frozenset[str] = frozenset()) -> np.ndarray:
        cols = self._columns(query, skip)
        if not cols:
            return np.zeros(self.matrix.shape[0], dtype=np.float32)
        return np.asarray(self.matrix[:, cols].sum(axis=1), dtype=np.float32).ravel()

    def ceiling(self, query: str, skip: frozenset[str] = frozenset()) -> float:
        """The most the query could score (every known query term at its limit). BM25 / ceiling is the share of the
        query's term weight a document matches (0..1); unlike BM25 / the best candidate's score it stays small when
        the best match is one common word ("here", "order")."""
        return float(self.term_max[self._columns(query, skip)].sum())


def _trigrams(text: str) -> set[str]:
    return {text[i:i + 3] for i in range(len(text) - 2)}


def _norm_name(text: str) -> str:
    text = text.lower().replace("&", " and ").replace("'", "").replace("’", "")
    return " ".join(re.sub(r"[^0-9a-z\u3400-\u9fff]+", " ", text).split())


TYPE_WORDS = ("guest house", "guesthouse", "bed and breakfast", "b and b", "restaurant", "hotel")
FUZZY_SKIP_FIRST = {"a", "an", "the", "at", "in", "to", "of", "for", "and", "or", "is", "it", "my", "our"}


class EntityMatcher:
    """Finds the businesses/products of the knowledge base mentioned in text: exact on normalised names and their
    short forms ("The Nirala" -> "nirala", "Restaurant Alimentum" -> "alimentum"), spaces ignored ("allen bell"),
    and close misspellings of long names ("almentum")."""

    def __init__(self, entities: Iterable[str], categories: dict[str, str | None] | None = None):
        self.categories = categories or {}
        owners: dict[str, set[str]] = {}
        for name in entities:
            for alias in self._aliases(name):
                owners.setdefault(alias, set()).add(name)
        self.alias = {a: next(iter(n)) for a, n in owners.items() if len(n) == 1}  # ambiguous short forms dropped
        self.max_words = max((len(_norm_name(n).split()) for n in entities), default=0) + 1
        self.max_chars = max(map(len, self.alias), default=0) + 2
        # For misspellings: long aliases by (first letter, length), with their trigrams. A misspelling keeps the first
        # letter and the length within one, so only those few aliases are compared (an index by trigram alone made
        # every window of every message walk thousands of aliases sharing "the" or "ing": ~22 of a 35 ms search at 12k FAQs).
        self._by_head: dict[tuple[str, int], list[tuple[str, set[str]]]] = {}
        for key in self.alias:
            if len(key) >= 7:
                self._by_head.setdefault((key[0], len(key)), []).append((key, _trigrams(key)))
        self.mentions = functools.lru_cache(maxsize=20_000)(self._mentions)

    def _fuzzy(self, key: str) -> str | None:
        grams = _trigrams(key)
        shared = [(len(grams & alias_grams), alias) for size in (len(key) - 1, len(key), len(key) + 1)
                  for alias, alias_grams in self._by_head.get((key[0], size), ())]
        best = sorted((item for item in shared if item[0] >= 0.5 * len(grams)), key=lambda item: -item[0])
        for _, alias in best[:3]:
            if difflib.SequenceMatcher(None, key, alias).ratio() >= 0.88:
                return alias
        return None

    @staticmethod
    def _aliases(name: str) -> set[str]:
        full = _norm_name(name)
        forms = {full}
        if full.startswith("the "):
            forms.add(full[4:])
        for form in list(forms):
            for word in TYPE_WORDS:
                if form.endswith(" " + word):
                    forms.add(form[: -len(word) - 1])
                if form.startswith(word + " "):
                    forms.add(form[len(word) + 1:])
        return {f.replace(" ", "") for f in forms if len(f.replace(" ", "")) >= 4}

    def _mentions(self, text: str) -> tuple[str, ...]:
        words = _norm_name(text).split()
        found: list[str] = []
        i = 0
        while i < len(words):
            match = None
            for length in range(min(self.max_words, len(words) - i), 0, -1):
                key = "".join(words[i:i + length])
                if key in self.alias:
                    match = (length, self.alias[key])
                    break
                if 8 <= len(key) <= self.max_chars and words[i] not in FUZZY_SKIP_FIRST:
                    close = self._fuzzy(key)
                    if close:
                        match = (length, self.alias[close])
                        break
            if match:
                found.append(match[1])
                i += match[0]
            else:
                i += 1
        return tuple(found)

    def detect(self, question: str, history: Sequence[dict]) -> str | None:
        """The entity under discussion: the latest mentioned, unless the question names a category ("the hotel")
        that an earlier mentioned entity has and the latest has not."""
        if not self.alias:
            return None
        mentioned: list[str] = []
        for message in [*history, {"content": question}]:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str) and content:
                mentioned.extend(self.mentions(content))
        if not mentioned:
            return None
        asked = set(tokenize(question))
        for name in reversed(mentioned):
            category = (self.categories.get(name) or "").lower()
            if category and category in asked:
                return name
        return mentioned[-1]


# --------------------------------------------------------------------------------------------------- the index

@dataclass
class IndexData:
    """One consistent generation of the index, never mutated once built (refresh swaps in a new one)."""

    records: list[Chunk]
    vectors: np.ndarray  # (n_views, dim) float32, L2-normalised
    view_start: np.ndarray  # (n_records + 1,) record r owns views view_start[r]:view_start[r+1]
    index: faiss.Index
    files: dict[str, dict[str, Any]]  # rel path -> {sha256, size, mtime_ns, chunks}
    key: dict[str, Any] = field(default_factory=dict)  # embedder, dim, chunking the vectors were made with
    bm25: BM25Index = field(init=False)
    entities: EntityMatcher = field(init=False)
    by_entity: dict[str, np.ndarray] = field(init=False)
    general: np.ndarray = field(init=False)  # records without an entity: always candidates
    view_owner: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.bm25 = BM25Index([r.search_text() for r in self.records])
        groups: dict[str, list[int]] = {}
        categories: dict[str, str | None] = {}
        for i, r in enumerate(self.records):
            if r.entity:
                groups.setdefault(r.entity, []).append(i)
                categories.setdefault(r.entity, r.category)
        self.by_entity = {e: np.asarray(ix, dtype=np.int64) for e, ix in groups.items()}
        self.general = np.asarray([i for i, r in enumerate(self.records) if not r.entity], dtype=np.int64)
        self.entities = EntityMatcher(groups, categories)
        self.view_owner = np.repeat(np.arange(len(self.records)), np.diff(self.view_start))

    def primary_view(self, rec: np.ndarray) -> np.ndarray:
        return self.view_start[rec]


def build_faiss(vectors: np.ndarray, approximate_above: int, kind: str = "ivf") -> faiss.Index:
    """Exact inner product (= cosine on normalised vectors) up to ``approximate_above`` vectors; above, IVF (default:
    builds in 27 s at 100k vectors on 2 busy cores, where HNSW took 280 s) or HNSW. Either way ~1-2 ms a query."""
    dim = vectors.shape[1] if vectors.ndim == 2 and vectors.shape[1] else 384
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) <= approximate_above:
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    else:
        nlist = max(1, min(int(4 * np.sqrt(len(vectors))), len(vectors) // 39))  # faiss wants 39 points a list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), 50 * nlist), replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = 32
    if len(vectors):
        index.add(vectors)
    return index


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temp name
        np.save(f, array)


class IndexStore:
    """The files of the index under ``index_dir`` (see the module docstring)."""

    def __init__(self, index_dir: Path):
        self.dir = Path(index_dir)
        self.manifest_path = self.dir / "manifest.json"

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("index manifest %s unreadable (%s); rebuilding the index", self.manifest_path, err)
            return None
        return manifest if isinstance(manifest, dict) else None

    def load(self, manifest: dict[str, Any], approximate_above: int,
             approximate_index: str = "ivf") -> tuple[IndexData | None, str | None]:
        """(data, None) or (None, why it cannot be used). A bad FAISS file alone is rebuilt from the vectors."""
        gen = manifest.get("generation")
        try:
            records = [Chunk(**json.loads(line)) for line in
                       (self.dir / f"records-{gen}.jsonl").read_text(encoding="utf-8").splitlines() if line]
            vectors = np.load(self.dir / f"vectors-{gen}.npy", allow_pickle=False)
            view_start = np.asarray(manifest["view_start"], dtype=np.int64)
        except Exception as err:  # missing, truncated or edited by hand
            return None, f"index files unreadable ({err.__class__.__name__}: {err})"
        if (vectors.ndim != 2 or vectors.dtype != np.float32 or vectors.shape[1] != manifest.get("dim")
                or len(records) != manifest.get("count") or len(view_start) != len(records) + 1
                or (len(records) and view_start[-1] != len(vectors))):
            return None, "index files do not match their manifest"
        index = None
        try:
            index = faiss.read_index(str(self.dir / f"index-{gen}.faiss"))
            if index.ntotal != len(vectors) or index.d != vectors.shape[1]:
                log.warning("FAISS index does not match its vectors; rebuilding it")
                index = None
        except Exception as err:
            log.warning("FAISS index unreadable (%s); rebuilding it from the stored vectors", err)
        if index is None:
            index = build_faiss(vectors, approximate_above, approximate_index)
            _atomic_write(self.dir / f"index-{gen}.faiss", lambda p: faiss.write_index(index, str(p)))
        key = {k: manifest.get(k) for k in ("schema", "embedder", "dim", "chunk_chars")}
        return IndexData(records, vectors, view_start, index, manifest.get("files", {}), key), None

    def save(self, data: IndexData, manifest: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        gen = uuid.uuid4().hex[:12]
        lines = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in data.records)
        _atomic_write(self.dir / f"records-{gen}.jsonl", lambda p: p.write_text(lines, encoding="utf-8"))
        _atomic_write(self.dir / f"vectors-{gen}.npy", lambda p: _save_npy(p, data.vectors))
        _atomic_write(self.dir / f"index-{gen}.faiss", lambda p: faiss.write_index(data.index, str(p)))
        manifest = {**manifest, "generation": gen, "view_start": data.view_start.tolist()}
        _atomic_write(self.manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=1), encoding="utf-8"))
        for old in self.dir.iterdir():  # earlier generations, and temp files of a crashed save
            if old.name != "manifest.json" and gen not in old.name and (
                    old.name.startswith(("records-", "vectors-", "index-")) or old.name.endswith(".tmp")):
                old.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------- ingest

def _settings_key(settings: Settings, embedder: Embedder) -> dict[str, Any]:
    """What, if changed, makes every stored vector or chunk wrong."""
    return {"schema": SCHEMA, "embedder": embedder.name, "dim": int(embedder.dim),
            "chunk_chars": int(settings.retrieval.chunk_chars)}


def _embed_views(embedder: Embedder, chunks: list[Chunk], progress: bool, batch: int = 512) -> np.ndarray:
    """Blocks of 512 texts: sentence-transformers sorts each block by length, so batches carry little padding."""
    views = [v for c in chunks for v in c.views()]
    out = np.zeros((len(views), embedder.dim), dtype=np.float32)
    with tqdm(total=len(views), desc="embedding", unit="text", disable=not progress or not views,
              leave=False) as bar:
        for start in range(0, len(views), batch):
            out[start:start + batch] = embedder.encode_passages(views[start:start + batch])
            bar.update(len(views[start:start + batch]))
    return out


def ingest(settings: Settings, embedder: Embedder, current: IndexData | None = None, progress: bool = False,
           store: IndexStore | None = None) -> tuple[IndexData, IngestReport]:
    """Bring the index in line with the knowledge folder: only files whose content hash changed are re-read, and of
    those only the chunks whose text is new are embedded."""
    started = time.perf_counter()
    rs = settings.retrieval
    store = store or IndexStore(settings.index_dir)
    report = IngestReport()
    problems = Problems()
    key = _settings_key(settings, embedder)
    if current is not None and current.key and current.key != key:  # settings changed while running
        changed = [f"{k} {current.key.get(k)} -> {key[k]}" for k in key if current.key.get(k) != key[k]]
        report.rebuilt = "settings changed (" + ", ".join(changed) + "): re-embedding everything"
        current = None
    elif current is None:
        manifest = store.read_manifest()
        if manifest is not None:
            old_key = {k: manifest.get(k) for k in key}
            if old_key != key:
                changed = [f"{k} {old_key[k]} -> {key[k]}" for k in key if old_key[k] != key[k]]
                report.rebuilt = "settings changed (" + ", ".join(changed) + "): re-embedding everything"
                log.info("index: %s", report.rebuilt)
            else:
                current, why = store.load(manifest, rs.approximate_above, rs.approximate_index)
                if current is None:
                    report.rebuilt = f"{why}: rebuilding the index"
                    log.warning("index: %s", report.rebuilt)
        elif store.manifest_path.exists():
            report.rebuilt = "manifest unreadable: rebuilding the index"
    old_files = current.files if current else {}
    old_chunks: dict[str, list[int]] = {}
    if current:
        for i, r in enumerate(current.records):
            old_chunks.setdefault(r.source, []).append(i)

    scanned = scan_folder(rs.knowledge_dir, int(rs.max_file_mb * 2**20), problems)
    keep: dict[str, tuple[dict[str, Any], list[int] | list[Chunk]]] = {}  # rel -> (file info, old ids | new chunks)
    for rel, scan in scanned.items():
        old = old_files.get(rel)
        if old and old.get("size") == scan.size and old.get("mtime_ns") == scan.mtime_ns:
            keep[rel] = (old, old_chunks.get(rel, []))
            report.unchanged += 1
            continue
        text, digest = read_text(Path(rs.knowledge_dir) / rel, rel, problems)
        info = {"sha256": digest, "size": scan.size, "mtime_ns": scan.mtime_ns}
        if old and old.get("sha256") == digest:  # touched, not changed
            keep[rel] = ({**info, "chunks": old.get("chunks", 0)}, old_chunks.get(rel, []))
            report.unchanged += 1
            continue
        chunks = parse_file(rel, text, rs.chunk_chars, problems) if text is not None else []
        if text is not None and not chunks:
            problems.add(f"{rel}: no usable content found")
        (report.changed if old else report.added).append(rel)
        keep[rel] = ({**info, "chunks": len(chunks)}, chunks)
    report.removed = sorted(set(old_files) - set(scanned))
    report.warnings = problems.messages

    if current is not None and not report.changed_anything:
        files = {rel: info for rel, (info, _) in keep.items()}
        if files != current.files:  # only mtimes moved: remember them so the next check stays cheap
            current.files = files
            manifest = store.read_manifest() or {}
            _atomic_write(store.manifest_path, lambda p: p.write_text(json.dumps({**manifest, "files": files},
                                                                                 indent=1), encoding="utf-8"))
        report.total_chunks = len(current.records)
        report.seconds = time.perf_counter() - started
        return current, report

    # In an edited file most chunks are usually unchanged (one FAQ appended to 12k): reuse their vectors by text.
    reuse: dict[tuple[str, ...], int] = {}
    for rel in report.changed:
        for i in old_chunks.get(rel, []):
            reuse.setdefault(tuple(current.records[i].views()), i)
    to_embed = [c for _, (_, items) in sorted(keep.items()) for c in items
                if isinstance(c, Chunk) and tuple(c.views()) not in reuse]
    if settings.database_url:  # several replicas: embed only what none of them embedded before
        from chatapp.shared_index import embed_shared

        new_vectors, report.shared_chunks = embed_shared(settings, key, to_embed,
                                                         lambda chunks: _embed_views(embedder, chunks, progress))
    else:
        new_vectors = _embed_views(embedder, to_embed, progress)
    report.embedded_chunks = len(to_embed) - report.shared_chunks
    records: list[Chunk] = []
    pieces: list[np.ndarray] = []
    view_start = [0]
    new_offset = 0
    for rel, (info, items) in sorted(keep.items()):
        for item in items:
            if isinstance(item, Chunk) and tuple(item.views()) in reuse:
                old = reuse[tuple(item.views())]
                pieces.append(current.vectors[current.view_start[old]:current.view_start[old + 1]])
                records.append(item)
            elif isinstance(item, Chunk):
                n = len(item.views())
                pieces.append(new_vectors[new_offset:new_offset + n])
                new_offset += n
                records.append(item)
            else:
                a, b = current.view_start[item], current.view_start[item + 1]
                pieces.append(current.vectors[a:b])
                records.append(current.records[item])
            view_start.append(view_start[-1] + len(pieces[-1]))
    vectors = np.concatenate(pieces) if pieces else np.zeros((0, embedder.dim), dtype=np.float32)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    files = {rel: info for rel, (info, _) in keep.items()}
    data = IndexData(records, vectors, np.asarray(view_start, dtype=np.int64),
                     build_faiss(vectors, rs.approximate_above, rs.approximate_index), files, key)
    store.save(data, {**key, "count": len(records), "files": files, "knowledge_dir": str(rs.knowledge_dir),
                      "index": rs.approximate_index if len(vectors) > rs.approximate_above else "flat",
                      "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    report.total_chunks = len(records)
    report.seconds = time.perf_counter() - started
    log.info("index: %s", report.summary())
    return data, report


# --------------------------------------------------------------------------------------------------- search

@functools.lru_cache(maxsize=4096)
def _name_terms(entity: str | None) -> frozenset[str]:
    """The BM25 terms of a business/product name, spelled apart and run together ("allen bell", "allenbell")."""
    if not entity:
        return frozenset()
    words = tokenize(entity)
    return frozenset(words) | {"".join(words)}


class Retriever:
    """The knowledge base, searchable. Thread-safe: searches read one immutable ``IndexData``; refresh swaps it."""

    def __init__(self, settings: Settings, embedder: Embedder, data: IndexData, report: IngestReport):
        self.settings = settings
        self.embedder = embedder
        self.data = data
        self.last_report = report
        self._lock = threading.Lock()

    @classmethod
    def open(cls, settings: Settings, embedder: Embedder | None = None, progress: bool = False) -> "Retriever":
        """Load the index from ``settings.index_dir``, ingesting first whatever changed in the knowledge folder."""
        embedder = embedder or load_embedder(settings.retrieval.embedder, settings.retrieval.embed_threads)
        data, report = ingest(settings, embedder, progress=progress)
        return cls(settings, embedder, data, report)

    def refresh(self, progress: bool = False) -> IngestReport:
        """Re-ingest changed files (cheap when nothing changed: one stat per file)."""
        with self._lock:
            data, report = ingest(self.settings, self.embedder, self.data, progress=progress)
            self.data = data
            self.last_report = report
            return report

    def needs_refresh(self) -> bool:
        """True when a file in the knowledge folder was added, removed or modified since the last ingest."""
        scanned = scan_folder(self.settings.retrieval.knowledge_dir,
                              int(self.settings.retrieval.max_file_mb * 2**20), Problems())
        files = self.data.files
        return set(scanned) != set(files) or any(
            files[r].get("size") != s.size or files[r].get("mtime_ns") != s.mtime_ns for r, s in scanned.items())

    def __len__(self) -> int:
        return len(self.data.records)

    def thresholds(self) -> dict[str, float]:
        rs = self.settings.retrieval
        calibrated = CALIBRATED_HANDOFF.get(self.embedder.name, CALIBRATED_HANDOFF["minilm"])
        return {"faq": calibrated["faq"] if rs.handoff_below is None else float(rs.handoff_below),
                "doc": calibrated["doc"] if rs.handoff_below_doc is None else float(rs.handoff_below_doc)}

    def build_query(self, question: str, history: Sequence[dict]) -> str:
        """The last message, prefixed with the previous user turn when it is a short follow-up."""
        if len(tokenize(question)) >= 2 or self.settings.retrieval.history_turns <= 1:
            return question
        users = [m["content"] for m in history if isinstance(m, dict) and m.get("role") == "user"
                 and isinstance(m.get("content"), str)]
        return " ".join([*users[-(self.settings.retrieval.history_turns - 1):][-1:], question]).strip()

    def search(self, question: str, history: Sequence[dict] = (), k: int | None = None,
               entity: str | None = None, use_entity: bool = True, dense: bool = True,
               lexical: bool = True) -> SearchResult:
        """Top-k hits for the question in its conversation. ``entity`` forces the business/product; ``use_entity``,
        ``dense`` and ``lexical`` switch a part off (for the comparisons in the evaluation)."""
        rs = self.settings.retrieval
        k = k or rs.top_k
        data = self.data
        question = (question or "").strip()
        history = list(history or [])
        handoff = "asked_for_human" if question and asks_for_human(question) else None
        if use_entity and entity is None:
            entity = data.entities.detect(question, history)
        query = self.build_query(question, history)
        shown = f"[{entity}] {query}" if entity else query
        n = len(data.records)
        if not question or n == 0:
            return SearchResult([], shown, 0.0, handoff or ("low_confidence" if question else None), None,
                                entity=entity)

        # Candidates: the entity's chunks + general ones, or the dense/BM25 top-N of everything.
        restricted = entity is not None and entity in data.by_entity
        qvec = self.embedder.encode_queries([query])[0] if dense or not lexical else None
        bm25 = data.bm25.scores(query) if lexical else None
        if restricted:
            candidates = np.union1d(data.by_entity[entity], data.general)
            if len(data.general) > 5_000 and qvec is not None:  # large general part: take its dense top-N only
                candidates = np.union1d(data.by_entity[entity], self._dense_top(qvec, rs.candidates, data))
        else:
            parts = []
            if qvec is not None:
                parts.append(self._dense_top(qvec, rs.candidates, data))
            if bm25 is not None:
                top = np.argpartition(-bm25, min(rs.candidates, n - 1))[: rs.candidates]
                parts.append(top[bm25[top] > 0])
            candidates = np.unique(np.concatenate(parts)) if parts else np.arange(0)
            if len(candidates) == 0:
                candidates = np.arange(min(n, k))

        fused = np.zeros(len(candidates))
        dense_score = None
        similarity = np.zeros(len(candidates), dtype=np.float32)
        if qvec is not None:
            starts, counts = data.view_start[candidates], np.diff(data.view_start)[candidates]
            first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)  # each candidate's first view
            view_ids = np.repeat(starts - first, counts) + np.arange(counts.sum())
            view_sims = data.vectors[view_ids] @ qvec
            owner = np.repeat(np.arange(len(candidates)), counts)
            dense_score = np.bincount(owner, weights=view_sims, minlength=len(candidates)) / np.maximum(counts, 1)
            similarity = view_sims[first].astype(np.float32)  # the question (FAQ) or the chunk text (article)
        if dense and dense_score is not None:
            # Dense-led score fusion: the cosine, plus BM25's coverage of the query (0..1) times a small weight, so
            # BM25 only reorders candidates whose cosines are within bm25_weight of each other (see module docstring).
            # Among one business's chunks its name tells none apart (and favours its shortest ones): left out.
            fused = dense_score.astype(np.float64)
            skip = _name_terms(entity) if restricted else frozenset()
            ceiling = data.bm25.ceiling(query, skip) if bm25 is not None and rs.bm25_weight > 0 else 0.0
            if ceiling > 0:
                lexical_score = data.bm25.scores(query, skip) if skip else bm25
                fused = fused + rs.bm25_weight * lexical_score[candidates] / ceiling
        elif bm25 is not None:
            fused = bm25[candidates].astype(np.float64)
        order = np.argsort(-fused, kind="stable")[:k]

        hits = []
        for j in order:
            r = data.records[candidates[j]]
            hits.append(Hit(r.chunk_id, r.source, r.title, r.text, float(fused[j]), r.kind, r.answer, r.entity,
                            float(similarity[j])))

        # Confidence: the closest FAQ question / article chunk among the candidates, against its kind's threshold.
        thresholds = self.thresholds()
        kinds = np.array([data.records[c].kind == "faq" for c in candidates])
        limits = np.where(kinds, thresholds["faq"], thresholds["doc"])
        best = int(np.argmax(similarity - limits)) if qvec is not None else 0
        confidence, threshold = float(similarity[best]), float(limits[best])
        if handoff is None and qvec is not None and confidence < threshold:
            handoff = "low_confidence"
        curated = None
        if hits and hits[0].kind == "faq" and hits[0].similarity >= rs.curated_above and handoff is None:
            curated = hits[0]
        return SearchResult(hits, shown, confidence, handoff, curated, threshold, entity)

    def _dense_top(self, qvec: np.ndarray, n: int, data: IndexData) -> np.ndarray:
        """Records owning the n nearest views."""
        n = min(n, data.index.ntotal)
        if n <= 0:
            return np.arange(0)
        _, ids = data.index.search(qvec[None, :].astype(np.float32), n)
        ids = ids[0][ids[0] >= 0]
        return np.unique(data.view_owner[ids])


# --------------------------------------------------------------------------------------------------- CLI

def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    """`chatapp ingest [--rebuild]`: bring the index in line with the knowledge folder and say what changed."""
    store = IndexStore(settings.index_dir)
    if getattr(args, "rebuild", False) and store.manifest_path.exists():
        store.manifest_path.unlink()
        print("rebuilding the index from scratch")
    embedder = load_embedder(settings.retrieval.embedder, settings.retrieval.embed_threads)
    print(f"knowledge folder: {settings.retrieval.knowledge_dir}\nindex: {settings.index_dir} "
          f"(embedder {embedder.name})")
    _, report = ingest(settings, embedder, progress=True, store=store)
    for warning in report.warnings:
        print(f"warning: {warning}")
    if report.rebuilt:
        print(f"rebuilt: {report.rebuilt}")
    print(report.summary())
    return 0


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Registers `chatapp ingest` and `chatapp eval retrieval` (joining an `eval` command another module made)."""
    ingest_parser = subparsers.add_parser("ingest", help="index the knowledge folder (incremental)")
    ingest_parser.add_argument("--rebuild", action="store_true", help="re-embed everything")
    ingest_parser.set_defaults(func=cmd_ingest)

    from chatapp import evaluate

    evaluate.add_arguments(subparsers)
