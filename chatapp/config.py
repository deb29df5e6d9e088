"""Settings: one plain dataclass tree, read from an optional TOML file and overridden by command-line flags.

Every part of the product takes the piece of `Settings` it needs; nothing reads the environment on its own
except through `Settings.load`, so a test can build any configuration in one line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ModelSettings:
    name: str = "smollm2"  # a profile name ("smollm2", "qwen-coder-0.5b"), a HF model directory or a .gguf file
    adapter: str | None = None  # a PEFT adapter directory; None = the registry's active adapter, "none" = base only
    backend: Literal["transformers", "llamacpp", "openai", "auto"] = "auto"
    threads: int = 0  # 0 = all cores
    languages: str = ""  # what the model answers in, "en,zh"; "" = its profile's (other models: English)
    # A second model for Chinese questions when this one writes only English (a profile, e.g. "qwen-coder-0.5b", a
    # .gguf file or a HF folder; "" = none): the tuned small model keeps English, the bilingual one answers Chinese.
    chinese_model: str = ""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto = what bench/generation.py measured faster here (fp32)
    fast_sessions: int = 20  # llama.cpp backend: chats decoded together (more wait for a free slot)
    fast_context: int = 4096  # llama.cpp backend: tokens of context per chat (KV cache = sessions x context)
    # llama.cpp backend: how the GGUF is re-encoded once (gguf_files.serving_gguf has the speed/fidelity figures)
    fast_weights: Literal["q4_0", "q4_k_m", "q8_0", "f16", "as-is"] = "q8_0"
    openai_base_url: str = "http://127.0.0.1:8080/v1"
    openai_model: str = "default"
    openai_api_key: str = ""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    # Greedy by default: a support answer should be the same for every customer who asks, and it is what the answer
    # correctness figures measure (sampling at 0.3 gave Qwen's Chinese answers invented return rules greedy did not).
    temperature: float = 0.0
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_input_chars: int = 4000  # longer user messages are truncated with a visible notice


@dataclass
class RetrievalSettings:
    knowledge_dir: Path = REPO_ROOT / "knowledge"
    embedder: Literal["minilm", "e5"] = "minilm"
    top_k: int = 4
    chunk_chars: int = 1200
    history_turns: int = 3  # how many recent user turns shape the search query
    approximate_above: int = 50_000  # vectors; above this an approximate index replaces exact search
    approximate_index: Literal["ivf", "hnsw"] = "ivf"  # ivf builds ~10x faster than hnsw on 2 cores
    # Handoff when the question's cosine to the closest FAQ question is below handoff_below (to the closest article
    # chunk: handoff_below_doc). None = the value calibrated for the embedder by `chatapp eval retrieval`.
    handoff_below: float | None = None
    handoff_below_doc: float | None = None
    curated_above: float = 1.0  # FAQ question cosine above which its curated answer is returned as-is (1.0 = never)
    # Fused score = dense cosine + bm25_weight x BM25 coverage of the query (0..1): BM25 only reorders candidates
    # whose cosines are within bm25_weight of each other (0 = dense alone). See chatapp/retrieval.py.
    bm25_weight: float = 0.03
    candidates: int = 100  # dense / BM25 top-N gathered before fusion when no entity narrows the search
    max_file_mb: float = 20.0  # larger knowledge files are skipped with a warning
    embed_threads: int = 0  # embedder CPU threads (0 = library default)


@dataclass
class PromptSettings:
    prompts_dir: Path = REPO_ROOT / "prompts"
    template: str = "support"  # active template name
    mode: Literal["zero_shot", "few_shot", "auto"] = "auto"  # auto = the template decides (its own `mode`)
    corrections_bank: str = "support"  # example bank for corrections when the template has no few-shot bank
    template_zh: str = "support_zh"  # used for a Chinese question when the model speaks Chinese ("" = never)


@dataclass
class TuningSettings:
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-4
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs decide
    batch_size: int = 4
    grad_accum: int = 2
    max_seq_len: int = 320  # longer examples are re-rendered with less history/context, else dropped
    replay_ratio: float = 0.5  # share of a re-tune's examples drawn from earlier training data
    seed_examples: int = 400
    faq_share: float = 0.4  # at most this share of seed examples are single-turn FAQ answers (they are terse)
    grounded: bool = True  # seed also includes chatapp/seed_data/grounded.jsonl (answers quoting their evidence)
    gate_margin: float = 0.02
    # --- added by the tuning package (chatapp/tuning/ documents each)
    lora_layers: int = 0  # LoRA only on the last N decoder layers (0 = all): backward stops below them, faster
    max_examples: int = 500  # cap on one run's training set (500 fits the 10-minute budget on 2 cores)
    warmup_steps: int = 5
    val_fraction: float = 0.1  # conversations (not examples) held out for validation, chosen by hash
    val_max: int = 16
    eval_every: int = 10  # optimizer steps between validation-loss checks (and checkpoints)
    patience: int = 3  # evaluations without improvement before early stopping
    warm_start: bool = True  # continue from the active adapter when compatible (replay keeps it from forgetting)
    use_retriever: bool = True  # add live retrieval hits to training examples, as at inference
    threads: int = 0  # 0 = the cores not already busy (load average), at most model.threads
    nice: int = 10  # background/periodic re-tunes run at this niceness
    seed: int = 0
    golden_file: Path | None = None  # None = chatapp/seed_data/golden.jsonl (held-out DSTC11 dev turns)
    golden_size: int = 16
    gate_questions: Path | None = None  # shop questions with key facts (shop_qa format); None = ../shared/data/shop_qa
    gate_question_tokens: int = 100  # answer length when the gate scores them
    replay_gate_size: int = 16
    gate_max_new_tokens: int = 60
    gate_batch_size: int = 8
    gate_behaviour_margin: float = 0.1  # allowed drop in stop rate / rise in degenerate answers
    max_new_refusals: float = 0.1  # share of golden items the reference answered and the candidate may refuse
    keep_runs: int = 3  # finished run folders kept under data_dir/tuning/runs


@dataclass
class AnswerSettings:
    """How an answer is grounded (chatapp/evidence.py) and checked (chatapp/guard.py)."""

    evidence_units: int = 3  # sentences/bullets quoted to the model, best first
    # A question in another language than the knowledge (Chinese to English articles) is matched on meaning alone,
    # less sharply: quote more units so the one that answers is among them.
    evidence_units_cross_lingual: int = 5
    evidence_per_chunk: int = 2  # at most this many from one retrieved chunk
    guard: bool = True  # replace answers whose amounts, durations, levels or offers the evidence does not support
    fallback_units: int = 2  # evidence units quoted when the guard replaces an answer (the top two hold the answer
    # to 95% of the English shop questions, the top one to 88%: bench/answers.py, extractive rows)
    # A model answer that declines ("I'm not sure, shall I get a person?") although evidence was quoted is replaced
    # by that evidence and the offer of a person (guard.StreamGuard hold_declines)
    quote_when_declined: bool = True


@dataclass
class UISettings:
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    allow_public: bool = False
    auth: list[tuple[str, str]] = field(default_factory=list)
    admins: list[str] = field(default_factory=list)  # with auth on, only these users edit prompts / promote adapters
    agents: list[str] = field(default_factory=list)  # staff console users who answer customers (admins can too)
    display_names: dict[str, str] = field(default_factory=dict)  # user -> the name customers see on agent replies
    # When a person can be asked: "" = always, else "09:00-17:00" (local time), optionally "mon-fri 09:00-17:00".
    support_hours: str = ""
    staff_session_s: float = 8 * 3600.0  # a staff login expires after this long
    agent_seen_s: float = 30.0  # an agent counts as signed in this long after their console last polled
    bot_name: str = "Ava"
    company: str = "Acme Outfitters"
    stream_every_s: float = 0.05  # screen updates while an answer streams at most this often (each re-sends the chat)
    # Per client address, on the customer endpoints (chatapp/ui/throttle.py): requests per second (0 = off), how many
    # at once before that rate applies, and how many live requests (one per open chat page) it may hold open.
    throttle_per_s: float = 5.0
    throttle_burst: int = 60
    throttle_live: int = 50


@dataclass
class FeedbackSettings:
    # Extra personal-data patterns redacted on export, by kind. A pattern with one group redacts only that group.
    redact_patterns: dict[str, str] = field(
        default_factory=lambda: {
            "order_id": r"(?i)\border\s*(?:id|number|no\.?|#)?\s*[:#]?\s*([A-Z]*-?\d[A-Z0-9-]{3,})\b",
        }
    )
    phone_regions: tuple[str, ...] = ("US", "GB")  # where numbers without a +country code are read from
    busy_timeout_s: float = 5.0  # how long a write waits for another process's lock before spilling to a file
    retry_every_s: float = 10.0  # how often spilled feedback is retried while the database is unavailable


@dataclass
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("CHATAPP_DATA_DIR", REPO_ROOT / "var")))
    # One database for conversations, feedback, inbox and shared state: "" = SQLite in data_dir (feedback_db), or
    # postgresql+psycopg://USER:PASS@HOST/DB for several replicas sharing it (chatapp/storage).
    database_url: str = field(default_factory=lambda: os.environ.get("CHATAPP_DATABASE_URL", ""))
    # Files every replica must see (adapter versions, prompt template versions): a folder all replicas mount.
    # None = the data directory (one replica).
    shared_dir: Path | None = field(default_factory=lambda: os.environ.get("CHATAPP_SHARED_DIR") or None)
    model: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)
    tuning: TuningSettings = field(default_factory=TuningSettings)
    answer: AnswerSettings = field(default_factory=AnswerSettings)
    ui: UISettings = field(default_factory=UISettings)
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()

    # Where each kind of runtime state lives; all under data_dir, never in the source tree.
    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def feedback_db(self) -> Path:
        return self.data_dir / "feedback.sqlite3"

    @property
    def database(self) -> str | Path:
        """What chatapp/storage opens: the configured URL, else the SQLite file in the data directory."""
        return self.database_url or self.feedback_db

    @property
    def shared(self) -> Path:
        """Where the files every replica shares live: ``shared_dir``, else the data directory."""
        return Path(self.shared_dir).expanduser() if self.shared_dir else self.data_dir

    @property
    def adapters_dir(self) -> Path:
        return self.shared / "adapters"

    @property
    def prompt_versions_dir(self) -> Path:
        """Where saved prompt versions were before the database (chatapp/prompts/versions.py imports them once)."""
        return self.shared / "prompt_versions"

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> "Settings":
        """Defaults, then the TOML file (``[model]``, ``[retrieval]``... sections; or a JSON `snapshot`), then
        dotted overrides."""
        settings = cls()
        if path is None and (default := Path(os.environ.get("CHATAPP_CONFIG", "chatapp.toml"))).is_file():
            path = default
        if path is not None:
            with open(path, "rb") as f:
                values = json.load(f) if str(path).endswith(".json") else tomllib.load(f)
            _apply(settings, values, str(path))
        for dotted, value in overrides.items():
            if value is not None:
                _set_dotted(settings, dotted, value)
        settings.data_dir = Path(settings.data_dir).expanduser()
        return settings

    def snapshot(self, exclude: tuple[str, ...] = ("ui",)) -> dict[str, Any]:
        """These settings as plain data, for a child process to load (`--config file.json`): it then runs with exactly
        what this one was started with, TOML file and command-line flags alike. The UI section (credentials) is left
        out by default."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in exclude}


def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: [{key}] must be a table")
            _apply(current, value, f"{where}[{key}]")
        else:
            setattr(obj, key, _coerce(current, value))


def _set_dotted(settings: "Settings", dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    obj: Any = settings
    for part in parents:
        obj = getattr(obj, part)
    if not hasattr(obj, leaf):
        raise ValueError(f"unknown setting {dotted!r}")
    setattr(obj, leaf, _coerce(getattr(obj, leaf), value))


def _coerce(current: Any, value: Any) -> Any:
    if isinstance(current, Path):
        return Path(value).expanduser()
    if isinstance(current, tuple):
        return tuple(value)
    if isinstance(current, bool) or current is None:
        return value
    if isinstance(current, (int, float)) and not isinstance(value, str):
        return type(current)(value)
    return value
