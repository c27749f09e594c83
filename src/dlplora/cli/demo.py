"""`dlp-lora demo`: the main job on embedded defaults."""

from __future__ import annotations

import os

from ..pipelines.demo import DEMO_TASKS  # a light import: the pipeline loads torch only when it runs


def cmd_demo(args) -> None:
    from ..pipelines.demo import run_demo

    run_demo(args.out, model=args.model, extra_data=args.extra_data, tasks=args.tasks.split(","), steps=args.steps,
             n_eval=args.n_eval)


def register(sub, model_help: str) -> None:
    dm = sub.add_parser("demo", help="the main job on embedded defaults",
                        description="Prepare 4 tasks, train their adapters and the router plugin, compare base / "
                                    "single LoRA / DLP-LoRA on a composite stream, and run a 3-turn mixed-task chat.")
    dm.add_argument("--tasks", default=",".join(DEMO_TASKS), help="comma-separated tasks (default: %(default)s)")
    dm.add_argument("--steps", type=int, default=24, help="training steps per adapter (default 24)")
    dm.add_argument("--n-eval", type=int, default=32, help="test prompts per task in the composite evaluation (default 32)")
    dm.add_argument("--extra-data", help="directory of the non-BIG-bench tasks (optional)")
    dm.add_argument("--out", default=os.path.join("runs", "demo"))
    dm.add_argument("--model", help=model_help)
    dm.set_defaults(func=cmd_demo)
