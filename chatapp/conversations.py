"""The customer's conversation across the bot and a person: routing a message to whoever has the conversation,
restoring it after a reload, queueing for a person (or taking a message when nobody can come), what the customer is
told about it, and learning from what agents answer.

Functions of the `Bot` (it calls them; so does the UI, through the Bot), kept here so bot.py stays the answer pipeline.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from chatapp.bot import Reply, Session, clean_message
from chatapp.lexical import language as text_language
from chatapp.inbox import OPEN, Message, within_hours

log = logging.getLogger(__name__)

UNABLE = ("low_confidence", "replaced_handoff")  # the bot could not answer: what an agent says then is learned


@dataclass
class Status:
    """What the customer is told about the human side of the conversation."""

    state: str = "bot"
    position: int | None = None
    agent_name: str | None = None
    offline: bool = False
    hint: str = ""


def open_session(bot, conversation_id: str, user: str | None = None) -> Session:
    """The customer's conversation as the model sees it, rebuilt from the store (after a reload or a restart)."""
    conversation = bot.inbox.ensure(conversation_id, user)
    session = Session(session_id=conversation_id, mode=bot.settings.prompts.mode)
    for message in bot.inbox.messages(conversation_id):
        if message.role == "customer":
            session.history.append({"role": "user", "content": message.text})
            session.message_ids.append(None)
        elif message.role in ("bot", "agent"):
            session.history.append({"role": "assistant", "content": message.text})
            session.message_ids.append(message.meta.get("message_id"))
    session.handoff = conversation.reason if conversation.state in OPEN else None
    return session


def chat(bot, question: str, session: Session, *, user: str | None = None, **generation: Any) -> Iterator[Reply]:
    if bot.inbox is None:
        yield from bot.answer(question, session, user=user, **generation)
        return
    cid = session.session_id
    conversation = bot.inbox.ensure(cid, user)
    if conversation.state in OPEN:  # a person has it (or is coming): the message is for them, the bot stays quiet
        text, notice = clean_message(question, bot.settings.generation.max_input_chars)
        if not text:
            yield Reply("", done=True, notice="Type a question first.")
            return
        bot.inbox.add(cid, "customer", text, meta={"to_agent": True})
        session.history.append({"role": "user", "content": text})
        session.message_ids.append(None)
        yield Reply("", done=True, handoff=conversation.state, notice=notice)
        return
    session.handoff = None  # handed back or resolved: the bot answers again
    final: Reply | None = None
    for reply in bot.answer(question, session, user=user, **generation):
        final = reply
        if reply.done and reply.handoff == "asked_for_human" and reply.message_id:
            _record(bot, session, reply)
            reply.text = queue_for_person(bot, session, "asked_for_human", log_it=False)
            session.history[-1]["content"] = reply.text
            yield reply
            return
        yield reply
    if final is not None and final.message_id:
        _record(bot, session, final)


def _record(bot, session: Session, reply: Reply) -> None:
    """The finished exchange in the conversation's transcript, with what an agent needs to judge the answer."""
    cid = session.session_id
    bot.inbox.add(cid, "customer", session.history[-2]["content"])
    bot.inbox.add(cid, "bot", reply.text, meta={
        "message_id": reply.message_id, "handoff": reply.handoff, "curated": reply.curated,
        "sources": [h.title or h.source for h in reply.citations],
        "guard": {k: reply.guard.get(k) for k in ("action", "unsupported") if k in reply.guard},
    })


def person_available(bot) -> tuple[bool, str]:
    """Whether a person can come now, and if not why (shown to the customer)."""
    hours = bot.settings.ui.support_hours
    if not within_hours(hours):
        return False, f"Our support team is available {hours}."
    if not bot.inbox.agents_online():
        return False, "Nobody from our support team is signed in right now."
    return True, ""


def queue_for_person(bot, session: Session, reason: str, log_it: bool = True) -> str:
    """Put the conversation in the agents' queue; the reply says where it stands, never promising who isn't there."""
    del log_it  # the handoff itself is logged by Bot.request_handoff / the answer's own record
    cid = session.session_id
    if reason == "user_request" and any(m.meta.get("handoff") == "low_confidence"
                                        for m in bot.inbox.messages(cid)[-2:]):
        reason = "accepted_offer"
    language = text_language(" ".join(m["content"] for m in session.history if m["role"] == "user"))
    if bot.inbox.get(cid) is None:
        bot.inbox.ensure(cid)
    bot.inbox.request_person(cid, reason, language)
    session.handoff = reason
    available, why = person_available(bot)
    if not available:
        text = (f"{why} Please leave your message and an email address or phone number below, and we will get "
                "back to you.")
    else:
        position = bot.inbox.queue_position(cid) or 1
        text = ("A member of our support team has been asked to join. "
                f"You are number {position} in the queue; you can keep writing here in the meantime.")
    bot.inbox.add(cid, "system", text, meta={"handoff": reason})
    return text


def status(bot, session: Session | None) -> Status:
    if bot.inbox is None or session is None:
        return Status()
    conversation = bot.inbox.get(session.session_id)
    if conversation is None:
        return Status()
    if conversation.state == "waiting":
        available, why = person_available(bot)
        if not available:
            return Status("waiting", offline=True, hint=f"🙋 {why} Leave a message and how to reach you.")
        position = bot.inbox.queue_position(session.session_id)
        return Status("waiting", position, hint=f"🙋 A person has been asked; you are number {position} in the queue.")
    if conversation.state == "with_agent":
        return Status("with_agent", agent_name=conversation.agent_name,
                      hint=f"🧑 You are chatting with {conversation.agent_name} (a person).")
    if conversation.state == "resolved" and conversation.csat is None and conversation.first_human_at:
        return Status("resolved", hint="How did we do? Rate this conversation below.")
    return Status(conversation.state)


def updates(bot, session: Session | None, after: int) -> list[Message]:
    """What arrived for the customer since message `after`: agents' replies and notes about the conversation."""
    if bot.inbox is None or session is None:
        return []
    new = [m for m in bot.inbox.messages(session.session_id, after) if m.role in ("agent", "system")]
    conversation = bot.inbox.get(session.session_id)
    for message in new:
        if message.role == "agent":
            session.history.append({"role": "assistant", "content": message.text})
            session.message_ids.append(None)
    if conversation is not None and conversation.state not in OPEN:
        session.handoff = None
    return new


def agent_reply(bot, conversation_id: str, agent: str, text: str) -> Message:
    """Send an agent's reply; the first one to a question the bot could not answer is learned, like a correction."""
    name = bot.accounts.display_name(agent)
    message = bot.inbox.reply(conversation_id, agent, name, text)
    try:
        _learn(bot, conversation_id, agent, message)
    except Exception:  # learning must never cost the customer the reply
        log.exception("could not learn from agent reply in %s", conversation_id)
    return message


def _learn(bot, conversation_id: str, agent: str, reply: Message) -> None:
    earlier = [m for m in bot.inbox.messages(conversation_id) if m.id < reply.id]
    unable = [i for i, m in enumerate(earlier) if m.role == "bot" and _unable(m)]
    if not unable or any(m.role == "agent" for m in earlier[unable[-1] + 1:]):
        return  # the bot answered, or this question already got its agent answer
    bot_index = unable[-1]
    if bot_index == 0 or earlier[bot_index - 1].role != "customer":
        return
    question = earlier[bot_index - 1].text
    history = [{"role": "user" if m.role == "customer" else "assistant", "content": m.text}
               for m in earlier[:bot_index - 1] if m.role in ("customer", "bot", "agent")]
    if bot.prompts is not None:
        bot.prompts.add_example(question, reply.text, source="agent")
    if bot.feedback is not None:
        from chatapp.feedback import TurnRecord, new_message_id

        record = TurnRecord(new_message_id(), conversation_id, question, reply.text, history=history,
                            template="agent", model=f"agent:{agent}", user=agent, created_at=time.time())
        bot.feedback.log_turn(record)
        bot.feedback.rate(record.message_id, 1, reason="agent reply", user=agent)


def _unable(message: Message) -> bool:
    return (message.meta.get("handoff") in UNABLE or message.meta.get("rating") == -1
            or (message.meta.get("guard") or {}).get("action") in UNABLE)


def leave_contact(bot, session: Session, contact: str, text: str) -> str:
    contact, text = (contact or "").strip()[:200], (text or "").strip()[:4000]
    if not contact:
        return "Please add an email address or phone number so we can reach you."
    conversation = bot.inbox.get(session.session_id) or bot.inbox.ensure(session.session_id)
    if conversation.state not in OPEN:
        bot.inbox.request_person(session.session_id, "message_left")
    bot.inbox.leave_contact(session.session_id, contact, text or "(no message)")
    return "Thanks, your message is with our support team; we will contact you at the address you gave."


def end_chat(bot, session: Session, csat: int | None = None) -> str:
    if csat:
        bot.inbox.rate_conversation(session.session_id, int(csat))
        return "Thanks for rating this conversation."
    bot.inbox.close_by_customer(session.session_id)
    return "Conversation ended. How did we do?"
