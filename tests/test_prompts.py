"""Prompt templates: rendering, example selection, validation with positions, versions, sandboxing, names.

Real parts throughout: the shipped templates and example banks, langchain-core, and the MiniLM sentence-transformers
model from its package. Every test writes only under tmp_path.
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from langchain_core.prompts import ChatPromptTemplate

from chatapp.config import REPO_ROOT, Settings
from chatapp.embeddings import load_embedder
from chatapp.prompts import (
    PromptError,
    PromptManager,
    VersionConflict,
    main as prompts_cli,
    parse_template,
)

SHIPPED = ["support", "support_few_shot", "support_zero_shot", "support_zh"]


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("minilm")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var")


@pytest.fixture
def prompts(settings, embedder) -> PromptManager:
    return PromptManager(settings, embedder)


def hit(text: str, title: str = "Returns", **extra) -> SimpleNamespace:
    """Shaped like chatapp.retrieval.Hit (the renderer duck-types hits)."""
    fields = dict(chunk_id="c1", source="kb.md", title=title, text=text, score=0.8, kind="chunk", answer="",
                  entity="")
    return SimpleNamespace(**{**fields, **extra})


def template_text(user: str = "Info: {context}\nQ: {question}", **extra) -> str:
    data = {"description": "test", "mode": "zero_shot", "system": "You are {bot_name} of {company}.", "user": user,
            **extra}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------------------------------
# shipped data


def test_shipped_templates_and_banks_are_valid(prompts):
    assert set(SHIPPED) <= set(prompts.names())
    for name in SHIPPED:
        errors = [p for p in prompts.validate(prompts.text(name), name) if p.severity == "error"]
        assert errors == [], (name, errors)
    assert prompts.active_name == "support"
    for bank in ("support", "support_zh"):
        examples = prompts.examples(bank)
        assert len(examples) >= 4 and all(e["question"] and e["answer"] for e in examples)
    notice = (REPO_ROOT / "prompts" / "NOTICE").read_text()
    assert "MIT" in notice and "CDLA-Sharing-1.0" in notice


def test_bank_holds_no_benchmark_dialogues(prompts):
    """bench/prompts.py evaluates on dev lines >= DSTC11_BANK_ROWS; none of them may be an example."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_examples", REPO_ROOT / "prompts" / "build_examples.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    dev = REPO_ROOT.parent / "shared" / "data" / "dstc11_track5" / "val_faq_turns_dev.jsonl"
    rows = [json.loads(line) for line in dev.read_text().splitlines()]
    bench_ids = {f"dstc11-{r['val_index']}" for r in rows[builder.DSTC11_BANK_ROWS:]}
    bank_ids = {e["id"] for e in prompts.examples("support")}
    assert any(i.startswith("dstc11-") for i in bank_ids) and any(i.startswith("abcd-") for i in bank_ids)
    assert not bank_ids & bench_ids


# --------------------------------------------------------------------------------------------------------------------
# rendering


def test_render_zero_shot_messages(prompts):
    history = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    hits = [hit("Bronze members can return items within 90 days.", title="Return policy")]
    out = prompts.render("support_zero_shot", question="Can I return my jeans?", history=history, hits=hits)
    assert (out.template, out.version, out.mode, out.examples) == ("support_zero_shot", 1, "zero_shot", [])
    roles = [m["role"] for m in out.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert "Ava" in out.messages[0]["content"] and "Acme Outfitters" in out.messages[0]["content"]
    assert out.messages[1:3] == history
    last = out.messages[-1]["content"]
    assert "- Return policy: Bronze members can return items within 90 days." in last
    assert last.endswith("Customer: Can I return my jeans?")
    assert out.generation == {"temperature": 0.0, "max_new_tokens": 160}
    empty = prompts.render("support_zero_shot", question="hello", history=[], hits=[])
    assert "(no matching information found)" in empty.messages[-1]["content"]


def test_context_from_real_retrieval_hits(prompts, settings, embedder, tmp_path):
    """Hits from chatapp.retrieval (an article and FAQ entries) become short, readable context items."""
    from chatapp.retrieval import Retriever

    knowledge = tmp_path / "knowledge"
    knowledge.mkdir()
    (knowledge / "returns.md").write_text("# Returns\n\nGold members can return items at any time. "
                                          "Other members have 90 days.\n")
    (knowledge / "faq.jsonl").write_text(json.dumps({"id": "f1", "entity": "ALLENBELL", "question": "Is there wifi?",
                                                     "answer": "Free WiFi is available at Allenbell."}) + "\n")
    settings.retrieval.knowledge_dir = knowledge
    retriever = Retriever.open(settings, embedder)
    hits = retriever.search("Does the Allenbell have wifi?", []).hits + retriever.search("How long for returns?").hits
    context = prompts.render("support", question="q", history=[], hits=hits, mode="zero_shot").messages[-1]["content"]
    assert "- Allenbell: Is there wifi? Free WiFi is available at Allenbell." in context
    assert "Gold members can return items at any time." in context
    assert context.count("Is there wifi?") == 1


def test_rendered_prompts_stay_small(prompts):
    """The default model has a small context: long hits, history and examples are cut to the template's budget
    (~4 characters a token; 4,000 characters ~ 1,000 tokens)."""
    long_hits = [hit("policy " * 800, title=f"Doc {i}", answer="answer " * 300, chunk_id=f"c{i}") for i in range(6)]
    long_history = [{"role": r, "content": "blah " * 500} for r in ("user", "assistant") * 6]
    question = "Does the hotel have free wifi and parking " * 5
    for name in SHIPPED:
        for mode in ("zero_shot", "few_shot"):
            out = prompts.render(name, question=question, history=long_history, hits=long_hits, mode=mode)
            total = sum(len(m["content"]) for m in out.messages)
            assert total < 4000, (name, mode, total)
            assert "…" in out.messages[-1]["content"]  # the cut is visible, at a word boundary
            assert not re.search(r"\bpolic…", out.messages[-1]["content"])


def test_history_inline_variable_replaces_history_messages(prompts, settings):
    text = template_text(user="Conversation:\n{history}\nInfo: {context}\nQ: {question}")
    prompts.save("inline", text)
    history = [{"role": "user", "content": "my order is late"}, {"role": "assistant", "content": "Sorry to hear."}]
    out = prompts.render("inline", question="where is it?", history=history, hits=[])
    assert [m["role"] for m in out.messages] == ["system", "user"]
    assert "Customer: my order is late\nAgent: Sorry to hear." in out.messages[1]["content"]


def test_training_example_uses_the_inference_renderer(prompts):
    hits = [hit("Promo codes expire after 7 days.", title="Promotions")]
    args = dict(question="When does my promo code expire?", history=[{"role": "user", "content": "hi"}], hits=hits)
    rendered = prompts.render("support", mode="zero_shot", **args)
    example = prompts.training_example("support", answer="After 7 days.", **args)
    assert example == {"messages": rendered.messages + [{"role": "assistant", "content": "After 7 days."}]}
    few = prompts.training_example("support", answer="After 7 days.", mode="few_shot", **args)
    assert few["messages"][:-1] == prompts.render("support", mode="few_shot", **args).messages


# --------------------------------------------------------------------------------------------------------------------
# example selection


def test_similarity_selection_picks_relevant_examples(prompts):
    wifi = prompts.render("support", question="Is there free wifi at the hotel?", history=[], hits=[], mode="few_shot")
    assert wifi.mode == "few_shot" and len(wifi.examples) == 2
    assert all("wifi" in e["question"].lower() or "internet" in e["question"].lower() for e in wifi.examples)
    promo = prompts.render("support", question="When do promo codes expire?", history=[], hits=[], mode="few_shot")
    assert promo.examples[0]["id"] == "abcd-3695-2"
    # the examples are rendered as user/assistant pairs before the real question
    assert [m["role"] for m in promo.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert promo.messages[2]["content"] == promo.examples[0]["answer"]
    assert "Customer: I've got a promo code and I want to know when they expire." in promo.messages[1]["content"]


def test_auto_mode_uses_examples_only_when_relevant(prompts):
    assert prompts.render(None, question="Does the guesthouse have wifi?", history=[], hits=[]).mode == "zero_shot"
    auto = prompts.text("support").replace("mode: zero_shot", "mode: auto")  # the default is zero-shot, as trained
    relevant = prompts.preview(auto, question="Does the guesthouse have wifi?", history=[], hits=[], name="support")
    assert relevant.template == "support" and relevant.mode == "few_shot"
    unrelated = prompts.preview(auto, question="Explain quantum chromodynamics to me", history=[], hits=[])
    assert unrelated.mode == "zero_shot" and unrelated.examples == []
    # forcing few-shot on a template without a bank falls back, and says so
    forced = prompts.render("support_zero_shot", question="wifi?", history=[], hits=[], mode="few_shot")
    assert forced.mode == "zero_shot"
    with pytest.raises(PromptError, match="unknown prompt mode"):
        prompts.render("support", question="x", history=[], hits=[], mode="three_shot")


def _bank_template(name: str, selection: str, k: int = 2, bank: str = "tiny") -> str:
    return template_text(mode="few_shot", few_shot={"bank": bank, "k": k, "selection": selection, "fetch_k": 3})


def test_fixed_similarity_and_mmr_selection(prompts):
    bank = [
        {"id": "ship1", "question": "How long does shipping take?", "answer": "3-5 days."},
        {"id": "ship2", "question": "How many days does shipping take?", "answer": "Three to five days."},
        {"id": "refund", "question": "How long until my refund arrives?", "answer": "Within a week."},
        {"id": "hat", "question": "Do you sell hats for cats?", "answer": "We do not."},
    ]
    prompts.save_bank("tiny", "".join(json.dumps(e) + "\n" for e in bank))
    for name, selection in (("fixed_t", "fixed"), ("sim_t", "similarity"), ("mmr_t", "mmr")):
        prompts.save(name, _bank_template(name, selection))
    question = "How long does delivery take?"
    pick = {n: [e["id"] for e in prompts.render(n, question=question, history=[], hits=[]).examples]
            for n in ("fixed_t", "sim_t", "mmr_t")}
    assert pick["fixed_t"] == ["ship1", "ship2"]  # the bank's first k, whatever the question
    assert pick["sim_t"] == ["ship1", "ship2"]  # the two nearest are near-duplicates of each other...
    assert pick["mmr_t"][0] == "ship1" and pick["mmr_t"][1] == "refund"  # ...MMR trades the duplicate for variety
    hats = prompts.render("sim_t", question="cat hats?", history=[], hits=[]).examples
    assert hats[0]["id"] == "hat"


def test_added_example_is_used_at_once_and_found_as_curated(prompts, settings, embedder):
    shipped_bank = (REPO_ROOT / "prompts" / "examples" / "support.jsonl").read_text()
    question = "Can I pay for my order with cryptocurrency?"
    before = prompts.render("support", question=question, history=[], hits=[], mode="few_shot")
    new_id = prompts.add_example(question, "No, we accept credit cards, PayPal and gift cards.",
                                 context="Payment methods: credit card, PayPal, gift card.", source="feedback")
    after = prompts.render("support", question=question, history=[], hits=[], mode="few_shot")
    assert new_id not in [e["id"] for e in before.examples]
    assert after.examples[0]["id"] == new_id
    assert "No, we accept credit cards" in after.messages[2]["content"]
    # persisted in the app's database (the shipped file is untouched) and seen by a fresh manager
    assert (REPO_ROOT / "prompts" / "examples" / "support.jsonl").read_text() == shipped_bank
    with sqlite3.connect(settings.feedback_db) as conn:
        assert new_id in conn.execute("SELECT text FROM example_banks WHERE bank = 'support'").fetchone()[0]
    conn.close()
    fresh = PromptManager(settings, embedder)
    found = fresh.find_curated("can i pay for my order with crypto currency?")
    assert found is not None and found["id"] == new_id and found["score"] >= 0.92
    assert fresh.find_curated("Can I return shoes I already wore?") is None
    assert fresh.find_curated("Does the hotel have wifi?") is None  # shipped examples are not curated answers
    with pytest.raises(PromptError):
        prompts.add_example("  ", "answer")


def test_bank_editing_reports_bad_lines_and_stale_edits(prompts):
    text, revision = prompts.bank_text("support_zh")
    bad = text + '{"question": "hi"}\nnot json\n'
    with pytest.raises(PromptError) as err:
        prompts.save_bank("support_zh", bad, revision)
    lines = {p.line for p in err.value.problems}
    assert lines == {text.count("\n") + 1, text.count("\n") + 2}
    new_revision = prompts.save_bank("support_zh", text + '{"question": "你好", "answer": "您好！"}\n', revision)
    assert new_revision != revision and prompts.examples("support_zh")[-1]["answer"] == "您好！"
    with pytest.raises(PromptError, match="changed while you were editing"):
        prompts.save_bank("support_zh", text, revision)  # based on the old revision


# --------------------------------------------------------------------------------------------------------------------
# validation


def _problems(prompts, text):
    return [(p.line, p.column, p.severity, p.message) for p in prompts.validate(text)]


def test_validation_points_at_unknown_and_missing_variables(prompts):
    text = (
        "name: demo\n"
        "mode: zero_shot\n"
        "system: |\n"
        "  You are {bot_name}.\n"
        "  Reply in {tone} style.\n"
        "user: 'Facts: {contxt} and more'\n"
    )
    problems = _problems(prompts, text)
    assert problems[0][:3] == (5, 12, "error") and "unknown variable {tone}" in problems[0][3]
    assert any(p[:3] == (6, 15, "error") and "unknown variable {contxt}" in p[3] for p in problems)
    assert any("missing variable {question}" in p[3] and p[0] == 6 for p in problems)
    assert any("missing variable {context}" in p[3] and p[2] == "warning" for p in problems)
    # declaring the variable makes it known
    fixed = text.replace("user: 'Facts: {contxt} and more'", "user: '{context} {question}'") + "variables:\n  tone: calm\n"
    assert _problems(prompts, fixed) == []


def test_answer_start_is_checked_and_begins_training_answers(prompts):
    text = "name: demo\nmode: zero_shot\nsystem: Be kind.\nuser: '{context} {question}'\nanswer_start: 'Per {company},'\n"
    problems = _problems(prompts, text)
    assert len(problems) == 1 and problems[0][0] == 5 and "{company}" in problems[0][3]
    assert any("at most 200" in p[3] for p in _problems(prompts, text.replace("Per {company},", "x" * 201)))
    prompts.save("demo", text.replace("Per {company},", "根据我们的政策，"), "test")
    args = dict(question="优惠码多久过期？", history=[], hits=[hit("Promo codes expire after 7 days.")])
    assert prompts.render("demo", **args).answer_start == "根据我们的政策，"
    example = prompts.training_example("demo", answer="优惠码7天后过期。", **args)
    assert example["messages"][-1]["content"] == "根据我们的政策，优惠码7天后过期。"
    again = prompts.training_example("demo", answer="根据我们的政策，七天。", **args)  # already starts with it
    assert again["messages"][-1]["content"] == "根据我们的政策，七天。"


def test_validation_reports_syntax_errors_with_positions(prompts):
    assert _problems(prompts, "system: [unclosed\nuser: x\n")[0][:2] == (2, 5)
    assert "YAML syntax error" in _problems(prompts, "system: a\n  bad: indent\nuser: b\n")[0][3]
    brace = _problems(prompts, "system: ok\nuser: |\n  Q: {question}\n  oops {context\n")
    assert [p[:2] for p in brace if "unclosed '{'" in p[3]] == [(4, 8)]
    single = _problems(prompts, "system: 'a } b'\nuser: '{context}{question}'\n")
    assert single[0][:2] == (1, 12) and "single '}'" in single[0][3]
    fields = _problems(prompts, "sytem: x\nsystem: s\nuser: '{context}{question}'\nmode: sometimes\n"
                                "generation:\n  temperature: 9\n  seed: 1\nfew_shot:\n  bank: ../../etc/passwd\n")
    messages = "\n".join(p[3] for p in fields)
    assert "unknown field 'sytem'" in messages and "`mode` must be one of" in messages
    assert "temperature` must be between" in messages and "unknown generation setting 'seed'" in messages
    assert "must name an example bank" in messages
    assert _problems(prompts, "system: s\nuser: '{context}{question}'\nfew_shot:\n  bank: nosuchbank\n")[0][3] \
        .startswith("unknown example bank")
    assert "is a YAML mapping" in _problems(prompts, "- a list\n")[0][3]


# --------------------------------------------------------------------------------------------------------------------
# sandboxing: templates are data


@pytest.mark.parametrize("placeholder", ["{question.__class__}", "{question.__class__.__mro__}", "{question[0]}",
                                         "{question!r}", "{question:>999999999}", "{}", "{0}", "{bot_name.upper}"])
def test_templates_cannot_reach_objects(prompts, placeholder):
    text = template_text(user=f"{{context}} {{question}} {placeholder}")
    problems = [p for p in prompts.validate(text) if p.severity == "error"]
    assert problems and ("not allowed" in problems[0].message or "empty placeholder" in problems[0].message)
    assert problems[0].line == 4  # the `user:` line of template_text's YAML
    with pytest.raises(PromptError):
        prompts.save("evil", text)
    with pytest.raises(PromptError):
        prompts.preview(text, question="q", history=[], hits=[])
    assert "evil" not in prompts.names()


def test_library_formatting_refuses_attribute_access_too():
    """The second line of defence: langchain-core's f-string templates reject attribute and index access."""
    for bad in ("{question.__class__}", "{question[0]}"):
        with pytest.raises(ValueError):
            ChatPromptTemplate.from_messages([("human", bad)], template_format="f-string")


def test_values_are_never_reinterpreted(prompts):
    sneaky = "{question.__class__} {{system}} {bot_name}"
    out = prompts.render("support_zero_shot", question=sneaky, history=[{"role": "user", "content": "{date}"}],
                         hits=[hit("{__import__}", title="{title}")], variables={"company": "{question}"})
    assert out.messages[-1]["content"].endswith(f"Customer: {sneaky}")
    assert out.messages[1]["content"] == "{date}"
    assert "- {title}: {__import__}" in out.messages[-1]["content"]
    assert "for {question}" in out.messages[0]["content"]


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "x.yaml", "", "a" * 65, "name with space",
                                  "/etc/passwd", "ok\n"])
def test_names_cannot_escape_the_prompts_folder(prompts, settings, name):
    before = sorted(p for p in settings.data_dir.rglob("*")) if settings.data_dir.exists() else []
    for call in (lambda: prompts.save(name, template_text()), lambda: prompts.text(name),
                 lambda: prompts.activate(name), lambda: prompts.render(name, question="q", history=[], hits=[]),
                 lambda: prompts.save_bank(name, '{"question": "q", "answer": "a"}\n')):
        with pytest.raises(PromptError, match="invalid (template|bank) name"):
            call()
    after = sorted(p for p in settings.data_dir.rglob("*")) if settings.data_dir.exists() else []
    assert before == after


# --------------------------------------------------------------------------------------------------------------------
# versions


def test_save_history_diff_revert_activate(prompts, settings, embedder):
    shipped = prompts.text("support")
    assert [h["version"] for h in prompts.history("support")] == [1]
    edited = shipped.replace("Never invent prices, dates, discounts or policies.", "Never invent anything.")
    assert prompts.save("support", edited, "shorter answers", base_version=1) == 2
    assert prompts.save("support", edited, "no change") == 2  # identical text: no new version
    history = prompts.history("support")
    assert [(h["version"], h["message"]) for h in history] == [(1, "shipped default"), (2, "shorter answers")]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", history[1]["time"])
    diff = prompts.diff("support", 1, 2)
    assert "-  customer with a person. Never invent prices, dates, discounts or policies." in diff
    assert "+  customer with a person. Never invent anything." in diff
    # applies to the next render, same manager, no restart
    out = prompts.render(None, question="hi", history=[], hits=[])
    assert out.version == 2 and "Never invent anything." in out.messages[0]["content"]
    assert prompts.revert("support", 1) == 3 and prompts.text("support") == shipped
    assert prompts.history("support")[-1]["message"] == "revert to version 1"
    # the shipped file is never written; versions live in the app's database (no files)
    assert (REPO_ROOT / "prompts" / "support.yaml").read_text() == shipped
    with sqlite3.connect(settings.feedback_db) as conn:
        assert conn.execute("SELECT text, message FROM prompt_versions WHERE name = 'support' AND version = 2"
                            ).fetchone() == (edited, "shorter answers")
    conn.close()
    assert not settings.prompt_versions_dir.exists()
    # activation persists and is seen by other managers (other sessions, the CLI)
    prompts.activate("support_zero_shot")
    other = PromptManager(settings, embedder)
    assert other.active_name == "support_zero_shot"
    assert other.render(None, question="hi", history=[], hits=[]).template == "support_zero_shot"
    with pytest.raises(PromptError, match="no template named"):
        prompts.activate("nope")


def test_version_conflict_between_two_sessions(prompts, settings, embedder):
    alice, bob = prompts, PromptManager(settings, embedder)
    base = alice.latest_version("support_zh")
    text = alice.text("support_zh")
    assert alice.save("support_zh", text.replace("一到三句话", "一句话"), "alice", base_version=base) == 2
    with pytest.raises(VersionConflict) as err:
        bob.save("support_zh", text.replace("一到三句话", "两句话"), "bob", base_version=base)
    assert (err.value.base_version, err.value.latest) == (1, 2)
    assert "一句话" in bob.text("support_zh") and len(bob.history("support_zh")) == 2


def test_concurrent_saves_never_corrupt(prompts, settings, embedder):
    texts = [template_text(description=f"writer {i}", user=f"{{context}} {{question}} v{i}") for i in range(8)]
    barrier, results, errors = threading.Barrier(8), {}, []

    def writer(i: int, base: int | None) -> None:
        manager = PromptManager(settings, embedder)  # one per session, like the UI
        barrier.wait()
        try:
            results[i] = manager.save("race", texts[i], f"writer {i}", base_version=base)
        except VersionConflict:
            errors.append(i)

    threads = [threading.Thread(target=writer, args=(i, None)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results.values()) == list(range(1, 9)) and not errors
    for i, version in results.items():
        assert prompts.text("race", version) == texts[i]
        assert parse_template(prompts.text("race", version))[0] is not None
    # everyone editing from the same base: exactly one wins, the rest are told, nothing is lost or mixed
    # (new texts: re-saving the text version 8 already has would be a no-op, not an edit)
    texts[:] = [template_text(description=f"editor {i}", user=f"{{context}} {{question}} e{i}") for i in range(8)]
    results.clear()
    barrier = threading.Barrier(8)
    threads = [threading.Thread(target=writer, args=(i, 8)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert list(results.values()) == [9] and len(errors) == 7
    assert prompts.text("race") == texts[next(iter(results))]
    assert [h["version"] for h in prompts.history("race")] == list(range(1, 10))


# --------------------------------------------------------------------------------------------------------------------
# CLI


def test_cli(tmp_path, capsys):
    """Through the real entry point (chatapp.cli registers our subcommands)."""
    from chatapp.cli import main as cli

    base = ["--data-dir", str(tmp_path / "var"), "prompts"]
    good = tmp_path / "good.yaml"
    good.write_text(template_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(template_text(user="{question} {nope}"))
    assert cli([*base, "list"]) == 0
    assert "* support " in capsys.readouterr().out
    assert cli([*base, "validate", str(good)]) == 0
    assert cli([*base, "validate", str(bad)]) == 1
    assert f"{bad}:4:" in capsys.readouterr().out
    assert cli([*base, "save", "mine", str(good), "-m", "first"]) == 0
    assert cli([*base, "save", "mine", str(bad)]) == 2
    assert "unknown variable {nope}" in capsys.readouterr().err
    assert cli([*base, "render", "mine", "-q", "Where is my order?", "--no-retrieval"]) == 0
    assert "Q: Where is my order?" in capsys.readouterr().out
    assert cli([*base, "activate", "mine"]) == 0 and cli([*base, "history", "mine"]) == 0
    assert "first" in capsys.readouterr().out
    assert cli([*base, "show", "../../etc/passwd"]) == 2
    # the module's own entry point (python -m chatapp.prompts) takes the same subcommands
    config = tmp_path / "chatapp.toml"
    config.write_text(f'data_dir = "{tmp_path / "var"}"\n')
    assert prompts_cli(["--config", str(config), "list"]) == 0
    assert "* mine " in capsys.readouterr().out
