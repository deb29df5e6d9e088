"""The launched app through gradio_client: streaming, per-session memory, bad input, and launch.py's flags."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from gradio_client import Client

from chatapp.benchutil import message_text
from chatapp.bot import Bot
from chatapp.config import REPO_ROOT
from chatapp.ui import build
from conftest import free_port


@pytest.fixture(scope="module")
def app_url(tiny_model_dir: Path, tmp_path_factory):
    from chatapp.config import Settings

    settings = Settings(data_dir=tmp_path_factory.mktemp("app-data"))
    settings.model.name, settings.model.backend, settings.model.threads = str(tiny_model_dir), "transformers", 2
    settings.generation.max_new_tokens, settings.generation.temperature = 24, 0.0
    settings.ui.stream_every_s = 0.0  # every token an update: the tiny model writes a whole answer in 50 ms
    # The tiny random model's greedy answer is blank space, never a sentence, so the guard's hold until the first
    # substantive sentence (tests/test_guard.py, test_answers.py) would show nothing: here the UI's streaming is tested
    settings.answer.quote_when_declined = False
    bot = Bot.create(settings)
    app = build(bot)
    app.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield app.local_url
    app.close()


def chat(client: Client, text: str, max_tokens: int = 24) -> tuple[list[list], list]:
    """Send one message; returns every streamed output and the final one."""
    job = client.submit(text, "auto", 0.0, max_tokens, api_name="/chat")
    job.result(timeout=120)
    outputs = job.outputs()
    return outputs, outputs[-1]


def texts(chatbot: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], message_text(m["content"])) for m in chatbot]


def test_answer_streams_with_status_and_sources(app_url: str):
    client = Client(app_url, verbose=False)
    outputs, final = chat(client, "How do I return an item?")
    chatbot, textbox, sources, status, hint = final
    assert len(outputs) > 3, "the answer should arrive in several streamed updates"
    assert texts(chatbot)[0] == ("user", "How do I return an item?")
    assert texts(chatbot)[1][0] == "assistant" and texts(chatbot)[1][1].strip()
    assert textbox == ""
    assert "Model:" in status and "tiny-model" in status or "Model:" in status
    assert sources.strip()


def test_stream_updates_are_coalesced_to_the_configured_rate(tiny_model_dir: Path, tmp_path: Path):
    """ui.stream_every_s caps screen updates (each re-sends the whole chat); the final answer is complete anyway."""
    from chatapp.config import Settings

    settings = Settings(data_dir=tmp_path / "data")
    settings.model.name, settings.model.backend, settings.model.threads = str(tiny_model_dir), "transformers", 2
    settings.generation.max_new_tokens, settings.generation.temperature = 24, 0.0
    settings.ui.stream_every_s = 60.0
    settings.answer.quote_when_declined = False  # see app_url
    app = build(Bot.create(settings))
    app.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        outputs, final = chat(Client(app.local_url, verbose=False), "How do I return an item?")
    finally:
        app.close()
    assert len(outputs) == 2  # the first piece, then the finished answer with its sources
    assert len(texts(final[0])[-1][1]) > len(texts(outputs[0][0])[-1][1]) and final[2].strip()


def test_sessions_never_see_each_others_history(app_url: str):
    alice, bob = Client(app_url, verbose=False), Client(app_url, verbose=False)
    results: dict[str, list] = {}

    def talk(name: str, client: Client) -> None:
        chat(client, f"My name is {name}.")
        results[name] = chat(client, f"Do you remember me? ({name})")[1][0]

    threads = [threading.Thread(target=talk, args=(n, c)) for n, c in (("Alice", alice), ("Bob", bob))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    for name, other in (("Alice", "Bob"), ("Bob", "Alice")):
        user_lines = [t for r, t in texts(results[name]) if r == "user"]
        assert user_lines == [f"My name is {name}.", f"Do you remember me? ({name})"]
        assert all(other not in t for _, t in texts(results[name]))


def test_empty_message_is_ignored_with_a_hint(app_url: str):
    client = Client(app_url, verbose=False)
    _, (chatbot, textbox, _, _, hint) = chat(client, "   ")
    assert chatbot == [] and "Type a question" in hint


def test_huge_message_is_truncated_with_a_notice(app_url: str):
    client = Client(app_url, verbose=False)
    _, (chatbot, *_rest) = chat(client, "where is my order? " * 6000, max_tokens=16)
    answer = texts(chatbot)[-1][1]
    assert "only the first 4,000 were read" in answer


def test_html_and_control_characters_are_shown_escaped(app_url: str):
    client = Client(app_url, verbose=False)
    _, (chatbot, *_rest) = chat(client, "<script>alert(1)</script>\x07 hello", max_tokens=16)
    user = texts(chatbot)[0][1]
    assert "&lt;script&gt;" in user and "<script>" not in user


# ---------------------------------------------------------------------------------------------------------------------
# launch.py as a user starts it


def run_launch(*flags: str, tiny_model_dir: Path, data_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "launch.py"), "--model", str(tiny_model_dir), "--backend", "transformers",
         "--data-dir", str(data_dir), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT,
    )


def test_share_without_auth_is_refused(tiny_model_dir: Path, tmp_path: Path):
    proc = run_launch("--share", tiny_model_dir=tiny_model_dir, data_dir=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Refusing --share without --auth" in out and "--allow-public" in out


def test_sigterm_shuts_the_app_down_cleanly(tiny_model_dir: Path, tmp_path: Path):
    """docker stop / systemd send SIGTERM: the app takes the same clean path as Ctrl-C (feedback flushed, exit 0)."""
    proc = run_launch("--port", str(free_port()), tiny_model_dir=tiny_model_dir, data_dir=tmp_path)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any("Chat app ready" in line for line in lines):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, ("".join(lines) + rest)[-2000:]
    assert "Shutting down" in rest


def test_a_stuck_library_thread_cannot_keep_the_app_from_exiting():
    """After its clean shutdown the app leaves within a grace period even if some thread never ends."""
    code = ("import threading, time\nfrom chatapp.cli import _exit_within\n"
            "threading.Thread(target=time.sleep, args=(600,)).start()\n_exit_within(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopping now" in proc.stderr


def test_wrong_model_path_is_a_clear_error(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "--model", "/no/such/model.gguf",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "/no/such/model.gguf" in proc.stderr


def test_offline_share_keeps_serving_locally_and_exits_cleanly(tiny_model_dir: Path, tmp_path: Path):
    port = free_port()
    proc = run_launch("--share", "--auth", "admin:secret", "--auth", "cust:pw", "--port", str(port),
                      tiny_model_dir=tiny_model_dir, data_dir=tmp_path)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "keeps serving locally" in line:
            break
    out = "".join(lines)
    try:
        assert "could not be created" in out, out[-2000:]
        client = Client(f"http://127.0.0.1:{port}/", auth=("cust", "pw"), verbose=False)  # a customer account
        _, (chatbot, *_rest) = chat(client, "Hello", max_tokens=16)
        assert texts(chatbot)[0] == ("user", "Hello")
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest[-2000:]
    assert "Shutting down" in rest
