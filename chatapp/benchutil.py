"""Shared bits of the bench/ scripts (which machine a figure came from, where the JSON result goes) and of the tests
that drive the app over HTTP like they do (a free port, a chat message's text as gradio_client returns it) or need
an adapter without training one (a random PEFT LoRA)."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"


def machine_info() -> dict[str, Any]:
    """Enough to tell two benchmark runs' machines apart."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Print the figures and the machine, and write them to bench/results/<name>.json."""
    payload = {"benchmark": name, "machine": machine_info(), **result}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
    return path


def free_port() -> int:
    """A port nothing listens on now, for a server about to start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def message_text(content: Any) -> str:
    """A chat message's text as gradio_client returns it: Gradio 6 sends a list of parts ({"type": "text", ...})."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return str(content)


def random_lora(base_dir: Path, out: Path, *, seed: int = 0, std: float = 0.05, rank: int = 8,
                modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"), **lora_options: Any) -> Path:
    """A real PEFT LoRA on the model in `base_dir` with random B weights (normal, `std`), so it visibly changes the
    answers; std=0 keeps B = 0 as peft initialises it (an adapter that changes nothing). alpha = 2 x rank, the tuning
    defaults' ratio. Built in a thread that ends, so its torch work does not slow llama.cpp afterwards."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatapp.model import in_passing_thread

    def build() -> Path:
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(modules), lora_dropout=0.0, **lora_options)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), config)
        if std:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, std)
        model.save_pretrained(out)
        return out

    return in_passing_thread(build)


def start_app(command: list[str], log_path: Path, env: dict, cwd: Path, timeout_s: float = 900):
    """launch.py in a subprocess, logging to `log_path`; returns the process once it says it is ready."""
    with open(log_path, "w") as log_file:
        app = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    deadline = time.time() + timeout_s
    while "Chat app ready" not in log_path.read_text():
        if app.poll() is not None or time.time() > deadline:
            app.kill()
            raise RuntimeError(f"the app did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)
    return app


def launch_app(data_dir: Path, flags: list[str], config_toml: str = "") -> tuple[subprocess.Popen, str]:
    """launch.py on its own `data_dir` and a free port, with the shared converted model cache linked in (it starts
    warm) and `config_toml` as its settings file: (process, its URL) once it is ready."""
    import sys

    from chatapp.config import REPO_ROOT, Settings

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "models").symlink_to(Settings().model_cache_dir.resolve(), target_is_directory=True)
    config = data_dir / "bench.toml"
    config.write_text(config_toml)
    port = free_port()
    command = [sys.executable, str(REPO_ROOT / "launch.py"), "--port", str(port), "--data-dir", str(data_dir),
               "--config", str(config), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return start_app(command, data_dir / "app.log", env, REPO_ROOT), f"http://127.0.0.1:{port}/"


def stop_apps(apps: list[subprocess.Popen]) -> None:
    """Stop app processes started by `start_app`: all asked at once (they shut down side by side), killed if stuck."""
    for app in apps:
        app.terminate()
    for app in apps:
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()


def streamed_outputs(job, poll_s: float = 0.01):
    """A gradio_client job's outputs as they arrive. Why not `for output in job`: its iterator checks for news every
    millisecond under a lock; twenty of them are twenty threads spinning on the two cores the app answers on."""
    seen = 0
    while True:
        done = job.done()
        outputs = job.outputs()
        if len(outputs) > seen:
            yield from outputs[seen:]
            seen = len(outputs)
        elif done:
            return
        else:
            time.sleep(poll_s)
