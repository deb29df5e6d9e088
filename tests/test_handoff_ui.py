"""The handoff in a real browser (Playwright + Debian's chromium), a customer and two agents in separate browser
contexts: ask for a person, claim, a live reply both ways (the pages' live requests, no polling through Gradio), a
second agent refused, hand back, and a restart; and the bot's answers streaming while an agent's inbox is open."""
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
        customer.locator("#hint").get_by_text("chatting with Ann").wait_for(timeout=3_000)  # the claim, live

        # an idle page asks Gradio nothing: its live request waits instead, and says when the reply is there
        calls: list[str] = []
        customer.on("request", lambda r: calls.append(r.url) if "/gradio_api/" in r.url or "/live/" in r.url
                    else None)
        customer.wait_for_timeout(2_000)
        assert not [u for u in calls if "/gradio_api/" in u], calls
        ann.locator("#inbox-reply-text textarea").fill("Hello, this is Ann. Let me look into it.")
        sent = time.monotonic()
        ann.locator("#inbox-send").click()
        customer.locator("#chatbot").get_by_text("Hello, this is Ann", exact=False).wait_for(timeout=10_000)
        delivered = time.monotonic() - sent
        assert delivered < 2.0, f"the reply took {delivered:.1f} s"  # the target, the agent's click included
        assert customer.locator("#chatbot").get_by_text("support team (a person)").count() >= 1
        arrival = [u for u in calls if "/gradio_api/" in u]
        assert len(arrival) == 1 and any("/live/customer" in u for u in calls), calls  # one fetch, on arrival
        customer.reload()  # still there after a reload, once
        customer.locator("#chatbot").get_by_text("Hello, this is Ann", exact=False).wait_for(timeout=30_000)
        assert customer.locator("#chatbot").get_by_text("Hello, this is Ann", exact=False).count() == 1

        asked = time.monotonic()
        ask(customer, "Thanks Ann, order 4711")
        ann.locator("#inbox-transcript").get_by_text("Thanks Ann, order 4711").wait_for(timeout=5_000)
        assert time.monotonic() - asked < 2.5  # the customer's message reaches the agent live too
        ann.locator("#inbox-reply-text textarea").fill("Found it: 4711 ships today.")
        ann.locator("#inbox-send").click()
        customer.locator("#chatbot").get_by_text("4711 ships today").wait_for(timeout=2_500)  # after a reload too

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


def test_answers_stream_while_an_inbox_is_open(browser, smollm2_dir: Path, tmp_path: Path):
    """An agent's console open beside customers' chats does not stop or clump the bot's streaming: the answer still
    arrives in many pieces, in the browser and through the API, while the inbox's live request is held open. The real
    model (transformers, no adapter): the tiny test model writes nothing a page would show."""
    from gradio_client import Client

    settings = Settings(data_dir=tmp_path / "data")
    settings.model.name, settings.model.backend, settings.model.threads = str(smollm2_dir), "transformers", 2
    settings.model.adapter = "none"
    settings.generation.max_new_tokens, settings.generation.temperature = 40, 0.0
    (tmp_path / "kb").mkdir()
    shutil.copy(REPO_ROOT / "knowledge" / "refunds-and-returns.md", tmp_path / "kb")
    settings.retrieval.knowledge_dir = tmp_path / "kb"
    bot, server = start(settings, free_port())
    url = server.local_url
    try:
        staff = browser.new_page()  # no staff logins configured: the local console is open
        staff.goto(url + "staff/")
        staff.locator("#inbox-queue").wait_for(timeout=30_000)
        staff.wait_for_function("() => window.chatappInbox && window.chatappInbox.running", timeout=10_000)
        customer = browser.new_page()
        customer.goto(url)
        customer.locator("#message textarea").wait_for(timeout=30_000)
        customer.evaluate("""() => { window.seen = new Set(); new MutationObserver(() => {
            const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
            if (bots.length) window.seen.add(bots[bots.length - 1].textContent); })
            .observe(document.body, {subtree: true, childList: true, characterData: true}); }""")
        ask(customer, "How do I return an item?")
        customer.wait_for_timeout(1_500)
        seen = customer.evaluate("() => [...window.seen]")
        assert len([t for t in seen if t.strip()]) >= 3, seen  # streamed: the bubble grew several times
        assert server.notifier.waiting() >= 1  # the inbox's live request was held all along

        job = Client(url, verbose=False).submit("Can I return a sale item?", "auto", 0.0, 40, None, api_name="/chat")
        job.result(timeout=120)
        texts = {str(out[0][-1]["content"]) for out in job.outputs() if out and out[0]}
        assert len(texts) >= 3, texts  # the API streams in pieces too
        staff.close()
        customer.close()
    finally:
        server.close()


def _conversation_ids(bot) -> list[str]:
    import sqlite3

    with sqlite3.connect(bot.settings.feedback_db) as conn:
        return [r[0] for r in conn.execute("SELECT conversation_id FROM conversations WHERE EXISTS (SELECT 1 FROM "
                                           "conversation_messages m WHERE m.conversation_id = conversations.conversation_id)")]
