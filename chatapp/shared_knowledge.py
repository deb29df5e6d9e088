"""The knowledge folder's files kept in the shared database, so every replica indexes the same knowledge from its
own local folder (no shared mount).

Why it is built this way:
- When ``database_url`` is set, table ``knowledge_documents`` holds every knowledge file (path, text, sha256, when
  and by whom, deleted). Before each ingest (start, the 10 s refresh, `chatapp ingest`) a replica syncs its folder
  with it: a file that changed in the folder since this replica's last sync (an edit outside the app, a file baked
  into the image) is published; a document another replica published is written into the folder (temp file +
  rename, so the indexer never reads half a file) and a deleted one removed. Then the folder is chunked and indexed
  exactly as on one replica, and the chunk vectors come from ``chunk_embeddings`` (chatapp/shared_index.py): a
  document published by A is found by B's search after B's refresh without B embedding it.
- Chunks are stored as their document's text plus their vectors: chunking is deterministic for the index settings
  (embedder, chunk_chars, schema: the key of the vectors), so every replica cuts the same chunks from the same text;
  a second copy of the chunk texts in the database could only drift from the documents.
- Truth on conflict (the file and the database's document both changed since this replica's last sync, or a first
  sync finds a file that differs from the database's): the later change wins, the document's ``updated_at`` against
  the file's mtime (so the replicas' clocks should agree, as NTP keeps them); a file deleted here that another replica
  changed comes back. The losing text is kept under ``data_dir/knowledge_conflicts/`` and logged, never dropped
  silently.
- A publish only replaces the version this replica last saw (compare-and-set on updated_at and sha256); losing that
  race leaves the file to the next sync's conflict rule. Edits from the staff console (`edit`: article saves, gap
  answers) are one read-modify-write transaction on the document's row instead, so two replicas appending a gap
  answer each at once keep both, and "changed since you opened it" sees the other replica's save.
- What the folder held at the last sync (sha256, size, mtime by file) is ``data_dir/knowledge_sync.json``, so an
  unchanged file costs one stat. Without it (first start) every file is compared with the database's.
- The database unreachable: the sync is skipped with a message (the app's status shows it), the replica answers
  from its local folder and index, and publishes its changes once the database is back. Console edits are refused
  then (nothing written), so replicas cannot diverge silently.
- With the SQLite default (no ``database_url``) none of this runs: the folder is the truth, nothing is copied.
"""
from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from chatapp.config import Settings
from chatapp.knowledge import DOC_SUFFIXES, FAQ_SUFFIXES, Problems, scan_folder
from chatapp.files import atomic_write, file_lock
from chatapp.storage import DB_ERRORS, Database, StorageError, describe_error, migrate, open_database, safe_url
from chatapp.storage.schema import knowledge_documents as docs

log = logging.getLogger(__name__)

# The database's failures (a full disk or an unwritable folder here is the folder's, and said so).
ERRORS = (*(e for e in DB_ERRORS if e is not OSError), StorageError)


@dataclass
class SyncReport:
    """What one sync did; ``error`` says why it could not run (the local folder and index still serve)."""

    published: list[str] = field(default_factory=list)  # local changes sent to the database (deletions too)
    written: list[str] = field(default_factory=list)  # documents from the database written into the folder
    removed: list[str] = field(default_factory=list)  # files deleted because the database says so
    conflicts: list[str] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> str:
        if self.error:
            return self.error
        return (f"knowledge database: {len(self.published)} published, {len(self.written)} received, "
                f"{len(self.removed)} removed" + (f", {len(self.conflicts)} conflicts" if self.conflicts else ""))


class _Quiet(Problems):
    """The indexer reports a bad file; the sync scanning the same folder must not log it a second time."""

    def add(self, message: str) -> None:
        self.messages.append(message)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def valid_path(rel: str) -> bool:
    """A path another replica may have published is only written inside the folder, where the indexer reads it."""
    parts = rel.split("/")
    return (bool(rel) and "\\" not in rel and "\x00" not in rel and not rel.startswith("/")
            and all(p and p not in (".", "..") and not p.startswith(".") for p in parts)
            and Path(rel).suffix.lower() in DOC_SUFFIXES | FAQ_SUFFIXES)


class KnowledgeSync:
    """One replica's knowledge folder kept in step with the database's documents (see the module docstring)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = Path(settings.retrieval.knowledge_dir)
        self.state_path = settings.data_dir / "knowledge_sync.json"
        self.conflicts_dir = settings.data_dir / "knowledge_conflicts"
        self._lock_path = settings.data_dir / ".knowledge_sync.lock"
        self.origin = f"{socket.gethostname()}:{self.root}"  # updated_by of a file published from the folder
        self._db: Database | None = None

    def _database(self) -> Database:
        """Opened at first use and again after a failure, so a database that was down is used once it is back."""
        if self._db is None:
            db = open_database(self.settings.database, self.settings.feedback.busy_timeout_s, pool_size=1)
            try:
                migrate(db)
            except BaseException:
                db.dispose()
                raise
            self._db = db
        return self._db

    def _failed(self, exc: BaseException) -> str:
        where = self._db.where if self._db is not None else safe_url(str(self.settings.database))
        if self._db is not None:
            self._db.dispose()
            self._db = None
        return describe_error(exc, where, self.settings.feedback.busy_timeout_s, "Knowledge database")

    # ---- state of the last sync -------------------------------------------------------------------------------

    def _load_state(self) -> dict[str, dict]:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(state, dict) or state.get("folder") != str(self.root.resolve()):
            return {}  # another folder's: every file is compared afresh
        return state.get("files", {})

    def _save_state(self, files: dict[str, dict]) -> None:
        atomic_write(self.state_path, json.dumps({"folder": str(self.root.resolve()), "files": files}, indent=1))

    def _seen(self, rel: str) -> dict | None:
        """The file's sha256/size/mtime as it is now (None: no file)."""
        path = self.root / rel
        try:
            data, stat = path.read_bytes(), path.stat()
        except OSError:
            return None
        return {"sha256": _sha(data), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    # ---- the database ---------------------------------------------------------------------------------------

    def _reader(self) -> sa.Engine:
        db = self._database()
        return db.reader if db.is_sqlite else db.engine  # SQLite's writer would take the write lock to read

    def _documents(self) -> dict[str, sa.Row]:
        """Path -> (sha256, updated_at, deleted) of every document: no texts, so a refresh with no change is cheap."""
        with self._reader().connect() as conn:
            rows = conn.execute(sa.select(docs.c.path, docs.c.sha256, docs.c.updated_at, docs.c.deleted))
            return {r.path: r for r in rows}

    def _text(self, rel: str) -> str | None:
        with self._reader().connect() as conn:
            row = conn.execute(sa.select(docs.c.text, docs.c.deleted).where(docs.c.path == rel)).first()
        return None if row is None or row.deleted else row.text

    def _publish(self, db: Database, rel: str, text: str | None, seen: sa.Row | None) -> bool:
        """Replace the version ``seen`` (None: there was none) by ``text`` (None: deleted); False if another replica
        changed it meanwhile."""
        values = {"text": text or "", "sha256": _sha(text.encode()) if text is not None else "",
                  "updated_at": time.time(), "updated_by": self.origin, "deleted": int(text is None)}
        if seen is None:
            statement = db.insert(docs).values(path=rel, **values).on_conflict_do_nothing(index_elements=[docs.c.path])
        else:
            statement = sa.update(docs).where(docs.c.path == rel, docs.c.updated_at == seen.updated_at,
                                              docs.c.sha256 == seen.sha256).values(**values)
        with db.engine.begin() as conn:  # RETURNING: psycopg's rowcount is -1 for an INSERT ... ON CONFLICT
            return conn.execute(statement.returning(docs.c.path)).first() is not None

    # ---- sync -----------------------------------------------------------------------------------------------

    def sync(self) -> SyncReport:
        """Publish this folder's changes and write the others' into it. Never raises for the database."""
        with file_lock(self._lock_path):
            try:
                return self._sync()
            except ERRORS as exc:  # the indexer logs it with its warnings
                return SyncReport(error=f"{self._failed(exc)} Answering from this replica's knowledge folder; its "
                                        f"changes are published when the database is back.")
            except OSError as exc:
                return SyncReport(error=f"knowledge folder {self.root} could not be synced with the database "
                                        f"({exc.strerror or exc}): is it writable? Answering from what it holds.")

    def pending(self) -> bool:
        """True when the database holds a document this folder does not have yet (or has deleted)."""
        state = self._load_state()
        try:
            documents = self._documents()
        except ERRORS as exc:
            log.warning("%s", self._failed(exc))
            return False
        return any((state[rel]["sha256"] != doc.sha256 or doc.deleted) if rel in state else not doc.deleted
                   for rel, doc in documents.items() if valid_path(rel))

    def _sync(self) -> SyncReport:
        report = SyncReport()
        # A missing folder is not every file deleted: it is filled from the database as on a first start.
        state = self._load_state() if self.root.is_dir() else {}
        scanned = scan_folder(self.root, int(self.settings.retrieval.max_file_mb * 2**20), _Quiet()) \
            if self.root.is_dir() else {}
        documents = self._documents()
        new_state: dict[str, dict] = {}
        to_write: dict[str, sa.Row] = {}
        for rel in sorted(set(scanned) | set(state) | set(documents)):
            if not valid_path(rel):
                continue
            base, doc = state.get(rel), documents.get(rel)
            scan = scanned.get(rel)
            if scan is None:
                local = None
            elif base and base["size"] == scan.size and base["mtime_ns"] == scan.mtime_ns:
                local = base
            else:
                local = self._seen(rel)
            local_sha = local["sha256"] if local else None
            db_sha = doc.sha256 if doc is not None and not doc.deleted else None
            if local_sha == db_sha:
                if local:
                    new_state[rel] = local
                continue
            base_sha = base["sha256"] if base else None
            local_changed, db_changed = local_sha != base_sha, doc is not None and db_sha != base_sha
            if local_changed and db_changed:  # the later change wins; a deletion here loses to an edit there
                report.conflicts.append(rel)
                db_changed = local is None or scan.mtime_ns / 1e9 <= doc.updated_at
            if db_changed:
                to_write[rel] = doc
                continue
            text = None
            if local is not None:
                try:
                    text = (self.root / rel).read_bytes().decode("utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    log.warning("knowledge %s not published: %s", rel, exc)
                    if base:
                        new_state[rel] = base
                    continue
                local = {**local, "sha256": _sha(text.encode())}
            if rel in report.conflicts:
                self._keep_loser(rel, self._text(rel), "database")
            if self._publish(self._database(), rel, text, doc):
                report.published.append(rel)
                if local is not None:
                    new_state[rel] = local
            elif base:
                new_state[rel] = base  # another replica's change won the race: the next sync decides
        root = self.root.resolve()
        for rel, doc in to_write.items():
            if (root / rel).resolve() != root / rel:  # a symlinked folder here must not carry a write outside
                log.warning("knowledge %s not written: a symlink in its path leads outside %s", rel, root)
                continue
            if rel in report.conflicts:
                self._keep_loser(rel, self._local_text(rel), "local")
            if doc.deleted:
                (self.root / rel).unlink(missing_ok=True)
                report.removed.append(rel)
                continue
            text = self._text(rel)
            if text is None:  # deleted since the listing: the next sync removes it
                continue
            atomic_write(self.root / rel, text)
            if seen := self._seen(rel):
                new_state[rel] = seen
            report.written.append(rel)
        if new_state != state:
            self._save_state(new_state)
        if report.published or report.written or report.removed:
            log.info("%s", report.summary())
        return report

    def _local_text(self, rel: str) -> str | None:
        try:
            return (self.root / rel).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None

    def _keep_loser(self, rel: str, text: str | None, side: str) -> None:
        """The text a conflict replaced, kept beside the data directory with when and which side it was."""
        if text is None:
            return
        path = self.conflicts_dir / f"{rel.replace('/', '__')}.{time.strftime('%Y%m%dT%H%M%S')}.{side}"
        atomic_write(path, text)
        log.warning("knowledge %s changed here and on another replica: the later change is kept, the %s copy "
                    "is in %s", rel, side, path)

    # ---- edits from the console -------------------------------------------------------------------------------

    def text(self, rel: str) -> str | None:
        """The database's text of ``rel`` (None: it has none); raises DB_ERRORS."""
        try:
            return self._text(rel)
        except ERRORS as exc:
            self._failed(exc)
            raise

    def edit(self, rel: str, change: Callable[[str], str], who: str | None) -> tuple[str, str]:
        """Read-modify-write one document in one transaction (its row locked), then write it into the folder.
        ``change(current)`` returns the new text or raises, which leaves everything as it was. Returns (before,
        after). Raises StorageError, saying why, when the database cannot be used."""
        with file_lock(self._lock_path):
            try:
                self._sync()  # an unpublished edit here competes by the conflict rule, not by being overwritten
                db = self._database()
                with db.engine.begin() as conn:
                    row = conn.execute(sa.select(docs.c.text, docs.c.deleted).where(docs.c.path == rel)
                                       .with_for_update()).first()
                    if row is None:
                        current = self._local_text(rel) or ""
                    else:
                        current = "" if row.deleted else row.text
                    after = change(current)
                    values = {"text": after, "sha256": _sha(after.encode()), "updated_at": time.time(),
                              "updated_by": who or self.origin, "deleted": 0}
                    conn.execute(db.insert(docs).values(path=rel, **values).on_conflict_do_update(
                        index_elements=[docs.c.path], set_=values))
            except ERRORS as exc:
                raise StorageError(self._failed(exc)) from exc
            atomic_write(self.root / rel, after)
            state = self._load_state()
            if seen := self._seen(rel):
                state[rel] = seen
                self._save_state(state)
            return current, after
