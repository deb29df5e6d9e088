"""The handoff in a real browser (Playwright + Debian's chromium), a customer and two agents in separate browser
contexts: ask for a person, claim, a live reply both ways, a second agent refused, hand back, and a restart."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from chatapp.bot import Bot
from chatapp.config import REPO_ROOT, Settings
from conftest import free_port

pytestmark = pytest.mark.slow


def start(settings: Settings, port: int):
    from chatapp.ui.server import Server

    bot = Bot.create(settings)
    return bot, Server(bot, port=port).start()


def sign_in(browser, url: str, user: str, password: str):
    context = browser.new_context()
    page = context.new_page()
    page.goto(url + "staff/")
    page.fill("input[type=text]", user)
    page.fill("input[type=password]", password)
    page.keyboard.press("Enter")
    page.locator("#inbox-queue").wait_for(timeout=30_000)
    return context, page


def ask(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()
    page.wait_for_function("() => document.querySelector('#message textarea').value === ''", timeout=60_000)


def test_customer_and_agents_in_two_contexts(browser, tiny_model_dir: Path, tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data")
    settings.model.name, settings.model.backend, settings.model.threads = str(tiny_model_dir), "transformers", 2
    settings.generation.max_new_tokens, settings.generation.temperature = 16, 0.0
    settings.ui.auth = [("ann", "pw-ann"), ("bob", "pw-bob")]
    settings.ui.admins, settings.ui.agents = ["ann"], ["bob"]
    (tmp_path / "kb").mkdir()
    shutil.copy(REPO_ROOT / "knowledge" / "refunds-and-returns.md", tmp_path / "kb")
    settings.retrieval.knowledge_dir = tmp_path / "kb"
    port = free_port()
    bot, server = start(settings, port)
    url = server.local_url
    customer_context = browser.new_context()
    try:
        ann_context, ann = sign_in(browser, url, "ann", "pw-ann")
        customer = customer_context.new_page()
        customer.goto(url)
        ask(customer, "My parcel <b>never</b> arrived")
        customer.locator("#chatbot [data-testid='bot']").first.wait_for(timeout=60_000)
        customer.locator("#handoff").click()
        customer.locator("#hint").get_by_text("number 1 in the queue").wait_for(timeout=10_000)

        # the agent sees it, opens it (escaped text), claims it and replies; it reaches the customer live
        entry = ann.locator("#inbox-list label").filter(has_text="waiting").first
        entry.wait_for(timeout=10_000)
        entry.click()
        ann.locator("#inbox-transcript").get_by_text("<b>never</b>", exact=False).wait_for(timeout=10_000)
        assert ann.locator("#inbox-transcript b", has_text="never").count() == 0
        ann.locator("#inbox-claim").click()
        ann.locator("#inbox-status").get_by_text("You have this conversation").wait_for(timeout=10_000)
        ann.locator("#inbox-reply-text textarea").fill("Hello, this is Ann. Let me look into it.")
        sent = time.monotonic()
        ann.locator("#inbox-send").click()
        customer.locator("#chatbot").get_by_text("Hello, this is Ann", exact=False).wait_for(timeout=10_000)
        delivered = time.monotonic() - sent
        assert delivered < 3.0, f"the reply took {delivered:.1f} s"  # 2 s target + the click's own round trip
        assert customer.locator("#chatbot").get_by_text("support team (a person)").count() >= 1
        customer.locator("#hint").get_by_text("chatting with Ann").wait_for(timeout=5_000)

        ask(customer, "Thanks Ann, order 4711")
        ann.locator("#inbox-transcript").get_by_text("Thanks Ann, order 4711").wait_for(timeout=5_000)

        # a second agent cannot take it
        bob_context, bob = sign_in(browser, url, "bob", "pw-bob")
        bob_entry = bob.locator("#inbox-list label").filter(has_text="with agent").first
        bob_entry.wait_for(timeout=10_000)
        bob_entry.click()
        bob.locator("#inbox-claim").click()
        bob.locator("#inbox-status").get_by_text("Ann already has this conversation").wait_for(timeout=10_000)
        bob_context.close()

        # hand back: the bot answers the next question again
        ann.locator("#inbox-note textarea").fill("parcel re-sent")
        ann.locator("#inbox-handback").click()
        ann.locator("#inbox-status").get_by_text("Handed back").wait_for(timeout=10_000)
        customer.locator("#chatbot").get_by_text("handed the conversation back").wait_for(timeout=10_000)
        bots_before = customer.locator("#chatbot [data-testid='bot']").count()
        ask(customer, "How do I return an item?")
        customer.wait_for_function("n => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length > n",
                                   arg=bots_before, timeout=60_000)
        cid = bot.inbox.open_conversations() or None
        assert cid is None  # nothing waits any more
        ann_context.close()
    finally:
        server.close()
        bot.inbox.close()
        bot.feedback.close()

    # a restart: the same browser finds its conversation, and its state, again
    bot, server = start(settings, port)
    try:
        customer = customer_context.pages[0]
        customer.reload()
        customer.locator("#chatbot").get_by_text("Hello, this is Ann", exact=False).wait_for(timeout=30_000)
        customer.locator("#chatbot").get_by_text("Thanks Ann, order 4711").wait_for(timeout=5_000)
        conversation = next(iter(bot.inbox.figures()["days"].values()))
        assert conversation["handoff_rate"] == 1.0
        states = {bot.inbox.get(cid).state for cid in _conversation_ids(bot)}
        assert states == {"bot"}
    finally:
        customer_context.close()
        server.close()


def _conversation_ids(bot) -> list[str]:
    import sqlite3

    with sqlite3.connect(bot.settings.feedback_db) as conn:
        return [r[0] for r in conn.execute("SELECT conversation_id FROM conversations WHERE EXISTS (SELECT 1 FROM "
                                           "conversation_messages m WHERE m.conversation_id = conversations.conversation_id)")]
