"""`dlp-lora eval` (the evaluation harness) and `dlp-lora reproduce` (the whole pipeline)."""

from __future__ import annotations

import os

from ..config import DEFAULT_P
from ..eval.settings import MT_MCQ_REPLIES
from .common import (add_base_arguments, add_precision_arguments, base_threshold_from_args, command_line,
                     parse_top_layers, print_json)


def cmd_eval(args) -> None:
    from ..eval.harness import run_evaluation
    from ..eval.settings import EvalConfig, parse_methods, parse_p_values, parse_settings, parse_weightings

    log = (lambda *a, **k: None) if args.json else print
    config = EvalConfig(library=args.library, data=args.data, out=args.out, settings=parse_settings(args.setting),
                        methods=parse_methods(args.methods), tasks=args.tasks, limit=args.limit, p=args.p,
                        weightings=parse_weightings(args.weightings), teacher_forced=args.teacher_forced,
                        model=args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                        seed=args.seed,
                        batch_size=args.batch_size, route_window=args.route_window,
                        turns=args.turns, conversations=args.conversations, arrow_top_k=args.arrow_top_k,
                        ties_density=args.ties_density,
                        progress=not args.no_progress, command=command_line(), cache_dir=args.cache, note=args.note,
                        p_sweep=parse_p_values(args.p_sweep), mcq_exact_match=args.mcq_exact_match,
                        mt_mcq_reply=args.mt_mcq_reply, base_threshold=base_threshold_from_args(args),
                        ray_address=args.ray_address, ray_workers=args.ray_workers)
    results = run_evaluation(config, log=log)
    if not args.json:
        print(f"wrote {os.path.join(args.out, 'results.json')}, RESULTS.md and figures/ "
              f"({results['cache']['new_predictions']} new predictions, {results['cache']['hits']} from the cache)")
    else:
        print_json(results)


def cmd_reproduce(args) -> None:
    from ..pipelines.reproduce import ReproduceConfig, run_reproduce

    run_reproduce(ReproduceConfig(
        out=args.out, work=args.work, extra_data=args.extra_data, tasks=args.tasks, limit=args.limit, steps=args.steps,
        examples=args.examples, rank=args.rank, targets=args.targets, lr=args.lr,
        model=args.model, settings=args.setting, methods=args.methods, p=args.p, weightings=args.weightings,
        teacher_forced=not args.no_teacher_forced,
        top_layers=parse_top_layers(args.top_layers or ("all" if args.recipe == "select" else "10")),
        batch_size=args.batch_size, progress=not args.no_progress, command=command_line(), p_sweep=args.p_sweep,
        conversations=args.conversations, mcq_exact_match=args.mcq_exact_match, mt_mcq_reply=args.mt_mcq_reply,
        recipe=args.recipe, select_lrs=args.select_lrs, select_points=args.select_points, val_size=args.val_size,
        multitask_ranks=args.multitask_ranks, multitask_examples=args.multitask_examples, full_ft=args.full_ft,
        ray_address=args.ray_address, ray_workers=args.ray_workers))


def cmd_arrow_check(args) -> None:
    from ..eval.arrow_check import arrow_agreement
    from ..eval.runners import build_arrow_model
    from ..library import Library
    from ..tasks import load_split, user_message

    lib = Library.open(args.library)
    data = args.data or lib.manifest.get("data_dir")
    model, tok = build_arrow_model(lib, model=args.model, top_k=args.arrow_top_k)
    prompts = {t: [user_message(ex) for ex in load_split(data, t, "test")[:args.prompts]] for t in lib.names}
    rep = arrow_agreement(model, tok, lib.names, prompts)
    rep.update({"library": os.path.abspath(args.library), "top_k": args.arrow_top_k, "command": command_line()})
    if args.json:
        print_json(rep)
        return
    print(f"Arrow's per-token top-1 is the prompt's own adapter in {rep['mean_own_top1']:.1f}% of (token, layer) "
          f"choices (chance {rep['chance']:.1f}%; {rep['layers']} Arrow layers, {args.prompts} test prompts per task)")
    for t, v in sorted(rep["own_top1_by_task"].items(), key=lambda kv: -kv[1]):
        print(f"  {t:42} {v:6.1f}%")


def cmd_report(args) -> None:
    from ..eval.report import rewrite_report

    print(f"wrote {rewrite_report(args.results, full_ft=args.full_ft or ())} and figures/")


def _common(p, model_help: str) -> None:
    p.add_argument("--methods", default="base,lora,dlp,arrow,merge-all,ties,multitask",
                   help="comma-separated: base, lora (oracle adapter), dlp (plugin), arrow (PEFT Arrow), merge-all "
                        "(uniform, merged into the weights once), ties (PEFT's TIES merge), multitask (each multi-task "
                        "adapter of the library, `dlp-lora train-multitask`; skipped when it has none) (default: all)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="test examples per task (default: all)")
    p.add_argument("--p", type=float, default=DEFAULT_P, help=f"DLP top-p threshold (default {DEFAULT_P})")
    p.add_argument("--p-sweep", default="", metavar="P1,P2,...",
                   help="also run dlp at these top-p values on the widest composite setting (a table of the effect of "
                        "p: score, adapters per prompt, fusion weight)")
    p.add_argument("--conversations", type=int, default=None, help="multiturn: at most this many conversations")
    p.add_argument("--mt-mcq-reply", choices=MT_MCQ_REPLIES, default="choice",
                   help="multiturn: the reply a multiple-choice turn leaves in the history: choice (the choice it "
                        "ranked first, the answer its score counts; default) or generated (a generated answer, as a "
                        "chat would have; one more generation per multiple-choice turn)")
    p.add_argument("--mcq-exact-match", action="store_true",
                   help="also generate an answer to every single-turn multiple-choice prompt and report its exact "
                        "match (a secondary figure; the main one is the log-likelihood ranking; costs a generation "
                        "per prompt)")
    p.add_argument("--weightings", default="softmax,renorm",
                   help="DLP fusion weightings to report: softmax (the paper's, reported as `dlp`) and/or renorm "
                        "(`dlp-renorm`)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="compute the predictions on the Ray cluster at ADDR ('auto' or HOST:PORT): the same batches, "
                        "the same predictions, on workers that each hold the models; the library, the data and the "
                        "cache must be at the same path on every node (the cache: else the driver writes it)")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="with --ray-address: N workers of 1 CPU each (default: one per free CPU of the cluster)")


def register(sub, model_help: str) -> None:
    e = sub.add_parser("eval", help="evaluate base / LoRA / DLP-LoRA / Arrow / merge-all on the test sets",
                       description="The evaluation harness. Settings: single (each task alone, right adapter "
                                   "given: base and lora), composite-17 / composite-9 / composite-26 (the MCQ / QA / "
                                   "all tasks of the library shuffled into one stream, no task label), multiturn "
                                   "(3-turn conversations across tasks, re-routed every turn). Writes "
                                   "OUT/results.json, OUT/RESULTS.md and OUT/figures/*.png; predictions are cached "
                                   "in OUT/cache so a rerun resumes.")
    e.add_argument("--library", required=True, help="adapter library directory (with its plugin)")
    e.add_argument("--data", help="prepared data directory (default: the library's data_dir)")
    e.add_argument("--setting", default="composite-26",
                   help="comma-separated: single, composite-17, composite-9, composite-26, multiturn, or all "
                        "(default composite-26)")
    e.add_argument("--tasks", help="restrict to these tasks (comma-separated; default: every adapter's task)")
    e.add_argument("--teacher-forced", action="store_true",
                   help="also score generative tasks teacher-forced (the paper code's inflated variant, labelled)")
    e.add_argument("--out", default=os.path.join("runs", "eval"), help="output directory (default runs/eval)")
    e.add_argument("--seed", type=int, default=0, help="shuffling / conversation seed")
    e.add_argument("--route-window", type=int, default=1,
                   help="multiturn: earlier user turns the router reads with the current one (default 1)")
    e.add_argument("--turns", type=int, default=3, help="multiturn: turns per conversation (default 3)")
    e.add_argument("--arrow-top-k", type=int, default=3, help="Arrow: adapters mixed per token (default 3)")
    e.add_argument("--ties-density", type=float, default=0.2,
                   help="TIES merge: share of each task vector kept (TIES' k; default 0.2)")
    e.add_argument("--cache", help="prediction cache directory (default OUT/cache)")
    e.add_argument("--note", default="", help="a paragraph put at the top of RESULTS.md (e.g. what was cut)")
    e.add_argument("--json", action="store_true", help="print results.json as the last line")
    _common(e, model_help)
    add_base_arguments(e)
    add_precision_arguments(e, dtype_default="auto", quantize_default="none", compile=False)  # bf16 where native: 2.4x the choice ranking
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("reproduce", help="the paper's pipeline end to end: data, adapters, plugin, evaluation",
                       description="Prepare the tasks, train one LoRA per task, train the plugin, then run every "
                                   "setting and method of `dlp-lora eval`, writing OUT/RESULTS.md, OUT/results.json "
                                   "and OUT/figures (default OUT: runs/reproduce). Resumable: finished adapters and cached predictions are reused.")
    r.add_argument("--extra-data", help="directory of the 6 non-BIG-bench tasks (gsm8k.jsonl, ...)")
    r.add_argument("--out", default=os.path.join("runs", "reproduce"),
                   help="where RESULTS.md, results.json and figures/ go (default runs/reproduce; `--out docs` "
                        "replaces the committed docs/RESULTS.md, so it is never the default)")
    r.add_argument("--work", default=os.path.join("runs", "reproduce"),
                   help="data, library and prediction cache (default runs/reproduce)")
    r.add_argument("--tasks", default="all", help="'all', 'mcq', 'qa' or comma-separated task names (default all)")
    r.add_argument("--steps", type=int, default=None,
                   help="training steps per adapter (default: train-loras' default, 113 = 900 examples)")
    r.add_argument("--examples", type=int, default=None,
                   help="training examples per adapter (steps = examples / 8), instead of --steps")
    r.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank; default 8)")
    r.add_argument("--targets", default="all-linear", help="LoRA target modules, or all-linear (default)")
    r.add_argument("--lr", type=float, default=None, help="peak learning rate (default: train-loras' 1e-3)")
    r.add_argument("--top-layers", default=None,
                   help="LoRA only in the last N decoder layers, or 'all' (default 10, as train-loras; 'all' under "
                        "--recipe select)")
    r.add_argument("--recipe", choices=("single", "select"), default="single",
                   help="the adapters' recipe, as `train-loras --recipe` (see its --help for the candidates and their "
                        "cost); an adapter of the other recipe is retrained")
    r.add_argument("--select-lrs", default="1e-3", help="--recipe select: learning rates (default 1e-3)")
    r.add_argument("--select-points", default="225,450", help="--recipe select: checkpoints, examples seen")
    r.add_argument("--val-size", type=int, default=100, help="validation examples held out per task (default 100)")
    r.add_argument("--multitask-ranks", default="",
                   help="train the multi-task LoRA baseline at these ranks after the adapters ('8,32': multitask and "
                        "multitask-r32; default none) and evaluate it (method multitask)")
    r.add_argument("--multitask-examples", type=int, default=None,
                   help="training examples of each multi-task adapter in all (default 450 per task)")
    r.add_argument("--full-ft", metavar="DIR", help="a directory of `dlp-lora train-full` records to report")
    r.add_argument("--setting", default="all", help="settings to evaluate (default all)")
    r.add_argument("--no-teacher-forced", action="store_true", help="skip the teacher-forced QA variant")
    _common(r, model_help)
    r.set_defaults(func=cmd_reproduce)

    ac = sub.add_parser("arrow-check", help="is PEFT's Arrow wired right? its per-token top-1 on prompts of one task",
                        description="Build PEFT's Arrow over the library's adapters (as `dlp-lora eval` does) and "
                                    "report how often its per-layer, per-token top-1 adapter is the prompt's own task, "
                                    "on test prompts of each task, against chance (1 / adapters).")
    ac.add_argument("--library", required=True)
    ac.add_argument("--data", help="prepared data (default: the library's data_dir)")
    ac.add_argument("--prompts", type=int, default=10, help="test prompts per task (default 10)")
    ac.add_argument("--arrow-top-k", type=int, default=3)
    ac.add_argument("--model", help=model_help)
    ac.add_argument("--json", action="store_true")
    ac.set_defaults(func=cmd_arrow_check)

    rp = sub.add_parser("report", help="rewrite RESULTS.md and figures from a results.json",
                        description="Rewrite RESULTS.md and figures/ next to RESULTS_JSON from its numbers, without "
                                    "running anything; a hand-written discussion.md in the same folder is appended.")
    rp.add_argument("results", help="a results.json written by `dlp-lora eval` or `dlp-lora reproduce`")
    rp.add_argument("--full-ft", nargs="+", metavar="JSON",
                    help="records of `dlp-lora train-full` (OUT/<task>.json) to add to results.json and RESULTS.md "
                         "(the full fine-tune bound beside base and LoRA)")
    rp.set_defaults(func=cmd_report)
