"""The OpenAI-compatible backend against a real third-party server (llama-cpp-python's) serving the default GGUF."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from chatapp.config import GenerationSettings, ModelSettings, Settings
from chatapp.model import PROFILES, ModelError, OpenAIModel, load_model, profile_gguf
from conftest import free_port

pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is part of `make test`'s setup")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    gguf = profile_gguf(PROFILES["smollm2"], tmp_path_factory.mktemp("cache"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--n_threads", "2", "--n_ctx", "2048"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("llama_cpp.server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


def test_streams_an_answer_from_the_server(server_url: str):
    settings = Settings()
    settings.model.backend, settings.model.openai_base_url = "openai", server_url
    model = load_model(settings)
    assert isinstance(model, OpenAIModel) and server_url in model.description
    question = [{"role": "user", "content": "What is the capital of France?"}]
    pieces = list(model.stream(question, GenerationSettings(max_new_tokens=24, temperature=0.0)))
    assert len(pieces) > 2, "the answer should stream in pieces"
    assert "capital" in "".join(pieces).lower()  # on topic; Q4_1 in llama.cpp words it differently from fp32


def test_stop_event_ends_the_stream(server_url: str):
    model = OpenAIModel(ModelSettings(openai_base_url=server_url))
    stop = threading.Event()
    pieces = []
    for piece in model.stream([{"role": "user", "content": "Tell me a long story."}],
                              GenerationSettings(max_new_tokens=200, temperature=0.0), stop):
        pieces.append(piece)
        stop.set()
    assert len(pieces) == 1


def test_unreachable_server_is_a_clear_error():
    model = OpenAIModel(ModelSettings(openai_base_url=f"http://127.0.0.1:{free_port()}/v1"))
    with pytest.raises(ModelError, match="cannot reach the model server"):
        list(model.stream([{"role": "user", "content": "hi"}], GenerationSettings()))
