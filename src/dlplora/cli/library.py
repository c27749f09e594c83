"""CLI: `train-loras`, `learning-curve`, `library add`, `library remove`, `library list`."""

from __future__ import annotations

import argparse
import json
import math
import os

from ..errors import DLPLoRAError
from .common import parse_top_layers

CACHE_BOTTOM_HELP = ("run the frozen layers below the LoRA layers once per example and keep their output, so that "
                     "later steps run only the top layers (same loss; 1.73x the step in `dlp-lora bench train`; "
                     "default on)")


def cmd_train_loras(args) -> None:
    from ..tasks import load_split, parse_tasks, prepare
    from ..train import TrainConfig, train_library
    from ..train.lora import parse_targets

    names = parse_tasks(args.tasks, args.data)
    data = args.data
    if data is None:
        data = os.path.join(args.out, "data")
        print(f"no --data given: preparing the tasks into {data}")
        prepare(names, data, extra_data=args.extra_data)
    selection = selection_from_args(args)
    top = args.top_layers or ("all" if selection is not None else "10")
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, targets=parse_targets(args.targets), lr=args.lr,
                      batch_size=args.batch_size, max_len=args.max_len, seed=args.seed, top_layers=parse_top_layers(top),
                      cache_bottom=args.cache_bottom)
    if args.epochs is not None:
        if args.epochs <= 0:
            raise DLPLoRAError(f"--epochs must be positive, got {args.epochs}")
        n = min(len(load_split(data, t, "train")) for t in names)
        cfg.steps = max(1, math.ceil(args.epochs * n / cfg.batch_size))
    if args.examples is not None:
        if args.examples <= 0:
            raise DLPLoRAError(f"--examples must be positive, got {args.examples}")
        cfg.steps = max(1, math.ceil(args.examples / cfg.batch_size))
    if args.steps is not None:
        cfg.steps = args.steps
    if selection is not None and any(x is not None for x in (args.steps, args.epochs, args.examples)):
        raise DLPLoRAError("--recipe select trains to the last of --select-points; drop --steps / --epochs / --examples")
    lib = train_library(names, data, args.out, model=args.model, cfg=cfg, force=args.force,
                        eval_limit=args.eval_limit, ray_address=args.ray_address, selection=selection)
    flagged = [n for n in names if lib.manifest["adapters"].get(n, {}).get("beats_base") is False]
    print(f"library: {os.path.abspath(args.out)} ({len(lib.names)} adapters)")
    if flagged:
        print(f"adapters that do not beat the base model on their own task: {', '.join(flagged)}")
    if args.json:
        print(json.dumps({"library": os.path.abspath(args.out), "adapters": {n: lib.manifest["adapters"][n] for n in names},
                          "flagged": flagged}))


def selection_from_args(args):
    """The candidate set of ``--recipe select`` (None for the single recipe)."""
    from ..train.select import Selection, parse_floats, parse_ints

    if args.recipe == "single":
        return None
    sel = Selection(lrs=parse_floats(args.select_lrs, "--select-lrs"),
                    points=parse_ints(args.select_points, "--select-points"), val_size=args.val_size)
    sel.validate()
    return sel


RECIPE_HELP = (
    "single (default): one run per task of the flags below (rank 8 on every linear layer of the top 10 layers, 900 "
    "examples, lr 1e-3; 2.78 h for the 26-task library on the 2-core VM). select: per task, hold out --val-size "
    "training examples (a seeded slice; the test split is never used), train one run per learning rate of "
    "--select-lrs on the rest, adapters on every layer (unless --top-layers), score the validation slice at each of "
    "--select-points examples seen (checkpoints of that one run: early stopping), keep the best (accuracy for "
    "multiple choice, answer-token loss for generative tasks) and record every candidate's validation score and "
    "seconds in library.json (recipe). Cost: an all-layer example costs about twice a top-10-layer one, so the "
    "default (one lr, checkpoints at 225 and 450) trains about as long as the single recipe's 900 top-10 examples "
    "(~2.7 h for 26 tasks), plus the validation passes (~25 s per checkpoint and task: ~0.35 h); a third checkpoint "
    "(150,300,450) adds ~0.2 h, each extra learning rate one more run (~+2.9 h), a last point of 900 doubles every "
    "run. docs/plans/issue28-runs.md derives these. Resumable per task and per candidate (LIB/.select/TASK).")


def cmd_learning_curve(args) -> None:
    from ..train import TrainConfig
    from ..train.curve import run_curve
    from ..train.lora import parse_targets

    try:
        points = [int(x) for x in str(args.points).split(",") if x.strip()]
    except ValueError:
        raise DLPLoRAError(f"--points {args.points!r}: expected comma-separated example counts") from None
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, targets=parse_targets(args.targets), lr=args.lr,
                      batch_size=args.batch_size, max_len=args.max_len, seed=args.seed,
                      top_layers=parse_top_layers(args.top_layers), cache_bottom=args.cache_bottom)
    rec = run_curve(args.tasks, args.data, args.out, points=points, cfg=cfg, model=args.model,
                    eval_limit=args.eval_limit)
    print(f"curve: {os.path.abspath(args.out)}/curve.json, curve.png ({len(rec['points'])} points)")
    if args.json:
        print(json.dumps(rec))


def cmd_library_add(args) -> None:
    from ..library import Library, add_adapter, read_examples

    if not args.create and not os.path.isfile(os.path.join(args.library, "library.json")):
        raise DLPLoRAError(f"--library {args.library}: no library there (no library.json); check the path, or pass "
                           f"--create to start a new library there")
    examples = read_examples(args.examples) if args.examples else None
    entry = add_adapter(args.library, args.name, args.path, model=args.model, force=args.force, examples=examples)
    print(f"added {args.name} to {args.library}: rank {entry['rank']}, targets {','.join(entry['targets'])}")
    if examples:
        print(f"kept {len(examples)} routing prompts in {Library.open(args.library).routing_path(args.name)}; the "
              f"router learns them when retrained: dlp-lora train-plugin --library {args.library}")
    else:
        print("no --examples: the router cannot learn this adapter's task, so it is served when pinned or mixed only")
    if args.json:
        print(json.dumps(entry))


def cmd_library_remove(args) -> None:
    from ..library import Library, remove_adapter

    remove_adapter(args.library, args.name)
    print(f"removed {args.name} from {args.library}")
    lib = Library.open(args.library)
    cfg = lib.plugin_dir() / "plugin.json"
    if cfg.is_file() and args.name in (json.loads(cfg.read_text()).get("labels") or []):
        print(f"the router still knows {args.name} (it is never chosen); retrain it: "
              f"dlp-lora train-plugin --library {args.library}")


def cmd_library_list(args) -> None:
    from ..library import Library, library_totals, score_line, train_line

    lib = Library.open(args.library)
    if args.json:
        print(json.dumps(lib.manifest))
        return
    base = lib.base_model
    print(f"base model: {base.get('name')} ({base.get('fingerprint')})")
    for name in lib.all_names:
        e = lib.entry(name)
        kind = f" [{e['special']}: never routed to]" if e.get("special") else ""
        print(f"  {name:42} r={e.get('rank')} {','.join(e.get('targets', []))}{kind}")
        for line in (train_line(e), score_line(e) if e.get("score") is not None else ""):
            if line:
                print(f"  {'':42} {line}")
    for line in library_totals(lib.manifest):
        print(line)


def register(sub, model_help: str) -> None:
    t = sub.add_parser("train-loras", help="train one LoRA adapter per task into a library",
                       description="Train one PEFT LoRA per task on its training split (loss on answer tokens only, "
                                   "bf16 autocast, length-bucketed batches), score it against the base model on the "
                                   "task's test split, and record everything in LIB/library.json. Finished adapters "
                                   "are skipped unless --force.")
    t.add_argument("--tasks", default="all", help="'all', 'mcq', 'qa' or comma-separated task names")
    t.add_argument("--out", required=True, help="library directory")
    t.add_argument("--data", help="prepared data (output of `dlp-lora data prepare`); default: prepare into OUT/data")
    t.add_argument("--extra-data", help="directory of the non-BIG-bench tasks, used when --data is not given")
    t.add_argument("--model", help=model_help)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--targets", default="all-linear", help="comma-separated module names, or all-linear (default)")
    t.add_argument("--steps", type=int, help="optimizer steps per adapter (default 113: 900 examples of 8)")
    t.add_argument("--epochs", type=float, help="passes over the smallest task's training split instead of --steps")
    t.add_argument("--examples", type=int, help="training examples each adapter sees (steps = examples / batch size; "
                                                "a task with fewer training examples sees some of them again)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    t.add_argument("--max-len", type=int, default=512,
                   help="max tokens per training example; a longer prompt loses its middle (default 512: 192 cut the "
                        "middle of most TrackObj, GSM8K and QuesSel examples)")
    t.add_argument("--top-layers", default=None, help="LoRA only in the last N decoder layers: the backward pass "
                                                       "stops there, so CPU training is ~2x faster (default 10, and "
                                                       "'all' under --recipe select; 'all' for every layer, as in the "
                                                       "paper)")
    t.add_argument("--recipe", choices=("single", "select"), default="single", help=RECIPE_HELP)
    t.add_argument("--select-lrs", default="1e-3", help="--recipe select: peak learning rates, one run each "
                                                        "(default 1e-3)")
    t.add_argument("--select-points", default="225,450",
                   help="--recipe select: examples seen at which each run is scored on the validation slice; the run "
                        "ends at the last (cosine schedule to it; default 225,450)")
    t.add_argument("--val-size", type=int, default=100, help="--recipe select: training examples held out per task "
                                                             "for validation (default 100 of 900)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cache-bottom", action=argparse.BooleanOptionalAction, default=True, help=CACHE_BOTTOM_HELP)
    t.add_argument("--eval-limit", type=int, default=100, help="test examples to score each adapter vs base on (0: skip)")
    t.add_argument("--force", action="store_true", help="retrain adapters that already exist")
    t.add_argument("--ray-address", help="run each adapter as a Ray task on this cluster ('auto' or HOST:PORT)")
    t.add_argument("--json", action="store_true", help="print the manifest entries as JSON on the last line")
    t.set_defaults(func=cmd_train_loras)

    lib = sub.add_parser("library", help="inspect or extend an adapter library").add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    lc = sub.add_parser("learning-curve", help="test score against training examples seen (to choose the budget)",
                        description="One training run per task; at each point of --points the adapter is scored on "
                                    "the task's test split. Resumable: rerun the same command to continue.")
    lc.add_argument("--tasks", required=True, help="comma-separated task names (or 'all', 'mcq', 'qa')")
    lc.add_argument("--data", required=True, help="prepared data (output of `dlp-lora data prepare`)")
    lc.add_argument("--out", required=True, help="directory for curve.json, curve.png and the resumable state")
    lc.add_argument("--points", default="160,450,900,1800,2700", help="examples seen at which to score")
    lc.add_argument("--model", help=model_help)
    lc.add_argument("--rank", type=int, default=8)
    lc.add_argument("--alpha", type=float, default=16.0)
    lc.add_argument("--targets", default="all-linear", help="comma-separated module names, or all-linear (default)")
    lc.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (then 1/sqrt(step) decay; default 1e-3)")
    lc.add_argument("--batch-size", type=int, default=8)
    lc.add_argument("--max-len", type=int, default=512)
    lc.add_argument("--top-layers", default="10", help="LoRA only in the last N decoder layers, or 'all'")
    lc.add_argument("--seed", type=int, default=0)
    lc.add_argument("--cache-bottom", action=argparse.BooleanOptionalAction, default=True, help=CACHE_BOTTOM_HELP)
    lc.add_argument("--eval-limit", type=int, default=100, help="test examples per point (default 100)")
    lc.add_argument("--json", action="store_true", help="print curve.json on the last line")
    lc.set_defaults(func=cmd_learning_curve)

    a = lib.add_parser("add", help="add a PEFT LoRA trained elsewhere",
                       description="Validate a PEFT LoRA directory against the library's base model (targets, "
                                   "shapes, rank) and copy it into the library. A missing library is refused "
                                   "unless --create.")
    a.add_argument("name")
    a.add_argument("path")
    a.add_argument("--library", required=True)
    a.add_argument("--model", help="base model of a new library; " + model_help)
    a.add_argument("--create", action="store_true", help="create the library if it does not exist (else a missing "
                                                          "--library is refused: a mistyped path stays an error)")
    a.add_argument("--force", action="store_true", help="replace an adapter of the same name")
    a.add_argument("--examples", metavar="FILE",
                   help="JSONL of example prompts of the adapter's task (per line a JSON string, or an object with "
                        "'input', 'text' or 'prompt'), kept as its routing prompts (LIB/routing/NAME.jsonl) for the "
                        "router to learn; without them the adapter is served only when pinned or mixed")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_library_add)
    rm = lib.add_parser("remove", help="remove an adapter (its entry, files and routing prompts)")
    rm.add_argument("name")
    rm.add_argument("--library", required=True)
    rm.set_defaults(func=cmd_library_remove)
    ls = lib.add_parser("list", help="list the adapters of a library")
    ls.add_argument("--library", required=True)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_library_list)
