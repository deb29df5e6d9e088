"""The index of the knowledge folder: ingest (only changed files re-read, only new chunk texts embedded), the
FAISS + BM25 index built from the chunks, and its files on disk.

FAISS: exact ``IndexFlatIP`` up to ``retrieval.approximate_above`` vectors, IVF (or HNSW) above.

On disk (``settings.index_dir``): ``manifest.json`` names one generation of ``records-<g>.jsonl``, ``vectors-<g>.npy``
and ``index-<g>.faiss``; each file is written to a temp name and renamed, the manifest last, so a crash leaves the
previous generation whole. BM25 is rebuilt from the records on load (a fraction of a second for 12k FAQs).
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from chatapp.config import Settings
from chatapp.embeddings import Embedder
from chatapp.knowledge import Chunk, Problems, parse_file, read_text, scan_folder
from chatapp.lexical import BM25Index, EntityMatcher

if TYPE_CHECKING:
    from chatapp.shared_knowledge import KnowledgeSync, SyncReport

log = logging.getLogger(__name__)

SCHEMA = 1


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
    sync: "SyncReport | None" = None  # the knowledge folder synced with the database first (several replicas)

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
        if self.sync is not None and not self.sync.error and (self.sync.published or self.sync.written
                                                               or self.sync.removed):
            parts.append(self.sync.summary())
        if self.warnings:
            parts.append(f"{len(self.warnings)} warnings")
        return "; ".join(parts)


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
           store: IndexStore | None = None,
           knowledge: "KnowledgeSync | None" = None) -> tuple[IndexData, IngestReport]:
    """Bring the index in line with the knowledge folder: only files whose content hash changed are re-read, and of
    those only the chunks whose text is new are embedded. With ``knowledge`` (several replicas) the folder is first
    synced with the database's documents (chatapp/shared_knowledge.py)."""
    started = time.perf_counter()
    rs = settings.retrieval
    store = store or IndexStore(settings.index_dir)
    report = IngestReport()
    problems = Problems()
    key = _settings_key(settings, embedder)
    if knowledge is not None:
        report.sync = knowledge.sync()
        if report.sync.error:
            problems.add(report.sync.error)
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
