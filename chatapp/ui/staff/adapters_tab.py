"""The Adapters tab: the registry (versions, metrics, loss curves, gate reports), promote / roll back, tune now.

Wiring only: the rules live in `chatapp.adapters.AdapterRegistry` (`bot.adapters`) and `chatapp.tuning`. With auth
on, only admins may promote, roll back or start a tune; everyone may look. A promotion or rollback reaches the next
answer of every chat (the bot follows the registry before each answer); answers already streaming finish on the
adapter they started with.
"""
from __future__ import annotations

import html
import json

import gradio as gr

from chatapp.adapters import AdapterError, describe
from chatapp.tuning import TuningError, format_gate_report, launch_background_tune, tune_status

ADMINS_ONLY = "🔒 Only administrators can change the active adapter or start a tune. Nothing was changed."
COLUMNS = ["version", "active", "created", "examples", "steps", "best_val_loss", "rouge_l", "cosine", "gate", "base"]


def _escape(text: object) -> str:
    return html.escape(str(text), quote=False)


def build(bot) -> None:
    """Lay out the tab inside the caller's `gr.Tab`."""
    registry = bot.adapters
    if registry is None:
        problem = getattr(bot, "problems", {}).get("adapters", "")
        gr.Markdown("⚠️ The adapter registry is unavailable. " + _escape(problem))
        return

    def active_line() -> str:
        try:
            active = registry.active()
        except AdapterError as exc:
            return f"⚠️ {_escape(exc)}"
        answering = getattr(getattr(bot, "model", None), "adapter_version", None)
        line = f"Active adapter: **{_escape(active.version) if active else 'none (base model)'}**"
        if active and answering != active.version:
            line += f" · the model switches to it at its next answer (now: {_escape(answering or 'base')})"
        return line

    def rows() -> list[list]:
        active = registry.active()
        out = []
        for info in reversed(registry.list()):
            row = describe(info, active.version if active else None)
            out.append([("active" if row[k] else "") if k == "active" else _fmt(row[k]) for k in COLUMNS])
        return out

    def versions() -> list[str]:
        return [info.version for info in reversed(registry.list())]

    def show(version: str | None):
        """Loss curve, metrics and gate report of one version."""
        if not version:
            return None, {}, "_Select a version._"
        try:
            info = registry.get(version)
        except AdapterError as exc:
            return None, {}, f"⚠️ {_escape(exc)}"
        meta = info.metadata
        details = {k: meta.get(k) for k in ("created", "base_model", "template", "metrics", "data", "hyperparameters",
                                             "init_adapter")}
        report = info.gate_report()
        text = format_gate_report(report)
        samples = report.get("samples") or []
        if samples:
            text += "\n\n**Sample answers** (golden items)\n"
            for s in samples[:4]:
                text += f"\n- **Q:** {_escape(s.get('question'))}  \n  reference: {_escape(s.get('reference'))}"
                for name in ("base", "active", "candidate"):
                    if name in s:
                        text += f"  \n  {name}: {_escape(s[name])}"
        return (str(info.loss_curve) if info.loss_curve else None), json.loads(json.dumps(details, default=str)), text

    def refresh(selected: str | None):
        choices = versions()
        selected = selected if selected in choices else (choices[0] if choices else None)
        curve, details, report = show(selected)
        return (active_line(), rows(), gr.update(choices=choices, value=selected), curve, details, report,
                status_line())

    def status_line() -> str:
        status = tune_status(bot.settings)
        if status.get("running"):
            step = f" · step {status.get('step')}/{status.get('total_steps')}" if status.get("total_steps") else ""
            eta = f" · about {status['eta_seconds'] / 60:.0f} min left" if status.get("eta_seconds") else ""
            return f"⏳ Tuning: {_escape(status.get('phase'))}{step}{eta}"
        if status.get("phase") == "done":
            return f"Last tune: {_escape(status.get('result'))} {_escape(status.get('version') or '')}"
        if status.get("phase") in ("failed", "interrupted"):
            return f"Last tune {_escape(status.get('phase'))} {_escape(status.get('error', ''))}"
        return "No tuning run in progress."

    def sync() -> None:
        if hasattr(bot, "sync_adapter"):
            bot.sync_adapter()  # swap now rather than at the next answer, so the header is right at once

    def on_promote(version: str | None, request: gr.Request):
        if not bot.is_admin(request):
            return (ADMINS_ONLY, *refresh(version))
        if not version:
            return ("Select a version to promote.", *refresh(version))
        try:
            info = registry.get(version)
            registry.promote(version, user=getattr(request, "username", None), reason="admin tab")
        except AdapterError as exc:
            return (f"⚠️ {_escape(exc)}", *refresh(version))
        sync()
        warning = "" if info.gate.get("passed") else " ⚠️ Its evaluation gate had **not** passed."
        return (f"✅ {version} is now active; new answers use it.{warning}", *refresh(version))

    def on_rollback(version: str | None, request: gr.Request):
        if not bot.is_admin(request):
            return (ADMINS_ONLY, *refresh(version))
        try:
            info = registry.rollback(user=getattr(request, "username", None), reason="admin tab")
        except AdapterError as exc:
            return (f"⚠️ {_escape(exc)}", *refresh(version))
        sync()
        return (f"↩️ Rolled back: {info.version if info else 'the base model'} answers now.", *refresh(version))

    def on_tune(version: str | None, request: gr.Request):
        if not bot.is_admin(request):
            return (ADMINS_ONLY, *refresh(version))
        try:
            pid = launch_background_tune(bot.settings)
        except (TuningError, OSError) as exc:
            return (f"⚠️ {_escape(exc)}", *refresh(version))
        return (f"⏳ Tuning started in the background (process {pid}, low priority). It registers a candidate and "
                "promotes it only if it passes the gate.", *refresh(version))

    gr.Markdown("LoRA adapters trained from feedback. A candidate is promoted only when it is not worse than the "
                "active adapter and the base model on held-out conversations; roll back at any time.")
    active_md = gr.Markdown(active_line(), elem_id="adapters-active")
    table = gr.Dataframe(value=rows(), headers=COLUMNS, interactive=False, wrap=True, label="Versions")
    with gr.Row():
        choices = versions()
        version = gr.Dropdown(choices=choices, value=choices[0] if choices else None, label="Version",
                              allow_custom_value=False)
        promote_btn = gr.Button("Promote", variant="primary")
        rollback_btn = gr.Button("Roll back")
        tune_btn = gr.Button("Tune now")
        refresh_btn = gr.Button("Refresh")
    message = gr.Markdown(elem_id="adapters-message")
    tuning_md = gr.Markdown(status_line())
    first_curve, first_details, first_gate = show(choices[0] if choices else None)
    with gr.Row():
        curve = gr.Image(value=first_curve, label="Loss curve", type="filepath", interactive=False)
        details = gr.JSON(value=first_details, label="Metrics, data and hyperparameters")
    gate = gr.Markdown(first_gate, elem_id="adapters-gate")

    outputs = [active_md, table, version, curve, details, gate, tuning_md]
    version.input(show, [version], [curve, details, gate], api_name=False)
    refresh_btn.click(refresh, [version], outputs, api_name=False)
    promote_btn.click(on_promote, [version], [message, *outputs], api_name="adapters_promote")
    rollback_btn.click(on_rollback, [version], [message, *outputs], api_name="adapters_rollback")
    tune_btn.click(on_tune, [version], [message, *outputs], api_name=False)
    gr.Timer(10).tick(lambda: status_line(), None, [tuning_md], api_name=False)


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
