"""Rebuild the shipped few-shot example banks from the real data in ../shared/data (see prompts/NOTICE).

    .venv/bin/python prompts/build_examples.py [--data /work/shared/data]

Why a script: the banks are derived data, so they must be reproducible and their split auditable. DSTC11 examples
come only from the first `DSTC11_BANK_ROWS` lines of val_faq_turns_dev.jsonl; bench/prompts.py evaluates on the
lines after them, so no benchmark item is ever shown to the model as an example.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DSTC11_BANK_ROWS = 100  # dev lines [0, 100) may feed the bank; bench/prompts.py uses lines [100, 218)

# Hand-picked ABCD turns (customer message -> agent reply), quoted verbatim from abcd_sample.json and checked
# against it below; the context is the guideline text an agent would have looked up (guidelines.json, verbatim).
ABCD_PICKS = [
    (9489, "just wanted to check on the status of a refund",
     ["sure, would you give me your full name or account ID"],
     "Get Full Name or Account ID for [Pull up Account]"),
    (3592, "Hi! I need to return an item, can you help me with that?",
     ["sure, may I have your name please?"],
     "All chats in this flow start by asking the customer for their full name or Account ID"),
    (3695, "I've got a promo code and I want to know when they expire.",
     ["Ok, all promo codes expire after 7 days without fail."],
     "Typically promotions only last 7 days so check if the code was issued a long time ago."),
    (3592, "What if I ask really, really nicely?",
     ["I can escalate to my manager if you'd like", "I'd just need your phone number."],
     "Explain that you have escalated the issue to the manager"),
    (9489, "great thanks for your help", ["a pleasure to help you", "have a nice day"], ""),
]

REVIEW_WORDS = re.compile(r"review|guest|people|customer|diner|visitor|patron|opinion", re.I)


def abcd_examples(data: Path) -> list[dict]:
    chats = {c["convo_id"]: c["original"] for c in json.loads((data / "abcd/abcd_sample.json").read_text())}
    guidelines = json.dumps(json.loads((data / "abcd/guidelines.json").read_text()), ensure_ascii=False)
    out = []
    for convo, question, replies, context in ABCD_PICKS:
        turns = chats[convo]
        assert ["customer", question] in turns, (convo, question)
        assert all(["agent", r] in turns for r in replies), (convo, replies)
        assert context in guidelines, context
        # consecutive agent messages joined into one reply; only capitalisation and full stops added
        answer = " ".join(r[0].upper() + r[1:] + ("" if r[-1] in ".?!" else ".") for r in replies)
        out.append({"id": f"abcd-{convo}-{turns.index(['customer', question])}", "question": question,
                    "context": context, "answer": answer, "source": f"abcd:{convo}"})
    return out


def dstc11_examples(data: Path) -> list[dict]:
    """Grounded replies whose facts come from the gold FAQ (replies citing reviews are skipped: the context we
    show holds only the FAQ, and an example answering beyond its context would teach the model to invent)."""
    folder = data / "dstc11_track5"
    faq = {r["id"]: r for r in map(json.loads, (folder / "faq_kb.jsonl").read_text().splitlines())}
    rows = [json.loads(line) for line in (folder / "val_faq_turns_dev.jsonl").read_text().splitlines()]
    out = []
    for row in rows[:DSTC11_BANK_ROWS]:
        if REVIEW_WORDS.search(row["response"]):
            continue
        gold = [faq[i] for i in row["gold_faq_ids"]]
        context = "\n".join(f"- {g['entity_name'].title()}: {g['question']} {g['answer']}" for g in gold)
        out.append({"id": f"dstc11-{row['val_index']}", "question": row["query"].strip(), "context": context,
                    "answer": row["response"].strip(), "source": f"dstc11:val_index={row['val_index']}"})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path}: {len(rows)} examples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = parser.parse_args()
    (HERE / "examples").mkdir(exist_ok=True)
    write_jsonl(HERE / "examples" / "support.jsonl", abcd_examples(args.data) + dstc11_examples(args.data))


if __name__ == "__main__":
    main()
