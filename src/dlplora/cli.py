"""The `dlp-lora` command line. Each subcommand explains itself with --help.

User errors (:class:`DLPLoRAError`) print one line, ``error: ...``, and exit with status 2.
Commands with ``--json`` print a JSON object as their last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import DLPLoRAError


def _print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def add_routing_arguments(parser) -> None:
    """The router's selection options, the same for `route`, `generate`, `chat` and `serve`."""
    parser.add_argument("--p", type=float, default=0.6, help="top-p threshold in (0, 1] (default 0.6)")
    parser.add_argument("--top-k", type=int, default=None, help="keep at most K adapters (default: no limit)")
    parser.add_argument("--weighting", choices=("softmax", "renorm"), default="softmax",
                        help="kept probabilities -> weights: softmax (paper eq. 5, default) or renorm")
    parser.add_argument("--floor", type=float, default=0.0,
                        help="route to the base model when the best probability is below this (default 0: off)")


# ---------------------------------------------------------------- model

def cmd_model_info(args) -> None:
    from .backbone import load_backbone

    t0 = time.time()
    model, tok, info = load_backbone(args.model)
    load_s = time.time() - t0
    out = info.to_dict() | {"load_seconds": round(load_s, 2)}
    if args.smoke:
        from .tasks import chat_prompt
        import torch

        prompt = chat_prompt(tok, "Name a primary colour.")
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=args.smoke, do_sample=False, pad_token_id=tok.pad_token_id)
        out["smoke_completion"] = tok.decode(gen[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    if args.json:
        _print_json(out)
    else:
        for k, v in out.items():
            print(f"{k:>18}: {v}")


# ---------------------------------------------------------------- data

def cmd_data_prepare(args) -> None:
    from .tasks import format_summary, prepare

    tokenizer = None
    if not args.no_stats:
        from .backbone import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    summary = prepare(args.tasks, args.out, extra_data=args.extra_data, tokenizer=tokenizer)
    print(format_summary(summary))
    print(f"wrote {len(summary)} tasks to {os.path.abspath(args.out)}")
    if args.json:
        _print_json(summary)


def cmd_data_list(args) -> None:
    from .tasks import TASKS

    for t in TASKS.values():
        print(f"{t.name:42} {t.short:12} {t.kind:4} {t.source:9} {','.join(t.metrics)}")


# ---------------------------------------------------------------- demo

def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, model=args.model, extra_data=args.extra_data, tasks=args.tasks.split(","), steps=args.steps,
             n_eval=args.n_eval)


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlp-lora", description=(
        "Serve a base model with a library of LoRA adapters; a small plugin routes each prompt to a "
        "weighted mix of adapters (DLP-LoRA)."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    model_help = "base model: a local Hugging Face directory or hub id (default: embedded SmolLM2-135M-Instruct)"

    # model
    m = sub.add_parser("model", help="inspect the backbone").add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    mi = m.add_parser("info", help="load the backbone (caching the embedded one) and print its facts",
                      description="Load the backbone and print its path, architecture, size and fingerprint. "
                                  "The first run converts the embedded GGUF to a safetensors cache.")
    mi.add_argument("--model", help=model_help)
    mi.add_argument("--smoke", type=int, default=0, metavar="N", help="also generate N tokens as a smoke check")
    mi.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    mi.set_defaults(func=cmd_model_info)

    # data
    d = sub.add_parser("data", help="the 26-task suite").add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    dp = d.add_parser("prepare", help="write deterministic train/test splits of the tasks",
                      description="Write OUT/<task>/train.jsonl and test.jsonl (900/100, or 9:1 of a smaller source) "
                                  "and print a summary. BIG-bench tasks are fetched once from PyPI; the 6 other tasks "
                                  "are read from --extra-data.")
    dp.add_argument("--tasks", default="all", help="'all', 'mcq', 'qa' or comma-separated task names (default: all)")
    dp.add_argument("--extra-data", help="directory with gsm8k.jsonl, cnn_dailymail.jsonl, alpaca.jsonl, "
                                         "news_commentary_{de,es,it}.jsonl (default: $DLP_LORA_EXTRA_DATA)")
    dp.add_argument("--out", default="data", help="output directory (default: ./data)")
    dp.add_argument("--model", help="tokenizer for the prompt-length statistics; " + model_help)
    dp.add_argument("--no-stats", action="store_true", help="skip the prompt-length statistics (no tokenizer load)")
    dp.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    dp.set_defaults(func=cmd_data_prepare)
    dl = d.add_parser("list", help="list the task registry")
    dl.set_defaults(func=cmd_data_list)

    # demo
    dm = sub.add_parser("demo", help="the main job on embedded defaults",
                        description="Prepare 4 tasks, train their adapters and the router plugin, compare base / "
                                    "single LoRA / DLP-LoRA on a composite stream, and run a 3-turn mixed-task chat.")
    from .demo import DEMO_TASKS

    dm.add_argument("--tasks", default=",".join(DEMO_TASKS), help="comma-separated tasks (default: %(default)s)")
    dm.add_argument("--steps", type=int, default=12, help="training steps per adapter (default 12)")
    dm.add_argument("--n-eval", type=int, default=16, help="test prompts per task in the composite evaluation")
    dm.add_argument("--extra-data", help="directory of the non-BIG-bench tasks (optional)")
    dm.add_argument("--out", default=os.path.join("runs", "demo"))
    dm.add_argument("--model", help=model_help)
    dm.set_defaults(func=cmd_demo)

    # Subcommands owned by other modules: each `cli_<area>.py` has `register(sub, model_help)`.
    import importlib

    for area in _CLI_AREAS:
        try:
            mod = importlib.import_module(f".cli_{area}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.cli_{area}":
                raise
            continue
        mod.register(sub, model_help)
    return p


_CLI_AREAS = ("library", "plugin", "engine", "bench", "evaluation", "server")


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
