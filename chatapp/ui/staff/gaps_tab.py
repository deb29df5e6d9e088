"""The Knowledge gaps tab: topics the bot keeps failing on, and the staff actions that close them (write the answer
into the knowledge base, dismiss, merge), plus editing a knowledge article.

Wiring only: topics and actions come from `chatapp.gaps.GapFinder`. Every action checks `bot.is_admin(request)` on
the server, in its handler (hiding a button is not a guard), so the tab can move into a staff console unchanged.
All user text is escaped before it reaches HTML; a refused or failed action says why and leaves the inputs as typed.
"""
from __future__ import annotations

import html
import time

import gradio as gr

from chatapp.gaps import GapFinder, Topic
from chatapp.knowledge_edit import KnowledgeEditError

PERIODS = [("Last 24 hours", "1"), ("Last 7 days", "7"), ("Last 30 days", "30"), ("All time", "all")]
NOT_ADMIN = "🔒 Only administrators can change the knowledge base. Nothing was changed."
TREND = {"rising": "↑ rising", "falling": "↓ falling", "steady": "→ steady"}


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _cut(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _since(period: str) -> float | None:
    return None if period == "all" else time.time() - float(period) * 86400


def _who(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None)


def topics_html(topics: list[Topic]) -> str:
    if not topics:
        return "<p>No unanswered questions in this period. 🎉</p>"
    rows = "".join(
        f"<tr><td>{t.count}</td><td>{_e(TREND[t.trend])} ({t.earlier} → {t.recent})</td>"
        f"<td>{_e(', '.join(t.keywords))}</td><td>{_e(_cut(t.label, 160))}</td></tr>" for t in topics)
    return ("<table class='gaps-table'><thead><tr><th>Questions</th><th>Trend (first half → second half)</th>"
            f"<th>Key words</th><th>Topic (its most central question)</th></tr></thead><tbody>{rows}</tbody></table>")


def details_html(topic: Topic | None) -> str:
    if topic is None:
        return ""
    reasons = ", ".join(f"{_e(r)} ×{n}" for r, n in sorted(topic.reasons.items(), key=lambda x: -x[1]))
    examples = "".join(
        f"<li><b>{_e(_cut(q['question']))}</b><br><i>Bot answered:</i> {_e(_cut(q['answer']))}</li>"
        for q in topic.questions[:5])
    passages = "".join(f"<li>{_e(p)} ×{n}</li>" for p, n in topic.passages) or "<li>none</li>"
    return (f"<h4>{_e(topic.label)}</h4><p>{topic.count} questions · {_e(TREND[topic.trend])} · {reasons}</p>"
            f"<p>Examples</p><ul>{examples}</ul><p>Passages the bot found</p><ul>{passages}</ul>")


def build(bot) -> None:
    """Lay out the tab inside the caller's `gr.Tab`."""
    if bot.feedback is None or bot.retriever is None:
        missing = "feedback log" if bot.feedback is None else "retriever"
        gr.Markdown(f"⚠️ Knowledge gaps are unavailable: no {missing}. "
                    + _e(" ".join(getattr(bot, "problems", {}).values())))
        return
    finder = GapFinder(bot.settings, bot.feedback, bot.retriever.embedder, bot.retriever)

    gr.Markdown("Questions the bot did not answer well (handoffs, low confidence, answers the guard replaced, "
                "thumbs-down, corrections), grouped by topic. Write the answer once: it becomes an FAQ entry and "
                "the next similar question finds it.")
    with gr.Row():
        period = gr.Dropdown(PERIODS, value="30", label="Period", elem_id="gaps-period", scale=3)
        refresh_btn = gr.Button("↻ Refresh", size="sm", elem_id="gaps-refresh", scale=1)
    status = gr.Markdown(elem_id="gaps-status")
    listing = gr.HTML(elem_id="gaps-list")
    topic = gr.Dropdown([], label="Topic", elem_id="gaps-topic", interactive=True, allow_custom_value=True)
    details = gr.HTML(elem_id="gaps-details")
    with gr.Group():
        question = gr.Textbox(label="Question (as the FAQ entry will ask it)", elem_id="gaps-question")
        answer = gr.Textbox(label="Answer (pre-filled from an agent's reply or a correction when there is one)", lines=5,
                            elem_id="gaps-answer")
        category = gr.Textbox(label="Category (optional)", elem_id="gaps-category")
        with gr.Row():
            save_btn = gr.Button("Save answer to the knowledge base", variant="primary", elem_id="gaps-save")
            dismiss_btn = gr.Button("Dismiss topic", elem_id="gaps-dismiss")
        with gr.Row():
            merge_with = gr.Dropdown([], label="Merge the topic above with", elem_id="gaps-merge-with", scale=3,
                                     allow_custom_value=True)
            merge_btn = gr.Button("Merge", elem_id="gaps-merge", scale=1)

    def listed(period_value: str, selected: str | None = None):
        try:
            topics = finder.topics(_since(period_value))
        except Exception as exc:  # the database or the state file: say so, keep the page usable
            return f"❌ {_e(exc)}", "", gr.update(choices=[], value=None), gr.update(choices=[], value=None), ""
        choices = [(f"{t.count}× {_cut(t.label, 80)}", t.topic_id) for t in topics]
        chosen = next((t for t in topics if t.topic_id == selected), None)
        count = sum(t.count for t in topics)
        return (f"{len(topics)} topics, {count} questions.", topics_html(topics),
                gr.update(choices=choices, value=chosen.topic_id if chosen else None),
                gr.update(choices=choices, value=None), details_html(chosen))

    list_outputs = [status, listing, topic, merge_with, details]

    def refresh(period_value: str, selected: str | None):
        return listed(period_value, selected)

    # Page load and a new period. Not the topic: saving clears it, and a refresh on that change would overwrite
    # the save's "✅ Saved" with a plain count.
    gr.on(triggers=None, fn=listed, inputs=[period], outputs=list_outputs, api_name="gaps_refresh")
    refresh_btn.click(refresh, inputs=[period, topic], outputs=list_outputs, api_name=False)

    def select(topic_id: str | None, period_value: str):
        if not topic_id:
            return "", gr.update(), gr.update()
        try:
            chosen = finder.find(topic_id, _since(period_value))
        except KnowledgeEditError as exc:
            return f"<p>❌ {_e(exc)}</p>", gr.update(), gr.update()
        return details_html(chosen), chosen.label, chosen.suggestion

    topic.input(select, inputs=[topic, period], outputs=[details, question, answer], api_name="gaps_select")

    def save(topic_id, question_text, answer_text, category_text, period_value, request: gr.Request):
        if not bot.is_admin(request):
            return (NOT_ADMIN, *[gr.update()] * 4)
        if not topic_id:
            return ("❌ Pick a topic first. Nothing was saved.", *[gr.update()] * 4)
        try:
            entry = finder.write_answer(topic_id, question_text, answer_text, _who(request),
                                        category_text or None, _since(period_value))
        except (KnowledgeEditError, OSError) as exc:
            return (f"❌ {_e(exc)}", *[gr.update()] * 4)
        listing_update = listed(period_value)
        return (f"✅ Saved as FAQ `{_e(entry)}` and indexed: the next similar question finds it. "
                f"{listing_update[0]}", *listing_update[1:])

    save_btn.click(save, inputs=[topic, question, answer, category, period], outputs=list_outputs,
                   api_name="gaps_save")

    def dismiss(topic_id, period_value, request: gr.Request):
        if not bot.is_admin(request):
            return (NOT_ADMIN, *[gr.update()] * 4)
        try:
            gone = finder.dismiss(topic_id or "", _who(request), _since(period_value))
        except KnowledgeEditError as exc:
            return (f"❌ {_e(exc)}", *[gr.update()] * 4)
        listing_update = listed(period_value)
        return (f"Dismissed “{_e(_cut(gone.label, 80))}”. {listing_update[0]}", *listing_update[1:])

    dismiss_btn.click(dismiss, inputs=[topic, period], outputs=list_outputs, api_name="gaps_dismiss")

    def merge(topic_id, other_id, period_value, request: gr.Request):
        if not bot.is_admin(request):
            return (NOT_ADMIN, *[gr.update()] * 4)
        try:
            finder.merge(topic_id or "", other_id or "", _since(period_value))
        except KnowledgeEditError as exc:
            return (f"❌ {_e(exc)}", *[gr.update()] * 4)
        listing_update = listed(period_value)
        return (f"Merged. {listing_update[0]}", *listing_update[1:])

    merge_btn.click(merge, inputs=[topic, merge_with, period], outputs=list_outputs, api_name="gaps_merge")

    _article_editor(bot, finder)


def _article_editor(bot, finder: GapFinder) -> None:
    """Edit an existing Markdown article: preview, validate, version, re-index."""
    editor = finder.knowledge
    try:
        articles = editor.articles()
    except OSError as exc:  # an unreadable knowledge folder costs the editor, not the tab
        articles = []
        gr.Markdown(f"⚠️ The knowledge folder cannot be listed: {_e(exc)}")
    with gr.Accordion("Edit a knowledge article", open=False, elem_id="gaps-articles"):
        with gr.Row():
            article = gr.Dropdown(articles, label="Article", elem_id="gaps-article", scale=3,
                                  allow_custom_value=True)
            load_btn = gr.Button("Load", size="sm", elem_id="gaps-article-load", scale=1)
        base = gr.Textbox(visible=False, elem_id="gaps-article-sha")  # the loaded text's sha256: no lost edits
        with gr.Row():
            text = gr.Textbox(label="Markdown", lines=18, max_lines=40, elem_id="gaps-article-text")
            preview = gr.Markdown(elem_id="gaps-article-preview")  # gradio sanitises HTML in Markdown
        message = gr.Textbox(label="What changed (kept with the version)", elem_id="gaps-article-message")
        save_btn = gr.Button("Validate and save", variant="primary", elem_id="gaps-article-save")
        note = gr.Markdown(elem_id="gaps-article-status")

    def load(rel: str | None):
        if not rel:
            return gr.update(), gr.update(), "", "Pick an article."
        try:
            body, sha = editor.read(rel)
        except KnowledgeEditError as exc:
            return gr.update(), gr.update(), "", f"❌ {_e(exc)}"
        versions = editor.history(rel)
        return body, body, sha, f"Loaded `{_e(rel)}` ({len(versions)} saved versions)."

    load_btn.click(load, inputs=[article], outputs=[text, preview, base, note], api_name="gaps_article_load")
    text.change(lambda body: body, inputs=[text], outputs=[preview], api_name=False, show_progress="hidden")

    def save(rel, body, sha, why, request: gr.Request):
        if not bot.is_admin(request):
            return gr.update(), NOT_ADMIN
        if not rel:
            return gr.update(), "❌ Pick an article first. Nothing was saved."
        try:
            version = editor.save(rel, body or "", _who(request), why or "", base_sha=sha or None)
            _, new_sha = editor.read(rel)
            report = bot.retriever.refresh()
        except (KnowledgeEditError, OSError) as exc:
            return gr.update(), f"❌ {_e(exc)}"
        return new_sha, f"✅ Saved `{_e(rel)}` version {version} and re-indexed ({_e(report.summary())})."

    save_btn.click(save, inputs=[article, text, base, message], outputs=[base, note], api_name="gaps_article_save")
