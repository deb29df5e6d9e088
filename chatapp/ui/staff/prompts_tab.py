"""The Prompts tab: list, view, edit, validate, preview, save as a version, history/diff/revert, activate, and the
example banks.

Wiring only: every rule lives in `chatapp.prompts.PromptManager` (`bot.prompts`). Per-browser state is one gr.State
holding which template this editor loaded and from which version, so a stale save is reported as a conflict instead
of silently overwriting another admin's work. With auth on, only admins may change anything; everyone may validate
and preview.
"""
from __future__ import annotations

import html

import gradio as gr

from chatapp.prompts import MODES, PromptError, VersionConflict

READ_ONLY = "🔒 Only administrators can change prompts. Nothing was saved; validate and preview still work."


def _escape(text: str) -> str:
    return html.escape(str(text), quote=False)


def format_problems(problems) -> str:
    if not problems:
        return "✅ No problems found."
    lines = []
    for p in problems:
        icon = "❌" if p.severity == "error" else "⚠️"
        lines.append(f"- {icon} **line {p.line}, column {p.column}**: {_escape(p.message)}")
    return "\n".join(lines)


def format_messages(messages: list[dict]) -> str:
    """Messages as they go to the model, escaped so template text can't inject HTML into the page."""
    return "\n\n".join(
        f"**{m['role']}**\n<pre style='white-space:pre-wrap'>{_escape(m['content'])}</pre>" for m in messages
    )


def build(bot) -> None:
    """Lay out the tab inside the caller's `gr.Tab`."""
    prompts = bot.prompts
    if prompts is None:
        gr.Markdown("⚠️ Prompt templates are unavailable: " + _escape(getattr(bot, "problems", {}).get("prompts", "")))
        return

    def initial() -> tuple[str, str, int]:
        name = prompts.active_name
        try:
            return name, prompts.text(name), prompts.latest_version(name)
        except PromptError:
            return name, "", 0

    first_name, first_text, first_version = initial()
    loaded = gr.State({"name": first_name, "base": first_version})
    bank_loaded = gr.State({"bank": None, "revision": None})

    status = gr.Markdown(f"Active template: **{_escape(first_name)}**", elem_id="prompts-status")
    with gr.Row():
        template = gr.Dropdown(prompts.names(), value=first_name, label="Template", elem_id="prompts-template",
                               scale=3)
        save_as = gr.Textbox(first_name, label="Save under name", elem_id="prompts-save-as", scale=2)
        reload_btn = gr.Button("↻ Reload", size="sm", elem_id="prompts-reload", scale=1)
    with gr.Row():
        with gr.Column(scale=3):
            editor = gr.Code(first_text, language="yaml", label="Template (YAML)", lines=24, interactive=True,
                             elem_id="prompts-editor")
            message = gr.Textbox(label="Version message (optional)", placeholder="What changed and why",
                                 elem_id="prompts-message")
            with gr.Row():
                validate_btn = gr.Button("Validate", elem_id="prompts-validate")
                save_btn = gr.Button("Save as new version", variant="primary", elem_id="prompts-save")
                activate_btn = gr.Button("Activate", elem_id="prompts-activate")
            problems = gr.Markdown("", elem_id="prompts-problems")
        with gr.Column(scale=2):
            question = gr.Textbox("How long do I have to return an item?", label="Sample question",
                                  elem_id="prompts-question")
            mode = gr.Radio(list(MODES), value="auto", label="Mode", elem_id="prompts-mode")
            preview_btn = gr.Button("Preview", elem_id="prompts-preview-btn")
            preview = gr.Markdown("", elem_id="prompts-preview")
    with gr.Accordion("Version history", open=False, elem_id="prompts-history-box"):
        history = gr.Dataframe(headers=["version", "time", "message"], interactive=False, elem_id="prompts-history")
        with gr.Row():
            diff_a = gr.Number(1, label="From version", precision=0, elem_id="prompts-diff-a")
            diff_b = gr.Number(first_version, label="To version", precision=0, elem_id="prompts-diff-b")
            diff_btn = gr.Button("Diff", elem_id="prompts-diff-btn")
            revert_btn = gr.Button("Revert to 'From version'", elem_id="prompts-revert")
        diff = gr.Code("", label="Diff", lines=12, interactive=False, elem_id="prompts-diff")
    with gr.Accordion("Example bank", open=False, elem_id="prompts-bank-box"):
        with gr.Row():
            bank = gr.Dropdown(prompts.bank_names(), label="Bank", elem_id="prompts-bank", scale=3)
            bank_save = gr.Button("Save bank", elem_id="prompts-bank-save", scale=1)
        bank_text = gr.Code("", label="Examples (one JSON object per line)", lines=12, interactive=True,
                            elem_id="prompts-bank-text")
        with gr.Row():
            new_question = gr.Textbox(label="Question", elem_id="prompts-ex-question")
            new_context = gr.Textbox(label="Context (optional)", elem_id="prompts-ex-context")
            new_answer = gr.Textbox(label="Answer", elem_id="prompts-ex-answer")
        add_btn = gr.Button("Add example", elem_id="prompts-ex-add")
        bank_status = gr.Markdown("", elem_id="prompts-bank-status")

    # ---- handlers (each one call into bot.prompts, plus formatting)

    def history_rows(name: str) -> list[list]:
        try:
            return [[h["version"], h["time"], h["message"]] for h in reversed(prompts.history(name))]
        except PromptError:
            return []

    def open_template(name: str):
        """Load the latest version into the editor; remember it as this session's base."""
        try:
            text, version = prompts.text(name), prompts.latest_version(name)
            few_shot = prompts.load(name).few_shot
        except PromptError as exc:
            return (gr.skip(),) * 3 + (f"❌ {_escape(exc)}",) + (gr.skip(),) * 7
        note = f"Editing **{_escape(name)}** version {version}. Active template: **{_escape(prompts.active_name)}**"
        bank_name = few_shot.bank if few_shot else None
        return (text, {"name": name, "base": version}, name, note, history_rows(name), version, "",
                gr.update(value=bank_name, choices=prompts.bank_names()), *on_bank(bank_name))

    def refresh(name: str | None):
        name = name if name in prompts.names() else prompts.active_name
        return (gr.update(choices=prompts.names(), value=name), *open_template(name))

    def on_validate(text: str, state: dict, save_name: str):
        return format_problems(prompts.validate(text or "", (save_name or "").strip() or state["name"]))

    def on_preview(text: str, state: dict, sample: str, mode_: str):
        sample = (sample or "").strip() or "Hello"
        hits, note = [], ""
        if getattr(bot, "retriever", None) is None:
            note = " · no knowledge index loaded, so no context"
        else:
            try:
                hits = bot.retriever.search(sample, []).hits
            except Exception as exc:  # a broken index must not break the editor
                note = f" · knowledge search failed: {_escape(exc)}"
        try:
            rendered = prompts.preview(text or "", question=sample, history=[], hits=hits, mode=mode_,
                                       name=state["name"])
        except PromptError as exc:
            return "❌ Fix these first:\n\n" + format_problems(exc.problems or []) if exc.problems else f"❌ {_escape(exc)}"
        try:
            tokens = f"{bot.model.count_tokens(rendered.messages)} tokens"
        except Exception:
            tokens = f"≈{sum(len(m['content']) for m in rendered.messages) // 4} tokens"
        head = (f"*{_escape(rendered.template)} (editor text) · {rendered.mode} · {len(rendered.examples)} example(s)"
                f" · {len(hits)} retrieved passage(s) · {tokens}{note}*")
        return head + "\n\n" + format_messages(rendered.messages)

    def on_save(text: str, state: dict, save_name: str, msg: str, request: gr.Request):
        if not bot.is_admin(request):
            return gr.skip(), gr.skip(), READ_ONLY, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        name = (save_name or "").strip() or state["name"]
        if name != state["name"] and name in prompts.names():
            return (gr.skip(), gr.skip(), f"⚠️ A template named **{_escape(name)}** already exists. Open it to edit "
                    "it, or choose a new name.", gr.skip(), gr.skip(), gr.skip(), gr.skip())
        base = state["base"] if name == state["name"] else 0  # 0: must still be new when saved
        try:
            version = prompts.save(name, text or "", msg or "", base_version=base,
                                   author=getattr(request, "username", None))
        except VersionConflict as exc:
            return gr.skip(), gr.skip(), f"⚠️ {_escape(exc)}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        except PromptError as exc:
            body = format_problems(exc.problems) if exc.problems else _escape(exc)
            return gr.skip(), gr.skip(), f"❌ Not saved.\n\n{body}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        note = (f"✅ Saved **{_escape(name)}** version {version}; new answers use it"
                f"{'' if name == prompts.active_name else ' once it is activated'}.")
        return ({"name": name, "base": version}, note, format_problems(prompts.validate(text, name)),
                history_rows(name), gr.update(choices=prompts.names(), value=name), version, "")

    def on_activate(state: dict, request: gr.Request):
        if not bot.is_admin(request):
            return READ_ONLY
        try:
            prompts.activate(state["name"], author=getattr(request, "username", None))
        except PromptError as exc:
            return f"❌ {_escape(exc)}"
        return f"✅ Active template: **{_escape(state['name'])}** (used from the next message on)"

    def on_diff(state: dict, a, b):
        try:
            return prompts.diff(state["name"], int(a or 0), int(b or 0)) or "(no differences)"
        except (PromptError, ValueError) as exc:
            return f"error: {exc}"

    def on_revert(state: dict, version, request: gr.Request):
        if not bot.is_admin(request):
            return gr.skip(), gr.skip(), READ_ONLY, gr.skip(), gr.skip()
        try:
            new = prompts.revert(state["name"], int(version or 0), author=getattr(request, "username", None))
        except (PromptError, ValueError) as exc:
            return gr.skip(), gr.skip(), f"❌ {_escape(exc)}", gr.skip(), gr.skip()
        return (prompts.text(state["name"]), {"name": state["name"], "base": new},
                f"✅ Version {int(version)} restored as version {new}.", history_rows(state["name"]), new)

    def on_bank(name: str | None):
        if not name:
            return "", {"bank": None, "revision": None}, ""
        try:
            text, revision = prompts.bank_text(name)
        except PromptError as exc:
            return gr.skip(), gr.skip(), f"❌ {_escape(exc)}"
        return text, {"bank": name, "revision": revision}, f"{len(prompts.examples(name))} example(s)"

    def on_bank_save(text: str, state: dict, request: gr.Request):
        if not bot.is_admin(request):
            return gr.skip(), READ_ONLY
        if not state.get("bank"):
            return gr.skip(), "Choose a bank first."
        try:
            revision = prompts.save_bank(state["bank"], text or "", state["revision"])
        except PromptError as exc:
            return gr.skip(), "❌ Not saved.\n\n" + (format_problems(exc.problems) if exc.problems else _escape(exc))
        return ({"bank": state["bank"], "revision": revision},
                f"✅ Saved: {len(prompts.examples(state['bank']))} example(s), used from the next message on.")

    def on_add(state: dict, q: str, ctx: str, a: str, request: gr.Request):
        if not bot.is_admin(request):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), READ_ONLY
        if not state.get("bank"):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), "Choose a bank first."
        try:
            example_id = prompts.add_example(q, a, context=ctx or "", source="admin", bank=state["bank"])
        except PromptError as exc:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"❌ {_escape(exc)}"
        text, revision = prompts.bank_text(state["bank"])
        return (text, {"bank": state["bank"], "revision": revision}, "", "", "",
                f"✅ Added `{_escape(example_id)}`; used from the next message on.")

    opened = [editor, loaded, save_as, status, history, diff_b, problems, bank, bank_text, bank_loaded, bank_status]
    template.input(open_template, [template], opened, api_name=False)
    reload_btn.click(refresh, [template], [template, *opened], api_name=False)
    validate_btn.click(on_validate, [editor, loaded, save_as], [problems], api_name=False)
    preview_btn.click(on_preview, [editor, loaded, question, mode], [preview], api_name=False)
    question.submit(on_preview, [editor, loaded, question, mode], [preview], api_name=False)
    save_btn.click(on_save, [editor, loaded, save_as, message],
                   [loaded, status, problems, history, template, diff_b, message], api_name=False)
    activate_btn.click(on_activate, [loaded], [status], api_name=False)
    diff_btn.click(on_diff, [loaded, diff_a, diff_b], [diff], api_name=False)
    revert_btn.click(on_revert, [loaded, diff_a], [editor, loaded, status, history, diff_b], api_name=False)
    bank.input(on_bank, [bank], [bank_text, bank_loaded, bank_status], api_name=False)
    bank_save.click(on_bank_save, [bank_text, bank_loaded], [bank_loaded, bank_status], api_name=False)
    add_btn.click(on_add, [bank_loaded, new_question, new_context, new_answer],
                  [bank_text, bank_loaded, new_question, new_context, new_answer, bank_status], api_name=False)

    # Each page load starts from the latest saved state, not from when the app started. (Not on every tab visit:
    # that would throw away unsaved edits when an admin checks the chat and comes back.)
    root = gr.context.Context.root_block
    if root is not None:
        root.load(refresh, [template], [template, *opened], api_name=False)

