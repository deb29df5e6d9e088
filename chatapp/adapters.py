"""Adapter registry: one folder per LoRA version under `settings.adapters_dir`, and the database naming the active one.

    chatapp adapters list | show VERSION | promote VERSION | rollback

Why it is shaped like this:
- A version folder is immutable once it exists: PEFT files (adapter_config.json, adapter_model.safetensors),
  metadata.json (base model and its hash, data hash, template versions, hyperparameters, metrics, time), the gate
  report, the training log and loss curve, and the training records (the replay pool of the next re-tune). It is
  assembled in a temporary folder and renamed into place, so a killed writer never leaves half a version behind.
- The registry state (the active version, the stack of earlier active ones that rollback returns to, the events) is
  one row of the app's database (chatapp/storage, `app_state`), changed in one transaction under the database's
  write lock (SQLite) or an advisory lock (Postgres): two admins promoting at once, on one replica or two, cannot
  lose an update, and a promotion on one replica is what every replica serves at its next answer. With several
  replicas, `adapters_dir` lies in the shared folder (`shared_dir`), so every replica can load every version.
  A `registry.json` left by an older version is imported once.
- `active()` is called before every answer: one small indexed read; the JSON is parsed only when it changed.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa

from chatapp.config import Settings
from chatapp.files import atomic_write_json, fsync_dir, sha256_file
from chatapp.storage import DB_ERRORS, StorageError, migrate, open_database
from chatapp.storage.state import get_state, put_state

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"  # where versions before the database kept the state (imported once)
STATE_KEY = "adapters.registry"
_PG_LOCK = 0x61647074  # "adpt": registry writers on every replica queue on this advisory lock
LOCK_FILE = ".registry.lock"
VERSION_RE = re.compile(r"v\d{4,}")
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "metadata.json")
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_adapter"  # built by `python -m chatapp.tuning.shipped`


class AdapterError(ValueError):
    """An adapter version is unknown or incomplete, or the registry cannot be written; the message says which."""


@dataclass
class AdapterInfo:
    version: str
    path: Path
    metadata: dict = field(default_factory=dict)

    @property
    def created(self) -> str:
        return str(self.metadata.get("created", ""))

    @property
    def gate(self) -> dict:
        return self.metadata.get("gate") or {}

    def gate_report(self) -> dict:
        """The full gate report (with sample answers), or the summary kept in the metadata."""
        try:
            return json.loads((self.path / "gate_report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return self.gate

    @property
    def loss_curve(self) -> Path | None:
        path = self.path / "loss_curve.png"
        return path if path.is_file() else None


class AdapterRegistry:
    """Versions on disk plus the active pointer; safe to share between the app and a background tuning process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = Path(settings.adapters_dir)
        self._cache_raw: str | None = None
        self._cache_state: dict = {"active": None, "previous": [], "events": []}
        self._metadata: dict[str, dict] = {}  # versions are immutable, so their metadata is cached forever
        self._read_lock = threading.Lock()
        self._missing_reported: str | None = None
        self._db_reported: str | None = None
        self._tx = threading.local()  # the transaction promote/rollback run in (state reads go through it)
        try:
            self._db = open_database(settings.database, settings.feedback.busy_timeout_s, pool_size=2, pooled_reads=True)
            migrate(self._db)
        except (*DB_ERRORS, StorageError) as exc:
            raise AdapterError(f"adapter registry: the database cannot be used: {exc}") from exc
        self._import_registry_file()

    # ---- reading

    @property
    def registry_path(self) -> Path:
        """The file older versions kept the state in (read once, by `_import_registry_file`)."""
        return self.root / REGISTRY_FILE

    def _state(self) -> dict:
        """The registry state from the database; inside promote/rollback, read in (and locked by) their transaction.
        If the database cannot be read, the last state read is kept (answers go on with the adapter they had)."""
        conn = getattr(self._tx, "conn", None)
        if conn is not None:
            return _parse_state(get_state(conn, STATE_KEY))
        try:
            with (self._db.reader if self._db.is_sqlite else self._db.engine).connect() as c:
                raw = get_state(c, STATE_KEY)
        except DB_ERRORS as exc:
            if self._db_reported != str(exc):
                log.error("adapter registry unreadable (%s): keeping the last known active adapter", exc)
                self._db_reported = str(exc)
            return self._cache_state
        with self._read_lock:
            if raw != self._cache_raw:
                self._cache_raw, self._cache_state = raw, _parse_state(raw)
            return self._cache_state

    def get(self, version: str) -> AdapterInfo:
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
            raise AdapterError(f"{version!r} is not an adapter version (they look like v0001)")
        path = self.root / version
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if not path.is_dir() or missing:
            known = ", ".join(i.version for i in self.list()) or "none yet"
            what = "does not exist" if not path.is_dir() else f"is incomplete (missing {', '.join(missing)})"
            raise AdapterError(f"adapter {version} {what} in {self.root} (versions: {known})")
        if version not in self._metadata:
            try:
                self._metadata[version] = json.loads((path / "metadata.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise AdapterError(f"adapter {version}: metadata.json is unreadable: {exc}") from exc
        return AdapterInfo(version, path, self._metadata[version])

    def active(self) -> AdapterInfo | None:
        """The adapter new answers should use, or None for the base model. Cheap: a stat() when nothing changed."""
        version = self._state().get("active")
        if not version:
            return None
        try:
            return self.get(version)
        except AdapterError:
            if self._missing_reported != version:  # once, not before every answer
                log.error("the active adapter %s is missing or incomplete: answering with the base model", version)
                self._missing_reported = version
            return None

    def list(self) -> list[AdapterInfo]:
        """Complete versions, oldest first (half-written or foreign folders are ignored)."""
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.iterdir(), key=lambda p: (len(p.name), p.name)):
            if path.is_dir() and VERSION_RE.fullmatch(path.name) and all((path / n).is_file() for n in REQUIRED_FILES):
                try:
                    out.append(self.get(path.name))
                except AdapterError:
                    continue
        return out

    def history(self) -> list[dict]:
        """Promotions and rollbacks, oldest first (who/when/what), for the admin tab."""
        return list(self._state().get("events", []))

    def previous(self) -> list[str]:
        return list(self._state().get("previous", []))

    # ---- writing

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The version folders' lock (adding a version); the state has its own, `_registry_tx`."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def _registry_tx(self) -> Iterator[None]:
        """One transaction holding the registry's write lock on every replica; `_fresh_state`/`_write_state` use it."""
        try:
            with self._db.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE
                if not self._db.is_sqlite:
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
                self._tx.conn = conn
                try:
                    yield
                finally:
                    self._tx.conn = None
        except (*DB_ERRORS, StorageError) as exc:
            raise AdapterError(f"adapter registry: the database cannot be written: {exc}") from exc

    def _write_state(self, state: dict) -> None:
        state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        state["events"] = state.get("events", [])[-200:]
        put_state(self._db, self._tx.conn, STATE_KEY, json.dumps(state, default=str))

    def _fresh_state(self) -> dict:
        return json.loads(json.dumps(self._state()))  # read inside the transaction: never a stale cache

    def _import_registry_file(self) -> None:
        """A `registry.json` from before the database becomes its first state (once; the file is left as it was)."""
        if not self.registry_path.is_file():
            return
        with self._registry_tx():
            if get_state(self._tx.conn, STATE_KEY) is not None:
                return
            try:
                state = json.loads(self.registry_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise AdapterError(f"adapter registry {self.registry_path} is unreadable: {exc}") from exc
            self._write_state(_parse_state(json.dumps(state)))
            log.info("adapter registry: imported %s into the database", self.registry_path)

    def promote(self, version: str, *, user: str | None = None, reason: str = "") -> AdapterInfo:
        """Make `version` the active adapter (atomically); the one it replaces becomes the rollback target."""
        info = self.get(version)
        with self._registry_tx():
            state = self._fresh_state()
            current = state.get("active")
            if current == version:
                return info
            state["previous"] = (state.get("previous", []) + [current])[-50:]
            state["active"] = version
            state["events"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "action": "promote",
                                    "version": version, "from": current, "user": user, "reason": reason})
            self._write_state(state)
        log.info("adapter %s is now active (was %s)", version, current or "the base model")
        return info

    def rollback(self, *, user: str | None = None, reason: str = "") -> AdapterInfo | None:
        """Go back to the previously active version (None = the base model). Versions deleted since are skipped."""
        with self._registry_tx():
            state = self._fresh_state()
            current = state.get("active")
            if current is None and not state.get("previous"):
                raise AdapterError("nothing to roll back: the base model is active and no adapter was active before")
            previous = list(state.get("previous", []))
            target = None
            while previous:
                candidate = previous.pop()
                if candidate is None:
                    break
                try:
                    self.get(candidate)
                except AdapterError:
                    continue
                target = candidate
                break
            state["previous"], state["active"] = previous, target
            state["events"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "action": "rollback",
                                    "version": target, "from": current, "user": user, "reason": reason})
            self._write_state(state)
        log.info("rolled back from %s to %s", current, target or "the base model")
        return self.get(target) if target else None

    def next_version(self) -> str:
        numbers = [int(p.name[1:]) for p in self.root.glob("v*") if VERSION_RE.fullmatch(p.name)] if self.root.is_dir() else []
        return f"v{max(numbers, default=0) + 1:04d}"

    def add(self, source: Path, metadata: dict) -> AdapterInfo:
        """Copy a finished PEFT adapter folder in as the next version (assembled aside, then renamed into place).
        Does not activate it: promotion is a separate, gated step."""
        source = Path(source)
        if not (source / "adapter_config.json").is_file():
            raise AdapterError(f"{source} is not a PEFT adapter folder (no adapter_config.json)")
        with self._locked():
            version = self.next_version()
            staging = self.root / f".staging-{version}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging)
            metadata = {**metadata, "version": version, "created": metadata.get("created")
                        or time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            atomic_write_json(staging / "metadata.json", metadata)
            for path in staging.iterdir():  # the files must be on disk before the folder becomes visible
                if path.is_file():
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
            os.rename(staging, self.root / version)
            fsync_dir(self.root)
        return self.get(version)

    def install_shipped(self, base_hash: str | None, source: Path = SHIPPED_DIR) -> AdapterInfo | None:
        """Register the adapter shipped in the package (never for other base weights than it was trained on), once
        per shipped adapter. A fresh registry makes it active, so a fresh install answers with the fine-tuned model.
        After an upgrade that ships a newer one, it replaces an active *shipped* adapter (the install was answering
        with the package's default, so it follows the package); an adapter the team tuned and promoted, or a
        rollback to the base model, stays active, and the new one waits in the registry to be promoted."""
        if not (source / "adapter_config.json").is_file():
            return None
        metadata = json.loads((source / "metadata.json").read_text(encoding="utf-8"))
        trained_on = (metadata.get("base_model") or {}).get("sha256")
        if base_hash is None or trained_on != base_hash:
            return None
        with self._registry_tx():  # check, add and activate as one step: replicas starting together install it once
            state = self._fresh_state()
            fresh = not state.get("events") and not any(self.root.glob("v*"))
            shipped = [] if fresh else [i for i in self.list() if i.metadata.get("shipped")]
            package = sha256_file(source / "adapter_model.safetensors")
            weights = [i.path / "adapter_model.safetensors" for i in shipped]
            if any(w.is_file() and sha256_file(w) == package for w in weights):
                return None  # this one is registered already
            info = self.add(source, {**metadata, "created": metadata.get("created")})
            current = state.get("active")
            if fresh or current in {i.version for i in shipped}:
                state["previous"] = (state.get("previous", []) + [current])[-50:]
                state["active"] = info.version
                state["events"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "action": "promote",
                                        "version": info.version, "from": current, "user": None,
                                        "reason": "shipped with the package" if fresh else
                                        f"a newer adapter shipped with the package (replaces {current})"})
                self._write_state(state)
            log.info("shipped adapter registered as %s%s", info.version,
                     " and active" if state.get("active") == info.version else "; promote it to use it")
        return info

    def cleanup_staging(self) -> int:
        """Remove folders left by writers that were killed mid-copy (their pid is gone)."""
        removed = 0
        for path in self.root.glob(".staging-*") if self.root.is_dir() else []:
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed


def _parse_state(raw: str | None) -> dict:
    state = json.loads(raw) if raw else {}
    state = state if isinstance(state, dict) else {}
    state.setdefault("active", None)
    state.setdefault("previous", [])
    state.setdefault("events", [])
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(info: AdapterInfo, active: str | None = None) -> dict:
    """One row of the registry table (CLI and admin tab)."""
    meta, gate = info.metadata, info.gate
    metrics = meta.get("metrics", {})
    return {
        "version": info.version,
        "active": info.version == active,
        "created": meta.get("created", ""),
        "examples": meta.get("data", {}).get("train_examples"),
        "steps": metrics.get("steps"),
        "best_val_loss": metrics.get("best_val_loss"),
        "rouge_l": gate.get("scores", {}).get("candidate", {}).get("rouge_l"),
        "cosine": gate.get("scores", {}).get("candidate", {}).get("cosine"),
        "gate": "passed" if gate.get("passed") else ("failed" if gate else "not run"),
        "base": meta.get("base_model", {}).get("name", ""),
    }


# ---- CLI: chatapp adapters list|show|promote|rollback ----------------------------------------------------------


def add_arguments(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `adapters` and its subcommands; each sets `func(settings, args) -> int`."""
    parser = subparsers.add_parser("adapters", help="list, show, promote and roll back LoRA adapter versions")
    sub = parser.add_subparsers(dest="adapters_command", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", help="versions with their metrics; * marks the active one")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="metadata and gate report of a version")
    show.add_argument("version")
    show.set_defaults(func=cmd_show)
    promote = sub.add_parser("promote", help="make a version active (the running app picks it up at its next answer)")
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="promote even though its gate did not pass")
    promote.set_defaults(func=cmd_promote)
    sub.add_parser("rollback", help="go back to the previously active version (or the base model)").set_defaults(
        func=cmd_rollback)
    return parser


def _guard(func):
    """Bad input: a one-line message and exit code 2, never a traceback."""
    def run(settings: Settings, args: argparse.Namespace) -> int:
        try:
            return func(settings, args) or 0
        except (AdapterError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    run.__name__ = func.__name__
    return run


@_guard
def cmd_list(settings: Settings, args) -> int:
    registry = AdapterRegistry(settings)
    active = registry.active()
    rows = [describe(info, active.version if active else None) for info in registry.list()]
    if args.json:
        print(json.dumps({"active": active.version if active else None, "versions": rows}, indent=2))
        return 0
    if not rows:
        print(f"no adapters yet in {registry.root} (run `chatapp tune`)")
        return 0
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"  # noqa: E731
    print(f"  {'version':8s} {'created':25s} {'examples':>8s} {'steps':>6s} {'val loss':>9s} {'ROUGE-L':>8s} "
          f"{'cosine':>7s}  gate")
    for r in rows:
        print(f"{'*' if r['active'] else ' '} {r['version']:8s} {r['created']:25s} {fmt(r['examples'], '8d'):>8s} "
              f"{fmt(r['steps'], '6d'):>6s} {fmt(r['best_val_loss'], '9.4f'):>9s} {fmt(r['rouge_l'], '8.4f'):>8s} "
              f"{fmt(r['cosine'], '7.4f'):>7s}  {r['gate']}")
    print(f"active: {active.version if active else 'none (base model)'}")
    return 0


@_guard
def cmd_show(settings: Settings, args) -> int:
    info = AdapterRegistry(settings).get(args.version)
    print(json.dumps({"version": info.version, "path": str(info.path), **info.metadata}, indent=2, default=str))
    return 0


@_guard
def cmd_promote(settings: Settings, args) -> int:
    registry = AdapterRegistry(settings)
    info = registry.get(args.version)
    if not info.gate.get("passed") and not args.force:
        print(f"error: adapter {info.version} did not pass its evaluation gate; see `chatapp adapters show "
              f"{info.version}`. Pass --force to promote it anyway.", file=sys.stderr)
        return 2
    registry.promote(args.version, user=os.environ.get("USER"), reason="cli" + (" --force" if args.force else ""))
    print(f"active adapter: {args.version}")
    return 0


@_guard
def cmd_rollback(settings: Settings, args) -> int:
    info = AdapterRegistry(settings).rollback(user=os.environ.get("USER"), reason="cli")
    print(f"active adapter: {info.version if info else 'none (base model)'}")
    return 0
