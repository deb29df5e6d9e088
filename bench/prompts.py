"""Prompt templates: render+select latency, and zero-shot vs few-shot answer quality on DSTC11 dev turns.

    .venv/bin/python bench/prompts.py                 # latency + quality (30 turns, ~10 min on 2 cores)
    .venv/bin/python bench/prompts.py --turns 0       # latency only
    .venv/bin/python bench/prompts.py --configs support:zero_shot support:few_shot support_few_shot:few_shot

Quality: for each dev turn the dialogue before the last user message is the history, the last user message is the
question, and the top-3 hits of the product's retriever (chatapp.retrieval over a knowledge folder holding all 2,869
DSTC11 FAQs) are the context -- the same context in every configuration, so only the prompt differs. The generated answer
(greedy, at most 80 new tokens, the default model) is scored against the human `response` with ROUGE-L F1 and the
MiniLM cosine similarity. Only dev lines >= prompts/build_examples.DSTC11_BANK_ROWS are used: the few-shot bank is
built from the lines before them, so no evaluated turn is ever shown as an example.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chatapp.benchutil import write_result  # noqa: E402
from chatapp.config import Settings  # noqa: E402
from chatapp.embeddings import load_embedder  # noqa: E402
from chatapp.prompts import PromptManager  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "dstc11_track5"

from chatapp.tuning import rouge_l  # noqa: E402  (one ROUGE-L for the gate and this benchmark)


def bank_rows() -> int:
    spec = importlib.util.spec_from_file_location("build_examples", ROOT / "prompts" / "build_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DSTC11_BANK_ROWS


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    return {"mean": round(statistics.mean(values), 3), "p50": round(pick(0.5), 3), "p95": round(pick(0.95), 3)}


def dev_turns() -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "val_faq_turns_dev.jsonl").read_text().splitlines()]
    return rows[bank_rows():]


def history_of(row: dict) -> list[dict]:
    turns = row["context"][:-1]  # the last context turn is the query itself
    return [{"role": "user" if t["speaker"] == "U" else "assistant", "content": t["text"]} for t in turns]


def open_retriever(embedder, folder: Path):
    """The product's retriever over a knowledge folder holding a copy of the DSTC11 FAQs (2,869 entries)."""
    from chatapp.retrieval import Retriever

    (folder / "knowledge").mkdir()
    shutil.copy(DATA / "faq_kb.jsonl", folder / "knowledge" / "faq_kb.jsonl")
    settings = Settings(data_dir=folder / "var")
    settings.retrieval.knowledge_dir = folder / "knowledge"
    settings.retrieval.top_k = 3
    return Retriever.open(settings, embedder)


def bench_latency(prompts: PromptManager, rows: list[dict], hits_for) -> dict:
    """Render+select per call. 'new_question' includes embedding the question for example selection; 'repeat' is
    the same questions again (query embedding cached). Cold = the first few-shot render (embeds the bank)."""
    out: dict = {}
    started = time.perf_counter()
    prompts.render("support", question="warm up", history=[], hits=[], mode="few_shot")
    out["cold_first_few_shot_render_ms"] = round((time.perf_counter() - started) * 1000, 1)
    questions = [r["query"] for r in rows]
    for template, mode in (("support", "zero_shot"), ("support", "few_shot"), ("support", "auto"),
                           ("support_few_shot", "few_shot"), ("support_zh", "few_shot")):
        fresh = [f"{q} ({template} {mode})" for q in questions]  # never embedded before
        for label, qs in (("new_question", fresh), ("repeat", fresh)):
            times = []
            for row, question in zip(rows, qs):
                hits, history = hits_for(row), history_of(row)
                started = time.perf_counter()
                prompts.render(template, question=question, history=history, hits=hits, mode=mode)
                times.append((time.perf_counter() - started) * 1000)
            out[f"{template}:{mode}:{label}_ms"] = percentiles(times)
    chosen = [prompts.render("support", question=r["query"], history=history_of(r), hits=hits_for(r)).mode
              for r in rows]
    out["support:auto_chose_few_shot"] = round(chosen.count("few_shot") / len(chosen), 3)
    return out


def bench_quality(prompts: PromptManager, rows: list[dict], hits_for, embedder, configs: list[str],
                  max_new_tokens: int) -> dict:
    from chatapp.model import load_model

    settings = Settings()
    model = load_model(settings)
    gen = replace(settings.generation, max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.1)
    results: dict = {"model": model.description, "generation": {"max_new_tokens": max_new_tokens, "greedy": True}}
    for config in configs:
        template, mode = config.split(":")
        rouge, cosine, tokens, seconds, lengths, examples, samples = [], [], [], [], [], [], []
        for row in rows:
            rendered = prompts.render(template, question=row["query"], history=history_of(row), hits=hits_for(row),
                                      mode=mode)
            tokens.append(model.count_tokens(rendered.messages))
            started = time.perf_counter()
            answer = "".join(model.stream(rendered.messages, gen)).strip()
            seconds.append(time.perf_counter() - started)
            rouge.append(rouge_l(answer, row["response"]))
            a, b = np.asarray(embedder.embed_documents([answer or ".", row["response"]]), dtype=np.float32)
            cosine.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
            lengths.append(len(answer.split()))
            examples.append(len(rendered.examples))
            if len(samples) < 3:
                samples.append({"question": row["query"], "reference": row["response"], "answer": answer,
                                "mode": rendered.mode})
        results[config] = {
            "turns": len(rows), "rouge_l_f1": round(statistics.mean(rouge), 4),
            "embedding_cosine": round(statistics.mean(cosine), 4),
            "prompt_tokens": percentiles(tokens), "answer_words_mean": round(statistics.mean(lengths), 1),
            "examples_per_prompt": round(statistics.mean(examples), 2),
            "seconds_per_answer": round(statistics.mean(seconds), 2), "samples": samples,
        }
        print(f"{config:28s} ROUGE-L {results[config]['rouge_l_f1']:.4f}  cosine "
              f"{results[config]['embedding_cosine']:.4f}  prompt tokens {results[config]['prompt_tokens']['mean']:.0f}"
              f"  {results[config]['seconds_per_answer']:.1f} s/answer", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=30, help="dev turns for the quality run (0 = latency only)")
    parser.add_argument("--latency-turns", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--configs", nargs="+",
                        default=["support:zero_shot", "support:few_shot", "support_few_shot:few_shot"],
                        help="template:mode pairs to compare")
    args = parser.parse_args()

    rows = dev_turns()
    embedder = load_embedder("minilm")
    with tempfile.TemporaryDirectory() as tmp:  # no saved versions or corrections leak into the figures
        prompts = PromptManager(Settings(data_dir=Path(tmp) / "prompts-var"), embedder)
        started = time.perf_counter()
        retriever = open_retriever(embedder, Path(tmp))
        index_seconds = time.perf_counter() - started
        cache: dict[int, list] = {}

        def hits_for(row: dict) -> list:
            if row["val_index"] not in cache:
                cache[row["val_index"]] = retriever.search(row["query"], history_of(row)).hits
            return cache[row["val_index"]]

        recall = statistics.mean(
            bool({f"faq_kb.jsonl#{g}" for g in row["gold_faq_ids"]} & {h.chunk_id for h in hits_for(row)})
            for row in rows[: args.turns or 30])
        result = {
            "split": f"DSTC11 val_faq_turns_dev.jsonl lines [{bank_rows()}, {bank_rows() + len(rows)}); few-shot bank "
                     f"built from lines [0, {bank_rows()})",
            "context": {"retriever": "chatapp.retrieval.Retriever over the 2,869 DSTC11 FAQs, top 3",
                        "gold_in_top3": round(recall, 3), "index_seconds": round(index_seconds, 1)},
            "load_average": os.getloadavg(),
            "latency": bench_latency(prompts, rows[: args.latency_turns], hits_for),
        }
        print(json.dumps(result["latency"], indent=1), flush=True)
        if args.turns:
            result["quality"] = bench_quality(prompts, rows[: args.turns], hits_for, embedder, args.configs,
                                              args.max_new_tokens)
    write_result("prompts", result)


if __name__ == "__main__":
    main()
