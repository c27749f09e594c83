"""CLI: `train-multitask` (the multi-task LoRA baseline) and `train-full` (the full fine-tune bound), issue 28."""

from __future__ import annotations

import argparse

from ..errors import DLPLoRAError
from .common import command_line, parse_top_layers, print_json


def cmd_train_multitask(args) -> None:
    from ..library import Library
    from ..train.lora import TrainConfig, parse_targets
    from ..train.multitask import library_top_layers, train_multitask

    top = parse_top_layers(args.top_layers) if args.top_layers else library_top_layers(Library.open(args.library))
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                      targets=parse_targets(args.targets), lr=args.lr, batch_size=args.batch_size,
                      max_len=args.max_len, seed=args.seed, top_layers=top, cache_bottom=args.cache_bottom)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    entry = train_multitask(args.library, args.data, cfg=cfg, name=args.name, tasks=tasks, examples=args.examples,
                            val_size=args.val_size, model=args.model, force=args.force)
    if args.json:
        print_json(entry)


def cmd_train_full(args) -> None:
    from ..train.full import FULL_LRS, FULL_POINTS, train_full
    from ..train.lora import TrainConfig
    from ..train.select import Selection, parse_floats, parse_ints

    sel = Selection(lrs=parse_floats(args.lrs, "--lrs") if args.lrs else FULL_LRS,
                    points=parse_ints(args.points, "--points") if args.points else FULL_POINTS, val_size=args.val_size)
    if args.eval_limit < 1:
        raise DLPLoRAError(f"--eval-limit must be at least 1, got {args.eval_limit}")
    cfg = TrainConfig(batch_size=args.batch_size, max_len=args.max_len, seed=args.seed, top_layers=None,
                      cache_bottom=False)
    rec = train_full(args.task, args.data, args.out, selection=sel, cfg=cfg, model=args.model,
                     eval_limit=args.eval_limit, command=command_line())
    if args.json:
        print_json({k: v for k, v in rec.items() if k not in ("test_result", "base_result")})


def register(sub, model_help: str) -> None:
    m = sub.add_parser("train-multitask", help="the multi-task LoRA baseline: one adapter on every task's data",
                       description="Train one LoRA on the union of the library's tasks' training examples (each "
                                   "task's validation slice left out, as --recipe select holds it out) and keep it in "
                                   "the library as a special adapter: served when a request names it (\"model\": "
                                   "NAME), never routed to, outside merge-all / TIES / Arrow; `dlp-lora eval --methods "
                                   "...,multitask` scores it in every setting. Resumable (LIB/.multitask/NAME). "
                                   "Budget: --examples in all (default 450 per task: the task adapters' examples, "
                                   "about the whole library's training time at the same rank and layers).")
    m.add_argument("--library", required=True, help="the library (its task adapters name the tasks)")
    m.add_argument("--data", help="prepared data (default: the library's data_dir)")
    m.add_argument("--name", default="multitask", help="adapter name (default multitask; e.g. multitask-r32)")
    m.add_argument("--tasks", help="comma-separated tasks (default: the library's task adapters)")
    m.add_argument("--examples", type=int, help="training examples seen in all (default 450 x tasks)")
    m.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8, as a task adapter; e.g. 32)")
    m.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    m.add_argument("--targets", default="all-linear")
    m.add_argument("--top-layers", default=None,
                   help="LoRA in the last N layers, or 'all' (default: what the library's task adapters record)")
    m.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--max-len", type=int, default=512)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--val-size", type=int, default=100, help="validation examples per task left out (default 100)")
    m.add_argument("--cache-bottom", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--model", help=model_help)
    m.add_argument("--force", action="store_true", help="retrain an adapter of that name")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_train_multitask)

    f = sub.add_parser("train-full", help="the full fine-tune bound: fine-tune every weight on one task",
                       description="Fully fine-tune the backbone on one task's training examples for each learning "
                                   "rate of --lrs, score the validation slice (the one --recipe select holds out) at "
                                   "each of --points examples seen, keep the best, and score it on the test split "
                                   "against the base model as train-loras scores adapters. Writes OUT/TASK.json; "
                                   "`dlp-lora report RESULTS_JSON --full-ft OUT/*.json` sets it beside base and LoRA "
                                   "in RESULTS.md. Resumable per learning rate.")
    f.add_argument("--task", required=True)
    f.add_argument("--data", required=True, help="prepared data (output of `dlp-lora data prepare`)")
    f.add_argument("--out", required=True, help="directory for TASK.json")
    f.add_argument("--lrs", help="peak learning rates, one run each (default 1e-5,5e-5)")
    f.add_argument("--points", help="examples seen at which to score the validation slice (default 225,450,900)")
    f.add_argument("--val-size", type=int, default=100)
    f.add_argument("--eval-limit", type=int, default=100, help="test examples to score on (default 100)")
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--max-len", type=int, default=512)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--model", help=model_help)
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_train_full)
