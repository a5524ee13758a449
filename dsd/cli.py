"""`dsd` command line: each subcommand is a module in dsd.commands, imported only when run.

A command module defines:
    HELP: str                      one-line description
    add_arguments(parser) -> None  argparse flags (must not import numba/numpy-heavy code)
    run(args) -> int | None        the command itself (imports what it needs)
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module under dsd.commands
COMMANDS = {
    "generate": "generate",
    "logits": "logits",
    "bench": "bench",
    "synth": "synth",
    "doctor": "doctor",
    "start": "start",
    "stop": "stop",
    "status": "status",
    "plan": "plan",
    "chat": "chat",
    "worker": "worker",
    "http-frontend": "http_frontend",
}


def _load(name: str):
    return importlib.import_module(f"dsd.commands.{COMMANDS[name]}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsd", description="NUMA-sharded MoE inference daemon")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name in COMMANDS:
        try:
            mod = _load(name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("dsd.commands."):
                continue  # command not built yet
            raise
        if getattr(mod, "HIDDEN", False) and name != wanted:
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # user-facing errors print one clear line
        from dsd.errors import is_user_error

        if is_user_error(exc):
            print(f"dsd {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
