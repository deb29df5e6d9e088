"""A real, temporary Postgres 15 cluster (Debian's `postgresql` package): initdb + pg_ctl as a non-root user, a
free port, trust login on 127.0.0.1 only, removed afterwards.

Why it lives in the package and not in tests/: the tests marked ``postgres`` (tests/pg.py re-exports it) and the
benchmarks (bench/feedback.py, bench/generation.py's replicas runs) start the same cluster, and bench scripts do not
import from tests/.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from chatapp.benchutil import free_port


def postgres_bin() -> Path | None:
    """The folder of Postgres's server programs (15 preferred), or None when the server is not installed."""
    for pattern in ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/*/bin"):
        for folder in sorted(glob.glob(pattern), reverse=True):
            if Path(folder, "initdb").exists():
                return Path(folder)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def temporary_postgres() -> "PostgresCluster | None":
    """A started temporary cluster, or None when Postgres's server programs are not installed."""
    bindir = postgres_bin()
    return PostgresCluster(bindir).start() if bindir else None


class PostgresCluster:
    """One temporary cluster. ``url(db)`` is a SQLAlchemy URL; ``createdb``/``dropdb``/``sql`` manage it."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="chatapp-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user (or nobody)
            user = "postgres" if _user_exists("postgres") else "nobody"
            self._as = ["runuser", "-u", user, "--"]
            shutil.chown(self.root, user)
        os.chmod(self.root, 0o755)

    def start(self) -> "PostgresCluster":
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                   "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        self.restart_stopped()
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                      check=False)

    def restart_stopped(self) -> None:
        """Start the initialised cluster (again, after `stop()`: a test of the server going away and coming back)."""
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                   "-c max_connections=200 -c shared_buffers=64MB")
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                   "-w", "-t", "60", "start"])

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser (autocommit) and return its rows."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database,
                             autocommit=True) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []

    def createdb(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self.sql(f"CREATE DATABASE {name}")
        return name

    def dropdb(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _run(self, cmd: list[str], check: bool = True) -> None:
        result = subprocess.run([*self._as, *cmd], capture_output=True, text=True, cwd=self.root, timeout=120)
        if check and result.returncode != 0:
            log = (self.root / "log").read_text(errors="replace")[-2000:] if (self.root / "log").exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr or result.stdout}\n{log}")


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
