"""Where saved prompt template versions and the active template live: the app's database (chatapp/storage), so an
edit saved or a template activated on one replica is what every replica renders next. The shipped templates stay
files under prompts/ (read-only): a shipped file is version 1 until an edit is saved, which freezes it as version 1.

Why it is built this way:
- A version is a row keyed (name, version), written once and never changed. Two saves racing for one number cannot
  both commit: the second gets an IntegrityError, reads again and either takes the next number or, when its editor
  started from a version that is no longer the latest, raises VersionConflict. (SQLite's BEGIN IMMEDIATE already
  serialises writers; on Postgres the key is what decides.)
- What a render checks is one small read of two `app_state` rows: the active template, and a revision token that
  every save changes in its own transaction. The latest version numbers are re-read only when the token changed,
  and texts are cached for good (versions are immutable).
- Versions under `prompt_versions_dir` from before the database are imported once (the files are left as they were).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from chatapp.prompts.template import NAME_RE, PromptError, VersionConflict
from chatapp.storage import DB_ERRORS, Database, StorageError, describe_error, migrate, open_database, root_cause
from chatapp.storage.schema import app_state, prompt_versions
from chatapp.storage.state import put_state

log = logging.getLogger(__name__)

ACTIVE_KEY = "prompts.active"  # {"name", "time", "user"}: the template render(None) uses
REVISION_KEY = "prompts.revision"  # a token every save changes: a replica's list of latest versions is stale
IMPORTED_KEY = "prompts.imported"  # set once the legacy version folder was imported
_PG_IMPORT_LOCK = 0x70726d70  # "prmp": replicas starting together import the legacy folder once
_SAVE_TRIES = 50  # a save that lost the race for a number reads again; each try loses only to a committed save


@dataclass(frozen=True)
class Snapshot:
    """What a render needs from the database: the active template (None: the configured one), and the latest
    saved version of every template that has saved versions."""

    revision: str | None
    active: str | None
    latest: dict[str, int]


@dataclass(frozen=True)
class SavedVersion:
    version: int
    message: str
    base_version: int | None
    author: str | None
    created_at: float


def _failure(what: str, exc: BaseException, db: Database | None) -> PromptError:
    """A database failure as a PromptError an operator can act on (the UI and CLI show PromptErrors)."""
    if isinstance(exc, StorageError) or db is None:
        return PromptError(f"prompt versions {what}: {exc}")
    return PromptError(f"prompt versions {what}: {describe_error(exc, db.where, db.busy_timeout_s)}")


class VersionStore:
    """Saved template versions and the active template in the database. Thread-safe; one per PromptManager."""

    def __init__(self, target: Path | str, busy_timeout_s: float = 5.0, legacy_dir: Path | None = None):
        db: Database | None = None
        for attempt in range(3):
            try:
                db = open_database(target, busy_timeout_s, pool_size=2, pooled_reads=True)
                migrate(db)
                break
            except (*DB_ERRORS, StorageError) as exc:
                if db is not None:
                    db.dispose()  # the next try (the next render) opens the file or server afresh
                # Replicas (or threads) opening a new SQLite file at once can meet SQLITE_BUSY without the busy
                # handler's wait (seen once in CI): that clears in moments, so it is tried again before it is reported.
                if attempt < 2 and "locked" in str(root_cause(exc)).lower():
                    time.sleep(0.2 * (attempt + 1))
                    continue
                raise _failure("cannot be used", exc, db) from exc
        self.db = db
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._texts: dict[tuple[str, int], str] = {}
        if legacy_dir is not None and legacy_dir.is_dir():
            self._import(legacy_dir)

    def _reading(self) -> sa.Connection:
        return (self.db.reader if self.db.is_sqlite else self.db.engine).connect()

    # ---- reading

    def snapshot(self) -> Snapshot:
        """The active template and the latest versions, as every replica has them now: one small read when nothing
        was saved since the last call."""
        try:
            with self._reading() as conn:
                state = dict(conn.execute(sa.select(app_state.c.key, app_state.c.value)
                                          .where(app_state.c.key.in_((ACTIVE_KEY, REVISION_KEY)))).all())
                revision = state.get(REVISION_KEY)
                with self._lock:
                    cached = self._snapshot
                if cached is not None and cached.revision == revision:
                    latest = cached.latest
                else:  # read after the token: a save committed in between is re-read at the next call
                    latest = dict(conn.execute(sa.select(prompt_versions.c.name, sa.func.max(prompt_versions.c.version))
                                               .group_by(prompt_versions.c.name)).all())
        except DB_ERRORS as exc:
            raise _failure("cannot be read", exc, self.db) from exc
        try:
            active = json.loads(state[ACTIVE_KEY])["name"] if ACTIVE_KEY in state else None
        except (ValueError, KeyError, TypeError):
            active = None
        snapshot = Snapshot(revision, active if isinstance(active, str) else None, latest)
        with self._lock:
            self._snapshot = snapshot
        return snapshot

    def text(self, name: str, version: int) -> str | None:
        """A saved version's text, or None when there is no such version (cached: versions never change)."""
        with self._lock:
            cached = self._texts.get((name, version))
        if cached is not None:
            return cached
        try:
            with self._reading() as conn:
                text = conn.execute(sa.select(prompt_versions.c.text).where(
                    prompt_versions.c.name == name, prompt_versions.c.version == version)).scalar()
        except DB_ERRORS as exc:
            raise _failure(f"of {name!r} cannot be read", exc, self.db) from exc
        if text is not None:
            with self._lock:
                self._texts[(name, version)] = text
        return text

    def history(self, name: str) -> list[SavedVersion]:
        """The saved versions of `name`, oldest first."""
        pv = prompt_versions.c
        try:
            with self._reading() as conn:
                rows = conn.execute(sa.select(pv.version, pv.message, pv.base_version, pv.author, pv.created_at)
                                    .where(pv.name == name).order_by(pv.version)).all()
        except DB_ERRORS as exc:
            raise _failure(f"of {name!r} cannot be read", exc, self.db) from exc
        return [SavedVersion(r.version, r.message, r.base_version, r.author, r.created_at) for r in rows]

    # ---- writing

    def save(self, name: str, text: str, message: str = "", base_version: int | None = None,
             author: str | None = None, shipped: str | None = None) -> int:
        """Store `text` as the next version of `name` and return its number. `shipped` is the shipped file's text
        (version 1 until a version is saved; the first save freezes it as version 1). A stale `base_version` raises
        VersionConflict; text equal to the latest saves nothing. Race-free across threads, processes, replicas."""
        pv = prompt_versions.c
        for _ in range(_SAVE_TRIES):
            try:
                with self.db.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE
                    saved = conn.execute(sa.select(sa.func.max(pv.version)).where(pv.name == name)).scalar() or 0
                    latest = saved or (1 if shipped is not None else 0)
                    if base_version is not None and int(base_version) != latest:
                        raise VersionConflict(name, int(base_version), latest)
                    current = conn.execute(sa.select(pv.text).where(pv.name == name, pv.version == saved)).scalar() \
                        if saved else shipped
                    if latest and current == text:
                        return latest
                    now, rows = time.time(), []
                    if not saved and shipped is not None:  # freeze the shipped text as version 1
                        rows.append({"name": name, "version": 1, "text": shipped, "message": "shipped default",
                                     "base_version": None, "author": None, "created_at": now})
                    rows.append({"name": name, "version": latest + 1, "text": text, "message": str(message or "")[:500],
                                 "base_version": base_version, "author": author, "created_at": now})
                    conn.execute(sa.insert(prompt_versions), rows)
                    self._touch(conn)
                return latest + 1
            except sa_exc.IntegrityError:
                continue  # another save took that number first and has committed: read again
            except DB_ERRORS as exc:
                raise _failure(f"of {name!r} not saved", exc, self.db) from exc
        raise PromptError(f"template {name!r} not saved: {_SAVE_TRIES} other saves came first; try again")

    def activate(self, name: str, author: str | None = None) -> None:
        """Make `name` the template every replica's render(None) uses from its next render."""
        value = json.dumps({"name": name, "time": iso(time.time()), "user": author})
        try:
            with self.db.engine.begin() as conn:
                self._put(conn, ACTIVE_KEY, value)
        except DB_ERRORS as exc:
            raise _failure(f"not changed (activating {name!r})", exc, self.db) from exc

    def _put(self, conn: sa.Connection, key: str, value: str, replace: bool = True) -> None:
        put_state(self.db, conn, key, value, replace)

    def _touch(self, conn: sa.Connection) -> None:
        """A new revision token, in the saving transaction: whoever sees it also sees the save."""
        self._put(conn, REVISION_KEY, json.dumps(uuid.uuid4().hex))

    # ---- versions from before the database

    def _import(self, folder: Path) -> None:
        """`prompt_versions_dir/NAME/vNNNN.yaml` (+ .json metadata) and `active.json` become rows, once for all
        replicas. A version the database already has is kept as it is."""
        done = sa.select(app_state.c.key).where(app_state.c.key == IMPORTED_KEY)
        try:
            with self._reading() as conn:
                if conn.execute(done).first():
                    return
        except DB_ERRORS as exc:
            raise _failure("cannot be read", exc, self.db) from exc
        rows, active = _legacy_rows(folder), _legacy_active(folder)
        try:
            with self.db.engine.begin() as conn:
                if not self.db.is_sqlite:
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_IMPORT_LOCK})
                if conn.execute(done).first():
                    return
                if rows:
                    conn.execute(self.db.insert(prompt_versions).on_conflict_do_nothing(
                        index_elements=[prompt_versions.c.name, prompt_versions.c.version]), rows)
                if active:
                    self._put(conn, ACTIVE_KEY, json.dumps({"name": active, "time": iso(time.time()), "user": None}),
                              replace=False)
                self._put(conn, IMPORTED_KEY, json.dumps({"from": str(folder), "versions": len(rows),
                                                          "time": iso(time.time())}))
                self._touch(conn)
        except DB_ERRORS as exc:
            raise _failure(f"in {folder} not imported", exc, self.db) from exc
        log.info("prompt versions: imported %d version(s) from %s into the database", len(rows), folder)


def _legacy_rows(folder: Path) -> list[dict]:
    """Every version file under the folder as a row (an unreadable one stops the import: nothing may be lost)."""
    rows = []
    for template in sorted(p for p in folder.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name)):
        for path in sorted(template.glob("v[0-9][0-9][0-9][0-9]*.yaml")):
            if not path.stem[1:].isdigit():
                continue
            try:
                text = path.read_text(encoding="utf-8")
                meta_path = path.with_suffix(".json")
                meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
            except (OSError, UnicodeDecodeError) as exc:
                raise PromptError(f"prompt versions: {path} cannot be imported ({exc}); fix it and restart") from exc
            except ValueError:  # a torn metadata file: the text is what matters
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            base = meta.get("base_version")
            rows.append({"name": template.name, "version": int(path.stem[1:]), "text": text,
                         "message": str(meta.get("message") or "")[:500],
                         "base_version": base if isinstance(base, int) else None, "author": None,
                         "created_at": _timestamp(meta.get("time"), path)})
    return rows


def _legacy_active(folder: Path) -> str | None:
    try:
        name = json.loads((folder / "active.json").read_text(encoding="utf-8"))["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and NAME_RE.fullmatch(name) else None


def _timestamp(iso: object, path: Path) -> float:
    try:
        return dt.datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return path.stat().st_mtime


def iso(timestamp: float) -> str:
    """Local time with its offset, to the second: how history shows when a version was saved."""
    return dt.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")
