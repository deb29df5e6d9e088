"""The Gradio app: one tab per file, each wired to the bot; nothing here decides anything."""
from __future__ import annotations

import importlib
import logging

import gradio as gr

from chatapp.bot import Bot

log = logging.getLogger(__name__)

# (tab title, module under chatapp.ui); a tab whose module fails to import shows why instead of taking the app down.
TABS = [
    ("Chat", "chat"),
    ("Prompts", "prompts_tab"),
    ("Dashboard", "dashboard_tab"),
    ("Knowledge gaps", "gaps_tab"),
    ("Adapters", "adapters_tab"),
]


def build(bot: Bot) -> gr.Blocks:
    """The whole app for `bot`; call `.launch()` on the result."""
    # analytics off: the app runs offline, and a support bot does not report its use to a third party
    with gr.Blocks(title=f"{bot.settings.ui.company} support", analytics_enabled=False) as app:
        for title, module_name in TABS:
            with gr.Tab(title, id=module_name):
                try:
                    module = importlib.import_module(f"chatapp.ui.{module_name}")
                except ImportError as exc:
                    log.warning("tab %s unavailable: %s", title, exc)
                    gr.Markdown(f"⚠️ This tab is unavailable: {exc}")
                    continue
                module.build(bot)
    # Streaming chats run side by side; the model backend decides how they share the CPU.
    app.queue(default_concurrency_limit=8)
    return app
