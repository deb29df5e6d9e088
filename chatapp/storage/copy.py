"""Copy every table of one database into another (the SQLite file of a single install into the Postgres database of
several replicas): `chatapp db copy --to postgresql+psycopg://...` (chatapp/db_cli.py).

Why it is built this way:
- Both databases are brought to this program's schema first (the source as the app would at its start), so the
  tables of `schema.py` are what is read and written, column for column, on either engine.
- The whole copy is one transaction on the target: a failure half-way leaves the target as it was, and the rows are
  sent in batches (one multi-row INSERT per batch) so a large feedback log neither fills memory nor costs a round
  trip per row.
- A target that already holds rows is refused unless the caller asks to replace them: merging two installs' ids
  (a message id, a conversation's message numbers) is not something to do by accident.
- Postgres numbers `conversation_messages.id` from a sequence; copied ids do not move it, so it is set past them.
"""
from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from chatapp.storage.engine import Database, StorageError
from chatapp.storage.migrations import migrate
from chatapp.storage.schema import metadata


class TargetNotEmpty(StorageError):
    """The target database already holds rows (in the tables named in the message)."""


def row_counts(conn: Connection) -> dict[str, int]:
    """table -> rows, for every table of the schema."""
    return {t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
            for t in metadata.sorted_tables}


def copy_database(source: Database, target: Database, *, replace: bool = False, batch: int = 500,
                  progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Copy every table of `source` into `target` in one target transaction; returns table -> rows copied.
    Refuses (TargetNotEmpty) a target with rows unless `replace`, which empties its tables first."""
    if source.url == target.url:
        raise StorageError(f"the source and the target are the same database ({source.where})")
    migrate(source)
    migrate(target)
    copied: dict[str, int] = {}
    with target.engine.begin() as out:
        found = {name: n for name, n in row_counts(out).items() if n}
        if found and not replace:
            listed = ", ".join(f"{name} ({n:,})" for name, n in found.items())
            raise TargetNotEmpty(f"{target.where} already holds rows: {listed}. Nothing was copied; copy into an "
                                 "empty database, or replace its rows with --replace")
        if replace:
            for table in reversed(metadata.sorted_tables):
                out.execute(table.delete())
        with source.reader.connect() as src:  # one snapshot of the source (SQLite: a read-only connection)
            for table in metadata.sorted_tables:
                copied[table.name] = _copy_table(src, out, table, batch, progress)
        if target.dialect == "postgresql":
            _advance_sequences(out)
        written = row_counts(out)
        if written != copied:  # a row the target's constraints dropped or doubled: do not commit a partial copy
            raise StorageError(f"the copy does not add up (copied {copied}, the target holds {written}); "
                               "nothing was committed")
    return copied


def _copy_table(src: Connection, out: Connection, table: sa.Table, batch: int,
                progress: Callable[[str, int], None] | None) -> int:
    order = list(table.primary_key.columns) or list(table.columns)
    result = src.execution_options(yield_per=batch).execute(sa.select(table).order_by(*order))
    done = 0
    for rows in result.mappings().partitions(batch):
        out.execute(table.insert(), [dict(row) for row in rows])
        done += len(rows)
        if progress is not None:
            progress(table.name, done)
    return done


def _advance_sequences(out: Connection) -> None:
    """Set each serial column's sequence past the copied ids, so the app's next insert gets a new one."""
    for table in metadata.sorted_tables:
        column = table.autoincrement_column
        if column is None:
            continue
        out.execute(sa.text(f"SELECT setval(pg_get_serial_sequence(:t, :c), coalesce(max({column.name}), 1), "
                            f"max({column.name}) IS NOT NULL) FROM {table.name}"),
                    {"t": table.name, "c": column.name})
