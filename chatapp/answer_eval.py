"""`chatapp eval answers`: is the whole bot right? Correctness of answers, not how they read.

Each item of a shop_qa file (`{"id", "turns": [customer messages], "facts": [[spellings], ...]}`) is asked through
`Bot.answer` (retrieval, evidence, template, model, guard), turn by turn in one session. An answer is correct when it
contains, case-insensitively, at least one spelling of every fact group. Also measured: the unsupported-claim rate
(the final answer states an amount, percentage, duration, count, level or offer found in neither the cited passages
nor the conversation, by `guard.claims`), how often the guard replaced the model's answer, the handoff rate, and
first-token / whole-answer times. On DSTC11 dev turns (never trained on) the answer is compared with the gold FAQ
answer (MiniLM cosine) as well as the human reply (ROUGE-L).

Decoding is greedy by default so that two runs agree; `--temperature` measures the sampling the app uses.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chatapp.config import REPO_ROOT, Settings
from chatapp.guard import reference_texts, unsupported
from chatapp.lexical import language

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "shop_qa" / "dev.jsonl"
DSTC11_DIR = REPO_ROOT.parent / "shared" / "data" / "dstc11_track5"


class EvalDataError(ValueError):
    """The question file cannot be used; the message names the line."""


def load_items(path: Path) -> list[dict]:
    """shop_qa items; a malformed line stops the run with its number (a silently smaller set would mislead)."""
    if not path.exists():
        raise EvalDataError(f"{path} does not exist")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            turns, facts = item["turns"], item["facts"]
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)):
                raise ValueError("'turns' must be a non-empty list of messages")
            if not (isinstance(facts, list) and all(isinstance(g, list) and g for g in facts)):
                raise ValueError("'facts' must be a list of non-empty lists of spellings")
        except (ValueError, KeyError, TypeError) as exc:
            raise EvalDataError(f"{path}:{n}: {exc}") from None
        items.append({"id": str(item.get("id", n)), "turns": turns, "facts": facts})
    if not items:
        raise EvalDataError(f"{path} holds no questions")
    return items


def is_correct(answer: str, facts: list[list[str]]) -> bool:
    low = answer.lower()
    return all(any(str(s).lower() in low for s in group) for group in facts)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class Outcome:
    """One item's final answer and what produced it."""

    id: str
    language: str
    turns: list[str]
    answer: str
    correct: bool
    unsupported: list[str]
    replaced: bool
    handoff: str | None
    first_token_s: float | None
    total_s: float
    sources: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    guard: dict = field(default_factory=dict)


def ask(bot, turns: list[str], **generation: Any) -> tuple[Any, float | None, float]:
    """Ask every turn in one fresh session; the last reply with its first-token and total seconds."""
    from chatapp.bot import Session

    session, reply, first, total = Session(), None, None, 0.0
    for turn in turns:
        started, first = time.perf_counter(), None
        for reply in bot.answer(turn, session, **generation):
            if first is None and reply.text:
                first = time.perf_counter() - started
        total = time.perf_counter() - started
    return reply, first, total


def score_item(item: dict, reply, first: float | None, total: float) -> Outcome:
    _, missing = unsupported(reply.text, reference_texts([], reply.citations, item["turns"]))
    return Outcome(
        id=item["id"], language=language(" ".join(item["turns"])), turns=item["turns"], answer=reply.text,
        correct=is_correct(reply.text, item["facts"]), unsupported=[c.text for c in missing], replaced=reply.replaced,
        handoff=reply.handoff, first_token_s=first, total_s=total, sources=[h.chunk_id for h in reply.citations],
        evidence=[e.text for e in reply.evidence], guard=reply.guard,
    )


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    n = max(len(outcomes), 1)
    by_language = {}
    for lang in sorted({o.language for o in outcomes}):
        part = [o for o in outcomes if o.language == lang]
        by_language[lang] = {"n": len(part), "accuracy": sum(o.correct for o in part) / len(part)}
    firsts = [o.first_token_s for o in outcomes if o.first_token_s is not None]
    totals = [o.total_s for o in outcomes]
    return {
        "n": len(outcomes),
        "accuracy": sum(o.correct for o in outcomes) / n,
        "by_language": by_language,
        "unsupported_claim_rate": sum(bool(o.unsupported) for o in outcomes) / n,
        "guard_replaced_rate": sum(o.replaced for o in outcomes) / n,
        "handoff_rate": sum(o.handoff is not None for o in outcomes) / n,
        "first_token_s": {"p50": _pct(firsts, 0.5), "p95": _pct(firsts, 0.95)},
        "answer_s": {"p50": _pct(totals, 0.5), "p95": _pct(totals, 0.95)},
    }


def evaluate_items(bot, items: list[dict], progress: Callable[[Outcome], None] | None = None,
                   **generation: Any) -> tuple[dict, list[Outcome]]:
    outcomes = []
    for item in items:
        reply, first, total = ask(bot, item["turns"], **generation)
        outcomes.append(score_item(item, reply, first, total))
        if progress:
            progress(outcomes[-1])
    return summarise(outcomes), outcomes


def evaluate_dstc11(bot, settings: Settings, n: int, seed: int = 0, **generation: Any) -> dict[str, Any]:
    """Agreement with the gold FAQ answer on DSTC11 dev turns, answered from DSTC11's own FAQ knowledge."""
    from chatapp.bot import Bot, Session
    from chatapp.evaluate import _eval_settings, _messages
    from chatapp.tuning import rouge_l

    turns_file, kb_file = DSTC11_DIR / "val_faq_turns_dev.jsonl", DSTC11_DIR / "faq_kb.jsonl"
    if not turns_file.exists() or not kb_file.exists():
        return {"skipped": f"{DSTC11_DIR} not found"}
    rows = [json.loads(line) for line in turns_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    faq = {}
    for line in kb_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            faq[row["id"]] = row["answer"]
    dstc_settings = _eval_settings(settings, "dstc11", [kb_file])
    dstc_bot = Bot.create(dstc_settings, model=bot.model)
    dstc_bot.feedback = None
    embedder = dstc_bot.retriever.embedder
    agreement, rouge, answers = [], [], []
    for row in rows:
        session = Session(history=_messages(row["context"][:-1]))
        reply = None
        for reply in dstc_bot.answer(row["query"], session, **generation):
            pass
        gold = " ".join(faq.get(i, "") for i in row["gold_faq_ids"]).strip()
        vectors = embedder.encode_queries([reply.text or " ", gold or " "])
        agreement.append(float(vectors[0] @ vectors[1]))
        rouge.append(rouge_l(reply.text, row["response"]))
        answers.append({"query": row["query"], "answer": reply.text, "gold_faq": gold, "response": row["response"]})
    return {"n": len(rows), "faq_agreement": statistics.mean(agreement),
            "faq_agreement_share_0_6": sum(a >= 0.6 for a in agreement) / len(agreement),
            "rouge_l_vs_reply": statistics.mean(rouge), "answers": answers}


class ExtractiveAnswerer:
    """No model: the retrieved evidence quoted as the answer (the guard's fallback, measured on its own). Answers
    through the same retrieval, handoff rule and evidence selection as `Bot.answer`."""

    def __init__(self, settings: Settings, units: int):
        from chatapp.evidence import EvidenceSelector
        from chatapp.retrieval import Retriever

        self.retriever = Retriever.open(settings)
        self.selector = EvidenceSelector(self.retriever.embedder, k=settings.answer.evidence_units,
                                         per_chunk=settings.answer.evidence_per_chunk)
        self.units = units
        self.description = f"extractive (top {units} evidence units, no model)"

    def answer(self, question: str, session, **_: Any):
        from chatapp.bot import HANDOFF_REPLY, Reply
        from chatapp.evidence import extractive_answer

        search = self.retriever.search(question, session.history)
        evidence = self.selector.select(question, session.history, search.hits) if not search.handoff else []
        text = extractive_answer(evidence, n=self.units, language=language(question))
        reply = Reply(text or HANDOFF_REPLY, done=True, citations=search.hits, evidence=evidence,
                      handoff=None if text else (search.handoff or "low_confidence"))
        session.history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply.text}]
        yield reply


# ---------------------------------------------------------------------------------------------------------- CLI

def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Adds `answers` under `chatapp eval`."""
    from chatapp.evaluate import eval_targets

    parser = eval_targets(subparsers).add_parser("answers", help="answer correctness of the whole bot on shop questions")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"shop_qa JSONL (default {DEFAULT_DATA})")
    parser.add_argument("--model", default=argparse.SUPPRESS, help="model profile, .gguf file or HF folder")
    parser.add_argument("--adapter", default=argparse.SUPPRESS, help="adapter folder, registry version or 'none'")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--dstc11", type=int, default=30, help="DSTC11 dev turns to score (0 = skip)")
    parser.add_argument("--out", type=Path, help="JSON with every answer (default data_dir/eval/answers.json)")
    parser.add_argument("--extractive", type=int, metavar="UNITS", default=0,
                        help="no model: quote the top UNITS evidence units (the guard's fallback on its own)")
    parser.set_defaults(func=cmd_eval_answers)


def print_summary(label: str, summary: dict) -> None:
    f, a = summary["first_token_s"], summary["answer_s"]
    langs = ", ".join(f"{k} {v['accuracy']:.2f} ({v['n']})" for k, v in summary["by_language"].items())
    print(f"{label}: accuracy {summary['accuracy']:.3f} [{langs}]  unsupported claims "
          f"{summary['unsupported_claim_rate']:.3f}  guard replaced {summary['guard_replaced_rate']:.3f}  handoff "
          f"{summary['handoff_rate']:.3f}  first token p50 {_s(f['p50'])} p95 {_s(f['p95'])}  answer p50 "
          f"{_s(a['p50'])} p95 {_s(a['p95'])}")


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}s"


def cmd_eval_answers(settings: Settings, args: argparse.Namespace) -> int:
    from chatapp.bot import Bot

    try:
        items = load_items(args.data)
    except EvalDataError as exc:
        print(f"error: {exc}")
        return 2
    settings = copy.deepcopy(settings)
    if args.extractive:
        bot = ExtractiveAnswerer(settings, args.extractive)
        model, adapter, decoding = bot.description, None, "none"
        args.dstc11 = 0
    else:
        bot = Bot.create(settings)
        bot.feedback = None  # an evaluation is not customer feedback
        model, adapter = bot.model.description, bot.model.adapter_version
        decoding = "greedy" if args.temperature <= 0 else f"sampling, temperature {args.temperature:g}"
    print(f"model: {model}; adapter: {adapter or 'none'}; decoding: {decoding}; {len(items)} questions from "
          f"{args.data}")
    mark = {True: "✓", False: "✗"}
    summary, outcomes = evaluate_items(
        bot, items, temperature=args.temperature,
        progress=lambda o: print(f"  {mark[o.correct]} {o.id}: {o.answer[:110]!r}"
                                 + (" [replaced]" if o.replaced else "") + (f" [unsupported {o.unsupported}]"
                                                                              if o.unsupported else "")))
    print_summary("shop questions", summary)
    result: dict[str, Any] = {"model": model, "adapter": adapter,
                              "decoding": decoding, "data": str(args.data), "summary": summary,
                              "answers": [o.__dict__ for o in outcomes]}
    if args.dstc11 > 0:
        dstc = evaluate_dstc11(bot, settings, args.dstc11, temperature=args.temperature)
        result["dstc11"] = dstc
        if "skipped" not in dstc:
            print(f"DSTC11 dev ({dstc['n']} turns): agreement with the gold FAQ answer {dstc['faq_agreement']:.3f} "
                  f"(share >= 0.6: {dstc['faq_agreement_share_0_6']:.2f}); ROUGE-L vs the human reply "
                  f"{dstc['rouge_l_vs_reply']:.3f}")
    out = args.out or settings.data_dir / "eval" / "answers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    print(f"every answer written to {out}")
    return 0
