"""LoRA training: a plain PyTorch loop over a Dataset (fp32, CPU) with resumable checkpoints, validation,
early stopping and a loss curve."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from chatapp.adapters import AdapterInfo
from chatapp.files import atomic_write_json
from chatapp.config import TuningSettings
from chatapp.tuning.dataset import Dataset, Example
from chatapp.tuning.records import TuningError

# Why it is built this way:
# - A plain PyTorch loop, because TRL is not in the dependency set and the loop is short. One trick matters on a CPU:
#   logits are computed only at answer positions (the 49k-vocabulary head is ~20% of the model's FLOPs, and its
#   backward over every position made a step ~5x slower here).

log = logging.getLogger(__name__)


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
