"""``chatapp db copy --to URL``: the database's command line (argparse lives here, the copy in
chatapp/storage/copy.py). What it is for: moving a single install's SQLite file onto the Postgres database that
several replicas will share, before they start."""
from __future__ import annotations

import argparse
import sys

from chatapp.config import Settings
from chatapp.storage import DB_ERRORS, StorageError, describe_error, open_database, resolve_url


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Register ``db copy`` (chatapp/cli.py calls this); each action sets ``func(settings, args) -> int``."""
    parser = subparsers.add_parser("db", help="the app's database: copy it to another one (SQLite -> Postgres)")
    actions = parser.add_subparsers(dest="db_command", required=True)
    copy = actions.add_parser("copy", help="copy every table into another database (migrated first), in one "
                                           "transaction; refuses a target that holds rows unless --replace")
    copy.add_argument("--to", required=True, metavar="URL",
                      help="the target: postgresql+psycopg://USER:PASS@HOST/DB (or an SQLite file)")
    copy.add_argument("--from", dest="source", metavar="URL_OR_FILE", default=None,
                      help="the source (default: the app's database, the data directory's feedback.sqlite3)")
    copy.add_argument("--replace", action="store_true",
                      help="delete the rows the target already holds and copy over them (default: refuse)")
    copy.add_argument("--batch", type=int, default=500, help="rows per INSERT (default 500)")
    copy.set_defaults(func=run_copy)


def run_copy(settings: Settings, args: argparse.Namespace) -> int:
    from chatapp.storage.copy import copy_database

    source_target = args.source or settings.database
    timeout = settings.feedback.busy_timeout_s
    try:
        url = resolve_url(source_target)
        if url.get_backend_name() == "sqlite" and not _exists(url.database):  # opening it would create an empty one
            print(f"error: no database at {url.database} (give --from or --data-dir)", file=sys.stderr)
            return 1
        source, target = open_database(source_target, timeout), open_database(args.to, timeout)
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"copying {source.where} -> {target.where}", flush=True)
    try:
        counts = copy_database(source, target, replace=args.replace, batch=max(1, args.batch))
    except DB_ERRORS as exc:
        print(f"error: nothing was copied: {describe_error(exc, target.where, timeout)}", file=sys.stderr)
        return 1
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        source.dispose()
        target.dispose()
    width = max(len(name) for name in counts)
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n:>10,}")
    print(f"copied {sum(counts.values()):,} rows in {len(counts)} tables")
    from_the_file = not args.source and not settings.database_url  # else the key came with app_state's rows
    return _copy_browser_key(settings, args.to, timeout) if from_the_file else 0


def _copy_browser_key(settings: Settings, to: str, timeout: float) -> int:
    """The install's customer token key goes with its conversations (replicas read it from the database), so a
    customer's open chat still opens after the move."""
    from chatapp.access import BrowserKeyError, BrowserTokens, database_browser_key

    key_file = settings.data_dir / "browser.key"
    if not key_file.is_file():
        return 0
    try:
        key = BrowserTokens(key_file).key
        stored = database_browser_key(to, timeout, initial=key)
    except BrowserKeyError as exc:
        print(f"error: the rows were copied, the customer token key was not: {exc}", file=sys.stderr)
        return 1
    print(f"customer token key: {'copied from ' + str(key_file) if stored == key else 'the target had its own'}")
    return 0


def _exists(path: str | None) -> bool:
    from pathlib import Path

    return bool(path) and Path(path).expanduser().is_file()
