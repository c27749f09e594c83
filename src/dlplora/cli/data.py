"""`dlp-lora data prepare` and `dlp-lora data list`: the 26-task suite."""

from __future__ import annotations

import os

from .common import print_json


def cmd_data_prepare(args) -> None:
    from ..tasks import format_summary, prepare

    tokenizer = None
    if not args.no_stats:
        from ..backbone import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    summary = prepare(args.tasks, args.out, extra_data=args.extra_data, tokenizer=tokenizer)
    print(format_summary(summary))
    print(f"wrote {len(summary)} tasks to {os.path.abspath(args.out)}")
    if args.json:
        print_json(summary)


def cmd_data_list(args) -> None:
    from ..tasks import TASKS

    for t in TASKS.values():
        print(f"{t.name:42} {t.short:12} {t.kind:4} {t.source:9} {','.join(t.metrics)}")


def register(sub, model_help: str) -> None:
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
