"""The staff console at `/staff`: one tab per file (inbox, dashboard, gaps, prompts, adapters), each wired to the bot.

Served as its own Gradio app with its own login, so none of these functions is an endpoint of the customer app.
"""
from __future__ import annotations

import importlib
import logging

import gradio as gr

from chatapp.bot import Bot

log = logging.getLogger(__name__)

# (tab title, module under chatapp.ui.staff); a tab whose module fails to import shows why instead of taking the
# console down.
TABS = [
    ("Inbox", "inbox_tab"),
    ("Dashboard", "dashboard_tab"),
    ("Knowledge gaps", "gaps_tab"),
    ("Prompts", "prompts_tab"),
    ("Adapters", "adapters_tab"),
]


def build(bot: Bot) -> gr.Blocks:
    with gr.Blocks(title=f"{bot.settings.ui.company} support console", analytics_enabled=False) as app:
        for title, module_name in TABS:
            with gr.Tab(title, id=module_name):
                try:
                    module = importlib.import_module(f"chatapp.ui.staff.{module_name}")
                except ImportError as exc:
                    log.warning("tab %s unavailable: %s", title, exc)
                    gr.Markdown(f"⚠️ This tab is unavailable: {exc}")
                    continue
                module.build(bot)
    app.queue(default_concurrency_limit=8)
    return app
