"""Generation speed and agreement: the transformers path (issue 2) and the llama.cpp serving path (issue 7).

    .venv/bin/python bench/generation.py                      # everything (~15 min on 2 busy cores)
    .venv/bin/python bench/generation.py --only speed agreement   # re-measures those, keeps the rest of the JSON
    .venv/bin/python bench/generation.py --adapter var/adapters/v3   # a real tuned adapter instead of a random one
    .venv/bin/python bench/generation.py --only app --adapter var/adapters/v1 --sessions 1 20 \
        --result generation-tuned   # the app serving a tuned adapter, in a JSON of its own
    .venv/bin/python bench/generation.py --only app --replicas 1 2 --sessions 1 10 --modes reading \
        --result generation-replicas   # 1 and 2 replicas on one temporary Postgres, the 2 cores split between them

Sections (each runs in its own subprocess, so its peak RSS and thread settings are its own):
- transformers: cold load (GGUF from the package -> safetensors cache) and warm load (from the cache); time to first
  token for a 200-token prompt and decode tokens/s, fp32 and bf16, 1 and 2 threads.
- speed: llama.cpp's plain `Llama` and the project's serving path (`chatapp.fastgen.LlamaCppModel`, LoRA adapter
  merged in) on the same GGUF in one process, alternated three times: TTFT, decode tokens/s, the ratio. `Llama` with
  the same LoRA applied at run time, and `Llama` on the very file the serving path serves, are measured too. Every run
  gets a prompt of its own; `ours_lora_seen_system` is a new question under the previous prompt's system message.
- agreement: transformers+peft vs the serving path on a fixed prompt set: share of prompts whose first 32
  greedy tokens are identical, mean common prefix, and teacher-forced top-1 agreement (llama.cpp's argmax at every
  position of the transformers path's greedy answer).
- concurrency: one session alone (three questions in a row: the single-session figure), then 4 and 20 sessions
  straight on the backend, arriving as a burst (all press Enter at the same instant), staggered (random start in the
  first 3 s, 0.5-2 s between a session's turns), chatting (start in the first 20 s, 8-20 s to read an answer and
  type the next message) and reading (start in the first 30 s, 20-45 s between messages: a reading and typing pace):
  p50/p95 TTFT, aggregate tokens/s, and each answer's longest pause between two pieces.
- app: the same through the real app (`launch.py`, its Gradio queue, retrieval and prompt templates) with one
  `gradio_client.Client` per session. With `--replicas 1 2`: 1, then 2 app processes on one temporary Postgres 15
  (each replica's llama.cpp gets cores / replicas threads), sessions spread round-robin, each sticky to a replica.
Every section uses the SmolLM2 default model; llama-cpp-python is installed into this environment if it is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chatapp.benchutil import (  # noqa: E402
    RESULTS_DIR, launch_app, message_text, random_lora, stop_apps, streamed_outputs, write_result)
from chatapp.config import GenerationSettings, Settings  # noqa: E402

SECTIONS = ("transformers", "speed", "agreement", "concurrency", "app")
LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"
SYSTEM = "You are Ava, the support assistant of Acme Outfitters. Answer clearly and politely."
QUESTIONS = [
    "How do I return a pair of hiking boots I bought last week?",
    "My order has not arrived yet. What should I do?",
    "Can I change the shipping address after I placed an order?",
    "Do you offer refunds on sale items?",
    "How do I reset the password of my account?",
    "What payment methods do you accept?",
    "Can I exchange a jacket for a different size?",
    "How long does standard shipping take?",
    "Is there a warranty on your tents?",
    "I was charged twice for the same order. Can you help?",
    "Do you ship to Canada?",
    "How can I track my package?",
    "Can I cancel my order?",
    "What is your price match policy?",
    "My sleeping bag zipper broke after two trips. What are my options?",
    "How do I use a gift card on the website?",
    "Can I pick up my order in a store?",
    "Why was my discount code rejected?",
    "How do I unsubscribe from your newsletter?",
    "Do you have a loyalty program?",
]
FILLER = (
    "For context, I ordered several items from your online store during the autumn sale: a waterproof jacket, two "
    "pairs of wool socks, a headlamp and a lightweight backpack. The parcel came in a damaged box, one item was missing "
    "and the invoice shows a different shipping option than the one I picked at checkout. I have my order number and "
    "the confirmation email, and I would like to sort this out before my trip next month. "
)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ensure_llama_cpp() -> None:
    """Issue 7: if llama-cpp-python is not in this environment, the benchmark installs it (compiles, ~10 min)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(f"installing {LLAMA_CPP_PIN} into {sys.prefix} (builds llama.cpp from source)...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", LLAMA_CPP_PIN], check=True)


def model_dir(cache: Path | None = None) -> Path:
    from chatapp.model import resolve_base_model

    settings = Settings()
    return resolve_base_model(settings.model, cache or settings.model_cache_dir)


def prompt_of(tokenizer, question: str, tokens: int = 200, ticket: int | None = None) -> list[dict]:
    """Chat messages whose templated prompt is exactly `tokens` tokens: the question, then as much filler as fits.

    `ticket` starts the system message with a number, so the prompt shares only a few tokens with any earlier one
    (the serving path reuses the keys/values of a shared start: a repeated prompt would measure that, not a prompt).
    """
    system = SYSTEM if ticket is None else f"Ticket {ticket}. {SYSTEM}"
    words = (FILLER * 20).split()
    lo, hi = 0, len(words)
    while lo < hi:  # largest filler prefix that keeps the prompt within `tokens`
        mid = (lo + hi + 1) // 2
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": question + "\n\n" + " ".join(words[:mid])}]
        n = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        lo, hi = (mid, hi) if n <= tokens else (lo, mid - 1)
    return [{"role": "system", "content": system}, {"role": "user", "content": question + "\n\n" + " ".join(words[:lo])}]


def make_adapter(base_dir: Path, out: Path) -> Path:
    """A random but realistic PEFT LoRA (the tuning issue's defaults: r=8, alpha=16, q/k/v/o), non-zero B."""
    return random_lora(base_dir, out, seed=0, std=0.05)


def serving_model(args, base_dir: Path, **options):
    """The project's serving path exactly as load_fast_model builds it (re-encoded weights, source GGUF for adapters)."""
    from chatapp.fastgen import LlamaCppModel
    from chatapp.gguf_files import base_gguf, serving_gguf

    settings = Settings()
    source = base_gguf(settings)
    served = serving_gguf(source, settings.model_cache_dir, args.weights)
    options.setdefault("threads", args.threads or os.cpu_count())
    return LlamaCppModel(served, base_dir, "SmolLM2", cache_dir=settings.model_cache_dir, source_gguf=source,
                         weights=args.weights, **options)


def timed_stream(pieces) -> dict:
    """TTFT and the pieces' arrival times for one streamed answer."""
    started = time.perf_counter()
    times, text = [], ""
    for piece in pieces:
        times.append(time.perf_counter())
        text += piece
    return {"ttft": times[0] - started if times else None, "times": times, "text": text, "end": time.perf_counter()}


def decode_rate(n_tokens: int, first: float, last: float) -> float | None:
    return round((n_tokens - 1) / (last - first), 2) if n_tokens > 1 and last > first else None


# --------------------------------------------------------------------------------------------------------------------
# Sections


def section_transformers(args) -> dict:
    """Issue 2's figures for the transformers path."""
    from chatapp.model import TransformersModel, resolve_base_model

    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        cold_dir = resolve_base_model(settings.model, Path(tmp))
        TransformersModel(cold_dir, "SmolLM2", dtype="fp32", threads=0)
        cold = time.perf_counter() - started
    started = time.perf_counter()
    warm_dir = model_dir()
    TransformersModel(warm_dir, "SmolLM2", dtype="fp32", threads=0)
    warm = time.perf_counter() - started
    runs = []
    for dtype in ("fp32", "bf16"):
        for threads in (1, 2):
            model = TransformersModel(warm_dir, "SmolLM2", dtype=dtype, threads=threads)
            messages = prompt_of(model.tokenizer, "Please explain your full return and refund process step by step.")
            gen = GenerationSettings(max_new_tokens=args.new_tokens, temperature=0.0, repetition_penalty=1.0)
            list(model.stream(messages, GenerationSettings(max_new_tokens=4, temperature=0.0)))  # warm-up
            result = timed_stream(model.stream(messages, gen))
            n = len(model.tokenizer(result["text"], add_special_tokens=False)["input_ids"])
            runs.append({"dtype": dtype, "threads": threads, "prompt_tokens": model.count_tokens(messages),
                         "ttft_s": round(result["ttft"], 3), "new_tokens": n,
                         "decode_tok_s": decode_rate(n, result["times"][0], result["times"][-1])})
            print(runs[-1], flush=True)
            del model
    return {"cold_load_s": round(cold, 2), "warm_load_s": round(warm, 2), "runs": runs, "peak_rss_mb": peak_rss_mb()}


def section_speed(args) -> dict:
    """Plain `Llama` vs the serving path on the same GGUF, alternated in one process."""
    from llama_cpp import Llama

    from chatapp.gguf_files import base_gguf, convert_peft_adapter

    base_dir, gguf_path = model_dir(), base_gguf(Settings())
    adapter = Path(args.adapter) if args.adapter else make_adapter(base_dir, Path(tempfile.mkdtemp()) / "adapter")
    lora_gguf = convert_peft_adapter(adapter, gguf_path)
    threads = args.threads or os.cpu_count()
    started = time.perf_counter()
    ours = serving_model(args, base_dir)
    ours_load = time.perf_counter() - started
    started = time.perf_counter()
    ours.set_adapter(adapter, "bench")
    ours_swap = time.perf_counter() - started
    question, other_question = "Please explain your full return and refund process step by step.", QUESTIONS[0]
    gen = GenerationSettings(max_new_tokens=args.new_tokens, temperature=0.0, repetition_penalty=1.0)
    plain = Llama(str(gguf_path), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
    plain_lora = Llama(str(gguf_path), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False,
                       lora_path=str(lora_gguf))
    plain_same_file = Llama(str(ours.gguf_path), n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                            verbose=False, flash_attn=False)
    tickets = iter(range(1, 10_000))  # every run gets a prompt of its own (see prompt_of)

    def run_plain(llm) -> dict:
        ids = ours.prompt_ids(prompt_of(ours.tokenizer, question, ticket=next(tickets)))
        llm.reset()
        eos = llm.token_eos()
        started, times, tokens = time.perf_counter(), [], []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            if token == eos or len(tokens) >= args.new_tokens:
                break
            tokens.append(token)
        return {"ttft_s": times[0] - started, "new_tokens": len(tokens),
                "decode_tok_s": decode_rate(len(tokens), times[0], times[len(tokens) - 1])}

    def on_scheduler_thread(llm) -> Callable[[], dict]:
        """Plain llama.cpp runs on the serving path's own scheduler thread (while that is idle). Why: libgomp keeps an
        idle worker pool for every thread that ever ran llama.cpp and counts them all; with more than the cores' worth
        it stops spinning at barriers (measured: plain llama.cpp decodes 80-90 tokens/s alone, 25 with the serving
        path's idle pool beside it). The app computes on one thread; so does this comparison."""
        return lambda: ours._call_in_scheduler(lambda: run_plain(llm))

    def run_ours(messages: list[dict]) -> dict:
        result = timed_stream(ours.stream(messages, gen))
        n = len(ours.tokenizer(result["text"], add_special_tokens=False)["input_ids"])
        return {"ttft_s": result["ttft"], "new_tokens": n,
                "decode_tok_s": decode_rate(n, result["times"][0], result["times"][-1])}

    last_ticket = 0

    def run_ours_new_prompt() -> dict:
        nonlocal last_ticket
        last_ticket = next(tickets)
        return run_ours(prompt_of(ours.tokenizer, question, ticket=last_ticket))

    def run_ours_seen_system() -> dict:
        """A new customer message under the system message of the previous prompt: what the app's template does."""
        return run_ours(prompt_of(ours.tokenizer, other_question, ticket=last_ticket))

    engines = {"llama_plain": on_scheduler_thread(plain), "llama_plain_lora": on_scheduler_thread(plain_lora),
               "llama_plain_same_file": on_scheduler_thread(plain_same_file), "ours_lora": run_ours_new_prompt,
               "ours_lora_seen_system": run_ours_seen_system}
    for run in engines.values():
        run()  # warm-up: first-call allocations are not what a chat sees
    rounds: dict[str, list[dict]] = {name: [] for name in engines}
    for i in range(args.rounds):
        for name, run in engines.items():
            rounds[name].append(run())
            print(i, name, {k: round(v, 3) if isinstance(v, float) else v for k, v in rounds[name][-1].items()}, flush=True)
    summary = {
        name: {"ttft_s": round(statistics.median(r["ttft_s"] for r in runs), 3),
               "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in runs), 1),
               "new_tokens": runs[-1]["new_tokens"]}
        for name, runs in rounds.items()
    }
    served = ours.description
    ours.close()
    ratio = lambda name: round(summary["ours_lora"]["decode_tok_s"] / summary[name]["decode_tok_s"], 3)  # noqa: E731
    return {
        "threads": threads, "prompt_tokens": 200, "rounds": args.rounds, "summary": summary,
        "ratio_vs_plain_llama": ratio("llama_plain"),
        "ratio_vs_plain_llama_with_same_lora": ratio("llama_plain_lora"),
        "ratio_vs_plain_llama_same_file": ratio("llama_plain_same_file"),
        "serving_path_load_s": round(ours_load, 2), "adapter_swap_s": round(ours_swap, 2),
        "served_weights": served, "adapter": str(adapter),
        "note": "ours: the adapter merged into the weights; llama_plain_lora: llama.cpp's runtime LoRA on the package "
                "GGUF; llama_plain_same_file: plain llama.cpp on the file ours serves (adapter merged). Every run has a "
                "prompt of its own except ours_lora_seen_system (the previous run's system message, a new question).",
        "peak_rss_mb": peak_rss_mb(),
        "raw": rounds,
    }


def section_agreement(args) -> dict:
    """How closely the serving path (adapter merged into the weights) follows transformers + peft, greedy."""
    import numpy as np
    from llama_cpp import Llama

    from chatapp.model import TransformersModel

    base_dir = model_dir()
    adapter = Path(args.adapter) if args.adapter else make_adapter(base_dir, Path(tempfile.mkdtemp()) / "adapter")
    threads = args.threads or os.cpu_count()
    slow = TransformersModel(base_dir, "SmolLM2", threads=threads)
    fast = serving_model(args, base_dir, sessions=2, context_tokens=1024)
    n_new = 32
    out = {}
    for label, adapter_path in (("with_adapter", adapter), ("base_only", None)):
        slow.set_adapter(adapter_path, "bench" if adapter_path else None)
        fast.set_adapter(adapter_path, "bench" if adapter_path else None)
        scorer = Llama(str(fast.gguf_path), n_ctx=1024, n_threads=threads, logits_all=True, verbose=False)
        for penalty in (1.0, 1.1):
            gen = GenerationSettings(max_new_tokens=n_new, temperature=0.0, repetition_penalty=penalty)
            same, prefixes, top1 = 0, [], []
            for question in QUESTIONS:
                messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
                slow_text = "".join(slow.stream(messages, gen))
                fast_text = "".join(fast.stream(messages, gen))
                a = slow.tokenizer(slow_text, add_special_tokens=False)["input_ids"]
                b = slow.tokenizer(fast_text, add_special_tokens=False)["input_ids"]
                same += a == b
                prefixes.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
                if penalty == 1.0:  # teacher-forced: llama.cpp's argmax along the transformers path's greedy answer
                    prompt = slow.prompt_ids(messages)
                    scorer.reset()
                    scorer.eval(prompt + a)
                    predicted = np.array(scorer.scores[len(prompt) - 1 : len(prompt) + len(a) - 1]).argmax(-1)
                    top1.append(float((predicted == np.array(a)).mean()) if a else 1.0)
            key = f"{label}_penalty_{penalty}"
            out[key] = {"prompts": len(QUESTIONS), "new_tokens": n_new,
                        "identical_first_32_tokens_pct": round(100 * same / len(QUESTIONS), 1),
                        "mean_common_prefix_tokens": round(statistics.mean(prefixes), 1)}
            if top1:
                out[key]["teacher_forced_top1_agreement_pct"] = round(100 * statistics.mean(top1), 1)
            print(key, out[key], flush=True)
        del scorer
    served = fast.description
    fast.close()
    return {**out, "served_weights": served, "adapter": str(adapter), "peak_rss_mb": peak_rss_mb()}


MODES = {  # how sessions arrive: (turns each, start spread s, pause between a session's turns s)
    "alone": (3, 0.0, (1.0, 1.0)),  # one person: a question, then two follow-ups (the single-session figure)
    "burst": (1, 0.0, (0.0, 0.0)),  # everyone presses Enter at the same instant
    "staggered": (3, 3.0, (0.5, 2.0)),  # start within 3 s, next message 0.5-2 s after an answer ends
    "chatting": (3, 20.0, (8.0, 20.0)),  # people quickly reading the answer and typing the next message
    # ... at a reading pace: a ~100-token answer is ~75 words (~18 s at 250 words/min), a question ~10 s to type
    "reading": (3, 30.0, (20.0, 45.0)),
}


def modes_for(sessions: int, only: list[str] | None = None) -> list[str]:
    """One session chats alone (its median first-token time is the single-session figure); more arrive together."""
    return ["alone"] if sessions == 1 else [mode for mode in MODES if mode != "alone" and (not only or mode in only)]


def run_sessions(start_chat, questions: list[str], n: int, mode: str, seed: int) -> dict:
    """n sessions at once, arriving as MODES[mode] says; start_chat(question) -> iterator of token counts."""
    turns, spread, (pause_lo, pause_hi) = MODES[mode]
    rng = random.Random(seed)
    records: list[dict] = []
    lock = threading.Lock()
    begin = time.perf_counter() + 0.2
    offsets = [rng.uniform(0, spread) for _ in range(n)]
    pauses = [[rng.uniform(pause_lo, pause_hi) for _ in range(turns)] for _ in range(n)]

    def session(i: int) -> None:
        time.sleep(max(0.0, begin + offsets[i] - time.perf_counter()))
        for turn in range(turns):
            question = questions[(i * turns + turn) % len(questions)]
            started = time.perf_counter()
            first, last, longest_pause, tokens = None, None, 0.0, 0
            for tokens_so_far in start_chat(question):
                now = time.perf_counter()
                first = first or now
                longest_pause = max(longest_pause, now - (last or now))
                last, tokens = now, tokens_so_far
            with lock:
                records.append({"session": i, "ttft": (first or time.perf_counter()) - started, "tokens": tokens,
                                "start": started, "end": time.perf_counter(), "longest_pause": longest_pause})
            if turn < turns - 1:
                time.sleep(pauses[i][turn])

    threads = [threading.Thread(target=session, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ttfts = [r["ttft"] for r in records]
    pauses = [r["longest_pause"] for r in records]
    window = max(r["end"] for r in records) - min(r["start"] for r in records)
    return {"mode": mode, "sessions": n, "turns_each": turns, "answers": len(records),
            "ttft_p50_s": round(statistics.median(ttfts), 3), "ttft_p95_s": round(percentile(ttfts, 95), 3),
            "ttft_max_s": round(max(ttfts), 3), "aggregate_tok_s": round(sum(r["tokens"] for r in records) / window, 1),
            # "no session may stall the others": the longest wait between two pieces of one streaming answer
            "longest_pause_p95_s": round(percentile(pauses, 95), 3), "longest_pause_max_s": round(max(pauses), 3),
            "mean_tokens_per_answer": round(statistics.mean(r["tokens"] for r in records), 1)}


def summarize_concurrency(results: list[dict]) -> dict:
    single = next((r["ttft_p50_s"] for r in results if r["mode"] == "alone"), None)
    for r in results:
        r["p95_over_single"] = round(r["ttft_p95_s"] / single, 2) if single else None
    return {"runs": results, "single_session_ttft_s": single}


def section_concurrency(args) -> dict:
    """Sessions straight on the serving path (no web app)."""
    base_dir = model_dir()
    adapter = Path(args.adapter) if args.adapter else make_adapter(base_dir, Path(tempfile.mkdtemp()) / "adapter")
    model = serving_model(args, base_dir)
    model.set_adapter(adapter, "bench")
    gen = GenerationSettings(max_new_tokens=args.new_tokens, temperature=0.3, repetition_penalty=1.1)
    # A prompt of its own for every answer (see prompt_of): only the chat template's first tokens are shared.
    prompts = iter([prompt_of(model.tokenizer, QUESTIONS[k % len(QUESTIONS)], ticket=k) for k in range(400)])
    prompts_lock = threading.Lock()

    def start_chat(question: str):
        with prompts_lock:
            messages = next(prompts)
        text = ""
        for piece in model.stream(messages, gen):
            text += piece
            yield len(text) // 4 or 1  # cheap progress; exact count below
        yield len(model.tokenizer(text, add_special_tokens=False)["input_ids"])

    results = []
    list(start_chat(QUESTIONS[0]))  # warm-up
    for n in args.sessions:
        for mode in modes_for(n, args.modes):
            results.append(run_sessions(start_chat, QUESTIONS, n, mode, seed=n))
            print(results[-1], flush=True)
    model.close()
    return {**summarize_concurrency(results), "prompt_tokens": 200, "max_new_tokens": args.new_tokens,
            "modes": {k: {"turns": t, "start_within_s": w, "pause_s": p} for k, (t, w, p) in MODES.items()},
            "peak_rss_mb": peak_rss_mb()}


def app_flags(args, adapter: Path, threads: int) -> list[str]:
    """launch.py's flags for the app section: the backend, the adapter served, the llama.cpp threads (0: all)."""
    return ["--backend", args.app_backend, "--adapter", str(adapter), *(["--threads", str(threads)] if threads else [])]


def measure_app(args, urls: list[str], tokenizer) -> list[dict]:
    """Every --sessions count through the running app(s): session k talks to urls[k % len(urls)] (round-robin, each
    session sticky to its replica, as a load balancer with session affinity does), one gradio_client per session."""
    from gradio_client import Client

    clients: list = []
    local = threading.local()  # each session thread keeps one client = one browser session
    counter_lock = threading.Lock()

    def chat(client, question: str):
        job = client.submit(question, "auto", 0.3, args.new_tokens, api_name="/chat")
        text = ""
        for output in streamed_outputs(job):
            bubbles = output[0] if output else []
            if bubbles and bubbles[-1].get("role") == "assistant":
                text = message_text(bubbles[-1]["content"]).split("\n\n<sub>")[0]  # the answer, not its sources
                if text not in ("…", ""):
                    yield 1
        yield len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def start_chat(question: str):
        if not hasattr(local, "client"):
            with counter_lock:
                local.client = clients.pop()
        return chat(local.client, question)

    # Warm-up (index, first prompt render) on every replica with a question of its own: a measured prompt must not
    # be one the serving path has just computed (it would reuse all of it).
    for url in urls:
        list(chat(Client(url, verbose=False), "Hello, is anyone there?"))
    results = []
    for n in args.sessions:
        for mode in modes_for(n, args.modes):
            clients[:] = [Client(urls[k % len(urls)], verbose=False) for k in range(n)]  # fresh sessions, no history
            results.append(run_sessions(start_chat, QUESTIONS, n, mode, seed=n))
            print({"replicas": len(urls), **results[-1]}, flush=True)
    return results


def section_app(args) -> dict:
    """Sessions through the real app: launch.py in a subprocess (with --replicas: N of them on one Postgres)."""
    from transformers import AutoTokenizer

    base_dir = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    root = Path(tempfile.mkdtemp(prefix="bench-app-"))
    adapter = Path(args.adapter) if args.adapter else make_adapter(base_dir, root / "bench-adapter")
    toml = f'[model]\nfast_weights = "{args.weights}"\n'
    if args.replicas:
        return app_replicas(args, adapter, root, toml, tokenizer)
    app, url = launch_app(root, app_flags(args, adapter, args.threads), toml)
    try:
        results = measure_app(args, [url], tokenizer)
        backend_line = next((line for line in (root / "app.log").read_text().splitlines()
                             if "serving" in line or "falling back" in line), "")
        return {**summarize_concurrency(results), "backend": args.app_backend, "app_log_backend_line": backend_line,
                "note": "TTFT here includes retrieval, prompt rendering and Gradio's streaming"}
    finally:
        stop_apps([app])


def app_replicas(args, adapter: Path, root: Path, toml: str, tokenizer) -> dict:
    """1, 2, ... launch.py processes on one temporary Postgres 15 (a fresh database per replica count), one shared
    folder, the cores split between them (--threads is per machine: each of N replicas gets cores // N)."""
    from chatapp.storage.tempcluster import temporary_postgres

    cluster = temporary_postgres()
    if cluster is None:
        raise SystemExit("--replicas needs Postgres's server programs (apt-get install postgresql)")
    cores = args.threads or os.cpu_count() or 1
    out: dict = {"database": "a temporary Postgres 15 cluster on this machine (tempcluster.py), one database per "
                             "replica count", "backend": args.app_backend, "runs_by_replicas": {},
                 "note": "TTFT here includes retrieval, prompt rendering and Gradio's streaming; sessions are spread "
                         "round-robin over the replicas, each sticky to one"}
    try:
        for count in args.replicas:
            threads = max(1, cores // count)  # the cores are split, never oversubscribed
            url = cluster.url(cluster.createdb())
            shared = root / f"r{count}-shared"
            apps, urls = [], []
            try:
                for k in range(count):
                    flags = [*app_flags(args, adapter, threads), "--database-url", url, "--shared-dir", str(shared)]
                    app, app_url = launch_app(root / f"r{count}-{k}", flags, toml)
                    apps.append(app)
                    urls.append(app_url)
                load_before = [round(x, 2) for x in os.getloadavg()]  # 1/5/15 min, the replicas' own start included
                results = measure_app(args, urls, tokenizer)
            finally:
                stop_apps(apps)
            out["runs_by_replicas"][str(count)] = {**summarize_concurrency(results), "replicas": count,
                                                   "threads_per_replica": threads, "load_avg_before": load_before}
            for r in results:
                print(f"{count} replica(s) x {threads} thread(s), {r['sessions']:2d} session(s) {r['mode']}: "
                      f"first token p50 {r['ttft_p50_s']:.2f} s, p95 {r['ttft_p95_s']:.2f} s", flush=True)
    finally:
        cluster.remove()
    return out


# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--adapter", help="a PEFT LoRA folder to serve (default: a random r=8 q/k/v/o adapter)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--weights", default=Settings().model.fast_weights,
                        choices=["q8_0", "q4_0", "q4_k_m", "f16", "as-is"],
                        help="model.fast_weights: how the serving path re-encodes the GGUF")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the engines in the speed section")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 20])
    parser.add_argument("--modes", nargs="+", choices=[m for m in MODES if m != "alone"],
                        help="arrival modes for more than one session (default: all)")
    parser.add_argument("--app-backend", default="llamacpp", choices=["llamacpp", "transformers"])
    parser.add_argument("--replicas", type=int, nargs="+", metavar="N",
                        help="app section: N launch.py processes on one temporary Postgres 15 for each N (e.g. 1 2), "
                             "the cores split between them, sessions round-robin (default: one app on SQLite)")
    parser.add_argument("--result", default="generation",
                        help="bench/results/<RESULT>.json to write (and, with --only, to keep other sections from)")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # internal: run one, print JSON
    args = parser.parse_args(argv)

    if args.section:
        if args.section != "transformers":
            from chatapp.gguf_files import import_llama_cpp

            import_llama_cpp()  # before any engine: plain Llama and the serving path share one libgomp setting
        result = globals()[f"section_{args.section}"](args)
        print("RESULT " + json.dumps(result, default=str), flush=True)
        return 0

    if any(s != "transformers" for s in args.only):
        ensure_llama_cpp()
    settings = {k: v for k, v in vars(args).items() if k != "section"}
    results: dict = {"settings": settings}
    earlier = RESULTS_DIR / f"{args.result}.json"
    if set(args.only) != set(SECTIONS) and earlier.is_file():  # --only refreshes those sections and keeps the rest
        try:
            results.update({k: v for k, v in json.loads(earlier.read_text()).items() if k in SECTIONS})
        except ValueError:
            pass
    for section in args.only:
        print(f"== {section}", flush=True)
        forwarded = _strip_only(argv if argv is not None else sys.argv[1:])
        proc = subprocess.run([sys.executable, __file__, "--section", section, *forwarded],
                              capture_output=True, text=True)
        sys.stdout.write("\n".join(l for l in proc.stdout.splitlines() if not l.startswith("RESULT ")) + "\n")
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stderr[-4000:], file=sys.stderr)
            results[section] = {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
            continue
        results[section] = {**json.loads(line[len("RESULT "):]), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "settings": settings}
    results["targets"] = targets(results)
    write_result(args.result, results)
    return 0


def _strip_only(argv: list[str]) -> list[str]:
    """The command line minus `--only a b c`, handed to each section's subprocess."""
    out, skipping = [], False
    for arg in argv:
        if arg == "--only":
            skipping = True
            continue
        if skipping and not arg.startswith("--"):
            continue
        skipping = False
        out.append(arg)
    return out


def targets(results: dict) -> dict:
    """The issues' targets next to the measured figures."""
    out = {}
    tr = results.get("transformers", {})
    if "warm_load_s" in tr:
        best = max(tr["runs"], key=lambda r: r["decode_tok_s"] or 0)
        out["issue2_warm_load_le_5s"] = tr["warm_load_s"] <= 5
        out["issue2_ttft_le_1s"] = min(r["ttft_s"] for r in tr["runs"]) <= 1
        out["issue2_decode_ge_20_tok_s"] = (best["decode_tok_s"] or 0) >= 20
    sp = results.get("speed", {})
    if "ratio_vs_plain_llama" in sp:
        out["issue7_ratio_ge_0.8"] = sp["ratio_vs_plain_llama"] >= 0.8
        out["issue7_ttft_le_0.5s"] = sp["summary"]["ours_lora"]["ttft_s"] <= 0.5
    for name in ("concurrency", "app"):
        runs = results.get(name, {}).get("runs", [])
        for r in runs:
            if r["sessions"] == 20 and r.get("p95_over_single") is not None:
                out[f"issue7_{name}_20_{r['mode']}_p95_le_3x_single"] = r["p95_over_single"] <= 3
    return out


if __name__ == "__main__":
    sys.exit(main())
