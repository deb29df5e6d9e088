"""The human handoff under load: 20 customers connected and chatting through the real app (launch.py in a
subprocess, one gradio_client.Client per customer), in three phases of equal length:

- bot_only:       customers chat with the bot; nobody polls (what a page does now while no person is involved);
- everyone_polls: every customer also polls /poll once a second (what an always-on 1 s gr.Timer would cost: the
                  reason the page's timer runs only during a handoff);
- handoff_live:   HANDED of the customers handed to an agent, who replies to each every few seconds; only they
                  poll (as the page does), and the staff console's Inbox tab is open in a browser (Debian chromium,
                  refreshing every second).

Figures: the bot's first-token time (submit -> first streamed text, p50/p95, customers chatting with the bot) per
phase, and agent-to-customer delivery (the agent's reply written -> it arrives in the customer's poll, p50/p95).
The agent writes its replies straight into the shared SQLite database (what the console's Send does), from this
process. Usage: .venv/bin/python bench/handoff.py [--customers 20] [--phase-s 45]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatapp.benchutil import free_port, message_text, start_app, write_result  # noqa: E402
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


def first_token_s(client, question: str, max_tokens: int) -> float | None:
    """Seconds from submitting a question to the first streamed piece of the bot's answer."""
    started = time.perf_counter()
    job = client.submit(question, "auto", 0.3, max_tokens, api_name="/chat")
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
    def __init__(self, url: str, n: int, stop: threading.Event, args):
        super().__init__(daemon=True)
        from gradio_client import Client

        self.client = Client(url, verbose=False)
        self.n, self.stop, self.args = n, stop, args
        self.polling = threading.Event()
        self.handed = threading.Event()
        self.ttft: list[tuple[str, float]] = []  # (phase, seconds)
        self.delivered: list[float] = []
        self.expect: dict[str, float] = {}  # reply marker -> time it was written
        self.phase = "bot_only"
        self.lock = threading.Lock()

    def run(self) -> None:
        rng = random.Random(self.n)
        threading.Thread(target=self.poll_loop, daemon=True).start()
        time.sleep(rng.uniform(0, self.args.pace[1]))  # arrivals spread out
        while not self.stop.is_set():
            if self.handed.is_set():  # a message to the agent; its answer shows what arrived meanwhile too
                self.arrived(str(self.client.predict(f"(customer {self.n}) still there?", "auto", 0.3, 16,
                                                     api_name="/chat")))
            else:
                phase = self.phase  # an answer counts for the phase it was asked in
                ttft = first_token_s(self.client, rng.choice(QUESTIONS), self.args.max_tokens)
                if ttft is not None:
                    self.ttft.append((phase, ttft))
            self.stop.wait(rng.uniform(*self.args.pace))  # reading and typing

    def arrived(self, text: str) -> None:
        """Note the agent replies that `text` (what the customer's page got) contains."""
        now = time.time()
        with self.lock:
            for marker, sent in list(self.expect.items()):
                if marker in text:
                    self.delivered.append(now - sent)
                    del self.expect[marker]

    def poll_loop(self) -> None:
        while not self.stop.is_set():
            if not self.polling.is_set():
                time.sleep(0.2)
                continue
            started = time.monotonic()
            try:
                text = str(self.client.predict(api_name="/poll"))
            except Exception:
                text = ""
            self.arrived(text)
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))  # the page's gr.Timer(1.0)


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
    args = parser.parse_args(argv)

    data_dir = Path(tempfile.mkdtemp(prefix="bench-handoff-"))
    (data_dir / "models").symlink_to(Settings().model_cache_dir.resolve(), target_is_directory=True)  # warm start
    port, log_path = free_port(), data_dir / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "launch.py"), "--port", str(port), "--data-dir", str(data_dir),
               "--backend", args.backend, "--adapter", "none"] + (["--threads", str(args.threads)] if args.threads else [])
    app = start_app(command, log_path, env, ROOT)
    stop = threading.Event()
    try:
        url = f"http://127.0.0.1:{port}/"
        customers = [Customer(url, n, stop, args) for n in range(args.customers)]
        first_token_s(customers[0].client, "Hello, is anyone there?", 16)  # warm-up: index, first render
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

        run_phase("bot_only")
        for customer in customers:
            customer.polling.set()
        run_phase("everyone_polls")
        for customer in customers[args.handed:]:
            customer.polling.clear()

        from playwright.sync_api import sync_playwright

        from chatapp.inbox import Inbox

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page()
            page.goto(url + "staff/")
            page.locator("#inbox-queue").wait_for(timeout=60_000)
            inbox = Inbox(data_dir / "feedback.sqlite3")
            handed = customers[: args.handed]
            conversations: list[str] = []
            for customer in handed:
                customer.handed.set()
                customer.client.predict(None, api_name="/handoff")
                conversations += [c.conversation_id for c in inbox.open_conversations()
                                  if c.conversation_id not in conversations][:1]

            def agent() -> None:
                rng, k = random.Random(7), 0
                while not stop.is_set():
                    for customer, cid in zip(handed, conversations):
                        k += 1
                        marker = f"agent-reply-{k}:"  # the colon: reply 1 is not found inside reply 10
                        with customer.lock:
                            customer.expect[marker] = time.time()
                        inbox.reply(cid, "staff", "Staff", f"{marker} thanks, let me check.")
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
        result = {
            "customers": args.customers, "pace_s": args.pace, "handed_to_agent": args.handed, "backend": args.backend,
            "max_new_tokens": args.max_tokens, "threads": args.threads or "all cores",
            "alone": {"answers": len(alone), "first_token_p50_s": pct(alone, 50), "first_token_max_s": pct(alone, 100)},
            "phases": phases,
            "delivery": {"replies": len(delivered), "p50_s": pct(delivered, 50), "p95_s": pct(delivered, 95),
                         "max_s": round(max(delivered), 3) if delivered else None,
                         "mean_s": round(statistics.mean(delivered), 3) if delivered else None},
            "note": "first token = submit to first streamed text through Gradio; delivery = agent reply written to "
                    "it arriving in the customer's 1 s poll. The machine's other load is in load_avg.",
        }
        write_result("handoff", result)
        return 0
    finally:
        stop.set()
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()


if __name__ == "__main__":
    sys.exit(main())
