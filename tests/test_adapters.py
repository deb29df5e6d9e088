"""Adapter registry: versions, promote/rollback semantics, atomic switching (concurrent writers, a writer killed
mid-way, readers never seeing a torn file), the CLI, and the admin tab driven through a real Gradio server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatapp.adapters import AdapterError, AdapterRegistry
from chatapp.config import REPO_ROOT, Settings


@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A real PEFT LoRA folder for the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def registry_with(settings: Settings, adapter: Path, count: int, passed: bool = True) -> AdapterRegistry:
    registry = AdapterRegistry(settings)
    for i in range(count):
        registry.add(adapter, {"note": i, "gate": {"passed": passed, "scores": {"candidate": {"rouge_l": 0.2}}},
                               "metrics": {"steps": 10 + i}})
    return registry


def test_promote_and_rollback(settings, peft_adapter):
    registry = registry_with(settings, peft_adapter, 3)
    assert [i.version for i in registry.list()] == ["v0001", "v0002", "v0003"]
    assert registry.active() is None
    registry.promote("v0001")
    registry.promote("v0003")
    assert registry.active().version == "v0003"
    assert registry.active().metadata["metrics"]["steps"] == 12
    assert registry.rollback().version == "v0001"
    assert registry.rollback() is None  # the base model was active before v0001
    with pytest.raises(AdapterError, match="nothing to roll back"):
        registry.rollback()
    assert [e["action"] for e in registry.history()] == ["promote", "promote", "rollback", "rollback"]
    # another process's view (a fresh registry) agrees
    assert AdapterRegistry(settings).active() is None


def test_rollback_skips_versions_deleted_since(settings, peft_adapter):
    import shutil

    registry = registry_with(settings, peft_adapter, 3)
    for version in ("v0001", "v0002", "v0003"):
        registry.promote(version)
    shutil.rmtree(registry.root / "v0002")
    assert registry.rollback().version == "v0001"


def test_bad_versions_are_refused_clearly(settings, peft_adapter):
    registry = registry_with(settings, peft_adapter, 1)
    with pytest.raises(AdapterError, match="does not exist"):
        registry.promote("v0042")
    with pytest.raises(AdapterError, match="not an adapter version"):
        registry.promote("../../etc")
    (registry.root / "v0002").mkdir()
    (registry.root / "v0002" / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="incomplete"):
        registry.promote("v0002")
    assert [i.version for i in registry.list()] == ["v0001"]  # half-written folders are not versions
    assert registry.active() is None


def test_add_never_exposes_half_a_version(settings, peft_adapter):
    registry = AdapterRegistry(settings)
    registry.root.mkdir(parents=True)
    stale = registry.root / ".staging-v0001-999999999"  # left by a writer that was killed mid-copy
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    assert registry.list() == []
    assert registry.cleanup_staging() == 1 and not stale.exists()
    info = registry.add(peft_adapter, {"x": 1})
    assert info.version == "v0001" and info.metadata["x"] == 1 and info.metadata["created"]
    assert (info.path / "adapter_model.safetensors").read_bytes() == (peft_adapter / "adapter_model.safetensors").read_bytes()


def test_concurrent_promotions_lose_no_update(settings, peft_adapter):
    registry = registry_with(settings, peft_adapter, 4)
    errors = []

    def worker(n: int) -> None:
        own = AdapterRegistry(settings)  # one registry object per thread, like separate processes
        try:
            for i in range(10):
                own.promote(f"v000{(n + i) % 4 + 1}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    events = registry.history()
    # every promotion that changed something is recorded, and the chain of from -> version is unbroken
    assert all(a["version"] == b["from"] for a, b in zip(events, events[1:]))
    assert registry.active().version == events[-1]["version"]


WRITER = """
import sys
from chatapp.adapters import AdapterRegistry
from chatapp.config import Settings
from pathlib import Path
registry = AdapterRegistry(Settings(data_dir=Path(sys.argv[1])))
print("ready", flush=True)
i = 0
while True:
    registry.promote("v0001" if i % 2 else "v0002")
    i += 1
"""


def test_readers_never_see_a_torn_registry_and_a_killed_writer_leaves_it_valid(settings, peft_adapter):
    registry_with(settings, peft_adapter, 2).promote("v0001")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for _ in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(settings.data_dir)], env=env,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip() == "ready"
            reader = AdapterRegistry(settings)
            seen = set()
            deadline = time.time() + 2
            while time.time() < deadline:
                seen.add(reader.active().version)  # never an error, never anything but a complete version
            assert seen <= {"v0001", "v0002"} and seen
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(10)
        state = AdapterRegistry(settings)._state()  # as a fresh replica reads it from the database
        assert state["active"] in ("v0001", "v0002")
        assert AdapterRegistry(settings).active().version == state["active"]


def test_active_is_cheap_when_nothing_changed(settings, peft_adapter):
    registry = registry_with(settings, peft_adapter, 1)
    registry.promote("v0001")
    started = time.perf_counter()
    for _ in range(2000):
        assert registry.active().version == "v0001"
    assert time.perf_counter() - started < 2.0  # one stat() per call; the file is parsed once


def test_cli_list_show_promote_rollback(settings, peft_adapter, capsys):
    from chatapp.cli import main

    registry_with(settings, peft_adapter, 1)
    AdapterRegistry(settings).add(peft_adapter, {"gate": {"passed": False}})
    base = ["--data-dir", str(settings.data_dir), "adapters"]
    assert main(base + ["list"]) == 0
    assert "v0001" in capsys.readouterr().out
    assert main(base + ["promote", "v0001"]) == 0
    assert AdapterRegistry(settings).active().version == "v0001"
    assert main(base + ["promote", "v0002"]) == 2  # its gate failed
    assert "did not pass" in capsys.readouterr().err
    assert main(base + ["promote", "v0002", "--force"]) == 0
    assert main(base + ["show", "v0002"]) == 0
    assert json.loads(capsys.readouterr().out.split("active adapter: v0002\n")[-1])["version"] == "v0002"
    assert main(base + ["rollback"]) == 0
    assert AdapterRegistry(settings).active().version == "v0001"
    assert main(base + ["promote", "nope"]) == 2
    assert "not an adapter version" in capsys.readouterr().err
    assert main(base + ["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active"] == "v0001"


def test_admin_tab_promotes_and_rolls_back_through_gradio(settings, peft_adapter, tiny_model_dir):
    """The real tab in a real Gradio server: an admin's promotion hot-swaps the running model; a non-admin's
    request changes nothing."""
    import gradio as gr
    from gradio_client import Client

    from chatapp.bot import Bot
    from chatapp.model import TransformersModel
    from chatapp.ui.staff import adapters_tab

    registry = registry_with(settings, peft_adapter, 2)
    settings.ui.auth = [("admin", "pw-admin"), ("clerk", "pw-clerk")]
    settings.ui.admins = ["admin"]
    model = TransformersModel(tiny_model_dir, "tiny", threads=1)
    bot = Bot(settings, model, adapters=registry)
    with gr.Blocks() as app:
        with gr.Tab("Adapters"):
            adapters_tab.build(bot)
    app.launch(prevent_thread_lock=True, auth=settings.ui.auth, server_name="127.0.0.1", server_port=None)
    try:
        clerk = Client(app.local_url, auth=("clerk", "pw-clerk"), verbose=False)
        message = clerk.predict("v0002", api_name="/adapters_promote")[0]
        assert "Only administrators" in message and registry.active() is None and model.adapter_version is None
        admin = Client(app.local_url, auth=("admin", "pw-admin"), verbose=False)
        message = admin.predict("v0002", api_name="/adapters_promote")[0]
        assert "v0002 is now active" in message
        assert registry.active().version == "v0002" and model.adapter_version == "v0002"  # hot-swapped
        message = admin.predict("v0002", api_name="/adapters_rollback")[0]
        assert "base model" in message and registry.active() is None and model.adapter_version is None
    finally:
        app.close()


def test_an_adapter_trained_on_other_base_weights_is_not_loaded(settings, peft_adapter, tiny_model_dir):
    """The registry may hold adapters of another base model (the data dir was shared, --model changed): the running
    bot must stay on what it has and say why, and take an adapter of its own base as soon as one is promoted."""
    from chatapp.bot import Bot
    from chatapp.model import TransformersModel, base_model_hash

    registry = AdapterRegistry(settings)
    registry.add(peft_adapter, {"base_model": {"name": "other", "sha256": "0" * 64}})
    registry.add(peft_adapter, {"base_model": {"name": "tiny", "sha256": base_model_hash(tiny_model_dir)}})
    model = TransformersModel(tiny_model_dir, "tiny", threads=1)
    bot = Bot(settings, model, adapters=registry)
    registry.promote("v0001")
    bot.sync_adapter()
    assert model.adapter_version is None
    assert "v0001 was trained on other base weights" in bot.problems["adapters"]
    registry.promote("v0002")
    bot.sync_adapter()
    assert model.adapter_version == "v0002" and "adapters" not in bot.problems
