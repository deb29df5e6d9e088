"""Shared fixtures: the real default model (converted once per checkout), a tiny model with the real tokenizer,
and settings pointing every kind of state at a temporary folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from chatapp.benchutil import free_port  # noqa: E402,F401 - the tests import it from here
from chatapp.config import REPO_ROOT, ModelSettings, Settings  # noqa: E402

CHROMIUM = "/usr/bin/chromium"  # Debian's package (`make test` installs it); never `playwright install`


@pytest.fixture(scope="session")
def browser():
    """One headless Debian chromium for every browser test (each test opens its own page)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Debian chromium is missing at {CHROMIUM}: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        yield browser
        browser.close()


def ask(page, text: str) -> None:
    """Send a message in the customer chat page and wait until the bot's answer has streamed."""
    before = page.locator("#chatbot [data-testid='bot']").count()
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()
    page.wait_for_function(
        "n => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length > n && "
        "document.querySelector('#message textarea').value === ''", arg=before, timeout=60_000)
    page.wait_for_timeout(1500)  # let the stream finish


def serve_tab(title: str, tab, bot, auth=None):
    """One staff tab alone in a Blocks on a free port, as its tests drive it: (demo, url)."""
    import gradio as gr

    with gr.Blocks() as demo:
        with gr.Tab(title):
            tab.build(bot)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, auth=auth, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


def llama_cpp_or_skip():
    """llama_cpp, imported the serving path's way (libgomp's spin setting then holds in this process too), or the
    calling test module skipped when llama-cpp-python is not installed."""
    try:
        from chatapp.gguf_files import import_llama_cpp

        return import_llama_cpp()
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (make setup builds it)", allow_module_level=True)


# The GGUF -> safetensors conversion takes ~50 s: do it once per checkout, not once per test.
TEST_CACHE = Path(os.environ.get("CHATAPP_TEST_CACHE", REPO_ROOT / "var" / "test-cache"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real default model as a Hugging Face folder (converted from the package's GGUF on first use)."""
    from chatapp.model import resolve_base_model

    return resolve_base_model(ModelSettings(), TEST_CACHE / "models")


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's real tokenizer and chat template: the real code path, fast enough for unit tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    """Settings for a test: all runtime state in tmp_path, the tiny model, the transformers backend."""
    settings = Settings(data_dir=tmp_path / "data")
    settings.model.name = str(tiny_model_dir)
    settings.model.backend = "transformers"
    settings.model.threads = 2
    settings.generation.max_new_tokens = 24
    settings.generation.temperature = 0.0
    return settings


# ---- a real Postgres for the tests marked `postgres` -----------------------------------------------------------

@pytest.fixture(scope="session")
def postgres():
    """A temporary Postgres 15 cluster for the whole session (tests/pg.py), removed afterwards."""
    from pg import PostgresCluster, postgres_bin

    bindir = postgres_bin()
    if bindir is None:
        pytest.fail("Postgres is not installed: `make test` installs Debian's postgresql (apt-get install postgresql)")
    cluster = PostgresCluster(bindir).start()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def pg_url(postgres):
    """A fresh, empty database in the session's cluster, as a SQLAlchemy URL; dropped after the test."""
    name = postgres.createdb()
    try:
        yield postgres.url(name)
    finally:
        postgres.dropdb(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_target(request, tmp_path):
    """The same test on both engines: an SQLite file path, or a Postgres URL (a fresh database)."""
    if request.param == "sqlite":
        return tmp_path / "feedback.sqlite3"
    return request.getfixturevalue("pg_url")


class CountingEmbedder:
    """The real embedder, counting the passages this replica embeds (what the shared database should spare it)."""

    def __init__(self, inner):
        self.inner, self.passages = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_passages(self, texts):
        self.passages += len(texts)
        return self.inner.encode_passages(texts)


@pytest.fixture(scope="session")
def minilm():
    from chatapp.embeddings import load_embedder

    return load_embedder("minilm")
