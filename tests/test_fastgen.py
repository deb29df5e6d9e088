"""The llama.cpp serving path on the real SmolLM2 GGUF: LoRA conversion vs peft, agreement with the transformers path,
adapter hot swap and caching, stop/cancel, bad adapters, and the fallback to transformers when llama.cpp is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import llama_cpp_or_skip

llama_cpp_or_skip()  # before any other llama.cpp user in this process
pytestmark = pytest.mark.slow  # the real default model

from chatapp.benchutil import random_lora  # noqa: E402
from chatapp.config import REPO_ROOT, GenerationSettings, Settings  # noqa: E402
from chatapp.fastgen import LlamaCppModel, load_fast_model  # noqa: E402
from chatapp.gguf_files import (  # noqa: E402
    UnsupportedAdapter,
    base_gguf,
    convert_peft_adapter,
    merge_peft_adapter,
    serving_gguf,
)
from chatapp.model import ModelError, TransformersModel  # noqa: E402

GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0, repetition_penalty=1.1)
QUESTIONS = [
    "How do I return a pair of hiking boots I bought last week?",
    "My order has not arrived yet. What should I do?",
    "Can I change the shipping address after I placed an order?",
    "Do you offer refunds on sale items?",
    "How do I reset the password of my account?",
    "What payment methods do you accept?",
]


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": "You are Ava, a helpful support assistant for Acme Outfitters."},
            {"role": "user", "content": question}]


def make_peft_adapter(model_dir: Path, out: Path, seed: int, std: float, modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                      **lora_options) -> Path:
    """A real PEFT LoRA on the real base, with random non-zero B so it visibly changes the answers."""
    return random_lora(model_dir, out, seed=seed, std=std, modules=tuple(modules), **lora_options)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return base_gguf(Settings())


@pytest.fixture(scope="module")
def adapter(smollm2_dir: Path, tmp_path_factory) -> Path:
    return make_peft_adapter(smollm2_dir, tmp_path_factory.mktemp("adapter"), seed=0, std=0.05)


@pytest.fixture(scope="module")
def served_gguf(gguf_path: Path, smollm2_dir: Path) -> Path:
    """What the app serves by default: the package's GGUF re-encoded once (cached beside the converted model)."""
    return serving_gguf(gguf_path, smollm2_dir.parent, Settings().model.fast_weights)


@pytest.fixture(scope="module")
def fast(served_gguf: Path, gguf_path: Path, smollm2_dir: Path, tmp_path_factory):
    model = LlamaCppModel(served_gguf, smollm2_dir, "SmolLM2", threads=2, sessions=4, context_tokens=1024,
                          cache_dir=tmp_path_factory.mktemp("cache"), source_gguf=gguf_path,
                          weights=Settings().model.fast_weights)
    yield model
    model.close()


@pytest.fixture(scope="module")
def slow_path(smollm2_dir: Path) -> TransformersModel:
    return TransformersModel(smollm2_dir, "SmolLM2", threads=2)


def answer(model, question: str, gen: GenerationSettings = GREEDY) -> str:
    return "".join(model.stream(chat(question), gen))


# ---------------------------------------------------------------------------------------------------------------------
# The adapter conversion


def test_converted_and_merged_lora_give_the_logits_peft_gives(smollm2_dir: Path, gguf_path: Path, tmp_path: Path):
    """Teacher-forced: llama.cpp with the converted GGUF LoRA, or with it merged, gives the logits peft's adapter gives."""
    from llama_cpp import Llama
    from peft import PeftModel

    strong = make_peft_adapter(smollm2_dir, tmp_path / "strong", seed=1, std=0.1)
    converted = convert_peft_adapter(strong, gguf_path)
    slow = TransformersModel(smollm2_dir, "SmolLM2", threads=2)
    ids = slow.prompt_ids(chat(QUESTIONS[0])) + slow.tokenizer(" You can return them within 30 days.")["input_ids"]
    with torch.inference_mode():
        hf_base = slow.base(torch.tensor([ids])).logits[0].numpy()
        hf_lora = PeftModel.from_pretrained(slow.base, str(strong)).eval()(torch.tensor([ids])).logits[0].numpy()

    def llama_logits(lora_path):
        llm = Llama(str(gguf_path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, lora_path=lora_path)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    cpp_base, cpp_lora = llama_logits(None), llama_logits(str(converted))
    shift_hf, shift_cpp = (hf_lora - hf_base).ravel(), (cpp_lora - cpp_base).ravel()
    assert np.abs(shift_hf).mean() > 1.0, "the test adapter should change the model a lot"
    assert np.corrcoef(shift_hf, shift_cpp)[0, 1] > 0.95, "llama.cpp applies a different LoRA than peft"
    assert (cpp_lora.argmax(-1) == hf_lora.argmax(-1)).mean() >= 0.9

    # What the serving path runs: the adapter merged into the weights (f16 here: no second quantization step).
    merged = Llama(str(merge_peft_adapter(strong, gguf_path, "f16")), n_ctx=512, n_threads=2, logits_all=True,
                   verbose=False)
    merged.eval(ids)
    cpp_merged = np.array(merged.scores[: len(ids)])
    assert np.corrcoef(hf_lora.ravel(), cpp_merged.ravel())[0, 1] > 0.999, "the merge differs from peft's adapter"
    assert (cpp_merged.argmax(-1) == hf_lora.argmax(-1)).mean() >= 0.95


def test_conversion_is_cached_in_the_adapter_folder_and_redone_when_retrained(adapter: Path, gguf_path: Path, tmp_path):
    first = convert_peft_adapter(adapter, gguf_path)
    assert first.parent == adapter and first.suffix == ".gguf"
    assert not [p for p in adapter.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    stamp = first.stat().st_mtime_ns
    assert convert_peft_adapter(adapter, gguf_path) == first and first.stat().st_mtime_ns == stamp, "converted twice"

    retrained = tmp_path / "retrained"
    retrained.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (retrained / name).write_bytes((adapter / name).read_bytes())
    once = convert_peft_adapter(retrained, gguf_path)
    time.sleep(0.01)
    (retrained / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    again = convert_peft_adapter(retrained, gguf_path)
    assert again == once and again.stat().st_mtime_ns != stamp


def test_read_only_adapter_folder_is_converted_into_the_fallback(adapter: Path, gguf_path: Path, tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (ro / name).write_bytes((adapter / name).read_bytes())
    ro.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
    if os.geteuid() == 0 and not immutable:
        pytest.skip("running as root without chattr: nothing here is read-only")
    try:
        out = convert_peft_adapter(ro, gguf_path, tmp_path / "fallback")
        assert out.parent == tmp_path / "fallback" and out.is_file()
        assert convert_peft_adapter(ro, gguf_path, tmp_path / "fallback") == out
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        ro.chmod(0o755)


def test_bad_adapters_are_refused_with_a_clear_message(fast: LlamaCppModel, tiny_model_dir: Path, gguf_path: Path,
                                                      tmp_path: Path, adapter):
    """The serving path refuses them, says why, and keeps answering on what it had; nothing half-written is left."""
    with pytest.raises(ModelError, match="adapter_config.json"):
        convert_peft_adapter(tmp_path / "nothing-here", gguf_path)
    other_base = make_peft_adapter(tiny_model_dir, tmp_path / "tiny-adapter", seed=0, std=0.1)
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text()) | {"use_dora": True}
    (dora / "adapter_config.json").write_text(json.dumps(config))
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (truncated / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes()[:5000])

    before = answer(fast, QUESTIONS[0])
    for bad, error, message in ((tmp_path / "nothing-here", ModelError, "adapter_config.json"),
                                (other_base, ModelError, "does not fit"), (dora, UnsupportedAdapter, "use_dora"),
                                (truncated, ModelError, "unreadable")):
        with pytest.raises(error, match=message):
            fast.set_adapter(bad, "bad")
        assert fast.adapter_version is None and answer(fast, QUESTIONS[0]) == before
        if bad.exists():
            assert not [p.name for p in bad.iterdir() if "llamacpp" in p.name], "a half-built file was left behind"


# ---------------------------------------------------------------------------------------------------------------------
# Serving


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_greedy_answers_with_the_adapter_follow_the_transformers_path(fast: LlamaCppModel, slow_path, adapter: Path):
    """The promoted adapter reaches llama.cpp with no manual step, and the answers then start like transformers'.

    Q8_0 weights quantize activations to int8, so greedy answers drift apart after a while at near-ties; the
    opening of every answer must still agree (bench/generation.py measures the full agreement figures).
    """
    fast.set_adapter(adapter, "v-test")
    slow_path.set_adapter(adapter, "v-test")
    try:
        assert "v-test" in fast.description and fast.adapter_version == "v-test"
        pairs = [(answer(fast, q), answer(slow_path, q)) for q in QUESTIONS]
    finally:
        fast.set_adapter(None)
        slow_path.set_adapter(None)
    assert all(a.strip() for a, _ in pairs), "llama.cpp returned an empty answer"
    prefixes = [common_prefix(a, b) for a, b in pairs]
    assert min(prefixes) >= 8 and sum(prefixes) / len(prefixes) >= 30, f"answers diverge early: {pairs}"
    assert answer(fast, QUESTIONS[0]) != pairs[0][0], "the adapter did not change the answer"


def test_f16_weights_give_the_transformers_paths_greedy_answers(gguf_path, smollm2_dir, slow_path, adapter: Path):
    """fast_weights = "f16": the same dequantized weights as transformers, so the same greedy answers."""
    f16 = LlamaCppModel(serving_gguf(gguf_path, smollm2_dir.parent, "f16"), smollm2_dir, "SmolLM2", threads=2,
                        sessions=1, context_tokens=512, source_gguf=gguf_path, weights="f16")
    f16.set_adapter(adapter, "v-test")
    slow_path.set_adapter(adapter, "v-test")
    try:
        pairs = [(answer(f16, q), answer(slow_path, q)) for q in QUESTIONS]
    finally:
        f16.close()
        slow_path.set_adapter(None)
    same = sum(a == b for a, b in pairs)
    assert same >= len(QUESTIONS) - 1, f"only {same}/{len(QUESTIONS)} greedy answers agree: {pairs}"


def test_the_scheduler_decodes_exactly_like_plain_llama_cpp(fast: LlamaCppModel, adapter: Path):
    """Same weights file (the adapter merged in): the batched scheduler must produce llama.cpp's own greedy tokens,
    also when the prompt's start is taken from an earlier answer's keys/values instead of computed again."""
    from llama_cpp import Llama

    gen = GenerationSettings(max_new_tokens=32, temperature=0.0, repetition_penalty=1.0)
    fast.set_adapter(adapter, "v-test")
    # flash_attn=False: what the serving context uses (measured faster on this CPU)
    plain = Llama(str(fast.gguf_path), n_ctx=1024, n_threads=2, verbose=False, flash_attn=False)
    try:
        for question in QUESTIONS[:3]:
            ids = fast.prompt_ids(chat(question))
            tokens = []
            for token in plain.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                if token == plain.token_eos() or len(tokens) == gen.max_new_tokens:
                    break
                tokens.append(token)
            expected = plain.detokenize(tokens).decode("utf-8", "replace")
            reused = fast.reused_tokens
            assert answer(fast, question, gen) == expected
            assert answer(fast, question, gen) == expected, "reusing the cached prompt changed the answer"
            assert fast.reused_tokens - reused >= len(ids) - 1, "the repeated prompt was computed again"
    finally:
        fast.set_adapter(None)


def test_prompts_sharing_a_start_reuse_its_keys_and_values(fast: LlamaCppModel):
    """Each prompt opens with the same system message; the second and later prompts must not compute it again."""
    system = len(fast.prompt_ids([chat("x")[0]]))
    answer(fast, QUESTIONS[4])
    before_prompt, before_reused = fast.prompt_tokens, fast.reused_tokens
    answer(fast, QUESTIONS[5])
    assert fast.reused_tokens - before_reused >= system - 2
    assert fast.prompt_tokens - before_prompt == fast.count_tokens(chat(QUESTIONS[5]))


def test_an_answer_in_flight_keeps_its_adapter_while_a_new_one_is_promoted(fast: LlamaCppModel, adapter: Path):
    gen = GenerationSettings(max_new_tokens=48, temperature=0.0, repetition_penalty=1.1)
    base_answer = answer(fast, QUESTIONS[1], gen)
    fast.set_adapter(adapter, "v-new")
    adapter_answer = answer(fast, QUESTIONS[1], gen)
    fast.set_adapter(None)
    assert base_answer != adapter_answer

    stream = fast.stream(chat(QUESTIONS[1]), gen)
    pieces = [next(stream)]
    fast.set_adapter(adapter, "v-new")  # promoted mid-answer
    during = answer(fast, QUESTIONS[1], gen)  # a new answer starts on the new adapter while the old one runs
    pieces += list(stream)
    fast.set_adapter(None)
    assert "".join(pieces) == base_answer, "the answer in flight switched adapters"
    assert during == adapter_answer


def test_stop_event_and_closing_the_stream_end_the_answer_and_free_the_session(fast: LlamaCppModel):
    long = GenerationSettings(max_new_tokens=400, temperature=0.0, repetition_penalty=1.1)
    stop = threading.Event()
    pieces = []
    started = time.perf_counter()
    for piece in fast.stream(chat("Write a long story about a lost parcel."), long, stop):
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()
    assert len(pieces) <= 5 and time.perf_counter() - started < 20

    for _ in range(fast.sessions + 2):  # more abandoned streams than sessions: each must give its session back
        stream = fast.stream(chat("Tell me about your return policy."), long)
        next(stream)
        stream.close()
    assert answer(fast, QUESTIONS[2]).strip(), "sessions leaked: a new answer could not start"
    assert fast.idle()


def test_too_long_prompt_is_a_clear_error(fast: LlamaCppModel):
    with pytest.raises(ModelError, match="context"):
        list(fast.stream(chat("refund " * 2000), GREEDY))


def test_an_answer_start_is_continued_by_the_served_model(fast: LlamaCppModel):
    """The real model, given the start of its own turn, writes on from it: "We accept" -> a payment method."""
    opened = chat(QUESTIONS[5]) + [{"role": "assistant", "content": "We accept"}]
    assert fast.tokenizer.decode(fast.prompt_ids(opened)).endswith("<|im_start|>assistant\nWe accept")
    rest = "".join(fast.stream(opened, GREEDY))
    assert rest.strip() and not rest.lstrip().lower().startswith("we accept")


def test_sampling_settings_are_honoured(fast: LlamaCppModel):
    short = GenerationSettings(max_new_tokens=5, temperature=0.0, repetition_penalty=1.0)
    assert len(fast.tokenizer(answer(fast, QUESTIONS[3], short))["input_ids"]) <= 6
    warm = GenerationSettings(max_new_tokens=24, temperature=1.2, top_p=0.95, repetition_penalty=1.1)
    samples = {answer(fast, QUESTIONS[3], warm) for _ in range(3)}
    assert len(samples) > 1, "temperature > 0 should sample different answers"


# ---------------------------------------------------------------------------------------------------------------------
# Choosing the backend


def test_load_model_serves_the_default_profile_with_llamacpp(smollm2_dir: Path, adapter: Path, caplog):
    from chatapp.model import load_model

    settings = Settings(data_dir=smollm2_dir.parent.parent)  # model_cache_dir = the shared converted copy
    settings.model.backend, settings.model.threads = "auto", 2
    settings.model.fast_sessions, settings.model.fast_context = 2, 512
    settings.model.adapter = str(adapter)
    model = load_model(settings)
    try:
        assert isinstance(model, LlamaCppModel)
        assert model.adapter_version == adapter.name and "llama.cpp" in model.description
        assert answer(model, QUESTIONS[0]).strip()
    finally:
        model.close()


def test_non_gguf_model_falls_back_to_transformers_with_a_warning(tiny_model_dir: Path, tmp_path: Path, caplog):
    from chatapp.model import load_model

    settings = Settings(data_dir=tmp_path)
    settings.model.name, settings.model.backend, settings.model.threads = str(tiny_model_dir), "llamacpp", 2
    with caplog.at_level("WARNING"):
        model = load_model(settings)
    assert isinstance(model, TransformersModel)
    assert "not a GGUF file" in caplog.text and "falling back to the transformers backend" in caplog.text


def test_missing_llama_cpp_falls_back_to_transformers_with_a_clear_message(tiny_model_dir: Path, tmp_path: Path):
    """A failed llama-cpp-python build looks like a failing import: the app must still answer, and say why."""
    script = f"""
import logging, sys
sys.modules["llama_cpp"] = None  # what a missing or broken build looks like to Python
logging.basicConfig(level=logging.WARNING)
from chatapp.config import Settings, GenerationSettings
from chatapp.model import load_model
from pathlib import Path
settings = Settings(data_dir=Path({str(tmp_path)!r}))
settings.model.name, settings.model.backend, settings.model.threads = {str(tiny_model_dir)!r}, "auto", 1
model = load_model(settings)
print(type(model).__name__)
print(repr("".join(model.stream([{{"role": "user", "content": "hi"}}], GenerationSettings(max_new_tokens=4)))))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == "TransformersModel"
    assert "llama-cpp-python is not installed or failed to build" in result.stderr
    assert "falling back to the transformers backend" in result.stderr


def test_unsupported_adapter_at_startup_falls_back_to_transformers(smollm2_dir: Path, adapter: Path, tmp_path, caplog):
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    (dora / "adapter_config.json").write_text(
        json.dumps(json.loads((adapter / "adapter_config.json").read_text()) | {"use_dora": True})
    )
    settings = Settings(data_dir=tmp_path)
    settings.model.threads, settings.model.fast_sessions, settings.model.fast_context = 1, 1, 256
    settings.model.adapter = str(dora)
    with caplog.at_level("WARNING"):
        assert load_fast_model(settings, smollm2_dir, "SmolLM2") is None
    assert "cannot serve adapter" in caplog.text and "use_dora" in caplog.text
