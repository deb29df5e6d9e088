"""The Prompts tab in a real browser (Playwright + Debian's chromium, headless).

1. Tab level: edit a template, see validation errors with their line, preview with retrieved context, save a
   version, see history and diff, and be refused as a non-admin. The tab gets a small object exposing what a Bot
   exposes to it (`prompts`, `retriever`, `settings`, `model`, `is_admin`): wiring, not the thing under test.
2. Full app: the real server (`chatapp.ui.server.Server(Bot)`): edit and save in the staff console's Prompts tab,
   ask in the customer chat, and the next answer is produced from the new wording (checked in the turn the bot
   logged).
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from chatapp.config import REPO_ROOT, Settings
from chatapp.prompts import PromptManager
from conftest import free_port

pytestmark = pytest.mark.slow

NEW_WORDING = "Answer in exactly one sentence and sign off as Captain Zephyr."
OLD_WORDING = "Answer from the information given, in one to three short sentences"  # prompts/support.yaml line 6


@pytest.fixture(scope="module")
def embedder():
    from chatapp.embeddings import load_embedder

    return load_embedder("minilm")


@pytest.fixture(scope="module")
def retriever(embedder, tmp_path_factory):
    """The real retriever over one of the shipped knowledge articles (small, so the index builds in seconds)."""
    from chatapp.retrieval import Retriever

    root = tmp_path_factory.mktemp("kb")
    (root / "knowledge").mkdir()
    shutil.copy(REPO_ROOT / "knowledge" / "refunds-and-returns.md", root / "knowledge")
    settings = Settings(data_dir=root / "var")
    settings.retrieval.knowledge_dir = root / "knowledge"
    return Retriever.open(settings, embedder)


def launch(blocks: gr.Blocks) -> tuple[gr.Blocks, str]:
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return blocks, f"http://127.0.0.1:{port}/"


def set_editor(page, elem_id: str, text: str) -> None:
    """Replace a gr.Code editor's text the way a user would: select all, type."""
    editor = page.locator(f"#{elem_id} .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(text)


def editor_text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} .cm-content").inner_text()


def test_prompts_tab_edit_validate_preview_save(browser, tmp_path, embedder, retriever):
    from chatapp.ui.staff import prompts_tab

    settings = Settings(data_dir=tmp_path / "var")
    prompts = PromptManager(settings, embedder)
    role = {"admin": True}
    bot = SimpleNamespace(prompts=prompts, retriever=retriever, settings=settings, model=None,
                          is_admin=lambda request=None: role["admin"])
    with gr.Blocks() as blocks:
        with gr.Tab("Prompts"):
            prompts_tab.build(bot)
    app, url = launch(blocks)
    page = browser.new_page()
    try:
        page.goto(url)
        page.wait_for_selector("#prompts-editor .cm-content")
        shipped = prompts.text("support")
        page.wait_for_function("() => document.querySelector('#prompts-editor .cm-content')?.innerText"
                               ".includes('name: support')")

        # a mistake is reported with its line and column, and nothing is saved
        broken = shipped.replace("Customer: {question}", "Customer: {question} {tone}")
        set_editor(page, "prompts-editor", broken)
        page.click("#prompts-validate")
        line = broken.splitlines().index("  Customer: {question} {tone}") + 1
        page.wait_for_selector(f"#prompts-problems :text('line {line}, column 24')")
        assert "unknown variable {tone}" in page.inner_text("#prompts-problems")
        page.click("#prompts-save")
        page.wait_for_selector("#prompts-problems :text('Not saved')")
        assert prompts.latest_version("support") == 1

        # the fix, previewed with retrieved context, then saved with a message
        edited = shipped.replace(OLD_WORDING, NEW_WORDING)
        set_editor(page, "prompts-editor", edited)
        page.click("#prompts-validate")
        page.wait_for_selector("#prompts-problems :text('No problems found')")
        page.fill("#prompts-question textarea", "Can items be returned without a receipt?")
        page.click("#prompts-preview-btn")
        page.wait_for_selector("#prompts-preview :text('Captain Zephyr')")
        preview = page.inner_text("#prompts-preview")
        assert "Bronze: 90 days" in preview or "within 90 days of purchase" in preview
        assert re.search(r"\b[1-9] retrieved passage", preview)
        page.fill("#prompts-message textarea", "one sentence, signed")
        page.click("#prompts-save")
        page.wait_for_selector("#prompts-status :text('Saved support version 2')")
        assert prompts.text("support") == edited
        assert prompts.history("support")[-1]["message"] == "one sentence, signed"
        rendered = prompts.render(None, question="hi", history=[], hits=[])
        assert NEW_WORDING in rendered.messages[0]["content"]  # applies to the next message, no restart

        # history and diff
        page.get_by_text("Version history").click()
        page.wait_for_selector("#prompts-history :text('one sentence, signed'):visible")
        page.click("#prompts-diff-btn")
        page.wait_for_function("() => document.querySelector('#prompts-diff .cm-content')?.innerText"
                               ".includes('Captain Zephyr')")
        diff = editor_text(page, "prompts-diff")
        assert "+  " + NEW_WORDING in diff and "-  " + OLD_WORDING in diff

        # a second session editing from the same (now stale) version is told, not silently overwritten
        other = browser.new_page()
        other.goto(url)
        other.wait_for_function("() => document.querySelector('#prompts-editor .cm-content')?.innerText"
                                ".includes('Captain Zephyr')")
        prompts.save("support", edited.replace("Captain Zephyr", "Captain Kidd"), "from elsewhere")
        set_editor(other, "prompts-editor", edited.replace("Captain Zephyr", "Captain Hook"))
        other.click("#prompts-save")
        other.wait_for_selector("#prompts-problems :text('changed while you were editing')")
        assert "Captain Kidd" in prompts.text("support") and prompts.latest_version("support") == 3
        other.close()

        # the example bank: view it, add an example; the next render can pick it
        page.get_by_text("Example bank").click()
        page.wait_for_function("() => document.querySelector('#prompts-bank-text .cm-content')?.innerText"
                               ".includes('abcd-3695-2')")
        page.fill("#prompts-ex-question textarea", "Do you ship to the Moon?")
        page.fill("#prompts-ex-answer textarea", "Not yet, only to addresses on Earth.")
        page.click("#prompts-ex-add")
        page.wait_for_selector("#prompts-bank-status :text('Added')")
        assert prompts.examples("support")[-1]["answer"] == "Not yet, only to addresses on Earth."
        moon = prompts.render(None, question="Can you ship to the moon?", history=[], hits=[], mode="few_shot")
        assert moon.examples[0]["question"] == "Do you ship to the Moon?"

        # without admin rights nothing changes
        role["admin"] = False
        set_editor(page, "prompts-editor", shipped)
        page.click("#prompts-save")
        page.wait_for_selector("#prompts-problems :text('Only administrators')")
        assert prompts.latest_version("support") == 3
    finally:
        page.close()
        app.close()


def small_knowledge(settings: Settings, tmp_path: Path) -> None:
    """One shipped article instead of the whole folder: the same retrieval code, indexed in seconds."""
    (tmp_path / "knowledge").mkdir()
    shutil.copy(REPO_ROOT / "knowledge" / "refunds-and-returns.md", tmp_path / "knowledge")
    settings.retrieval.knowledge_dir = tmp_path / "knowledge"


def test_full_app_uses_the_saved_wording_in_the_next_answer(browser, settings: Settings, tmp_path):
    """The real app (chatapp.ui.server + Bot) with conftest's tiny model: save a new wording in the console's Prompts
    tab, ask in the customer chat, and the logged turn shows the answer was generated from that wording, version 2."""
    from chatapp.bot import Bot
    from chatapp.ui.server import Server

    small_knowledge(settings, tmp_path)
    bot = Bot.create(settings)
    assert bot.prompts is not None and bot.feedback is not None, bot.problems
    app = Server(bot, port=free_port()).start()
    url = app.local_url
    page = browser.new_page()
    try:
        page.goto(url + "staff/")
        page.get_by_role("tab", name="Prompts").click()
        page.wait_for_function("() => document.querySelector('#prompts-editor .cm-content')?.innerText"
                               ".includes('name: support')")
        edited = bot.prompts.text("support").replace(OLD_WORDING, NEW_WORDING)
        set_editor(page, "prompts-editor", edited)
        page.click("#prompts-preview-btn")
        page.wait_for_selector("#prompts-preview :text('Captain Zephyr')")
        page.fill("#prompts-message textarea", "signed answers")
        page.click("#prompts-save")
        page.wait_for_selector("#prompts-status :text('Saved support version 2')")

        page.goto(url)
        page.fill("#message textarea", "Can I return a pair of jeans?")
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message').length >= 2", timeout=120_000)
        deadline = time.time() + 120
        turn = None
        while time.time() < deadline and turn is None:
            bot.feedback.flush()
            turn = next(iter(_turns(bot)), None)
            time.sleep(0.5)
        assert turn is not None, "the answer was not logged"
        assert turn["template"] == "support" and turn["template_version"] == 2
        assert NEW_WORDING in turn["prompt_messages"][0]["content"]
        assert "90 days" in turn["prompt_messages"][-1]["content"]  # with the retrieved policy as context
    finally:
        page.close()
        app.close()


def _turns(bot) -> list[dict]:
    import sqlite3

    with sqlite3.connect(bot.settings.feedback_db) as conn:
        conn.row_factory = sqlite3.Row
        ids = [r["message_id"] for r in conn.execute("SELECT message_id FROM turns")]
    return [bot.feedback.turn(i) for i in ids]


def test_full_app_with_auth_only_admins_edit(browser, settings: Settings, tmp_path):
    """Real login, real `Bot.is_admin(request)`: a staff user can preview but not save; the admin can."""
    from chatapp.bot import Bot
    from chatapp.ui.server import Server

    settings.ui.auth = [("admin", "admin-pw"), ("staff", "staff-pw")]
    settings.ui.admins, settings.ui.agents = ["admin"], ["staff"]
    small_knowledge(settings, tmp_path)
    bot = Bot.create(settings)
    app = Server(bot, port=free_port()).start()
    url = app.local_url + "staff/"
    try:
        for user, password, may_save in (("staff", "staff-pw", False), ("admin", "admin-pw", True)):
            context = browser.new_context()
            page = context.new_page()
            page.goto(url)
            page.fill("input[type=text]", user)
            page.fill("input[type=password]", password)
            page.keyboard.press("Enter")
            page.get_by_role("tab", name="Prompts").click()
            page.wait_for_function("() => document.querySelector('#prompts-editor .cm-content')?.innerText"
                                   ".includes('name: support')")
            text = bot.prompts.text("support").replace(OLD_WORDING, f"Reply as {user}.")
            set_editor(page, "prompts-editor", text)
            page.click("#prompts-preview-btn")
            page.wait_for_selector(f"#prompts-preview :text('Reply as {user}.')")  # everyone may preview
            page.click("#prompts-save")
            if may_save:
                page.wait_for_selector("#prompts-status :text('Saved support version 2')")
            else:
                page.wait_for_selector("#prompts-problems :text('Only administrators')")
                assert bot.prompts.latest_version("support") == 1
            context.close()
        assert "Reply as admin." in bot.prompts.text("support")
    finally:
        app.close()
