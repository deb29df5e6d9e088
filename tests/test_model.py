"""Model runtime: streaming, stop, repetition guard, LoRA hot swap, cache verification, clear errors."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from chatapp.benchutil import random_lora
from chatapp.config import GenerationSettings, ModelSettings
from chatapp.model import (
    ModelError,
    TransformersModel,
    _manifest_ok,
    _repetition_guard,
    resolve_base_model,
)

MESSAGES = [{"role": "system", "content": "You are a support assistant."}, {"role": "user", "content": "Hello there"}]
GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> TransformersModel:
    return TransformersModel(tiny_model_dir, "tiny", threads=2)


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A real PEFT LoRA adapter with non-zero B, so it visibly changes the model's output."""
    return random_lora(model_dir, out, seed=seed, std=0.5, rank=4, modules=("q_proj", "v_proj"))


def greedy_ids(model: TransformersModel) -> list[int]:
    ids = torch.tensor([model.prompt_ids(MESSAGES)])
    with torch.inference_mode():
        out = model.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_stream_yields_text_within_the_token_budget(tiny: TransformersModel):
    pieces = list(tiny.stream(MESSAGES, GREEDY))
    text = "".join(pieces)
    assert len(pieces) >= 2, "an answer should arrive in several pieces"
    assert 0 < len(tiny.tokenizer(text)["input_ids"]) <= GREEDY.max_new_tokens + 2


def test_stream_is_deterministic_when_greedy(tiny: TransformersModel):
    assert "".join(tiny.stream(MESSAGES, GREEDY)) == "".join(tiny.stream(MESSAGES, GREEDY))


def test_stop_event_ends_generation_early(tiny: TransformersModel):
    stop = threading.Event()
    long = GenerationSettings(max_new_tokens=200, temperature=0.0, repetition_penalty=1.0)
    pieces = []
    for piece in tiny.stream(MESSAGES, long, stop):
        pieces.append(piece)
        stop.set()
    assert 1 <= len(pieces) <= 3


def test_prompt_uses_the_models_chat_template(tiny: TransformersModel):
    text = tiny.tokenizer.decode(tiny.prompt_ids(MESSAGES))
    assert "<|im_start|>system\nYou are a support assistant.<|im_end|>" in text
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_a_trailing_assistant_message_is_continued_not_closed(tiny: TransformersModel):
    """A template's answer_start: the model's turn is left open after those words, and the model goes on from them."""
    opened = MESSAGES + [{"role": "assistant", "content": "根据我们的政策，"}]
    text = tiny.tokenizer.decode(tiny.prompt_ids(opened))
    assert text.endswith("<|im_start|>assistant\n根据我们的政策，") and text.count("<|im_start|>assistant") == 1
    assert tiny.prompt_ids(opened)[:len(tiny.prompt_ids(MESSAGES))] == tiny.prompt_ids(MESSAGES)
    assert "".join(tiny.stream(opened, GREEDY))  # the model continues from there


def test_repetition_guard_stops_loops_not_normal_text():
    guard = _repetition_guard(window=8, repeats=3)
    looping = torch.tensor([[5, 6, 7, 8, 1, 2, 3, 1, 2, 3, 1, 2, 3]])
    normal = torch.tensor([list(range(30))])
    assert guard(looping, None)
    assert not guard(normal, None)
    assert not guard(torch.tensor([[4, 4, 4]]), None)  # "..." style short runs are fine


def test_adapter_hot_swap_without_reloading_base(tiny_model_dir: Path, tmp_path: Path):
    model = TransformersModel(tiny_model_dir, "tiny", threads=2)
    base_object = model.base
    base_out = greedy_ids(model)
    first = make_adapter(tiny_model_dir, tmp_path / "a1", seed=1)
    second = make_adapter(tiny_model_dir, tmp_path / "a2", seed=2)

    model.set_adapter(first, "1")
    out1 = greedy_ids(model)
    assert model.adapter_version == "1" and "adapter 1" in model.description
    model.set_adapter(second, "2")
    out2 = greedy_ids(model)
    assert out1 != base_out and out2 != out1
    model.set_adapter(first, "1")  # back to an adapter already loaded
    assert greedy_ids(model) == out1
    model.set_adapter(None)
    assert greedy_ids(model) == base_out and model.adapter_version is None
    assert model.base is base_object


def test_wrong_adapter_path_names_it(tiny: TransformersModel, tmp_path: Path):
    with pytest.raises(ModelError, match="no-such-adapter"):
        tiny.set_adapter(tmp_path / "no-such-adapter", "x")
    assert tiny.adapter_version is None


def test_wrong_model_path_names_it(tmp_path: Path):
    with pytest.raises(ModelError, match="/nowhere/model.gguf"):
        resolve_base_model(ModelSettings(name="/nowhere/model.gguf"), tmp_path)


def test_prompt_longer_than_context_is_refused_clearly(tiny: TransformersModel):
    huge = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(ModelError, match="context"):
        list(tiny.stream(huge, GREEDY))


def test_manifest_detects_truncated_cache(smollm2_dir: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("manifest.json", "config.json"):
        shutil.copy(smollm2_dir / name, copy / name)
    (copy / "model.safetensors").symlink_to(smollm2_dir / "model.safetensors")
    for other in smollm2_dir.iterdir():
        if not (copy / other.name).exists():
            (copy / other.name).symlink_to(other)
    assert _manifest_ok(copy)
    (copy / "model.safetensors").unlink()
    with open(copy / "model.safetensors", "wb") as f:
        f.write(b"\0" * 1000)
    assert not _manifest_ok(copy)


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt_and_real_model_answers(smollm2_dir: Path, tmp_path: Path):
    """Smoke test on the real default model: a corrupt cached copy is rebuilt from the package, then it answers."""
    cache = tmp_path / "models"
    shutil.copytree(smollm2_dir, cache / smollm2_dir.name)
    (cache / smollm2_dir.name / "model.safetensors").write_bytes(b"broken")
    rebuilt = resolve_base_model(ModelSettings(), cache)
    assert rebuilt == cache / smollm2_dir.name and _manifest_ok(rebuilt)
    model = TransformersModel(rebuilt, "SmolLM2-135M-Instruct", threads=2)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = "".join(model.stream(question, GenerationSettings(max_new_tokens=40, temperature=0.0)))
    assert "paris" in answer.lower()
