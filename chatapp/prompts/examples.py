"""Few-shot examples: banks (JSONL) parsed with positions, the embedding cache the similarity selectors share, and
the fixed selector.

Why: the example bank is what makes a correction count at once; a bank reload re-embeds only new examples, and one
render embeds its question once.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from langchain_core.embeddings import Embeddings
from langchain_core.example_selectors import BaseExampleSelector
from langchain_core.vectorstores import InMemoryVectorStore

from chatapp.prompts.template import Problem


class CachedEmbeddings(Embeddings):
    """Wraps an embedder so bank reloads re-embed only new examples and one render embeds its question once."""

    def __init__(self, inner: Embeddings, max_queries: int = 512):
        self.inner = inner
        self._documents: dict[str, list[float]] = {}
        self._queries: OrderedDict[str, list[float]] = OrderedDict()
        self._max_queries = max_queries
        self._lock = threading.Lock()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._documents]
        if missing:
            vectors = self.inner.embed_documents(missing)
            with self._lock:
                self._documents.update(zip(missing, (list(map(float, v)) for v in vectors)))
        with self._lock:
            return [self._documents[t] for t in texts]

    def embed_query(self, text: str) -> list[float]:
        with self._lock:
            if text in self._queries:
                self._queries.move_to_end(text)
                return self._queries[text]
        vector = list(map(float, self.inner.embed_query(text)))
        with self._lock:
            self._queries[text] = vector
            while len(self._queries) > self._max_queries:
                self._queries.popitem(last=False)
        return vector


class FixedExampleSelector(BaseExampleSelector):
    """The first k examples of the bank, always: predictable demonstrations of tone and format."""

    def __init__(self, examples: list[dict], k: int):
        self.examples, self.k = examples, k

    def add_example(self, example: dict[str, str]) -> Any:
        self.examples.append(example)

    def select_examples(self, input_variables: dict[str, str]) -> list[dict]:
        return self.examples[: self.k]


@dataclass
class Bank:
    """One bank as read: where from, its signature (what tells it changed), its examples, their vector store."""

    name: str
    origin: str  # "database" or the shipped file
    signature: tuple
    examples: list[dict]
    store: InMemoryVectorStore | None = None


def parse_bank(text: str) -> tuple[list[dict], list[Problem]]:
    """JSONL, one example per line: question and answer required; context, id, source optional."""
    examples, problems, ids = [], [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(number, exc.colno, f"not valid JSON: {exc.msg}"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(number, 1, "each line must be a JSON object"))
            continue
        bad = [k for k in ("question", "answer") if not isinstance(row.get(k), str) or not row[k].strip()]
        if bad:
            problems.append(Problem(number, 1, f"missing or empty {' and '.join(bad)}"))
            continue
        if not isinstance(row.get("context", ""), str):
            problems.append(Problem(number, 1, "`context` must be a text"))
            continue
        row.setdefault("context", "")
        row["id"] = str(row.get("id") or f"line-{number}")
        if row["id"] in ids:
            problems.append(Problem(number, 1, f"duplicate id {row['id']!r}"))
            continue
        ids.add(row["id"])
        examples.append(row)
    return examples, problems
