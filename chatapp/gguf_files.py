"""llama.cpp's files: the base GGUF re-encoded for serving, and PEFT LoRA adapters converted or merged into GGUF.

Why a module of its own: training stays on transformers + peft, serving runs GGUF in llama.cpp (chatapp.fastgen), and
the bridge between them is file conversion with caching, which neither the engine nor the trainer needs to know.
Every output is built into a temporary file and renamed, with a signature of what it was made from, so a retrained
adapter or another base model is converted again and a crash never leaves a file that looks done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from chatapp.config import Settings
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
# The serving file


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
