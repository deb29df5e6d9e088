"""tune(): the whole job -- records, dataset, training, gate, registration and promotion -- plus the run
directories, the one-tune-at-a-time lock and the status file the admin tab reads."""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import random
import shutil
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from chatapp.adapters import AdapterRegistry
from chatapp.files import atomic_write_json
from chatapp.config import Settings
from chatapp.tuning.dataset import Dataset, build_dataset
from chatapp.tuning.gate import run_gate
from chatapp.tuning.records import TuningError, collect_records
from chatapp.tuning.train import adapter_compatible, train

# Why it is built this way:
# - A run lives in `data_dir/tuning/runs/<id>`: its dataset, checkpoints (adapter + optimizer + RNG state, replaced
#   atomically) and best checkpoint. Interrupted runs resume; Ctrl-C/SIGTERM saves a checkpoint first. Only a finished,
#   gated candidate is copied into the registry, so a failed or killed run never touches the active adapter.

log = logging.getLogger(__name__)


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
    """One tune at a time per data directory (a file lock) and across every replica of the database (a lock in
    it, chatapp/storage/locks.py); both die with their process, so a killed run never blocks the next."""
    from chatapp.storage import DB_ERRORS, StorageError, migrate, open_database
    from chatapp.storage.locks import LockHeld, hold

    folder = tuning_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tune.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TuningError(f"another tuning run is using {settings.data_dir} (see {folder / 'status.json'})") from None
        try:
            db = open_database(settings.database, settings.feedback.busy_timeout_s, pool_size=1)
            held = ExitStack()
            try:
                migrate(db)
                held.enter_context(hold(db, "tune"))
            except LockHeld as exc:
                db.dispose()
                raise TuningError(f"another replica is tuning ({exc.owner}); this one skips it") from None
            except (*DB_ERRORS, StorageError) as exc:
                db.dispose()
                raise TuningError(f"the tuning lock in the database cannot be taken: {exc}") from None
            with held:
                yield
            db.dispose()
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
         progress: bool = True, force: bool = False, stop: threading.Event | None = None,
         install_shipped: bool = True) -> TuneReport:
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
        if install_shipped:
            registry.install_shipped(base_hash)  # a first tune starts from the shipped adapter and replays its data
        active = registry.active()
        warm = tuning.warm_start and adapter_compatible(active, tuning, base_hash)
        config = _run_config(settings, base_hash, (template_name, template.version), max_steps, limit)
        config["init_adapter"] = active.version if warm and active else None
        run_dir = _resumable_run(settings, config)
        embedder = retriever = None
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
            from chatapp.evidence import EvidenceSelector

            selector = EvidenceSelector(embedder, k=settings.answer.evidence_units,
                                        per_chunk=settings.answer.evidence_per_chunk)
            dataset = build_dataset(records, prompts, tokenizer, tuning, retriever=retriever,
                                    top_k=settings.retrieval.top_k, template=template_name, progress=progress,
                                    evidence=selector)
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
        if retriever is None:
            retriever = _open_retriever(settings)  # a resumed run: the gate's shop questions are retrieved
            embedder = embedder or getattr(retriever, "embedder", None)
        gate = run_gate(settings, model_dir, base_hash, prompts, result.best_dir, active,
                        replay[:tuning.replay_gate_size], progress=progress, embedder=embedder,
                        retriever=retriever)
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
            from chatapp.gguf_files import premerge_adapter

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
