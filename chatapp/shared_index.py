"""Chunk embeddings kept in the shared database, so replicas build the same FAISS and BM25 index without each
embedding the knowledge again.

Every replica chunks the same documents itself (its knowledge folder, kept in step with the database's documents by
chatapp/shared_knowledge.py; chunking is cheap and deterministic); only the embedding is expensive. When `database_url` is set, ingest asks the
database for the vectors of the chunks it would embed (keyed by the embedding settings and a hash of the texts
embedded), embeds only what no replica embedded before, and stores those for the others. So a file added or
edited reaches the other replicas at their next refresh (every 10 s) without re-embedding, and a new replica
starts from the database's vectors. With the SQLite default (one replica) nothing is stored twice.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import numpy as np
import sqlalchemy as sa

from chatapp.config import Settings
from chatapp.storage import DB_ERRORS, StorageError, migrate, open_database
from chatapp.storage.schema import chunk_embeddings

log = logging.getLogger(__name__)


def views_digest(views: list[str]) -> str:
    return hashlib.sha256("\x1f".join(views).encode("utf-8", "surrogatepass")).hexdigest()


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


class SharedEmbeddings:
    """The database's chunk vectors for one embedding configuration (``key``: embedder, dim, chunking)."""

    def __init__(self, settings: Settings, key: dict[str, Any]):
        self.key = key_digest(key)
        self.dim = int(key["dim"])
        self._db = open_database(settings.database, settings.feedback.busy_timeout_s, pool_size=1)
        migrate(self._db)

    def close(self) -> None:
        self._db.dispose()

    def fetch(self, digests: list[str]) -> dict[str, np.ndarray]:
        """digest -> (n_views, dim) float32 for the chunks some replica embedded already."""
        found: dict[str, np.ndarray] = {}
        t = chunk_embeddings
        reader = self._db.reader if self._db.is_sqlite else self._db.engine
        with reader.connect() as conn:
            for start in range(0, len(digests), 500):
                rows = conn.execute(sa.select(t.c.digest, t.c.n_views, t.c.vectors).where(
                    t.c.key == self.key, t.c.digest.in_(digests[start:start + 500])))
                for digest, n_views, blob in rows:
                    vectors = np.frombuffer(blob, dtype=np.float32)
                    if vectors.size == n_views * self.dim:
                        found[digest] = vectors.reshape(n_views, self.dim)
        return found

    def store(self, items: dict[str, np.ndarray]) -> None:
        """Keep newly embedded chunks for the other replicas (a chunk another replica stored meanwhile is kept)."""
        if not items:
            return
        rows = [{"key": self.key, "digest": d, "n_views": int(v.shape[0]),
                 "vectors": np.ascontiguousarray(v, dtype=np.float32).tobytes(), "created_at": time.time()}
                for d, v in items.items()]
        with self._db.engine.begin() as conn:
            for start in range(0, len(rows), 500):
                conn.execute(self._db.insert(chunk_embeddings).on_conflict_do_nothing(
                    index_elements=[chunk_embeddings.c.key, chunk_embeddings.c.digest]), rows[start:start + 500])


def embed_shared(settings: Settings, key: dict[str, Any], chunks: list, embed) -> tuple[np.ndarray, int]:
    """The vectors of ``chunks`` in order (rows = their views), embedding with ``embed(chunks)`` only those the
    database does not have. Returns (vectors, how many chunks came from the database). If the database cannot be
    used, everything is embedded here (the index must not depend on it)."""
    if not chunks:
        return embed(chunks), 0
    try:
        shared = SharedEmbeddings(settings, key)
    except (*DB_ERRORS, StorageError) as exc:
        log.warning("shared embeddings unavailable (%s): embedding locally", exc)
        return embed(chunks), 0
    try:
        digests = [views_digest(c.views()) for c in chunks]
        try:
            found = shared.fetch(sorted(set(digests)))
        except DB_ERRORS as exc:
            log.warning("shared embeddings unreadable (%s): embedding locally", exc)
            found = {}
        missing = [c for c, d in zip(chunks, digests) if d not in found]
        fresh = embed(missing)
        new: dict[str, np.ndarray] = {}
        offset = 0
        for c in missing:
            n = len(c.views())
            new.setdefault(views_digest(c.views()), fresh[offset:offset + n])
            offset += n
        try:
            shared.store(new)
        except DB_ERRORS as exc:
            log.warning("could not store embeddings for the other replicas: %s", exc)
        pieces = [found.get(d) if d in found else new[d] for d in digests]
        return np.concatenate(pieces).astype(np.float32, copy=False), len(chunks) - len(missing)
    finally:
        shared.close()
