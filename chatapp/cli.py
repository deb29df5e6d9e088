"""Command line: `chatapp serve|ingest|eval|prompts|feedback|tune|adapters|gaps|db`, and the flags `launch.py` takes.

Each part of the product registers its own subcommands (`add_arguments(subparsers)` in its module, handlers
`func(settings, args) -> int | None`); this file only builds `Settings` from the flags and dispatches.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from chatapp.config import Settings

log = logging.getLogger("chatapp")

# Modules that contribute subcommands; one that fails to import costs only its own commands.
COMMAND_MODULES = ["chatapp.retrieval", "chatapp.prompts", "chatapp.feedback_cli", "chatapp.tuning.cli", "chatapp.adapters",
                   "chatapp.answer_eval", "chatapp.gaps", "chatapp.db_cli"]


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every command understands: where state lives and which model answers."""
    parser.add_argument("--config", help="TOML settings file (default: ./chatapp.toml if present)")
    # "--data" stays what it was before --database-url existed (an abbreviation of --data-dir)
    parser.add_argument("--data-dir", "--data", dest="data_dir",
                        help="runtime state: model cache, index, feedback database, adapters")
    parser.add_argument("--database-url", metavar="URL",
                        help="shared database for several replicas, postgresql+psycopg://USER:PASS@HOST/DB "
                             "(default: SQLite in the data directory)")
    parser.add_argument("--shared-dir", metavar="DIR",
                        help="folder every replica mounts: adapter versions, prompt versions, knowledge edits "
                             "(default: the data directory)")
    parser.add_argument("--model", help="model profile (smollm2, qwen-coder-0.5b), a .gguf file or a HF model folder")
    parser.add_argument("--adapter", help="a PEFT LoRA adapter folder, or 'none' (default: the registry's active one)")
    parser.add_argument("--chinese-model", metavar="MODEL",
                        help="a second model (e.g. qwen-coder-0.5b) for Chinese questions when --model is English-only")
    parser.add_argument("--backend", choices=["auto", "transformers", "llamacpp", "openai"])
    parser.add_argument("--openai-base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--threads", type=int, help="CPU threads for generation and training (default: all cores)")
    parser.add_argument("--knowledge-dir", help="folder of Markdown / FAQ files to answer from")
    parser.add_argument("--embedder", choices=["minilm", "e5"], help="minilm (English) or e5 (multilingual)")
    parser.add_argument("--template", help="prompt template to use (a name under prompts/)")
    parser.add_argument("-v", "--verbose", action="store_true")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for the whole network)")
    parser.add_argument("--port", type=int, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public link (needs internet)")
    parser.add_argument("--allow-public", action="store_true", help="allow --share without --auth")
    parser.add_argument("--auth", action="append", metavar="USER:PASS", help="require a login (repeatable)")
    parser.add_argument("--auth-file", help="file with one USER:PASS[:ROLE[:DISPLAY NAME]] per line "
                                             "(ROLE: customer, agent or admin)")
    parser.add_argument("--admin", action="append", metavar="USER",
                        help="users allowed to edit prompts and promote adapters (default: the first --auth user)")
    parser.add_argument("--agent", action="append", metavar="USER",
                        help="users who answer customers in the staff console's inbox (/staff)")
    parser.add_argument("--support-hours", metavar="HOURS",
                        help='when a person can be asked, e.g. "mon-fri 09:00-17:00" (default: always)')


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        "model.name": args.model,
        "model.chinese_model": args.chinese_model,
        "model.adapter": args.adapter,
        "model.backend": args.backend,
        "model.openai_base_url": args.openai_base_url,
        "model.threads": args.threads,
        "retrieval.knowledge_dir": args.knowledge_dir,
        "retrieval.embedder": args.embedder,
        "prompts.template": args.template,
        "database_url": args.database_url,
        "shared_dir": args.shared_dir,
    }
    settings = Settings.load(args.config, **overrides)
    if settings.database_url:
        from chatapp.storage import StorageError, resolve_url

        try:
            resolve_url(settings.database_url)
        except StorageError as exc:
            raise SystemExit(f"{exc} (from --database-url or database_url in the TOML file)") from None
    if args.data_dir:
        settings.data_dir = Path(args.data_dir).expanduser()
    if args.backend is None and args.openai_base_url:
        settings.model.backend = "openai"
    for name in ("host", "port"):
        if getattr(args, name, None) is not None:
            setattr(settings.ui, name, getattr(args, name))
    if getattr(args, "share", False):
        settings.ui.share = True
    if getattr(args, "allow_public", False):
        settings.ui.allow_public = True
    users = list(settings.ui.auth) + [_parse_credential(c, "--auth") for c in getattr(args, "auth", None) or []]
    roles: dict[str, str] = {}
    if getattr(args, "auth_file", None):
        for user, password, role, name in read_auth_file(Path(args.auth_file)):
            users.append((user, password))
            if role:
                roles[user] = role
            if name:
                settings.ui.display_names[user] = name
    settings.ui.auth = users
    if getattr(args, "admin", None):
        settings.ui.admins = list(args.admin)
    elif users and not settings.ui.admins and not roles:
        settings.ui.admins = [users[0][0]]
    settings.ui.admins += [u for u, r in roles.items() if r == "admin" and u not in settings.ui.admins]
    if getattr(args, "support_hours", None) is not None:
        settings.ui.support_hours = args.support_hours
    try:
        from chatapp.inbox import within_hours

        within_hours(settings.ui.support_hours)
    except (ValueError, IndexError):
        raise SystemExit(f"support hours {settings.ui.support_hours!r}: expected e.g. 09:00-17:00 or "
                         "mon-fri 09:00-17:00") from None
    settings.ui.agents = list(settings.ui.agents) + list(getattr(args, "agent", None) or []) + \
        [u for u, r in roles.items() if r == "agent"]
    return settings


def _parse_credential(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise SystemExit(f"{where}: expected USER:PASS, got {text.strip()!r}")
    return user, password


def read_auth_file(path: Path) -> list[tuple[str, str, str, str]]:
    """(user, password, role or "", display name or "") per line; a malformed line stops the start, naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SystemExit(f"--auth-file {path}: {exc.strerror or exc}") from None
    users = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(":", 3)
        has_role = len(parts) >= 3 and parts[2].strip().lower() in ("customer", "agent", "admin")
        # without a known role the rest of the line is the password (which may hold colons), as before roles
        user, password = _parse_credential(":".join(parts[:2]) if has_role else line, f"{path}:{n}")
        role = parts[2].strip().lower() if has_role else ""
        rest = parts[2:] if has_role else []
        users.append((user, password, role, rest[1].strip() if len(rest) > 1 else ""))
    if not users:
        raise SystemExit(f"--auth-file {path}: no USER:PASS lines")
    return users


def serve(settings: Settings) -> int:
    """Load the bot, start the web app, keep it up until Ctrl-C or SIGTERM."""
    from chatapp.access import Accounts, BrowserKeyError, is_local
    from chatapp.bot import Bot
    from chatapp.model import ModelError
    from chatapp.ui.server import Server

    ui = settings.ui
    if ui.share and not ui.auth and not ui.allow_public:
        print("Refusing --share without --auth: a public link would let anyone on the internet use this bot, read its\n"
              "knowledge base and edit its prompts. Add --auth USER:PASS (or --auth-file), or pass --allow-public\n"
              "if that is really what you want.", file=sys.stderr)
        return 2
    if (ui.share or not is_local(ui.host)) and not Accounts(ui).staff and not ui.allow_public:
        print(f"Refusing to serve the staff console (/staff) on {ui.host} without a staff login: anyone who can\n"
              "reach this address could read every conversation and export the feedback. Add --auth USER:PASS with\n"
              "--admin USER / --agent USER (or an --auth-file with roles), listen on 127.0.0.1, or pass\n"
              "--allow-public if that is really what you want.", file=sys.stderr)
        return 2
    try:
        bot = Bot.create(settings)
        bot.browser_tokens  # the customer pages cannot work without their key: a database that is down stops here
    except (ModelError, BrowserKeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def request_stop(_signum, _frame) -> None:
        if stopping.is_set():  # asked twice: the user does not want to wait for the shutdown
            os._exit(1)
        stopping.set()

    # Ctrl-C and SIGTERM (docker stop, systemd) both shut down cleanly: queued feedback writes are flushed first.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    app = Server(bot, ui.host, ui.port)
    try:
        app.start()
    except OSError as exc:
        print(f"error: cannot listen on {ui.host}:{ui.port}: {exc}", file=sys.stderr)
        return 2
    print(f"Chat app ready at {app.local_url} (staff console: {app.local_url}staff/)", flush=True)
    if ui.share and not app.share():
        print("The public --share link could not be created (this machine cannot reach the tunnel service: offline or\n"
              f"blocked). The app keeps serving locally at {app.local_url}.", flush=True)
    elif ui.share:
        print(f"Public link: {app.share_url}", flush=True)
    try:
        while not stopping.wait(1):
            pass
        print("\nShutting down.", flush=True)
    finally:
        _exit_within(SHUTDOWN_GRACE_S)  # the feedback flush below is bounded at 30 s, the web server at 5 s
        app.close()
        if bot.inbox is not None:
            bot.inbox.close()
        if bot.feedback is not None:
            bot.feedback.close()  # every logged answer is on disk from here on
        _exit_within(EXIT_GRACE_S)
    return 0


SHUTDOWN_GRACE_S = 45.0
EXIT_GRACE_S = 5.0


def _exit_within(seconds: float) -> None:
    """Make sure the process ends within `seconds`, even if a thread never does.

    Why: interpreter exit waits for every non-daemon thread a library started, and a server must stop when told
    to. Twice in CI a Ctrl-C'd app had not exited a minute later (cause not found: the same test passes alone and
    under load); the shutdown is now driven by our own signal handler and bounded by these timers.
    """
    def force() -> None:
        print(f"Still exiting after {seconds:.0f} s (a thread is blocked); stopping now.", file=sys.stderr, flush=True)
        os._exit(0)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from packages on disk, never a hub
    parser = argparse.ArgumentParser(prog="chatapp", description=__doc__.split("\n")[0])
    add_common_flags(parser)
    subparsers = parser.add_subparsers(dest="command", required=True)
    serve_parser = subparsers.add_parser("serve", help="start the web app (same as launch.py)")
    add_serve_flags(serve_parser)
    serve_parser.set_defaults(func=lambda settings, args: serve(settings))
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            log.debug("%s has no commands here: %s", name, exc)
            continue
        if hasattr(module, "add_arguments"):
            module.add_arguments(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    try:
        return int(args.func(settings, args) or 0)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130


def launch_main(argv: list[str] | None = None) -> int:
    """`python launch.py [flags]`: the web app with the serve flags at top level."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="launch.py", description="Start the customer-service chat app.")
    add_common_flags(parser)
    add_serve_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return serve(settings_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
