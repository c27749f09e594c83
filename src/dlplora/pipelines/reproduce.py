"""`dlp-lora reproduce`: the paper's pipeline end to end on the embedded backbone.

data prepare -> train-loras -> train-plugin -> every setting and method of the evaluation harness,
writing OUT/RESULTS.md, OUT/results.json and OUT/figures/. Every stage is resumable: prepared tasks are
reused, :func:`dlplora.train.train_library` skips finished adapters, the plugin is reused while it
matches the library, and the evaluation caches every prediction (WORK/cache).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_P
from ..errors import DLPLoRAError
from . import ensure_plugin


@dataclass
class ReproduceConfig:
    """What `dlp-lora reproduce` runs (each field is a flag of the command; see ``dlp-lora reproduce --help``)."""

    out: str | os.PathLike = field(default=os.path.join("runs", "reproduce"),
                                   metadata={"help": "where RESULTS.md, results.json, figures/ go (docs/ only when "
                                                     "asked for: it holds the committed results)"})
    work: str | os.PathLike = field(default=os.path.join("runs", "reproduce"),
                                    metadata={"help": "data, library and prediction cache"})
    extra_data: str | os.PathLike | None = field(default=None, metadata={"help": "the 6 non-BIG-bench tasks"})
    tasks: str = field(default="all", metadata={"help": "'all', 'mcq', 'qa' or comma-separated task names"})
    limit: int | None = field(default=None, metadata={"help": "test examples per task (None: all)"})
    steps: int | None = field(default=None, metadata={"help": "training steps per adapter (None: TrainConfig's)"})
    examples: int | None = field(default=None, metadata={"help": "training examples per adapter (instead of steps)"})
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    targets: str = field(default="all-linear", metadata={"help": "target modules, or all-linear"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (None: TrainConfig's)"})
    top_layers: int | None = field(default=10, metadata={"help": "LoRA only in the last N decoder layers"})
    model: str | os.PathLike | None = field(default=None, metadata={"help": "base model (default: embedded)"})
    settings: str = field(default="all", metadata={"help": "settings to evaluate (comma-separated)"})
    methods: str | None = field(default=None, metadata={"help": "methods to evaluate (default: all)"})
    p: float = field(default=DEFAULT_P, metadata={"help": "DLP top-p threshold"})
    weightings: str = field(default="softmax,renorm", metadata={"help": "DLP fusion weightings to report"})
    teacher_forced: bool = field(default=True, metadata={"help": "also score generative tasks teacher-forced"})
    batch_size: int = field(default=16, metadata={"help": "prompts per batch"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    command: str | None = field(default=None, metadata={"help": "the command line, recorded in the report"})
    p_sweep: str = field(default="", metadata={"help": "extra top-p values for dlp, comma-separated"})
    conversations: int | None = field(default=None, metadata={"help": "multiturn: at most this many conversations"})
    mcq_exact_match: bool = field(default=False, metadata={"help": "also the generated answers' exact match (MCQ)"})
    mt_mcq_reply: str = field(default="choice", metadata={
        "help": "multiturn: a multiple-choice turn's reply in the history, 'choice' or 'generated' (EvalConfig)"})
    recipe: str = field(default="single", metadata={"help": "single (one run per task) or select (validation-chosen; "
                                                           "train-loras --recipe)"})
    select_lrs: str = field(default="1e-3", metadata={"help": "--recipe select: learning rates, one run each"})
    select_points: str = field(default="225,450", metadata={"help": "--recipe select: checkpoints (examples)"})
    val_size: int = field(default=100, metadata={"help": "--recipe select: validation examples held out per task"})
    multitask_ranks: str = field(default="", metadata={
        "help": "ranks of the multi-task LoRA baselines to train ('8,32': multitask, multitask-r32); '' for none"})
    multitask_examples: int | None = field(default=None, metadata={
        "help": "training examples of each multi-task adapter in all (None: 450 per task)"})
    full_ft: str | None = field(default=None, metadata={
        "help": "a directory of `dlp-lora train-full` records (TASK.json) to report beside base and LoRA"})
    ray_address: str | None = field(default=None, metadata={
        "help": "train the adapters and compute the grid's predictions on the Ray cluster at this address"})
    ray_workers: int | None = field(default=None, metadata={"help": "evaluation workers on the cluster (EvalConfig)"})


def multitask_name(rank: int, task_rank: int) -> str:
    """The multi-task adapter of `rank`: "multitask" at the task adapters' rank, else "multitask-r<rank>"."""
    return "multitask" if rank == task_rank else f"multitask-r{rank}"


def run_reproduce(config: ReproduceConfig | None = None, *, log=print, **fields) -> dict:
    """Run the pipeline of `config` (or a ReproduceConfig of the keyword `fields`)."""
    from ..eval.harness import run_evaluation
    from ..eval.report import write_outputs
    from ..eval.settings import EvalConfig, parse_methods, parse_p_values, parse_settings, parse_weightings
    from ..library import Library, training_seconds
    from ..tasks import TASKS, format_summary, is_prepared, parse_tasks, prepare
    from ..train import TrainConfig, train_library
    from ..train.multitask import train_multitask
    from ..train.select import Selection, parse_floats, parse_ints

    c = config if config is not None else ReproduceConfig(**fields)
    if c.ray_address:  # no cluster there: one clear line before any stage runs
        from ..cluster import join_ray

        join_ray(c.ray_address)
    out, work, extra_data, tasks, limit, steps, model = c.out, c.work, c.extra_data, c.tasks, c.limit, c.steps, c.model
    top_layers = c.top_layers
    t0 = time.time()
    work = Path(work)
    data_dir = work / "data"
    lib_dir = work / "library"
    names = parse_tasks(tasks, data_dir)
    stages = {}

    log(f"== 1/4 data: {len(names)} tasks -> {data_dir}")
    t = time.time()
    todo = [n for n in names if not is_prepared(data_dir, n)]
    if todo:
        log(format_summary(prepare(todo, data_dir, extra_data=extra_data, log=log)))
    else:
        log("all tasks already prepared")
    stages["data"] = round(time.time() - t, 1)

    from ..train.lora import parse_targets

    cfg = TrainConfig(top_layers=top_layers, rank=c.rank, alpha=2.0 * c.rank, targets=parse_targets(c.targets))
    if c.lr is not None:
        cfg.lr = c.lr
    if c.examples is not None:
        cfg.steps = max(1, -(-c.examples // cfg.batch_size))
    if steps is not None:
        cfg.steps = steps
    steps = cfg.steps
    selection = None
    if c.recipe == "select":
        selection = Selection(lrs=parse_floats(c.select_lrs, "--select-lrs"),
                              points=parse_ints(c.select_points, "--select-points"), val_size=c.val_size)
        steps = max(1, -(-max(selection.points) // cfg.batch_size))
    elif c.recipe != "single":
        raise DLPLoRAError(f"--recipe must be single or select, got {c.recipe!r}")
    log(f"== 2/4 adapters ({c.recipe} recipe): {steps} steps each -> {lib_dir}")
    t = time.time()
    train_library(names, data_dir, lib_dir, model=model, cfg=cfg, eval_limit=0, log=log, selection=selection,
                  ray_address=c.ray_address)
    for rank in parse_ints(c.multitask_ranks or "", "--multitask-ranks"):
        mt = TrainConfig(top_layers=top_layers, rank=rank, alpha=2.0 * rank, targets=cfg.targets, lr=cfg.lr)
        train_multitask(lib_dir, data_dir, cfg=mt, name=multitask_name(rank, c.rank), tasks=names,
                        examples=c.multitask_examples, val_size=c.val_size, model=model, log=log)
    lib = Library.open(lib_dir)
    stages["adapters"] = round(time.time() - t, 1)

    log("== 3/4 router plugin")
    t = time.time()
    ensure_plugin(lib, data_dir, log)
    stages["plugin"] = round(time.time() - t, 1)

    log("== 4/4 evaluation")
    t = time.time()
    results = run_evaluation(EvalConfig(
        library=lib_dir, data=data_dir, out=out, settings=parse_settings(c.settings), methods=parse_methods(c.methods),
        tasks=names, limit=limit, p=c.p, weightings=parse_weightings(c.weightings), teacher_forced=c.teacher_forced,
        model=model, batch_size=c.batch_size, cache_dir=work / "cache", progress=c.progress, write=False,
        command=c.command, conversations=c.conversations, mcq_exact_match=c.mcq_exact_match, p_sweep=parse_p_values(c.p_sweep),
        mt_mcq_reply=c.mt_mcq_reply, ray_address=c.ray_address, ray_workers=c.ray_workers), log=log)
    stages["evaluation"] = round(time.time() - t, 1)
    results["reproduce"] = {"stages_seconds": stages, "total_seconds": round(time.time() - t0, 1), "steps": steps,
                            "train_config": cfg.to_dict(),
                            "work": str(work.resolve()), "tasks": names,
                            "missing_from_26": [n for n in TASKS if n not in names]}
    recorded = {"adapters_training_seconds": round(training_seconds({n: lib.entry(n) for n in lib.names}), 1),
                "multitask_training_seconds": {n: lib.entry(n).get("wall_seconds") for n in lib.special_names}}
    plug_report = (results.get("config", {}).get("plugin") or {}).get("report") or {}
    if plug_report.get("train_seconds") is not None:
        recorded["plugin_training_seconds"] = plug_report["train_seconds"]
    recorded["evaluation_compute_seconds"] = results["cache"]["grid"]["compute_seconds"]
    keep = ("examples_seen", "steps", "tokens", "first_loss", "final_loss", "train_seconds", "wall_seconds",
            "tokens_per_second")
    results["reproduce"]["adapters"] = {n: {k: e[k] for k in keep if k in e} for n, e in lib.manifest["adapters"].items()
                                        if n in names}
    results["reproduce"]["recorded_seconds"] = recorded
    results["reproduce"]["hours"] = {"library": round(recorded["adapters_training_seconds"] / 3600, 3),
                                     "multitask": {n: round(float(s or 0) / 3600, 3)
                                                   for n, s in recorded["multitask_training_seconds"].items()},
                                     "grid": round(recorded["evaluation_compute_seconds"] / 3600, 3),
                                     "budget": {"library": 3.0, "grid": 3.0}}
    results["reproduce"]["recipe"] = {"preset": c.recipe, **(selection.to_dict() if selection else {})}
    if c.full_ft:
        from ..eval.versus import load_full_ft

        results["full_finetune"] = load_full_ft(sorted(Path(c.full_ft).glob("*.json")))
    recipe = (f"{steps} training steps of {cfg.batch_size} examples per adapter (rank {cfg.rank} on "
              f"{', '.join(cfg.targets)} of the top {cfg.top_layers or 'all'} layers, peak learning rate {cfg.lr:g})"
              if selection is None else
              f"adapters chosen per task on {selection.val_size} held-out training examples among learning rates "
              f"{', '.join(f'{x:g}' for x in selection.lrs)} and checkpoints at "
              f"{', '.join(str(x) for x in selection.points)} examples (rank {cfg.rank} on {', '.join(cfg.targets)} of "
              f"the top {cfg.top_layers or 'all'} layers; library.json records each choice)")
    pre = (f"Produced by `dlp-lora reproduce` ({len(names)} tasks, {recipe}, "
           f"{'all' if not limit else limit} test examples per task). This invocation's stages took "
           + ", ".join(f"{k} {v:.0f}s" for k, v in stages.items())
           + f" (finished stages are reused); the library records {recorded['adapters_training_seconds'] / 60:.1f} min "
           f"of adapter training in total"
           + (f" and the plugin {recorded['plugin_training_seconds']:.0f}s" if "plugin_training_seconds" in recorded else "")
           + f", and the evaluation grid's predictions record {recorded['evaluation_compute_seconds'] / 60:.1f} min of "
             "compute, over every run that computed them.")
    write_outputs(results, out, preamble=pre)
    log(f"wrote {Path(out) / 'RESULTS.md'}, results.json and figures/")
    return results
