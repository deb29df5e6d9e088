"""One row of ``app_state`` (a key and its JSON value): the small shared settings every replica reads, such as the
adapter registry, the active prompt template and the customer token key."""
from __future__ import annotations

import time

import sqlalchemy as sa

from chatapp.storage.engine import Database
from chatapp.storage.schema import app_state


def get_state(conn: sa.Connection, key: str) -> str | None:
    return conn.execute(sa.select(app_state.c.value).where(app_state.c.key == key)).scalar()


def put_state(db: Database, conn: sa.Connection, key: str, value: str, replace: bool = True) -> None:
    """Write the row: replace it, or (``replace=False``) keep a row that is already there, so replicas writing a first
    value at once agree on one."""
    stmt = db.insert(app_state).values(key=key, value=value, updated_at=time.time())
    if replace:
        stmt = stmt.on_conflict_do_update(index_elements=[app_state.c.key], set_={
            "value": stmt.excluded.value, "updated_at": stmt.excluded.updated_at})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=[app_state.c.key])
    conn.execute(stmt)
