"""Prompt template versions in the app's database, on both engines: save, history, diff, revert and activate; a stale
base version refused across replicas and concurrent saves losing nothing; two replicas seeing each other's saves and
activation at their next render (with one small read per render when nothing changed); versions from before the
database imported once; and a database that cannot be used reported clearly while rendering goes on.

Real parts throughout: the shipped templates, SQLite files and a real Postgres (tests/pg.py). No embedder: the
templates rendered here are zero-shot.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy import event

from chatapp.benchutil import free_port
from chatapp.config import REPO_ROOT, Settings
from chatapp.prompts import PromptError, PromptManager, VersionConflict
from chatapp.storage import open_database

OLD_WORDING = "Never invent prices, dates, discounts or policies."
NEW_WORDING = "Never invent anything."


def replica(tmp_path: Path, name: str, db_target) -> Settings:
    """One replica's settings: its own data dir; the shared folder and database every replica uses."""
    settings = Settings(data_dir=tmp_path / name)
    settings.shared_dir = tmp_path / "shared"
    settings.database_url = f"sqlite:///{db_target}" if isinstance(db_target, Path) else db_target
    return settings


def template_text(user: str = "Info: {context}\nQ: {question}", **extra) -> str:
    data = {"description": "test", "mode": "zero_shot", "system": "You are {bot_name}.", "user": user, **extra}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def rows(db_target, query: str) -> list[tuple]:
    db = open_database(db_target)
    try:
        with db.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(query)).all()]
    finally:
        db.dispose()


def render(prompts: PromptManager, name: str | None = None):
    return prompts.render(name, question="hi", history=[], hits=[])


def test_save_history_diff_revert_activate(tmp_path, db_target):
    prompts = PromptManager(replica(tmp_path, "a", db_target))
    shipped = prompts.text("support")
    assert prompts.latest_version("support") == 1 and [h["version"] for h in prompts.history("support")] == [1]
    edited = shipped.replace(OLD_WORDING, NEW_WORDING)
    assert prompts.save("support", edited, "shorter", base_version=1, author="alice") == 2
    assert prompts.save("support", edited, "no change") == 2  # identical text: no new version
    history = prompts.history("support")
    assert [(h["version"], h["message"], h["author"], h["base_version"]) for h in history] == [
        (1, "shipped default", "", None), (2, "shorter", "alice", 1)]
    assert f"-  customer with a person. {OLD_WORDING}" in prompts.diff("support", 1, 2)
    assert f"+  customer with a person. {NEW_WORDING}" in prompts.diff("support", 1, 2)
    out = render(prompts)
    assert out.version == 2 and NEW_WORDING in out.messages[0]["content"]
    assert prompts.revert("support", 1, author="bob") == 3 and prompts.text("support") == shipped
    assert prompts.history("support")[-1]["message"] == "revert to version 1"
    # in the database, with who and from which base; the shipped file is untouched, no version files are written
    assert rows(db_target, "SELECT version, base_version, author FROM prompt_versions WHERE name = 'support' "
                           "ORDER BY version") == [(1, None, None), (2, 1, "alice"), (3, None, "bob")]
    assert (REPO_ROOT / "prompts" / "support.yaml").read_text() == shipped
    assert not (tmp_path / "shared" / "prompt_versions").exists()
    # a new template, activated: persisted for every manager (other sessions, the CLI)
    assert prompts.save("brief", template_text(), "new") == 1 and "brief" in prompts.names()
    prompts.activate("brief", author="alice")
    fresh = PromptManager(replica(tmp_path, "b", db_target))
    assert fresh.active_name == "brief" and render(fresh).template == "brief"
    assert json.loads(rows(db_target, "SELECT value FROM app_state WHERE key = 'prompts.active'")[0][0])["user"] \
        == "alice"
    with pytest.raises(PromptError, match="no template named"):
        prompts.activate("nope")
    with pytest.raises(PromptError, match="has no version 9"):
        prompts.text("support", 9)


def test_stale_base_version_and_concurrent_saves_on_several_replicas(tmp_path, db_target):
    alice = PromptManager(replica(tmp_path, "a", db_target))
    bob = PromptManager(replica(tmp_path, "b", db_target))
    text = alice.text("support_zh")
    assert alice.save("support_zh", text.replace("一到三句话", "一句话"), "alice", base_version=1) == 2
    with pytest.raises(VersionConflict) as err:
        bob.save("support_zh", text.replace("一到三句话", "两句话"), "bob", base_version=1)
    assert (err.value.base_version, err.value.latest) == (1, 2)
    assert "一句话" in bob.text("support_zh") and len(bob.history("support_zh")) == 2

    # eight sessions on four replicas at once: without a base every save is kept, each under its own number...
    managers = [PromptManager(replica(tmp_path, f"r{i % 4}", db_target)) for i in range(8)]
    results: dict[int, int] = {}
    conflicts: list[int] = []

    def race(base: int | None, tag: str) -> None:
        barrier = threading.Barrier(8)
        results.clear()

        def writer(i: int) -> None:
            barrier.wait()
            try:
                results[i] = managers[i].save("race", template_text(user=f"{{context}} {{question}} {tag}{i}"),
                                              f"{tag} {i}", base_version=base)
            except VersionConflict:
                conflicts.append(i)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]

    race(None, "w")
    assert sorted(results.values()) == list(range(1, 9)) and not conflicts
    for i, version in results.items():
        assert yaml.safe_load(alice.text("race", version))["user"].endswith(f" w{i}")
    # ...and from one base exactly one wins; the others are told, nothing is lost or mixed
    race(8, "e")
    assert list(results.values()) == [9] and len(conflicts) == 7
    winner = next(iter(results))
    assert yaml.safe_load(bob.text("race"))["user"].endswith(f" e{winner}") and bob.latest_version("race") == 9
    assert rows(db_target, "SELECT count(*) FROM prompt_versions WHERE name = 'race'") == [(9,)]


def test_two_replicas_see_each_others_saves_and_activation_at_the_next_render(tmp_path, db_target):
    a = PromptManager(replica(tmp_path, "a", db_target))
    b = PromptManager(replica(tmp_path, "b", db_target))
    assert render(b).version == 1
    edited = a.text("support").replace(OLD_WORDING, NEW_WORDING)
    assert a.save("support", edited, "from a") == 2
    out = render(b)
    assert out.version == 2 and NEW_WORDING in out.messages[0]["content"]  # B's very next render, no restart
    assert b.save("brief", template_text(user="{context} {question} one"), "from b") == 1
    assert "brief" in a.names()
    a.activate("brief")
    assert b.active_name == "brief" and render(b).template == "brief"

    # what B's render asks the database when nothing changed: one small read (the active template and the revision
    # token), no version list, no text; after A saves, the new version is read once
    db = b.versions.db
    statements: list[str] = []
    engine = db.reader if db.is_sqlite else db.engine

    def count(conn, cursor, statement, *args):
        if "app_state" in statement or "prompt_versions" in statement:
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        render(b)
        assert len(statements) == 1 and "app_state" in statements[0]
        assert a.save("brief", template_text(user="{context} {question} two"), "again from a") == 2
        statements.clear()
        assert render(b).messages[-1]["content"].endswith("two")
        assert sum("prompt_versions" in s for s in statements) == 2  # the latest numbers, then the new text
        statements.clear()
        render(b)
        assert len(statements) == 1
    finally:
        event.remove(engine, "before_cursor_execute", count)


def _legacy_version(folder: Path, version: int, text: str, message: str, base: int | None = None) -> None:
    """A version as the file-based store before the database wrote it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"v{version:04d}.json").write_text(json.dumps({
        "version": version, "time": f"2025-01-0{version}T03:04:05+00:00", "message": message, "base_version": base}))
    (folder / f"v{version:04d}.yaml").write_text(text)


def test_versions_from_before_the_database_are_imported_once(tmp_path, db_target):
    settings = replica(tmp_path, "a", db_target)
    legacy = settings.prompt_versions_dir
    shipped = (REPO_ROOT / "prompts" / "support.yaml").read_text()
    edited = shipped.replace(OLD_WORDING, NEW_WORDING)
    _legacy_version(legacy / "support", 1, shipped, "shipped default")
    _legacy_version(legacy / "support", 2, edited, "old edit", base=1)
    _legacy_version(legacy / "legacy_only", 1, template_text(), "made before the database")
    (legacy / "active.json").write_text(json.dumps({"name": "legacy_only", "time": "2025-01-01T00:00:00+00:00"}))
    (legacy / ".support.lock").write_text("")  # the old lock files are ignored

    # two replicas starting together: the folder is imported once
    managers = [PromptManager(replica(tmp_path, n, db_target)) for n in ("a", "b")]
    barrier = threading.Barrier(2)
    latest: list[int] = []

    def start(manager: PromptManager) -> None:
        barrier.wait()
        latest.append(manager.latest_version("support"))

    threads = [threading.Thread(target=start, args=(m,)) for m in managers]
    [t.start() for t in threads]
    [t.join() for t in threads]
    a, b = managers
    assert latest == [2, 2] and a.text("support") == edited and b.text("support", 1) == shipped
    history = a.history("support")
    assert [(h["version"], h["message"]) for h in history] == [(1, "shipped default"), (2, "old edit")]
    assert rows(db_target, "SELECT base_version FROM prompt_versions WHERE name = 'support' AND version = 2") == [(1,)]
    assert b.active_name == "legacy_only" and "legacy_only" in b.names()
    assert render(b).template == "legacy_only"
    assert rows(db_target, "SELECT count(*) FROM prompt_versions") == [(3,)]
    # the database is the copy now: the files are left as they were and not read again
    _legacy_version(legacy / "support", 3, shipped, "written by an old replica later")
    assert PromptManager(replica(tmp_path, "c", db_target)).latest_version("support") == 2
    assert a.save("support", shipped.replace(OLD_WORDING, "Be brief."), "after the import", base_version=2) == 3
    assert (legacy / "support" / "v0002.yaml").read_text() == edited


def test_a_corrupt_or_unreachable_database_is_reported_and_rendering_goes_on(tmp_path):
    corrupt = tmp_path / "corrupt.sqlite3"
    corrupt.write_bytes(b"this is not a database " * 200)
    unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/chatapp"
    for target, reason in ((f"sqlite:///{corrupt}", "corrupt"), (unreachable, "cannot be reached")):
        settings = Settings(data_dir=tmp_path / "var")
        settings.database_url = target
        settings.feedback.busy_timeout_s = 1.0
        prompts = PromptManager(settings)
        with pytest.raises(PromptError, match=f"prompt versions .*{reason}"):
            prompts.save("brief", template_text(), "x")
        with pytest.raises(PromptError, match=reason):
            prompts.history("support")
        with pytest.raises(PromptError, match=reason):
            prompts.activate("support_zero_shot")
        # answers go on with the shipped templates; the editor can still list and open them
        out = render(prompts)
        assert (out.template, out.version) == ("support", 1)
        assert "support_zero_shot" in prompts.names() and prompts.latest_version("support") == 1


@pytest.mark.postgres
def test_a_database_going_away_keeps_the_versions_read_last(tmp_path, postgres):
    """The server drops the database mid-run: renders go on with the version they had; saves say why they fail."""
    name = postgres.createdb()
    settings = replica(tmp_path, "a", postgres.url(name))
    prompts = PromptManager(settings)
    edited = prompts.text("support").replace(OLD_WORDING, NEW_WORDING)
    assert prompts.save("support", edited, "before") == 2 and render(prompts).version == 2
    postgres.dropdb(name)
    out = render(prompts)
    assert out.version == 2 and NEW_WORDING in out.messages[0]["content"]
    with pytest.raises(PromptError, match="prompt versions of .support. not saved: .*does not exist"):
        prompts.save("support", edited + "\n# more\n", "after")
