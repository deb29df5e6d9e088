"""The answer path end to end: evidence in the prompt, the guard on the model's answer, the turn logged with the
guard's verdict, `chatapp eval answers`, and the shipped adapter on a fresh install."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chatapp.bot import HANDOFF_REPLY, Bot, Session
from chatapp.config import Settings
from chatapp.feedback import FeedbackStore
from chatapp.prompts import PromptManager
from chatapp.retrieval import Retriever

ARTICLE = """# Shipping

## Shipping costs are too high

We find your order and check its status.

- **Order received** or **in transit**: we waive the shipping fee.
- **Out for delivery** or **delivered**: we refund part of it: standard shipping is $8.00.

## Upgrading to overnight shipping

Overnight shipping costs $20 for Bronze and Guest members; Gold members get it free.
"""


class ScriptedModel:
    """A stand-in for the dialogue model that says a fixed text, piece by piece (the model is not what these tests
    test: the pipeline around it is). Records the prompt it was given."""

    description = "scripted"
    adapter_version = None
    context_tokens = 4096

    def __init__(self, text: str):
        self.text = text
        self.prompts: list[list[dict]] = []

    def stream(self, messages, gen, stop: threading.Event | None = None):
        self.prompts.append(messages)
        for i in range(0, len(self.text), 3):
            yield self.text[i:i + 3]

    def count_tokens(self, messages) -> int:
        return sum(len(m["content"]) // 4 for m in messages)

    def set_adapter(self, path, version=None) -> None:
        pass


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Settings:
    root = tmp_path_factory.mktemp("shop")
    (root / "knowledge").mkdir()
    (root / "knowledge" / "shipping.md").write_text(ARTICLE, encoding="utf-8")
    settings = Settings(data_dir=root / "data")
    settings.retrieval.knowledge_dir = root / "knowledge"
    return settings


@pytest.fixture(scope="module")
def retriever(shop: Settings) -> Retriever:
    return Retriever.open(shop)


def make_bot(shop: Settings, retriever: Retriever, text: str, tmp_path: Path) -> Bot:
    store = FeedbackStore(tmp_path / "feedback.db", shop.feedback)
    return Bot(shop, ScriptedModel(text), retriever=retriever, prompts=PromptManager(shop, retriever.embedder),
               feedback=store)


def ask(bot: Bot, question: str) -> tuple[list, object]:
    replies = list(bot.answer(question, Session()))
    return replies, replies[-1]


QUESTION = "Shipping was too expensive and my order has already been delivered. What can you do?"


def test_the_prompt_quotes_the_evidence_not_whole_chunks(shop, retriever, tmp_path):
    bot = make_bot(shop, retriever, "We refund part of it.", tmp_path)
    _, reply = ask(bot, QUESTION)
    prompt = bot.model.prompts[0][-1]["content"]
    assert "standard shipping is $8.00" in prompt and "**" not in prompt
    assert reply.evidence[0].text.startswith("Out for delivery or delivered")
    assert reply.evidence[0].title == "Shipping costs are too high"


def test_an_invented_amount_is_replaced_and_never_shown(shop, retriever, tmp_path):
    bot = make_bot(shop, retriever, "Sorry about that! The standard refund is $12. Anything else?", tmp_path)
    replies, reply = ask(bot, QUESTION)
    assert all("$12" not in r.text for r in replies)
    assert reply.replaced and reply.guard["unsupported"] == ["$12"]
    assert reply.guard["action"] == "replaced_extractive"
    assert reply.text.startswith('From our help article "Shipping costs are too high":')
    assert "$8.00" in reply.text
    bot.feedback.flush()
    turn = bot.feedback.turn(reply.message_id)
    assert turn["guard_replaced"] is True and turn["guard"]["unsupported"] == ["$12"]
    assert turn["evidence"][0]["chunk_id"].startswith("shipping.md#")
    assert bot.feedback.stats()["guard_replaced"] == 1


def test_a_supported_amount_is_kept(shop, retriever, tmp_path):
    answer = "Sorry about that! As your order was already delivered, we refund part of the shipping: standard " \
        "shipping is $8."
    bot = make_bot(shop, retriever, answer, tmp_path)
    replies, reply = ask(bot, QUESTION)
    assert not reply.replaced and reply.guard["claims"] == ["$8"] and reply.guard["action"] == "kept"
    assert reply.text == answer
    assert len(replies) > 3  # it streamed (from the first substantive words on: see guard.StreamGuard)


def test_a_decline_despite_evidence_shows_the_evidence_and_the_way_to_a_person(shop, retriever, tmp_path):
    from chatapp.bot import STILL_UNSURE

    decline = "I'm not sure about that, and I'd rather not guess. Would you like me to connect you with our team?"
    bot = make_bot(shop, retriever, decline, tmp_path)
    replies, reply = ask(bot, QUESTION)
    assert all("not sure" not in r.text for r in replies)  # the decline never flickers on screen
    assert reply.replaced and reply.guard["action"] == "replaced_declined" and reply.guard["declined"]
    assert reply.text.startswith('From our help article "Shipping costs are too high":') and "$8.00" in reply.text
    assert reply.text.endswith(STILL_UNSURE)
    assert decline.startswith(reply.guard["model_answer"])  # generation stopped at the decline
    bot.retriever = None  # nothing quoted: declining is the right answer and is kept
    _, reply = ask(bot, QUESTION)
    assert not reply.replaced and reply.text == decline


def test_an_unsupported_claim_without_evidence_becomes_a_handoff_offer(shop, retriever, tmp_path):
    bot = make_bot(shop, retriever, "Yes, 50% off for you.", tmp_path)
    bot.retriever = None  # no knowledge at all: nothing to quote
    _, reply = ask(bot, "Can I have a discount on my next order?")
    assert reply.replaced and reply.text == HANDOFF_REPLY and reply.guard["action"] == "replaced_handoff"


def test_a_chinese_question_on_an_english_only_model_is_told_what_the_bot_can_do(shop, retriever, tmp_path):
    bot = make_bot(shop, retriever, "whatever", tmp_path)
    _, reply = ask(bot, "升级隔夜送达要多少钱？")
    assert "英文" in reply.text and reply.handoff is None and not bot.model.prompts


def test_a_chinese_question_the_knowledge_does_not_answer_gets_a_chinese_handoff_offer(shop, retriever, tmp_path):
    from chatapp.bot import HANDOFF_REPLY_ZH

    bot = make_bot(shop, retriever, "whatever", tmp_path)
    bot.settings = Settings(data_dir=shop.data_dir)  # its own copy: a model that writes Chinese
    bot.settings.retrieval.knowledge_dir = shop.retrieval.knowledge_dir
    bot.settings.model.languages = "en,zh"
    _, reply = ask(bot, "你们的手机信号好吗？")  # nothing in the shipping article
    assert reply.handoff == "low_confidence" and reply.text == HANDOFF_REPLY_ZH and not bot.model.prompts


def test_a_chinese_answer_starts_in_chinese_on_a_model_that_continues_answers(shop, retriever, tmp_path):
    """support_zh's answer_start opens the model's turn (so a small model answering from English evidence keeps
    to Chinese) and is part of the answer shown; a model that cannot continue a turn is not given it."""
    for continues in (True, False):
        bot = make_bot(shop, retriever, "Bronze 会员升级隔夜送达需要 $20。", tmp_path)
        bot.model.continues_answers = continues
        bot.settings = Settings(data_dir=shop.data_dir)  # its own copy: a model that writes Chinese
        bot.settings.retrieval.knowledge_dir = shop.retrieval.knowledge_dir
        bot.settings.model.languages = "en,zh"
        _, reply = ask(bot, "Overnight shipping 要多少钱？我是 Bronze 会员。")
        start = bot.prompts.load("support_zh").answer_start
        prompt = bot.model.prompts[0]
        assert reply.template == "support_zh" and start.startswith("根据") and not reply.replaced
        if continues:
            assert prompt[-1] == {"role": "assistant", "content": start} and reply.text.startswith(start + "Bronze")
        else:
            assert prompt[-1]["role"] == "user" and reply.text.startswith("Bronze")


def test_an_answer_that_stops_at_its_answer_start_is_replaced_by_the_evidence(shop, retriever, tmp_path):
    bot = make_bot(shop, retriever, "", tmp_path)  # the model ends its turn at once
    bot.model.continues_answers = True
    bot.settings = Settings(data_dir=shop.data_dir)
    bot.settings.retrieval.knowledge_dir = shop.retrieval.knowledge_dir
    bot.settings.model.languages = "en,zh"
    _, reply = ask(bot, "Overnight shipping 要多少钱？我是 Bronze 会员。")
    assert reply.replaced and reply.guard["action"] == "replaced_declined" and "$20" in reply.text


def test_chinese_questions_go_to_the_chinese_model_when_the_main_one_is_english_only(shop, retriever, tmp_path):
    bot = make_bot(shop, retriever, "Overnight shipping costs $20 for Bronze members.", tmp_path)
    chinese = ScriptedModel("铜卡会员升级隔夜送达需要 $20。")
    chinese.description, chinese.continues_answers = "bilingual", True
    bot.chinese_model = chinese
    bot.__dict__.pop("languages", None)  # cached before the Chinese model was set
    _, english = ask(bot, "How much is overnight shipping for Bronze members?")
    _, reply = ask(bot, "Overnight shipping 要多少钱？我是 Bronze 会员。")
    assert len(bot.model.prompts) == 1 and len(chinese.prompts) == 1 and "Bronze" in english.text
    assert reply.template == "support_zh" and reply.text.endswith("铜卡会员升级隔夜送达需要 $20。")
    logged = [bot.feedback.turn(r.message_id) for r in (english, reply)]
    assert [t["model"] for t in logged] == ["scripted", "bilingual"]
    assert "Chinese questions:** bilingual" in bot.status()


def test_the_chinese_model_loads_only_beside_an_english_only_model(tiny_model_dir, tmp_path):
    from chatapp.model import TransformersModel, load_chinese_model

    settings = Settings(data_dir=tmp_path)
    assert load_chinese_model(settings) is None  # none configured
    settings.model.chinese_model, settings.model.backend = str(tiny_model_dir), "transformers"
    loaded = load_chinese_model(settings)
    assert isinstance(loaded, TransformersModel) and loaded.adapter_version is None
    settings.model.languages = "en,zh"  # the main model writes Chinese itself: no second model
    assert load_chinese_model(settings) is None


def _write_items(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_eval_answers_command_on_a_small_file(shop, retriever, tmp_path):
    data = _write_items(tmp_path / "qa.jsonl", [
        json.dumps({"id": "delivered", "turns": [QUESTION], "facts": [["$8", "8.00"]]}),
        json.dumps({"id": "overnight-gold", "turns": ["I'm a gold member. Do I pay for overnight shipping?"],
                    "facts": [["free"]]}),
    ])
    out = tmp_path / "answers.json"
    cmd = [sys.executable, "-m", "chatapp.cli", "--data-dir", str(shop.data_dir), "--knowledge-dir",
           str(shop.retrieval.knowledge_dir), "eval", "answers", "--data", str(data), "--extractive", "1",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "accuracy 1.000" in done.stdout and "unsupported claims 0.000" in done.stdout
    result = json.loads(out.read_text())
    assert result["summary"]["n"] == 2 and {a["id"] for a in result["answers"]} == {"delivered", "overnight-gold"}
    assert all(a["correct"] and a["sources"] for a in result["answers"])

    bad = _write_items(tmp_path / "bad.jsonl", [json.dumps({"id": "x", "turns": [QUESTION], "facts": [["$8"]]}),
                                                '{"id": "y", "turns": []}'])
    done = subprocess.run(cmd[:-6] + ["--data", str(bad), "--extractive", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "bad.jsonl:2" in done.stdout


def test_eval_answers_scores_the_model_pipeline(shop, retriever, tmp_path):
    from chatapp.answer_eval import evaluate_items

    bot = make_bot(shop, retriever, "We refund part of it: standard shipping is $8.00.", tmp_path)
    items = [{"id": "a", "turns": [QUESTION], "facts": [["$8"]]},
             {"id": "b", "turns": ["Hi, I'm a gold member.", "What does overnight shipping cost me?"],
              "facts": [["free"]]}]
    summary, outcomes = evaluate_items(bot, items, temperature=0.0)
    assert [o.correct for o in outcomes] == [True, False]
    assert summary["accuracy"] == 0.5 and summary["unsupported_claim_rate"] == 0.0
    assert summary["by_language"] == {"en": {"n": 2, "accuracy": 0.5}}
    assert summary["first_token_s"]["p50"] is not None


@pytest.mark.slow
def test_fresh_install_answers_with_the_shipped_adapter(tmp_path, smollm2_dir):
    from chatapp.adapters import SHIPPED_DIR, AdapterRegistry
    from chatapp.model import base_model_hash

    if not (SHIPPED_DIR / "adapter_model.safetensors").is_file():
        pytest.fail("chatapp/shipped_adapter is missing: build it with `python -m chatapp.tuning.shipped`")
    settings = Settings(data_dir=tmp_path / "data")
    registry = AdapterRegistry(settings)
    info = registry.install_shipped(base_model_hash(smollm2_dir))
    assert info is not None and registry.active().version == info.version == "v0001"
    assert info.metadata["shipped"] and info.metadata["data"]["hash"]
    registry.rollback(reason="test")  # back to the base model: a later start must not re-install it
    assert AdapterRegistry(settings).install_shipped(base_model_hash(smollm2_dir)) is None
    assert registry.active() is None
    other = Settings(data_dir=tmp_path / "other")
    assert AdapterRegistry(other).install_shipped("0" * 64) is None  # other base weights: never


def test_an_upgrade_that_ships_a_newer_adapter_replaces_the_old_shipped_one_only(tmp_path):
    """A team answering with the package's adapter gets the newer one the upgrade ships; a team whose own tuned
    adapter is active keeps it (the new one waits in the registry); each shipped adapter is registered once."""
    import shutil

    from chatapp.adapters import SHIPPED_DIR, AdapterRegistry

    base = json.loads((SHIPPED_DIR / "metadata.json").read_text())["base_model"]["sha256"]
    old = tmp_path / "old_shipped"
    shutil.copytree(SHIPPED_DIR, old)
    with open(old / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0")  # other weights: the adapter an older release shipped
    on_default = AdapterRegistry(Settings(data_dir=tmp_path / "default"))
    assert on_default.install_shipped(base, source=old).version == "v0001"
    assert on_default.install_shipped(base).version == "v0002" and on_default.active().version == "v0002"
    assert "replaces v0001" in on_default.history()[-1]["reason"]
    assert on_default.install_shipped(base) is None and on_default.install_shipped(base, source=old) is None

    own = AdapterRegistry(Settings(data_dir=tmp_path / "own"))
    own.install_shipped(base, source=old)
    tuned = own.add(old, {"note": "tuned by the team"})
    own.promote(tuned.version, reason="passed the gate")
    assert own.install_shipped(base).version == "v0003" and own.active().version == tuned.version


@pytest.mark.slow
def test_real_default_model_answers_a_shop_question_with_its_key_fact(tmp_path):
    """The default install (SmolLM2 + the shipped adapter, the real knowledge base) end to end."""
    from chatapp.cli import settings_from_args, add_common_flags
    import argparse

    parser = argparse.ArgumentParser()
    add_common_flags(parser)
    settings = settings_from_args(parser.parse_args(["--data-dir", str(tmp_path / "data")]))
    bot = Bot.create(settings)
    assert bot.model.adapter_version == "v0001"  # the shipped adapter, registered on this fresh data dir
    replies = list(bot.answer("How much does it cost to upgrade to overnight shipping? I'm a bronze member.",
                              Session(), temperature=0.0))
    assert "$20" in replies[-1].text, replies[-1].text
    assert any(h.source == "shipping.md" for h in replies[-1].citations)
