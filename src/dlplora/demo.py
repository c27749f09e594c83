"""The main job (`dlp-lora demo`, `make demo`): the whole DLP-LoRA idea, end to end, on a 2-core CPU.

1. prepare a small mixed suite (2 multiple-choice + 2 generative BIG-bench tasks);
2. train their LoRA adapters with a short budget, then the router plugin;
3. a small composite evaluation: base vs oracle single LoRA vs DLP-LoRA, with the time ratio;
4. the paper's case study live: a 3-turn conversation that mixes tasks, re-routed at every turn;
5. where everything was written, and what to try next.

Everything is cached: a second run reuses the data, adapters and plugin.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .paths import atomic_write_text

# Short-prompt tasks where a briefly trained adapter clearly beats the base model (it learns the answer format).
DEMO_TASKS = ("contextual_parametric_knowledge_conflicts", "winowhy", "object_counting", "strategyqa")


def _plugin_ready(lib, plugin_dir: Path) -> bool:
    cfg = plugin_dir / "plugin.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("labels") == lib.names
    except json.JSONDecodeError:
        return False


def run_demo(out: str | os.PathLike, model=None, extra_data=None, tasks=DEMO_TASKS, data_dir=None, steps: int = 12,
             max_len: int = 160, top_layers: int | None = 10, n_eval: int = 16, conversation: list[str] | None = None, log=print) -> dict:
    from .backbone import load_tokenizer
    from .engine import DLPLoRA
    from .evaluation import evaluate_composite
    from .library import Library, train_library
    from .plugin import train_plugin_from_data
    from .tasks import load_split, prepare
    from .training import TrainConfig

    t_start = time.time()
    out = Path(out).resolve()
    stages: dict[str, float] = {}

    def stage(name, t0):
        stages[name] = round(time.time() - t0, 1)

    log(f"== 1. data: {', '.join(tasks)}")
    t0 = time.time()
    if data_dir is None:
        data_dir = out / "data"
        if not all((data_dir / t / "test.jsonl").is_file() for t in tasks):
            from .tasks import format_summary

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
    cfg = TrainConfig(steps=steps, batch_size=8, max_len=max_len, top_layers=top_layers)
    train_library(list(tasks), data_dir, lib_dir, model=model, cfg=cfg, eval_limit=0, log=log)
    lib = Library.open(lib_dir)
    stage("adapters", t0)
    t0 = time.time()
    if _plugin_ready(lib, lib.plugin_dir()):
        log(f"reusing the plugin in {lib.plugin_dir()}")
    else:
        plugin, report = train_plugin_from_data(data_dir, lib.names)
        plugin.save(lib.plugin_dir())
        log(f"plugin: {report['params']:,} parameters, held-out routing accuracy {100 * report['accuracy']:.1f}% "
            f"over {report['tasks']} tasks, trained in {report['train_seconds']:.1f}s")
    stage("plugin", t0)

    log(f"== 3. composite evaluation: {n_eval} test prompts per task, shuffled, no task labels for DLP-LoRA")
    t0 = time.time()
    engine = DLPLoRA.from_library(lib_dir, model=model)
    # A rerun on the same library, plugin and prompts reuses the previous evaluation.
    cache_path = out / "evaluation_cache.json"
    key = hashlib.sha256(json.dumps([lib.manifest, (lib.plugin_dir() / "plugin.json").read_text(), list(tasks),
                                     n_eval], sort_keys=True, default=str).encode()).hexdigest()
    cached = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cached.get("key") == key:
        results = cached["results"]
        log(f"reusing the evaluation of a previous run with the same library and plugin (delete {cache_path} to redo it)")
    else:
        examples = {t: load_split(data_dir, t, "test")[:n_eval] for t in tasks}
        results = evaluate_composite(engine, examples, methods=("base", "lora", "dlp"), log=log)
        atomic_write_text(cache_path, json.dumps({"key": key, "results": results}, default=float))
    table = format_demo_table(results, tasks)
    log(table)
    stage("evaluation", t0)

    log("== 4. case study: one conversation, three tasks, re-routed at every turn")
    t0 = time.time()
    conversation = conversation or [
        "I have a chair, two tables, and a bed. How many objects do I have?",
        "Is it common to see frost during some college commencements?",
        "The trophy doesn't fit into the brown suitcase because it is too large. The 'it' refers to the trophy "
        "because the trophy is too large to fit. Is the above reasoning correct or incorrect?",
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
    log("  dlp-lora reproduce --extra-data DIR     # the paper's 26 tasks (hours on a CPU)")
    return report


def format_demo_table(results: dict, tasks) -> str:
    methods = [m for m in ("base", "lora", "dlp") if m in results]
    label = {"base": "base", "lora": "single LoRA (oracle)", "dlp": "DLP-LoRA"}
    head = "| task | metric | " + " | ".join(label[m] for m in methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]
    for t in tasks:
        r0 = results[methods[0]]["tasks"][t]
        lines.append(f"| {t} | {r0['metric']} | " + " | ".join(f"{results[m]['tasks'][t]['main']:.1f}" for m in methods) + " |")
    lines.append("| **mean** | | " + " | ".join(f"**{results[m]['mean']:.1f}**" for m in methods) + " |")
    lines.append("| time (s) | | " + " | ".join(f"{results[m]['seconds']:.1f}" for m in methods) + " |")
    if "lora" in results and "dlp" in results:
        ratio = results["dlp"]["seconds"] / max(results["lora"]["seconds"], 1e-9)
        lines.append(f"\nDLP-LoRA / single-LoRA time: {ratio:.2f}x; router picked the true task for "
                     f"{results['dlp']['router_accuracy']:.0f}% of prompts, {results['dlp']['mean_adapters']:.2f} adapters "
                     f"per prompt on average.")
    return "\n".join(lines)
