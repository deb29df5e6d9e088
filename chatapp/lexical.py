"""The lexical side of search: tokens (CJK as characters), BM25 as one sparse matrix, and the matcher that finds
the businesses/products of the knowledge base named in a conversation (exact, short forms, close misspellings)."""
from __future__ import annotations

import difflib
import functools
import re
from typing import Iterable, Sequence

import numpy as np
from scipy import sparse


STOPWORDS = frozenset(
    "a an the is are was were be been am do does did you your yours i me my we our us it its of to in on at for with "
    "and or but can could would will shall should may might there this that these those have has had any what how "
    "which who whom when where why if so as by from about into than then them they their he she his her not no "
    "please hi hello thanks thank just also".split()
)
CJK = re.compile(r"[\u3400-\u9fff]")


def language(text: str) -> str:
    """"zh" for text with Chinese characters, else "en": what picks the template, model and thresholds."""
    return "zh" if CJK.search(text or "") else "en"


TOKEN = re.compile(r"[a-z0-9]+|[\u3400-\u9fff\uf900-\ufaff]")


def tokenize(text: str) -> list[str]:
    """Lowercase words without stopwords; CJK text as single characters, so BM25 also works for Chinese."""
    return [t for t in TOKEN.findall(text.lower()) if t not in STOPWORDS]


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
