"""The customer chat in a real browser (Playwright + Debian's chromium): answer, 👎 + correction, the correction used at
once, the human handoff when nobody is signed in, and clear."""
from __future__ import annotations

from pathlib import Path

import pytest

from chatapp.bot import Bot
from chatapp.config import Settings
from chatapp.ui import build
from conftest import ask, free_port


@pytest.fixture(scope="module")
def page(tiny_model_dir: Path, tmp_path_factory, browser):
    settings = Settings(data_dir=tmp_path_factory.mktemp("chat-ui"))
    settings.model.name, settings.model.backend, settings.model.threads = str(tiny_model_dir), "transformers", 2
    settings.generation.max_new_tokens, settings.generation.temperature = 16, 0.0
    bot = Bot.create(settings)
    app = build(bot)
    port = free_port()
    app.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/")
    page.bot = bot  # the test reads the feedback log through the same bot the page uses
    yield page
    page.close()
    app.close()


def clear(page) -> None:
    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 0")


def last_bot_text(page) -> str:
    return page.locator("#chatbot [data-testid='bot']").last.inner_text()


def test_thumbs_down_correction_is_used_for_the_same_question(page):
    ask(page, "Can I pay with a gift card?")
    assert page.locator("#correction-text textarea").is_hidden()
    page.locator("#chatbot button[aria-label='Dislike']").last.click()
    page.locator("#correction-text textarea").wait_for(state="visible", timeout=10_000)
    page.locator("#correction-text textarea").fill("Yes — gift cards are accepted at checkout, together with any card.")
    page.locator("#correction-reason textarea").fill("it did not answer")
    page.locator("#save-correction").click()
    page.locator("#hint").get_by_text("correction is stored").wait_for(timeout=10_000)

    page.bot.feedback.flush()
    stats = page.bot.feedback.stats()
    assert stats, "the rating should be in the feedback log"

    clear(page)
    ask(page, "Can I pay with a gift card?")
    answer = last_bot_text(page)
    assert "gift cards are accepted at checkout" in answer and "Curated answer" in answer


def test_talk_to_a_person_with_nobody_signed_in_takes_a_message(page):
    """No agent has the console open: the bot says so and takes a message and a contact instead of promising one."""
    clear(page)
    ask(page, "Where is my parcel?")
    page.locator("#handoff").click()
    page.locator("#chatbot").get_by_text("Nobody from our support team is signed in").wait_for(timeout=10_000)
    page.locator("#contact input, #contact textarea").first.fill("ann@example.com")
    page.locator("#contact-message textarea").fill("Parcel 123 never arrived")
    page.locator("#contact-send").click()
    page.locator("#chatbot").get_by_text("your message is with our support team").wait_for(timeout=10_000)
    conversation = page.bot.inbox.open_conversations()[0]
    assert conversation.state == "waiting" and conversation.contact == "ann@example.com"
