"""Knowledge files edited from the staff console: answers written for knowledge gaps (FAQ lines appended to
`gaps-answers.jsonl`) and existing Markdown articles.

Why it is built this way: the knowledge folder is what the retriever indexes, so a write must never leave a half file
(atomic rename) or silently undo a colleague's edit (the editor sends back the sha256 it loaded); every version is
kept with who, when and why under data_dir/knowledge_versions (like prompt versions), so any edit can be undone.
With several replicas (``database_url``) the database's document is what is read and changed, in one transaction
(chatapp/shared_knowledge.py), so an edit on one replica is what the others index and edit next; an edit while the
database cannot be reached is refused, not kept on one replica.
"""
from __future__ import annotations

import hashlib
import json
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Callable

from chatapp.config import Settings
from chatapp.knowledge import DOC_SUFFIXES, Problems, parse_file
from chatapp.files import atomic_write, file_lock
from chatapp.shared_knowledge import ERRORS, KnowledgeSync

ANSWERS_FILE = "gaps-answers.jsonl"
MAX_QUESTION_CHARS, MAX_ANSWER_CHARS, MAX_ARTICLE_CHARS = 500, 4000, 200_000


class KnowledgeEditError(ValueError):
    """An edit that cannot be saved as asked; the message says why. Nothing was written."""


class KnowledgeEditor:
    """Edits to knowledge files: validated, atomic, every version kept (who, when, why) under data_dir."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = Path(settings.retrieval.knowledge_dir)
        self.versions_dir = settings.shared / "knowledge_versions"  # every replica can undo any edit
        self.shared = KnowledgeSync(settings) if settings.database_url else None
        self._lock = threading.Lock()

    def path(self, rel: str) -> Path:
        """The file ``rel`` names inside the knowledge folder; anything outside it (or not editable) is refused."""
        rel = (rel or "").strip()
        path = (self.root / rel).resolve()
        if not rel or not path.is_relative_to(self.root.resolve()) or path.suffix.lower() not in (
                DOC_SUFFIXES | {".jsonl"}):
            raise KnowledgeEditError(f"{rel!r} is not an article or FAQ file inside the knowledge folder")
        return path

    def articles(self) -> list[str]:
        root = self.root.resolve()
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                      and p.suffix.lower() in {".md", ".markdown"}) if root.is_dir() else []

    def read(self, rel: str) -> tuple[str, str]:
        """The file's text and its sha256 (the editor sends it back so a concurrent edit is not overwritten)."""
        path = self.path(rel)
        if self.shared is not None:
            try:
                text = self.shared.text(rel)
            except ERRORS:
                text = None  # shown from this replica's copy; saving says the database is unreachable
            if text is not None:
                return text, hashlib.sha256(text.encode()).hexdigest()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise KnowledgeEditError(f"cannot read {rel}: {exc}") from exc
        return text, hashlib.sha256(text.encode()).hexdigest()

    def validate(self, rel: str, text: str) -> list[str]:
        """What is wrong with ``text`` as the content of ``rel`` (empty list: nothing)."""
        if not text.strip():
            return ["the text is empty"]
        if len(text) > MAX_ARTICLE_CHARS:
            return [f"the text is {len(text):,} characters; at most {MAX_ARTICLE_CHARS:,}"]
        problems = Problems()
        chunks = parse_file(rel, text, self.settings.retrieval.chunk_chars, problems)
        return problems.messages + ([] if chunks else ["nothing in it would be indexed"])

    def save(self, rel: str, text: str, who: str | None = None, message: str = "",
             base_sha: str | None = None) -> int:
        """Validate, version and write ``rel``; returns the version number. Raises KnowledgeEditError, writing nothing."""
        path = self.path(rel)
        if problems := self.validate(rel, text):
            raise KnowledgeEditError("Not saved: " + "; ".join(problems))
        number = 0

        def change(current: str) -> str:
            nonlocal number
            if base_sha is not None and base_sha != hashlib.sha256(current.encode()).hexdigest():
                raise KnowledgeEditError(f"{rel} changed since you opened it; your text was not saved: reload and edit again")
            number = self._record(rel, current, text, who, message)
            return text

        self._change(rel, path, change, who)
        return number

    def add_faq(self, question: str, answer: str, category: str | None = None, who: str | None = None,
                message: str = "") -> str:
        """Append one FAQ entry to gaps-answers.jsonl; returns its chunk id."""
        question, answer, category = (question or "").strip(), (answer or "").strip(), (category or "").strip()
        if not question or not answer:
            raise KnowledgeEditError("Not saved: the question and the answer must both be filled in")
        if len(question) > MAX_QUESTION_CHARS or len(answer) > MAX_ANSWER_CHARS:
            raise KnowledgeEditError(f"Not saved: at most {MAX_QUESTION_CHARS} characters for the question and "
                           f"{MAX_ANSWER_CHARS:,} for the answer (got {len(question):,} and {len(answer):,})")
        entry = {"id": f"gap-{uuid.uuid4().hex[:10]}", "question": question, "answer": answer,
                 **({"category": category} if category else {}), "author": who,
                 "created": datetime.now().astimezone().isoformat(timespec="seconds")}

        def change(current: str) -> str:
            text = current + ("" if not current or current.endswith("\n") else "\n") + json.dumps(entry) + "\n"
            self._record(ANSWERS_FILE, current, text, who, message or "new answer")
            return text

        self._change(ANSWERS_FILE, self.path(ANSWERS_FILE), change, who)
        return f"{ANSWERS_FILE}#{entry['id']}"

    def _change(self, rel: str, path: Path, change: Callable[[str], str], who: str | None) -> None:
        """``change(current text) -> new text`` applied under the lock: to the database's document with several
        replicas (one transaction), else to the file. Versions are written by ``change``, before the text."""
        with self._lock, file_lock(self.versions_dir / ".lock"):
            if self.shared is None:
                text = change(self.read(rel)[0])
                try:
                    atomic_write(path, text)
                except OSError as exc:
                    raise KnowledgeEditError(f"cannot write {path}: {exc.strerror or exc} (the knowledge folder "
                                             f"must be writable)")
                return
            try:
                self.shared.edit(rel, change, who)
            except ERRORS as exc:
                raise KnowledgeEditError(f"Not saved: {exc} The other replicas would not get this edit: try again "
                                         f"when the database is back.") from exc

    def _folder(self, rel: str) -> Path:
        return self.versions_dir / rel.replace("/", "__")

    def history(self, rel: str) -> list[dict]:
        self.path(rel)
        folder = self._folder(rel)
        return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("v*.json"))] \
            if folder.is_dir() else []

    def _record(self, rel: str, current: str, text: str, who: str | None, message: str) -> int:
        """Keep the new version (and, at the first edit from here, what was there before); returns its number."""
        folder = self._folder(rel)
        versions = sorted(folder.glob("v*.json")) if folder.is_dir() else []
        if not versions and current:  # keep what was there before the first edit from here
            self._version(folder, 1, current, None, "before the first edit in the console")
            versions = [None]
        number = len(versions) + 1
        try:
            self._version(folder, number, text, who, message)
        except OSError as exc:
            raise KnowledgeEditError(f"cannot keep the version under {folder}: {exc.strerror or exc}") from exc
        return number

    @staticmethod
    def _version(folder: Path, number: int, text: str, who: str | None, message: str) -> None:
        atomic_write(folder / f"v{number:04d}.txt", text)
        atomic_write(folder / f"v{number:04d}.json", json.dumps({
            "version": number, "time": datetime.now().astimezone().isoformat(timespec="seconds"), "who": who,
            "message": str(message or "")[:500], "sha256": hashlib.sha256(text.encode()).hexdigest()}, indent=1))
