"""Named locks in the database, so one replica of several does a job (the scheduled re-tune) at a time.

Postgres: a session advisory lock on a dedicated connection, released by the server when the holder's connection
or process dies, so a killed re-tune never blocks the next. SQLite (one machine): a lease row in `locks` renewed
by a heartbeat while held; a killed holder's lease runs out after ``ttl_s``. Both record the holder in `locks`, so
the refusal can say who holds it.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from chatapp.storage.engine import Database
from chatapp.storage.schema import locks


class LockHeld(RuntimeError):
    """Someone else holds the lock; ``owner`` says who (host:pid)."""

    def __init__(self, name: str, owner: str):
        super().__init__(f"{name} is held by {owner}")
        self.owner = owner


def default_owner() -> str:
    """host:pid, and a suffix so two holders in one process (tests, two stores) are two owners."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@contextmanager
def hold(db: Database, name: str, owner: str | None = None, ttl_s: float = 60.0) -> Iterator[None]:
    """Hold lock ``name`` for the block, or raise LockHeld at once (never waits)."""
    owner = owner or default_owner()
    if db.is_sqlite:
        with _lease(db, name, owner, ttl_s):
            yield
        return
    with db.engine.connect() as conn:
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(hashtext(:n))"), {"n": f"chatapp:{name}"}).scalar()
        conn.commit()
        if not got:
            with db.engine.connect() as peek:
                holder = peek.execute(sa.select(locks.c.owner).where(locks.c.name == name)).scalar()
            raise LockHeld(name, holder or "another replica")
        try:
            _record(db, conn, name, owner, float("inf"))
            yield
        finally:
            conn.execute(sa.delete(locks).where(locks.c.name == name, locks.c.owner == owner))
            conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext(:n))"), {"n": f"chatapp:{name}"})
            conn.commit()


def _record(db: Database, conn: sa.Connection, name: str, owner: str, expires_at: float) -> None:
    stmt = db.insert(locks).values(name=name, owner=owner, expires_at=min(expires_at, 1e300))
    conn.execute(stmt.on_conflict_do_update(index_elements=[locks.c.name], set_={
        "owner": stmt.excluded.owner, "expires_at": stmt.excluded.expires_at}))
    conn.commit()


@contextmanager
def _lease(db: Database, name: str, owner: str, ttl_s: float) -> Iterator[None]:
    with db.engine.begin() as conn:  # BEGIN IMMEDIATE: check and take in one step
        row = conn.execute(sa.select(locks.c.owner, locks.c.expires_at).where(locks.c.name == name)).first()
        if row is not None and row.owner != owner and row.expires_at > time.time():
            raise LockHeld(name, row.owner)
        stmt = db.insert(locks).values(name=name, owner=owner, expires_at=time.time() + ttl_s)
        conn.execute(stmt.on_conflict_do_update(index_elements=[locks.c.name], set_={
            "owner": stmt.excluded.owner, "expires_at": stmt.excluded.expires_at}))
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                with db.engine.begin() as c:
                    c.execute(sa.update(locks).where(locks.c.name == name, locks.c.owner == owner)
                              .values(expires_at=time.time() + ttl_s))
            except Exception:  # a busy moment: the next beat renews it, the lease has ttl_s of slack
                pass

    beat = threading.Thread(target=heartbeat, name=f"lease:{name}", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join(timeout=5)
        with db.engine.begin() as conn:
            conn.execute(sa.delete(locks).where(locks.c.name == name, locks.c.owner == owner))
