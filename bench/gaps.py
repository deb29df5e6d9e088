"""Knowledge-gap grouping: how the distance threshold was picked, and what it gives on held-out questions.

BANKING77 queries stand in for unanswered questions. The threshold is swept on random 3,080-question samples of the
*train* split (the size of the test split), choosing the best mean adjusted Rand index among thresholds whose mean
purity is at least 0.75; then the test split is grouped once with it (the grouping is never told the intent count).

    .venv/bin/python bench/gaps.py [--samples 3] [--size 3080]
"""
from __future__ import annotations

import argparse
import csv
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from chatapp.benchutil import write_result
from chatapp.embeddings import load_embedder
from chatapp.gaps import BANKING77, THRESHOLD, group, purity

SWEEP = (0.36, 0.38, 0.40, 0.41, 0.42, 0.43, 0.44, 0.46, 0.48)


def load(split: str) -> tuple[list[str], list[str]]:
    with open(BANKING77 / f"{split}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--size", type=int, default=3080)
    args = parser.parse_args()
    embedder = load_embedder("minilm")
    texts, intents = load("train")
    rng = np.random.default_rng(7)
    samples = [rng.choice(len(texts), min(args.size, len(texts)), replace=False) for _ in range(args.samples)]
    wanted = np.unique(np.concatenate(samples))
    vectors = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    vectors[wanted] = embedder.encode_queries([texts[i] for i in wanted])
    sweep = []
    for threshold in SWEEP:
        scores = []
        for sample in samples:
            labels = group(vectors[sample], threshold)
            truth = [intents[i] for i in sample]
            scores.append((labels.max() + 1, adjusted_rand_score(truth, labels), purity(truth, labels)))
        topics, ari, pure = np.mean(scores, axis=0)
        sweep.append({"threshold": threshold, "topics": round(float(topics), 1), "ari": round(float(ari), 3),
                      "purity": round(float(pure), 3)})
        print(f"train  threshold {threshold:.2f}: topics {topics:6.1f}  ARI {ari:.3f}  purity {pure:.3f}", flush=True)
    eligible = [s for s in sweep if s["purity"] >= 0.75] or sweep
    chosen = max(eligible, key=lambda s: s["ari"])["threshold"]
    print(f"chosen on train: {chosen} (shipped: {THRESHOLD})")

    test_texts, test_intents = load("test")
    started = time.perf_counter()
    test_vectors = embedder.encode_queries(test_texts)
    embedded = time.perf_counter()
    labels = group(test_vectors, chosen)
    seconds = time.perf_counter() - embedded
    test = {"questions": len(test_texts), "topics": int(labels.max()) + 1,
            "ari": round(float(adjusted_rand_score(test_intents, labels)), 3),
            "purity": round(purity(test_intents, labels), 3), "group_seconds": round(seconds, 2),
            "embed_seconds": round(embedded - started, 1)}
    print(f"test   threshold {chosen:.2f}: topics {test['topics']}  ARI {test['ari']:.3f}  "
          f"purity {test['purity']:.3f}  grouping {seconds:.2f} s")
    write_result("gaps", {"sweep": sweep, "chosen": chosen, "test": test})


if __name__ == "__main__":
    main()
