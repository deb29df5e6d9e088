"""The two surfaces and the human handoff: the customer app's API holds no staff endpoint and opens no one else's
conversation (gradio_client), the inbox rules (claim, reply, hand back, resolve, persistence), roles and logins,
and learning from agents. The browser walk-through is tests/test_handoff_ui.py."""
from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

from chatapp.access import Accounts, BrowserTokens, ExpiringTokens
from chatapp.benchutil import message_text
from chatapp.bot import Bot
from chatapp.config import REPO_ROOT, Settings
from chatapp.inbox import Inbox
from conftest import free_port

CUSTOMER_ENDPOINTS = {"/chat", "/poll", "/stop", "/clear", "/rate", "/correct", "/handoff"}


def small_knowledge(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "kb").mkdir(exist_ok=True)
    shutil.copy(REPO_ROOT / "knowledge" / "refunds-and-returns.md", tmp_path / "kb")
    settings.retrieval.knowledge_dir = tmp_path / "kb"


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory):
    from chatapp.ui.server import Server

    root = tmp_path_factory.mktemp("handoff")
    settings = Settings(data_dir=root / "data")
    settings.model.name, settings.model.backend, settings.model.threads = str(tiny_model_dir), "transformers", 2
    settings.generation.max_new_tokens, settings.generation.temperature = 16, 0.0
    settings.ui.auth = [("boss", "pw-boss"), ("ann", "pw-ann"), ("cust", "pw-cust"), ("other", "pw-other")]
    settings.ui.admins, settings.ui.agents = ["boss"], ["ann"]
    small_knowledge(settings, root)
    bot = Bot.create(settings)
    server = Server(bot, port=free_port()).start()
    yield bot, server.local_url, server
    server.close()


def chat(client: Client, text: str, token=None):
    job = client.submit(text, "auto", 0.0, 16, token, api_name="/chat")
    job.result(timeout=120)
    return job.outputs()[-1]


def test_customer_api_lists_no_staff_endpoint(served):
    bot, url, server = served
    customer = Client(url, auth=("cust", "pw-cust"), verbose=False)
    names = set(customer.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert names <= CUSTOMER_ENDPOINTS, names
    widget = Client(url + "widget/", auth=("cust", "pw-cust"), verbose=False)
    assert set(widget.view_api(return_format="dict", print_info=False)["named_endpoints"]) <= CUSTOMER_ENDPOINTS
    # the console is another app: a customer account cannot sign in there, and nothing is served without a login
    with pytest.raises(Exception):
        Client(url + "staff/", auth=("cust", "pw-cust"), verbose=False)
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url + "staff/gradio_api/info")
    mounts = {r.path: r.app for r in server.app.routes if hasattr(r, "app") and hasattr(r.app, "tokens")}
    assert isinstance(mounts["/staff"].tokens, ExpiringTokens)  # staff logins expire (ui.staff_session_s)
    staff = Client(url + "staff/", auth=("ann", "pw-ann"), verbose=False)
    assert "/dashboard_export" in staff.view_api(return_format="dict", print_info=False)["named_endpoints"]


def test_a_customer_cannot_open_another_customers_conversation(served):
    bot, url, server = served
    alice = Client(url, auth=("cust", "pw-cust"), verbose=False)
    chat(alice, "My order number is 4711, where is it?")
    alice.predict(None, api_name="/handoff")
    cid = next(c.conversation_id for c in bot.inbox.open_conversations()
               if any("4711" in m.text for m in bot.inbox.messages(c.conversation_id)))
    before = len(bot.inbox.messages(cid))
    for guess in (cid, f"{cid}.{'0' * 32}", cid[:16] + "." + cid[16:]):  # replayed / forged ids
        mallory = Client(url, auth=("other", "pw-other"), verbose=False)
        chatbot = chat(mallory, "Show me my conversation", token=guess)[0]
        assert all("4711" not in message_text(m["content"]) for m in chatbot)
    assert len(bot.inbox.messages(cid)) == before  # nothing written into Alice's conversation either
    bot.inbox.claim(cid, "ann", "Ann")
    bot.agent_reply(cid, "ann", "Parcel 4711 ships today <script>x</script>")
    chatbot = alice.predict(api_name="/poll")[0]
    last = message_text(chatbot[-1]["content"])
    assert "Parcel 4711 ships today &lt;script&gt;" in last and "Ann" in last and "a person" in last
    assert "4711" not in str(mallory.predict(api_name="/poll"))  # the last guesser's poll: nothing of Alice's


def test_roles_tokens_and_slowed_logins(tmp_path):
    settings = Settings(data_dir=tmp_path)
    settings.ui.auth = [("boss", "a"), ("ann", "b"), ("cust", "c")]
    settings.ui.admins, settings.ui.agents = ["boss"], ["ann"]
    accounts = Accounts(settings.ui, fail_free=2, max_delay_s=0.4)
    assert (accounts.role("boss"), accounts.role("ann"), accounts.role("cust")) == ("admin", "agent", "customer")
    staff_check = accounts.checker(accounts.staff)

    def check(user: str, password: str) -> bool:  # in a thread: Playwright's sync API may own this one's loop
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, staff_check(user, password)).result()
    assert check("ann", "b") and not check("cust", "c")
    for _ in range(3):
        check("ann", "wrong")
    started = time.monotonic()
    assert not check("ann", "wrong")
    assert time.monotonic() - started >= 0.2  # slowed down after repeated failures
    tokens = ExpiringTokens(ttl_s=0.2)
    tokens["t"] = "ann"
    assert tokens.get("t") == "ann"
    time.sleep(0.3)
    assert tokens.get("t") is None and "t" not in tokens
    browser = BrowserTokens(tmp_path / "browser.key")
    token = browser.issue()
    assert browser.valid(token) and not browser.valid(token[:-1] + ("1" if token[-1] == "0" else "0"))
    assert not browser.valid("x")
    assert BrowserTokens(tmp_path / "browser.key").valid(token)  # same key after a restart


def test_auth_file_roles_and_a_malformed_line(tmp_path):
    from chatapp.cli import add_common_flags, add_serve_flags, settings_from_args, serve
    import argparse

    parser = argparse.ArgumentParser()
    add_common_flags(parser)
    add_serve_flags(parser)
    good = tmp_path / "users.txt"
    good.write_text("# staff\nboss:pw:admin\nann:pw2:agent:Ann Smith\ncust:p:w:d\n")
    settings = settings_from_args(parser.parse_args(["--auth-file", str(good), "--data-dir", str(tmp_path)]))
    assert settings.ui.admins == ["boss"] and settings.ui.agents == ["ann"]
    assert dict(settings.ui.auth)["cust"] == "p:w:d" and settings.ui.display_names["ann"] == "Ann Smith"
    bad = tmp_path / "bad.txt"
    bad.write_text("boss:pw:admin\njust-a-name\n")
    with pytest.raises(SystemExit, match=r"bad.txt:2"):
        settings_from_args(parser.parse_args(["--auth-file", str(bad)]))
    public = settings_from_args(parser.parse_args(["--host", "0.0.0.0", "--data-dir", str(tmp_path)]))
    assert serve(public) == 2  # beyond localhost the console needs a staff login


def test_agent_answer_is_learned_and_exported(settings: Settings, tmp_path: Path):
    small_knowledge(settings, tmp_path)
    bot = Bot.create(settings)
    from chatapp.bot import Session

    session = bot.open_conversation("conv-learn")
    bot.inbox.add("conv-learn", "customer", "Do you ship to Mars?")
    bot.inbox.add("conv-learn", "bot", "I'd rather not guess", meta={"handoff": "low_confidence", "message_id": "m"})
    bot.request_handoff(session)
    bot.inbox.claim("conv-learn", "ann", "Ann")
    bot.agent_reply("conv-learn", "ann", "Not yet: we ship to Earth addresses only.")
    bot.agent_reply("conv-learn", "ann", "Anything else?")  # only the answer to the question is learned
    assert bot.prompts.find_curated("Do you ship to Mars?")["answer"] == "Not yet: we ship to Earth addresses only."
    bot.feedback.flush()
    records, _ = bot.feedback.export("sft")
    learned = [r for r in records if r["meta"]["template"] == "agent"]
    assert len(learned) == 1 and learned[0]["messages"][-1]["content"].startswith("Not yet")
    assert isinstance(session, Session)
    bot.feedback.close()


def test_operator_figures(tmp_path):
    from chatapp.ui.staff.dashboard_tab import _operator_table

    inbox = Inbox(tmp_path / "feedback.sqlite3")
    for cid in ("contained", "helped", "queued"):
        inbox.ensure(cid)
        inbox.add(cid, "customer", "hello")
    inbox.close_by_customer("contained")
    inbox.rate_conversation("contained", 5)
    inbox.request_person("helped", "user_request")
    with sqlite3.connect(tmp_path / "feedback.sqlite3") as conn:
        conn.execute("UPDATE conversations SET waiting_since = waiting_since - 4 WHERE conversation_id = 'helped'")
    conn.close()
    inbox.reply("helped", "ann", "Ann", "Here I am")
    inbox.resolve("helped", "ann")
    inbox.rate_conversation("helped", 3)
    inbox.request_person("queued", "downvoted")
    period = inbox.figures()["period"]
    assert period["conversations"] == 3 and period["containment"] == pytest.approx(1 / 3)
    assert period["handoff_rate"] == pytest.approx(2 / 3) and 4 <= period["first_reply_p95_s"] < 6
    assert period["csat"] == 4.0 and period["csat_n"] == 2
    table = _operator_table(inbox.figures())
    assert "| **Period** | 3 | 33% | 67% | 4 s | 4 s | 4.0 / 5 (2) |" in table


def test_widget_is_served_without_third_party_requests(served):
    import re

    bot, url, server = served
    script = urllib.request.urlopen(url + "widget.js").read().decode()
    assert "/widget/" in script and "iframe" in script
    from chatapp.ui.server import widget_snippet

    assert 'src="http://shop.example:7860/widget.js"' in widget_snippet("http://shop.example:7860/")
    page = urllib.request.urlopen(url + "widget/").read().decode()
    external = {u for u in re.findall(r'(?:src|href)=["\'](https?://[^"\']+)', page) if not u.startswith(url)}
    assert not external, external


def test_no_promise_when_nobody_can_come(settings: Settings, tmp_path: Path):
    import datetime as dt

    small_knowledge(settings, tmp_path)
    tomorrow = "mon tue wed thu fri sat sun".split()[(dt.datetime.now().weekday() + 1) % 7]
    settings.ui.support_hours = f"{tomorrow} 00:00-24:00"
    bot = Bot.create(settings)
    try:
        outside = bot.request_handoff(bot.open_conversation("after-hours"))
        assert f"available {tomorrow} 00:00-24:00" in outside and "email address or phone number" in outside
        settings.ui.support_hours = ""
        nobody = bot.request_handoff(bot.open_conversation("no-agent"))
        assert "Nobody from our support team is signed in" in nobody and "will reply" not in nobody
        bot.inbox.seen("ann")
        online = bot.request_handoff(bot.open_conversation("with-agent"))
        assert "number 3 in the queue" in online  # the two earlier ones wait too, for a reply later
    finally:
        bot.feedback.close()
    from chatapp.cli import settings_from_args, add_common_flags, add_serve_flags
    import argparse

    parser = argparse.ArgumentParser()
    add_common_flags(parser)
    add_serve_flags(parser)
    with pytest.raises(SystemExit, match="support hours"):
        settings_from_args(parser.parse_args(["--support-hours", "9 to 5"]))


def test_live_requests_wake_on_a_reply_and_open_only_the_callers_conversation(served):
    """The customer page's live request (POST live/customer): it answers within a moment of an agent's reply, written
    in this process (the notifier) or by another one (the re-check); a forged token, a token bound to another login,
    or bad input get a clear refusal and nothing else; the staff route needs a staff login."""
    import threading

    import httpx

    bot, url, server = served
    server.live.hold_s = 3.0  # a held request answers "unchanged" after this long (20 s in the app)
    tokens = bot.browser_tokens  # the app's own: these are tokens its pages could hold
    token = tokens.issue()  # what a browser holds
    alice = Client(url, auth=("cust", "pw-cust"), verbose=False)
    chat(alice, "Where is parcel 5150?", token=token)
    alice.predict(token, api_name="/handoff")
    cid = tokens.conversation_id(token)
    assert bot.inbox.get(cid).user == "cust"
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("login", data={"username": "cust", "password": "pw-cust"}).status_code == 200
        first = http.post("live/customer", json={"token": token, "after": 0, "position": None}).json()
        position = bot.inbox.queue_position(cid)
        assert first["changed"] and first["position"] == position >= 1  # the page catches up once: it waits
        quiet = time.monotonic()
        idle = http.post("live/customer", json={"token": token, "after": first["after"], "position": position}).json()
        assert not idle["changed"] and time.monotonic() - quiet >= 2.5  # held while nothing happens

        def reply_later(text: str, store) -> None:
            time.sleep(0.8)
            store.reply(cid, "ann", "Ann", text)

        for text, store in (("In-process reply", bot.inbox), ("Reply from another replica",
                                                              Inbox(bot.settings.feedback_db))):
            after = max(m.id for m in bot.inbox.messages(cid))
            threading.Thread(target=reply_later, args=(text, store)).start()
            started = time.monotonic()
            woke = http.post("live/customer", json={"token": token, "after": after,
                                                    "position": bot.inbox.queue_position(cid)}).json()
            waited = time.monotonic() - started
            assert woke["changed"] and 0.7 < waited < 1.8, (text, waited)  # the re-check: within ~0.5 s
            shown = message_text(alice.predict(api_name="/poll")[0][-1]["content"])
            assert text in shown and "a person" in shown

        # someone else's conversation: a forged token, the right token without the right login, bad input
        forged = token[:-1] + ("0" if token[-1] != "0" else "1")
        for body in ({"token": forged}, {"token": cid}, {"token": None}):
            refused = http.post("live/customer", json=body)
            assert refused.status_code == 403 and "reload the page" in refused.json()["error"]
            assert "after" not in refused.json()
    with httpx.Client(base_url=url, timeout=30) as other:
        other.post("login", data={"username": "other", "password": "pw-other"})
        refused = other.post("live/customer", json={"token": token})
        assert refused.status_code == 403 and refused.json() == {"error": "This conversation belongs to another account."}
        for bad in ({"token": token, "after": "x"}, {"token": token, "after": -1}):
            assert other.post("live/customer", json=bad).status_code == 400
        assert other.post("live/customer", content=b"not json").json()["error"] == "The request body must be JSON."
        assert other.post("live/customer", content=b"x" * 5000).status_code == 413
        # the inbox's live route is the console's: customers and strangers are refused
        assert other.post("staff/live/inbox", json={}).status_code == 401
    with httpx.Client(base_url=url, timeout=30) as agent:
        agent.post("staff/login", data={"username": "ann", "password": "pw-ann"})
        state = agent.post("staff/live/inbox", json={"since": None, "cid": None}).json()
        assert state["changed"]
        started = time.monotonic()
        threading.Thread(target=lambda: (time.sleep(0.5), bot.inbox.add(cid, "customer", "still there?"))).start()
        assert agent.post("staff/live/inbox", json={"since": state["since"], "cid": None}).json()["changed"]
        assert time.monotonic() - started < 1.5  # a customer's message reaches the agent's inbox at once
    assert "ann" in bot.inbox.agents_online()  # an open inbox counts as signed in


def test_customer_endpoints_are_throttled_per_address_and_the_app_stays_up(served):
    """Over the per-address limit a customer request gets 429 with a message to wait (an API client gets the 429);
    the console is not throttled, and once the bucket refills the same address chats again."""
    import httpx

    bot, url, server = served
    throttle = server.throttle
    saved = throttle.per_s, throttle.burst
    throttle.per_s, throttle.burst = 0.5, 4
    throttle.clear()
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            codes = [http.post("live/customer", json={"token": "x"}).status_code for _ in range(6)]
            assert codes[:4] == [403] * 4 and codes[4:] == [429, 429], codes
            refused = http.post("widget/live/customer", json={"token": "x"})
            assert refused.status_code == 429 and "wait a few seconds" in refused.json()["error"]
            assert int(refused.headers["retry-after"]) >= 1
            assert http.get("").status_code == 200 and http.get("widget.js").status_code == 200  # pages still load
            assert http.post("staff/live/inbox", json={}).status_code == 401  # the console: its own rules
        with pytest.raises(Exception, match="429 Too Many Requests"):  # gradio_client shows the status; a page the text
            Client(url, auth=("cust", "pw-cust"), verbose=False).predict("Hello?", "auto", 0.0, 16, None,
                                                                         api_name="/chat")
    finally:
        throttle.per_s, throttle.burst = saved
        throttle.clear()
    assert chat(Client(url, auth=("cust", "pw-cust"), verbose=False), "Hello again")[0]  # the app carries on
