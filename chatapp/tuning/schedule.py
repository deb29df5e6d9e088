"""Periodic re-tuning (only when enough new feedback arrived) and launching a tune as a separate low-priority
background process."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any

from chatapp.adapters import AdapterRegistry
from chatapp.files import atomic_write_json
from chatapp.config import Settings
from chatapp.tuning.records import TuningError, count_new_feedback
from chatapp.tuning.run import TuneReport, tune, tune_status, tuning_dir, write_status

log = logging.getLogger(__name__)


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
