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
import logging
import os
import queue
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from chatapp.config import GenerationSettings, Settings
from chatapp.gguf_files import UnsupportedAdapter, base_gguf, import_llama_cpp, merge_peft_adapter, serving_gguf
from chatapp.model import ModelError, chat_template_ids

log = logging.getLogger(__name__)

SAMPLING_TOP_K = 50  # transformers' GenerationConfig default, applied by the transformers path too
PREFILL_TOKENS_PER_STEP = 512  # prompt tokens in a step when no answer is streaming: a lone prompt in one pass
PREFILL_TOKENS_WHILE_DECODING = 128  # ... and while answers stream, so they pause briefly for new prompts (see _step)
REUSE_MARGIN = 32  # prompt tokens a non-lowest session slot must save to be chosen (see LlamaCppModel._admit)


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

    continues_answers = True

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
            return chat_template_ids(self.tokenizer, messages)

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
