"""One database layer (SQLAlchemy 2 Core) for every part of the app that keeps state: SQLite in the data
directory by default, Postgres (``postgresql+psycopg://...``) for several replicas sharing one."""
from chatapp.storage.engine import (
    DB_ERRORS,
    Database,
    StorageError,
    describe_error,
    open_database,
    resolve_url,
    root_cause,
    safe_url,
)
from chatapp.storage.migrations import MIGRATIONS, SCHEMA_VERSION, check_version, migrate, schema_version

__all__ = ["DB_ERRORS", "Database", "MIGRATIONS", "SCHEMA_VERSION", "StorageError", "check_version",
           "describe_error", "migrate", "open_database", "resolve_url", "root_cause", "safe_url", "schema_version"]
