"""Where example banks edited or extended at run time live: the app's database (chatapp/storage), so a correction
or an agent's reply added on one replica is in every replica's next render. The shipped banks stay files under
prompts/examples/ (read-only); a bank's run-time copy starts as the shipped text and replaces it from then on.

Why: the example bank is what makes a correction count at once, and with several replicas "at once" means on the
replica the next question lands on. Every write is one transaction under the database's write lock (SQLite) or an
advisory lock per bank (Postgres), so concurrent additions on two replicas are both kept. A bank folder from before
the database (`data_dir/prompt_banks/*.jsonl`) is imported once.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from chatapp.storage import DB_ERRORS, Database, StorageError, migrate, open_database
from chatapp.storage.schema import example_banks

log = logging.getLogger(__name__)


class BankStoreError(RuntimeError):
    """The bank store cannot read or write the database; the message says why."""


def revision_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class BankStore:
    """Run-time copies of example banks in the database. Thread-safe."""

    def __init__(self, target: Path | str, busy_timeout_s: float = 5.0, legacy_dir: Path | None = None):
        try:
            self._db: Database = open_database(target, busy_timeout_s, pool_size=2, pooled_reads=True)
            migrate(self._db)
        except (*DB_ERRORS, StorageError) as exc:
            raise BankStoreError(f"example banks: the database cannot be used: {exc}") from exc
        if legacy_dir is not None and legacy_dir.is_dir():
            self._import(legacy_dir)

    def _reading(self):
        return (self._db.reader if self._db.is_sqlite else self._db.engine).connect()

    def revisions(self) -> dict[str, str]:
        """bank -> revision of every run-time copy (one small read: what a render checks)."""
        try:
            with self._reading() as conn:
                return dict(conn.execute(sa.select(example_banks.c.bank, example_banks.c.revision)).all())
        except DB_ERRORS as exc:
            raise BankStoreError(f"example banks cannot be read: {exc}") from exc

    def revision(self, bank: str) -> str | None:
        try:
            with self._reading() as conn:
                return conn.execute(sa.select(example_banks.c.revision)
                                    .where(example_banks.c.bank == bank)).scalar()
        except DB_ERRORS as exc:
            raise BankStoreError(f"example bank {bank!r} cannot be read: {exc}") from exc

    def get(self, bank: str) -> tuple[str, str] | None:
        """(text, revision) of the bank's run-time copy, or None when it has none (the shipped file applies)."""
        try:
            with self._reading() as conn:
                row = conn.execute(sa.select(example_banks.c.text, example_banks.c.revision)
                                   .where(example_banks.c.bank == bank)).first()
        except DB_ERRORS as exc:
            raise BankStoreError(f"example bank {bank!r} cannot be read: {exc}") from exc
        return (row.text, row.revision) if row else None

    def update(self, bank: str, change: Callable[[str | None], str]) -> str:
        """Replace the bank's text with ``change(current text or None)`` in one locked transaction (``change`` may
        raise to refuse: nothing is written). Returns the new revision."""
        try:
            with self._db.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE
                if not self._db.is_sqlite:
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:b))"), {"b": f"bank:{bank}"})
                current = conn.execute(sa.select(example_banks.c.text).where(example_banks.c.bank == bank)).scalar()
                text = change(current)
                revision = revision_of(text)
                stmt = self._db.insert(example_banks).values(bank=bank, text=text, revision=revision,
                                                             updated_at=time.time())
                conn.execute(stmt.on_conflict_do_update(index_elements=[example_banks.c.bank], set_={
                    "text": stmt.excluded.text, "revision": stmt.excluded.revision,
                    "updated_at": stmt.excluded.updated_at}))
            return revision
        except (*DB_ERRORS, StorageError) as exc:
            raise BankStoreError(f"example bank {bank!r} cannot be saved: {exc}") from exc

    def _import(self, folder: Path) -> None:
        known = self.revisions()
        for path in sorted(folder.glob("*.jsonl")):
            if path.stem not in known:
                text = path.read_text(encoding="utf-8")
                self.update(path.stem, lambda current, text=text: current if current is not None else text)
                log.info("example bank %s: imported %s into the database", path.stem, path)
