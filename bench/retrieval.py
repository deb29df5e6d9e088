"""Retrieval benchmark: ingest throughput on the DSTC9 12k FAQs, query latency (embedding + search) at 12k FAQs and
at 100k / 1M synthetic vectors, index build time and memory.

    .venv/bin/python bench/retrieval.py [--sizes 100000 1000000] [--queries 200] [--limit N]

Synthetic vectors are the real 12k FAQ vectors plus Gaussian noise (renormalised), so they keep the clustered shape of
real embeddings; HNSW's recall@10 against exact search is reported with its latency. Targets: p50 <= 20 ms at 12k,
<= 25 ms at 100k (query embedding included).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chatapp.benchutil import machine_info, write_result  # noqa: E402
from chatapp.config import REPO_ROOT, Settings  # noqa: E402
from chatapp.embeddings import load_embedder  # noqa: E402
from chatapp.retrieval import Retriever, build_faiss  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "mean_ms": round(float(ms.mean()), 2)}


def dialogue_queries(n: int) -> list[tuple[str, list[dict]]]:
    """Real questions in their conversations (DSTC11 dev), repeated to n."""
    rows = [json.loads(line) for line in (DATA / "dstc11_track5" / "val_faq_turns_dev.jsonl").read_text().splitlines()]
    out = []
    for d in rows:
        history = [{"role": "user" if t["speaker"] == "U" else "assistant", "content": t["text"]}
                   for t in d["context"][:-1]]
        out.append((d["query"], history))
    return (out * (n // len(out) + 1))[:n]


def bench_ingest(work: Path, limit: int | None) -> tuple[Retriever, dict]:
    knowledge = work / "knowledge"
    knowledge.mkdir(parents=True)
    lines = (DATA / "dstc9_track1" / "faq_kb.jsonl").read_text().splitlines()
    if limit:
        lines = lines[:limit]
    (knowledge / "faq_kb.jsonl").write_text("\n".join(lines) + "\n")
    settings = Settings(data_dir=work / "var")
    settings.retrieval.knowledge_dir = knowledge
    embedder = load_embedder("minilm")
    embedder.encode_passages(["warm up"])
    rss_before = rss_mb()
    started = time.perf_counter()
    retriever = Retriever.open(settings, embedder, progress=True)
    seconds = time.perf_counter() - started
    n_views = len(retriever.data.vectors)
    started = time.perf_counter()
    build_faiss(retriever.data.vectors, settings.retrieval.approximate_above)
    flat_build = time.perf_counter() - started
    started = time.perf_counter()
    reopened = Retriever.open(settings, embedder)  # load from disk, nothing to embed
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    (knowledge / "faq_kb.jsonl").open("a").write(
        json.dumps({"question": "Is there a night porter?", "answer": "Yes, all night.", "entity_name": "AVALON"}) + "\n")
    report = reopened.refresh()
    incremental = time.perf_counter() - started
    index_bytes = sum(p.stat().st_size for p in settings.index_dir.iterdir())
    return retriever, {
        "faqs": len(retriever), "embedded_texts": n_views, "seconds": round(seconds, 1),
        "faqs_per_s": round(len(retriever) / seconds, 1), "texts_per_s": round(n_views / seconds, 1),
        "flat_index_build_s": round(flat_build, 4), "load_from_disk_s": round(load_seconds, 2),
        "refresh_after_appending_one_faq_s": round(incremental, 1),
        "refresh_embedded_chunks": report.embedded_chunks,
        "rss_growth_mb": round(rss_mb() - rss_before, 1), "index_on_disk_mb": round(index_bytes / 2**20, 1),
    }


def bench_search_12k(retriever: Retriever, n: int) -> dict:
    queries = dialogue_queries(n)
    embedder = retriever.embedder
    for question, history in queries[:10]:
        retriever.search(question, history)
    embed, total = [], []
    for question, history in queries:
        t0 = time.perf_counter()
        embedder.encode_queries([question])
        t1 = time.perf_counter()
        retriever.search(question, history)
        t2 = time.perf_counter()
        embed.append(t1 - t0)
        total.append(t2 - t1)
    return {"queries": n, "full_search": percentiles(total), "query_embedding_alone": percentiles(embed),
            "index": type(retriever.data.index).__name__}


def synthetic(base: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        block = base[rng.integers(0, len(base), m)] + rng.normal(0, 0.04, (m, base.shape[1])).astype(np.float32)
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def bench_synthetic(retriever: Retriever, size: int, n_queries: int, approximate_above: int,
                    kind: str = "ivf") -> dict:
    vectors = synthetic(retriever.data.vectors, size)
    rss_before = rss_mb()
    started = time.perf_counter()
    index = build_faiss(vectors, approximate_above, kind)
    build = time.perf_counter() - started
    index_mb = rss_mb() - rss_before
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    embedder = retriever.embedder
    questions = [q for q, _ in dialogue_queries(n_queries)]
    qvecs = embedder.encode_queries(questions[:50])
    _, truth = exact.search(qvecs, 10)
    _, approx = index.search(qvecs, 10)
    recall = float(np.mean([len(set(a) & set(t)) / 10 for a, t in zip(approx, truth)]))
    total, search_only = [], []
    for q in questions:
        t0 = time.perf_counter()
        qv = embedder.encode_queries([q])
        t1 = time.perf_counter()
        index.search(qv, 100)  # the app gathers its top-100 candidates this way
        t2 = time.perf_counter()
        total.append(t2 - t0)
        search_only.append(t2 - t1)
    result = {"vectors": size, "index": type(index).__name__, "build_s": round(build, 1),
              "index_rss_mb": round(index_mb, 1), "recall@10_vs_exact": round(recall, 3),
              "embedding_plus_search": percentiles(total), "search_only": percentiles(search_only)}
    del exact, index, vectors
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--limit", type=int, help="ingest only the first N FAQs (quick run)")
    parser.add_argument("--hnsw", action="store_true", help="also build HNSW at the first size (slow on 2 cores)")
    args = parser.parse_args()
    settings = Settings()
    load_at_start = os.getloadavg()
    print(json.dumps(machine_info()), f"load average {load_at_start}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    try:
        retriever, ingest = bench_ingest(work, args.limit)
        print("ingest", json.dumps(ingest), flush=True)
        at_12k = bench_search_12k(retriever, args.queries)
        print("search at 12k", json.dumps(at_12k), flush=True)
        scaled = []
        for size in args.sizes:
            scaled.append(bench_synthetic(retriever, size, args.queries, settings.retrieval.approximate_above))
            print("synthetic", json.dumps(scaled[-1]), flush=True)
        if args.hnsw and args.sizes:
            scaled.append(bench_synthetic(retriever, args.sizes[0], args.queries,
                                          settings.retrieval.approximate_above, "hnsw"))
            print("synthetic", json.dumps(scaled[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result("retrieval", {
        "load_average_at_start": load_at_start, "embedder": "minilm",
        "ingest_dstc9": ingest, "search_12k_faqs": at_12k, "synthetic": scaled,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "targets": {"p50_ms_at_12k": 20, "p50_ms_at_100k": 25},
    })


if __name__ == "__main__":
    main()
