"""Retrieved chunks -> the few sentences or bullets that answer the question: what the prompt quotes.

A 135M model given three whole articles wanders: it mixes the policy for gold members with the one for guests, or the
refund for a delivered order with the one for an order in transit. Given the one bullet that applies, it repeats it.
So each hit is cut into units (a sentence, or a bullet with its lead-in), and units are ranked by
- how close they are to the question in meaning (the retriever's embedder, cached per unit text) and in words;
- whether the conditions they state match what the customer said about themselves: a unit about "Gold members" is
  preferred when the customer is gold and pushed down when the customer said they are a guest; the same for an
  order's status (received / in transit / out for delivery / delivered). These are the two axes a shop's policies
  branch on; a knowledge base without them is ranked on meaning and words alone;
- whether the customer states the unit's own condition ("If you have not paid the bill yet, ..." for "I haven't paid
  it yet"): policies are written as conditionals, and the one whose condition was said is the one that applies;
- the rank of the chunk it came from (retrieval already weighed the whole conversation).

The units keep their article heading and source, so the answer can cite them and the guard can check against them.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+(?=[A-Z0-9\"'(*“])|(?<=[。！？])")
BULLET = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+")
MARKUP = re.compile(r"\*\*|__|(?<!\w)[*_](?=\w)|(?<=\w)[*_](?!\w)|`")
WORD = re.compile(r"[a-z0-9]+|[\u3400-\u9fff]")
CONDITIONAL = re.compile(r"^(?:if|when|once|unless)\s+([^,:;]{3,120})[,:;]", re.I)
STOP = frozenset(
    "a an the is are was were be been am do does did you your i me my we our us it its of to in on at for with and "
    "or but can could would will should may there this that have has had what how which who when where why if so as "
    "by from about into than then them they not no please hi hello thanks just also get".split()
)

# Conditions a shop's policies branch on: (axis, value) -> ways a customer or an article says it.
CONDITIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("member", "gold"): ("gold", "金卡", "黄金"),
    ("member", "silver"): ("silver", "银卡", "白银"),
    ("member", "bronze"): ("bronze", "铜卡", "青铜"),
    ("member", "guest"): ("guest", "no membership", "not a member", "don't have a membership", "without a membership",
                          "没有会员", "不是会员", "非会员", "游客"),
    ("status", "received"): ("order received", "hasn't shipped", "has not shipped", "not shipped", "hasn't been shipped",
                             "not yet shipped", "未发货", "还没发货"),
    ("status", "transit"): ("in transit", "on its way", "on the way", "already shipped", "has shipped", "运输中", "已发货"),
    ("status", "out"): ("out for delivery", "派送中"),
    ("status", "delivered"): ("delivered", "已送达", "已签收"),
}
_CONDITION_PATTERNS = {key: re.compile("|".join(r"(?<![a-z])" + re.escape(s) + r"(?![a-z])" for s in spellings), re.I)
                       for key, spellings in CONDITIONS.items()}


@dataclass
class Evidence:
    """One sentence or bullet quoted to the model, with where it came from. Reads like a `retrieval.Hit` to the
    template renderer (`title`, `text`, `source`, `kind`, `chunk_id`), so prompts and training data share it."""

    text: str
    title: str
    source: str
    chunk_id: str  # "<chunk id>~<n>": unique per unit, so the renderer never drops one as a duplicate
    parent: str  # the retrieved chunk's id (what the answer cites)
    score: float = 0.0
    kind: str = "evidence"  # the renderer shows `title` as is (it would replace an FAQ's title by its entity)
    entity: str | None = None
    answer: None = None

    @property
    def heading(self) -> str:
        """The most specific heading ("Shipping › Shipping costs are too high" -> "Shipping costs are too high")."""
        return self.title.split(" › ")[-1].strip()

    def to_dict(self) -> dict:
        return {"text": self.text, "title": self.title, "source": self.source, "chunk_id": self.parent}


def plain(text: str) -> str:
    """Markdown emphasis and code marks off: the model should quote words, not asterisks."""
    return re.sub(r"\s+", " ", MARKUP.sub("", text)).strip()


def split_units(text: str) -> list[str]:
    """A chunk's text as units: each sentence of a paragraph and each bullet (with its continuation lines). A bullet
    such as "Order received or in transit: we waive the shipping fee" relies on its heading for what it is about, so
    the heading travels with every unit (`Evidence.title`)."""
    units: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line for line in block.splitlines() if line.strip()]
        current: list[str] = []
        items: list[str] = []
        for line in lines:
            if BULLET.match(line):
                items.append(BULLET.sub("", line).strip())
            elif items:
                items[-1] += " " + line.strip()  # a bullet's continuation line
            else:
                current.append(line.strip())
        paragraph = " ".join(current)
        sentences = [s.strip() for s in SENTENCE_END.split(paragraph) if s and s.strip()]
        units += [plain(s) for s in sentences if len(plain(s)) > 2]
        units += [plain(i) for i in items if len(plain(i)) > 2]
    return units


def conditions(text: str) -> dict[str, set[str]]:
    """The conditions a text states, by axis: {"member": {"gold"}, "status": {"transit"}}."""
    found: dict[str, set[str]] = {}
    for (axis, value), pattern in _CONDITION_PATTERNS.items():
        if pattern.search(text):
            found.setdefault(axis, set()).add(value)
    if "member" in found and len(found["member"]) > 1 and re.search(r"\ball (members|customers)\b", text, re.I):
        found.pop("member")  # "all members, gold to guest": no condition
    return found


def _words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOP}


class EvidenceSelector:
    """Ranks the units of retrieved hits for a question. Holds a cache of unit embeddings (an article's units are
    embedded the first time one of its chunks is retrieved), shared by every session; thread-safe."""

    def __init__(self, embedder=None, k: int = 3, per_chunk: int = 2, max_cache: int = 50_000):
        self.embedder = embedder
        self.k = k
        self.per_chunk = per_chunk
        self.max_cache = max_cache
        self._vectors: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _embed(self, texts: list[str]) -> np.ndarray | None:
        if self.embedder is None or not texts:
            return None
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            vectors = self.embedder.encode_passages(missing) if len(missing) > 4 else \
                self.embedder.encode_queries(missing)  # a few short texts: the caller's single thread is faster
            with self._lock:
                if len(self._vectors) + len(missing) > self.max_cache:
                    self._vectors.clear()
                self._vectors.update(zip(missing, np.asarray(vectors, dtype=np.float32)))
        with self._lock:
            return np.stack([self._vectors[t] for t in texts])

    def units(self, hits: Sequence) -> list[Evidence]:
        """Every unit of every hit, in hit order. An FAQ's answer is its unit, titled by its question."""
        out: list[Evidence] = []
        for hit in hits:
            entity = getattr(hit, "entity", None) or None
            if getattr(hit, "kind", "doc") == "faq" or getattr(hit, "answer", None):
                texts = [plain(hit.answer or hit.text)]
                title = hit.text if getattr(hit, "kind", "doc") == "faq" else hit.title
                if entity:
                    name = entity.title() if entity.isupper() else entity
                    title = title if name.lower() in title.lower() else f"{name}, {title}"
            else:
                texts = split_units(hit.text)
                title = hit.title.split(" › ")[-1].strip()
            for n, text in enumerate(texts):
                if any(u.text == text for u in out):
                    continue  # the same sentence in two sections: once is enough
                out.append(Evidence(text=text, title=title, source=hit.source, chunk_id=f"{hit.chunk_id}~{n}",
                                    parent=hit.chunk_id, entity=entity))
        return out

    def select(self, question: str, history: Sequence[dict], hits: Sequence, k: int | None = None) -> list[Evidence]:
        """The k units most likely to answer `question` in its conversation, best first."""
        k = k or self.k
        units = self.units(hits)
        if not units:
            return []
        said = " ".join([m.get("content", "") for m in history if isinstance(m, dict) and m.get("role") == "user"
                         and isinstance(m.get("content"), str)][-3:] + [question])
        customer = conditions(said)
        chunk_rank = {}
        for unit in units:
            chunk_rank.setdefault(unit.parent, len(chunk_rank))
        said_words = _words(said)
        qwords = _words(question) or said_words
        vectors = self._embed([f"{u.heading}: {u.text}" for u in units])
        qvec = None
        if vectors is not None:
            qvec = np.asarray(self.embedder.encode_queries([question])[0], dtype=np.float32)
        for i, unit in enumerate(units):
            meaning = float(vectors[i] @ qvec) if qvec is not None else 0.0
            words = _words(f"{unit.heading} {unit.text}")
            overlap = len(qwords & words) / max(len(qwords), 1)
            score = meaning + 0.35 * overlap - 0.06 * chunk_rank[unit.parent]
            clause = CONDITIONAL.match(unit.text)
            if clause:  # "If you have not paid yet, ...": the customer who says so is asking about this unit; squared,
                # because half a condition ("If you are unhappy with the status" for "my refund status") is not it
                cwords = _words(clause.group(1))
                score += 0.3 * (len(cwords & said_words) / max(len(cwords), 1)) ** 2
            stated = conditions(f"{unit.text}")
            for axis, values in stated.items():
                if axis in customer:
                    score += 0.35 if values & customer[axis] else -0.35
            unit.score = score
        ranked = sorted(units, key=lambda u: -u.score)
        chosen: list[Evidence] = []
        per_chunk: dict[str, int] = {}
        limit = max(self.per_chunk, (k + 1) // 2)  # one chunk may fill about half the quotes, never all of them
        for unit in ranked:
            if per_chunk.get(unit.parent, 0) >= limit:
                continue
            per_chunk[unit.parent] = per_chunk.get(unit.parent, 0) + 1
            chosen.append(unit)
            if len(chosen) == k:
                break
        return chosen


def extractive_answer(evidence: Sequence[Evidence], n: int = 1, language: str = "en") -> str:
    """The evidence itself as the answer, with its citation: what the guard shows instead of an unsupported claim."""
    picked = list(evidence[:n])
    if not picked:
        return ""
    quote = " ".join(u.text if u.text.endswith((".", "!", "?", "。")) else u.text + "." for u in picked)
    where = picked[0].heading or picked[0].source
    if language == "zh":
        return f"根据我们的帮助文章《{where}》：{quote}"
    return f"From our help article \"{where}\": {quote}"
