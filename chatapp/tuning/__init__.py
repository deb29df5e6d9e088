"""Re-tuning: training data (seed + feedback + replay) -> LoRA training -> evaluation gate -> registry (-> promotion).

    chatapp tune [--max-steps N] [--examples N] [--no-promote] [--force]
    chatapp tune --every 24h --min-new-feedback 20        # background loop at low priority
    cron:  0 3 * * *  cd /srv/chatapp && .venv/bin/chatapp tune --min-new-feedback 20 >> var/tune.log 2>&1

One module per job: `records` (what to train on), `dataset` (rendering and tokenizing), `train` (the LoRA loop),
`gate` (evaluation and the promotion decision), `run` (`tune()`, the whole job), `schedule` (periodic and background
runs), `cli` (`chatapp tune`). The names other code uses are re-exported here.
"""
from __future__ import annotations

from chatapp.tuning.records import (
    TuningError,
    collect_records,
    compose,
    count_new_feedback,
    dedupe,
    feedback_records,
    seed_sample,
)
from chatapp.tuning.dataset import (
    DATASET_FORMAT,
    Dataset,
    Example,
    Hit,
    build_dataset,
    encode_example,
    merge_hits,
    render_record,
)
from chatapp.tuning.train import (
    TrainResult,
    adapter_compatible,
    answer_loss,
    evaluate_loss,
    lora_config,
    plot_loss_curve,
    train,
)
from chatapp.tuning.gate import (
    REFUSAL_RE,
    Evaluator,
    adapter_identity,
    cosine_pairs,
    format_gate_report,
    gate_decision,
    generate_batch,
    golden_items,
    is_degenerate,
    is_refusal,
    load_embedder,
    rouge_l,
    run_gate,
)
from chatapp.tuning.run import (
    TuneReport,
    busy_cores,
    training_threads,
    tune,
    tune_lock,
    tune_status,
    tuning_dir,
    write_status,
)
from chatapp.tuning.schedule import (
    feedback_cutoff,
    launch_background_tune,
    lower_priority,
    parse_interval,
    run_periodically,
    tune_if_due,
)
from chatapp.tuning.cli import add_arguments, cmd_tune

__all__ = [
    "DATASET_FORMAT", "REFUSAL_RE", "Dataset", "Evaluator", "Example", "Hit", "TrainResult", "TuneReport",
    "TuningError", "adapter_compatible", "adapter_identity", "add_arguments", "answer_loss", "build_dataset",
    "busy_cores", "cmd_tune", "collect_records", "compose", "cosine_pairs", "count_new_feedback", "dedupe",
    "encode_example", "evaluate_loss", "feedback_cutoff", "feedback_records", "format_gate_report", "gate_decision",
    "generate_batch", "golden_items", "is_degenerate", "is_refusal", "launch_background_tune", "load_embedder",
    "lora_config", "lower_priority", "merge_hits", "parse_interval", "plot_loss_curve", "render_record", "rouge_l",
    "run_gate", "run_periodically", "seed_sample", "train", "training_threads", "tune", "tune_if_due", "tune_lock",
    "tune_status", "tuning_dir", "write_status",
]
