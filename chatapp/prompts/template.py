"""Template text -> a checked Template: parsing, validation with line/column positions, and the public types.

Why: templates are data, never code. They are rendered by langchain-core with plain f-string substitution (which
already refuses `{x.attr}` and `{x[0]}`); the validator here also refuses conversions and format specs, so a
template can neither reach Python objects nor ask for a gigabyte of padding. Every problem carries its position, so
the editor and the CLI can point at it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from langchain_core.prompts import ChatPromptTemplate

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # template and bank names: no dots, no slashes
IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MODES = ("zero_shot", "few_shot", "auto")
SELECTIONS = ("fixed", "similarity", "mmr")
COMPUTED_VARIABLES = ("question", "context", "history")  # filled by the renderer, never by the template
BUILTIN_VARIABLES = (*COMPUTED_VARIABLES, "bot_name", "company", "date")
CONTEXT_ITEM_VARIABLES = ("n", "title", "text", "source", "entity", "score")
GENERATION_LIMITS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "max_new_tokens": (1, 4096),
                     "repetition_penalty": (0.5, 2.0)}
TOP_LEVEL_FIELDS = ("name", "description", "mode", "system", "user", "answer_start", "variables", "context", "history",
                    "few_shot", "generation")
ROLE_OF = {"system": "system", "human": "user", "ai": "assistant"}



# --------------------------------------------------------------------------------------------------------------------
# Public types


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a template, with where it is (1-based) so an editor can point at it."""

    line: int
    column: int
    message: str
    severity: str = "error"  # "error" blocks saving; "warning" is shown but allowed

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.severity}: {self.message}"


class PromptError(ValueError):
    """A template, bank or name is unusable; `problems` says where, when known."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        self.problems = problems or []
        if self.problems:
            message += "\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


class VersionConflict(PromptError):
    """Someone saved a newer version since the editor loaded `base_version`; nothing was written."""

    def __init__(self, name: str, base_version: int, latest: int):
        self.name, self.base_version, self.latest = name, base_version, latest
        super().__init__(
            f"template {name!r} changed while you were editing: you started from version {base_version}, "
            f"the latest is version {latest}. Your text was not saved; reload, merge and save again."
        )


@dataclass
class Rendered:
    messages: list[dict]  # chat messages (system/user/assistant) ready for the model's chat template
    template: str
    version: int
    mode: str  # the mode actually used ("zero_shot" | "few_shot")
    examples: list[dict]  # few-shot examples chosen
    generation: dict  # the template's generation overrides (temperature, max_new_tokens...), possibly empty
    answer_start: str = ""  # the words the answer begins with (the model continues them), "" = none


@dataclass
class FewShot:
    bank: str
    k: int = 2
    selection: str = "similarity"
    fetch_k: int = 8  # MMR candidates
    min_similarity: float = 0.45  # auto mode picks few-shot only when an example is at least this similar
    context_chars: int = 300  # an example's context is cut to this many characters
    example_user: str | None = None  # how an example's user turn is written; None = the template's `user`


@dataclass
class Template:
    name: str
    system: str
    user: str
    description: str = ""
    mode: str = "auto"
    variables: dict[str, str] = field(default_factory=dict)
    context_item: str = "- {title}: {text}"
    context_max_chars: int = 1200
    context_empty: str = "(no matching information found)"
    history_turns: int = 4  # messages (user and assistant each count one)
    history_max_chars: int = 600
    few_shot: FewShot | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    # Words the answer starts with, given to the model as the start of its own turn. A small model answering a
    # Chinese question from English evidence otherwise copies the English; starting its turn in Chinese keeps it there.
    answer_start: str = ""
    version: int = 0
    text: str = ""

    @property
    def history_inline(self) -> bool:
        """A template that writes {history} itself gets no separate history messages (no duplication)."""
        return any(name == "history" for text in (self.system, self.user) for name, _ in _scan(text)[0])


# --------------------------------------------------------------------------------------------------------------------
# Validation: the template text -> (Template | None, problems with positions)


def _scan(text: str) -> tuple[list[tuple[str, int]], list[tuple[int, str]]]:
    """Placeholders `{name}` with their offsets, and syntax errors with theirs. Stricter than str.format: only
    plain identifiers are accepted, and `{{`/`}}` are the only way to write a literal brace."""
    fields: list[tuple[str, int]] = []
    errors: list[tuple[int, str]] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "{":
            if text.startswith("{{", i):
                i += 2
                continue
            close, reopen = text.find("}", i + 1), text.find("{", i + 1)
            if close == -1:
                errors.append((i, "unclosed '{' (write '{{' for a literal brace)"))
                break
            if reopen != -1 and reopen < close:
                errors.append((i, "'{' inside a placeholder (write '{{' for a literal brace)"))
                i = reopen
                continue
            inner = text[i + 1 : close]
            if IDENT_RE.fullmatch(inner):
                fields.append((inner, i))
            elif not inner.strip():
                errors.append((i, "empty placeholder '{}': name the variable, e.g. {question}"))
            else:
                errors.append((i, f"'{{{inner}}}' is not allowed: only plain {{name}} placeholders (no attribute "
                                  "access, indexing, conversions or format specs)"))
            i = close + 1
        elif char == "}":
            if text.startswith("}}", i):
                i += 2
                continue
            errors.append((i, "single '}' (write '}}' for a literal brace)"))
            i += 1
        else:
            i += 1
    return fields, errors


class _Locator:
    """Maps an offset inside a YAML scalar back to a line/column in the file."""

    def __init__(self, source: str):
        self.lines = source.splitlines()

    def position(self, node: yaml.Node | None, offset: int = 0, value: str = "") -> tuple[int, int]:
        if node is None:
            return 1, 1
        line, col = node.start_mark.line, node.start_mark.column
        before = value[:offset]
        row, col_in_row = before.count("\n"), len(before) - (before.rfind("\n") + 1)
        style = getattr(node, "style", None)
        if style in ("|", ">"):  # block scalar: content starts on the next line, at the block's indentation
            first = line + 1
            while first < len(self.lines) and not self.lines[first].strip():
                first += 1
            indent = len(self.lines[first]) - len(self.lines[first].lstrip(" ")) if first < len(self.lines) else 0
            if style == "|":
                return line + 2 + row, indent + col_in_row + 1
            return first + 1, indent + 1
        if row == 0:  # plain or quoted, on the first line of the value
            return line + 1, col + (1 if style in ("'", '"') else 0) + col_in_row + 1
        return line + 1 + row, col_in_row + 1  # multi-line flow scalar: best effort


def _mapping(node: yaml.Node | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}


def parse_template(
    text: str, name: str | None = None, bank_exists=lambda bank: True
) -> tuple[Template | None, list[Problem]]:
    """Check a template's text; return it parsed when it has no errors (warnings allowed), and every problem."""
    problems: list[Problem] = []

    def add(node: yaml.Node | None, message: str, offset: int = 0, value: str = "", severity: str = "error"):
        line, col = locate.position(node, offset, value)
        problems.append(Problem(line, col, message, severity))

    locate = _Locator(text)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        what = " ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return None, [Problem(line, col, f"YAML syntax error: {what or exc}")]
    if not isinstance(data, dict):
        return None, [Problem(1, 1, "a template is a YAML mapping with at least `system:` and `user:`")]
    nodes = _mapping(root)

    def node_of(*path: str) -> yaml.Node | None:
        current: dict = nodes
        found = None
        for part in path:
            if part not in current:
                return found
            key, found = current[part]
            current = _mapping(found)
        return found

    for key in data:
        if key not in TOP_LEVEL_FIELDS:
            add(nodes[key][0] if key in nodes else None,
                f"unknown field {key!r} (known: {', '.join(TOP_LEVEL_FIELDS)})")

    def section(key: str) -> dict:
        value = data.get(key) or {}
        if not isinstance(value, dict):
            add(node_of(key), f"`{key}` must be a mapping")
            return {}
        return value

    def text_field(container: dict, path: tuple[str, ...], required: bool) -> str:
        value = container.get(path[-1])
        if value is None:
            if required:
                add(node_of(*path[:-1]) if len(path) > 1 else None, f"missing required field `{'.'.join(path)}`")
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            add(node_of(*path), f"`{'.'.join(path)}` must be a non-empty text")
            return ""
        return value

    def number(container: dict, path: tuple[str, ...], default, low, high, kind=int):
        value = container.get(path[-1], default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            add(node_of(*path), f"`{'.'.join(path)}` must be {'an integer' if kind is int else 'a number'}")
            return default
        if not low <= value <= high:
            add(node_of(*path), f"`{'.'.join(path)}` must be between {low} and {high}, not {value}")
            return default
        return kind(value)

    # name, description, mode
    file_name = data.get("name")
    if file_name is not None and (not isinstance(file_name, str) or not NAME_RE.fullmatch(file_name)):
        add(node_of("name"), "`name` must be letters, digits, '_' or '-' (at most 64, no dots or slashes)")
    elif name is not None and file_name is not None and file_name != name:
        add(node_of("name"), f"`name` says {file_name!r} but the template is being saved as {name!r}")
    mode = data.get("mode", "auto")
    if mode not in MODES:
        add(node_of("mode"), f"`mode` must be one of {', '.join(MODES)}, not {mode!r}")
        mode = "auto"

    # custom variables
    variables: dict[str, str] = {}
    for key, value in section("variables").items():
        if not isinstance(key, str) or not IDENT_RE.fullmatch(key):
            add(node_of("variables"), f"variable name {key!r} must be an identifier")
        elif key in COMPUTED_VARIABLES:
            add(node_of("variables", key), f"`{key}` is filled in by the renderer and cannot be set here")
        elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
            add(node_of("variables", key), f"variable `{key}` must be a text or a number")
        else:
            variables[key] = str(value)
    known = set(BUILTIN_VARIABLES) | set(variables)

    def check_placeholders(value: str, path: tuple[str, ...], allowed: set[str]) -> set[str]:
        node = node_of(*path)
        fields, errors = _scan(value)
        for offset, message in errors:
            add(node, message, offset, value)
        for var, offset in fields:
            if var not in allowed:
                add(node, f"unknown variable {{{var}}} (known: {', '.join(sorted(allowed))})", offset, value)
        return {var for var, _ in fields}

    system = text_field(data, ("system",), True)
    user = text_field(data, ("user",), True)
    used = check_placeholders(system, ("system",), known) | (user_vars := check_placeholders(user, ("user",), known))
    if user and "question" not in user_vars:
        add(node_of("user"), "missing variable {question}: the customer's message would never reach the model")
    answer_start = text_field(data, ("answer_start",), False).strip()
    check_placeholders(answer_start, ("answer_start",), set())
    if len(answer_start) > 200:
        add(node_of("answer_start"), "`answer_start` is the first few words of the answer: at most 200 characters")
    if system and user and "context" not in used:
        add(node_of("user"), "missing variable {context}: retrieved knowledge would not be shown",
            severity="warning")

    context = section("context")
    for key in context:
        if key not in ("item", "max_chars", "empty"):
            add(node_of("context", key), f"unknown field `context.{key}` (known: item, max_chars, empty)")
    context_item = text_field(context, ("context", "item"), False) or Template.context_item
    check_placeholders(context_item, ("context", "item"), set(CONTEXT_ITEM_VARIABLES))
    context_empty = text_field(context, ("context", "empty"), False) or Template.context_empty
    check_placeholders(context_empty, ("context", "empty"), set())
    context_max = number(context, ("context", "max_chars"), Template.context_max_chars, 0, 20_000)

    history = section("history")
    for key in history:
        if key not in ("turns", "max_chars"):
            add(node_of("history", key), f"unknown field `history.{key}` (known: turns, max_chars)")
    history_turns = number(history, ("history", "turns"), Template.history_turns, 0, 50)
    history_max = number(history, ("history", "max_chars"), Template.history_max_chars, 0, 20_000)

    few_shot = None
    fs = section("few_shot")
    if fs:
        allowed_fs = {f.name for f in dataclasses.fields(FewShot)}
        for key in fs:
            if key not in allowed_fs:
                add(node_of("few_shot", key), f"unknown field `few_shot.{key}` (known: {', '.join(sorted(allowed_fs))})")
        bank = fs.get("bank")
        if not isinstance(bank, str) or not NAME_RE.fullmatch(bank):
            add(node_of("few_shot", "bank") or node_of("few_shot"),
                "`few_shot.bank` must name an example bank (letters, digits, '_' or '-', no path)")
        elif not bank_exists(bank):
            add(node_of("few_shot", "bank"), f"unknown example bank {bank!r} (no prompts/examples/{bank}.jsonl)")
        selection = fs.get("selection", "similarity")
        if selection not in SELECTIONS:
            add(node_of("few_shot", "selection"), f"`few_shot.selection` must be one of {', '.join(SELECTIONS)}")
            selection = "fixed"
        example_user = text_field(fs, ("few_shot", "example_user"), False) or None
        if example_user:
            ex_vars = check_placeholders(example_user, ("few_shot", "example_user"), known - {"history"})
            if "question" not in ex_vars:
                add(node_of("few_shot", "example_user"), "missing variable {question} in `few_shot.example_user`")
        few_shot = FewShot(
            bank=bank if isinstance(bank, str) else "",
            k=number(fs, ("few_shot", "k"), 2, 0, 8),
            selection=selection,
            fetch_k=number(fs, ("few_shot", "fetch_k"), 8, 1, 100),
            min_similarity=number(fs, ("few_shot", "min_similarity"), 0.45, -1.0, 1.0, float),
            context_chars=number(fs, ("few_shot", "context_chars"), 300, 0, 5000),
            example_user=example_user,
        )
    elif mode == "few_shot":
        add(node_of("mode"), "`mode: few_shot` needs a `few_shot:` section with an example bank")

    generation: dict[str, Any] = {}
    for key, value in section("generation").items():
        if key not in GENERATION_LIMITS:
            add(node_of("generation", key),
                f"unknown generation setting {key!r} (known: {', '.join(GENERATION_LIMITS)})")
            continue
        low, high = GENERATION_LIMITS[key]
        generation[key] = number({key: value}, ("generation", key), None, low, high,
                                 int if key == "max_new_tokens" else float)
    generation = {k: v for k, v in generation.items() if v is not None}

    if not any(p.severity == "error" for p in problems):  # the library's own check, as a last line of defence
        try:
            ChatPromptTemplate.from_messages([("system", system), ("human", user)], template_format="f-string")
        except (ValueError, KeyError) as exc:
            add(None, f"template rejected: {exc}")

    problems.sort(key=lambda p: (p.line, p.column))
    if any(p.severity == "error" for p in problems):
        return None, problems
    template = Template(
        name=file_name or name or "", system=system, user=user, description=str(data.get("description") or ""),
        mode=mode, variables=variables, context_item=context_item, context_max_chars=context_max,
        context_empty=context_empty, history_turns=history_turns, history_max_chars=history_max,
        few_shot=few_shot, generation=generation, answer_start=answer_start, text=text,
    )
    return template, problems


def check_name(name: str, what: str = "template") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PromptError(f"invalid {what} name {name!r}: use letters, digits, '_' or '-' (at most 64 characters, "
                          "starting with a letter or digit)")
    return name
