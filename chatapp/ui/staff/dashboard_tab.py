"""The Dashboard tab: how the bot is doing (counts, thumbs-up rate over time, most down-voted questions, handoffs,
latency) and the training-data export.

Wiring only: figures come from `bot.feedback.stats()`, files from `bot.feedback.export()`. Export is redacted unless
an admin (`bot.is_admin(request)`) explicitly ticks "raw"; the check is made again on the server when exporting, so
hiding the box is a convenience, not the guard. User text (questions, answers) is shown in plain-text table cells
or escaped, never as HTML.
"""
from __future__ import annotations

import html
import tempfile
import time
from datetime import datetime
from pathlib import Path

import gradio as gr
import pandas as pd

from chatapp.feedback import EXPORT_FORMATS, FeedbackError, write_jsonl

PERIODS = [("Last 24 hours", "1"), ("Last 7 days", "7"), ("Last 30 days", "30"), ("All time", "all")]
DOWNVOTED_COLUMNS = ["Question", "Thumbs down", "Thumbs up", "Last down-voted answer"]
HANDOFF_COLUMNS = ["Kind", "Reason", "Count"]
NO_RAW = "🔒 Only administrators can export without redaction. Nothing was exported."


def _escape(text: object) -> str:
    return html.escape(str(text), quote=False)


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"


def _health_banner(problem: str | None) -> dict:
    if not problem:
        return gr.update(value="", visible=False)
    return gr.update(value=f"⚠️ **Feedback log problem:** {_escape(problem)}", visible=True)


def _since(period: str) -> float | None:
    return None if period == "all" else time.time() - float(period) * 86400


def build(bot) -> None:
    """Lay out the tab inside the caller's `gr.Tab`."""
    store = bot.feedback
    if store is None:
        gr.Markdown("⚠️ The feedback log is unavailable: " + _escape(getattr(bot, "problems", {}).get("feedback", "")))
        return

    health = gr.Markdown(visible=False, elem_id="dashboard-health")
    with gr.Row():
        period = gr.Dropdown(PERIODS, value="30", label="Period", elem_id="dashboard-period", scale=3)
        refresh_btn = gr.Button("↻ Refresh", size="sm", elem_id="dashboard-refresh", scale=1)
    counts = gr.Markdown(elem_id="dashboard-counts")
    with gr.Row():
        plot = gr.LinePlot(x="day", y="thumbs_up_rate", y_lim=[0, 1], title="Thumbs-up rate per day",
                           x_title="day", y_title="thumbs-up rate", elem_id="dashboard-plot", scale=2)
        latency = gr.Markdown(elem_id="dashboard-latency")
    downvoted = gr.Dataframe(headers=DOWNVOTED_COLUMNS, datatype="str", interactive=False, wrap=True,
                             label="Most down-voted questions", elem_id="dashboard-downvoted")
    handoffs = gr.Dataframe(headers=HANDOFF_COLUMNS, datatype="str", interactive=False,
                            label="Handoffs to a person", elem_id="dashboard-handoffs")
    operator = gr.Markdown(elem_id="dashboard-operator")

    with gr.Accordion("Export training data", open=False, elem_id="dashboard-export"):
        with gr.Row():
            fmt = gr.Radio(list(EXPORT_FORMATS), value="sft", label="Format", elem_id="export-format",
                           info="sft/dpo/kto: TRL; sharegpt: LLaMA-Factory")
            since = gr.Textbox(label="Ratings given since (YYYY-MM-DD, empty = all)", elem_id="export-since")
        raw = gr.Checkbox(False, label="Raw: do NOT redact personal data (admins only)", visible=False,
                          elem_id="export-raw")
        export_btn = gr.Button("Export", variant="primary", elem_id="export-button")
        export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
        export_note = gr.Markdown(elem_id="export-note")

    def refresh(period_value: str, request: gr.Request):
        raw_box = gr.update(visible=bot.is_admin(request))
        try:
            figures = store.stats(since=_since(period_value))
        except FeedbackError as exc:
            empty = pd.DataFrame({"day": pd.to_datetime([]), "thumbs_up_rate": []})
            return (_health_banner(store.health() or str(exc)), "No figures: the database cannot be read.", empty,
                    "", [], [], raw_box)
        rate = "–" if figures["up_rate"] is None else f"{figures['up_rate']:.0%}"
        table = "\n".join([
            "| Turns | Sessions | Rated | Thumbs up | Thumbs down | Thumbs-up rate | Corrections | Curated answers | Replaced by the guard | Handoffs asked | Handoffs offered |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {figures['turns']:,} | {figures['sessions']:,} | {figures['rated']:,} | {figures['up']:,} | "
            f"{figures['down']:,} | {rate} | {figures['corrections']:,} | {figures['curated']:,} | "
            f"{figures['guard_replaced']:,} | {figures['handoffs_requested']:,} | {figures['handoffs_offered']:,} |",
        ])
        if figures["unsaved"]:
            table += f"\n\n⚠️ {figures['unsaved']:,} writes are waiting in the spill file to be saved."
        days = [d for d in figures["daily"] if d["up_rate"] is not None]
        frame = pd.DataFrame({"day": pd.to_datetime([d["day"] for d in days]),
                              "thumbs_up_rate": [d["up_rate"] for d in days],
                              "rated": [d["up"] + d["down"] for d in days]})
        lat = figures["latency_ms"]
        latency_text = "\n".join([
            "**Latency**", "", "| | p50 | p95 |", "|---|---|---|",
            f"| First token | {_ms(lat['first_token_p50'])} | {_ms(lat['first_token_p95'])} |",
            f"| Whole answer | {_ms(lat['total_p50'])} | {_ms(lat['total_p95'])} |",
            "", f"{lat['measured']:,} answers measured.",
        ])
        worst = [[_cut(g["question"]), g["down"], g["up"], _cut(g["last_answer"])] for g in figures["most_downvoted"]]
        reasons = [[h["kind"], _cut(h["reason"] or "(none given)"), h["count"]] for h in figures["handoff_reasons"]]
        return _health_banner(figures["health"]), table, frame, latency_text, worst, reasons, raw_box

    outputs = [health, counts, plot, latency, downvoted, handoffs, raw]
    gr.on(triggers=None, fn=refresh, inputs=[period], outputs=outputs, api_name="dashboard_refresh")  # load + change
    refresh_btn.click(refresh, inputs=[period], outputs=outputs, api_name=False)

    def operator_figures(period_value: str) -> str:
        inbox = getattr(bot, "inbox", None)
        return _operator_table(inbox.figures(_since(period_value) or 0.0)) if inbox is not None else ""

    gr.on(triggers=None, fn=operator_figures, inputs=[period], outputs=[operator], api_name=False)
    refresh_btn.click(operator_figures, inputs=[period], outputs=[operator], api_name=False)

    def export(fmt_value: str, since_text: str, raw_value: bool, request: gr.Request):
        if raw_value and not bot.is_admin(request):
            return None, NO_RAW
        try:
            since_value = datetime.fromisoformat(since_text.strip()) if since_text and since_text.strip() else None
        except ValueError:
            return None, f"❌ Not a date: `{_escape(since_text)}`. Use YYYY-MM-DD (or leave it empty)."
        try:
            records, redacted = store.export(fmt_value, since=since_value, redact=not raw_value)
        except (FeedbackError, ValueError) as exc:
            return None, f"❌ {_escape(exc)}"
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"feedback-{fmt_value}-{stamp}{'-RAW' if raw_value else ''}.jsonl"
        path = write_jsonl(records, Path(tempfile.mkdtemp(prefix="chatapp-export-")) / name)
        if raw_value:
            note = "⚠️ **Raw export: personal data was NOT redacted.**"
        else:
            found = ", ".join(f"{kind} {n:,}" for kind, n in sorted(redacted.items())) or "nothing found"
            note = f"Redacted: {_escape(found)}."
        return str(path), f"{len(records):,} {fmt_value} records. {note}"

    export_btn.click(export, inputs=[fmt, since, raw], outputs=[export_file, export_note], api_name="dashboard_export")


def _operator_table(figures: dict) -> str:
    """Containment, handoff rate, time to the first human reply and satisfaction, per day and for the period."""
    def pct(value):
        return "–" if value is None else f"{value:.0%}"

    def secs(value):
        return "–" if value is None else f"{value:,.0f} s"

    def row(label: str, f: dict) -> str:
        csat = "–" if f["csat"] is None else f"{f['csat']:.1f} / 5 ({f['csat_n']})"
        return (f"| {label} | {f['conversations']:,} | {pct(f['containment'])} | {pct(f['handoff_rate'])} | "
                f"{secs(f['first_reply_p50_s'])} | {secs(f['first_reply_p95_s'])} | {csat} |")

    lines = ["**Conversations and people**", "",
             "| | Conversations | Containment (no person) | Handoff rate | First human reply p50 | p95 | Satisfaction |",
             "|---|---|---|---|---|---|---|", row("**Period**", figures["period"])]
    lines += [row(day, f) for day, f in sorted(figures["days"].items(), reverse=True)]
    return "\n".join(lines)
