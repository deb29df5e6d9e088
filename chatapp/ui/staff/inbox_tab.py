"""The Inbox tab: conversations waiting for a person (oldest first), the whole transcript of the one opened, and
claim / reply / hand back to the bot / resolve. The page holds a long-poll open (`POST live/inbox`,
chatapp/ui/live.py) that answers when the queue or the opened conversation changed; it then clicks a hidden button
that redraws. While it is open the agent counts as signed in (the customer is told when nobody is). No timer: an open
console costs the server a cheap query every half second, not a Gradio request every second.

Wiring only: the states and their rules are chatapp/inbox.py's, agent replies go through Bot.agent_reply.
"""
from __future__ import annotations

import html
import socket
import time
from datetime import datetime

import gradio as gr

from chatapp.inbox import InboxError, Message
from chatapp.ui.live import STAFF_JS, STAFF_PICK_JS
from chatapp.ui.server import widget_snippet

STATE_LABEL = {"waiting": "⏳ waiting", "with_agent": "🧑 with agent", "bot": "🤖 bot", "resolved": "✅ resolved"}


def _e(text: str | None) -> str:
    return html.escape(text or "", quote=False).replace("|", "&#124;").replace("\n", " ")


def _ago(ts: float | None) -> str:
    if not ts:
        return "–"
    seconds = max(0, int(time.time() - ts))
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min" if seconds < 5400 else f"{seconds // 3600} h"


def _message(m: Message) -> str:
    when = datetime.fromtimestamp(m.created_at).strftime("%H:%M:%S")
    text = html.escape(m.text, quote=False)
    if m.role == "system":
        return f"<sub>{when}</sub> *{text}*"
    who = {"customer": "👤 **Customer**", "bot": "🤖 **Bot**"}.get(m.role, f"🧑 **{_e(m.author)}**")
    lines = [f"<sub>{when}</sub> {who}: {text}"]
    if m.role == "bot":
        notes = []
        if m.meta.get("sources"):
            notes.append("sources: " + " · ".join(_e(s) for s in m.meta["sources"]))
        guard = m.meta.get("guard") or {}
        if guard.get("action") and guard["action"] != "kept":
            notes.append(f"guard: {_e(guard['action'])}" + (f" ({_e(', '.join(map(str, guard.get('unsupported') or [])))})"
                                                             if guard.get("unsupported") else ""))
        if m.meta.get("handoff"):
            notes.append(f"handoff: {_e(m.meta['handoff'])}")
        rating = m.meta.get("rating")
        if rating:
            notes.append("customer rated 👍" if rating > 0 else "customer rated 👎")
        if notes:
            lines.append("<sub>" + " — ".join(notes) + "</sub>")
    if m.meta.get("contact"):
        lines.append(f"<sub>contact left: {_e(m.meta['contact'])}</sub>")
    return "  \n".join(lines)


def build(bot) -> None:
    shown = gr.State(None)  # what this page last drew, so an unchanged redraw sends nothing
    gr.Markdown("Conversations waiting for a person, oldest first. Open one, **Claim** it, reply; "
                "**Hand back** gives it to the bot again, **Resolve** ends it.")
    queue = gr.Markdown("*No conversation is waiting.*", elem_id="inbox-queue")
    picked = gr.Radio([], label="Open a conversation", elem_id="inbox-list")
    with gr.Row():
        with gr.Column(scale=3):
            header = gr.Markdown("", elem_id="inbox-header")
            transcript = gr.Markdown("", elem_id="inbox-transcript", height=420)
        with gr.Column(scale=2):
            claim = gr.Button("Claim", variant="primary", elem_id="inbox-claim")
            reply = gr.Textbox(lines=4, label="Reply to the customer", elem_id="inbox-reply-text")
            send = gr.Button("Send reply", variant="primary", elem_id="inbox-send")
            note = gr.Textbox(label="Note (optional, for hand back / resolve)", elem_id="inbox-note")
            with gr.Row():
                hand_back = gr.Button("Hand back to the bot", elem_id="inbox-handback")
                resolve = gr.Button("Resolve", elem_id="inbox-resolve")
            result = gr.Markdown("", elem_id="inbox-status")
    changed = gr.Button("refresh", visible="hidden", elem_id="inbox-live-refresh")  # clicked by STAFF_JS
    with gr.Accordion("Embed the chat on your site", open=False):
        gr.Markdown("Paste this into your shop's pages (it loads nothing from a third party):")
        host = bot.settings.ui.host if bot.settings.ui.host not in ("0.0.0.0", "::") else socket.getfqdn()
        gr.Code(widget_snippet(f"http://{host}:{bot.settings.ui.port}"), language="html",
                elem_id="widget-snippet", interactive=False)

    def agent_of(request: gr.Request | None) -> str:
        return getattr(request, "username", None) or "staff"

    def draw(cid: str | None) -> tuple[str, list, str, str]:
        items = bot.inbox.open_conversations() if bot.inbox is not None else []
        if not items:
            table = "*No conversation is waiting.*"
        else:
            rows = [f"| {n} | {STATE_LABEL[c.state]} | {_ago(c.waiting_since)} | {_e(c.language)} | "
                    f"{_e(c.agent_name or '')} | {_e(c.last_message[:80])} |" for n, c in enumerate(items, 1)]
            table = "| # | state | waiting | language | agent | last message |\n|---|---|---|---|---|---|\n" + \
                "\n".join(rows)
        choices = [(f"{n}. {STATE_LABEL[c.state]} · {_ago(c.waiting_since)} · {c.last_message[:40]}",
                    c.conversation_id) for n, c in enumerate(items, 1)]
        head, body = "", ""
        conversation = bot.inbox.get(cid) if cid and bot.inbox is not None else None
        if conversation is not None:
            if cid not in [v for _, v in choices]:
                choices.append((f"{STATE_LABEL[conversation.state]} · {conversation.last_message[:40]}", cid))
            head = (f"**{STATE_LABEL[conversation.state]}** · conversation `{cid[:8]}` · language "
                    f"{_e(conversation.language)} · asked {_ago(conversation.waiting_since)} ago · reason "
                    f"{_e(conversation.reason)}" + (f" · agent **{_e(conversation.agent_name)}**"
                                                    if conversation.agent_name else "")
                    + (f" · contact {_e(conversation.contact)}" if conversation.contact else ""))
            body = "\n\n".join(_message(m) for m in bot.inbox.messages(cid)) or "*No messages yet.*"
        return table, choices, head, body

    def refresh(cid: str | None, last: tuple | None, request: gr.Request):
        if not bot.is_agent(request) or bot.inbox is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), last
        bot.inbox.seen(agent_of(request))
        table, choices, head, body = draw(cid)
        drawn = (table, tuple(choices), head, body)
        if drawn == last:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), last
        choices_update = gr.update(choices=choices) if last is None or tuple(choices) != last[1] else gr.skip()
        return table, choices_update, head, body, drawn

    def act(action):
        def run(cid: str | None, text: str, note_text: str, request: gr.Request):
            if not bot.is_agent(request):
                return "Only support agents can do this.", gr.skip()
            if not cid:
                return "Open a conversation first.", gr.skip()
            agent = agent_of(request)
            try:
                message, clear_text = action(cid, agent, text, note_text)
            except InboxError as exc:
                return f"⚠️ {html.escape(str(exc), quote=False)}", gr.skip()
            return message, "" if clear_text else gr.skip()
        return run

    def do_claim(cid, agent, _text, _note):
        conversation = bot.inbox.claim(cid, agent, bot.accounts.display_name(agent))
        return f"You have this conversation ({STATE_LABEL[conversation.state]}).", False

    def do_send(cid, agent, text, _note):
        bot.agent_reply(cid, agent, text)
        return "Sent.", True

    def do_hand_back(cid, agent, _text, note_text):
        bot.inbox.hand_back(cid, agent, note_text)
        return "Handed back to the bot.", False

    def do_resolve(cid, agent, _text, note_text):
        bot.inbox.resolve(cid, agent, note_text)
        return "Resolved.", False

    def redraw(cid: str | None, request: gr.Request):
        return refresh(cid, None, request)

    private = dict(api_name=False, show_progress="hidden")
    outputs = [queue, picked, header, transcript, shown]
    # a plain request, not a queued job; always_last: a change during a running redraw is drawn after it
    changed.click(refresh, [picked, shown], outputs, queue=False, trigger_mode="always_last", **private)
    gr.on(triggers=None, fn=refresh, inputs=[picked, shown], outputs=outputs, **private).then(
        None, None, None, js=STAFF_JS, **private)
    picked.change(redraw, [picked], outputs, **private).then(None, [picked], None, js=STAFF_PICK_JS, **private)
    for button, action, clears in ((claim, do_claim, None), (send, do_send, reply), (hand_back, do_hand_back, note),
                                   (resolve, do_resolve, note)):
        button.click(act(action), [picked, reply, note], [result, clears or reply], **private).then(
            redraw, [picked], outputs, **private)
