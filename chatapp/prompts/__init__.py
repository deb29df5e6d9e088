"""Prompt templates: YAML files under prompts/, their saved versions, few-shot example banks, and the one renderer
that turns (question, history, retrieved hits) into chat messages -- for inference and for training examples alike.

One module per job: `template` (parsing, validation with positions, the public types), `examples` (banks,
embedding cache, selectors), `render` (context, history, the langchain-core prompts), `manager` (PromptManager),
`versions` (saved versions and the active template, in the database), `cli` (`chatapp prompts ...`).

Why it is shaped like this:
- Templates are data, never code (see `template`).
- Shipped templates in prompts/ are read-only at run time. An edit becomes a numbered version in the app's database
  (one row, never changed), with a conflict reported when the editor's base version is stale, on every replica.
  Runtime state therefore never touches tracked files, and nothing is ever overwritten.
- Example banks are JSONL (one example a line, easy to append to). Run-time additions (corrections) go into a copy
  in the app's database (chatapp/example_banks.py) and are picked up by the selectors on the next render, on every
  replica.
"""
from chatapp.prompts.cli import add_arguments, main
from chatapp.prompts.examples import CachedEmbeddings, FixedExampleSelector, parse_bank
from chatapp.prompts.manager import PromptManager
from chatapp.prompts.template import (
    BUILTIN_VARIABLES,
    COMPUTED_VARIABLES,
    CONTEXT_ITEM_VARIABLES,
    GENERATION_LIMITS,
    MODES,
    NAME_RE,
    SELECTIONS,
    FewShot,
    Problem,
    PromptError,
    Rendered,
    Template,
    VersionConflict,
    check_name,
    parse_template,
)

__all__ = ["BUILTIN_VARIABLES", "COMPUTED_VARIABLES", "CONTEXT_ITEM_VARIABLES", "GENERATION_LIMITS", "MODES", "NAME_RE",
           "SELECTIONS", "CachedEmbeddings", "FewShot", "FixedExampleSelector", "Problem", "PromptError",
           "PromptManager", "Rendered", "Template", "VersionConflict", "add_arguments", "check_name", "main",
           "parse_bank", "parse_template"]
