"""Tuning: dataset build (answer-only labels, dedupe, replay, split by conversation), LoRA training (loss goes down,
resume, early stopping, interruption), the evaluation gate, tune() with the registry, and a killed run.

Most tests use the 2-layer Llama from conftest (real SmolLM2 tokenizer and chat template, real peft/torch code path).
One slow test runs the whole loop on the real default model: tune -> gate -> promote -> hot swap -> rollback.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from chatapp.adapters import AdapterRegistry
from chatapp.benchutil import random_lora
from chatapp.config import REPO_ROOT, Settings
from chatapp.prompts import PromptManager
from chatapp.seed_data import load_golden, load_seed
from chatapp.tuning import (
    Dataset,
    Example,
    Hit,
    TuningError,
    answer_loss,
    build_dataset,
    compose,
    dedupe,
    encode_example,
    evaluate_loss,
    gate_decision,
    is_degenerate,
    is_refusal,
    rouge_l,
    run_gate,
    train,
    tune,
    tune_lock,
)


def tiny_tuning(settings: Settings) -> Settings:
    """Small, fast settings on top of conftest's tiny-model settings."""
    t = settings.tuning
    t.use_retriever = False
    t.max_examples = 24
    t.seed_examples = 24
    t.batch_size = 4
    t.grad_accum = 1
    t.max_seq_len = 256
    t.eval_every = 2
    t.patience = 0
    t.learning_rate = 5e-3
    t.golden_size = 3
    t.gate_max_new_tokens = 8
    t.replay_gate_size = 4
    t.threads = 1  # 2 OpenMP threads crawl when other jobs share the 2 cores
    return settings


@pytest.fixture
def tsettings(settings: Settings) -> Settings:
    return tiny_tuning(settings)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def record(conversation: str, question: str, answer: str, history=None, hits=None, rid=None) -> dict:
    return {"id": rid or f"{conversation}-{question}", "conversation": conversation, "source": "test",
            "history": history or [], "question": question, "answer": answer, "hits": hits or [], "gold": []}


# ---------------------------------------------------------------------------------------------------------- dataset


def test_only_the_final_answer_has_labels(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Is there parking?"},
                {"role": "assistant", "content": "Yes, free parking is available."}]
    ids, start, end = encode_example(tokenizer, messages)
    example = Example("x", "c", "new", "test", messages, ids, start, end)
    labels = example.labels()
    labelled = [t for t in labels if t != -100]
    assert tokenizer.decode(labelled) == "Yes, free parking is available.<|im_end|>"
    assert all(t == -100 for t in labels[:start]) and all(t == -100 for t in labels[end:])
    # the earlier assistant turn is context, not a target
    assert "Hello! How can I help?" not in tokenizer.decode(labelled)
    # the prompt part is exactly what inference feeds the model (chat template + generation prompt)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    assert ids[:start] == list(prompt)


def test_training_examples_are_rendered_like_inference_prompts(tsettings, tokenizer):
    tsettings.tuning.max_seq_len = 2048  # nothing shortened: the whole inference prompt
    prompts = PromptManager(tsettings)
    seed = [r for r in load_seed() if r["history"]][:3]
    dataset = build_dataset(seed, prompts, tokenizer, tsettings.tuning)
    for example in dataset.train + dataset.val:
        source = next(r for r in seed if r["id"] == example.id)
        rendered = prompts.render(None, question=source["question"], history=source["history"],
                                  hits=[Hit.of(h) for h in source["hits"]], mode="zero_shot")
        assert example.messages[:-1] == rendered.messages
        assert example.messages[-1] == {"role": "assistant", "content": source["answer"]}
        assert source["hits"][0]["answer"] in example.messages[-2]["content"]  # the grounding knowledge is shown


def test_dedupe_keeps_the_first_of_each_question_answer_pair():
    rows = [record("a", "Is there WiFi?", "Yes, free WiFi.", rid="1"),
            record("b", "is there wifi", "Yes - free WiFi!", rid="2"),  # same after normalising
            record("c", "Is there WiFi?", "No WiFi, sorry.", rid="3"),  # another answer: kept
            record("d", "   ", "Empty question", rid="4")]
    kept, dropped = dedupe(rows)
    assert [r["id"] for r in kept] == ["1", "3"]
    assert dropped == 2


def test_replay_ratio_and_limit():
    rng = random.Random(0)
    new = [record(f"n{i}", f"new q{i}", "a") for i in range(30)]
    earlier = [record(f"o{i}", f"old q{i}", "a") for i in range(100)]
    half = compose(new, earlier, replay_ratio=0.5, limit=500, rng=rng)
    assert sum(r["origin"] == "new" for r in half) == 30 and sum(r["origin"] == "replay" for r in half) == 30
    quarter = compose(new, earlier, replay_ratio=0.25, limit=500, rng=rng)
    assert sum(r["origin"] == "replay" for r in quarter) == 10
    capped = compose(new, earlier, replay_ratio=0.5, limit=20, rng=rng)
    assert len(capped) == 20 and sum(r["origin"] == "new" for r in capped) == 10
    fresh = compose(new, earlier, replay_ratio=0.5, limit=80, rng=rng, replay_all=True)  # cold start: refill
    assert len(fresh) == 80 and sum(r["origin"] == "new" for r in fresh) == 30
    assert compose(new, [], replay_ratio=0.5, limit=500, rng=rng) == [{**r, "origin": "new"} for r in new]


def test_split_is_by_conversation_and_stable(tsettings, tokenizer):
    tsettings.tuning.val_fraction = 0.3
    tsettings.tuning.val_max = 0
    prompts = PromptManager(tsettings)
    rows = [record(f"conv{c}", f"question {c}.{t}", f"answer {c}.{t}") for c in range(12) for t in range(3)]
    first = build_dataset(rows, prompts, tokenizer, tsettings.tuning)
    second = build_dataset(list(reversed(rows)), prompts, tokenizer, tsettings.tuning)
    train_convs = {e.conversation for e in first.train}
    val_convs = {e.conversation for e in first.val}
    assert train_convs and val_convs and not train_convs & val_convs
    assert val_convs == {e.conversation for e in second.val}  # the same side in every run
    assert all(sum(e.conversation == c for e in first.val) == 3 for c in val_convs)  # whole conversations


def test_too_long_examples_are_shortened_then_dropped(tsettings, tokenizer):
    tsettings.tuning.max_seq_len = 200
    prompts = PromptManager(tsettings)
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "blah " * 20}
               for i in range(8)]
    hits = [{"chunk_id": f"h{i}", "title": "Shop", "text": "policy " * 40} for i in range(4)]
    rows = [record("a", "Can I return shoes?", "Yes, within 30 days.", history=history, hits=hits),
            record("b", "Tell me everything", "word " * 400)]
    dataset = build_dataset(rows, prompts, tokenizer, tsettings.tuning)
    examples = dataset.train + dataset.val
    assert len(examples) == 1 and dataset.info["dropped_too_long"] == 1
    assert len(examples[0].input_ids) <= 200
    assert tokenizer.decode(examples[0].input_ids[examples[0].label_start:examples[0].label_end]).startswith(
        "Yes, within 30 days.")


# ---------------------------------------------------------------------------------------------------------- training


def memorise_dataset(tokenizer, n: int = 12, conflicting_val: bool = False) -> Dataset:
    """Short question/answer chats; val either repeats train (learnable) or contradicts it (overfitting)."""
    def example(i: int, answer: str, split: str) -> Example:
        messages = [{"role": "user", "content": f"Code {i}?"}, {"role": "assistant", "content": answer}]
        ids, start, end = encode_example(tokenizer, messages)
        return Example(f"{split}{i}", f"{split}{i}", "new", "test", messages, ids, start, end)

    train_set = [example(i, f"The code is {i * 7 % 10} blue.", "t") for i in range(n)]
    if conflicting_val:
        val = [example(i, f"Nope, {i} red green yellow.", "v") for i in range(4)]
    else:
        val = [example(i, f"The code is {i * 7 % 10} blue.", "v") for i in range(4)]
    return Dataset(train_set, val, [], {})


def test_training_reduces_loss(tiny_model_dir, tokenizer, tsettings, tmp_path):
    dataset = memorise_dataset(tokenizer)
    tsettings.tuning.learning_rate = 3e-2
    result = train(tiny_model_dir, dataset, tsettings.tuning, tmp_path / "run", max_steps=30, threads=1,
                   progress=False)
    log = json.loads(result.log_path.read_text())
    first_val, best_val = log["evals"][0]["val_loss"], result.best_val_loss
    # the tiny model starts at ln(vocab) = 10.8 and its frozen final norm caps how far LoRA can go: 0.4 nats is
    # far beyond noise (the untrained loss varies by < 0.01)
    assert best_val < first_val - 0.4, (first_val, best_val)
    assert statistics_mean(s["loss"] for s in log["steps"][-5:]) < statistics_mean(s["loss"] for s in log["steps"][:5])
    assert (result.best_dir / "adapter_config.json").is_file() and result.curve_path.is_file()
    assert result.steps == 30 and not result.interrupted


def statistics_mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_model_dir, tokenizer, tsettings, tmp_path):
    from safetensors.torch import load_file

    dataset = memorise_dataset(tokenizer)
    tsettings.tuning.eval_every = 3
    straight = train(tiny_model_dir, dataset, tsettings.tuning, tmp_path / "straight", max_steps=8, threads=1,
                     progress=False)
    stop = threading.Event()
    first = train(tiny_model_dir, dataset, tsettings.tuning, tmp_path / "resumed", max_steps=8, threads=1,
                  progress=False, stop=stop, on_step=lambda step, loss: step == 4 and stop.set())
    assert straight.steps == 8 and first.interrupted and first.steps == 4
    assert (tmp_path / "resumed" / "checkpoint.json").is_file()  # Ctrl-C leaves a usable checkpoint...
    pointer = json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                              str(tmp_path / "resumed" / pointer["dir"]))  # ...that loads as a PEFT adapter
    second = train(tiny_model_dir, dataset, tsettings.tuning, tmp_path / "resumed", max_steps=8, threads=1,
                   progress=False)
    assert second.resumed_from == 4 and second.steps == 8 and not second.interrupted
    last = lambda run: load_file(tmp_path / run / json.loads((tmp_path / run / "checkpoint.json").read_text())["dir"]
                                 / "adapter_model.safetensors")  # noqa: E731
    a, b = last("straight"), last("resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_early_stopping_keeps_the_best_checkpoint(tiny_model_dir, tokenizer, tsettings, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dataset = memorise_dataset(tokenizer, conflicting_val=True)
    tsettings.tuning.learning_rate = 3e-2
    tsettings.tuning.eval_every = 1
    tsettings.tuning.patience = 2
    result = train(tiny_model_dir, dataset, tsettings.tuning, tmp_path / "run", max_steps=60, threads=1,
                   progress=False)
    log = json.loads(result.log_path.read_text())
    losses = [e["val_loss"] for e in log["evals"]]
    assert result.stopped_early and result.steps < 60
    assert result.best_val_loss == pytest.approx(min(losses))
    assert losses[-1] > result.best_val_loss  # training went on past the best point...
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(result.best_dir))
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    assert evaluate_loss(model, dataset.val, pad)["loss"] == pytest.approx(result.best_val_loss, rel=1e-4)  # ...best kept


def test_answer_loss_equals_the_full_model_loss(tiny_model_dir, tokenizer):
    """The fast path (vocabulary projection only at answer positions) computes the same loss as transformers."""
    from transformers import AutoModelForCausalLM

    from chatapp.tuning.train import _collate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dataset = memorise_dataset(tokenizer)
    ids, labels, mask = _collate(dataset.train[:3], tokenizer.eos_token_id)
    loss_sum, count, _ = answer_loss(model, ids, labels, mask)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss_sum / count, reference, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- gate


def test_behaviour_detectors():
    assert is_degenerate("the the the the") and is_degenerate("") and is_degenerate("go to go to go to the shop")
    assert not is_degenerate("Yes, the hotel has free parking for guests. Anything else?")
    assert is_refusal("I'm not sure; I can connect you with a human agent.")
    assert not is_refusal("Yes, free WiFi is available at the Allenbell.")
    assert rouge_l("free wifi is available", "yes free wifi is available") == pytest.approx(2 * 1 * 0.8 / 1.8)


@pytest.fixture(scope="module")
def golden_file(tmp_path_factory) -> Path:
    """Three held-out turns with short contexts (fast to generate with)."""
    rows = [r for r in load_golden() if not r["cites_reviews"] and not r["history"]][:3] or load_golden()[:3]
    rows = [{**r, "history": [], "hits": r["hits"][:1]} for r in rows]
    path = tmp_path_factory.mktemp("golden") / "golden.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sane_model_dir(tiny_model_dir, golden_file, tmp_path_factory) -> Path:
    """The tiny model fully fine-tuned to answer the golden items: a base whose answers mean something, so the
    gate has something to protect."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatapp.tuning.train import _collate

    settings = Settings(data_dir=tmp_path_factory.mktemp("sane-data"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = PromptManager(settings)
    examples = []
    for row in map(json.loads, golden_file.read_text().splitlines()):
        messages = prompts.training_example(None, question=row["question"], history=[], answer=row["answer"],
                                            hits=[Hit.of(h) for h in row["hits"]])["messages"]
        examples.append(Example(row["id"], row["id"], "new", "t", messages, *encode_example(tokenizer, messages)))
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids, labels, mask = _collate(examples, tokenizer.eos_token_id)
    for _ in range(120):
        loss_sum, count, _ = answer_loss(model, ids, labels, mask)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("sane-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_adapter(model_dir: Path, out: Path, broken: bool) -> Path:
    """A LoRA adapter that changes nothing (B = 0, as peft initialises it) or one with huge random B weights."""
    return random_lora(model_dir, out, seed=1, std=3.0 if broken else 0.0, rank=4, modules=("q_proj", "v_proj", "o_proj"))


def test_gate_rejects_a_broken_candidate_and_accepts_a_fine_one(sane_model_dir, golden_file, tsettings, tmp_path):
    tsettings.model.name = str(sane_model_dir)
    tsettings.tuning.golden_file = golden_file
    tsettings.tuning.gate_max_new_tokens = 40
    prompts = PromptManager(tsettings)
    base = run_gate(tsettings, sane_model_dir, "hash", prompts, make_adapter(sane_model_dir, tmp_path / "ok", False),
                    None, [], progress=False)
    assert base["scores"]["base"]["rouge_l"] > 0.5  # the sane base really answers (else the test proves nothing)
    assert base["passed"], base["checks"]
    broken = run_gate(tsettings, sane_model_dir, "hash", prompts, make_adapter(sane_model_dir, tmp_path / "bad", True),
                      None, [], progress=False)
    assert not broken["passed"]
    failed = {c["check"] for c in broken["checks"] if not c["passed"]}
    # no shop questions here (no retriever): the behaviour checks catch it; ROUGE-L shows the drop as a figure
    assert failed and failed <= {"stops within the token limit", "no degenerate repetition",
                                 "does not refuse what it used to answer"}
    assert broken["scores"]["candidate"]["rouge_l"] < base["scores"]["candidate"]["rouge_l"] - 0.3


def test_gate_decision_rules(tsettings):
    def scores(accuracy, unsupported, replay, stops, degenerate, refused, rouge=0.30):
        return {"answer_accuracy": accuracy, "unsupported_rate": unsupported, "rouge_l": rouge, "cosine": 0.6,
                "replay_accuracy": replay, "stop_rate": stops, "degenerate_rate": degenerate,
                "items": [{"refused": r} for r in refused]}

    t = tsettings.tuning
    reference = scores(0.60, 0.10, 0.50, 0.9, 0.0, [False] * 10)
    ok, checks = gate_decision({"base": reference, "candidate": scores(0.60, 0.10, 0.49, 0.85, 0.05,
                                                                       [True] + [False] * 9, rouge=0.10)}, t)
    assert ok  # within every margin, one new refusal of ten allowed; ROUGE-L fell but is a figure, not a check
    assert any(c["check"] == "golden ROUGE-L" and "figure only" in c["rule"] for c in checks)
    for bad in (scores(0.55, 0.10, 0.50, 0.9, 0.0, [False] * 10, rouge=0.5),  # fewer right answers, better ROUGE
                scores(0.70, 0.15, 0.50, 0.9, 0.0, [False] * 10),   # more right, but invents more
                scores(0.60, 0.10, 0.40, 0.9, 0.0, [False] * 10),   # forgot the replay set
                scores(0.60, 0.10, 0.50, 0.5, 0.0, [False] * 10),   # no longer stops
                scores(0.60, 0.10, 0.50, 0.9, 0.3, [False] * 10),   # repeats itself
                scores(0.60, 0.10, 0.50, 0.9, 0.0, [True] * 3 + [False] * 7)):  # refuses what base answered
        assert not gate_decision({"base": reference, "candidate": bad}, t)[0]


def test_gate_scores_shop_questions_through_the_serving_steps(tsettings, tmp_path):
    """The correctness part renders each question with retrieval + evidence + the live template, once."""
    import json

    from chatapp.prompts import PromptManager
    from chatapp.retrieval import Retriever
    from chatapp.tuning.correctness import gate_questions, prepare, score

    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "fees.md").write_text("# Fees\n\n## Overnight shipping\n\nOvernight shipping costs $20 for "
                                             "Bronze members; Gold members get it free.\n", encoding="utf-8")
    questions = tmp_path / "qa.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"id": "a", "turns": ["What does overnight shipping cost? I'm bronze."], "facts": [["$20"]]},
        {"id": "zh", "turns": ["隔夜送达多少钱？"], "facts": [["20"]]}]) + "\n", encoding="utf-8")
    tsettings.retrieval.knowledge_dir = tmp_path / "kb"
    tsettings.tuning.gate_questions = questions
    items = gate_questions(tsettings)
    assert [i["id"] for i in items] == ["a"]  # the tiny model's profile is English-only
    prepared = prepare(tsettings, PromptManager(tsettings), Retriever.open(tsettings), items)
    assert "$20 for Bronze members" in prepared[0]["messages"][-1]["content"]
    right, wrong = score(prepared, ["It costs $20."]), score(prepared, ["It costs $35."])
    assert right["answer_accuracy"] == 1.0 and right["unsupported_rate"] == 0.0
    assert wrong["answer_accuracy"] == 0.0 and wrong["unsupported_rate"] == 1.0


# ---------------------------------------------------------------------------------------------------------- tune()


def test_tune_registers_a_candidate_with_full_metadata(tsettings, golden_file):
    tsettings.tuning.golden_file = golden_file
    report = tune(tsettings, max_steps=4, progress=False)
    assert report.status in ("promoted", "rejected"), report.message
    registry = AdapterRegistry(tsettings)
    info = registry.get(report.version)
    meta = info.metadata
    assert meta["base_model"]["sha256"] and meta["data"]["hash"] and meta["template"]["name"] == "support"
    assert meta["hyperparameters"]["lora_rank"] == tsettings.tuning.lora_rank
    assert meta["metrics"]["steps"] == 4 and meta["gate"]["checks"]
    for name in ("adapter_model.safetensors", "gate_report.json", "loss_curve.png", "train_log.json",
                 "train_records.jsonl"):
        assert (info.path / name).is_file(), name
    assert (registry.active() is not None) == (report.status == "promoted") == report.passed
    # no feedback since: a second run has nothing new to learn
    if report.status == "promoted":
        assert tune(tsettings, max_steps=2, progress=False).status == "no_new_data"


def test_feedback_is_new_data_and_earlier_data_is_replayed(tsettings, golden_file):
    from chatapp.feedback import FeedbackStore, TurnRecord

    tsettings.tuning.golden_file = golden_file
    tsettings.tuning.gate_margin = 1.0  # this test is about the data, not the gate
    tsettings.tuning.gate_behaviour_margin = 1.0
    tsettings.tuning.max_new_refusals = 1.0
    first = tune(tsettings, max_steps=2, progress=False)
    assert first.status == "promoted"
    store = FeedbackStore(tsettings.feedback_db, tsettings.feedback)
    for i in range(4):
        store.log_turn(TurnRecord(message_id=f"m{i}", session_id=f"s{i}", user_message=f"Do you ship to Canada {i}?",
                                  answer="Maybe."))
        store.rate(f"m{i}", -1, correction=f"Yes, we ship to Canada; delivery takes {i + 5} days.")
    store.close()
    second = tune(tsettings, max_steps=2, progress=False)
    assert second.status == "promoted", second.message
    meta = AdapterRegistry(tsettings).get(second.version).metadata
    assert meta["init_adapter"] == first.version  # warm start from the active adapter
    assert meta["data"]["feedback_records"] == 4
    assert meta["data"]["new"] == 4 and meta["data"]["replay"] == 4  # replay_ratio 0.5
    records = [json.loads(line) for line in
               (AdapterRegistry(tsettings).get(second.version).path / "train_records.jsonl").read_text().splitlines()]
    assert any("Canada" in r["question"] for r in records)


def test_a_second_tune_waits_for_the_lock(tsettings):
    with tune_lock(tsettings):
        with pytest.raises(TuningError, match="another tuning run"):
            tune(tsettings, max_steps=1, progress=False)


def test_killed_training_never_touches_the_active_adapter(tsettings, golden_file, tmp_path, tiny_model_dir):
    """SIGKILL in the middle of training: registry and active adapter byte-identical; the next run resumes."""
    registry = AdapterRegistry(tsettings)
    active = registry.add(make_adapter(tiny_model_dir, tmp_path / "live", False), {"note": "live"})
    registry.promote(active.version)
    before = {p.relative_to(tsettings.adapters_dir): p.read_bytes()
              for p in tsettings.adapters_dir.rglob("*") if p.is_file() and not p.name.startswith(".")}
    config = tmp_path / "chatapp.toml"
    config.write_text(
        "[tuning]\nuse_retriever = false\nmax_examples = 24\nseed_examples = 24\nbatch_size = 2\ngrad_accum = 1\n"
        "eval_every = 5\npatience = 0\nmax_seq_len = 256\nwarm_start = false\n"
        f"golden_file = \"{golden_file}\"\ngolden_size = 2\ngate_max_new_tokens = 4\n")
    command = [sys.executable, "-m", "chatapp.cli", "--config", str(config), "--data-dir", str(tsettings.data_dir),
               "--model", str(tiny_model_dir), "--threads", "1", "tune", "--quiet", "--force", "--max-steps", "100000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        status = tsettings.data_dir / "tuning" / "status.json"
        while time.time() < deadline:
            try:
                if json.loads(status.read_text()).get("step", 0) >= 10:
                    break
            except (OSError, ValueError):
                pass
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        else:
            pytest.fail("training never reached step 10")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    after = {p.relative_to(tsettings.adapters_dir): p.read_bytes()
             for p in tsettings.adapters_dir.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert after == before
    assert [i.version for i in AdapterRegistry(tsettings).list()] == [active.version]
    assert AdapterRegistry(tsettings).active().version == active.version
    # the interrupted run resumes from its last checkpoint (same settings as the killed process)
    resumed = Settings.load(config, **{"model.name": str(tiny_model_dir), "model.threads": 1})
    resumed.data_dir = tsettings.data_dir
    runs = list((tsettings.data_dir / "tuning" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoint.json").is_file()
    step = json.loads((runs[0] / "checkpoint.json").read_text())["step"]
    result = train(tiny_model_dir, Dataset.load(runs[0] / "dataset.json"), resumed.tuning, runs[0],
                   max_steps=step + 2, threads=1, progress=False)
    assert result.resumed_from == step and result.steps == step + 2


# ---------------------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_end_to_end_on_the_real_model(smollm2_dir, tmp_path, golden_file):
    """tune -> gate -> promote -> hot swap into a running model -> rollback, on SmolLM2-135M with a few steps."""
    from chatapp.bot import Bot
    from chatapp.config import GenerationSettings
    from chatapp.model import TransformersModel

    settings = Settings(data_dir=tmp_path / "data")
    settings.model.name = str(smollm2_dir)
    settings.model.threads = 1  # 2 OpenMP threads crawl when other jobs share the 2 cores
    t = settings.tuning
    t.threads = 1
    t.use_retriever, t.max_examples, t.seed_examples, t.max_steps = False, 24, 24, 0
    t.batch_size, t.grad_accum, t.eval_every, t.max_seq_len = 4, 1, 3, 256
    t.golden_file, t.golden_size, t.gate_max_new_tokens, t.replay_gate_size = golden_file, 3, 32, 4
    t.gate_margin, t.gate_behaviour_margin, t.max_new_refusals = 0.2, 0.34, 0.34  # a 3-step adapter is ~ the base
    running = TransformersModel(smollm2_dir, "SmolLM2", threads=1)  # the app's model, already serving
    question = [{"role": "user", "content": "Is there free parking at the hotel?"}]
    gen = GenerationSettings(max_new_tokens=12, temperature=0.0)
    before = "".join(running.stream(question, gen))

    report = tune(settings, max_steps=3, progress=False, install_shipped=False)  # from the base, not the shipped one
    assert report.status == "promoted", (report.message, report.gate.get("checks"))
    registry = AdapterRegistry(settings)
    active = registry.active()
    assert active.version == report.version and active.metadata["base_model"]["sha256"]

    bot = Bot(settings, running, adapters=registry)  # the app's pipeline around the running model
    bot.sync_adapter()  # what every answer does first: follow the registry
    assert running.adapter_version == report.version and report.version in running.description
    assert "adapters" not in bot.problems  # trained on these very base weights
    with_adapter = "".join(running.stream(question, gen))
    assert with_adapter.strip()

    assert registry.rollback() is None  # back to the base model
    assert registry.active() is None
    bot.sync_adapter()
    assert running.adapter_version is None
    assert "".join(running.stream(question, gen)) == before  # exactly the base model again


def test_periodic_retune_waits_for_enough_new_feedback(tsettings, capsys):
    from chatapp.cli import main
    from chatapp.tuning import parse_interval, tune_if_due

    assert parse_interval("24h") == 86400 and parse_interval("30m") == 1800 and parse_interval("90") == 90
    with pytest.raises(Exception, match="not an interval"):
        parse_interval("soon")
    assert tune_if_due(tsettings, min_new_feedback=1) is None  # no feedback at all: nothing trained
    assert not (tsettings.data_dir / "tuning" / "runs").exists()
    code = main(["--data-dir", str(tsettings.data_dir), "--model", tsettings.model.name, "tune",
                 "--min-new-feedback", "3", "--quiet"])
    assert code == 0 and "not enough new feedback" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse refuses a bad interval with a message
        main(["--data-dir", str(tsettings.data_dir), "tune", "--every", "soon"])


def test_tune_now_runs_with_the_apps_own_settings(tsettings):
    """The Adapters tab's "Tune now" starts a child process; it must train with everything the app was started with
    (TOML file and flags alike), not the defaults."""
    from chatapp.tuning import launch_background_tune

    tsettings.retrieval.knowledge_dir = tsettings.data_dir / "kb-from-a-flag"
    launch_background_tune(tsettings, extra_args=["--min-new-feedback", "3"])
    snapshot = tsettings.data_dir / "tuning" / "background-settings.json"
    assert dataclasses.replace(Settings.load(snapshot), ui=tsettings.ui) == tsettings
    log_path, deadline = tsettings.data_dir / "tuning" / "background.log", time.monotonic() + 120
    while "not enough new feedback" not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "not enough new feedback" in log_path.read_text(), log_path.read_text()


def test_busy_cores_sees_work_that_is_running_now():
    """Training picks its thread count from the cores other work is using right now (not the lagging load average)."""
    from chatapp.tuning import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert busy_cores(sample_s=1.0) >= 0.6
    finally:
        spinner.kill()
        spinner.wait()
