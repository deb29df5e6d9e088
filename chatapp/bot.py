"""The pipeline of one question: retrieve -> evidence -> choose examples -> render template -> generate -> guard -> log.

`Bot` owns the parts (model, retriever, prompts, feedback log, adapter registry) and is the only thing the UI and the
CLI talk to. It keeps no per-user state: each browser session carries its own `Session`, so two users never see each
other's history.
"""
from __future__ import annotations

import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from chatapp.config import Settings
from chatapp.guard import StreamGuard, reference_texts
from chatapp.lexical import language as text_language

if TYPE_CHECKING:
    from chatapp.access import BrowserTokens

log = logging.getLogger(__name__)

HANDOFF_REPLY = (
    "I'd rather not guess on this one. Would you like me to connect you with a member of our support team? "
    "Press **Talk to a person** and they will pick up this conversation."
)
ASKED_FOR_HUMAN_REPLY = (
    "Of course. I'm handing this conversation to our support team; a person will reply here as soon as possible."
)
NO_CHINESE_REPLY = (
    "抱歉，目前回答您的模型只能用英文作答，我没法用中文准确回答这个问题。我可以帮您解答订单、配送、退货退款、付款、"
    "会员和账户方面的问题：请用英文提问，或点击 **Talk to a person** 转接人工客服。"
)
# After the evidence quoted for an answer the model declined: the article may not be all the customer needs
STILL_UNSURE = "If that does not answer your question, press **Talk to a person** and a member of our team will help."
STILL_UNSURE_ZH = "如果这没有解答您的问题，请点击 **Talk to a person**，我们的同事会来帮您。"
HANDOFF_REPLY_ZH = "这个问题我不想乱猜。需要为您转接我们的客服人员吗？请点击 **Talk to a person**，会有同事接手这段对话。"
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass
class Session:
    """One browser session's conversation, kept in the UI's per-session state."""

    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    history: list[dict] = field(default_factory=list)  # raw messages the model sees
    message_ids: list[str | None] = field(default_factory=list)  # per history entry: the logged turn's id
    mode: str = "auto"
    handoff: str | None = None  # set once the conversation is handed to a person
    stop: threading.Event = field(default_factory=threading.Event, repr=False)


@dataclass
class Reply:
    """One step of a streamed answer: the text so far plus what produced it."""

    text: str
    done: bool = False
    message_id: str | None = None
    citations: list[Any] = field(default_factory=list)  # retrieval.Hit
    handoff: str | None = None  # "asked_for_human" | "low_confidence"
    curated: bool = False
    notice: str | None = None  # shown to the user: truncation, a failed part, an error
    template: str = ""
    mode: str = ""
    evidence: list[Any] = field(default_factory=list)  # evidence.Evidence: what the prompt quoted
    guard: dict = field(default_factory=dict)  # guard.Verdict.to_dict() once the answer is final
    replaced: bool = False  # the model's answer was replaced by the guard (a quote of the evidence or a handoff offer)


def clean_message(text: str, limit: int) -> tuple[str, str | None]:
    """Drop control characters and cut a message to `limit` characters, saying so."""
    text = _CONTROL_CHARS.sub("", text or "").strip()
    if len(text) > limit:
        return text[:limit], f"Your message was {len(text):,} characters; only the first {limit:,} were read."
    return text, None


class Bot:
    """Everything a chat needs, loaded once per process and shared by all sessions (it holds no session state)."""

    def __init__(self, settings: Settings, model, retriever=None, prompts=None, feedback=None, adapters=None,
                 inbox=None, chinese_model=None):
        from chatapp.access import Accounts

        self.settings = settings
        self.inbox = inbox  # chatapp.inbox.Inbox: conversations a person takes over (None: handoffs are only logged)
        self.accounts = Accounts(settings.ui)
        self.model = model  # answers every language it writes; its adapter follows the registry
        self.chinese_model = chinese_model  # `model.chinese_model`: Chinese questions when `model` is English-only
        self.retriever = retriever
        self.prompts = prompts
        self.feedback = feedback
        self.adapters = adapters
        from chatapp.evidence import EvidenceSelector

        self.evidence = EvidenceSelector(getattr(retriever, "embedder", None), k=settings.answer.evidence_units,
                                         per_chunk=settings.answer.evidence_per_chunk)
        self.problems: dict[str, str] = {}  # part -> what is wrong with it, shown in the UI
        self._swap_lock = threading.Lock()
        self._knowledge_checked = 0.0

    @classmethod
    def create(cls, settings: Settings, model=None) -> "Bot":
        """Load every part; a part that fails is left out with a visible problem instead of stopping the app."""
        from chatapp.model import load_model

        problems: dict[str, str] = {}
        model = model or load_model(settings)
        parts: dict[str, Any] = {}
        loaders = {
            "retriever": lambda: __import__("chatapp.retrieval", fromlist=["Retriever"]).Retriever.open(settings),
            "feedback": lambda: __import__("chatapp.feedback", fromlist=["FeedbackStore"]).FeedbackStore.open(settings),
            "adapters": lambda: __import__("chatapp.adapters", fromlist=["AdapterRegistry"]).AdapterRegistry(settings),
            "inbox": lambda: __import__("chatapp.inbox", fromlist=["Inbox"]).Inbox(
                settings.database, settings.feedback.busy_timeout_s, settings.ui.agent_seen_s),
        }
        for name, loader in loaders.items():
            try:
                parts[name] = loader()
            except Exception as exc:  # the app stays up without the part and says why
                log.exception("%s unavailable", name)
                problems[name] = f"{name} unavailable: {exc}"
        try:
            from chatapp.prompts import PromptManager

            embedder = getattr(parts.get("retriever"), "embedder", None)
            parts["prompts"] = PromptManager(settings, embedder=embedder)
        except Exception as exc:
            log.exception("prompts unavailable")
            problems["prompts"] = f"prompt templates unavailable: {exc}"
        try:
            from chatapp.model import load_chinese_model

            parts["chinese_model"] = load_chinese_model(settings)
        except Exception as exc:  # English keeps answering; Chinese questions are told what the bot can do
            log.exception("chinese model unavailable")
            problems["chinese_model"] = f"the Chinese model {settings.model.chinese_model!r} is unavailable: {exc}"
        bot = cls(settings, model, **parts)
        bot.problems.update(problems)
        bot._note_knowledge()
        if bot.adapters is not None and settings.model.adapter is None:
            try:
                bot.adapters.install_shipped(bot.base_hash)  # a fresh install answers with the shipped adapter
            except Exception as exc:
                log.exception("shipped adapter not installed")
                bot.problems["adapters"] = f"the shipped adapter could not be registered: {exc}"
        bot.sync_adapter()
        return bot

    # ---------------------------------------------------------------------------------------------------------------
    # What the UI shows

    def is_admin(self, request=None) -> bool:
        """Admins edit prompts and promote adapters; with auth off everybody is one (a single-user install)."""
        if not self.settings.ui.auth:
            return True
        user = getattr(request, "username", None)
        return user is not None and user in self.settings.ui.admins

    @functools.cached_property
    def browser_tokens(self) -> BrowserTokens:
        """The customer pages' signed-token key (chatapp.access.BrowserTokens), one per process for the chat, the widget
        and the live routes alike; in the database when replicas share one. Raises BrowserKeyError, saying why."""
        from chatapp.access import BrowserTokens

        return BrowserTokens.open(self.settings)

    def role(self, request=None) -> str | None:
        """'admin', 'agent', 'customer' or None for the signed-in user (no staff accounts: the local user is admin)."""
        return self.accounts.role(getattr(request, "username", None))

    def is_agent(self, request=None) -> bool:
        return self.role(request) in ("agent", "admin")

    def status(self) -> str:
        """One line for the header: the model and adapter answering, and any part that is down."""
        lines = [f"**Model:** {self.model.description}"]
        if self.chinese_model is not None:
            lines.append(f"**Chinese questions:** {self.chinese_model.description}")
        health = self.feedback.health() if self.feedback is not None else None
        problems = list(self.problems.values()) + ([f"feedback log: {health}"] if health else [])
        lines += [f"⚠️ {p}" for p in problems]
        return "  \n".join(lines)

    # ---------------------------------------------------------------------------------------------------------------
    # Answering

    @functools.cached_property
    def base_hash(self) -> str | None:
        """The serving base weights' hash (None for a remote model): an adapter trained on others must not load."""
        from chatapp.model import base_model_hash

        model_dir = getattr(self.model, "model_dir", None)
        return base_model_hash(model_dir) if model_dir is not None else None

    def sync_adapter(self) -> None:
        """Follow the adapter registry: a promotion or rollback reaches the next answer without a restart."""
        if self.adapters is None or self.settings.model.adapter is not None:
            return  # an adapter given on the command line (or "none") pins the choice
        try:
            active = self.adapters.active()
        except Exception as exc:
            self.problems["adapters"] = f"adapter registry unreadable: {exc}"
            return
        version = active.version if active else None
        if version == self.model.adapter_version:
            return
        trained_on = (active.metadata.get("base_model") or {}).get("sha256") if active else None
        if trained_on and self.base_hash and trained_on != self.base_hash:
            self.problems["adapters"] = (f"adapter {version} was trained on other base weights than the model "
                                         f"answering now; still on {self.model.adapter_version or 'the base model'}")
            return
        with self._swap_lock:
            if version == self.model.adapter_version:
                return
            try:
                self.model.set_adapter(active.path if active else None, version)
                self.problems.pop("adapters", None)
                log.info("now answering with adapter %s", version or "none (base model)")
            except Exception as exc:
                self.problems["adapters"] = f"adapter {version} could not be loaded, still on the previous one: {exc}"

    def _refresh_knowledge(self) -> None:
        """Pick up edits to the knowledge folder while running, checked at most every 10 s, off the answer path."""
        if self.retriever is None or time.monotonic() - self._knowledge_checked < 10:
            return
        self._knowledge_checked = time.monotonic()

        def run() -> None:
            try:
                self.retriever.refresh()
            except Exception as exc:
                self.problems["knowledge"] = f"knowledge refresh failed: {exc}"
            else:
                self._note_knowledge()

        threading.Thread(target=run, daemon=True, name="knowledge-refresh").start()

    def _note_knowledge(self) -> None:
        """Show (or clear) why the knowledge database could not be used: answers then come from the local index."""
        problem = getattr(self.retriever, "shared_problem", None)
        if problem:
            self.problems["knowledge"] = problem
        else:
            self.problems.pop("knowledge", None)

    def answer(self, question: str, session: Session, *, user: str | None = None, **generation: Any) -> Iterator[Reply]:
        """Stream an answer to `question` in `session`; the session's history is updated when the answer ends."""
        gen = replace(self.settings.generation, **{k: v for k, v in generation.items() if v is not None})
        question, notice = clean_message(question, gen.max_input_chars)
        if not question:
            yield Reply("", done=True, notice="Type a question first.")
            return
        session.stop.clear()
        self.sync_adapter()
        self._refresh_knowledge()
        started = time.perf_counter()
        message_id = uuid.uuid4().hex
        history = list(session.history)

        if session.handoff:
            reply = Reply(
                "A member of our team has this conversation; they will reply here.", handoff=session.handoff
            )
            yield from self._finish(reply, question, session, message_id, started, notice=notice, user=user)
            return

        curated = self.prompts.find_curated(question) if self.prompts is not None else None
        if curated:
            reply = Reply(curated["answer"], curated=True)
            yield from self._finish(reply, question, session, message_id, started, notice=notice, user=user)
            return

        hits, search = [], None
        if self.retriever is not None:
            try:
                search = self.retriever.search(question, history)
                hits = search.hits
            except Exception as exc:
                log.exception("retrieval failed")
                notice = _join(notice, f"Knowledge search failed ({exc}); answering without it.")
        if search is not None and search.handoff == "asked_for_human":
            session.handoff = "asked_for_human"
            reply = Reply(ASKED_FOR_HUMAN_REPLY, handoff="asked_for_human")
            yield from self._finish(reply, question, session, message_id, started, notice=notice, user=user)
            return
        language = text_language(question)
        model = self.chinese_model if language == "zh" and self.chinese_model is not None else self.model
        if language not in self.languages:
            reply = Reply(NO_CHINESE_REPLY)  # say plainly what the bot can do, in the customer's language
            yield from self._finish(reply, question, session, message_id, started, notice=notice, user=user)
            return
        if search is not None and search.handoff == "low_confidence":
            reply = Reply(HANDOFF_REPLY_ZH if language == "zh" else HANDOFF_REPLY, handoff="low_confidence")
            yield from self._finish(reply, question, session, message_id, started, notice=notice, user=user)
            return
        if search is not None and search.curated is not None:
            hit = search.curated
            reply = Reply(hit.answer or hit.text, citations=[hit], curated=True)
            yield from self._finish(reply, question, session, message_id, started, notice=notice, user=user)
            return

        k = self.settings.answer.evidence_units_cross_lingual if language == "zh" else None
        evidence = self.evidence.select(question, history, hits, k=k) if hits else []
        template = self.settings.prompts.template_zh if language == "zh" else None
        rendered = self._render(question, history, evidence or hits, session.mode, gen, template, model)
        known = {f.name for f in fields(gen)}
        template_gen = {k: v for k, v in rendered.generation.items() if k in known and generation.get(k) is None}
        gen = replace(gen, **template_gen)
        # The template's answer_start opens the model's turn (a Chinese answer stays Chinese); the answer includes it.
        start = rendered.answer_start if getattr(model, "continues_answers", False) else ""
        messages = rendered.messages + ([{"role": "assistant", "content": start}] if start else [])
        text, shown, first_token = start, "", None
        guard = StreamGuard(reference_texts(evidence, hits, [*history, question]),
                            hold_declines=bool(evidence) and self.settings.answer.quote_when_declined) \
            if self.settings.answer.guard else None
        meta = dict(citations=hits, template=rendered.template, mode=rendered.mode, message_id=message_id,
                    evidence=evidence)
        pieces = model.stream(messages, gen, session.stop)
        try:
            for piece in pieces:
                if first_token is None:
                    first_token = time.perf_counter()
                text += piece
                visible = guard.feed(text) if guard is not None else text
                if guard is not None and (guard.failed or guard.declined):
                    break  # an unsupported claim, or a decline despite evidence: stop, it is replaced below
                if visible != shown:
                    shown = visible
                    yield Reply(shown, notice=notice, **meta)
        except Exception as exc:
            log.exception("generation failed")
            notice = _join(notice, f"The model failed while answering: {exc}")
        finally:
            getattr(pieces, "close", lambda: None)()
        if session.stop.is_set():
            notice = _join(notice, "Stopped.")
        reply = Reply(text.strip(), **meta)
        if guard is not None:
            verdict = guard.finish(reply.text)
            verdict.declined = verdict.declined or bool(start) and reply.text == start.strip()  # said nothing more
            reply.guard = verdict.to_dict()
            if not verdict.supported or verdict.declined:
                reply.text, reply.guard["action"] = self.replacement(evidence, question, declined=verdict.supported)
                reply.guard["model_answer"] = text.strip()  # kept for the staff (gaps, inbox), never shown
                reply.replaced = True
                log.info("guard replaced answer %s: %s", message_id,
                         f"unsupported {verdict.unsupported}" if verdict.unsupported else "declined despite evidence")
        yield from self._finish(
            reply, question, session, message_id, started, notice=notice, user=user, rendered=rendered,
            first_token=first_token, model=model,
        )

    def replacement(self, evidence: list, question: str, declined: bool = False) -> tuple[str, str]:
        """The answer shown instead of an unsupported or declined one: the evidence quoted with its citation (and,
        for a decline, the way to a person), else a handoff offer."""
        from chatapp.evidence import extractive_answer

        language = text_language(question)
        quote = extractive_answer(evidence, n=self.settings.answer.fallback_units, language=language)
        if quote and declined:
            return f"{quote} {STILL_UNSURE_ZH if language == 'zh' else STILL_UNSURE}", "replaced_declined"
        if quote:
            return quote, "replaced_extractive"
        return (HANDOFF_REPLY_ZH if language == "zh" else HANDOFF_REPLY), "replaced_handoff"

    @functools.cached_property
    def languages(self) -> set[str]:
        """What the answering models write: the main one's, plus Chinese when a Chinese model stands beside it."""
        from chatapp.model import model_languages

        return model_languages(self.settings.model) | ({"zh"} if self.chinese_model else set())

    def _render(self, question: str, history: list[dict], hits: list, mode: str, gen, template: str | None = None,
                model=None):
        """Prompt messages that fit the model's context: older turns are dropped first, then context is cut."""
        from chatapp.prompts import Rendered

        if self.prompts is None:
            messages = [*history, {"role": "user", "content": question}]
            return Rendered(messages=messages, template="(none)", version=0, mode="zero_shot", examples=[], generation={})
        model = model or self.model
        budget = model.context_tokens - gen.max_new_tokens
        while True:
            name = template if template and template in self.prompts.names() else None
            rendered = self.prompts.render(name, question=question, history=history, hits=hits, mode=mode)
            if not history and len(hits) <= 1 or model.count_tokens(rendered.messages) <= budget:
                return rendered
            if history:
                history = history[2:]
            else:
                hits = hits[:-1]

    def _finish(self, reply: Reply, question: str, session: Session, message_id: str, started: float, *,
                notice: str | None, user: str | None, rendered=None, first_token: float | None = None,
                model=None) -> Iterator[Reply]:
        """Record the turn in the session and the feedback log, then yield the final reply."""
        total_ms = (time.perf_counter() - started) * 1000
        reply.message_id, reply.done, reply.notice = message_id, True, notice
        session.history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply.text}]
        session.message_ids += [None, message_id]
        if self.feedback is not None:
            from chatapp.feedback import TurnRecord

            record = TurnRecord(
                message_id=message_id, session_id=session.session_id, user_message=question, answer=reply.text,
                history=session.history[:-2], prompt_messages=rendered.messages if rendered else [],
                retrieved=[{"chunk_id": h.chunk_id, "score": h.score, "source": h.source, "title": h.title}
                           for h in reply.citations],
                template=rendered.template if rendered else "", template_version=rendered.version if rendered else 0,
                mode=rendered.mode if rendered else "", model=(model or self.model).description,
                adapter=(model or self.model).adapter_version,
                first_token_ms=(first_token - started) * 1000 if first_token else None, total_ms=total_ms,
                handoff=reply.handoff, curated=reply.curated, user=user,
                evidence=[e.to_dict() for e in reply.evidence], guard=reply.guard, guard_replaced=reply.replaced,
            )
            try:
                self.feedback.log_turn(record)
            except Exception as exc:  # logging must never cost the user their answer
                log.exception("feedback log failed")
                reply.notice = _join(reply.notice, f"This answer could not be logged: {exc}")
        yield reply

    # ---------------------------------------------------------------------------------------------------------------
    # Feedback

    def rate(self, message_id: str, rating: int, correction: str | None = None, reason: str | None = None,
             user: str | None = None) -> str:
        """Store a rating; a correction also goes into the example bank at once, so the same question gets it next."""
        if self.feedback is None:
            raise RuntimeError("the feedback log is unavailable; the rating was not stored")
        from chatapp.feedback import FeedbackUnavailable

        correction = correction if correction and correction.strip() else None  # stored as given
        try:
            self.feedback.rate(message_id, rating, correction=correction, reason=reason or None, user=user)
        except FeedbackUnavailable as exc:  # kept in the spill file and saved once the database is back
            return f"⚠️ {exc}"
        if self.inbox is not None:
            self.inbox.set_rating(message_id, rating)
        if correction and self.prompts is not None:
            turn = self.feedback.turn(message_id)
            if turn:
                self.prompts.add_example(turn["user_message"], correction, source="correction")
                return "Thanks — the correction is stored and will be used from the next question on."
        return "Thanks for the feedback."

    def request_handoff(self, session: Session, reason: str = "user_request") -> str:
        """Hand the conversation to a person: logged for the support team, and the session stops answering itself."""
        session.handoff = reason
        last_id = next((m for m in reversed(session.message_ids) if m), None)
        if self.feedback is not None:
            self.feedback.log_handoff(session.session_id, last_id, reason)
        if self.inbox is None:
            return "A member of our support team has been asked to join. You can keep writing here in the meantime."
        from chatapp.conversations import queue_for_person

        return queue_for_person(self, session, reason)

    # ---------------------------------------------------------------------------------------------------------------
    # Conversations a person takes over (chatapp/conversations.py holds the logic; these are the UI's entry points)

    def chat(self, question: str, session: Session, *, user: str | None = None, **generation: Any) -> Iterator[Reply]:
        """`answer`, routed: while a person has the conversation the message goes to them; every turn is kept."""
        from chatapp.conversations import chat

        yield from chat(self, question, session, user=user, **generation)

    def open_conversation(self, conversation_id: str, user: str | None = None) -> Session:
        from chatapp.conversations import open_session

        return open_session(self, conversation_id, user)

    def agent_reply(self, conversation_id: str, agent: str, text: str):
        from chatapp.conversations import agent_reply

        return agent_reply(self, conversation_id, agent, text)


def _join(first: str | None, second: str) -> str:
    return f"{first} {second}" if first else second

