"""The chat tab: streaming answers, sources, thumbs up/down with a correction, stop/retry/clear, human handoff.

Wiring only: every decision is the bot's. Per-browser state lives in two gr.State values: the bot's `Session`
(conversation the model sees) and a `ChatView` (what the page shows, and which logged turn each bubble is).
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field

import gradio as gr

from chatapp.bot import Bot, Reply, Session


@dataclass
class ChatView:
    """The bubbles on screen and, for each, the id of the logged turn it shows (None for the user's)."""

    messages: list[dict] = field(default_factory=list)
    message_ids: list[str | None] = field(default_factory=list)
    last_question: str = ""


def _escape(text: str) -> str:
    """Show user and model text literally: no HTML from either side reaches the page."""
    return html.escape(text, quote=False)


def format_reply(reply: Reply) -> str:
    """The assistant bubble: the answer, then what it is based on, as Markdown."""
    parts = [_escape(reply.text) if reply.text else "…"]
    if reply.curated:
        parts.append("*✓ Curated answer*")
    if reply.citations and reply.done:
        refs = [f"[{i}] {_escape(hit.title or hit.source)}" for i, hit in enumerate(reply.citations, 1)]
        parts.append("<sub>Sources: " + " · ".join(refs) + "</sub>")
    if reply.handoff:
        parts.append("*🙋 Human handoff offered*" if reply.handoff == "low_confidence" else "*🙋 Handed to a person*")
    if reply.notice:
        parts.append(f"> ℹ️ {_escape(reply.notice)}")
    return "\n\n".join(parts)


def format_sources(reply: Reply) -> str:
    if not reply.citations:
        return "*No knowledge-base passages were used for this answer.*"
    blocks = []
    for i, hit in enumerate(reply.citations, 1):
        snippet = _escape(" ".join((hit.answer or hit.text).replace("*", "").replace("#", "").split())[:300])
        blocks.append(f"**[{i}] {_escape(hit.title or hit.source)}**  \n<sub>{_escape(hit.source)} · score {hit.score:.2f}</sub>  \n{snippet}")
    return "\n\n".join(blocks)


def build(bot: Bot) -> None:
    """Lay out the chat tab inside the caller's `gr.Tab`."""
    session_state = gr.State(None)
    view_state = gr.State(None)
    rated_id = gr.State(None)

    status = gr.Markdown(bot.status(), elem_id="status")
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(
                label=f"{bot.settings.ui.bot_name} — {bot.settings.ui.company} support",
                height=480,
                elem_id="chatbot",
                feedback_options=("Like", "Dislike"),
                placeholder="Ask about orders, returns, refunds, shipping or your account.",
            )
            with gr.Row():
                message = gr.Textbox(
                    placeholder="Type your question and press Enter", show_label=False, scale=6,
                    elem_id="message", max_lines=6,
                )
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Row():
                stop = gr.Button("Stop", size="sm", elem_id="stop")
                retry = gr.Button("Retry", size="sm", elem_id="retry")
                clear = gr.Button("Clear", size="sm", elem_id="clear")
                handoff = gr.Button("🙋 Talk to a person", size="sm", elem_id="handoff")
            hint = gr.Markdown("", elem_id="hint")
        with gr.Column(scale=2):
            with gr.Accordion("Sources for the last answer", open=True):
                sources = gr.Markdown("*Ask a question to see the passages used.*", elem_id="sources")
            with gr.Group(visible=False, elem_id="correction") as correction_box:
                gr.Markdown("**What should the answer have been?** (optional)")
                correction = gr.Textbox(lines=4, show_label=False, placeholder="The correct answer", elem_id="correction-text")
                reason = gr.Textbox(show_label=False, placeholder="Why was it wrong? (optional)", elem_id="correction-reason")
                save_correction = gr.Button("Save correction", variant="primary", elem_id="save-correction")
            with gr.Accordion("Settings", open=False):
                mode = gr.Radio(["auto", "zero_shot", "few_shot"], value=bot.settings.prompts.mode, label="Prompt mode", elem_id="mode")
                temperature = gr.Slider(0.0, 1.5, value=bot.settings.generation.temperature, step=0.05, label="Temperature")
                max_tokens = gr.Slider(16, 1024, value=bot.settings.generation.max_new_tokens, step=16, label="Max new tokens")

    def respond(text: str, session: Session | None, view: ChatView | None, mode_: str, temperature_: float,
                max_tokens_: int, request: gr.Request):
        session, view = session or Session(), view or ChatView()
        if not (text or "").strip():
            yield view.messages, session, view, text, gr.skip(), bot.status(), "Type a question first."
            return
        session.mode = mode_
        view.last_question = text
        view.messages = view.messages + [{"role": "user", "content": _escape(text.strip()[:2000])}]
        view.message_ids = view.message_ids + [None]
        shown = view.messages
        reply, shown_at = Reply(""), 0.0
        for reply in bot.answer(text, session, user=getattr(request, "username", None),
                                temperature=temperature_, max_new_tokens=int(max_tokens_)):
            shown = view.messages + [{"role": "assistant", "content": format_reply(reply)}]
            if time.monotonic() - shown_at >= bot.settings.ui.stream_every_s:
                shown_at = time.monotonic()
                yield shown, session, view, "", gr.skip(), gr.skip(), ""
        if reply.message_id is None:  # nothing was answered (empty after cleaning)
            view.messages, view.message_ids = view.messages[:-1], view.message_ids[:-1]
            yield view.messages, session, view, text, gr.skip(), bot.status(), reply.notice or ""
            return
        view.messages = shown
        view.message_ids = view.message_ids + [reply.message_id]
        yield view.messages, session, view, "", format_sources(reply), bot.status(), ""

    def on_stop(session: Session | None):
        if session is not None:
            session.stop.set()

    def on_retry(session: Session | None, view: ChatView | None):
        """Drop the last exchange and put its question back in the box."""
        if not session or not view or not view.last_question:
            return gr.skip(), session, view, gr.skip()
        session.history, session.message_ids = session.history[:-2], session.message_ids[:-2]
        view.messages, view.message_ids = view.messages[:-2], view.message_ids[:-2]
        return view.messages, session, view, view.last_question

    def on_clear():
        return [], None, None, "", "*Ask a question to see the passages used.*", gr.update(visible=False)

    def on_like(view: ChatView | None, data: gr.LikeData, request: gr.Request):
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        if view is None or index >= len(view.message_ids) or view.message_ids[index] is None:
            return gr.skip(), None, "That message can't be rated."
        message_id = view.message_ids[index]
        rating = 1 if data.liked is True else -1 if data.liked is False else 0
        try:
            note = bot.rate(message_id, rating, user=getattr(request, "username", None))
        except Exception as exc:
            return gr.update(visible=False), None, f"⚠️ The rating was not stored: {exc}"
        return gr.update(visible=rating < 0), message_id, note

    def on_correction(message_id: str | None, text: str, why: str, request: gr.Request):
        if not message_id:
            return gr.update(visible=False), "", "", "Choose an answer with 👎 first."
        try:
            note = bot.rate(message_id, -1, correction=text, reason=why, user=getattr(request, "username", None))
        except Exception as exc:
            return gr.skip(), text, why, f"⚠️ The correction was not stored (your text is still here): {exc}"
        return gr.update(visible=False), "", "", note

    def on_handoff(session: Session | None, view: ChatView | None):
        session, view = session or Session(), view or ChatView()
        note = bot.request_handoff(session)
        view.messages = view.messages + [{"role": "assistant", "content": f"*🙋 {note}*"}]
        view.message_ids = view.message_ids + [None]
        return view.messages, session, view, bot.status()

    inputs = [message, session_state, view_state, mode, temperature, max_tokens]
    outputs = [chatbot, session_state, view_state, message, sources, status, hint]
    message.submit(respond, inputs, outputs, api_name="chat", concurrency_limit=None)
    send.click(respond, inputs, outputs, api_name=False, concurrency_limit=None)
    # Stop ends generation through the session's event, so the partial answer is still kept and logged.
    stop.click(on_stop, [session_state], None, api_name="stop", queue=False)
    retry.click(on_retry, [session_state, view_state], [chatbot, session_state, view_state, message], api_name=False)
    clear.click(on_clear, None, [chatbot, session_state, view_state, message, sources, correction_box], api_name="clear")
    chatbot.like(on_like, [view_state], [correction_box, rated_id, hint], api_name="rate")
    save_correction.click(on_correction, [rated_id, correction, reason], [correction_box, correction, reason, hint], api_name="correct")
    handoff.click(on_handoff, [session_state, view_state], [chatbot, session_state, view_state, status], api_name="handoff")
