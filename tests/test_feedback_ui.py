"""The Dashboard tab over a real feedback database, through a real Gradio server: gradio_client for the endpoints
(figures, export, who may export raw) and Playwright + Debian's chromium for what a person sees (escaped user text,
the plot, the health banner, the download). The tab gets a small object exposing what a Bot exposes to it
(`feedback`, `settings`, `is_admin`): wiring, not the thing under test."""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from gradio_client import Client

from chatapp.config import FeedbackSettings, Settings
from chatapp.feedback import FeedbackStore, TurnRecord, new_message_id
from chatapp.ui.staff import dashboard_tab
from conftest import serve_tab

XSS = "<img src=x onerror=\"window.__xss=1\"> <b>Where</b> is my refund?"


def fill(store: FeedbackStore) -> None:
    """Three days of answers: an HTML-laden question down-voted three times, personal data, a handoff."""
    for i in range(9):
        record = TurnRecord(new_message_id(), f"s{i % 3}", XSS if i % 3 == 0 else f"Question {i} from ann@example.com",
                            f"Answer {i}", first_token_ms=50.0 + i, total_ms=500.0 + 100 * i,
                            handoff="low confidence" if i == 4 else None, created_at=time.time() - 86400 * (i % 3))
        store.log_turn(record)
        store.rate(record.message_id, -1 if i % 3 == 0 else 1,
                   correction="Call us on +44 20 7946 0958" if i == 0 else None)
    store.log_handoff("s1", None, "customer asked for a person")
    store.flush()


def serve(store: FeedbackStore, tmp_path: Path, auth=None):
    """The tab alone in a Blocks; with auth on, only 'admin' is an admin (as `Bot.is_admin` does)."""
    def is_admin(request) -> bool:
        return not auth or getattr(request, "username", None) == "admin"

    bot = SimpleNamespace(feedback=store, settings=Settings(data_dir=tmp_path), is_admin=is_admin)
    return serve_tab("Dashboard", dashboard_tab, bot, auth)


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "feedback.sqlite3", FeedbackSettings(busy_timeout_s=0.3, retry_every_s=0.2))
    fill(s)
    yield s
    s.close()


def test_dashboard_endpoints_and_who_may_export_raw(store, tmp_path):
    demo, url = serve(store, tmp_path, auth=[("admin", "pw"), ("user", "pw")])
    try:
        user = Client(url, auth=("user", "pw"), verbose=False)
        health, counts, plot, latency, downvoted, handoffs, raw_box = user.predict("all", api_name="/dashboard_refresh")
        assert health["visible"] is False
        assert "| 9 | 3 | 9 | 6 | 3 | 67% | 1 |" in counts  # turns, sessions, rated, up, down, rate, corrections
        assert [row[1] for row in plot["data"]] == pytest.approx([1.0, 1.0, 0.0])  # today: all 👎 (the XSS one)
        assert "900 ms" in latency and "p95" in latency
        assert downvoted["data"][0][:3] == [XSS, 3, 0]  # stored and sent as given; the cell shows it as text
        assert {tuple(r) for r in handoffs["data"]} == {("requested", "customer asked for a person", 1),
                                                         ("offered", "low confidence", 1)}
        assert raw_box["visible"] is False  # a non-admin is not offered the raw export
        counts_day = user.predict("1", api_name="/dashboard_refresh")[1]
        assert "| 3 | 1 | 3 | 0 | 3 | 0% |" in counts_day  # only today's turns

        # Redacted by default; raw refused for a non-admin even when asked through the API.
        path, note = user.predict("kto", "", False, api_name="/dashboard_export")
        text = Path(path).read_text()
        assert "ann@example.com" not in text and "7946 0958" not in text and "[EMAIL]" in text
        assert "10 kto records" in note and "email" in note and "phone" in note
        path, note = user.predict("kto", "", True, api_name="/dashboard_export")
        assert path is None and "Only administrators" in note
        path, note = user.predict("dpo", "last tuesday", False, api_name="/dashboard_export")
        assert path is None and "Not a date" in note

        admin = Client(url, auth=("admin", "pw"), verbose=False)
        assert admin.predict("all", api_name="/dashboard_refresh")[6]["visible"] is True
        path, note = admin.predict("dpo", "2000-01-01", True, api_name="/dashboard_export")
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["chosen"][0]["content"] == "Call us on +44 20 7946 0958"
        assert "NOT redacted" in note
    finally:
        demo.close()


def test_unreadable_database_shows_a_banner(tmp_path):
    db = tmp_path / "feedback.sqlite3"
    db.write_bytes(b"not a database" * 500)
    broken = FeedbackStore(db, FeedbackSettings(busy_timeout_s=0.3, retry_every_s=60))
    demo, url = serve(broken, tmp_path)
    try:
        health, counts, *_ = Client(url, verbose=False).predict("all", api_name="/dashboard_refresh")
        assert health["visible"] is True and "corrupt" in health["value"] and str(db) in health["value"]
        assert "cannot be read" in counts
        path, note = Client(url, verbose=False).predict("sft", "", False, api_name="/dashboard_export")
        assert path is None and "corrupt" in note
    finally:
        demo.close()
        broken.close()


@pytest.mark.slow
def test_dashboard_in_a_browser(store, tmp_path, browser):
    demo, url = serve(store, tmp_path)  # auth off: the single user is an admin
    page = browser.new_page()
    try:
        page.goto(url)
        counts = page.locator("#dashboard-counts")
        counts.get_by_text("67%").wait_for(timeout=30_000)  # filled on load, no click needed
        table = page.locator("#dashboard-downvoted")
        table.get_by_text("<b>Where</b> is my refund?", exact=False).filter(visible=True).wait_for(timeout=10_000)
        assert table.locator("img").count() == 0 and table.locator("b").count() == 0  # shown as text, not HTML
        assert page.evaluate("window.__xss") is None
        page.locator("#dashboard-plot canvas, #dashboard-plot svg").first.wait_for(timeout=15_000)
        assert page.locator("#dashboard-latency").get_by_text("1,260 ms").count() == 1  # whole-answer p95

        page.locator("#dashboard-export").get_by_text("Export training data").click()
        page.locator("#export-raw").wait_for(state="visible", timeout=20_000)  # an admin is offered raw export (set on load)
        page.locator("#export-format").get_by_text("dpo", exact=True).click()
        with page.expect_download(timeout=30_000) as download:
            page.locator("#export-button").click()
            page.locator("#export-note").get_by_text("1 dpo records").wait_for(timeout=30_000)
            page.locator("#export-file a").first.click()
        saved = tmp_path / "downloaded.jsonl"
        download.value.save_as(saved)
        row = json.loads(saved.read_text())
        assert row["chosen"][0]["content"] == "Call us on [PHONE]"

        # Another program locks the database under the running app: the next refresh says so, then recovers.
        blocker = sqlite3.connect(store.db_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            store.log_turn(TurnRecord(new_message_id(), "s9", "asked while locked", "answer"))
            deadline = time.time() + 10
            while store.health() is None and time.time() < deadline:
                time.sleep(0.05)
            page.locator("#dashboard-refresh").click()
            banner = page.locator("#dashboard-health")
            banner.get_by_text("locked by another program", exact=False).wait_for(timeout=15_000)
            page.locator("#dashboard-counts").get_by_text("writes are waiting", exact=False).wait_for(timeout=5_000)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        store.flush()
        page.locator("#dashboard-refresh").click()
        banner.wait_for(state="hidden", timeout=15_000)
        page.locator("#dashboard-counts td").first.get_by_text("10", exact=True).wait_for(timeout=15_000)  # turns
    finally:
        page.close()
        demo.close()
