"""The PromptManager: templates (shipped files + saved versions), example banks, and the one renderer that turns
(question, history, retrieved hits) into chat messages -- for inference and for training examples alike.

Why: `render` and `training_example` share one code path, so training data can never drift from inference prompts.
"""
from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from langchain_core.example_selectors import (
    BaseExampleSelector,
    MaxMarginalRelevanceExampleSelector,
    SemanticSimilarityExampleSelector,
)
from langchain_core.prompts import ChatPromptTemplate, FewShotChatMessagePromptTemplate
from langchain_core.vectorstores import InMemoryVectorStore

from chatapp.config import Settings
from chatapp.example_banks import BankStore, BankStoreError, revision_of
from chatapp.prompts.examples import Bank, CachedEmbeddings, FixedExampleSelector, parse_bank
from chatapp.prompts.render import clip, compile_template, format_context, recent_history
from chatapp.prompts.template import (
    COMPUTED_VARIABLES,
    MODES,
    NAME_RE,
    ROLE_OF,
    Problem,
    PromptError,
    Rendered,
    Template,
    check_name,
    parse_template,
)
from chatapp.prompts.versions import Snapshot, VersionStore, iso

if TYPE_CHECKING:
    from chatapp.embeddings import Embedder

log = logging.getLogger(__name__)


class PromptManager:
    """Templates (shipped + saved versions), example banks, and rendering. Safe to share between sessions."""

    def __init__(self, settings: Settings, embedder: "Embedder | None" = None):
        self.settings = settings
        self.prompts_dir = Path(settings.prompts.prompts_dir)
        self.legacy_versions_dir = Path(settings.prompt_versions_dir)  # where versions were before the database
        self._version_store: VersionStore | None = None
        self._last_state = Snapshot(None, None, {})
        self._db_reported: str | None = None
        self.banks_dir = Path(settings.data_dir) / "prompt_banks"  # where banks were before the database (imported)
        self._bank_store: BankStore | None = None
        self._embedder: CachedEmbeddings | None = CachedEmbeddings(embedder) if embedder is not None else None
        self._embedder_tried = embedder is not None
        self._lock = threading.RLock()
        self._templates: dict[tuple[str, int], tuple[tuple, Template, ChatPromptTemplate, ChatPromptTemplate]] = {}
        self._banks: dict[str, Bank] = {}

    # ---- embedder (lazy, optional)

    @property
    def embedder(self) -> CachedEmbeddings | None:
        """The shared embedder if given; else the configured one, loaded on first need; None if unavailable
        (similarity/MMR then fall back to fixed selection, curated lookup to exact matches)."""
        with self._lock:
            if not self._embedder_tried:
                self._embedder_tried = True
                try:
                    from chatapp.embeddings import load_embedder

                    self._embedder = CachedEmbeddings(load_embedder(self.settings.retrieval.embedder))
                except Exception as exc:  # a missing embedder degrades selection; it must not stop the bot
                    log.warning("prompts: no embedder (%s); few-shot selection falls back to fixed", exc)
            return self._embedder

    # ---- templates: shipped files, saved versions (chatapp/prompts/versions.py), the active one

    @property
    def versions(self) -> VersionStore:
        """The saved versions in the database (opened on first use, which imports a legacy version folder once)."""
        with self._lock:
            if self._version_store is None:
                self._version_store = VersionStore(self.settings.database, self.settings.feedback.busy_timeout_s,
                                                   legacy_dir=self.legacy_versions_dir)
            return self._version_store

    def _state(self) -> Snapshot:
        """The active template and latest versions as every replica has them now (one small read per call). If the
        database cannot be read, the last state read is kept (before any: the shipped files), so answers go on."""
        try:
            state = self.versions.snapshot()
        except PromptError as exc:
            if self._db_reported != str(exc):  # once per distinct failure, not before every answer
                log.error("%s: rendering with the template versions read last", exc)
                self._db_reported = str(exc)
            return self._last_state
        self._last_state, self._db_reported = state, None
        return state

    def _shipped(self, name: str) -> Path:
        return self.prompts_dir / f"{check_name(name)}.yaml"

    def _latest(self, name: str, state: Snapshot) -> int:
        return state.latest.get(name) or (1 if self._shipped(name).is_file() else 0)

    def latest_version(self, name: str) -> int:
        """0 = no such template; 1 = the shipped file (until saved versions exist)."""
        return self._latest(check_name(name), self._state())

    def names(self) -> list[str]:
        state = self._state()
        found = {p.stem for p in self.prompts_dir.glob("*.yaml") if NAME_RE.fullmatch(p.stem)} | set(state.latest)
        return sorted(n for n in found if NAME_RE.fullmatch(n) and self._latest(n, state) > 0)

    def text(self, name: str, version: int | None = None) -> str:
        return self._text(check_name(name), version, self._state())

    def _text(self, name: str, version: int | None, state: Snapshot) -> str:
        latest = self._latest(name, state)
        if latest == 0:
            raise PromptError(f"no template named {name!r} (known: {', '.join(self.names()) or 'none'})")
        version = latest if version is None else int(version)
        if 1 <= version <= state.latest.get(name, 0):
            saved = self.versions.text(name, version)
            if saved is not None:
                return saved
        if version == 1 and self._shipped(name).is_file():
            return self._shipped(name).read_text(encoding="utf-8")
        raise PromptError(f"template {name!r} has no version {version} (latest is {latest})")

    def history(self, name: str) -> list[dict]:
        """Versions oldest first: {version, time, message, author, base_version}."""
        saved = self.versions.history(check_name(name))
        out = []
        if self._shipped(name).is_file() and not any(v.version == 1 for v in saved):
            mtime = self._shipped(name).stat().st_mtime
            out.append({"version": 1, "time": iso(mtime), "message": "shipped default", "author": "",
                        "base_version": None})
        for v in saved:
            out.append({"version": v.version, "time": iso(v.created_at), "message": v.message,
                        "author": v.author or "", "base_version": v.base_version})
        return out

    def diff(self, name: str, a: int, b: int) -> str:
        return "".join(difflib.unified_diff(
            self.text(name, a).splitlines(keepends=True), self.text(name, b).splitlines(keepends=True),
            fromfile=f"{name} v{a}", tofile=f"{name} v{b}",
        ))

    def validate(self, text: str, name: str | None = None) -> list[Problem]:
        return parse_template(text, name, self.bank_exists)[1]

    def save(self, name: str, text: str, message: str = "", base_version: int | None = None,
             author: str | None = None) -> int:
        """Store `text` as the next version; returns its number. Invalid text raises PromptError (nothing
        written); a stale `base_version` raises VersionConflict (nothing written); unchanged text saves nothing."""
        check_name(name)
        template, problems = parse_template(text, name, self.bank_exists)
        if template is None:
            raise PromptError(f"template {name!r} not saved: it has errors", [p for p in problems if p.severity == "error"])
        shipped = self._shipped(name)
        return self.versions.save(name, text, message, base_version, author,
                                  shipped=shipped.read_text(encoding="utf-8") if shipped.is_file() else None)

    def revert(self, name: str, version: int, message: str = "", author: str | None = None) -> int:
        """A new version whose text is `version`'s: history only grows, so a revert can itself be reverted."""
        return self.save(name, self.text(name, version), message or f"revert to version {version}", author=author)

    @property
    def active_name(self) -> str:
        """The template used when render() gets name=None: the last activated (persisted), else the configured."""
        return self._active(self._state())

    def _active(self, state: Snapshot) -> str:
        name = state.active
        if name and NAME_RE.fullmatch(name) and self._latest(name, state):
            return name
        return self.settings.prompts.template

    def activate(self, name: str, author: str | None = None) -> None:
        self.load(name)  # refuses unknown or broken templates
        self.versions.activate(name, author)
        self.settings.prompts.template = name

    def load(self, name: str | None = None, version: int | None = None) -> Template:
        return self._compiled(name, version)[0]

    def _compiled(self, name: str | None, version: int | None = None):
        if name is not None:
            check_name(name)  # before the database is opened: a bad name touches nothing
        state = self._state()
        name = check_name(self._active(state) if name is None else name)
        version = version or self._latest(name, state)
        text = self._text(name, version, state)
        key = (name, version)
        signature = (hashlib.sha1(text.encode()).hexdigest(),)
        with self._lock:
            cached = self._templates.get(key)
        if cached and cached[0] == signature:
            return cached[1:]
        template, problems = parse_template(text, name, self.bank_exists)
        if template is None:
            raise PromptError(f"template {name!r} version {version} cannot be used", problems)
        template.version = version
        chat, example = compile_template(template)
        with self._lock:
            self._templates[key] = (signature, template, chat, example)
        return template, chat, example

    # ---- example banks

    @property
    def bank_store(self) -> BankStore:
        """The run-time copies of the banks (opened on first use: templates load even if the database cannot)."""
        with self._lock:
            if self._bank_store is None:
                self._bank_store = BankStore(self.settings.database, self.settings.feedback.busy_timeout_s,
                                             legacy_dir=self.banks_dir)
            return self._bank_store

    def _shipped_bank(self, bank: str) -> Path:
        return self.prompts_dir / "examples" / f"{check_name(bank, 'bank')}.jsonl"

    def _shipped_text(self, bank: str) -> str:
        path = self._shipped_bank(bank)
        return path.read_text(encoding="utf-8") if path.is_file() else ""

    def bank_exists(self, bank: str) -> bool:
        if not NAME_RE.fullmatch(bank or ""):
            return False
        return self._shipped_bank(bank).is_file() or self.bank_store.revision(bank) is not None

    def bank_names(self) -> list[str]:
        found = {p.stem for p in (self.prompts_dir / "examples").glob("*.jsonl")} | set(self.bank_store.revisions())
        return sorted(n for n in found if NAME_RE.fullmatch(n))

    def bank_text(self, bank: str) -> tuple[str, str]:
        """The bank's JSONL and its revision (pass it back to save_bank to detect concurrent edits)."""
        runtime = self.bank_store.get(check_name(bank, "bank"))
        if runtime is not None:
            return runtime
        text = self._shipped_text(bank)
        return text, revision_of(text)

    def examples(self, bank: str) -> list[dict]:
        return list(self._bank(bank).examples)

    def _bank(self, bank: str) -> Bank:
        """The bank as every replica has it now: its run-time copy in the database if it has one (one small read
        per call; the text is read and parsed only when its revision changed), else the shipped file."""
        with self._lock:
            cached = self._banks.get(bank)
        try:
            revision = self.bank_store.revision(check_name(bank, "bank"))
        except BankStoreError as exc:  # the database is down: answer with what was read last, or the shipped file
            log.warning("prompts: %s", exc)
            if cached is not None:
                return cached
            revision = None
        if revision is not None:
            if cached and cached.signature == ("db", revision):
                return cached
            runtime = self.bank_store.get(bank)
            if runtime is not None:
                return self._parsed(bank, "database", ("db", runtime[1]), runtime[0])
        path = self._shipped_bank(bank)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise PromptError(f"unknown example bank {bank!r}") from None
        signature = (str(path), stat.st_mtime_ns, stat.st_size)
        if cached and cached.signature == signature:
            return cached
        return self._parsed(bank, str(path), signature, path.read_text(encoding="utf-8"))

    def _parsed(self, bank: str, origin: str, signature: tuple, text: str) -> Bank:
        examples, problems = parse_bank(text)
        for problem in problems:
            log.warning("prompts: bank %s: skipped %s", bank, problem)
        with self._lock:
            self._banks[bank] = Bank(bank, origin, signature, examples)
            return self._banks[bank]

    def _store(self, bank: Bank) -> InMemoryVectorStore | None:
        embedder = self.embedder
        if embedder is None:
            return None
        with self._lock:
            if bank.store is None:
                store = InMemoryVectorStore(embedder)
                if bank.examples:
                    store.add_texts([e["question"] for e in bank.examples], metadatas=bank.examples,
                                    ids=[e["id"] for e in bank.examples])
                bank.store = store
            return bank.store

    def save_bank(self, bank: str, text: str, base_revision: str | None = None) -> str:
        """Replace a bank's examples (the UI editor). Returns the new revision; bad lines raise PromptError."""
        check_name(bank, "bank")
        _, problems = parse_bank(text)
        if problems:
            raise PromptError(f"example bank {bank!r} not saved", problems)

        def change(current: str | None) -> str:
            current = self._shipped_text(bank) if current is None else current
            if base_revision is not None and base_revision != revision_of(current) and current != text:
                raise PromptError(f"example bank {bank!r} changed while you were editing (an example was added "
                                  "or someone saved); your text was not saved: reload and apply your edit again")
            return text if text.endswith("\n") or not text else text + "\n"

        try:
            return self.bank_store.update(bank, change)
        except BankStoreError as exc:
            raise PromptError(str(exc)) from None

    def add_example(self, question: str, answer: str, *, context: str = "", source: str = "feedback",
                    template: str | None = None, bank: str | None = None) -> str:
        """Append a human-approved example (a correction) to the template's bank (or `bank`); used from the next
        render, and looked up by find_curated. Returns the example id."""
        question, answer = (question or "").strip(), (answer or "").strip()
        if not question or not answer:
            raise PromptError("an example needs a non-empty question and answer")
        if bank is None:
            try:
                few_shot = self.load(template).few_shot
            except PromptError:  # unknown or broken template: the correction still goes somewhere useful
                few_shot = None
            bank = few_shot.bank if few_shot else self.settings.prompts.corrections_bank
        check_name(bank, "bank")
        example_id = f"{re.sub(r'[^A-Za-z0-9_-]', '', source)[:20] or 'ex'}-{uuid.uuid4().hex[:10]}"
        row = {"id": example_id, "question": question[:2000], "context": (context or "")[:2000],
               "answer": answer[:4000], "source": source, "curated": True, "time": iso(time.time())}
        def change(current: str | None) -> str:
            current = self._shipped_text(bank) if current is None else current
            if current and not current.endswith("\n"):
                current += "\n"
            return current + json.dumps(row, ensure_ascii=False) + "\n"

        try:
            self.bank_store.update(bank, change)
        except BankStoreError as exc:
            raise PromptError(f"the example was not saved: {exc}") from None
        self._bank(bank)  # reload now, so the very next render sees it
        return example_id

    def find_curated(self, question: str, threshold: float = 0.92) -> dict | None:
        """The closest human-approved answer to a near-identical question, or None. The returned example carries
        `score` (cosine similarity; 1.0 for an exact match when no embedder is available)."""
        question = (question or "").strip()
        if not question:
            return None
        try:
            runtime = sorted(b for b in self.bank_store.revisions() if NAME_RE.fullmatch(b))
        except BankStoreError as exc:  # the database is down: no curated answer, the model answers
            log.warning("prompts: %s", exc)
            return None
        curated = [e for b in runtime for e in self._bank(b).examples if e.get("curated")]
        if not curated:
            return None
        embedder = self.embedder
        if embedder is None:
            wanted = _normalise(question)
            match = next((e for e in reversed(curated) if _normalise(e["question"]) == wanted), None)
            return {**match, "score": 1.0} if match else None
        matrix = np.asarray(embedder.embed_documents([e["question"] for e in curated]), dtype=np.float32)
        query = np.asarray(embedder.embed_query(question), dtype=np.float32)
        scores = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query) + 1e-12)
        best = int(np.argmax(scores[::-1]))  # newest wins ties: a later correction supersedes an earlier one
        best = len(curated) - 1 - best
        return {**curated[best], "score": float(scores[best])} if scores[best] >= threshold else None

    # ---- rendering

    def select_examples(self, template: Template, question: str, mode: str) -> tuple[str, list[dict]]:
        """Resolve the mode and pick examples. auto: few-shot when an example is similar enough to the question
        (irrelevant examples only cost a small model context and confuse it); fixed selection counts as similar."""
        few = template.few_shot
        if mode not in MODES:
            raise PromptError(f"unknown prompt mode {mode!r} (use one of {', '.join(MODES)})")
        if mode == "auto":
            mode = template.mode
        if few is None or few.k == 0 or mode == "zero_shot":
            return "zero_shot", []
        bank = self._bank(few.bank)
        if not bank.examples:
            return "zero_shot", []
        store = self._store(bank) if few.selection != "fixed" else None
        if store is None:
            if mode == "auto" and few.selection != "fixed":
                return "zero_shot", []  # no embedder: relevance unknown, so stay zero-shot
            return "few_shot", FixedExampleSelector(bank.examples, few.k).select_examples({"question": question})
        if mode == "auto":
            top = store.similarity_search_with_score(question, k=1)
            if not top or top[0][1] < few.min_similarity:
                return "zero_shot", []
        if few.selection == "mmr":
            selector: BaseExampleSelector = MaxMarginalRelevanceExampleSelector(
                vectorstore=store, k=few.k, fetch_k=max(few.fetch_k, few.k), input_keys=["question"])
        else:
            selector = SemanticSimilarityExampleSelector(vectorstore=store, k=few.k, input_keys=["question"])
        return "few_shot", selector.select_examples({"question": question})

    def render(self, name: str | None, *, question: str, history: list[dict], hits: list, mode: str = "auto",
               variables: dict | None = None) -> Rendered:
        """Chat messages for the model: system, few-shot pairs, recent history, then context + question.
        mode "auto" defers to the template's own mode (which may itself be auto); the other two force it."""
        return self._render(*self._compiled(name), question=question, history=history, hits=hits, mode=mode,
                            variables=variables)

    def preview(self, text: str, *, question: str, history: list[dict], hits: list, mode: str = "auto",
                variables: dict | None = None, name: str | None = None) -> Rendered:
        """Render unsaved template text (the editor's live preview); raises PromptError listing its problems."""
        template, problems = parse_template(text, name, self.bank_exists)
        if template is None:
            raise PromptError("the template has errors", [p for p in problems if p.severity == "error"])
        template.name = template.name or name or "(unsaved)"
        return self._render(template, *compile_template(template), question=question, history=history, hits=hits,
                            mode=mode, variables=variables)

    def _render(self, template: Template, chat: ChatPromptTemplate, example_prompt: ChatPromptTemplate, *,
                question: str, history: list[dict], hits: list, mode: str, variables: dict | None) -> Rendered:
        common = {"bot_name": self.settings.ui.bot_name, "company": self.settings.ui.company,
                  "date": dt.date.today().isoformat(), **template.variables}
        for key, value in (variables or {}).items():
            if key not in COMPUTED_VARIABLES and isinstance(key, str):
                common[key] = str(value)
        question = str(question or "")
        used_mode, chosen = self.select_examples(template, question, mode)
        history_messages = recent_history(template, history)
        values = {**common, "question": question, "context": format_context(template, hits),
                  "history": "\n".join(f"{'Customer' if m['role'] == 'user' else 'Agent'}: {m['content']}"
                                       for m in history_messages)}
        example_messages = []
        if chosen:
            prepared = [{**common, "history": "", "question": e["question"], "answer": e["answer"],
                         "context": clip(e.get("context") or "", template.few_shot.context_chars)
                         or template.context_empty} for e in chosen]
            example_messages = FewShotChatMessagePromptTemplate(
                examples=prepared, example_prompt=example_prompt).format_messages()
        messages = chat.format_messages(
            examples=example_messages, history_messages=[] if template.history_inline else history_messages,
            **{k: v for k, v in values.items() if k in chat.input_variables},
        )
        return Rendered(
            messages=[{"role": ROLE_OF.get(m.type, m.type), "content": m.content.strip()} for m in messages],
            template=template.name or self.active_name, version=template.version, mode=used_mode,
            examples=[{k: v for k, v in e.items()} for e in chosen], generation=dict(template.generation),
            answer_start=template.answer_start,
        )

    def training_example(self, name: str | None, *, question: str, history: list[dict], hits: list, answer: str,
                         mode: str = "zero_shot") -> dict:
        """The inference prompt plus the wanted answer, in TRL's conversational SFT format (beginning with the
        template's `answer_start`, as answers do at inference)."""
        rendered = self.render(name, question=question, history=history, hits=hits, mode=mode)
        start = rendered.answer_start
        if start and not answer.startswith(start):
            answer = start + answer
        return {"messages": rendered.messages + [{"role": "assistant", "content": answer}]}


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())
