"""`dlp-lora reproduce`: the paper's pipeline end to end on the embedded backbone.

data prepare -> train-loras -> train-plugin -> every setting and method of the evaluation harness,
writing OUT/RESULTS.md, OUT/results.json and OUT/figures/. Every stage is resumable: prepared tasks are
reused, :func:`dlplora.library.train_library` skips finished adapters, the plugin is reused while it
matches the library, and the evaluation caches every prediction (WORK/cache).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path



def _plugin_ready(lib) -> bool:
    cfg = lib.plugin_dir() / "plugin.json"
    if not cfg.is_file() or not (lib.plugin_dir() / "model.safetensors").is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("labels") == lib.names
    except json.JSONDecodeError:
        return False


def run_reproduce(out: str | os.PathLike = "docs", work: str | os.PathLike = os.path.join("runs", "reproduce"),
                  extra_data=None, tasks: str = "all", limit: int | None = None, steps: int | None = None, model=None,
                  settings="all", methods=None, p: float = 0.6, weightings="softmax,renorm", teacher_forced: bool = True,
                  top_layers: int | None = 10, batch_size: int = 8, progress: bool = True, command: str | None = None,
                  p_sweep="", conversations: int | None = None, log=print) -> dict:
    from .evaluation import (parse_methods, parse_p_values, parse_settings, parse_weightings, run_evaluation,
                             write_outputs)
    from .library import Library, train_library
    from .plugin import train_plugin_from_data
    from .tasks import TASKS, format_summary, parse_tasks, prepare
    from .training import TrainConfig

    t0 = time.time()
    work = Path(work)
    data_dir = work / "data"
    lib_dir = work / "library"
    names = parse_tasks(tasks, data_dir)
    stages = {}

    log(f"== 1/4 data: {len(names)} tasks -> {data_dir}")
    t = time.time()
    todo = [n for n in names if not (data_dir / n / "test.jsonl").is_file() or not (data_dir / n / "train.jsonl").is_file()]
    if todo:
        log(format_summary(prepare(todo, data_dir, extra_data=extra_data, log=log)))
    else:
        log("all tasks already prepared")
    stages["data"] = round(time.time() - t, 1)

    cfg = TrainConfig(top_layers=top_layers) if steps is None else TrainConfig(steps=steps, top_layers=top_layers)
    steps = cfg.steps
    log(f"== 2/4 adapters: {steps} steps each -> {lib_dir}")
    t = time.time()
    train_library(names, data_dir, lib_dir, model=model, cfg=cfg, eval_limit=0, log=log)
    lib = Library.open(lib_dir)
    stages["adapters"] = round(time.time() - t, 1)

    log("== 3/4 router plugin")
    t = time.time()
    if _plugin_ready(lib):
        log(f"reusing the plugin in {lib.plugin_dir()}")
    else:
        plugin, report = train_plugin_from_data(data_dir, lib.names)
        plugin.save(lib.plugin_dir())
        log(f"plugin: held-out routing accuracy {100 * report['accuracy']:.1f}% over {report['tasks']} tasks")
    stages["plugin"] = round(time.time() - t, 1)

    log("== 4/4 evaluation")
    t = time.time()
    results = run_evaluation(lib_dir, data=data_dir, out=out, settings=parse_settings(settings),
                             methods=parse_methods(methods), tasks=names, limit=limit, p=p,
                             weightings=parse_weightings(weightings), teacher_forced=teacher_forced, model=model,
                             batch_size=batch_size, cache_dir=work / "cache", progress=progress, write=False,
                             command=command, conversations=conversations,
                             p_sweep=parse_p_values(p_sweep), log=log)
    stages["evaluation"] = round(time.time() - t, 1)
    results["reproduce"] = {"stages_seconds": stages, "total_seconds": round(time.time() - t0, 1), "steps": steps,
                            "work": str(work.resolve()), "tasks": names,
                            "missing_from_26": [n for n in TASKS if n not in names]}
    recorded = {"adapters_training_seconds": round(sum(float(e.get("wall_seconds", 0) or 0)
                                                       for e in lib.manifest["adapters"].values()), 1)}
    plug_report = (results.get("config", {}).get("plugin") or {}).get("report") or {}
    if plug_report.get("train_seconds") is not None:
        recorded["plugin_training_seconds"] = plug_report["train_seconds"]
    results["reproduce"]["recorded_seconds"] = recorded
    pre = (f"Produced by `dlp-lora reproduce` ({len(names)} tasks, {steps} training steps per adapter, "
           f"{'all' if not limit else limit} test examples per task). This invocation's stages took "
           + ", ".join(f"{k} {v:.0f}s" for k, v in stages.items())
           + f" (finished stages are reused); the library records {recorded['adapters_training_seconds'] / 60:.1f} min "
           f"of adapter training in total"
           + (f" and the plugin {recorded['plugin_training_seconds']:.0f}s" if "plugin_training_seconds" in recorded else "")
           + ".")
    write_outputs(results, out, preamble=pre)
    log(f"wrote {Path(out) / 'RESULTS.md'}, results.json and figures/")
    return results


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, without the value of --note (a paragraph that belongs in the report, not here)."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--note":
            kept.append("--note '...'")
            skip = True
            continue
        if a.startswith("--note="):
            kept.append("--note '...'")
            continue
        kept.append(shlex.quote(a))
    return "dlp-lora " + " ".join(kept)
