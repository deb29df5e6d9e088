"""Training records from rated turns (the `export` formats TRL and LLaMA-Factory read as they are) and the
small helpers around them. No database code: chatapp/feedback.py reads the rows and hands them here."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EXPORT_FORMATS = ("sft", "dpo", "kto", "sharegpt")


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    rank = (len(values) - 1) * pct / 100  # linear interpolation, as numpy's default
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def conversation(history: list[dict], user_message: str) -> list[dict]:
    """History + question as alternating user/assistant messages starting with the user (what chat templates
    and LLaMA-Factory accept): other roles are dropped, a leading greeting is dropped, same-role runs merged."""
    messages: list[dict] = []
    for m in [*history, {"role": "user", "content": user_message}]:
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant") or not isinstance(content, str):
            continue
        if not messages and role == "assistant":
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1] = {"role": role, "content": messages[-1]["content"] + "\n\n" + content}
        else:
            messages.append({"role": role, "content": content})
    return messages


def training_records(fmt: str, row: Mapping[str, Any], clean, with_meta: bool) -> list[dict]:
    """The records one rated turn gives in ``fmt`` (none, one, or two for KTO with a correction)."""
    answer, correction, rating = row["answer"], row["correction"], row["rating"]
    distinct_correction = bool(correction) and correction.strip() != answer.strip()
    good = (correction, "correction") if correction else (answer, "answer") if rating == 1 else None
    # (completion text, where it came from, KTO label) for each record this row gives
    if fmt in ("sft", "sharegpt"):
        wanted = [(good[0], good[1], True)] if good else []
    elif fmt == "dpo":
        wanted = [(correction, "correction", True)] if distinct_correction else []
    else:  # kto: thumbs, and a correction is a desirable completion too
        wanted = []
        if rating in (1, -1) and not (rating == 1 and correction):
            wanted.append((answer, "answer", rating == 1))
        if distinct_correction:
            wanted.append((correction, "correction", True))
    if not wanted:
        return []  # redact nothing that is not exported, so the counts describe the file

    history = json.loads(row["history"])
    prompt = [{"role": m["role"], "content": clean(m["content"])} for m in conversation(history, row["user_message"])]
    meta = None
    if with_meta:
        meta = {
            "message_id": row["message_id"],
            "session_id": row["session_id"],
            "created_at": row["created_at"],
            "user_message": clean(row["user_message"]),
            "retrieved": [{"chunk_id": str(r.get("chunk_id", "")), "score": float(r.get("score") or 0.0)}
                          for r in json.loads(row["retrieved"]) if isinstance(r, dict)],
            "template": row["template"],
            "template_version": row["template_version"],
            "mode": row["mode"],
            "model": row["model"],
            "adapter": row["adapter"],
            "curated": bool(row["curated"]),
            "rating": rating,
            "reason": clean(row["reason"]),
        }

    out: list[dict] = []
    for text, source, label in wanted:
        completion = [{"role": "assistant", "content": clean(text)}]
        if fmt == "sft":
            record: dict[str, Any] = {"messages": prompt + completion}
        elif fmt == "sharegpt":
            system = next((m.get("content", "") for m in json.loads(row["prompt_messages"])
                           if isinstance(m, dict) and m.get("role") == "system"), "")
            turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in prompt]
            record = {"conversations": turns + [{"from": "gpt", "value": completion[0]["content"]}],
                      "system": clean(system)}
        elif fmt == "dpo":
            record = {"prompt": prompt, "chosen": completion, "rejected": [{"role": "assistant", "content": clean(answer)}]}
        else:
            record = {"prompt": prompt, "completion": completion, "label": label}
        if meta is not None:
            record["meta"] = {**meta, "source": source}
        out.append(record)
    return out


def write_jsonl(records: list[dict], path: Path) -> Path:
    """Write records one JSON object a line, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
