"""``chatapp feedback export|stats|check``: the feedback log's command line (argparse lives here, the store in
chatapp/feedback.py)."""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from chatapp.config import Settings
from chatapp.feedback import FeedbackError, FeedbackStore
from chatapp.feedback_export import EXPORT_FORMATS, write_jsonl


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Register ``feedback export|stats|check`` (chatapp/cli.py calls this); each sets ``func(settings, args) -> int``."""
    parser = subparsers.add_parser("feedback", help="feedback log: stats and training-data export")
    parser.add_argument("--db", default=None,
                        help="feedback database: an SQLite file or a database URL (default: the app's database)")
    actions = parser.add_subparsers(dest="feedback_command", required=True)
    export = actions.add_parser("export", help="export rated answers as training data (redacted by default)")
    export.add_argument("--format", dest="fmt", choices=EXPORT_FORMATS, required=True)
    export.add_argument("--since", type=_parse_since, default=None,
                        help="only ratings given on or after this date (YYYY-MM-DD or ISO date-time)")
    export.add_argument("--out", type=Path, default=None, help="JSONL file to write (default: standard output)")
    export.add_argument("--raw", action="store_true", help="do NOT redact personal data (emails, phones, cards...)")
    export.add_argument("--no-meta", dest="meta", action="store_false",
                        help="only the format's own keys (no 'meta' side field with template/chunk ids)")
    export.set_defaults(func=run_export)
    stats = actions.add_parser("stats", help="counts, thumbs-up rate, latency, most down-voted questions")
    stats.add_argument("--since", type=_parse_since, default=None)
    stats.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    stats.set_defaults(func=run_stats)
    check = actions.add_parser("check", help="integrity check, and save feedback left in the spill file")
    check.set_defaults(func=run_check)


def _parse_since(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM)") from None


def _open(settings: Settings, args: argparse.Namespace) -> FeedbackStore:
    if args.db:
        return FeedbackStore(args.db, settings.feedback)
    return FeedbackStore.open(settings)


def run_export(settings: Settings, args: argparse.Namespace) -> int:
    db = args.db or (None if settings.database_url else settings.feedback_db)
    if db is not None and not Path(db).exists():
        print(f"error: no feedback database at {db}", file=sys.stderr)
        return 1
    try:
        store = _open(settings, args)
    except FeedbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        records, counts = store.export(args.fmt, since=args.since, redact=not args.raw, meta=args.meta)
    except FeedbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.out:
        write_jsonl(records, args.out)
    else:
        for record in records:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    where = args.out or "standard output"
    print(f"exported {len(records)} {args.fmt} records to {where}", file=sys.stderr)
    if args.raw:
        print("RAW export: personal data was NOT redacted; handle this file accordingly.", file=sys.stderr)
    else:
        summary = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) or "nothing found"
        print(f"redacted: {summary}", file=sys.stderr)
    return 0


def run_stats(settings: Settings, args: argparse.Namespace) -> int:
    try:
        store = _open(settings, args)
    except FeedbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        figures = store.stats(args.since.timestamp() if args.since else None)
    except FeedbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.json:
        print(json.dumps(figures, indent=2, ensure_ascii=False))
        return 0
    lat = figures["latency_ms"]
    rate = f"{figures['up_rate']:.0%}" if figures["up_rate"] is not None else "n/a"
    print(f"turns {figures['turns']} in {figures['sessions']} sessions; rated {figures['rated']} "
          f"(up {figures['up']}, down {figures['down']}, thumbs-up rate {rate}); corrections {figures['corrections']}")
    print(f"handoffs requested {figures['handoffs_requested']}, offered {figures['handoffs_offered']}")
    print(f"latency ms: first token p50 {_ms(lat['first_token_p50'])} p95 {_ms(lat['first_token_p95'])}; "
          f"total p50 {_ms(lat['total_p50'])} p95 {_ms(lat['total_p95'])}")
    for g in figures["most_downvoted"]:
        print(f"  down {g['down']:3d} up {g['up']:3d}  {g['question'][:100]!r}")
    if figures["health"]:
        print(f"WARNING: {figures['health']}", file=sys.stderr)
    return 0


def run_check(settings: Settings, args: argparse.Namespace) -> int:
    try:
        store = _open(settings, args)
    except FeedbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        result = store.check()  # replays the spill file first if there is one
    except FeedbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print("integrity: " + "; ".join(result))
    return 0 if result == ["ok"] else 1


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    """``python -m chatapp.feedback ...``: the same commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m chatapp.feedback")
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--database-url", default=None, help="postgresql+psycopg://... (default: SQLite in the data dir)")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    settings = Settings.load(args.config, data_dir=args.data_dir, database_url=args.database_url)
    return args.func(settings, args)


if __name__ == "__main__":
    sys.exit(main())
