"""Answer correctness of every candidate configuration, side by side in one run, one table.

Each configuration is one `chatapp eval answers` process (greedy decoding, the shop questions of
../shared/data/shop_qa/dev.jsonl), so no run inherits another's memory or threads:
- each model profile with its base weights (`--adapter none`) and, where one exists for it, the shipped adapter;
- the multilingual setups: Qwen2.5-Coder-0.5B + the e5 embedder for everything, and the default model for English with
  Qwen for Chinese questions only (`--chinese-model`); Chinese questions are answered with `support_zh`;
- the extractive answerer alone (no model: the top one or two evidence units quoted).

    .venv/bin/python bench/answers.py [--only NAME ...] [--data FILE] [--dstc11 30]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from chatapp.benchutil import machine_info, write_result
from chatapp.config import REPO_ROOT

# name -> (flags before `eval answers`, flags after it, the data dir it shares with configurations of its embedder)
CONFIGS: dict[str, tuple[list[str], list[str], str]] = {
    "smollm2 base": (["--model", "smollm2", "--adapter", "none"], [], "minilm"),
    "smollm2 shipped adapter": (["--model", "smollm2"], [], "minilm"),
    "qwen-0.5b base": (["--model", "qwen-coder-0.5b", "--adapter", "none"], [], "minilm"),
    "qwen-0.5b base + e5 (multilingual)": (["--model", "qwen-coder-0.5b", "--adapter", "none", "--embedder", "e5"],
                                           [], "e5"),
    "smollm2 shipped + e5": (["--model", "smollm2", "--embedder", "e5"], [], "e5"),
    "smollm2 shipped, qwen for Chinese, e5 (multilingual)": (
        ["--model", "smollm2", "--embedder", "e5", "--chinese-model", "qwen-coder-0.5b"], [], "e5"),
    "extractive, top 1 unit": ([], ["--extractive", "1"], "minilm"),
    "extractive, top 2 units": ([], ["--extractive", "2"], "minilm"),
}


def run(name: str, data: Path, dstc11: int, work: Path) -> dict:
    before, after, embedder = CONFIGS[name]
    out = work / f"{name.replace(' ', '_').replace('/', '_')}.json"
    command = [sys.executable, "-m", "chatapp.cli", "--data-dir", str(work / embedder), *before, "eval", "answers",
               "--data", str(data), "--dstc11", str(dstc11), "--out", str(out), *after]
    print(f"\n== {name}: {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, text=True, capture_output=True)
    lines = [line for line in done.stdout.splitlines() if not line.startswith("  ")]
    print("\n".join(lines[-4:]), flush=True)
    if done.returncode != 0 or not out.exists():
        print(done.stderr[-3000:], file=sys.stderr)
        return {"error": f"exit {done.returncode}", "stderr": done.stderr[-3000:]}
    result = json.loads(out.read_text(encoding="utf-8"))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def table(results: dict[str, dict]) -> str:
    head = ("| configuration | accuracy | en | zh | unsupported | guard replaced | handoff | first token p50/p95 | "
            "answer p50/p95 | DSTC11 FAQ agreement |")
    rows = [head, "|" + "---|" * 10]
    f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for name, r in results.items():
        if "summary" not in r:
            rows.append(f"| {name} | {r.get('error')} |" + " |" * 8)
            continue
        s, d = r["summary"], r.get("dstc11") or {}
        langs = s["by_language"]
        rows.append(
            f"| {name} | {s['accuracy']:.3f} | {f(langs.get('en', {}).get('accuracy'))} | "
            f"{f(langs.get('zh', {}).get('accuracy'))} | {s['unsupported_claim_rate']:.3f} | "
            f"{s['guard_replaced_rate']:.3f} | {s['handoff_rate']:.3f} | {f(s['first_token_s']['p50'])} / "
            f"{f(s['first_token_s']['p95'])} s | {f(s['answer_s']['p50'])} / {f(s['answer_s']['p95'])} s | "
            f"{f(d.get('faq_agreement'))} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=list(CONFIGS), help="run only this configuration")
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "shop_qa" / "dev.jsonl")
    parser.add_argument("--dstc11", type=int, default=30, help="DSTC11 dev turns per configuration (0 = skip)")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "var" / "bench-answers")
    parser.add_argument("--result", default="answers", help="name of the JSON under bench/results/")
    args = parser.parse_args()
    print(json.dumps(machine_info()))
    results = {name: run(name, args.data, args.dstc11, args.work) for name in (args.only or CONFIGS)}
    print("\n" + table(results))
    summaries = {k: {"model": v.get("model"), "adapter": v.get("adapter"), "summary": v.get("summary"),
                     "dstc11": {m: x for m, x in (v.get("dstc11") or {}).items() if m != "answers"},
                     "seconds": v.get("seconds"), "error": v.get("error")} for k, v in results.items()}
    path = write_result(args.result, {"data": str(args.data), "decoding": "greedy", "answers_in": str(args.work),
                                      "table": table(results), "results": summaries})
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
