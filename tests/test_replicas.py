"""Two app processes (launch.py) on one Postgres, as behind a load balancer: a correction given on replica A is the
answer replica B gives next; an agent signed in on A's staff console sees a customer who asked for a person on B, and
the agent's reply reaches that customer's page on B within 2 seconds; an article saved in A's console is what B
retrieves after its refresh, each replica having its own knowledge folder. Real processes, real Postgres, real
browser."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

from chatapp.benchutil import message_text, start_app, stop_apps
from chatapp.config import REPO_ROOT
from conftest import ask, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def replicas(tiny_model_dir: Path, postgres, tmp_path_factory):
    """Replicas A and B: own data directories, ports and knowledge folders (the same file in each, as baked into an
    image), one database, one shared folder (adapter versions)."""
    root = tmp_path_factory.mktemp("replicas")
    name = postgres.createdb()
    url = postgres.url(name)
    for replica in ("a", "b"):
        (root / replica / "knowledge").mkdir(parents=True)
        shutil.copy(REPO_ROOT / "knowledge" / "refunds-and-returns.md", root / replica / "knowledge")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    config = root / "chatapp.toml"  # the database in the TOML file, as a deployment would write it
    config.write_text(f'database_url = "{url}"\n[generation]\nmax_new_tokens = 16\ntemperature = 0.0\n')
    # a re-tuned adapter already in the shared folder (registered, not active), as `chatapp tune` leaves one
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatapp.adapters import AdapterRegistry
    from chatapp.config import Settings

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(root / "lora")
    tuner = Settings(data_dir=root / "tuner", shared_dir=root / "shared", database_url=url)
    version = AdapterRegistry(tuner).add(root / "lora", {"note": "re-tuned"}).version
    apps, urls = [], []
    try:
        for replica in ("a", "b"):
            port = free_port()
            command = [sys.executable, str(REPO_ROOT / "launch.py"), "--model", str(tiny_model_dir),
                       "--backend", "transformers", "--threads", "1", "--data-dir", str(root / replica),
                       "--config", str(config), "--shared-dir", str(root / "shared"),
                       "--knowledge-dir", str(root / replica / "knowledge"),
                       "--port", str(port), "--auth", "ann:pw-ann", "--admin", "ann"]
            apps.append(start_app(command, root / f"{replica}.log", env, REPO_ROOT, timeout_s=300))
            urls.append(f"http://127.0.0.1:{port}/")
        yield {"urls": urls, "url": url, "db": name, "root": root, "version": version}
    finally:
        stop_apps(apps)
        postgres.dropdb(name)


def test_a_correction_on_replica_a_is_replica_bs_next_answer(replicas, browser):
    url_a, url_b = replicas["urls"]
    question = "Can I pay with a gift card at the checkout?"
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(url_a)
        ask(page, question)
        page.locator("#chatbot button[aria-label='Dislike']").last.click()
        page.locator("#correction-text textarea").wait_for(state="visible", timeout=10_000)
        page.locator("#correction-text textarea").fill("Yes: gift cards are accepted at checkout, with any card.")
        page.locator("#save-correction").click()
        page.locator("#hint").get_by_text("correction is stored").wait_for(timeout=10_000)
    finally:
        context.close()
    customer_b = Client(url_b, verbose=False)  # another customer, on the other replica, right after
    job = customer_b.submit(question, "auto", 0.0, 16, None, api_name="/chat")
    job.result(timeout=120)
    answer = message_text(job.outputs()[-1][0][-1]["content"])
    assert "gift cards are accepted at checkout" in answer, answer
    for replica in ("a", "b"):  # it went through Postgres: neither replica has a database of its own
        assert not (replicas["root"] / replica / "feedback.sqlite3").exists()


def test_a_promotion_on_replica_a_is_served_by_both(replicas, postgres):
    url_a, url_b = replicas["urls"]
    version = replicas["version"]
    admin = Client(url_a + "staff/", auth=("ann", "pw-ann"), verbose=False)
    assert f"{version} is now active" in admin.predict(version, api_name="/adapters_promote")[0]
    served = {}
    for replica, url in (("a", url_a), ("b", url_b)):
        customer = Client(url, verbose=False)
        job = customer.submit(f"Where is my refund? ({replica})", "auto", 0.0, 16, None, api_name="/chat")
        job.result(timeout=120)
        deadline = time.time() + 10
        while time.time() < deadline:  # the turn is written by the replica's feedback writer, at once
            rows = postgres.sql(f"SELECT adapter FROM turns WHERE user_message = 'Where is my refund? ({replica})'",
                                database=replicas["db"])
            if rows:
                served[replica] = rows[0][0]
                break
            time.sleep(0.2)
    assert served == {"a": version, "b": version}


def test_an_agent_on_replica_a_answers_a_customer_on_replica_b(replicas, browser):
    url_a, url_b = replicas["urls"]
    staff_context, customer_context = browser.new_context(), browser.new_context()
    try:
        ann = staff_context.new_page()
        ann.goto(url_a + "staff/")
        ann.fill("input[type=text]", "ann")
        ann.fill("input[type=password]", "pw-ann")
        ann.keyboard.press("Enter")
        ann.locator("#inbox-queue").wait_for(timeout=30_000)  # ann's console (on A) is open: she counts as online

        customer = customer_context.new_page()
        customer.goto(url_b)
        ask(customer, "My parcel 5150 never arrived")
        customer.locator("#handoff").click()
        customer.locator("#hint").get_by_text("in the queue").wait_for(timeout=10_000)  # B knows ann is online

        entry = ann.locator("#inbox-list label").filter(has_text="waiting").first
        entry.wait_for(timeout=15_000)  # B's customer is in A's inbox
        entry.click()
        ann.locator("#inbox-transcript").get_by_text("5150", exact=False).wait_for(timeout=10_000)
        ann.locator("#inbox-claim").click()
        ann.locator("#inbox-status").get_by_text("You have this conversation").wait_for(timeout=10_000)
        ann.locator("#inbox-reply-text textarea").fill("Hello from replica A: parcel 5150 ships today.")
        sent = time.monotonic()
        ann.locator("#inbox-send").click()
        customer.locator("#chatbot").get_by_text("parcel 5150 ships today", exact=False).wait_for(timeout=10_000)
        delivered = time.monotonic() - sent
        assert delivered < 2.0, f"the reply took {delivered:.2f}s to reach the customer on the other replica"
    finally:
        staff_context.close()
        customer_context.close()


def test_an_article_saved_on_replica_a_is_retrieved_by_replica_b(replicas, postgres):
    url_a, url_b = replicas["urls"]
    admin = Client(url_a + "staff/", auth=("ann", "pw-ann"), verbose=False)
    article = ("# Gift vouchers\n\nPaper gift vouchers from our partner shops are swapped for a store voucher at "
               "any till, within one year of purchase.\n")
    note = admin.predict("gift-vouchers.md", article, "", "new article", api_name="/gaps_article_save")[1]
    assert "Saved" in note, note
    customer = Client(url_b, verbose=False)
    deadline, sources, n = time.time() + 60, [], 0
    while time.time() < deadline and "gift-vouchers.md" not in sources:  # B refreshes at most every 10 s
        n += 1
        question = f"Can I swap a paper gift voucher from a partner shop? ({n})"
        customer.submit(question, "auto", 0.0, 16, None, api_name="/chat").result(timeout=120)
        for _ in range(50):  # the turn (with what was retrieved) is written by B's feedback writer
            found = postgres.sql(f"SELECT retrieved FROM turns WHERE user_message = '{question}'",
                                 database=replicas["db"])
            if found:
                sources = [hit.get("source") for hit in json.loads(found[0][0])]
                break
            time.sleep(0.2)
        time.sleep(2)
    assert "gift-vouchers.md" in sources, sources
    assert (replicas["root"] / "b" / "knowledge" / "gift-vouchers.md").read_text() == article


def test_a_customer_moved_to_the_other_replica_keeps_their_conversation(replicas, postgres):
    """The load balancer sends a customer's next message to the other replica (one died, or no affinity): B accepts
    the token A's page gave the browser (one key, in the database) and answers inside the same conversation."""
    from chatapp.access import BrowserTokens
    from chatapp.config import Settings

    url_a, url_b = replicas["urls"]
    probe = Settings(data_dir=replicas["root"] / "probe", database_url=replicas["url"])
    tokens = BrowserTokens.open(probe)  # the replicas' key, read as a third process would
    token = tokens.issue()  # what A's page put in the browser
    cid = tokens.conversation_id(token)
    for url, question in ((url_a, "Where is parcel 4711?"), (url_b, "And when will it arrive?")):
        Client(url, verbose=False).submit(question, "auto", 0.0, 16, token, api_name="/chat").result(timeout=120)
    deadline = time.time() + 10
    while time.time() < deadline:  # the transcript is written when each answer is final
        asked = [row[0] for row in postgres.sql(
            f"SELECT text FROM conversation_messages WHERE conversation_id = '{cid}' AND role = 'customer' "
            "ORDER BY id", database=replicas["db"])]
        if len(asked) == 2:
            break
        time.sleep(0.2)
    assert asked == ["Where is parcel 4711?", "And when will it arrive?"]
    history = postgres.sql("SELECT history FROM turns WHERE user_message = 'And when will it arrive?'",
                           database=replicas["db"])[0][0]
    assert "parcel 4711" in history  # B answered with A's part of the conversation in its prompt
    forged = BrowserTokens(b"\x01" * 32).issue()  # a key no replica has: B starts a new conversation instead
    Client(url_b, verbose=False).submit("Hello?", "auto", 0.0, 16, forged, api_name="/chat").result(timeout=120)
    assert postgres.sql(f"SELECT count(*) FROM conversation_messages WHERE conversation_id = "
                        f"'{tokens.conversation_id(forged)}'", database=replicas["db"]) == [(0,)]
