"""Many chats at once on the llama.cpp backend: answers never mix, a long answer never stalls a new one, sessions
beyond the configured number wait their turn instead of failing."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import llama_cpp_or_skip

llama_cpp_or_skip()  # before any other llama.cpp user in this process

from chatapp.config import GenerationSettings, Settings  # noqa: E402
from chatapp.fastgen import PREFILL_TOKENS_WHILE_DECODING, LlamaCppModel  # noqa: E402
from chatapp.gguf_files import base_gguf, serving_gguf  # noqa: E402

pytestmark = pytest.mark.slow  # the real default model

GREEDY = GenerationSettings(max_new_tokens=32, temperature=0.0, repetition_penalty=1.1)
QUESTIONS = [
    "How do I return a pair of hiking boots?",
    "Where is my order?",
    "Can I pay with PayPal?",
    "Do you ship to Canada?",
    "How do I reset my password?",
    "Can I exchange a jacket for another size?",
]


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def model(smollm2_dir: Path):
    source = base_gguf(Settings())
    served = serving_gguf(source, smollm2_dir.parent, Settings().model.fast_weights)
    model = LlamaCppModel(served, smollm2_dir, "SmolLM2", threads=2, sessions=4, context_tokens=1024,
                          source_gguf=source, weights=Settings().model.fast_weights)
    yield model
    model.close()


def test_concurrent_sessions_get_their_own_answers(model: LlamaCppModel):
    """Six chats at once on four session slots give the same greedy answers as each chat alone."""
    alone = {q: "".join(model.stream(chat(q), GREEDY)) for q in QUESTIONS}
    assert len(set(alone.values())) == len(QUESTIONS), "the test needs distinct answers"
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = dict(zip(QUESTIONS, pool.map(lambda q: "".join(model.stream(chat(q), GREEDY)), QUESTIONS)))
    mixed = [q for q in QUESTIONS if together[q] != alone[q]]
    assert not mixed, f"answers changed when run together: {[(alone[q], together[q]) for q in mixed]}"
    assert model.idle()


def test_a_long_answer_does_not_stall_a_new_session(model: LlamaCppModel):
    long = GenerationSettings(max_new_tokens=300, temperature=0.0, repetition_penalty=1.1)
    alone_started = time.perf_counter()
    next(iter(model.stream(chat(QUESTIONS[1]), GREEDY)))
    alone_ttft = time.perf_counter() - alone_started

    long_done = threading.Event()
    long_pieces: list[str] = []

    def long_chat() -> None:
        for piece in model.stream(chat("Write a very long, detailed story about a parcel lost in the mail."), long):
            long_pieces.append(piece)
        long_done.set()

    worker = threading.Thread(target=long_chat)
    worker.start()
    while len(long_pieces) < 5:
        time.sleep(0.01)
    started = time.perf_counter()
    stream = model.stream(chat(QUESTIONS[1]), GREEDY)
    next(stream)
    ttft = time.perf_counter() - started
    assert not long_done.is_set(), "the long answer should still be running"
    assert ttft < max(1.0, 5 * alone_ttft), f"a new chat waited {ttft:.2f}s behind a long answer (alone {alone_ttft:.2f}s)"
    stream.close()
    worker.join()
    assert len(long_pieces) > 40


def test_a_long_prompt_is_prefilled_in_chunks_between_the_streaming_answers_tokens(model: LlamaCppModel):
    """A prompt several prefill chunks long, arriving while another answer streams: the streaming answer keeps getting
    tokens while that prompt is computed (not one ~1 s pause), and the chunked prompt gets its answer alone's tokens."""
    details = " ".join(f"Item {i}: a blue rain jacket, size M, order 55{i:02d}, shipped on day {i}." for i in range(24))
    question = [{"role": "user", "content": f"{details}\nWhich item was shipped on day 7?"}]
    assert len(model.prompt_ids(question)) > 4 * PREFILL_TOKENS_WHILE_DECODING
    alone = "".join(model.stream(question, GREEDY))

    long = GenerationSettings(max_new_tokens=400, temperature=0.0, repetition_penalty=1.1)
    streamed: list[float] = []  # when each piece of the long answer arrived

    def long_chat() -> None:
        for _ in model.stream(chat("Write a very long, detailed story about a parcel lost in the mail."), long):
            streamed.append(time.perf_counter())

    worker = threading.Thread(target=long_chat)
    worker.start()
    while len(streamed) < 5:
        time.sleep(0.01)
    started = time.perf_counter()
    pieces = model.stream(question, GREEDY)
    first = next(pieces)
    first_at = time.perf_counter()
    together = first + "".join(pieces)
    during_prefill = [t for t in streamed if started < t < first_at]
    worker.join()
    assert together == alone, "prefilling in chunks beside another answer changed the greedy answer"
    chunks = len(model.prompt_ids(question)) // PREFILL_TOKENS_WHILE_DECODING
    assert len(during_prefill) >= chunks, (
        f"the streaming answer got {len(during_prefill)} pieces while a {chunks}-chunk prompt was computed")


def test_stopping_one_session_leaves_the_others_running(model: LlamaCppModel):
    stop = threading.Event()
    gen = GenerationSettings(max_new_tokens=64, temperature=0.0, repetition_penalty=1.1)
    expected = "".join(model.stream(chat(QUESTIONS[2]), gen))

    def stopped() -> str:
        text = ""
        for piece in model.stream(chat(QUESTIONS[3]), gen, stop):
            text += piece
            stop.set()
        return text

    with ThreadPoolExecutor(2) as pool:
        kept = pool.submit(lambda: "".join(model.stream(chat(QUESTIONS[2]), gen)))
        cut = pool.submit(stopped)
        assert kept.result(timeout=120) == expected
        assert len(cut.result(timeout=120)) < len(expected)
