"""Feedback log throughput: sustained writes/s with 1 and 20 concurrent writers (each iteration = log_turn + rate,
rate waiting for its commit as the UI does), how long log_turn holds the caller (it must never block streaming),
and export time for 100,000 rated turns in every format, redacted and raw. Then the same writes on Postgres with
1 and 2 app processes (replicas) writing at once, 20 sessions each (a temporary Postgres 15 cluster from Debian's
package, as the tests start it, or --postgres-url).

Texts are real: BANKING77 customer questions and DSTC11 FAQ answers from shared/data, with personal data (emails,
phones, cards, IBANs, addresses, order ids) mixed into 10% of questions so redaction has work to do.

    .venv/bin/python bench/feedback.py [--seconds 5] [--records 100000] [--postgres-url URL | --no-postgres]
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from chatapp.benchutil import write_result
from chatapp.config import REPO_ROOT, FeedbackSettings
from chatapp.feedback import EXPORT_FORMATS, FeedbackStore, TurnRecord, new_message_id
from chatapp.storage.tempcluster import temporary_postgres

DATA = REPO_ROOT.parent / "shared" / "data"
PII = ["email me at jane.doe@example.com", "call +44 20 7946 0958", "card 4111 1111 1111 1111",
       "IBAN GB82 WEST 1234 5698 7654 32", "I live at 221B Baker Street, London NW1 6XE", "order #AB12345"]


def load_texts() -> tuple[list[str], list[str]]:
    with open(DATA / "banking77" / "train.csv", newline="", encoding="utf-8") as f:
        questions = [row["text"] for row in csv.DictReader(f)]
    with open(DATA / "dstc11_track5" / "faq_kb.jsonl", encoding="utf-8") as f:
        answers = [json.loads(line)["answer"] for line in f]
    return questions, answers


class Conversation:
    """Turns of one session, with the growing history the bot would log."""

    def __init__(self, rng: random.Random, questions: list[str], answers: list[str]):
        self.rng, self.questions, self.answers = rng, questions, answers
        self.session = new_message_id()
        self.history: list[dict] = []

    def next_turn(self) -> TurnRecord:
        rng = self.rng
        if len(self.history) >= 8:
            self.session, self.history = new_message_id(), []
        question = rng.choice(self.questions)
        if rng.random() < 0.1:
            question += " " + rng.choice(PII)
        answer = rng.choice(self.answers)
        record = TurnRecord(
            new_message_id(), self.session, question, answer, history=list(self.history),
            prompt_messages=[{"role": "system", "content": "You are Ava, the support assistant. Context: " + answer}],
            retrieved=[{"chunk_id": f"faq/{rng.randrange(3000)}", "score": rng.random(), "source": "faq_kb.jsonl",
                        "title": "FAQ"} for _ in range(4)],
            template="support", template_version=3, mode="few_shot", model="smollm2", adapter=None,
            first_token_ms=rng.uniform(200, 900), total_ms=rng.uniform(1500, 6000),
        )
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return record

    def rating(self) -> tuple[int, str | None]:
        roll = self.rng.random()
        if roll < 0.6:
            return 1, None
        if roll < 0.9:
            return -1, None
        return -1, "The right answer: " + self.rng.choice(self.answers)


def sustained(store: FeedbackStore, writers: int, seconds: float, texts) -> dict:
    """Each writer loops log_turn + rate (rate returns once committed) for ``seconds``."""
    done = [0] * writers
    hold: list[float] = []  # how long each log_turn call kept its caller
    stop = time.perf_counter() + seconds

    def writer(n: int) -> None:
        conv = Conversation(random.Random(n), *texts)
        local = []
        while time.perf_counter() < stop:
            record = conv.next_turn()
            started = time.perf_counter()
            store.log_turn(record)
            local.append(time.perf_counter() - started)
            store.rate(record.message_id, *conv.rating())
            done[n] += 1
        hold.extend(local)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.flush()
    elapsed = time.perf_counter() - started
    hold.sort()
    turns = sum(done)
    return {
        "writers": writers,
        "seconds": round(elapsed, 2),
        "turns_rated": turns,
        "turns_per_s": round(turns / elapsed, 1),
        "writes_per_s": round(2 * turns / elapsed, 1),  # log_turn + rate
        "log_turn_hold_us_p50": round(hold[len(hold) // 2] * 1e6, 1),
        "log_turn_hold_us_p99": round(hold[int(len(hold) * 0.99)] * 1e6, 1),
        "log_turn_hold_us_max": round(hold[-1] * 1e6, 1),
    }


def fill(store: FeedbackStore, records: int, texts) -> float:
    """``records`` rated turns through the public API (20 writers), returns seconds taken."""
    per_writer = records // 20
    started = time.perf_counter()

    def writer(n: int) -> None:
        conv = Conversation(random.Random(1000 + n), *texts)
        for _ in range(per_writer):
            record = conv.next_turn()
            store.log_turn(record)
            store.rate(record.message_id, *conv.rating())

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.flush()
    return time.perf_counter() - started


def replica_writer(url: str, writers: int, seconds: float, start_at: float, spill: Path) -> dict:
    """One app process's share of a multi-replica run: its own store on the shared database, started at start_at."""
    texts = load_texts()
    store = FeedbackStore(url, FeedbackSettings(), spill_path=spill)
    store.flush()  # connected and migrated before the clock starts
    time.sleep(max(0.0, start_at - time.time()))
    try:
        return sustained(store, writers, seconds, texts)
    finally:
        store.close()


def postgres_runs(url: str, seconds: float, tmp: Path) -> dict:
    """Sustained writes on one Postgres from 1 and 2 processes (20 sessions each), and 1 process with 1 session."""
    out: dict = {}
    for processes, writers in ((1, 1), (1, 20), (2, 20)):
        start_at = time.time() + 8  # every process imported and connected before the clock starts
        procs = [subprocess.Popen([sys.executable, __file__, "--child", url, str(writers), str(seconds), str(start_at),
                                   str(tmp / f"spill-{processes}-{writers}-{n}.jsonl")],
                                  stdout=subprocess.PIPE, text=True) for n in range(processes)]
        runs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        turns = sum(r["turns_rated"] for r in runs)
        elapsed = max(r["seconds"] for r in runs)
        run = {"processes": processes, "writers_per_process": writers, "seconds": elapsed, "turns_rated": turns,
               "turns_per_s": round(turns / elapsed, 1), "writes_per_s": round(2 * turns / elapsed, 1),
               "per_process": runs}
        out[f"postgres_{processes}_processes_{writers}_writers"] = run
        print(f"postgres, {processes} process(es) x {writers:2d} writers: {run['turns_per_s']:8.1f} rated turns/s "
              f"({run['writes_per_s']:.1f} writes/s); log_turn holds p99 "
              f"{max(r['log_turn_hold_us_p99'] for r in runs)} us")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each sustained-write run")
    parser.add_argument("--records", type=int, default=100_000, help="rated turns in the export benchmark")
    parser.add_argument("--postgres-url", default=None, help="an existing Postgres database to write to")
    parser.add_argument("--no-postgres", action="store_true", help="skip the Postgres runs")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite runs (and the export benchmark)")
    parser.add_argument("--child", nargs=5, metavar=("URL", "WRITERS", "SECONDS", "START_AT", "SPILL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, writers, seconds, start_at, spill = args.child
        print(json.dumps(replica_writer(url, int(writers), float(seconds), float(start_at), Path(spill))))
        return
    texts = load_texts()
    result: dict = {"settings": {"seconds": args.seconds, "records": args.records, "sqlite": "WAL, synchronous=FULL",
                                 "postgres": "15, fsync on, synchronous_commit on (defaults), same machine over TCP"}}
    with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp:
        if not args.no_postgres:
            cluster = None if args.postgres_url else temporary_postgres()
            if args.postgres_url or cluster:
                try:
                    url = args.postgres_url or cluster.url(cluster.createdb())
                    result.update(postgres_runs(url, args.seconds, Path(tmp)))
                finally:
                    if cluster:
                        cluster.remove()
            else:
                print("Postgres runs skipped: no Postgres server programs (apt-get install postgresql)")
        if args.no_sqlite:
            write_result("feedback-postgres", result)
            return
        for writers in (1, 20):
            store = FeedbackStore(Path(tmp) / f"writes{writers}.sqlite3", FeedbackSettings())
            result[f"sustained_{writers}_writers"] = run = sustained(store, writers, args.seconds, texts)
            store.close()
            print(f"{writers:2d} writers: {run['turns_per_s']:8.1f} rated turns/s ({run['writes_per_s']:.1f} writes/s); "
                  f"log_turn holds the caller p50 {run['log_turn_hold_us_p50']} us, p99 {run['log_turn_hold_us_p99']} us")

        db = Path(tmp) / "export.sqlite3"
        store = FeedbackStore(db, FeedbackSettings())
        fill_s = fill(store, args.records, texts)
        result["fill"] = {"rated_turns": store.stats()["turns"], "seconds": round(fill_s, 1),
                          "db_mb": round(sum(p.stat().st_size for p in Path(tmp).glob("export.sqlite3*")) / 2**20, 1)}
        print(f"filled {result['fill']['rated_turns']:,} rated turns in {fill_s:.1f}s ({result['fill']['db_mb']} MB)")
        exports = {}
        for fmt in EXPORT_FORMATS:
            for redact in (True, False):
                started = time.perf_counter()
                records, counts = store.export(fmt, redact=redact)
                elapsed = time.perf_counter() - started
                key = f"{fmt}_{'redacted' if redact else 'raw'}"
                exports[key] = {"seconds": round(elapsed, 2), "records": len(records), "redacted": counts}
                print(f"export {key:18s} {elapsed:6.2f}s  {len(records):7,} records  {counts if redact else ''}")
        started = time.perf_counter()
        store.stats()
        result["stats_seconds"] = round(time.perf_counter() - started, 2)
        result["export"] = exports
        store.close()
    write_result("feedback", result)


if __name__ == "__main__":
    main()
