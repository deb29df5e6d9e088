"""The gate's correctness part: shop questions with key facts, answered through the serving pipeline's own steps
(retrieval, evidence, the live template) by each model under test, greedy.

ROUGE-L on 16 items once rose while correctness fell, so promotion is decided here: the candidate's answers must be
right at least as often as the reference's and make unsupported claims no more often. Retrieval and evidence do not
depend on the adapter, so prompts are built once and only generation is repeated per model. Scored on the model's own
answer (before the guard): the fallback is a safety net, the dialogue model itself must be right.
"""
from __future__ import annotations

import logging
from pathlib import Path

from chatapp.config import Settings
from chatapp.guard import unsupported

log = logging.getLogger(__name__)


def gate_questions(settings: Settings) -> list[dict]:
    """The question file's items in languages the model answers in (a Chinese question on an English-only model
    gets a fixed reply, whatever the adapter); none when the file is missing (the check is then skipped)."""
    from chatapp.answer_eval import DEFAULT_DATA, EvalDataError, load_items
    from chatapp.lexical import language
    from chatapp.model import PROFILES

    path = Path(settings.tuning.gate_questions) if settings.tuning.gate_questions else DEFAULT_DATA
    try:
        items = load_items(path)
    except EvalDataError as exc:
        log.info("gate without answer correctness: %s", exc)
        return []
    profile = PROFILES.get(settings.model.name)
    spoken = set((settings.model.languages or (profile.languages if profile else "en")).split(","))
    return [i for i in items if language(" ".join(i["turns"])) in spoken]


def prepare(settings: Settings, prompts, retriever, items: list[dict]) -> list[dict]:
    """One prompt per item (its last turn; earlier turns as history), the texts its claims may rest on, its facts."""
    from chatapp.evidence import EvidenceSelector

    selector = EvidenceSelector(retriever.embedder, k=settings.answer.evidence_units,
                                per_chunk=settings.answer.evidence_per_chunk)
    prepared = []
    for item in items:
        history = [m for turn in item["turns"][:-1] for m in ({"role": "user", "content": turn},
                                                              {"role": "assistant", "content": "I see."})]
        question = item["turns"][-1]
        hits = retriever.search(question, history).hits
        chinese = any("\u3400" <= c <= "\u9fff" for c in question)
        evidence = selector.select(question, history, hits,
                                   k=settings.answer.evidence_units_cross_lingual if chinese else None)
        template = settings.prompts.template_zh if chinese else None
        name = template if template and template in prompts.names() else None
        messages = prompts.render(name, question=question, history=history, hits=evidence or hits,
                                  mode="zero_shot").messages
        references = [f"{h.title} {h.text} {h.answer or ''}" for h in hits] + list(item["turns"])
        prepared.append({"id": item["id"], "messages": messages, "references": references, "facts": item["facts"]})
    return prepared


def score(prepared: list[dict], answers: list[str]) -> dict:
    from chatapp.answer_eval import is_correct

    items = []
    for item, answer in zip(prepared, answers):
        _, missing = unsupported(answer, item["references"])
        items.append({"id": item["id"], "answer": answer, "correct": is_correct(answer, item["facts"]),
                      "unsupported": [c.text for c in missing]})
    n = max(len(items), 1)
    return {"answer_accuracy": sum(i["correct"] for i in items) / n if items else None,
            "unsupported_rate": sum(bool(i["unsupported"]) for i in items) / n if items else None,
            "question_items": items}
