"""The knowledge folder -> chunk records.

A knowledge folder holds Markdown/text articles (split along headings, each chunk keeping its file, heading path and
position) and FAQ files (JSONL or CSV with ``question``, ``answer`` and optional ``entity``/``category``). Anything
else in it is reported and skipped: a bad line or a bad file never stops the rest from being ingested, and nothing
outside the folder (symlinks, ``..``) is ever read.

Any folder can be the knowledge base (``[retrieval] knowledge_dir = "..."`` in chatapp.toml or
``--retrieval.knowledge_dir``); e.g. a folder holding a copy of ``dstc9_track1/faq_kb.jsonl`` turns the bot into a
Cambridge/San Francisco hotel-and-restaurant FAQ bot. The default folder ``knowledge/`` holds the ABCD shop's agent
manual rewritten by hand into customer-facing articles (see knowledge/NOTICE).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

log = logging.getLogger(__name__)

DOC_SUFFIXES = {".md", ".markdown", ".txt"}
FAQ_SUFFIXES = {".jsonl", ".csv"}
QUIET_NAMES = {"license", "notice", "copying", "authors"}  # licence files beside the content: skipped silently
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass
class Chunk:
    """One retrievable unit: a piece of an article or one FAQ pair. ``text`` is what a person reads and cites."""

    chunk_id: str  # "<source>#<local id>": unique in the index, stable while the file's content is
    source: str  # path relative to the knowledge folder
    title: str  # heading path of an article chunk ("Returns › Return due to size"), the question of an FAQ
    text: str
    kind: str = "doc"  # "doc" | "faq"
    answer: str | None = None
    entity: str | None = None  # the business/product the chunk is about
    category: str | None = None
    position: int = 0  # order of the chunk in its file

    def views(self) -> list[str]:
        """The texts embedded for this chunk. An FAQ is matched on its question and, as a cross-check, its answer
        (on DSTC11 question+answer beats question alone: R@1 0.87 vs 0.79); an article chunk on heading + text."""
        if self.kind == "faq":
            return [self.text, self.answer or self.text]
        return [f"{self.title}\n{self.text}" if self.title else self.text]

    def search_text(self) -> str:
        """What BM25 indexes: everything a keyword could be in."""
        return " ".join(x for x in (self.title if self.kind == "doc" else "", self.text, self.answer or "",
                                    self.entity or "") if x)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FileScan:
    """A knowledge file as found on disk; ``sha256`` is filled in only when its stat changed since last ingest."""

    path: str
    size: int
    mtime_ns: int
    sha256: str = ""


@dataclass
class Problems:
    """Warnings collected while reading, also sent to ``logging`` so a CLI run and the app log both show them."""

    messages: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        log.warning(message)
        self.messages.append(message)


# --------------------------------------------------------------------------------------------------- the folder

def scan_folder(folder: Path, max_file_bytes: int, problems: Problems) -> dict[str, FileScan]:
    """Every ingestible file under ``folder`` by relative path. Symlinks and anything resolving outside are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        problems.add(f"{folder}: knowledge folder does not exist; the knowledge base is empty")
        return {}
    root = folder.resolve()
    found: dict[str, FileScan] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in list(dirnames):
            if name.startswith("."):
                dirnames.remove(name)
            elif (here / name).is_symlink():
                problems.add(f"{(here / name).relative_to(root)}: symlinked folder ignored (only real files "
                             f"inside the knowledge folder are read)")
                dirnames.remove(name)
        for name in sorted(filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            if name.startswith("."):
                continue
            suffix = path.suffix.lower()
            if suffix not in DOC_SUFFIXES | FAQ_SUFFIXES:
                if path.stem.lower() not in QUIET_NAMES:
                    problems.add(f"{rel}: unsupported file type ignored (use .md, .txt, .jsonl or .csv)")
                continue
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                problems.add(f"{rel}: symlink or path outside the knowledge folder ignored")
                continue
            try:
                stat = path.stat()
            except OSError as err:  # deleted or unreadable while we looked
                problems.add(f"{rel}: cannot read ({err.strerror}); skipped")
                continue
            if not path.is_file():
                continue
            if stat.st_size > max_file_bytes:
                problems.add(f"{rel}: {stat.st_size / 2**20:.1f} MB is over the {max_file_bytes / 2**20:.0f} MB "
                             f"limit (retrieval.max_file_mb); skipped")
                continue
            found[rel] = FileScan(rel, stat.st_size, stat.st_mtime_ns)
    return found


def read_text(path: Path, rel: str, problems: Problems) -> tuple[str | None, str]:
    """(text, sha256 of the bytes). Text is None for an empty, binary or non-UTF-8 file, with a warning saying why."""
    try:
        data = path.read_bytes()
    except OSError as err:
        problems.add(f"{rel}: cannot read ({err.strerror}); skipped")
        return None, ""
    digest = hashlib.sha256(data).hexdigest()
    if not data.strip():
        problems.add(f"{rel}: empty file; nothing to ingest")
        return None, digest
    if b"\x00" in data[:8192]:
        problems.add(f"{rel}: looks binary (NUL bytes); skipped")
        return None, digest
    try:
        return data.decode("utf-8-sig"), digest
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        problems.add(f"{rel}:{line}: not UTF-8 (byte 0x{data[err.start]:02x}); skipped: save the file as UTF-8")
        return None, digest


def parse_file(rel: str, text: str, chunk_chars: int, problems: Problems) -> list[Chunk]:
    suffix = Path(rel).suffix.lower()
    if suffix == ".jsonl":
        return parse_faq_jsonl(rel, text, problems)
    if suffix == ".csv":
        return parse_faq_csv(rel, text, problems)
    if suffix == ".txt":
        return chunk_plain_text(rel, text, chunk_chars)
    return chunk_markdown(rel, text, chunk_chars, problems)


# --------------------------------------------------------------------------------------------------- articles

def _front_matter(rel: str, text: str, problems: Problems) -> tuple[dict[str, Any], str]:
    """Optional YAML front matter (``entity:``, ``category:``, ``title:``) between two ``---`` lines."""
    if not text.startswith("---"):
        return {}, text
    match = re.match(r"---[ \t]*\n(.*?)\n---[ \t]*(?:\n|$)", text, re.S)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as err:
        problems.add(f"{rel}:1: front matter is not valid YAML ({err.__class__.__name__}); ignored")
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    return meta, text[match.end():]


def _pack(paragraphs: list[str], chunk_chars: int) -> Iterator[str]:
    """Greedy paragraphs -> pieces of at most chunk_chars; a longer paragraph is cut at sentence ends, then hard."""
    piece = ""
    for para in paragraphs:
        parts = [para]
        if len(para) > chunk_chars:
            parts, current = [], ""
            for sentence in re.split(r"(?<=[.!?。！？])\s+", para):
                while len(sentence) > chunk_chars:
                    parts.append(sentence[:chunk_chars])
                    sentence = sentence[chunk_chars:]
                if current and len(current) + len(sentence) + 1 > chunk_chars:
                    parts.append(current)
                    current = ""
                current = f"{current} {sentence}".strip()
            if current:
                parts.append(current)
        for part in parts:
            if piece and len(piece) + len(part) + 2 > chunk_chars:
                yield piece
                piece = ""
            piece = f"{piece}\n\n{part}" if piece else part
    if piece:
        yield piece


def _paragraphs(lines: list[str]) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]


def chunk_markdown(rel: str, text: str, chunk_chars: int, problems: Problems | None = None) -> list[Chunk]:
    """Split along ATX headings (not inside code fences); each chunk's title is its heading path."""
    meta, body = _front_matter(rel, text, problems or Problems())
    doc_title = str(meta.get("title") or "")
    path: list[tuple[int, str]] = []
    sections: list[tuple[list[str], list[str]]] = [([], [])]
    in_fence = False
    for line in body.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else HEADING.match(line)
        if match:
            level, heading = len(match.group(1)), match.group(2).strip()
            path = [(lv, h) for lv, h in path if lv < level] + [(level, heading)]
            if level == 1 and not doc_title:
                doc_title = heading
            sections.append(([h for _, h in path], []))
        else:
            sections[-1][1].append(line)
    doc_title = doc_title or Path(rel).stem.replace("_", " ").replace("-", " ")
    chunks: list[Chunk] = []
    for headings, lines in sections:
        if headings and headings[0] != doc_title:
            headings = [doc_title, *headings]  # a file without an H1: its title still heads every chunk
        title = " › ".join(headings) if headings else doc_title
        for piece in _pack(_paragraphs(lines), chunk_chars):
            chunks.append(Chunk(f"{rel}#{len(chunks)}", rel, title, piece, "doc",
                                entity=_opt(meta.get("entity")), category=_opt(meta.get("category")),
                                position=len(chunks)))
    return chunks


def chunk_plain_text(rel: str, text: str, chunk_chars: int) -> list[Chunk]:
    title = Path(rel).stem.replace("_", " ").replace("-", " ")
    return [Chunk(f"{rel}#{i}", rel, title, piece, "doc", position=i)
            for i, piece in enumerate(_pack(_paragraphs(text.splitlines()), chunk_chars))]


# --------------------------------------------------------------------------------------------------- FAQ files

def _opt(value: Any) -> str | None:
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _faq_chunk(rel: str, local_id: str, row: dict[str, Any], position: int) -> Chunk | str:
    """A Chunk, or the reason the row is unusable."""
    lowered = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    question, answer = lowered.get("question"), lowered.get("answer")
    if not isinstance(question, str) or not question.strip():
        return "no 'question'"
    if not isinstance(answer, str) or not answer.strip():
        return "no 'answer'"
    entity = _opt(lowered.get("entity") if lowered.get("entity") is not None else lowered.get("entity_name"))
    category = _opt(lowered.get("category") if lowered.get("category") is not None else lowered.get("domain"))
    return Chunk(f"{rel}#{local_id}", rel, question.strip(), question.strip(), "faq", answer=answer.strip(),
                 entity=entity, category=category, position=position)


def _unique_id(rel: str, row: dict[str, Any], line: int, seen: set[str]) -> str:
    local = _opt(row.get("id")) or f"L{line}"
    if local in seen:
        local = f"{local}@L{line}"
    seen.add(local)
    return local


def parse_faq_jsonl(rel: str, text: str, problems: Problems) -> list[Chunk]:
    chunks: list[Chunk] = []
    seen: set[str] = set()
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.add(f"{rel}:{line_no}: not valid JSON ({err.msg}); line skipped")
            continue
        if not isinstance(row, dict):
            problems.add(f"{rel}:{line_no}: expected a JSON object; line skipped")
            continue
        chunk = _faq_chunk(rel, _unique_id(rel, row, line_no, seen), row, len(chunks))
        if isinstance(chunk, str):
            problems.add(f"{rel}:{line_no}: {chunk}; line skipped")
        else:
            chunks.append(chunk)
    return chunks


def parse_faq_csv(rel: str, text: str, problems: Problems) -> list[Chunk]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except (StopIteration, csv.Error) as err:
        problems.add(f"{rel}:1: no CSV header ({err}); file skipped")
        return []
    if "question" not in header or "answer" not in header:
        problems.add(f"{rel}:1: the header needs 'question' and 'answer' columns (found: {', '.join(header)}); "
                     f"file skipped")
        return []
    chunks: list[Chunk] = []
    seen: set[str] = set()
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            problems.add(f"{rel}:{start}: malformed CSV ({err}); rest of the file skipped")
            break
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            problems.add(f"{rel}:{start}: {len(values)} fields where the header has {len(header)}; row skipped")
            continue
        row = dict(zip(header, values))
        chunk = _faq_chunk(rel, _unique_id(rel, row, start, seen), row, len(chunks))
        if isinstance(chunk, str):
            problems.add(f"{rel}:{start}: {chunk}; row skipped")
        else:
            chunks.append(chunk)
    return chunks
