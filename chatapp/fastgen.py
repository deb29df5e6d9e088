"""Fast CPU generation: llama.cpp serves the base GGUF, PEFT adapters become GGUF LoRAs, all sessions share one batch.

Why this exists: plain transformers `generate` decodes SmolLM2 at about a seventh of llama.cpp's speed on these CPUs
(issue 7). This backend keeps the app's `ChatModel` interface and the transformers tokenizer (so prompts are the same
token ids on both paths) but runs the network in llama.cpp:

- one llama.cpp context holds a KV stream per chat session (`n_seq_max`), and a scheduler thread decodes one token
  for every active session in the same `llama_decode` call, prefilling new prompts in the same batch, so twenty
  people typing at once cost little more than one and no session waits for another's answer to end;
- training stays on transformers + peft: `set_adapter(peft_dir)` writes the PEFT LoRA as a GGUF LoRA once (cached
  in the adapter folder, atomically) and loads it next to the base weights, with no reload; an answer finishes on
  the adapter it began with, even when a new one is promoted mid-answer;
- when llama-cpp-python is missing or broken, or the model is not a GGUF, `load_fast_model` returns None and says
  why, and `chatapp.model.load_model` falls back to transformers.
"""
from __future__ import annotations

import codecs
import collections
import ctypes
import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from chatapp.config import GenerationSettings, Settings
from chatapp.model import PROFILES, ModelError, profile_gguf

log = logging.getLogger(__name__)

GOMP_SPINCOUNT = "1000"  # libgomp's default is 300,000 rounds; see import_llama_cpp


def import_llama_cpp():
    """`import llama_cpp` with libgomp told to spin only briefly at llama.cpp's per-node thread barriers.

    Why: measured here (2 cores, 179-token prompt, 128 tokens, plain llama.cpp): on a quiet machine the default spin
    decodes 90 tokens/s, 1,000 rounds 80-88 and passive waiting (OMP_WAIT_POLICY=passive) only 23; with one other busy
    process on the cores the default drops to 25, 1,000 rounds to 31, passive to 45 (and 1 thread gives 54: set
    model.threads when the machine is shared). A short spin keeps nearly all the quiet-machine speed and yields the core
    sooner to the chat's own streaming threads. libgomp reads the setting once, when llama_cpp loads it, so it is set
    only around that import (torch's own libgomp copy is not affected); GOMP_SPINCOUNT or OMP_WAIT_POLICY exported by
    the user wins.
    """
    if "llama_cpp" in sys.modules and sys.modules["llama_cpp"] is not None:
        return sys.modules["llama_cpp"]
    ours = "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
    if ours:
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    try:
        import llama_cpp
    finally:
        if ours:
            del os.environ["GOMP_SPINCOUNT"]
    return llama_cpp


LORA_FORMAT = 1  # bump when convert_peft_adapter's output changes, so cached .gguf adapters are rebuilt
SAMPLING_TOP_K = 50  # transformers' GenerationConfig default, applied by the transformers path too
PREFILL_TOKENS_PER_STEP = 512  # prompt tokens per batched step: a new prompt is prefilled in one step, decoders wait ≤ 1


class UnsupportedAdapter(ModelError):
    """A valid PEFT adapter that llama.cpp cannot serve (DoRA, modules_to_save, ...); transformers still can."""


# --------------------------------------------------------------------------------------------------------------------
# PEFT LoRA -> GGUF LoRA


def _permute_rope_rows(weights, n_head: int, n_head_kv: int):
    """llama.cpp's converter reorders the rows of q/k projections of llama models (rotary layout); so must the LoRA B.

    Same as `LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py, which wrote the base GGUF.
    """
    heads = n_head_kv if n_head_kv and n_head != n_head_kv else n_head
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _adapter_signature(adapter_dir: Path, base_gguf: Path) -> dict:
    """What a cached .gguf adapter was made from; any change (retrained weights, other base) means convert again."""
    files = {}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        stat = (adapter_dir / name).stat()
        files[name] = [stat.st_size, stat.st_mtime_ns]
    base = base_gguf.stat()
    return {"format": LORA_FORMAT, "files": files, "base": [str(base_gguf), base.st_size, base.st_mtime_ns]}


def convert_peft_adapter(adapter_dir: Path, base_gguf: Path, fallback_dir: Path | None = None) -> Path:
    """The GGUF LoRA for a PEFT LoRA folder, converted once and cached in that folder (or `fallback_dir` if read-only).

    llama.cpp computes W·x + scale·B·(A·x) with scale = alpha/rank from the GGUF; PEFT's per-module scaling (alpha/r,
    alpha/sqrt(r) for rsLoRA, alpha patterns) is folded into B instead and the GGUF alpha set to 0 (= scale 1), so
    every plain PEFT LoRA maps exactly. Written to a temporary file and renamed, so a crash never leaves half a file.
    """
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file():
        raise ModelError(f"adapter {adapter_dir}: no adapter_config.json there (expected a PEFT adapter folder)")
    if not weights_path.is_file():
        raise ModelError(f"adapter {adapter_dir}: no adapter_model.safetensors there (save it with safetensors)")
    signature = _adapter_signature(adapter_dir, base_gguf)
    name = "llamacpp-lora-" + hashlib.sha1(json.dumps(signature["base"]).encode()).hexdigest()[:8] + ".gguf"
    folders = [adapter_dir] + ([Path(fallback_dir)] if fallback_dir is not None else [])
    for folder in folders:
        try:
            if json.loads((folder / name).with_suffix(".json").read_text()) == signature and (folder / name).is_file():
                return folder / name
        except (OSError, ValueError):
            pass
    tensors = _lora_tensors_for_gguf(adapter_dir, base_gguf)
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return _write_lora_gguf(folder / name, tensors, base_gguf, signature)
        except PermissionError:
            log.info("adapter folder %s is read-only; caching its GGUF elsewhere", folder)
    raise ModelError(f"adapter {adapter_dir}: nowhere writable to store its converted GGUF")


def _lora_tensors_for_gguf(adapter_dir: Path, base_gguf: Path) -> dict:
    """GGUF tensor name -> float32 array: PEFT's A and B matrices, renamed, scaled and laid out as llama.cpp expects."""
    import gguf
    import numpy as np
    from peft.utils.other import get_pattern_key
    from safetensors.numpy import load_file

    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except ValueError as exc:
        raise ModelError(f"adapter {adapter_dir}: adapter_config.json is not valid JSON ({exc})") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"adapter {adapter_dir}: {config.get('peft_type')} adapters are not LoRA")
    for option in ("use_dora", "modules_to_save", "trainable_token_indices", "layer_replication"):
        if config.get(option):
            raise UnsupportedAdapter(f"adapter {adapter_dir}: llama.cpp cannot serve {option}")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise UnsupportedAdapter(f"adapter {adapter_dir}: llama.cpp cannot serve LoRA biases")

    reader = gguf.GGUFReader(str(base_gguf))
    arch_name = str(reader.fields["general.architecture"].contents())
    hparam = lambda key: int(reader.fields[f"{arch_name}.{key}"].contents())  # noqa: E731
    n_head, n_head_kv = hparam("attention.head_count"), hparam("attention.head_count_kv")
    base_shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}  # GGUF order: (in, out)
    arch = {arch_str: arch_id for arch_id, arch_str in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise UnsupportedAdapter(f"gguf-py does not know the architecture {arch_name!r} of {base_gguf.name}")
    tensor_names = gguf.get_tensor_name_map(arch, hparam("block_count"))

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise UnsupportedAdapter(f"adapter {adapter_dir}: tensor {key!r} is not a LoRA A/B matrix")
        pairs.setdefault(match.group(1), {})[match.group(2)] = value.astype(np.float32)

    alpha, alpha_pattern = float(config.get("lora_alpha", 8)), config.get("alpha_pattern") or {}
    out = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ModelError(f"adapter {adapter_dir}: {module} has lora_{''.join(ab)} only")
        lora_a, lora_b = ab["A"], ab["B"]
        rank = lora_a.shape[0]  # the module's own rank, rank_pattern included
        module_alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), alpha))
        lora_b = lora_b * (module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank))
        dest = tensor_names.get_name(module + ".weight", try_suffixes=(".weight",))
        if dest is None or dest not in base_shapes:
            raise UnsupportedAdapter(f"adapter {adapter_dir}: {base_gguf.name} has no weight for module {module}")
        in_features, out_features = base_shapes[dest][:2]
        if lora_a.shape[1] != in_features or lora_b.shape != (out_features, rank):
            raise ModelError(
                f"adapter {adapter_dir} does not fit {base_gguf.name}: {module} has A{tuple(lora_a.shape)} "
                f"B{tuple(lora_b.shape)} but the base weight is {out_features}x{in_features} (another base model?)"
            )
        if arch_name == "llama" and module.endswith("q_proj"):
            lora_b = _permute_rope_rows(lora_b, n_head, n_head)
        elif arch_name == "llama" and module.endswith("k_proj"):
            lora_b = _permute_rope_rows(lora_b, n_head, n_head_kv)
        out[dest + ".lora_a"] = np.ascontiguousarray(lora_a)  # (rank, in): ggml ne = [in, rank]
        out[dest + ".lora_b"] = np.ascontiguousarray(lora_b)  # (out, rank): ggml ne = [rank, out]
    if not out:
        raise ModelError(f"adapter {adapter_dir}: no LoRA weights in adapter_model.safetensors")
    return {"arch": arch_name, "tensors": out}


def _write_lora_gguf(target: Path, lora: dict, base_gguf: Path, signature: dict) -> Path:
    import gguf

    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), lora["arch"])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0 = scale 1: PEFT's scaling is already inside B
        for name, array in lora["tensors"].items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
        meta_tmp = tmp.with_suffix(".json")
        meta_tmp.write_text(json.dumps(signature))
        os.replace(meta_tmp, target.with_suffix(".json"))  # written last: the signature vouches for a whole file
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".json").unlink(missing_ok=True)
    log.info("converted the PEFT adapter in %s for llama.cpp: %s", target.parent, target.name)
    return target


# --------------------------------------------------------------------------------------------------------------------
# The batched llama.cpp engine


def _looping(ids: list[int], window: int = 8, repeats: int = 3) -> bool:
    """The transformers path's repetition guard (chatapp.model._repetition_guard), on a plain list of token ids."""
    for size in range(1, window + 1):
        if len(ids) < size * repeats:
            break
        tail = ids[-size:]
        if all(ids[-size * (i + 1) : len(ids) - size * i] == tail for i in range(repeats)):
            return size > 1 or repeats * size >= 2 * window
    return False


@dataclass(eq=False)
class _Adapter:
    version: str | None
    source: Path
    handle: int  # llama_adapter_lora pointer


@dataclass(eq=False)
class _Request:
    """One answer in flight; the scheduler owns every field but `cancelled` (set by the consumer) and `out`."""

    prompt: list[int]
    gen: GenerationSettings
    stop: threading.Event | None
    adapter: _Adapter | None
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    seq: int = -1
    n_past: int = 0  # tokens already in this sequence's KV cache
    next_token: int = -1  # sampled, not yet in the KV cache
    generated: list[int] = field(default_factory=list)
    sampler: int | None = None
    output_index: int = -1
    text: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


_FINISHED = object()


class LlamaCppModel:
    """`ChatModel` on llama.cpp: one context, one KV stream per session, one scheduler thread batching all of them."""

    def __init__(
        self,
        gguf_path: Path,
        tokenizer_dir: Path,
        title: str,
        threads: int = 0,
        sessions: int = 20,
        context_tokens: int = 4096,
        cache_dir: Path | None = None,
        source_gguf: Path | None = None,
    ):
        llama = import_llama_cpp()
        self.llama = llama
        self.gguf_path = Path(gguf_path)
        self.source_gguf = Path(source_gguf or gguf_path)  # what adapters are converted against (names, shapes)
        self.model_dir = Path(tokenizer_dir)  # the base model's cached copy: its hash says which adapters fit
        self.title = title
        self.cache_dir = cache_dir  # for adapters converted from read-only folders
        self.adapter_version: str | None = None
        self._adapter: _Adapter | None = None
        self._loaded_adapters: dict[Path, int] = {}  # gguf path -> handle; freed with the model
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter off

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self._tokenizer_lock = threading.Lock()

        llama.llama_backend_init()
        self._model = llama.llama_model_load_from_file(str(self.gguf_path).encode(), llama.llama_model_default_params())
        if not self._model:
            raise ModelError(f"llama.cpp cannot load {self.gguf_path}")
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        trained = llama.llama_model_n_ctx_train(self._model)
        self.context_tokens = max(256, min(context_tokens, trained))
        self.sessions = max(1, sessions)
        threads = threads if threads > 0 else (os.cpu_count() or 1)
        params = llama.llama_context_default_params()
        params.n_seq_max = self.sessions
        params.n_ctx = self.context_tokens * self.sessions
        params.kv_unified = False  # each session its own KV stream: attention never scans other sessions' tokens
        params.n_batch = PREFILL_TOKENS_PER_STEP + self.sessions
        params.n_ubatch = min(512, params.n_batch)
        params.n_threads = params.n_threads_batch = threads
        # Flash attention off: llama.cpp's CPU kernel for it decoded this model at 40-48 tokens/s against 64-77 without
        # (200-token prompt, 2 threads, bench/generation.py's prompt).
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self._ctx = llama.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama.llama_model_free(self._model)
            raise ModelError(f"llama.cpp cannot create a context for {self.gguf_path} ({self.sessions} sessions)")
        self.context_tokens = llama.llama_n_ctx_seq(self._ctx)
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(params.n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self._ctx_adapter: _Adapter | None = None  # what the context computes with right now

        self._cond = threading.Condition()
        self._pending: collections.deque[_Request] = collections.deque()
        self._active: list[_Request] = []
        self._free_seqs = list(range(self.sessions - 1, -1, -1))
        self._calls: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()
        self._turn = 0
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="llamacpp-scheduler", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------------------- interface

    @property
    def description(self) -> str:
        adapter = f"adapter {self.adapter_version}" if self._adapter else "no adapter"
        weights = self.gguf_path.name
        if self.source_gguf != self.gguf_path:  # re-encoded by serving_gguf: <stem>-<key>.<weights>.gguf
            weights = f"{self.source_gguf.name} as {self.gguf_path.suffixes[-2][1:]}"
        return f"{self.title} · llama.cpp ({weights}) · {adapter}"

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids through the transformers tokenizer's chat template: the same ids the transformers path feeds."""
        with self._tokenizer_lock:
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        return list(encoded["input_ids"])

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.prompt_ids(messages))

    def set_adapter(self, path: Path | None, version: str | None = None) -> None:
        """Serve a PEFT adapter (converted once, cached in its folder) or none; answers in flight keep theirs."""
        if path is None:
            with self._cond:
                self._adapter, self.adapter_version = None, None
            return
        path = Path(path)
        converted = convert_peft_adapter(path, self.source_gguf, self._fallback_adapter_dir(path))
        handle = self._call_in_scheduler(lambda: self._load_adapter(converted))
        with self._cond:
            self._adapter = _Adapter(version or path.name, path, handle)
            self.adapter_version = self._adapter.version

    def stream(
        self, messages: list[dict], gen: GenerationSettings, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """Yield text pieces as the scheduler produces them; `stop` (or closing the generator) ends the answer."""
        prompt = self.prompt_ids(messages)
        if len(prompt) >= self.context_tokens:
            raise ModelError(f"the prompt ({len(prompt)} tokens) fills the model's context ({self.context_tokens})")
        if not self._thread.is_alive():
            raise ModelError("the llama.cpp scheduler is not running (model closed?)")
        with self._cond:
            request = _Request(prompt, gen, stop, self._adapter)
            self._pending.append(request)
            self._cond.notify()
        try:
            while True:
                try:
                    item = request.out.get(timeout=1.0)
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise ModelError("the llama.cpp scheduler stopped") from None
                    continue
                if item is _FINISHED:
                    return
                if isinstance(item, BaseException):
                    raise ModelError(f"generation failed: {item}") from item
                yield item
        finally:
            request.cancelled = True  # a closed generator frees its session at the next step
            with self._cond:
                self._cond.notify()

    def close(self) -> None:
        """Stop the scheduler (answers in flight end) and free llama.cpp's memory."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self.llama.llama_batch_free(self._batch)
        self.llama.llama_free(self._ctx)
        self.llama.llama_model_free(self._model)  # also frees the adapters loaded on it

    # ---------------------------------------------------------------------------------------------------- adapters

    def _fallback_adapter_dir(self, adapter_dir: Path) -> Path | None:
        """Where a converted adapter goes when its own folder is read-only."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / "lora-gguf" / hashlib.sha1(str(adapter_dir.resolve()).encode()).hexdigest()[:12]

    def _load_adapter(self, converted: Path) -> int:
        """Runs in the scheduler thread: llama.cpp adapters are loaded on the model while no batch is running."""
        converted = converted.resolve()
        if converted in self._loaded_adapters:
            return self._loaded_adapters[converted]
        handle = self.llama.llama_adapter_lora_init(self._model, str(converted).encode())
        if not handle:
            raise ModelError(f"llama.cpp rejected the adapter {converted} (does it fit {self.gguf_path.name}?)")
        self._loaded_adapters[converted] = handle
        return handle

    def _apply_adapter(self, adapter: _Adapter | None) -> None:
        if adapter is self._ctx_adapter:
            return
        llama = self.llama
        if adapter is None:
            code = llama.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handles = (llama.llama_adapter_lora_p_ctypes * 1)(adapter.handle)
            scales = (ctypes.c_float * 1)(1.0)
            code = llama.llama_set_adapters_lora(self._ctx, handles, 1, scales)
        if code != 0:
            raise ModelError(f"llama.cpp could not switch to adapter {adapter.version if adapter else None}")
        self._ctx_adapter = adapter

    def _call_in_scheduler(self, fn: Callable[[], object]):
        done: Future = Future()
        with self._cond:
            self._calls.append((fn, done))
            self._cond.notify()
        return done.result(timeout=600)

    # ---------------------------------------------------------------------------------------------------- scheduler

    def _serve(self) -> None:
        """The scheduler loop: admit, build one batch over all sessions, decode, sample; never dies on one error."""
        while True:
            with self._cond:
                while not (self._closed or self._calls or self._pending or self._active):
                    self._cond.wait()
                if self._closed:
                    break
                calls = list(self._calls)
                self._calls.clear()
                while self._pending and self._free_seqs:
                    request = self._pending.popleft()
                    if self._should_end(request):
                        request.out.put(_FINISHED)
                        continue
                    request.seq = self._free_seqs.pop()
                    self._active.append(request)
            for fn, done in calls:
                try:
                    done.set_result(fn())
                except BaseException as exc:
                    done.set_exception(exc)
            try:
                self._step()
            except BaseException as exc:  # a broken batch fails its answers, not the server
                log.exception("llama.cpp step failed")
                for request in list(self._active):
                    self._finish(request, exc)
        for request in list(self._active) + list(self._pending):
            request.out.put(_FINISHED)

    def _should_end(self, request: _Request) -> bool:
        return request.cancelled or (request.stop is not None and request.stop.is_set())

    def _step(self) -> None:
        for request in [r for r in self._active if self._should_end(r)]:
            self._finish(request)
        if not self._active:
            return
        # One adapter per llama_decode: when answers on an old adapter are still running, groups take turns.
        groups: dict[int, list[_Request]] = {}
        for request in self._active:
            groups.setdefault(id(request.adapter), []).append(request)
        group = list(groups.values())[self._turn % len(groups)]
        self._turn += 1
        self._apply_adapter(group[0].adapter)

        batch, count = self._batch, 0

        def add(token: int, pos: int, seq: int, wants_logits: bool) -> None:
            nonlocal count
            batch.token[count], batch.pos[count], batch.n_seq_id[count] = token, pos, 1
            batch.seq_id[count][0], batch.logits[count] = seq, wants_logits
            count += 1

        sampling: list[_Request] = []
        for request in group:
            if request.next_token >= 0:  # decoding: feed the last sampled token
                request.output_index = count
                add(request.next_token, request.n_past, request.seq, True)
                request.n_past += 1
                sampling.append(request)
        budget = PREFILL_TOKENS_PER_STEP
        for request in group:  # prefilling, oldest first, so a burst of new prompts is served in arrival order
            if request.next_token >= 0 or budget <= 0:
                continue
            chunk = request.prompt[request.n_past : request.n_past + budget]
            for i, token in enumerate(chunk):
                last = request.n_past + i == len(request.prompt) - 1
                if last:
                    request.output_index = count
                    sampling.append(request)
                add(token, request.n_past + i, request.seq, last)
            request.n_past += len(chunk)
            budget -= len(chunk)
        batch.n_tokens = count
        code = self.llama.llama_decode(self._ctx, batch)
        if code != 0:
            raise ModelError(f"llama_decode returned {code}")
        for request in sampling:
            if request.sampler is None:
                request.sampler = self._make_sampler(request)
            token = self.llama.llama_sampler_sample(request.sampler, self._ctx, request.output_index)
            self._emit(request, token)

    def _make_sampler(self, request: _Request) -> int:
        """transformers' order: repetition penalty over prompt + answer, then top-k, temperature, top-p, sample."""
        llama, gen = self.llama, request.gen
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        if gen.repetition_penalty and gen.repetition_penalty != 1.0:
            penalties = llama.llama_sampler_init_penalties(
                self.n_vocab, self.context_tokens, float(gen.repetition_penalty), 0.0, 0.0
            )
            llama.llama_sampler_chain_add(chain, penalties)
            for token in request.prompt:
                llama.llama_sampler_accept(penalties, token)
        if gen.temperature > 0:
            # top-k 50 first: transformers' default (so the transformers path samples the same way), and it spares
            # top-p a sort of the whole 49k vocabulary per session per token, which dominated steps of 20 sessions.
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(SAMPLING_TOP_K))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(float(gen.temperature)))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(float(gen.top_p), 1))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(random.getrandbits(32)))
        else:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
        return chain

    def _token_bytes(self, token: int) -> bytes:
        size = self.llama.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        if size < 0:
            self._piece = ctypes.create_string_buffer(-size)
            size = self.llama.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:size]

    def _emit(self, request: _Request, token: int) -> None:
        if self.llama.llama_vocab_is_eog(self._vocab, token):
            self._finish(request)
            return
        request.generated.append(token)
        request.next_token = token
        if piece := request.text.decode(self._token_bytes(token)):
            request.out.put(piece)
        room = self.context_tokens - 1 - request.n_past
        if (
            len(request.generated) >= request.gen.max_new_tokens
            or room <= 0
            or _looping(request.prompt[-24:] + request.generated[-24:])
        ):
            self._finish(request)

    def _finish(self, request: _Request, error: BaseException | None = None) -> None:
        """End an answer: flush its text, free its KV stream and sampler, hand its session slot to the next prompt."""
        if request in self._active:
            self._active.remove(request)
        if request.seq >= 0:
            self.llama.llama_memory_seq_rm(self._memory, request.seq, -1, -1)
            with self._cond:
                self._free_seqs.append(request.seq)
            request.seq = -1
        if request.sampler is not None:
            self.llama.llama_sampler_free(request.sampler)
            request.sampler = None
        if error is None and (tail := request.text.decode(b"", final=True)):
            request.out.put(tail)
        request.out.put(error if error is not None else _FINISHED)


# --------------------------------------------------------------------------------------------------------------------
# Entry point used by chatapp.model.load_model


WEIGHT_TYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def serving_gguf(source: Path, cache_dir: Path, weights: str = "q8_0") -> Path:
    """The GGUF llama.cpp serves: the package's file re-encoded once (cached, atomically) unless weights="as-is".

    Why: llama.cpp has no fast CPU matrix kernels for Q4_1, so the package's Q4_1 SmolLM2 prefills slowly (a 200-token
    prompt: ~0.9 s on 2 cores). Measured with bench/generation.py (2 cores, LoRA applied, 200-token prompt):
    Q8_0 -- first token 0.5-0.6 s, 64-66 tokens/s, 96-97% teacher-forced top-1 agreement with the transformers path (its
    int8 activations round differently); Q4_0 -- 0.36 s, 95 tokens/s, but only 72% agreement (a second 4-bit rounding);
    Q4_K_M -- 0.47 s, 84 tokens/s, 85%; as-is Q4_1 -- 0.9 s, 64-77 tokens/s; F16 -- exact for Q4_1's values and
    99.7% agreement, at some decode speed. Q8_0 is the default: fast first tokens without changing the answers.
    """
    if weights == "as-is":
        return source
    if weights not in WEIGHT_TYPES:
        raise ModelError(f"model.fast_weights must be one of {', '.join(WEIGHT_TYPES)}, as-is (not {weights!r})")
    llama = import_llama_cpp()
    stat = source.stat()
    signature = {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "weights": weights}
    key = hashlib.sha1(json.dumps(signature).encode()).hexdigest()[:10]
    target = Path(cache_dir) / "llamacpp" / f"{source.stem}-{key}.{weights}.gguf"
    marker = target.with_suffix(".json")
    try:
        if target.is_file() and json.loads(marker.read_text()) == signature:
            return target
    except (OSError, ValueError):
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, WEIGHT_TYPES[weights])
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    started = time.perf_counter()
    try:
        if llama.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
            raise ModelError(f"llama.cpp could not re-encode {source} as {weights}")
        os.replace(tmp, target)
        marker.write_text(json.dumps(signature))
    finally:
        tmp.unlink(missing_ok=True)
    log.info("re-encoded %s as %s for llama.cpp in %.1f s (once)", source.name, weights, time.perf_counter() - started)
    return target


def base_gguf(settings: Settings) -> Path | None:
    """The GGUF behind the configured model, or None when it is a plain Hugging Face directory."""
    name = settings.model.name
    if name in PROFILES:
        return profile_gguf(PROFILES[name], settings.model_cache_dir)
    path = Path(name).expanduser()
    return path.resolve() if path.is_file() and path.suffix == ".gguf" else None


def load_fast_model(settings: Settings, model_dir: Path, title: str) -> LlamaCppModel | None:
    """The llama.cpp backend, or None (with a WARNING saying why) so the caller falls back to transformers."""
    fallback = "falling back to the transformers backend (slower)"
    try:
        import_llama_cpp()
    except (ImportError, OSError) as exc:
        log.warning(
            "llama.cpp backend unavailable: llama-cpp-python is not installed or failed to build/load (%s); %s. "
            "Install it with `make fast` (see README).", exc, fallback
        )
        return None
    gguf_path = base_gguf(settings)
    if gguf_path is None:
        log.warning("llama.cpp backend unavailable: model %r is not a GGUF file; %s", settings.model.name, fallback)
        return None
    try:
        fast = LlamaCppModel(
            serving_gguf(gguf_path, settings.model_cache_dir, settings.model.fast_weights),
            model_dir,
            title,
            threads=settings.model.threads,
            sessions=settings.model.fast_sessions,
            context_tokens=settings.model.fast_context,
            cache_dir=settings.model_cache_dir,
            source_gguf=gguf_path,
        )
    except Exception as exc:  # noqa: BLE001 - any failure of the optional fast path means: use the safe one
        log.warning("llama.cpp backend failed to start on %s (%s); %s", gguf_path, exc, fallback)
        return None
    adapter = settings.model.adapter
    if adapter and adapter != "none":
        try:
            fast.set_adapter(Path(adapter), version=Path(adapter).name)
        except UnsupportedAdapter as exc:
            log.warning("llama.cpp backend cannot serve adapter %s (%s); %s", adapter, exc, fallback)
            fast.close()
            return None
        except ModelError:
            fast.close()
            raise
    log.info("serving %s with llama.cpp: %d sessions x %d tokens", fast.description, fast.sessions, fast.context_tokens)
    return fast
