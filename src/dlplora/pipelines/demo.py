"""The main job (`dlp-lora demo`, `make demo`): the whole DLP-LoRA idea, end to end, on a 2-core CPU.

1. prepare a small mixed suite (3 multiple-choice BIG-bench tasks + 1 scored by the exact match of a generated answer);
2. train their LoRA adapters with a short budget, then the router plugin;
3. a small composite evaluation: base vs oracle single LoRA vs DLP-LoRA, with the time ratio;
4. the paper's case study live: a 3-turn conversation that mixes tasks, re-routed at every turn;
5. where everything was written, and what to try next.

Everything is cached: a second run reuses the data, adapters and plugin.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..paths import atomic_write_text
from . import ensure_plugin

# BIG-bench tasks where a briefly trained adapter clearly beats the base model, chosen from measurements (2026-11-29,
# `make demo`: 24 steps, 32 test prompts per task, options shuffled; LoRA vs base wins-losses on the same prompts):
# ConParaKC 62 -> 97 (11-0), CSAlg 22 -> 50 (10-1), DisflQA 0 -> 22 (7-0), UnitConv 34 -> 62 (14-5, p = 0.064).
# QuesSel looked like a clear win (84 -> 100, 5-0) only while the options were listed in the task file's order,
# answer first: with them shuffled its adapter scores 50 against 59 (4-7). LingPuzz (12-6), ObjCount (8-0 of 100 in
# the full library) and LogDeduc (12-22 of 100: worse than base) were also tried.
DEMO_TASKS = ("contextual_parametric_knowledge_conflicts", "cs_algorithms", "unit_conversion", "disfl_qa")


def run_demo(out: str | os.PathLike, model=None, extra_data=None, tasks=DEMO_TASKS, data_dir=None, steps: int = 24,
             max_len: int = 256, top_layers: int | None = 10, n_eval: int = 32, conversation: list[str] | None = None, log=print) -> dict:
    from ..backbone import load_tokenizer
    from ..engine import DLPLoRA
    from ..eval.harness import run_evaluation
    from ..eval.settings import EvalConfig
    from ..library import Library
    from ..tasks import is_prepared, prepare
    from ..train import TrainConfig, train_library

    t_start = time.time()
    out = Path(out).resolve()
    stages: dict[str, float] = {}

    def stage(name, t0):
        stages[name] = round(time.time() - t0, 1)

    log(f"== 1. data: {', '.join(tasks)}")
    t0 = time.time()
    if data_dir is None:
        data_dir = out / "data"
        if not all(is_prepared(data_dir, t) for t in tasks):
            from ..tasks import format_summary

            # the tokenizer alone is enough for the prompt-length statistics (the engine loads the model later)
            log(format_summary(prepare(list(tasks), data_dir, extra_data=extra_data,
                                       tokenizer=load_tokenizer(model), log=log)))
        else:
            log(f"reusing {data_dir}")
    stage("data", t0)

    log(f"== 2. adapters ({steps} steps each, rank 8 on q_proj/v_proj of the top {top_layers} layers) and the router plugin")
    t0 = time.time()
    lib_dir = out / "library"
    # LoRA in the top layers only: the backward pass stops there, so the demo trains ~2x faster on a CPU
    # a short budget: q/v at a high learning rate learns the answer formats in a dozen steps (the library's 900-example
    # recipe, all linear layers at 1e-3, needs its hundred steps)
    cfg = TrainConfig(steps=steps, batch_size=8, max_len=max_len, top_layers=top_layers, targets=("q_proj", "v_proj"),
                      lr=5e-3)
    train_library(list(tasks), data_dir, lib_dir, model=model, cfg=cfg, eval_limit=0, log=log)
    lib = Library.open(lib_dir)
    stage("adapters", t0)
    t0 = time.time()
    ensure_plugin(lib, data_dir, log)
    stage("plugin", t0)

    log(f"== 3. composite evaluation: {n_eval} test prompts per task, shuffled, no task labels for DLP-LoRA")
    t0 = time.time()
    engine = DLPLoRA.from_library(lib_dir, model=model)
    # The evaluation harness of `dlp-lora eval`, composite setting, three methods; its prediction cache makes a rerun
    # on the same library, plugin and prompts reuse the previous predictions (and their recorded times).
    cache_dir = out / "eval-cache"
    reused = cache_dir.is_dir() and any(cache_dir.glob("*.jsonl"))
    run = run_evaluation(EvalConfig(library=lib_dir, data=data_dir, out=out, settings=("composite-26",),
                                    methods=("base", "lora", "dlp"), weightings=("softmax",), tasks=list(tasks),
                                    limit=n_eval, model=model, cache_dir=cache_dir, progress=False, write=False),
                         engine=engine, log=log)
    results = run["settings"]["composite-26"]["methods"]
    if reused and run["cache"]["new_predictions"] == 0:
        log(f"reusing the evaluation of a previous run with the same library and plugin (delete {cache_dir} to redo it)")
    table = format_demo_table(results, tasks)
    log(table)
    stage("evaluation", t0)

    log("== 4. case study: one conversation, three tasks, re-routed at every turn")
    t0 = time.time()
    conversation = conversation or [
        "How many meters is 3.5 kilometers?",
        # written like DisflQA's prompts: the same question without them ("..., no wait, ...? context: ...") is far
        # from every adapter's prompts for this 4-task router, and goes to the base model
        "When was the Treaty of Paris no wait the Treaty of Rome signed ?\ncontext: The Treaty of Rome was signed in "
        "1957 by Belgium , France , Italy , Luxembourg , the Netherlands and West Germany .",
        "Question: who painted the Mona Lisa?\nContext: The Mona Lisa was painted by Raphael in 1503.",
    ]
    session = engine.chat(max_new_tokens=48)
    turns = []
    for i, text in enumerate(conversation, 1):
        res = session.send(text)
        chosen = ", ".join(f"{a['name']} {a['weight']:.2f}" for a in res["routing"]["adapters"]) or "none (base)"
        log(f"turn {i} user: {text}")
        log(f"       adapters: {chosen}")
        log(f"       answer: {res['text'].strip()}")
        turns.append({"user": text, "routing": res["routing"], "answer": res["text"]})
    stage("case_study", t0)

    report = {"tasks": list(tasks), "results": results, "case_study": turns, "stages_seconds": stages,
              "total_seconds": round(time.time() - t_start, 1), "library": str(lib_dir), "data": str(data_dir)}
    report_path = out / "report.json"
    atomic_write_text(report_path, json.dumps(report, indent=2, default=float))
    atomic_write_text(out / "report.md", f"# dlp-lora demo\n\n{table}\n")
    log("== 5. done in {:.0f}s".format(report["total_seconds"]))
    log(f"library: {lib_dir}\nplugin:  {lib.plugin_dir()}\nreport:  {report_path} (and report.md)")
    log("next:")
    log(f"  dlp-lora chat --library {lib_dir}")
    log(f"  dlp-lora generate --library {lib_dir} \"How many legs do two cats have?\"")
    log(f"  dlp-lora serve --library {lib_dir} --port 8000")
    log("  dlp-lora reproduce --extra-data DIR     # the paper's 26 tasks (hours on a CPU); writes runs/reproduce/")
    return report


def _versus_base(results: dict, task: str) -> str:
    """The adapter against the base model on the same prompts: wins-losses and the exact sign test's p."""
    from ..stats import main_scores, paired_test

    a, b = main_scores(results["lora"]["tasks"][task]), main_scores(results["base"]["tasks"][task])
    if a is None or b is None or len(a) != len(b) or not a:
        return ""
    t = paired_test(a, b)
    return f"{t['wins']}-{t['losses']}, p={t['p']:.2g}" + (" ✓" if t["better"] else "")


def format_demo_table(results: dict, tasks) -> str:
    methods = [m for m in ("base", "lora", "dlp") if m in results]
    label = {"base": "base", "lora": "single LoRA (oracle)", "dlp": "DLP-LoRA"}
    paired = "base" in results and "lora" in results
    head = "| task | metric | " + " | ".join(label[m] for m in methods) + (" | LoRA vs base |" if paired else " |")
    lines = [head, "|" + "---|" * (len(methods) + 2 + paired)]
    for t in tasks:
        r0 = results[methods[0]]["tasks"][t]
        lines.append(f"| {t} | {r0['metric']} | " + " | ".join(f"{results[m]['tasks'][t]['main']:.1f}" for m in methods)
                     + (f" | {_versus_base(results, t)} |" if paired else " |"))
    lines.append("| **mean** | | " + " | ".join(f"**{results[m]['mean']:.1f}**" for m in methods)
                 + (" | |" if paired else " |"))
    lines.append("| time (s) | | " + " | ".join(f"{results[m]['seconds']:.1f}" for m in methods)
                 + (" | |" if paired else " |"))
    if paired:
        lines.append("\nLoRA vs base: prompts where the adapter scores higher - lower than the base model, and the exact "
                     "two-sided sign test's p (✓: better at 95%).")
    if "lora" in results and "dlp" in results:
        ratio = results["dlp"]["seconds"] / max(results["lora"]["seconds"], 1e-9)
        lines.append(f"\nDLP-LoRA / single-LoRA time: {ratio:.2f}x; router picked the true task for "
                     f"{results['dlp']['router_accuracy']:.0f}% of prompts, {results['dlp']['mean_adapters']:.2f} adapters "
                     f"per prompt on average.")
    return "\n".join(lines)
