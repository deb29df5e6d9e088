"""The dashboard's feedback figures, computed the same way on SQLite and Postgres: counts in SQL, and what SQLite
and Postgres spell differently (the local day of a turn, the latest down-voted answer of a question) in Python."""
from __future__ import annotations

from collections import Counter
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from chatapp.feedback_export import percentile
from chatapp.storage.schema import handoffs, ratings, turns


def dashboard_figures(conn: Connection, since: float) -> dict:
    """Figures over turns created at or after ``since`` (epoch seconds; 0 = all)."""
    since = since or 0.0
    t, r = turns, ratings
    joined = r.join(t, r.c.message_id == t.c.message_id)
    n_turns, sessions, curated, offered, replaced = conn.execute(
        sa.select(sa.func.count(), sa.func.count(sa.distinct(t.c.session_id)),
                  sa.func.coalesce(sa.func.sum(t.c.curated), 0), sa.func.count(t.c.handoff),
                  sa.func.coalesce(sa.func.sum(t.c.guard_replaced), 0)).where(t.c.created_at >= since)).one()
    up, down, corrections = conn.execute(
        sa.select(_count_if(r.c.rating == 1), _count_if(r.c.rating == -1), sa.func.count(r.c.correction))
        .select_from(joined).where(t.c.created_at >= since)).one()
    # Per-turn figures are grouped here, not in SQL: the day is the app's local day on both engines.
    per_turn = conn.execute(
        sa.select(t.c.created_at, t.c.first_token_ms, t.c.total_ms, r.c.rating)
        .select_from(t.outerjoin(r, r.c.message_id == t.c.message_id)).where(t.c.created_at >= since)).all()
    rated = conn.execute(
        sa.select(t.c.user_message, r.c.rating, t.c.answer, t.c.message_id, t.c.created_at)
        .select_from(joined).where(t.c.created_at >= since, r.c.rating != 0)).all()
    requested = conn.execute(
        sa.select(sa.func.count()).select_from(handoffs).where(handoffs.c.created_at >= since)).scalar_one()
    reasons: Counter = Counter()
    for reason, n in conn.execute(sa.select(handoffs.c.reason, sa.func.count())
                                  .where(handoffs.c.created_at >= since).group_by(handoffs.c.reason)):
        reasons[("requested", reason)] += n
    for reason, n in conn.execute(sa.select(t.c.handoff, sa.func.count())
                                  .where(t.c.created_at >= since, t.c.handoff.is_not(None))
                                  .group_by(t.c.handoff)):
        reasons[("offered", reason)] += n
    days: dict[str, list[int]] = {}
    for created, _, _, rating in per_turn:
        day = days.setdefault(datetime.fromtimestamp(created).date().isoformat(), [0, 0, 0])
        day[0] += 1
        day[1] += rating == 1
        day[2] += rating == -1
    daily = [{"day": day, "turns": n, "up": u, "down": d, "up_rate": (u / (u + d)) if u + d else None}
             for day, (n, u, d) in sorted(days.items())]
    first_token = [row[1] for row in per_turn if row[1] is not None]
    total = [row[2] for row in per_turn if row[2] is not None]
    return {
        "since": since or None,
        "turns": n_turns,
        "sessions": sessions,
        "curated": curated,
        "guard_replaced": replaced,  # answers the faithfulness guard replaced (an unsupported claim)
        "rated": up + down,
        "up": up,
        "down": down,
        "up_rate": up / (up + down) if up + down else None,
        "corrections": corrections,
        "handoffs_requested": requested,
        "handoffs_offered": offered,
        "handoff_reasons": [
            {"kind": kind, "reason": reason, "count": n} for (kind, reason), n in reasons.most_common()
        ],
        "latency_ms": {
            "first_token_p50": percentile(first_token, 50),
            "first_token_p95": percentile(first_token, 95),
            "total_p50": percentile(total, 50),
            "total_p95": percentile(total, 95),
            "measured": len(total),
        },
        "daily": daily,
        "most_downvoted": _most_downvoted(rated),
    }


def _count_if(condition) -> sa.ColumnElement:
    """How many rows meet ``condition`` (SQLite and Postgres both: Postgres cannot sum booleans)."""
    return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)


def _most_downvoted(rows) -> list[dict]:
    """Questions down-voted most, same question = same text up to case and surrounding spaces/punctuation; each with
    its latest down-voted answer."""
    groups: dict[str, dict] = {}
    for question, rating, answer, message_id, created_at in rows:
        key = question.strip(" ?!.\t\n\r").lower()
        g = groups.setdefault(key, {"question": question, "down": 0, "up": 0, "last_answer": answer,
                                    "message_id": message_id, "last_down": None})
        if rating == 1:
            g["up"] += 1
        elif rating == -1:
            g["down"] += 1
            if g["last_down"] is None or created_at > g["last_down"]:
                g.update(question=question, last_answer=answer, message_id=message_id, last_down=created_at)
    ranked = sorted((g for g in groups.values() if g["down"] > 0),
                    key=lambda g: (-g["down"], g["up"], -(g["last_down"] or 0)))
    return ranked[:10]


def unanswered_turns(conn: Connection, since: float, limit: int) -> list[dict]:
    """Turns the bot did not answer well (handed off, guard-replaced, down-voted, corrected, answered by an agent,
    or followed by a request for a person), newest first: what chatapp/gaps.py groups into topics."""
    t, r = turns, ratings
    asked = sa.exists().where(handoffs.c.message_id == t.c.message_id)
    query = (sa.select(t.c.message_id, t.c.user_message.label("question"), t.c.answer, t.c.created_at, t.c.handoff,
                       t.c.retrieved, t.c.template, t.c.guard_replaced, r.c.rating, r.c.correction,
                       asked.label("asked"))
             .select_from(t.outerjoin(r, r.c.message_id == t.c.message_id))
             .where(t.c.created_at >= since, sa.func.trim(t.c.user_message) != "",
                    sa.or_(t.c.handoff.is_not(None), t.c.guard_replaced == 1, r.c.rating == -1,
                           r.c.correction.is_not(None), t.c.template == "agent", asked))
             .order_by(t.c.created_at.desc()).limit(limit))
    return [dict(row) for row in conn.execute(query).mappings()]
