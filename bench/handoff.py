"""The human handoff under load: 20 customers connected and chatting through the real app (launch.py in a
subprocess, one gradio_client.Client per customer, each with its own signed browser token), in phases of equal
length:

- bot_only:         customers chat with the bot; no live request is open (the baseline);
- everyone_listens: every customer also holds the page's live request open (`POST /live/customer`, a long-poll,
                    chatapp/ui/live.py) and calls /poll once when it answers "changed", as every open page now does;
- handoff_live:     the same, and HANDED of the customers handed to an agent, who replies to each every few
                    seconds, with the staff console's Inbox tab open in a browser (Debian chromium, its own long-poll);
- everyone_polls:   (only with --phases ...,everyone_polls) the old way: every customer calls /poll once a second.

Figures: the bot's first-token time (submit -> first streamed text, p50/p95, customers chatting with the bot) per
phase, and agent-to-customer delivery (the agent's reply written -> it is in what the customer's /poll returned,
p50/p95). The agent writes its replies straight into the shared SQLite database from this process, i.e. from
another process than the app's (as another replica would): they are found by the live request's 0.5 s re-check, not
by the in-process wake-up a reply sent from the console gets. Usage: .venv/bin/python bench/handoff.py
[--customers 20] [--phase-s 60]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatapp.benchutil import free_port, message_text, start_app, stop_apps, write_result  # noqa: E402
from chatapp.config import Settings  # noqa: E402

QUESTIONS = ["How do I return an item?", "Can I pay with a gift card?", "How long does shipping take?",
             "What is your refund policy for sale items?", "How do I change my delivery address?",
             "Do gold members get free shipping?", "Can I exchange a shirt for another size?",
             "My promo code does not work, why?", "How do I reset my password?", "Where is my order?"]
CHROMIUM = "/usr/bin/chromium"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))], 3)


def first_token_s(client, question: str, max_tokens: int, token: str | None = None) -> float | None:
    """Seconds from submitting a question to the first streamed piece of the bot's answer."""
    started = time.perf_counter()
    job = client.submit(question, "auto", 0.3, max_tokens, token, api_name="/chat")
    first = None
    while True:
        done = job.done()
        for output in job.outputs():
            bubbles = output[0] if output else []
            if first is None and bubbles and bubbles[-1].get("role") == "assistant" and \
                    message_text(bubbles[-1]["content"]).strip() not in ("", "…"):
                first = time.perf_counter() - started
        if done:
            return first
        time.sleep(0.05)  # 20 threads checking more often would take the app's CPU


class Customer(threading.Thread):
    def __init__(self, url: str, n: int, stop: threading.Event, args, token: str):
        super().__init__(daemon=True)
        from gradio_client import Client

        self.client = Client(url, verbose=False)
        self.url, self.token = url, token  # the token a browser keeps: /chat opens its conversation, live/ follows it
        self.n, self.stop, self.args = n, stop, args
        self.polling = threading.Event()  # the old way: /poll every second
        self.listening = threading.Event()  # the page's way: the live request, /poll when it says so
        self.live_requests = 0
        self.handed = threading.Event()
        self.ttft: list[tuple[str, float]] = []  # (phase, seconds)
        self.delivered: list[float] = []
        self.slow: list[tuple] = []  # (seconds, customer, marker, via, written at) per reply, for the slowest
        self.via: dict[str, list[float]] = {"poll": [], "chat": []}  # which response brought it
        self.stages: dict[str, list[float]] = {"to_live_answer": [], "poll_call": []}  # the live path's two legs
        self.expect: dict[str, float] = {}  # reply marker -> time it was written
        self.phase = "bot_only"
        self.lock = threading.Lock()

    def run(self) -> None:
        rng = random.Random(self.n)
        threading.Thread(target=self.poll_loop, daemon=True).start()
        threading.Thread(target=self.listen_loop, daemon=True).start()
        time.sleep(rng.uniform(0, self.args.pace[1]))  # arrivals spread out
        while not self.stop.is_set():
            if self.handed.is_set():  # a message to the agent; its answer shows what arrived meanwhile too
                self.arrived(str(self.client.predict(f"(customer {self.n}) still there?", "auto", 0.3, 16,
                                                     self.token, api_name="/chat")), "chat")
            else:
                phase = self.phase  # an answer counts for the phase it was asked in
                ttft = first_token_s(self.client, rng.choice(QUESTIONS), self.args.max_tokens, self.token)
                if ttft is not None:
                    self.ttft.append((phase, ttft))
            self.stop.wait(rng.uniform(*self.args.pace))  # reading and typing

    def arrived(self, text: str, via: str = "poll", live_at: float | None = None) -> None:
        """Note the agent replies that `text` (what the customer's page got) contains; `live_at`: when the live
        request that led to it answered."""
        now = time.time()
        with self.lock:
            for marker, sent in list(self.expect.items()):
                if marker in text:
                    self.delivered.append(now - sent)
                    self.via[via].append(now - sent)
                    self.slow.append((round(now - sent, 2), self.n, marker, via, round(sent, 2)))
                    if live_at is not None:
                        self.stages["to_live_answer"].append(max(0.0, live_at - sent))
                        self.stages["poll_call"].append(now - live_at)
                    del self.expect[marker]

    def poll_loop(self) -> None:
        while not self.stop.is_set():
            if not self.polling.is_set():
                time.sleep(0.2)
                continue
            started = time.monotonic()
            try:
                text = self.poll()
            except Exception:
                text = ""
            self.arrived(text)
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))  # the old page's gr.Timer(1.0)

    def poll(self, http=None) -> str:
        """/poll the way the page calls it: a direct request (queue=False), in this client's Gradio session. (Through
        gradio_client it would wait in Gradio's queue behind the streaming answers, which a page's call does not.)"""
        import httpx

        body = {"data": [None, None], "session_hash": self.client.session_hash}
        answer = (http or httpx).post(self.url + "gradio_api/run/poll", json=body, timeout=60)
        answer.raise_for_status()
        return json.dumps(answer.json().get("data"))

    def listen_loop(self) -> None:
        """What the page's CUSTOMER_JS does: hold `POST live/customer` open; when it says changed, call /poll."""
        import httpx

        after, position = 0, None
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                if not self.listening.is_set():
                    time.sleep(0.2)
                    continue
                try:
                    answer = http.post(self.url + "live/customer",
                                       json={"token": self.token, "after": after, "position": position})
                    answer.raise_for_status()
                    data = answer.json()
                    self.live_requests += 1
                    after, position = data["after"], data["position"]
                    if data["changed"]:
                        live_at = time.time()
                        self.arrived(self.poll(http), "poll", live_at)
                except Exception:
                    self.stop.wait(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=20)
    parser.add_argument("--handed", type=int, default=5, help="customers handed to an agent in the last phase")
    parser.add_argument("--phase-s", type=float, default=60.0)
    parser.add_argument("--pace", type=float, nargs=2, default=[8.0, 20.0],
                        help="seconds between a customer's messages (README's 'quick pace')")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backend", default="llamacpp", choices=["llamacpp", "transformers"])
    parser.add_argument("--threads", type=int, default=0, help="the app's CPU threads (default: all cores)")
    parser.add_argument("--phases", default="bot_only,everyone_listens,handoff_live",
                        help="comma-separated, in order; handoff_live last; everyone_polls = the old 1 s poll")
    args = parser.parse_args(argv)
    order = [p.strip() for p in args.phases.split(",") if p.strip()]
    known = {"bot_only", "everyone_listens", "everyone_polls", "handoff_live"}
    if set(order) - known or order[-1:] != ["handoff_live"]:
        parser.error(f"--phases: names from {sorted(known)}, ending with handoff_live (it measures delivery)")

    data_dir = Path(tempfile.mkdtemp(prefix="bench-handoff-"))
    (data_dir / "models").symlink_to(Settings().model_cache_dir.resolve(), target_is_directory=True)  # warm start
    port, log_path = free_port(), data_dir / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    config = data_dir / "bench.toml"  # 20 customers behind one address: the per-address limit is raised, not off
    config.write_text("[ui]\nthrottle_per_s = 100.0\nthrottle_burst = 400\nthrottle_live = 100\n")
    command = [sys.executable, str(ROOT / "launch.py"), "--config", str(config), "--port", str(port),
               "--data-dir", str(data_dir),
               "--backend", args.backend, "--adapter", "none"] + (["--threads", str(args.threads)] if args.threads else [])
    app = start_app(command, log_path, env, ROOT)
    stop = threading.Event()
    try:
        url = f"http://127.0.0.1:{port}/"
        from chatapp.access import BrowserTokens

        tokens = BrowserTokens(data_dir / "browser.key")  # the app's key: these are tokens its pages could hold
        customers = [Customer(url, n, stop, args, tokens.issue()) for n in range(args.customers)]
        first_token_s(customers[0].client, "Hello, is anyone there?", 16, customers[0].token)  # warm-up
        from gradio_client import Client

        alone = [first_token_s(Client(url, verbose=False), q, args.max_tokens) for q in QUESTIONS[:5]]
        alone = [t for t in alone if t is not None]
        for customer in customers:
            customer.start()
        phases: dict[str, dict] = {}
        load: dict[str, list[float]] = {}

        def run_phase(name: str) -> None:
            for customer in customers:
                customer.phase = name
            started = time.time()
            time.sleep(args.phase_s)
            load[name] = list(os.getloadavg())
            phases[name] = {"seconds": round(time.time() - started, 1)}

        for name in order[:-1]:
            for customer in customers:
                customer.listening.clear()
                customer.polling.clear()
                (customer.listening if name == "everyone_listens" else customer.polling if name == "everyone_polls"
                 else threading.Event()).set()
            run_phase(name)
        for customer in customers:  # handoff_live: every page listens, as every open page does
            customer.polling.clear()
            customer.listening.set()

        from playwright.sync_api import sync_playwright

        from chatapp.inbox import Inbox

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page()
            page.goto(url + "staff/")
            page.locator("#inbox-queue").wait_for(timeout=60_000)
            time.sleep(1)  # the inbox's live request has marked the agent as signed in
            inbox = Inbox(data_dir / "feedback.sqlite3")  # this process's own connection: another replica's
            handed = customers[: args.handed]
            conversations = [tokens.conversation_id(c.token) for c in handed]
            for customer in handed:
                customer.handed.set()
                customer.client.predict(customer.token, api_name="/handoff")

            writes: list[float] = []  # how long the agent's own write took (another process's SQLite lock)

            def agent() -> None:
                rng, k = random.Random(7), 0
                while not stop.is_set():
                    for customer, cid in zip(handed, conversations):
                        k += 1
                        marker = f"agent-reply-{k}:"  # the colon: reply 1 is not found inside reply 10
                        with customer.lock:
                            customer.expect[marker] = time.time()
                        started = time.monotonic()
                        inbox.reply(cid, "staff", "Staff", f"{marker} thanks, let me check.")
                        writes.append(time.monotonic() - started)
                        stop.wait(rng.uniform(0.3, 0.8))
                    stop.wait(2)

            threading.Thread(target=agent, daemon=True).start()
            run_phase("handoff_live")
            stop.set()
            browser.close()
        for customer in customers:
            customer.join(120)
        for name in phases:
            ttfts = [t for c in customers for phase, t in c.ttft if phase == name]
            phases[name].update({"answers": len(ttfts), "first_token_p50_s": pct(ttfts, 50),
                                 "first_token_p95_s": pct(ttfts, 95), "load_avg_1_5_15": load[name]})
        delivered = [d for c in customers for d in c.delivered]
        live_requests = sum(c.live_requests for c in customers)
        via = {name: [d for c in customers for d in c.via[name]] for name in ("poll", "chat")}
        stages = {name: [d for c in customers for d in c.stages[name]] for name in ("to_live_answer", "poll_call")}
        result = {
            "customers": args.customers, "pace_s": args.pace, "handed_to_agent": args.handed, "backend": args.backend,
            "max_new_tokens": args.max_tokens, "threads": args.threads or "all cores",
            "alone": {"answers": len(alone), "first_token_p50_s": pct(alone, 50), "first_token_max_s": pct(alone, 100)},
            "phases": phases,
            "delivery": {"replies": len(delivered), "p50_s": pct(delivered, 50), "p95_s": pct(delivered, 95),
                         "max_s": round(max(delivered), 3) if delivered else None,
                         "mean_s": round(statistics.mean(delivered), 3) if delivered else None},
            "delivered_by": {name: {"replies": len(v), "p50_s": pct(v, 50), "p95_s": pct(v, 95)}
                             for name, v in via.items()},
            "delivery_legs": {name: {"p50_s": pct(v, 50), "p95_s": pct(v, 95), "max_s": pct(v, 100)}
                              for name, v in stages.items()},
            "agent_write_s": {"p50": pct(writes, 50), "p95": pct(writes, 95), "max": pct(writes, 100)},
            "slowest": sorted((x for c in customers for x in c.slow), reverse=True)[:8],
            "live_requests_answered": live_requests,
            "note": "first token = submit to first streamed text through Gradio; delivery = agent reply written (by "
                    "another process, found by the live request's 0.5 s re-check) to it being in what the customer's "
                    "/poll returned after the live request said so. The machine's other load is in load_avg.",
        }
        write_result("handoff", result)
        return 0
    finally:
        stop.set()
        stop_apps([app])


if __name__ == "__main__":
    sys.exit(main())
