"""CLI: `chatapp tune ...` (argument parsing and a thin handler over tune(), tune_if_due() and
run_periodically())."""
from __future__ import annotations

import argparse
import json
import sys
import threading

from chatapp.adapters import AdapterError
from chatapp.config import Settings
from chatapp.tuning.gate import format_gate_report
from chatapp.tuning.records import TuningError
from chatapp.tuning.run import tune, tune_status, write_status
from chatapp.tuning.schedule import lower_priority, parse_interval, run_periodically, tune_if_due
from chatapp.tuning.train import _stop_on_signals


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
