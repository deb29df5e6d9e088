"""The customer chat: streaming answers, sources, thumbs up/down with a correction, stop/retry/clear, and a handoff
to a person whose replies arrive live: the page holds a long-poll open (chatapp/ui/live.py) and, when it says an
agent wrote, clicks a hidden button whose handler puts the new message on screen. No timer: a page costs the server
nothing through Gradio while nothing arrives.

Wiring only: every decision is the bot's (chatapp/conversations.py for the human part). Per-page state lives in
gr.State values: the bot's `Session` (the conversation the model sees) and a `ChatView` (what the page shows). The
browser keeps a signed token (gr.BrowserState) naming its conversation, so a reload or a restart keeps it. Nothing
here imports staff code, and only the customer's own conversation is reachable from its events.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field

import gradio as gr

from chatapp import conversations
from chatapp.bot import Bot, Reply, Session
from chatapp.inbox import Forbidden, Message
from chatapp.ui.live import CUSTOMER_JS


@dataclass
class ChatView:
    """The bubbles on screen and, for each, the id of the logged turn it shows (None for the user's)."""

    messages: list[dict] = field(default_factory=list)
    message_ids: list[str | None] = field(default_factory=list)
    last_question: str = ""
    seen: int = 0  # the last conversation message (inbox id) already on screen
    busy: bool = False  # an answer is streaming
    partial: dict | None = None  # its bubble so far: an arrival is drawn above it instead of waiting for its end
    hint: str = ""

    def add(self, role: str, content: str, message_id: str | None = None) -> None:
        self.messages = self.messages + [{"role": role, "content": content}]
        self.message_ids = self.message_ids + [message_id]


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


def format_message(message: Message) -> tuple[str, str]:
    """(role, Markdown) of a stored message: an agent's is marked as from a person, with their name."""
    text = _escape(message.text)
    if message.role == "customer":
        return "user", text
    if message.role == "agent":
        return "assistant", f"🧑 **{_escape(message.author)}** · *support team (a person)*\n\n{text}"
    if message.role == "system":
        return "assistant", f"*{text}*"
    sources = message.meta.get("sources") or []
    refs = "\n\n<sub>Sources: " + " · ".join(_escape(s) for s in sources) + "</sub>" if sources else ""
    return "assistant", text + refs


def format_sources(reply: Reply) -> str:
    if not reply.citations:
        return "*No knowledge-base passages were used for this answer.*"
    blocks = []
    for i, hit in enumerate(reply.citations, 1):
        snippet = _escape(" ".join((hit.answer or hit.text).replace("*", "").replace("#", "").split())[:300])
        blocks.append(f"**[{i}] {_escape(hit.title or hit.source)}**  \n<sub>{_escape(hit.source)} · score {hit.score:.2f}</sub>  \n{snippet}")
    return "\n\n".join(blocks)


def build(bot: Bot, widget: bool = False) -> None:
    """Lay out the customer chat inside the caller's Blocks (`widget`: the minimal view for an iframe)."""
    tokens = bot.browser_tokens
    browser = gr.BrowserState(None, storage_key="chatapp-conversation", secret=tokens.browser_secret())
    session_state = gr.State(None)
    view_state = gr.State(None)
    rated_id = gr.State(None)

    status = gr.Markdown(bot.status(), elem_id="status", visible=not widget)
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(
                label=f"{bot.settings.ui.bot_name} — {bot.settings.ui.company} support",
                height=380 if widget else 480,
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
                stop = gr.Button("Stop", size="sm", elem_id="stop", visible=not widget)
                retry = gr.Button("Retry", size="sm", elem_id="retry", visible=not widget)
                clear = gr.Button("Clear", size="sm", elem_id="clear", visible=not widget)
                handoff = gr.Button("🙋 Talk to a person", size="sm", elem_id="handoff")
                end = gr.Button("End chat", size="sm", elem_id="end-chat")
            hint = gr.Markdown("", elem_id="hint")
            # clicked by CUSTOMER_JS when the live request says something arrived; in the DOM, never on screen
            arrived = gr.Button("new messages", visible="hidden", elem_id="live-refresh")
            with gr.Group(visible=False, elem_id="contact-box") as contact_box:
                contact = gr.Textbox(show_label=False, placeholder="Your email address or phone number",
                                     elem_id="contact")
                contact_text = gr.Textbox(show_label=False, lines=3, placeholder="Your message for our team",
                                          elem_id="contact-message")
                contact_send = gr.Button("Leave message", elem_id="contact-send")
            with gr.Group(visible=False, elem_id="csat-box") as csat_box:
                csat = gr.Radio(["1", "2", "3", "4", "5"], label="How satisfied are you with this conversation?",
                                elem_id="csat")
                csat_send = gr.Button("Send rating", elem_id="csat-send")
        with gr.Column(scale=2, visible=not widget):
            with gr.Accordion("Sources for the last answer", open=True):
                sources = gr.Markdown("*Ask a question to see the passages used.*", elem_id="sources")
            with gr.Group(visible=False, elem_id="correction") as correction_box:
                gr.Markdown("**What should the answer have been?** (optional)")
                correction = gr.Textbox(lines=4, show_label=False, placeholder="The correct answer", elem_id="correction-text")
                reason = gr.Textbox(show_label=False, placeholder="Why was it wrong? (optional)", elem_id="correction-reason")
                save_correction = gr.Button("Save correction", variant="primary", elem_id="save-correction")
                ask_person = gr.Button("🙋 I still need help: ask a person", size="sm", elem_id="downvote-handoff")
            with gr.Accordion("Settings", open=False):
                mode = gr.Radio(["auto", "zero_shot", "few_shot"], value=bot.settings.prompts.mode, label="Prompt mode", elem_id="mode")
                temperature = gr.Slider(0.0, 1.5, value=bot.settings.generation.temperature, step=0.05, label="Temperature")
                max_tokens = gr.Slider(16, 1024, value=bot.settings.generation.max_new_tokens, step=16, label="Max new tokens")

    def user_of(request: gr.Request | None) -> str | None:
        return getattr(request, "username", None)

    def open_session(token, request) -> tuple[Session, str]:
        """This browser's conversation; a missing, forged or someone else's token gets a new conversation."""
        if bot.inbox is None:
            return Session(), ""
        if tokens.valid(token):
            try:
                return bot.open_conversation(tokens.conversation_id(token), user_of(request)), token
            except Forbidden:
                pass
        token = tokens.issue()
        return bot.open_conversation(tokens.conversation_id(token), user_of(request)), token

    def catch_up(session: Session, view: ChatView, skip: str | None = None) -> None:
        """Put what agents sent (and notes about the conversation) on screen, once each."""
        for item in conversations.updates(bot, session, view.seen):
            view.seen = max(view.seen, item.id)
            if item.role == "system" and item.text == skip:
                continue
            view.add(*format_message(item))

    def boxes(session: Session | None, view: ChatView):
        state = conversations.status(bot, session)
        view.hint = state.hint
        return state.hint, gr.update(visible=state.offline), gr.update(visible=state.state == "resolved"
                                                                        and bool(state.hint))

    def on_load(token, request: gr.Request):
        session, token = open_session(token, request)
        view = ChatView()
        if bot.inbox is not None:
            for item in bot.inbox.messages(session.session_id):
                view.add(*format_message(item), item.meta.get("message_id"))
                view.seen = item.id
        return (token, session, view, view.messages, *boxes(session, view))

    def respond(text: str, mode_: str, temperature_: float, max_tokens_: int, token=None, session: Session | None = None,
                view: ChatView | None = None, request: gr.Request = None):
        if session is None:  # an API client: no page load ran
            session, _ = open_session(token, request)
        view = view or ChatView()
        if not (text or "").strip():
            yield view.messages, text, gr.skip(), bot.status(), "Type a question first.", session, view
            return
        session.mode = mode_
        view.last_question = text
        view.add("user", _escape(text.strip()[:2000]))
        asked_at = len(view.messages) - 1  # an agent's message may be put after it while the answer streams
        reply, shown_at = Reply(""), 0.0
        view.busy = True
        try:
            for reply in bot.chat(text, session, user=user_of(request),
                                  temperature=temperature_, max_new_tokens=int(max_tokens_)):
                if reply.done and not reply.text and reply.handoff:
                    break  # the message went to the person who has the conversation
                view.partial = {"role": "assistant", "content": format_reply(reply)}
                if time.monotonic() - shown_at >= bot.settings.ui.stream_every_s:
                    shown_at = time.monotonic()
                    yield view.messages + [view.partial], "", gr.skip(), gr.skip(), "", session, view
        finally:
            view.busy, view.partial = False, None
        if reply.done and not reply.text and reply.handoff:
            catch_up(session, view)
            yield view.messages, "", gr.skip(), gr.skip(), view.hint, session, view
            return
        if reply.message_id is None:  # nothing was answered (empty after cleaning)
            view.messages = view.messages[:asked_at] + view.messages[asked_at + 1:]
            view.message_ids = view.message_ids[:asked_at] + view.message_ids[asked_at + 1:]
            yield view.messages, text, gr.skip(), bot.status(), reply.notice or "", session, view
            return
        view.add("assistant", format_reply(reply), reply.message_id)
        catch_up(session, view, skip=reply.text)
        hint_text = conversations.status(bot, session).hint
        yield view.messages, "", format_sources(reply), bot.status(), hint_text, session, view

    def on_arrival(session: Session | None, view: ChatView | None):
        """What arrived (an agent's reply, who has the conversation, the place in the queue), when the live request
        said so. The chat is sent even when `respond` already caught the message up: its own output may still be on
        its way through Gradio's queue, and this call is the fast path. While an answer streams, what arrived goes
        above its bubble (the stream's next update keeps it there) rather than waiting for the answer to end."""
        if session is None or view is None or bot.inbox is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        catch_up(session, view)
        partial = view.partial
        return (view.messages + ([partial] if partial else []), *boxes(session, view))

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

    def on_clear(request: gr.Request):
        """A fresh screen and a new conversation (the old one stays stored, as a person saw it)."""
        session, token = open_session(None, request)
        return token, [], session, ChatView(), "", "*Ask a question to see the passages used.*", gr.update(visible=False)

    def on_like(view: ChatView | None, data: gr.LikeData, request: gr.Request):
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        if view is None or index >= len(view.message_ids) or view.message_ids[index] is None:
            return gr.skip(), None, "That message can't be rated."
        message_id = view.message_ids[index]
        rating = 1 if data.liked is True else -1 if data.liked is False else 0
        try:
            note = bot.rate(message_id, rating, user=user_of(request))
        except Exception as exc:
            return gr.update(visible=False), None, f"⚠️ The rating was not stored: {exc}"
        return gr.update(visible=rating < 0), message_id, note

    def on_correction(message_id: str | None, text: str, why: str, request: gr.Request):
        if not message_id:
            return gr.update(visible=False), "", "", "Choose an answer with 👎 first."
        try:
            note = bot.rate(message_id, -1, correction=text, reason=why, user=user_of(request))
        except Exception as exc:
            return gr.skip(), text, why, f"⚠️ The correction was not stored (your text is still here): {exc}"
        return gr.update(visible=False), "", "", note

    def handoff_for(reason: str):
        def on_handoff(token=None, session: Session | None = None, view: ChatView | None = None,
                       request: gr.Request = None):
            if session is None:
                session, _ = open_session(token, request)
            view = view or ChatView()
            note = bot.request_handoff(session, reason)
            view.add("assistant", f"*🙋 {_escape(note)}*")
            catch_up(session, view, skip=note)
            hint_text, contact_update, _ = boxes(session, view)
            return view.messages, session, view, bot.status(), hint_text, contact_update, gr.update(visible=False)
        return on_handoff

    def on_contact(session: Session | None, view: ChatView | None, address: str, text: str):
        if session is None or bot.inbox is None:
            return gr.skip(), gr.skip(), "Reload the page first.", gr.skip()
        note = conversations.leave_contact(bot, session, address, text)
        if not (address or "").strip():
            return gr.skip(), gr.skip(), note, gr.skip()
        view.add("assistant", f"*{_escape(note)}*")
        return view.messages, gr.update(visible=False), note, ""

    def on_end(session: Session | None, view: ChatView | None):
        if session is None or bot.inbox is None:
            return gr.skip(), gr.skip()
        return conversations.end_chat(bot, session), gr.update(visible=True)

    def on_csat(session: Session | None, value: str | None):
        if session is None or bot.inbox is None or not value:
            return "Choose 1 to 5 first.", gr.skip()
        return conversations.end_chat(bot, session, int(value)), gr.update(visible=False)

    private = dict(api_name=False, show_progress="hidden")
    # the live request starts once the page has its token (and again with the new one after Clear)
    gr.on(triggers=None, fn=on_load, inputs=[browser], outputs=[browser, session_state, view_state, chatbot, hint,
                                                                 contact_box, csat_box], **private).then(
        None, [browser], None, js=CUSTOMER_JS, **private)
    inputs = [message, mode, temperature, max_tokens, browser, session_state, view_state]
    outputs = [chatbot, message, sources, status, hint, session_state, view_state]
    message.submit(respond, inputs, outputs, api_name="chat", concurrency_limit=None)
    send.click(respond, inputs, outputs, api_name=False, concurrency_limit=None)
    # "poll" is public on purpose: it reads only the caller's own session state, so API clients (and
    # bench/handoff.py) receive agents' replies the way the page does, after the live request said so.
    # queue=False: a plain request, not a queued job; always_last: an arrival during a running one is not lost.
    arrived.click(on_arrival, [session_state, view_state], [chatbot, hint, contact_box, csat_box], queue=False,
                  api_name="poll", show_progress="hidden", trigger_mode="always_last")
    # Stop ends generation through the session's event, so the partial answer is still kept and logged.
    stop.click(on_stop, [session_state], None, api_name="stop", queue=False)
    retry.click(on_retry, [session_state, view_state], [chatbot, session_state, view_state, message], api_name=False)
    clear.click(on_clear, None, [browser, chatbot, session_state, view_state, message, sources, correction_box],
                api_name="clear").then(None, [browser], None, js=CUSTOMER_JS, **private)
    chatbot.like(on_like, [view_state], [correction_box, rated_id, hint], api_name="rate")
    save_correction.click(on_correction, [rated_id, correction, reason], [correction_box, correction, reason, hint], api_name="correct")
    handoff_outputs = [chatbot, session_state, view_state, status, hint, contact_box, correction_box]
    handoff.click(handoff_for("user_request"), [browser, session_state, view_state], handoff_outputs,
                  api_name="handoff")
    ask_person.click(handoff_for("downvoted"), [browser, session_state, view_state], handoff_outputs,
                     api_name=False)
    contact_send.click(on_contact, [session_state, view_state, contact, contact_text],
                       [chatbot, contact_box, hint, contact_text], api_name=False)
    end.click(on_end, [session_state, view_state], [hint, csat_box], api_name=False)
    csat_send.click(on_csat, [session_state, csat], [hint, csat_box], api_name=False)
