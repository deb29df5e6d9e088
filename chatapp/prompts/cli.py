"""`chatapp prompts list|show|validate|render|history|diff|save|revert|activate`: argparse only; every rule lives in
the PromptManager."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chatapp.config import Settings
from chatapp.prompts.manager import PromptManager
from chatapp.prompts.template import MODES, PromptError


def add_arguments(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `prompts` and its subcommands; each sets `func(settings, args) -> int` (chatapp.cli dispatches)."""
    parser = subparsers.add_parser("prompts", help="list, show, validate, render and version prompt templates")
    sub = parser.add_subparsers(dest="prompts_command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="template names, versions, the active one").set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="print a template's text")
    show.add_argument("name")
    show.add_argument("--version", type=int)
    show.set_defaults(func=cmd_show)
    validate = sub.add_parser("validate", help="check a template (name or YAML file); exit 1 on errors")
    validate.add_argument("target", help="a template name or a path to a .yaml file")
    validate.set_defaults(func=cmd_validate)
    render = sub.add_parser("render", help="print the chat messages a question would produce")
    render.add_argument("name", nargs="?", help="template (default: the active one)")
    render.add_argument("-q", "--question", required=True)
    render.add_argument("--mode", choices=MODES, default="auto")
    render.add_argument("--no-retrieval", action="store_true", help="render without retrieved context")
    render.set_defaults(func=cmd_render)
    hist = sub.add_parser("history", help="versions of a template")
    hist.add_argument("name")
    hist.set_defaults(func=cmd_history)
    diff = sub.add_parser("diff", help="unified diff between two versions")
    diff.add_argument("name")
    diff.add_argument("a", type=int)
    diff.add_argument("b", type=int)
    diff.set_defaults(func=cmd_diff)
    save = sub.add_parser("save", help="save a YAML file as the next version of a template")
    save.add_argument("name")
    save.add_argument("file", type=Path)
    save.add_argument("-m", "--message", default="")
    save.add_argument("--base-version", type=int, help="fail if the latest version is not this one")
    save.set_defaults(func=cmd_save)
    revert = sub.add_parser("revert", help="make an old version the latest again (as a new version)")
    revert.add_argument("name")
    revert.add_argument("version", type=int)
    revert.set_defaults(func=cmd_revert)
    activate = sub.add_parser("activate", help="use this template for new answers")
    activate.add_argument("name")
    activate.set_defaults(func=cmd_activate)
    return parser


def _guard(func):
    """Handlers get a PromptManager; bad input gets a one-line message and exit code 2, never a traceback."""
    def run(settings: Settings, args: argparse.Namespace) -> int:
        try:
            return func(PromptManager(settings), args) or 0
        except (PromptError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    run.__name__ = func.__name__
    return run


@_guard
def cmd_list(prompts: PromptManager, args) -> int:
    active = prompts.active_name
    for name in prompts.names():
        try:
            template = prompts.load(name)
            about = f"{template.mode:9s} {template.description}"
        except PromptError:
            about = "(has errors)"
        print(f"{'*' if name == active else ' '} {name:20s} v{prompts.latest_version(name):<4d} {about}")


@_guard
def cmd_show(prompts: PromptManager, args) -> int:
    print(prompts.text(args.name, args.version), end="")


@_guard
def cmd_validate(prompts: PromptManager, args) -> int:
    path = Path(args.target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        text, name = path.read_text(encoding="utf-8"), None
    else:
        text, name = prompts.text(args.target), args.target
    problems = prompts.validate(text, name)
    for problem in problems:
        print(f"{args.target}:{problem.line}:{problem.column}: {problem.severity}: {problem.message}")
    errors = sum(p.severity == "error" for p in problems)
    print(f"{args.target}: {'OK' if not errors else f'{errors} error(s)'}"
          f"{f', {len(problems) - errors} warning(s)' if len(problems) - errors else ''}")
    return 1 if errors else 0


@_guard
def cmd_render(prompts: PromptManager, args) -> int:
    hits: list = []
    if not args.no_retrieval:
        try:
            from chatapp.retrieval import Retriever

            hits = Retriever.open(prompts.settings).search(args.question, []).hits
        except Exception as exc:  # rendering is still useful without an index
            print(f"(no retrieved context: {exc})", file=sys.stderr)
    rendered = prompts.render(args.name, question=args.question, history=[], hits=hits, mode=args.mode)
    print(f"# {rendered.template} v{rendered.version} · {rendered.mode} · {len(rendered.examples)} example(s)"
          f" · generation {json.dumps(rendered.generation)}")
    for message in rendered.messages:
        print(f"--- {message['role']}\n{message['content']}")


@_guard
def cmd_history(prompts: PromptManager, args) -> int:
    for entry in prompts.history(args.name):
        by = f" ({entry['author']})" if entry["author"] else ""
        print(f"v{entry['version']:<4d} {entry['time']:25s} {entry['message']}{by}")


@_guard
def cmd_diff(prompts: PromptManager, args) -> int:
    print(prompts.diff(args.name, args.a, args.b) or "(no differences)", end="")


@_guard
def cmd_save(prompts: PromptManager, args) -> int:
    version = prompts.save(args.name, args.file.read_text(encoding="utf-8"), args.message, args.base_version)
    print(f"{args.name}: version {version}")


@_guard
def cmd_revert(prompts: PromptManager, args) -> int:
    print(f"{args.name}: version {prompts.revert(args.name, args.version)}")


@_guard
def cmd_activate(prompts: PromptManager, args) -> int:
    prompts.activate(args.name)
    print(f"active template: {args.name}")


def main(argv: list[str] | None = None) -> int:
    """`python -m chatapp.prompts ...` works before (and besides) the `chatapp` entry point."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", help="TOML settings file")
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m chatapp.prompts [--config FILE]")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prompts", *rest])
    return args.func(Settings.load(known.config), args)
