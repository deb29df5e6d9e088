"""Fast CPU generation: llama.cpp serves the GGUF with the PEFT adapter merged in, all sessions share one batch.

Why this exists: plain transformers `generate` decodes SmolLM2 at about a seventh of llama.cpp's speed on these CPUs
(issue 7). This backend keeps the app's `ChatModel` interface and the transformers tokenizer (so prompts are the same
token ids on both paths) but runs the network in llama.cpp:

- one llama.cpp context holds a KV stream per chat session (`n_seq_max`), and a scheduler thread decodes one token
  for every active session in the same `llama_decode` call, prefilling new prompts in the same batch (in chunks
  while others stream), so twenty people typing at once cost little more than one, no session waits for another's
  answer to end, and no streaming answer freezes while a new prompt is computed;
- a finished answer's keys/values stay in its slot, so a prompt that starts like an earlier one (the same system
  instructions, the same conversation's previous turn) computes only the part that differs;
- training stays on transformers + peft: `set_adapter(peft_dir)` merges the PEFT LoRA into the weights once (cached
  in the adapter folder, atomically; a few seconds) and loads that file beside the current one, with no restart;
  an answer finishes on the adapter it began with, even when a new one is promoted mid-answer;
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
    sooner to the chat's own streaming threads. libgomp reads the setting once, when it is loaded, so it is set only
    around this import; GOMP_SPINCOUNT or OMP_WAIT_POLICY exported by the user wins. A process has one libgomp (torch's
    copy has the same name: whichever loads first serves both), so if torch was loaded first the setting is not seen; and
    torch's OpenMP threads count against llama.cpp's (see chatapp.model.in_passing_thread).
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
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load and quantize chatter off
    return llama_cpp


LORA_FORMAT = 1  # bump when convert_peft_adapter's output changes, so cached .gguf adapters are rebuilt
SAMPLING_TOP_K = 50  # transformers' GenerationConfig default, applied by the transformers path too
PREFILL_TOKENS_PER_STEP = 512  # prompt tokens in a step when no answer is streaming: a lone prompt in one pass
PREFILL_TOKENS_WHILE_DECODING = 128  # ... and while answers stream, so they pause briefly for new prompts (see _step)
REUSE_MARGIN = 32  # prompt tokens a non-lowest session slot must save to be chosen (see LlamaCppModel._admit)


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


def _cached_for_adapter(
    adapter_dir: Path, name: str, signature: dict, fallback_dir: Path | None, build: Callable[[Path], None]
) -> Path:
    """`name` in the adapter folder (or `fallback_dir` if read-only), built by `build(path)` unless `signature` matches.

    Built into a temporary file and renamed, the signature written last: a crash never leaves a file that looks done.
    """
    folders = [adapter_dir] + ([Path(fallback_dir)] if fallback_dir is not None else [])
    for folder in folders:
        try:
            if json.loads((folder / name).with_suffix(".json").read_text()) == signature and (folder / name).is_file():
                return folder / name
        except (OSError, ValueError):
            pass
    for folder in folders:
        target = folder / name
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            build(tmp)
            os.replace(tmp, target)
            meta_tmp = tmp.with_suffix(".json")
            meta_tmp.write_text(json.dumps(signature))
            os.replace(meta_tmp, target.with_suffix(".json"))
            return target
        except PermissionError:
            log.info("adapter folder %s is read-only; caching %s elsewhere", folder, name)
        finally:
            tmp.unlink(missing_ok=True)
            tmp.with_suffix(".json").unlink(missing_ok=True)
    raise ModelError(f"adapter {adapter_dir}: nowhere writable to store its {name}")


def _check_adapter_folder(adapter_dir: Path) -> None:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"adapter {adapter_dir}: no adapter_config.json there (expected a PEFT adapter folder)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ModelError(f"adapter {adapter_dir}: no adapter_model.safetensors there (save it with safetensors)")


def _base_key(signature: dict) -> str:
    return hashlib.sha1(json.dumps(signature["base"]).encode()).hexdigest()[:8]


def convert_peft_adapter(adapter_dir: Path, base_gguf: Path, fallback_dir: Path | None = None) -> Path:
    """The GGUF LoRA for a PEFT LoRA folder (plain llama.cpp's `lora_path`), converted once and cached in that folder.

    llama.cpp computes W·x + scale·B·(A·x) with scale = alpha/rank from the GGUF; PEFT's per-module scaling (alpha/r,
    alpha/sqrt(r) for rsLoRA, alpha patterns) is folded into B instead and the GGUF alpha set to 0 (= scale 1), so
    every plain PEFT LoRA maps exactly. The serving path merges adapters instead (`merge_peft_adapter`, faster); this
    file is what other llama.cpp tools load, and what bench/generation.py compares against.
    """
    adapter_dir = Path(adapter_dir)
    _check_adapter_folder(adapter_dir)
    signature = _adapter_signature(adapter_dir, base_gguf)
    name = f"llamacpp-lora-{_base_key(signature)}.gguf"
    return _cached_for_adapter(adapter_dir, name, signature, fallback_dir,
                               lambda path: _write_lora_gguf(path, _lora_tensors_for_gguf(adapter_dir, base_gguf)))


def merge_peft_adapter(adapter_dir: Path, base_gguf: Path, weights: str, fallback_dir: Path | None = None) -> Path:
    """The base GGUF with a PEFT LoRA merged into its weights and encoded as `weights`; built once, cached like above.

    Why merge: llama.cpp applies a runtime LoRA as extra small matrix products per layer (and a thread barrier each);
    measured on 2 cores with the tuning defaults (r=8, q/k/v/o): a 200-token prompt 0.39 -> 0.44 s and decoding
    100 -> 89 tokens/s. Merged weights cost nothing at run time. Each weight gets W + B·A in float32 (on the source
    GGUF's dequantized values, what the transformers path trains and answers on), then one encoding, as for the base.
    """
    adapter_dir = Path(adapter_dir)
    _check_adapter_folder(adapter_dir)
    signature = {**_adapter_signature(adapter_dir, base_gguf), "weights": weights}
    name = f"llamacpp-merged-{_base_key(signature)}.{weights}.gguf"
    return _cached_for_adapter(adapter_dir, name, signature, fallback_dir,
                               lambda path: _write_merged_gguf(path, adapter_dir, base_gguf, weights))


def _lora_tensors_for_gguf(adapter_dir: Path, base_gguf: Path, reader=None) -> dict:
    """GGUF tensor name -> float32 array: PEFT's A and B matrices, renamed, scaled and laid out as llama.cpp expects.

    `reader`: the base's `gguf.GGUFReader` when the caller has one (reading SmolLM2's 49k-token vocabulary takes ~4 s).
    """
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

    reader = reader or gguf.GGUFReader(str(base_gguf))
    arch_name = str(reader.fields["general.architecture"].contents())
    hparam = lambda key: int(reader.fields[f"{arch_name}.{key}"].contents())  # noqa: E731
    n_head, n_head_kv = hparam("attention.head_count"), hparam("attention.head_count_kv")
    base_shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}  # GGUF order: (in, out)
    arch = {arch_str: arch_id for arch_id, arch_str in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise UnsupportedAdapter(f"gguf-py does not know the architecture {arch_name!r} of {base_gguf.name}")
    tensor_names = gguf.get_tensor_name_map(arch, hparam("block_count"))

    pairs: dict[str, dict[str, np.ndarray]] = {}
    try:
        saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise ModelError(f"adapter {adapter_dir}: adapter_model.safetensors is unreadable ({exc})") from exc
    for key, value in saved.items():
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


def _write_lora_gguf(target: Path, lora: dict) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(target), lora["arch"])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0 = scale 1: PEFT's scaling is already inside B
    for name, array in lora["tensors"].items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("converted the PEFT adapter in %s for llama.cpp: %s", target.parent, target.name)


def _write_merged_gguf(target: Path, adapter_dir: Path, base_gguf: Path, weights: str) -> None:
    """Copy the base GGUF with W + B·A in float32 for every adapted weight, then encode it like `serving_gguf` does."""
    import gguf
    from gguf.quants import dequantize

    started = time.perf_counter()
    reader = gguf.GGUFReader(str(base_gguf))
    lora = _lora_tensors_for_gguf(adapter_dir, base_gguf, reader)
    merged = target.with_name(target.name + ".f32")
    try:
        writer = gguf.GGUFWriter(str(merged), lora["arch"])
        for meta in reader.fields.values():  # as gguf's own gguf_new_metadata.py copies them
            if meta.name == gguf.Keys.General.ARCHITECTURE or meta.name.startswith("GGUF."):
                continue
            value_type = meta.types[0]
            sub_type = meta.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(meta.name, meta.contents(), value_type, sub_type=sub_type)
        for tensor in reader.tensors:
            lora_a = lora["tensors"].get(tensor.name + ".lora_a")
            if lora_a is None:  # untouched: the source bytes, re-encoded below exactly like the base model's
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            else:
                weight = dequantize(tensor.data, tensor.tensor_type).astype("float32")  # (out, in)
                writer.add_tensor(tensor.name, weight + lora["tensors"][tensor.name + ".lora_b"] @ lora_a)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        source_type = int(reader.fields["general.file_type"].contents()) if "general.file_type" in reader.fields else 0
        _llama_encode(merged, target, weights, source_type)
    finally:
        merged.unlink(missing_ok=True)
    log.info("merged the PEFT adapter in %s into %s in %.1f s", target.parent, base_gguf.name, time.perf_counter() - started)


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
class _Engine:
    """One weights file in llama.cpp: its model, a context with a KV stream per chat session, and a batch buffer.

    An adapter is merged into its own weights file, so each served adapter is an engine; the previous one stays open
    only until the answers begun on it have ended.
    """

    version: str | None  # adapter merged into these weights; None = the base model
    path: Path
    model: int
    ctx: int
    memory: int
    vocab: int  # belongs to `model`: freed with it
    batch: object
    free_seqs: list[int]
    cached: list[list[int]]  # per session slot: the tokens whose keys/values its KV stream still holds


@dataclass(eq=False)
class _Request:
    """One answer in flight; the scheduler owns every field but `cancelled` (set by the consumer) and `out`."""

    prompt: list[int]
    gen: GenerationSettings
    stop: threading.Event | None
    engine: _Engine
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class LlamaCppModel:
    """`ChatModel` on llama.cpp: one context, one KV stream per session, one scheduler thread batching all of them.

    A finished answer leaves its keys/values in its session slot, and a new prompt is computed only from where it
    differs from its slot's tokens: every prompt of a template starts with the same system message, and a repeated
    question (or a client that resends the whole conversation) shares much more.
    """

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
        weights: str = "as-is",
        reuse_prefix: bool = True,
    ):
        llama = import_llama_cpp()
        self.llama = llama
        self.base_path = Path(gguf_path)
        self.source_gguf = Path(source_gguf or gguf_path)  # what adapters are merged into (names, shapes)
        self.weights = weights  # how gguf_path is encoded from source_gguf; merged adapters are encoded the same way
        self.model_dir = Path(tokenizer_dir)  # the base model's cached copy: its hash says which adapters fit
        self.title = title
        self.cache_dir = cache_dir  # for adapters merged from read-only folders
        self.reuse_prefix = reuse_prefix
        self.prompt_tokens = 0  # prompt tokens admitted so far ...
        self.reused_tokens = 0  # ... of which were already in a session slot's KV stream (not computed again)

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self._tokenizer_lock = threading.Lock()

        llama.llama_backend_init()
        self.sessions = max(1, sessions)
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        self.context_tokens = context_tokens
        self._engine = self._open_engine(self.base_path, None)  # what new answers start on
        self._engines = [self._engine]  # plus engines still finishing answers begun before a swap
        self.n_vocab = llama.llama_vocab_n_tokens(self._engine.vocab)
        self._piece = ctypes.create_string_buffer(256)

        self._cond = threading.Condition()
        self._pending: collections.deque[_Request] = collections.deque()
        self._active: list[_Request] = []
        self._calls: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()
        self._turn = 0
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="llamacpp-scheduler", daemon=True)
        self._thread.start()

    def _open_engine(self, path: Path, version: str | None) -> _Engine:
        llama = self.llama
        model = llama.llama_model_load_from_file(str(path).encode(), llama.llama_model_default_params())
        if not model:
            raise ModelError(f"llama.cpp cannot load {path}")
        trained = llama.llama_model_n_ctx_train(model)
        params = llama.llama_context_default_params()
        params.n_seq_max = self.sessions
        params.n_ctx = max(256, min(self.context_tokens, trained)) * self.sessions
        params.kv_unified = False  # each session its own KV stream: attention never scans other sessions' tokens
        params.n_batch = PREFILL_TOKENS_PER_STEP + self.sessions
        params.n_ubatch = min(512, params.n_batch)
        params.n_threads = params.n_threads_batch = self.threads
        # Flash attention off: llama.cpp's CPU kernel for it decoded this model at 40-48 tokens/s against 64-77 without
        # (200-token prompt, 2 threads, bench/generation.py's prompt).
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        ctx = llama.llama_init_from_model(model, params)
        if not ctx:
            llama.llama_model_free(model)
            raise ModelError(f"llama.cpp cannot create a context for {path} ({self.sessions} sessions)")
        self.context_tokens = llama.llama_n_ctx_seq(ctx)
        return _Engine(version, Path(path), model, ctx, llama.llama_get_memory(ctx), llama.llama_model_get_vocab(model),
                       llama.llama_batch_init(params.n_batch, 0, 1), list(range(self.sessions)),
                       [[] for _ in range(self.sessions)])

    def _close_engine(self, engine: _Engine) -> None:
        self.llama.llama_batch_free(engine.batch)
        self.llama.llama_free(engine.ctx)
        self.llama.llama_model_free(engine.model)

    # ---------------------------------------------------------------------------------------------------- interface

    @property
    def adapter_version(self) -> str | None:
        return self._engine.version

    @property
    def gguf_path(self) -> Path:
        """The weights file new answers are computed with (the base, or the base with the adapter merged in)."""
        return self._engine.path

    @property
    def description(self) -> str:
        adapter = f"adapter {self.adapter_version}" if self.adapter_version else "no adapter"
        weights = self.source_gguf.name if self.weights == "as-is" else f"{self.source_gguf.name} as {self.weights}"
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
        """Serve a PEFT adapter merged into the weights (built once, cached in its folder) or none.

        The new weights are loaded beside the current ones (the caller's thread; answers keep streaming); answers in
        flight finish on the weights they began with.
        """
        if path is None:
            target, version = self.base_path, None
        else:
            path = Path(path)
            version = version or path.name
            target = merge_peft_adapter(path, self.source_gguf, self.weights, self._fallback_adapter_dir(path))
        if (target, version) == (self._engine.path, self._engine.version):
            return
        engine = self._open_engine(target, version)
        with self._cond:
            self._engine = engine
            self._engines.append(engine)
            self._cond.notify()

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
            request = _Request(prompt, gen, stop, self._engine)
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

    def idle(self) -> bool:
        """No answer running or waiting, and every session slot free (what a leak would break)."""
        with self._cond:
            return (not self._active and not self._pending
                    and all(len(e.free_seqs) == self.sessions for e in self._engines))

    def close(self) -> None:
        """Stop the scheduler (answers in flight end) and free llama.cpp's memory."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        for engine in self._engines:
            self._close_engine(engine)
        self._engines.clear()

    def _fallback_adapter_dir(self, adapter_dir: Path) -> Path | None:
        """Where a merged adapter goes when its own folder is read-only."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / "lora-gguf" / hashlib.sha1(str(adapter_dir.resolve()).encode()).hexdigest()[:12]

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
                waiting = collections.deque()
                while self._pending:
                    request = self._pending.popleft()
                    if self._should_end(request):
                        request.out.put(_FINISHED)
                    elif request.engine.free_seqs:
                        self._admit(request)
                    else:
                        waiting.append(request)
                self._pending = waiting
                retired = [e for e in self._engines if e is not self._engine and len(e.free_seqs) == self.sessions
                           and not any(r.engine is e for r in self._pending)]
                self._engines = [e for e in self._engines if e not in retired]
            for engine in retired:
                self._close_engine(engine)
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

    def _admit(self, request: _Request) -> None:
        """Give the request a free session slot: the lowest id, unless another slot's cached tokens share a start with
        the prompt that is REUSE_MARGIN tokens longer (a conversation's previous turn, the same question again)."""
        engine = request.engine
        shared = {seq: _common_prefix(engine.cached[seq], request.prompt) if self.reuse_prefix else 0
                  for seq in engine.free_seqs}
        best = max(shared.values())
        seq = min(s for s, n in shared.items() if n >= best - REUSE_MARGIN)
        engine.free_seqs.remove(seq)
        keep = min(shared[seq], len(request.prompt) - 1)  # the last prompt token is always computed: its logits
        if not self.llama.llama_memory_seq_rm(engine.memory, seq, keep, -1):
            self.llama.llama_memory_seq_rm(engine.memory, seq, -1, -1)
            keep = 0
        engine.cached[seq] = []  # until the answer ends, the slot's contents are in flux
        request.seq, request.n_past = seq, keep
        self.prompt_tokens += len(request.prompt)
        self.reused_tokens += keep
        self._active.append(request)

    def _should_end(self, request: _Request) -> bool:
        return request.cancelled or (request.stop is not None and request.stop.is_set())

    def _step(self) -> None:
        for request in [r for r in self._active if self._should_end(r)]:
            self._finish(request)
        if not self._active:
            return
        # One weights file per llama_decode: while answers on the previous adapter are still running, engines take turns.
        groups: dict[int, list[_Request]] = {}
        for request in self._active:
            groups.setdefault(id(request.engine), []).append(request)
        group = list(groups.values())[self._turn % len(groups)]
        self._turn += 1
        engine = group[0].engine
        batch, count = engine.batch, 0

        def add(token: int, pos: int, seq: int, wants_logits: bool) -> None:
            nonlocal count
            batch.token[count], batch.pos[count], batch.n_seq_id[count] = token, pos, 1
            batch.seq_id[count][0], batch.logits[count] = seq, wants_logits
            count += 1

        # Chunked prefill while answers stream. Measured (20 chatting sessions, 200-token prompts, 2 cores): a budget
        # of 512 tokens per step: first token p95 2.1 s, longest pause in a streaming answer 1.28 s (11 of 60 answers
        # paused > 1 s); 128: p95 1.8 s, longest pause 0.42 s; 64: p95 3.0 s (too many decode passes per prompt).
        # The price is paid by bursts: 20 prompts at the same instant, p95 8.8 -> 9.8 s (longest pause 1.18 -> 0.36 s).
        sampling: list[_Request] = []
        streaming = any(request.next_token >= 0 for request in group)
        budget = PREFILL_TOKENS_WHILE_DECODING if streaming else PREFILL_TOKENS_PER_STEP
        chunks: dict[_Request, int] = {}  # prefilling request -> prompt tokens it gets this step
        for request in group:  # prefilling, oldest first, so a burst of new prompts is served in arrival order
            if request.next_token < 0 and budget > 0:
                chunks[request] = min(budget, len(request.prompt) - request.n_past)
                budget -= chunks[request]
        # llama.cpp computes a batch over per-session KV streams in one pass only for runs of consecutive, increasing
        # session ids (llama_batch_allocr::split_equal); any other order costs one pass per session. So: entries in
        # session order, and new prompts get the lowest free ids (_admit) to keep the running sessions consecutive.
        # Measured (2 cores, 64 tokens each): 20 sessions decoding 217 ms per step in arrival order.
        for request in sorted(group, key=lambda r: r.seq):
            if request.next_token >= 0:  # decoding: feed the last sampled token
                request.output_index = count
                add(request.next_token, request.n_past, request.seq, True)
                request.n_past += 1
                sampling.append(request)
            elif request in chunks:
                for i, token in enumerate(request.prompt[request.n_past : request.n_past + chunks[request]]):
                    last = request.n_past + i == len(request.prompt) - 1
                    if last:
                        request.output_index = count
                        sampling.append(request)
                    add(token, request.n_past + i, request.seq, last)
                request.n_past += chunks[request]
        batch.n_tokens = count
        code = self.llama.llama_decode(engine.ctx, batch)
        if code != 0:
            raise ModelError(f"llama_decode returned {code}")
        for request in sampling:
            if request.sampler is None:
                request.sampler = self._make_sampler(request)
            token = self.llama.llama_sampler_sample(request.sampler, engine.ctx, request.output_index)
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

    def _token_bytes(self, vocab: int, token: int) -> bytes:
        size = self.llama.llama_token_to_piece(vocab, token, self._piece, len(self._piece), 0, False)
        if size < 0:
            self._piece = ctypes.create_string_buffer(-size)
            size = self.llama.llama_token_to_piece(vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:size]

    def _emit(self, request: _Request, token: int) -> None:
        if self.llama.llama_vocab_is_eog(request.engine.vocab, token):
            self._finish(request)
            return
        request.generated.append(token)
        request.next_token = token
        if piece := request.text.decode(self._token_bytes(request.engine.vocab, token)):
            request.out.put(piece)
        room = self.context_tokens - 1 - request.n_past
        if (
            len(request.generated) >= request.gen.max_new_tokens
            or room <= 0
            or _looping(request.prompt[-24:] + request.generated[-24:])
        ):
            self._finish(request)

    def _finish(self, request: _Request, error: BaseException | None = None) -> None:
        """End an answer: flush its text, free its sampler, hand its session slot (keys/values kept) to the next prompt."""
        if request in self._active:
            self._active.remove(request)
        if request.seq >= 0:
            engine = request.engine
            if error is None:
                engine.cached[request.seq] = (request.prompt + request.generated)[: request.n_past]
            else:  # the batch failed half-way: what the stream holds is unknown
                self.llama.llama_memory_seq_rm(engine.memory, request.seq, -1, -1)
            with self._cond:
                engine.free_seqs.append(request.seq)
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

    Why: llama.cpp has no fast CPU matrix kernels for Q4_1, so the package's Q4_1 SmolLM2 computes prompts slowly.
    Measured here (2 cores, 200-token prompt, no adapter, same process, 2026-11-23): as-is Q4_1 -- first token
    0.72 s, 101 tokens/s; Q8_0 -- 0.40 s, 90 tokens/s, 95.5% teacher-forced top-1 agreement with the transformers path
    (int8 activations round differently); Q4_0 -- 0.30 s, 126 tokens/s, but only 72% agreement (a second 4-bit
    rounding); Q4_K_M -- 0.42 s, 106 tokens/s, 85%; F16 -- 0.39 s, 54 tokens/s, ~100% agreement. Q8_0 is the default:
    fast first tokens without changing the answers. A merged adapter is encoded the same way (merge_peft_adapter).
    """
    if weights == "as-is":
        return source
    if weights not in WEIGHT_TYPES:
        raise ModelError(f"model.fast_weights must be one of {', '.join(WEIGHT_TYPES)}, as-is (not {weights!r})")
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
    started = time.perf_counter()
    try:
        _llama_encode(source, tmp, weights)
        os.replace(tmp, target)
        marker.write_text(json.dumps(signature))
    finally:
        tmp.unlink(missing_ok=True)
    log.info("re-encoded %s as %s for llama.cpp in %.1f s (once)", source.name, weights, time.perf_counter() - started)
    return target


def _llama_encode(source: Path, target: Path, weights: str, source_type: int = 0) -> None:
    """llama.cpp's own quantizer (the one `llama-quantize` runs); "as-is" keeps the source GGUF's type, `source_type`."""
    llama = import_llama_cpp()
    params = llama.llama_model_quantize_default_params()
    params.ftype = source_type if weights == "as-is" else getattr(llama, WEIGHT_TYPES[weights])
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    if llama.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise ModelError(f"llama.cpp could not re-encode {source} as {weights}")


def base_gguf(settings: Settings) -> Path | None:
    """The GGUF behind the configured model, or None when it is a plain Hugging Face directory."""
    name = settings.model.name
    if name in PROFILES:
        return profile_gguf(PROFILES[name], settings.model_cache_dir)
    path = Path(name).expanduser()
    return path.resolve() if path.is_file() and path.suffix == ".gguf" else None


def premerge_adapter(settings: Settings, adapter_dir: Path) -> Path | None:
    """Merge a just-promoted adapter for the llama.cpp backend now, so the running app swaps to it without a chat
    waiting the few seconds the merge takes. Best effort: None when the fast path is not in use or cannot merge it."""
    if settings.model.backend not in ("llamacpp", "auto") or (gguf_path := base_gguf(settings)) is None:
        return None
    try:
        import_llama_cpp()
        return merge_peft_adapter(Path(adapter_dir), gguf_path, settings.model.fast_weights)
    except Exception as exc:  # noqa: BLE001 - the app merges (or falls back) itself when it swaps
        log.info("adapter %s not merged ahead for llama.cpp (%s); the app will do it when it swaps", adapter_dir, exc)
        return None


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
            weights=settings.model.fast_weights,
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
