"""Shared bits of the bench/ scripts (which machine a figure came from, where the JSON result goes) and of the tests
that drive the app over HTTP like they do (a free port, a chat message's text as gradio_client returns it)."""
from __future__ import annotations

import json
import os
import platform
import socket
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
