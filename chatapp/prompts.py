"""Prompt templates: YAML files under prompts/, their saved versions, few-shot example banks, and the one renderer
that turns (question, history, retrieved hits) into chat messages -- for inference and for training examples alike.

Why it is shaped like this:
- Templates are data, never code. They are rendered by langchain-core with plain f-string substitution (which
  already refuses `{x.attr}` and `{x[0]}`); the validator here also refuses conversions and format specs, so a
  template can neither reach Python objects nor ask for a gigabyte of padding.
- Shipped templates in prompts/ are read-only at run time. An edit becomes a numbered version under
  `settings.prompt_versions_dir`, written atomically under a file lock, with a conflict reported when the editor's
  base version is stale. Runtime state therefore never touches tracked files, and nothing is ever overwritten.
- Example banks are JSONL (one example a line, easy to append to). Run-time additions (corrections) go into a copy
  in the app's database (chatapp/example_banks.py) and are picked up by the selectors on the next render, on every
  replica.
- `render` and `training_example` share one code path, so training data can never drift from inference prompts.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import difflib
import fcntl
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import yaml
from langchain_core.embeddings import Embeddings
from langchain_core.example_selectors import (
    BaseExampleSelector,
    MaxMarginalRelevanceExampleSelector,
    SemanticSimilarityExampleSelector,
)
from langchain_core.prompts import ChatPromptTemplate, FewShotChatMessagePromptTemplate, MessagesPlaceholder
from langchain_core.vectorstores import InMemoryVectorStore

from chatapp.config import Settings
from chatapp.example_banks import BankStore, BankStoreError, revision_of

if TYPE_CHECKING:
    from chatapp.embeddings import Embedder

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # template and bank names: no dots, no slashes
IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MODES = ("zero_shot", "few_shot", "auto")
SELECTIONS = ("fixed", "similarity", "mmr")
COMPUTED_VARIABLES = ("question", "context", "history")  # filled by the renderer, never by the template
BUILTIN_VARIABLES = (*COMPUTED_VARIABLES, "bot_name", "company", "date")
CONTEXT_ITEM_VARIABLES = ("n", "title", "text", "source", "entity", "score")
GENERATION_LIMITS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "max_new_tokens": (1, 4096),
                     "repetition_penalty": (0.5, 2.0)}
TOP_LEVEL_FIELDS = ("name", "description", "mode", "system", "user", "answer_start", "variables", "context", "history",
                    "few_shot", "generation")
ROLE_OF = {"system": "system", "human": "user", "ai": "assistant"}


# --------------------------------------------------------------------------------------------------------------------
# Public types


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a template, with where it is (1-based) so an editor can point at it."""

    line: int
    column: int
    message: str
    severity: str = "error"  # "error" blocks saving; "warning" is shown but allowed

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.severity}: {self.message}"


class PromptError(ValueError):
    """A template, bank or name is unusable; `problems` says where, when known."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        self.problems = problems or []
        if self.problems:
            message += "\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


class VersionConflict(PromptError):
    """Someone saved a newer version since the editor loaded `base_version`; nothing was written."""

    def __init__(self, name: str, base_version: int, latest: int):
        self.name, self.base_version, self.latest = name, base_version, latest
        super().__init__(
            f"template {name!r} changed while you were editing: you started from version {base_version}, "
            f"the latest is version {latest}. Your text was not saved; reload, merge and save again."
        )


@dataclass
class Rendered:
    messages: list[dict]  # chat messages (system/user/assistant) ready for the model's chat template
    template: str
    version: int
    mode: str  # the mode actually used ("zero_shot" | "few_shot")
    examples: list[dict]  # few-shot examples chosen
    generation: dict  # the template's generation overrides (temperature, max_new_tokens...), possibly empty
    answer_start: str = ""  # the words the answer begins with (the model continues them), "" = none


@dataclass
class FewShot:
    bank: str
    k: int = 2
    selection: str = "similarity"
    fetch_k: int = 8  # MMR candidates
    min_similarity: float = 0.45  # auto mode picks few-shot only when an example is at least this similar
    context_chars: int = 300  # an example's context is cut to this many characters
    example_user: str | None = None  # how an example's user turn is written; None = the template's `user`


@dataclass
class Template:
    name: str
    system: str
    user: str
    description: str = ""
    mode: str = "auto"
    variables: dict[str, str] = field(default_factory=dict)
    context_item: str = "- {title}: {text}"
    context_max_chars: int = 1200
    context_empty: str = "(no matching information found)"
    history_turns: int = 4  # messages (user and assistant each count one)
    history_max_chars: int = 600
    few_shot: FewShot | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    # Words the answer starts with, given to the model as the start of its own turn. A small model answering a
    # Chinese question from English evidence otherwise copies the English; starting its turn in Chinese keeps it there.
    answer_start: str = ""
    version: int = 0
    text: str = ""

    @property
    def history_inline(self) -> bool:
        """A template that writes {history} itself gets no separate history messages (no duplication)."""
        return any(name == "history" for text in (self.system, self.user) for name, _ in _scan(text)[0])


# --------------------------------------------------------------------------------------------------------------------
# Validation: the template text -> (Template | None, problems with positions)


def _scan(text: str) -> tuple[list[tuple[str, int]], list[tuple[int, str]]]:
    """Placeholders `{name}` with their offsets, and syntax errors with theirs. Stricter than str.format: only
    plain identifiers are accepted, and `{{`/`}}` are the only way to write a literal brace."""
    fields: list[tuple[str, int]] = []
    errors: list[tuple[int, str]] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "{":
            if text.startswith("{{", i):
                i += 2
                continue
            close, reopen = text.find("}", i + 1), text.find("{", i + 1)
            if close == -1:
                errors.append((i, "unclosed '{' (write '{{' for a literal brace)"))
                break
            if reopen != -1 and reopen < close:
                errors.append((i, "'{' inside a placeholder (write '{{' for a literal brace)"))
                i = reopen
                continue
            inner = text[i + 1 : close]
            if IDENT_RE.fullmatch(inner):
                fields.append((inner, i))
            elif not inner.strip():
                errors.append((i, "empty placeholder '{}': name the variable, e.g. {question}"))
            else:
                errors.append((i, f"'{{{inner}}}' is not allowed: only plain {{name}} placeholders (no attribute "
                                  "access, indexing, conversions or format specs)"))
            i = close + 1
        elif char == "}":
            if text.startswith("}}", i):
                i += 2
                continue
            errors.append((i, "single '}' (write '}}' for a literal brace)"))
            i += 1
        else:
            i += 1
    return fields, errors


class _Locator:
    """Maps an offset inside a YAML scalar back to a line/column in the file."""

    def __init__(self, source: str):
        self.lines = source.splitlines()

    def position(self, node: yaml.Node | None, offset: int = 0, value: str = "") -> tuple[int, int]:
        if node is None:
            return 1, 1
        line, col = node.start_mark.line, node.start_mark.column
        before = value[:offset]
        row, col_in_row = before.count("\n"), len(before) - (before.rfind("\n") + 1)
        style = getattr(node, "style", None)
        if style in ("|", ">"):  # block scalar: content starts on the next line, at the block's indentation
            first = line + 1
            while first < len(self.lines) and not self.lines[first].strip():
                first += 1
            indent = len(self.lines[first]) - len(self.lines[first].lstrip(" ")) if first < len(self.lines) else 0
            if style == "|":
                return line + 2 + row, indent + col_in_row + 1
            return first + 1, indent + 1
        if row == 0:  # plain or quoted, on the first line of the value
            return line + 1, col + (1 if style in ("'", '"') else 0) + col_in_row + 1
        return line + 1 + row, col_in_row + 1  # multi-line flow scalar: best effort


def _mapping(node: yaml.Node | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}


def parse_template(
    text: str, name: str | None = None, bank_exists=lambda bank: True
) -> tuple[Template | None, list[Problem]]:
    """Check a template's text; return it parsed when it has no errors (warnings allowed), and every problem."""
    problems: list[Problem] = []

    def add(node: yaml.Node | None, message: str, offset: int = 0, value: str = "", severity: str = "error"):
        line, col = locate.position(node, offset, value)
        problems.append(Problem(line, col, message, severity))

    locate = _Locator(text)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        what = " ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return None, [Problem(line, col, f"YAML syntax error: {what or exc}")]
    if not isinstance(data, dict):
        return None, [Problem(1, 1, "a template is a YAML mapping with at least `system:` and `user:`")]
    nodes = _mapping(root)

    def node_of(*path: str) -> yaml.Node | None:
        current: dict = nodes
        found = None
        for part in path:
            if part not in current:
                return found
            key, found = current[part]
            current = _mapping(found)
        return found

    for key in data:
        if key not in TOP_LEVEL_FIELDS:
            add(nodes[key][0] if key in nodes else None,
                f"unknown field {key!r} (known: {', '.join(TOP_LEVEL_FIELDS)})")

    def section(key: str) -> dict:
        value = data.get(key) or {}
        if not isinstance(value, dict):
            add(node_of(key), f"`{key}` must be a mapping")
            return {}
        return value

    def text_field(container: dict, path: tuple[str, ...], required: bool) -> str:
        value = container.get(path[-1])
        if value is None:
            if required:
                add(node_of(*path[:-1]) if len(path) > 1 else None, f"missing required field `{'.'.join(path)}`")
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            add(node_of(*path), f"`{'.'.join(path)}` must be a non-empty text")
            return ""
        return value

    def number(container: dict, path: tuple[str, ...], default, low, high, kind=int):
        value = container.get(path[-1], default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            add(node_of(*path), f"`{'.'.join(path)}` must be {'an integer' if kind is int else 'a number'}")
            return default
        if not low <= value <= high:
            add(node_of(*path), f"`{'.'.join(path)}` must be between {low} and {high}, not {value}")
            return default
        return kind(value)

    # name, description, mode
    file_name = data.get("name")
    if file_name is not None and (not isinstance(file_name, str) or not NAME_RE.fullmatch(file_name)):
        add(node_of("name"), "`name` must be letters, digits, '_' or '-' (at most 64, no dots or slashes)")
    elif name is not None and file_name is not None and file_name != name:
        add(node_of("name"), f"`name` says {file_name!r} but the template is being saved as {name!r}")
    mode = data.get("mode", "auto")
    if mode not in MODES:
        add(node_of("mode"), f"`mode` must be one of {', '.join(MODES)}, not {mode!r}")
        mode = "auto"

    # custom variables
    variables: dict[str, str] = {}
    for key, value in section("variables").items():
        if not isinstance(key, str) or not IDENT_RE.fullmatch(key):
            add(node_of("variables"), f"variable name {key!r} must be an identifier")
        elif key in COMPUTED_VARIABLES:
            add(node_of("variables", key), f"`{key}` is filled in by the renderer and cannot be set here")
        elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
            add(node_of("variables", key), f"variable `{key}` must be a text or a number")
        else:
            variables[key] = str(value)
    known = set(BUILTIN_VARIABLES) | set(variables)

    def check_placeholders(value: str, path: tuple[str, ...], allowed: set[str]) -> set[str]:
        node = node_of(*path)
        fields, errors = _scan(value)
        for offset, message in errors:
            add(node, message, offset, value)
        for var, offset in fields:
            if var not in allowed:
                add(node, f"unknown variable {{{var}}} (known: {', '.join(sorted(allowed))})", offset, value)
        return {var for var, _ in fields}

    system = text_field(data, ("system",), True)
    user = text_field(data, ("user",), True)
    used = check_placeholders(system, ("system",), known) | (user_vars := check_placeholders(user, ("user",), known))
    if user and "question" not in user_vars:
        add(node_of("user"), "missing variable {question}: the customer's message would never reach the model")
    answer_start = text_field(data, ("answer_start",), False).strip()
    check_placeholders(answer_start, ("answer_start",), set())
    if len(answer_start) > 200:
        add(node_of("answer_start"), "`answer_start` is the first few words of the answer: at most 200 characters")
    if system and user and "context" not in used:
        add(node_of("user"), "missing variable {context}: retrieved knowledge would not be shown",
            severity="warning")

    context = section("context")
    for key in context:
        if key not in ("item", "max_chars", "empty"):
            add(node_of("context", key), f"unknown field `context.{key}` (known: item, max_chars, empty)")
    context_item = text_field(context, ("context", "item"), False) or Template.context_item
    check_placeholders(context_item, ("context", "item"), set(CONTEXT_ITEM_VARIABLES))
    context_empty = text_field(context, ("context", "empty"), False) or Template.context_empty
    check_placeholders(context_empty, ("context", "empty"), set())
    context_max = number(context, ("context", "max_chars"), Template.context_max_chars, 0, 20_000)

    history = section("history")
    for key in history:
        if key not in ("turns", "max_chars"):
            add(node_of("history", key), f"unknown field `history.{key}` (known: turns, max_chars)")
    history_turns = number(history, ("history", "turns"), Template.history_turns, 0, 50)
    history_max = number(history, ("history", "max_chars"), Template.history_max_chars, 0, 20_000)

    few_shot = None
    fs = section("few_shot")
    if fs:
        allowed_fs = {f.name for f in dataclasses.fields(FewShot)}
        for key in fs:
            if key not in allowed_fs:
                add(node_of("few_shot", key), f"unknown field `few_shot.{key}` (known: {', '.join(sorted(allowed_fs))})")
        bank = fs.get("bank")
        if not isinstance(bank, str) or not NAME_RE.fullmatch(bank):
            add(node_of("few_shot", "bank") or node_of("few_shot"),
                "`few_shot.bank` must name an example bank (letters, digits, '_' or '-', no path)")
        elif not bank_exists(bank):
            add(node_of("few_shot", "bank"), f"unknown example bank {bank!r} (no prompts/examples/{bank}.jsonl)")
        selection = fs.get("selection", "similarity")
        if selection not in SELECTIONS:
            add(node_of("few_shot", "selection"), f"`few_shot.selection` must be one of {', '.join(SELECTIONS)}")
            selection = "fixed"
        example_user = text_field(fs, ("few_shot", "example_user"), False) or None
        if example_user:
            ex_vars = check_placeholders(example_user, ("few_shot", "example_user"), known - {"history"})
            if "question" not in ex_vars:
                add(node_of("few_shot", "example_user"), "missing variable {question} in `few_shot.example_user`")
        few_shot = FewShot(
            bank=bank if isinstance(bank, str) else "",
            k=number(fs, ("few_shot", "k"), 2, 0, 8),
            selection=selection,
            fetch_k=number(fs, ("few_shot", "fetch_k"), 8, 1, 100),
            min_similarity=number(fs, ("few_shot", "min_similarity"), 0.45, -1.0, 1.0, float),
            context_chars=number(fs, ("few_shot", "context_chars"), 300, 0, 5000),
            example_user=example_user,
        )
    elif mode == "few_shot":
        add(node_of("mode"), "`mode: few_shot` needs a `few_shot:` section with an example bank")

    generation: dict[str, Any] = {}
    for key, value in section("generation").items():
        if key not in GENERATION_LIMITS:
            add(node_of("generation", key),
                f"unknown generation setting {key!r} (known: {', '.join(GENERATION_LIMITS)})")
            continue
        low, high = GENERATION_LIMITS[key]
        generation[key] = number({key: value}, ("generation", key), None, low, high,
                                 int if key == "max_new_tokens" else float)
    generation = {k: v for k, v in generation.items() if v is not None}

    if not any(p.severity == "error" for p in problems):  # the library's own check, as a last line of defence
        try:
            ChatPromptTemplate.from_messages([("system", system), ("human", user)], template_format="f-string")
        except (ValueError, KeyError) as exc:
            add(None, f"template rejected: {exc}")

    problems.sort(key=lambda p: (p.line, p.column))
    if any(p.severity == "error" for p in problems):
        return None, problems
    template = Template(
        name=file_name or name or "", system=system, user=user, description=str(data.get("description") or ""),
        mode=mode, variables=variables, context_item=context_item, context_max_chars=context_max,
        context_empty=context_empty, history_turns=history_turns, history_max_chars=history_max,
        few_shot=few_shot, generation=generation, answer_start=answer_start, text=text,
    )
    return template, problems


# --------------------------------------------------------------------------------------------------------------------
# Files: atomic writes and a lock that holds across threads and processes


def atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """flock on a fresh open file: excludes other threads (separate open file descriptions) and processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_name(name: str, what: str = "template") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PromptError(f"invalid {what} name {name!r}: use letters, digits, '_' or '-' (at most 64 characters, "
                          "starting with a letter or digit)")
    return name


# --------------------------------------------------------------------------------------------------------------------
# Embeddings and example selection


class CachedEmbeddings(Embeddings):
    """Wraps an embedder so bank reloads re-embed only new examples and one render embeds its question once."""

    def __init__(self, inner: Embeddings, max_queries: int = 512):
        self.inner = inner
        self._documents: dict[str, list[float]] = {}
        self._queries: OrderedDict[str, list[float]] = OrderedDict()
        self._max_queries = max_queries
        self._lock = threading.Lock()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._documents]
        if missing:
            vectors = self.inner.embed_documents(missing)
            with self._lock:
                self._documents.update(zip(missing, (list(map(float, v)) for v in vectors)))
        with self._lock:
            return [self._documents[t] for t in texts]

    def embed_query(self, text: str) -> list[float]:
        with self._lock:
            if text in self._queries:
                self._queries.move_to_end(text)
                return self._queries[text]
        vector = list(map(float, self.inner.embed_query(text)))
        with self._lock:
            self._queries[text] = vector
            while len(self._queries) > self._max_queries:
                self._queries.popitem(last=False)
        return vector


class FixedExampleSelector(BaseExampleSelector):
    """The first k examples of the bank, always: predictable demonstrations of tone and format."""

    def __init__(self, examples: list[dict], k: int):
        self.examples, self.k = examples, k

    def add_example(self, example: dict[str, str]) -> Any:
        self.examples.append(example)

    def select_examples(self, input_variables: dict[str, str]) -> list[dict]:
        return self.examples[: self.k]


@dataclass
class _Bank:
    name: str
    origin: str  # "database" or the shipped file
    signature: tuple
    examples: list[dict]
    store: InMemoryVectorStore | None = None


def parse_bank(text: str) -> tuple[list[dict], list[Problem]]:
    """JSONL, one example per line: question and answer required; context, id, source optional."""
    examples, problems, ids = [], [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(number, exc.colno, f"not valid JSON: {exc.msg}"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(number, 1, "each line must be a JSON object"))
            continue
        bad = [k for k in ("question", "answer") if not isinstance(row.get(k), str) or not row[k].strip()]
        if bad:
            problems.append(Problem(number, 1, f"missing or empty {' and '.join(bad)}"))
            continue
        if not isinstance(row.get("context", ""), str):
            problems.append(Problem(number, 1, "`context` must be a text"))
            continue
        row.setdefault("context", "")
        row["id"] = str(row.get("id") or f"line-{number}")
        if row["id"] in ids:
            problems.append(Problem(number, 1, f"duplicate id {row['id']!r}"))
            continue
        ids.add(row["id"])
        examples.append(row)
    return examples, problems


def _clip(text: str, limit: int) -> str:
    """Cut at a word boundary so a tiny model never sees half a word; '…' shows something was cut."""
    text = " ".join(text.split()) if "\n" not in text else text.strip()
    if len(text) <= limit:
        return text
    if limit <= 1:
        return ""
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip() + "…"


# --------------------------------------------------------------------------------------------------------------------
# The manager


class PromptManager:
    """Templates (shipped + saved versions), example banks, and rendering. Safe to share between sessions."""

    def __init__(self, settings: Settings, embedder: "Embedder | None" = None):
        self.settings = settings
        self.prompts_dir = Path(settings.prompts.prompts_dir)
        self.versions_dir = Path(settings.prompt_versions_dir)
        self.banks_dir = Path(settings.data_dir) / "prompt_banks"  # where banks were before the database (imported)
        self._bank_store: BankStore | None = None
        self._embedder: CachedEmbeddings | None = CachedEmbeddings(embedder) if embedder is not None else None
        self._embedder_tried = embedder is not None
        self._lock = threading.RLock()
        self._templates: dict[tuple[str, int], tuple[tuple, Template, ChatPromptTemplate, ChatPromptTemplate]] = {}
        self._banks: dict[str, _Bank] = {}

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

    # ---- templates: names, files, versions

    def _shipped(self, name: str) -> Path:
        return self.prompts_dir / f"{check_name(name)}.yaml"

    def _dir(self, name: str) -> Path:
        return self.versions_dir / check_name(name)

    def _saved_versions(self, name: str) -> list[int]:
        folder = self._dir(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.stem[1:]) for p in folder.glob("v[0-9][0-9][0-9][0-9]*.yaml") if p.stem[1:].isdigit())

    def latest_version(self, name: str) -> int:
        """0 = no such template; 1 = the shipped file (until saved versions exist)."""
        saved = self._saved_versions(name)
        if saved:
            return saved[-1]
        return 1 if self._shipped(name).is_file() else 0

    def names(self) -> list[str]:
        found = {p.stem for p in self.prompts_dir.glob("*.yaml") if NAME_RE.fullmatch(p.stem)}
        if self.versions_dir.is_dir():
            found |= {p.name for p in self.versions_dir.iterdir() if NAME_RE.fullmatch(p.name) and p.is_dir()}
        return sorted(n for n in found if self.latest_version(n) > 0)

    def text(self, name: str, version: int | None = None) -> str:
        latest = self.latest_version(name)
        if latest == 0:
            raise PromptError(f"no template named {name!r} (known: {', '.join(self.names()) or 'none'})")
        version = latest if version is None else int(version)
        saved = self._dir(name) / f"v{version:04d}.yaml"
        if saved.is_file():
            return saved.read_text(encoding="utf-8")
        if version == 1 and self._shipped(name).is_file():
            return self._shipped(name).read_text(encoding="utf-8")
        raise PromptError(f"template {name!r} has no version {version} (latest is {latest})")

    def history(self, name: str) -> list[dict]:
        """Versions oldest first: {version, time, message}."""
        out = []
        if self._shipped(name).is_file() and 1 not in self._saved_versions(name):
            mtime = self._shipped(name).stat().st_mtime
            out.append({"version": 1, "time": _iso(mtime), "message": "shipped default"})
        for version in self._saved_versions(name):
            meta_path = self._dir(name) / f"v{version:04d}.json"
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            out.append({"version": version, "time": meta.get("time", ""), "message": meta.get("message", "")})
        return out

    def diff(self, name: str, a: int, b: int) -> str:
        return "".join(difflib.unified_diff(
            self.text(name, a).splitlines(keepends=True), self.text(name, b).splitlines(keepends=True),
            fromfile=f"{name} v{a}", tofile=f"{name} v{b}",
        ))

    def validate(self, text: str, name: str | None = None) -> list[Problem]:
        return parse_template(text, name, self.bank_exists)[1]

    def save(self, name: str, text: str, message: str = "", base_version: int | None = None) -> int:
        """Store `text` as the next version; returns its number. Invalid text raises PromptError (nothing
        written); a stale `base_version` raises VersionConflict (nothing written); unchanged text saves nothing."""
        check_name(name)
        template, problems = parse_template(text, name, self.bank_exists)
        if template is None:
            raise PromptError(f"template {name!r} not saved: it has errors", [p for p in problems if p.severity == "error"])
        folder = self._dir(name)
        with self._lock, file_lock(self.versions_dir / f".{name}.lock"):
            latest = self.latest_version(name)
            if base_version is not None and int(base_version) != latest:
                raise VersionConflict(name, int(base_version), latest)
            if latest and self.text(name, latest) == text:
                return latest
            if latest == 1 and not self._saved_versions(name):  # freeze the shipped text as version 1
                self._write_version(folder, 1, self._shipped(name).read_text(encoding="utf-8"), "shipped default")
            version = latest + 1
            self._write_version(folder, version, text, message, base_version)
        return version

    def _write_version(self, folder: Path, version: int, text: str, message: str, base: int | None = None) -> None:
        meta = {"version": version, "time": _iso(time.time()), "message": str(message or "")[:500],
                "base_version": base, "sha256": hashlib.sha256(text.encode()).hexdigest()}
        atomic_write(folder / f"v{version:04d}.json", json.dumps(meta, indent=1))
        atomic_write(folder / f"v{version:04d}.yaml", text)  # last: a version exists once its text does

    def revert(self, name: str, version: int, message: str = "") -> int:
        """A new version whose text is `version`'s: history only grows, so a revert can itself be reverted."""
        return self.save(name, self.text(name, version), message or f"revert to version {version}")

    @property
    def active_name(self) -> str:
        """The template used when render() gets name=None: the last activated (persisted), else the configured."""
        path = self.versions_dir / "active.json"
        try:
            name = json.loads(path.read_text())["name"]
            if NAME_RE.fullmatch(name) and self.latest_version(name):
                return name
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return self.settings.prompts.template

    def activate(self, name: str) -> None:
        self.load(name)  # refuses unknown or broken templates
        atomic_write(self.versions_dir / "active.json", json.dumps({"name": name, "time": _iso(time.time())}))
        self.settings.prompts.template = name

    def load(self, name: str | None = None, version: int | None = None) -> Template:
        return self._compiled(name, version)[0]

    def _compiled(self, name: str | None, version: int | None = None):
        name = check_name(self.active_name if name is None else name)
        version = version or self.latest_version(name)
        text = self.text(name, version)
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
        chat, example = _compile(template)
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

    def _bank(self, bank: str) -> _Bank:
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

    def _parsed(self, bank: str, origin: str, signature: tuple, text: str) -> _Bank:
        examples, problems = parse_bank(text)
        for problem in problems:
            log.warning("prompts: bank %s: skipped %s", bank, problem)
        with self._lock:
            self._banks[bank] = _Bank(bank, origin, signature, examples)
            return self._banks[bank]

    def _store(self, bank: _Bank) -> InMemoryVectorStore | None:
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
               "answer": answer[:4000], "source": source, "curated": True, "time": _iso(time.time())}
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
        return self._render(template, *_compile(template), question=question, history=history, hits=hits,
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
        history_messages = self._history(template, history)
        values = {**common, "question": question, "context": self.format_context(template, hits),
                  "history": "\n".join(f"{'Customer' if m['role'] == 'user' else 'Agent'}: {m['content']}"
                                       for m in history_messages)}
        example_messages = []
        if chosen:
            prepared = [{**common, "history": "", "question": e["question"], "answer": e["answer"],
                         "context": _clip(e.get("context") or "", template.few_shot.context_chars)
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

    @staticmethod
    def format_context(template: Template, hits: list) -> str:
        """Retrieved hits as short items, within the template's character budget (the default model's context
        is small; the first hits are the best, so they get the room)."""
        budget, items, seen = template.context_max_chars, [], set()
        for hit in hits or []:
            key = getattr(hit, "chunk_id", None) or id(hit)
            if key in seen:  # the same passage twice would only spend the small context budget
                continue
            seen.add(key)
            n = len(items) + 1
            text = str(getattr(hit, "text", "") or "")
            answer = str(getattr(hit, "answer", "") or "")
            if answer and answer not in text:
                text = f"{text} {answer}".strip()
            entity = str(getattr(hit, "entity", "") or "")
            entity = entity.title() if entity.isupper() else entity  # DSTC-style "ALLENBELL" -> "Allenbell"
            title = str(getattr(hit, "title", "") or "")
            if answer or getattr(hit, "kind", "") == "faq" or title.strip() == text.strip():
                title = entity or "FAQ"  # an FAQ's title is its question, already in `text`
            title = title or entity or str(getattr(hit, "source", "") or "")
            fields = {"n": n, "title": title, "text": "", "source": str(getattr(hit, "source", "") or ""),
                      "entity": entity, "score": f"{float(getattr(hit, 'score', 0.0) or 0.0):.2f}"}
            frame = len(template.context_item.format(**fields)) + 1
            room = budget - frame - sum(len(i) + 1 for i in items)
            if room < 40:
                break
            items.append(template.context_item.format(**{**fields, "text": _clip(text, room)}))
        return "\n".join(items) or template.context_empty

    @staticmethod
    def _history(template: Template, history: list[dict]) -> list[dict]:
        """The last turns that fit the budget, newest kept first; roles other than user/assistant dropped."""
        kept, budget = [], template.history_max_chars
        for message in reversed([m for m in history or [] if isinstance(m, dict)][-template.history_turns:]
                                if template.history_turns else []):
            role, content = message.get("role"), str(message.get("content") or "")
            if role not in ("user", "assistant") or not content.strip():
                continue
            content = _clip(content, max(budget, 0))
            if not content:
                break
            kept.append({"role": role, "content": content})
            budget -= len(content)
        return kept[::-1]


def _compile(template: Template) -> tuple[ChatPromptTemplate, ChatPromptTemplate]:
    """The langchain-core prompts for a template: the whole chat, and one few-shot example (user -> answer)."""
    chat = ChatPromptTemplate.from_messages(
        [("system", template.system), MessagesPlaceholder("examples", optional=True),
         MessagesPlaceholder("history_messages", optional=True), ("human", template.user)],
        template_format="f-string",
    )
    example_user = template.few_shot.example_user if template.few_shot else None
    example = ChatPromptTemplate.from_messages(
        [("human", example_user or template.user), ("ai", "{answer}")], template_format="f-string"
    )
    return chat, example


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


# --------------------------------------------------------------------------------------------------------------------
# CLI: chatapp prompts list|show|validate|render|history|diff|save|revert|activate


def add_arguments(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `prompts` and its subcommands; each sets `func(settings, args) -> int` (chatapp.cli dispatches)."""
    parser = subparsers.add_parser("prompts", help="list, show, validate, render and version prompt templates")
    sub = parser.add_subparsers(dest="prompts_command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="template names, versions, the active one").set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="print a template's text")
    show.add_argument("name")
    show.add_argument("--version", type=int)
    show.set_defaults(func=cmd_show)
    validate = sub.add_parser("validate", help="check a template (name or YAML file); exit 1 on errors")
    validate.add_argument("target", help="a template name or a path to a .yaml file")
    validate.set_defaults(func=cmd_validate)
    render = sub.add_parser("render", help="print the chat messages a question would produce")
    render.add_argument("name", nargs="?", help="template (default: the active one)")
    render.add_argument("-q", "--question", required=True)
    render.add_argument("--mode", choices=MODES, default="auto")
    render.add_argument("--no-retrieval", action="store_true", help="render without retrieved context")
    render.set_defaults(func=cmd_render)
    hist = sub.add_parser("history", help="versions of a template")
    hist.add_argument("name")
    hist.set_defaults(func=cmd_history)
    diff = sub.add_parser("diff", help="unified diff between two versions")
    diff.add_argument("name")
    diff.add_argument("a", type=int)
    diff.add_argument("b", type=int)
    diff.set_defaults(func=cmd_diff)
    save = sub.add_parser("save", help="save a YAML file as the next version of a template")
    save.add_argument("name")
    save.add_argument("file", type=Path)
    save.add_argument("-m", "--message", default="")
    save.add_argument("--base-version", type=int, help="fail if the latest version is not this one")
    save.set_defaults(func=cmd_save)
    revert = sub.add_parser("revert", help="make an old version the latest again (as a new version)")
    revert.add_argument("name")
    revert.add_argument("version", type=int)
    revert.set_defaults(func=cmd_revert)
    activate = sub.add_parser("activate", help="use this template for new answers")
    activate.add_argument("name")
    activate.set_defaults(func=cmd_activate)
    return parser


def _guard(func):
    """Handlers get a PromptManager; bad input gets a one-line message and exit code 2, never a traceback."""
    def run(settings: Settings, args: argparse.Namespace) -> int:
        try:
            return func(PromptManager(settings), args) or 0
        except (PromptError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    run.__name__ = func.__name__
    return run


@_guard
def cmd_list(prompts: PromptManager, args) -> int:
    active = prompts.active_name
    for name in prompts.names():
        try:
            template = prompts.load(name)
            about = f"{template.mode:9s} {template.description}"
        except PromptError:
            about = "(has errors)"
        print(f"{'*' if name == active else ' '} {name:20s} v{prompts.latest_version(name):<4d} {about}")


@_guard
def cmd_show(prompts: PromptManager, args) -> int:
    print(prompts.text(args.name, args.version), end="")


@_guard
def cmd_validate(prompts: PromptManager, args) -> int:
    path = Path(args.target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        text, name = path.read_text(encoding="utf-8"), None
    else:
        text, name = prompts.text(args.target), args.target
    problems = prompts.validate(text, name)
    for problem in problems:
        print(f"{args.target}:{problem.line}:{problem.column}: {problem.severity}: {problem.message}")
    errors = sum(p.severity == "error" for p in problems)
    print(f"{args.target}: {'OK' if not errors else f'{errors} error(s)'}"
          f"{f', {len(problems) - errors} warning(s)' if len(problems) - errors else ''}")
    return 1 if errors else 0


@_guard
def cmd_render(prompts: PromptManager, args) -> int:
    hits: list = []
    if not args.no_retrieval:
        try:
            from chatapp.retrieval import Retriever

            hits = Retriever.open(prompts.settings).search(args.question, []).hits
        except Exception as exc:  # rendering is still useful without an index
            print(f"(no retrieved context: {exc})", file=sys.stderr)
    rendered = prompts.render(args.name, question=args.question, history=[], hits=hits, mode=args.mode)
    print(f"# {rendered.template} v{rendered.version} · {rendered.mode} · {len(rendered.examples)} example(s)"
          f" · generation {json.dumps(rendered.generation)}")
    for message in rendered.messages:
        print(f"--- {message['role']}\n{message['content']}")


@_guard
def cmd_history(prompts: PromptManager, args) -> int:
    for entry in prompts.history(args.name):
        print(f"v{entry['version']:<4d} {entry['time']:25s} {entry['message']}")


@_guard
def cmd_diff(prompts: PromptManager, args) -> int:
    print(prompts.diff(args.name, args.a, args.b) or "(no differences)", end="")


@_guard
def cmd_save(prompts: PromptManager, args) -> int:
    version = prompts.save(args.name, args.file.read_text(encoding="utf-8"), args.message, args.base_version)
    print(f"{args.name}: version {version}")


@_guard
def cmd_revert(prompts: PromptManager, args) -> int:
    print(f"{args.name}: version {prompts.revert(args.name, args.version)}")


@_guard
def cmd_activate(prompts: PromptManager, args) -> int:
    prompts.activate(args.name)
    print(f"active template: {args.name}")


def main(argv: list[str] | None = None) -> int:
    """`python -m chatapp.prompts ...` works before (and besides) the `chatapp` entry point."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", help="TOML settings file")
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m chatapp.prompts [--config FILE]")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prompts", *rest])
    return args.func(Settings.load(known.config), args)


if __name__ == "__main__":
    sys.exit(main())
