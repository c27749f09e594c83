"""The `dlp-lora` command line. Each subcommand explains itself with --help.

One small module per command group, each with ``register(sub, model_help)``; shared options in
:mod:`.common`. User errors (:class:`DLPLoRAError`) print one line, ``error: ...``, and exit with
status 2. Commands with ``--json`` print a JSON object as their last line.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import DLPLoRAError
from .common import MODEL_HELP, add_routing_arguments

__all__ = ["add_routing_arguments", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from . import baselines, bench, data, demo, evaluate, generate, library, model, plugin, serve

    p = argparse.ArgumentParser(prog="dlp-lora", description=(
        "Serve a base model with a library of LoRA adapters; a small plugin routes each prompt to a "
        "weighted mix of adapters (DLP-LoRA)."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in (model, data, demo, library, baselines, plugin, generate, bench, evaluate, serve):
        group.register(sub, MODEL_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # a group without a subcommand: show its help
        parser.parse_args((argv or sys.argv[1:]) + ["--help"])
        return 2
    try:
        args.func(args)
    except DLPLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
