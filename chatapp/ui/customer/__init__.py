"""The customer surface: the chat at `/` and the minimal view for the embeddable widget at `/widget`.

Only customer code is imported here, so no staff function can become an endpoint of these apps.
"""
from __future__ import annotations

import gradio as gr

from chatapp.bot import Bot
from chatapp.ui.customer import chat


def build(bot: Bot, widget: bool = False) -> gr.Blocks:
    """The customer app (`widget`: chat only, for an iframe on the shop's site)."""
    # analytics off: the app runs offline, and a support bot does not report its use to a third party
    with gr.Blocks(title=f"{bot.settings.ui.company} support", analytics_enabled=False) as app:
        chat.build(bot, widget=widget)
    # Streaming chats run side by side; the model backend decides how they share the CPU.
    app.queue(default_concurrency_limit=8)
    return app
