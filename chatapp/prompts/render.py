"""The pieces of a prompt a template shapes: its langchain-core prompts, the retrieved context and the recent
history, each cut to the template's character budget (the default model's context is small)."""
from __future__ import annotations

from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder

from chatapp.prompts.template import Template


def compile_template(template: Template) -> tuple[ChatPromptTemplate, ChatPromptTemplate]:
    """The langchain-core prompts for a template: the whole chat, and one few-shot example (user -> answer)."""
    chat = ChatPromptTemplate.from_messages(
        [("system", template.system), MessagesPlaceholder("examples", optional=True),
         MessagesPlaceholder("history_messages", optional=True), ("human", template.user)],
        template_format="f-string",
    )
    example_user = template.few_shot.example_user if template.few_shot else None
    example = ChatPromptTemplate.from_messages(
        [("human", example_user or template.user), ("ai", "{answer}")], template_format="f-string"
    )
    return chat, example


def format_context(template: Template, hits: list) -> str:
    """Retrieved hits as short items, within the template's character budget (the default model's context
    is small; the first hits are the best, so they get the room)."""
    budget, items, seen = template.context_max_chars, [], set()
    for hit in hits or []:
        key = getattr(hit, "chunk_id", None) or id(hit)
        if key in seen:  # the same passage twice would only spend the small context budget
            continue
        seen.add(key)
        n = len(items) + 1
        text = str(getattr(hit, "text", "") or "")
        answer = str(getattr(hit, "answer", "") or "")
        if answer and answer not in text:
            text = f"{text} {answer}".strip()
        entity = str(getattr(hit, "entity", "") or "")
        entity = entity.title() if entity.isupper() else entity  # DSTC-style "ALLENBELL" -> "Allenbell"
        title = str(getattr(hit, "title", "") or "")
        if answer or getattr(hit, "kind", "") == "faq" or title.strip() == text.strip():
            title = entity or "FAQ"  # an FAQ's title is its question, already in `text`
        title = title or entity or str(getattr(hit, "source", "") or "")
        fields = {"n": n, "title": title, "text": "", "source": str(getattr(hit, "source", "") or ""),
                  "entity": entity, "score": f"{float(getattr(hit, 'score', 0.0) or 0.0):.2f}"}
        frame = len(template.context_item.format(**fields)) + 1
        room = budget - frame - sum(len(i) + 1 for i in items)
        if room < 40:
            break
        items.append(template.context_item.format(**{**fields, "text": clip(text, room)}))
    return "\n".join(items) or template.context_empty

def recent_history(template: Template, history: list[dict]) -> list[dict]:
    """The last turns that fit the budget, newest kept first; roles other than user/assistant dropped."""
    kept, budget = [], template.history_max_chars
    for message in reversed([m for m in history or [] if isinstance(m, dict)][-template.history_turns:]
                            if template.history_turns else []):
        role, content = message.get("role"), str(message.get("content") or "")
        if role not in ("user", "assistant") or not content.strip():
            continue
        content = clip(content, max(budget, 0))
        if not content:
            break
        kept.append({"role": role, "content": content})
        budget -= len(content)
    return kept[::-1]


def clip(text: str, limit: int) -> str:
    """Cut at a word boundary so a tiny model never sees half a word; '…' shows something was cut."""
    text = " ".join(text.split()) if "\n" not in text else text.strip()
    if len(text) <= limit:
        return text
    if limit <= 1:
        return ""
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip() + "…"
