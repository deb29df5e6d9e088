"""Dataset: records -> chat messages (the inference renderer) -> token ids with answer-only labels, split by
conversation."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatapp.config import TuningSettings
from chatapp.tuning.records import TuningError, _norm

# Why it is built this way:
# - Every example is rendered by `PromptManager.training_example`, the renderer inference uses, with the retrieved
#   context attached: training prompts cannot drift from serving prompts. Loss is on the final answer only (labels
#   -100 elsewhere); SmolLM2's chat template has no {% generation %} markers, so the answer span is found by rendering
#   the prompt alone and the full conversation and comparing.
# - Splits are by conversation, by a hash of its id: a conversation is always on the same side in every run, so
#   validation (and the replay part of the gate) never contains anything any adapter was trained on.

log = logging.getLogger(__name__)

DATASET_FORMAT = 1


@dataclass
class Hit:
    """A retrieval hit as the renderer reads it (same attribute names as chatapp.retrieval's hits)."""

    chunk_id: str = ""
    source: str = ""
    title: str = ""
    text: str = ""
    score: float = 0.0
    kind: str = ""
    answer: str = ""
    entity: str = ""

    @classmethod
    def of(cls, value: Any) -> "Hit":
        if isinstance(value, dict):
            return cls(**{k: value[k] for k in cls.__dataclass_fields__ if value.get(k) is not None})
        return cls(**{k: getattr(value, k) for k in cls.__dataclass_fields__
                      if getattr(value, k, None) is not None})


@dataclass
class Example:
    id: str
    conversation: str
    origin: str  # "new" | "replay"
    source: str
    messages: list[dict]
    input_ids: list[int]
    label_start: int  # labels are input_ids[label_start:label_end], everything else -100
    label_end: int

    def labels(self) -> list[int]:
        return [-100] * self.label_start + self.input_ids[self.label_start:self.label_end] + \
            [-100] * (len(self.input_ids) - self.label_end)


@dataclass
class Dataset:
    train: list[Example]
    val: list[Example]
    records: list[dict]  # what was trained and validated on, unrendered: the next re-tune's replay pool
    info: dict = field(default_factory=dict)

    @property
    def hash(self) -> str:
        digest = hashlib.sha256()
        for split in (self.train, self.val):
            for example in split:
                digest.update(json.dumps(example.input_ids).encode())
                digest.update(f"{example.label_start}:{example.label_end};".encode())
        return digest.hexdigest()

    def save(self, path: Path) -> None:
        payload = {"format": DATASET_FORMAT, "info": self.info, "records": self.records,
                   "train": [dataclasses.asdict(e) for e in self.train],
                   "val": [dataclasses.asdict(e) for e in self.val]}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, ensure_ascii=False))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Dataset":
        payload = json.loads(path.read_text())
        if payload.get("format") != DATASET_FORMAT:
            raise TuningError(f"{path}: dataset format {payload.get('format')} is not {DATASET_FORMAT}")
        return cls([Example(**e) for e in payload["train"]], [Example(**e) for e in payload["val"]],
                   payload["records"], payload["info"])


def _bucket(conversation: str) -> float:
    """A stable number in [0, 1) for a conversation id: the same side of every split in every run."""
    return int(hashlib.sha1(conversation.encode()).hexdigest()[:8], 16) / 2**32


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=True)
    return list(out["input_ids"])


def encode_example(tokenizer, messages: list[dict]) -> tuple[list[int], int, int]:
    """Token ids of the whole conversation and the span of the final assistant answer (its text and the template's
    end-of-turn token, not the whitespace after it): the only tokens that get a loss."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training example ends with the assistant's answer")
    prompt = _chat_ids(tokenizer, messages[:-1], generation_prompt=True)
    full = _chat_ids(tokenizer, messages)
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    end = len(full)
    while end > len(prompt) and not tokenizer.decode(full[end - 1:end]).strip():
        end -= 1  # trailing newline after <|im_end|>
    if end <= len(prompt):
        raise ValueError("empty answer")
    return full, len(prompt), end


def _retrieved(retriever, question: str, history: list[dict]) -> list:
    if retriever is None:
        return []
    try:
        return list(retriever.search(question, history).hits)
    except Exception as exc:  # training goes on with the record's own knowledge
        log.debug("retrieval failed for %r: %s", question[:60], exc)
        return []


def merge_hits(own: list[dict], retrieved: list, k: int) -> list[Hit]:
    """The record's grounding knowledge first, then what the live retriever finds, without repeats, at most k."""
    out, seen = [], set()
    for hit in [Hit.of(h) for h in own] + [Hit.of(h) for h in retrieved]:
        key = hit.chunk_id or _norm(hit.text)[:200]
        if key in seen:
            continue
        seen.add(key)
        out.append(hit)
    return out[:max(k, len(own))]


def render_record(prompts, tokenizer, record: dict, hits: list[Hit], max_len: int, template: str | None = None
                  ) -> tuple[list[dict], list[int], int, int] | None:
    """Render with the inference template; when too long, retry with less history, then fewer hits (the same
    format, shorter), and give up (None) when even the bare question + answer does not fit."""
    history = record.get("history") or []
    attempts = [(history, hits), (history[-2:], hits), ([], hits)] + [([], hits[:n]) for n in range(len(hits) - 1, -1, -1)]
    tried = set()
    for hist, knowledge in attempts:
        key = (len(hist), len(knowledge))
        if key in tried:
            continue
        tried.add(key)
        messages = prompts.training_example(template, question=record["question"], history=hist, hits=knowledge,
                                            answer=record["answer"], mode="zero_shot")["messages"]
        ids, start, end = encode_example(tokenizer, messages)
        if len(ids) <= max_len:
            return messages, ids, start, end
    return None


def build_dataset(records: list[dict], prompts, tokenizer, tuning: TuningSettings, *, retriever=None,
                  top_k: int = 4, template: str | None = None, progress: bool = False, evidence=None) -> Dataset:
    """Render, tokenize, split by conversation. Records must already be deduplicated and composed. With `evidence`
    (an `evidence.EvidenceSelector`) the prompt quotes the selected sentences of the hits, as `Bot.answer` does."""
    from tqdm.auto import tqdm

    train, val, kept, too_long = [], [], [], 0
    for record in tqdm(records, desc="rendering examples", disable=not progress, leave=False):
        hits = merge_hits(record.get("hits") or [], _retrieved(retriever, record["question"], record.get("history") or []), top_k)
        if evidence is not None:
            hits = evidence.select(record["question"], record.get("history") or [], hits) or hits
        rendered = render_record(prompts, tokenizer, record, hits, tuning.max_seq_len, template)
        if rendered is None:
            too_long += 1
            continue
        messages, ids, start, end = rendered
        example = Example(record["id"], record["conversation"], record.get("origin", "new"), record.get("source", ""),
                          messages, ids, start, end)
        (val if _bucket(record["conversation"]) < tuning.val_fraction else train).append(example)
        kept.append(record)
    if not train and val:  # a tiny dataset whose conversations all hashed into validation
        train, val = val, []
    if not val and len({e.conversation for e in train}) > 1 and tuning.val_fraction > 0:
        first = min(train, key=lambda e: _bucket(e.conversation)).conversation
        val = [e for e in train if e.conversation == first]
        train = [e for e in train if e.conversation != first]
    val.sort(key=lambda e: (_bucket(e.conversation), e.id))
    unused = {e.id for e in val[tuning.val_max:]} if tuning.val_max else set()
    val = val[:tuning.val_max] if tuning.val_max else val
    kept = [r for r in kept if r["id"] not in unused]
    sources: dict[str, int] = {}
    for example in train:
        sources[example.source] = sources.get(example.source, 0) + 1
    info = {"train_examples": len(train), "val_examples": len(val), "dropped_too_long": too_long,
            "held_out_unused": len(unused), "sources": sources,
            "origins": {o: sum(e.origin == o for e in train) for o in ("new", "replay")},
            "train_tokens": sum(len(e.input_ids) for e in train),
            "answer_tokens": sum(e.label_end - e.label_start for e in train)}
    return Dataset(train, val, kept, info)
