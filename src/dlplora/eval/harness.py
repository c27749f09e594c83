"""The evaluation harness (`dlp-lora eval`, `dlp-lora reproduce`, `dlp-lora demo`): settings x methods.

Scoring: multiple choice by log-likelihood ranking (BIG-bench multiple_choice_grade, the main figure)
plus exact match of a greedy generated answer; exact-match tasks by greedy generation; generative tasks
by greedy generation then BLEU / ROUGE-1 / ROUGE-L (+ final-answer accuracy for GSM8K); optionally a
clearly labelled teacher-forced variant (argmax at the gold target positions, as the paper's code did).

Every prediction is cached (:mod:`.cache`); a method's "seconds" is the sum of the compute time of its
predictions (recorded with them, so it survives a resume) plus, for dlp, the routing time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..config import check_p
from ..errors import DLPLoRAError
from ..tasks import user_message
from .cache import PredictionCache, cache_namespace, library_signature, set_tag
from .metrics import scoring_kind, summarise
from .report import write_outputs
from .runners import FusedRunner, PeftRunner, build_arrow_model
from .scoring import choice_predictions, gen_budget, teacher_forced_predictions
from .settings import (RESULTS_FORMAT, SINGLE_METHODS, EvalConfig, build_conversations, build_stream, dlp_variant,
                       fixed_sets, setting_tasks, top_names)


def _dlp_routing(engine, p: float, weighting: str):
    """The engine's routing with the method's top-p and weighting (top-p selection: no top-k)."""
    return engine.routing.replace(p=p, weighting=weighting, top_k=None)


def _chunks(seq, n):
    for s in range(0, len(seq), n):
        yield seq[s:s + n]


def run_method_items(runner, method: str, items: list[dict], sets: list[dict], cache: PredictionCache, sig: str,
                     teacher_forced: bool = False, batch_size: int = 8, progress: bool = True, desc: str = "") -> list[dict]:
    """Predictions for `items` (in their order, batched as they come): per item {"choice", "gen", "tf"}
    (as applicable) and "seconds" (compute time, from the cache for cached predictions)."""
    from tqdm.auto import tqdm

    tok = runner.tokenizer
    jobs = []  # (what, item index)
    for i, it in enumerate(items):
        kind = scoring_kind(it["task"], it["ex"])
        if kind == "choice":
            jobs.append(("choice", i))
        jobs.append(("gen", i))
        if teacher_forced and kind == "gen" and not it.get("history"):
            jobs.append(("tf", i))
    preds = [{"seconds": 0.0} for _ in items]
    todo: dict[str, list[int]] = {"choice": [], "gen": [], "tf": []}
    ns = cache_namespace(method)
    for what, i in jobs:
        rec = cache.get(f"{sig}|{ns}|{items[i]['uid']}|{what}|{set_tag(sets[i])}")
        if rec is None:
            todo[what].append(i)
        else:
            preds[i][what] = rec["v"]
            preds[i]["seconds"] += float(rec.get("s", 0.0))
    # Batch like with like: generation by budget then prompt length, scoring by prompt length. A batch decodes until
    # its longest budget and pads to its longest prompt, so a shuffled stream batched as it comes wastes most of its
    # compute on finished rows and padding. The order depends only on the items, so every method gets the same batches.
    plen = {i: len(items[i]["ex"].get("input", "")) + sum(len(h.get("content", "")) for h in items[i].get("history") or [])
            for i in range(len(items))}
    budget = {i: gen_budget(tok, items[i]) for i in todo["gen"]}
    todo["gen"].sort(key=lambda i: (budget[i], plen[i]))
    todo["choice"].sort(key=lambda i: plen[i])
    todo["tf"].sort(key=lambda i: plen[i])
    n_todo = sum(len(v) for v in todo.values())
    bar = tqdm(total=len(jobs), initial=len(jobs) - n_todo, desc=desc or method, unit="pred", disable=not progress,
               leave=False, dynamic_ncols=True)
    try:
        for what in ("choice", "gen", "tf"):
            for idx in _chunks(todo[what], batch_size):
                t0 = time.perf_counter()
                exs = [items[i]["ex"] for i in idx]
                row_sets = [sets[i] for i in idx]
                hists = [items[i].get("history") or [] for i in idx]
                if what == "choice":
                    vals = choice_predictions(runner, exs, row_sets, hists, batch_size=2 * batch_size)
                elif what == "gen":
                    vals = runner.generate([user_message(ex) for ex in exs], hists, row_sets, [budget[i] for i in idx])
                else:
                    vals = teacher_forced_predictions(runner, exs, row_sets, batch_size=batch_size)
                dt = (time.perf_counter() - t0) / len(idx)
                recs = []
                for i, v in zip(idx, vals):
                    preds[i][what] = v
                    preds[i]["seconds"] += dt
                    recs.append({"k": f"{sig}|{ns}|{items[i]['uid']}|{what}|{set_tag(sets[i])}", "v": v, "s": round(dt, 5)})
                cache.put_many(ns, recs)
                bar.update(len(idx))
    finally:
        bar.close()
    return preds


def plugin_summary(library) -> dict | None:
    """The plugin's own record (params, held-out routing accuracy, training time) from its plugin.json."""
    cfg = library.plugin_dir() / "plugin.json"
    if not cfg.is_file():
        return None
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return None
    return {"params": d.get("params"), "report": d.get("report"), "default_p": d.get("default_p")}


def run_evaluation(config: EvalConfig | None = None, *, engine=None, arrow=None, log=print, **fields) -> dict:
    """Run the settings x methods grid of `config` (or an EvalConfig of the keyword `fields`); write
    OUT/results.json, OUT/RESULTS.md and OUT/figures/*.png unless ``config.write`` is off. `engine` (a
    DLPLoRA) and `arrow` (a (model, tokenizer) pair) may be given to reuse loaded models. ``config.p_sweep``:
    extra top-p values for `dlp` (each weighting) on the widest composite setting evaluated (results["p_sweep"])."""
    from ..engine import DLPLoRA
    from ..library import Library
    from ..tasks import load_split, parse_tasks

    if config is not None and not isinstance(config, EvalConfig):
        raise TypeError(f"run_evaluation takes an EvalConfig, got {type(config).__name__}")
    c = config if config is not None else EvalConfig(**fields)
    library, data, out, tasks, limit, p, model, seed = c.library, c.data, c.out, c.tasks, c.limit, c.p, c.model, c.seed
    teacher_forced, batch_size, progress, route_window, turns = (c.teacher_forced, c.batch_size, c.progress,
                                                                 c.route_window, c.turns)
    arrow_top_k = c.arrow_top_k
    t_start = time.perf_counter()
    lib = Library.open(library)
    data = data or lib.manifest.get("data_dir")
    if not data:
        raise DLPLoRAError(f"no test data: pass --data PREPARED_DIR (the library {library} records no data_dir)")
    if not Path(data).is_dir():
        raise DLPLoRAError(f"prepared data directory {data} does not exist; run `dlp-lora data prepare --out {data}`")
    names = lib.names
    if not names:
        raise DLPLoRAError(f"the library {library} holds no adapters")
    if tasks:
        wanted = parse_tasks(tasks, data) if isinstance(tasks, str) else list(tasks)
        missing = [t for t in wanted if t not in names]
        if missing:
            raise DLPLoRAError(f"task(s) {', '.join(missing)} have no adapter in the library {library} "
                               f"(it holds: {', '.join(names)})")
        eval_tasks = [t for t in names if t in wanted]
    else:
        eval_tasks = list(names)
    if limit is not None and limit < 1:
        raise DLPLoRAError(f"--limit must be at least 1, got {limit}")
    p = check_p(p, "--p")
    p_sweep = sorted({check_p(x, "--p-sweep values") for x in c.p_sweep or ()} | ({p} if c.p_sweep else set()))
    settings = list(c.settings)
    methods = list(c.methods)
    weightings = list(c.weightings)
    examples = {t: load_split(data, t, "test")[:limit] if limit else load_split(data, t, "test") for t in eval_tasks}
    out = Path(out)
    cache = PredictionCache(c.cache_dir or out / "cache")

    if engine is None:
        engine = DLPLoRA.from_library(lib.root, model=model, p=p)
    fused = FusedRunner(engine)
    sig = library_signature(lib)
    skipped: dict[str, str] = {}
    if "dlp" in methods and engine.router is None:
        skipped["dlp"] = "the library has no plugin (train one with `dlp-lora train-plugin`)"
    arrow_runner = None
    if "arrow" in methods:
        try:
            if arrow is None:
                arrow = build_arrow_model(lib, model=model, top_k=arrow_top_k, seed=seed)
            arrow_runner = PeftRunner(*arrow)
        except (DLPLoRAError, ValueError, RuntimeError, KeyError) as exc:
            skipped["arrow"] = f"could not build PEFT's Arrow model: {exc}"
    for m, why in skipped.items():
        log(f"skipping {m}: {why}")
    _warm_up(fused, arrow_runner, names)

    results = {"format": RESULTS_FORMAT, "config": {
        "library": str(Path(library).resolve()), "data": str(Path(data).resolve()), "adapters": names,
        "backbone": (engine.info.to_dict() if getattr(engine, "info", None) is not None else None),
        "tasks": eval_tasks, "limit": limit, "p": p, "weightings": weightings, "methods": methods, "settings": settings,
        "teacher_forced": teacher_forced, "seed": seed, "batch_size": batch_size, "route_window": route_window,
        "turns": turns, "arrow": {"top_k": min(arrow_top_k, len(names)), "temperature": 1.0,
                                  "implementation": "peft ArrowConfig / arrow_router LoRA variant"},
        "merge_all": f"every row uses all {len(names)} adapters with weight 1/{len(names)}",
        "command": c.command, "library_signature": sig, "p_sweep": p_sweep, "plugin": plugin_summary(lib)},
        "settings": {}, "skipped": skipped}

    def variants(setting):
        out_v = []
        for m in methods:
            if m in skipped or (setting == "single" and m not in SINGLE_METHODS):
                continue
            if m == "dlp":
                out_v += [(dlp_variant(w), "dlp", w) for w in weightings]
            else:
                out_v.append((m, m, None))
        return out_v

    # The widest composite runs first: the narrower settings then reuse its predictions, so every method of every
    # setting is timed on the same shuffled, mixed-task batches (single would otherwise batch base / LoRA by task).
    for setting in sorted(settings, key=lambda x: x != "composite-26"):
        s_tasks = setting_tasks(setting, examples)
        if not s_tasks:
            log(f"== {setting}: no task of this group in the library; skipped")
            results["settings"][setting] = {"tasks": [], "skipped": "no task of this group in the library"}
            continue
        s_res: dict = {"tasks": s_tasks, "n": {t: len(examples[t]) for t in s_tasks}, "methods": {}}
        if setting == "multiturn":
            convs = build_conversations(examples, s_tasks, turns=turns, seed=seed, limit=c.conversations)
            s_res["conversations"] = len(convs)
            s_res["turns"] = turns
            s_res["route_window"] = route_window
            if not convs:
                s_res["skipped"] = "needs at least 2 tasks"
                results["settings"][setting] = s_res
                continue
        else:
            stream = build_stream(examples, s_tasks, seed=seed) if setting != "single" else \
                [{"uid": f"{t}/{ex.get('id', i)}", "task": t, "ex": ex, "history": []}
                 for t in s_tasks for i, ex in enumerate(examples[t])]
        log(f"== {setting}: {', '.join(s_tasks)}" + (f" ({len(convs)} conversations of {turns} turns)"
                                                     if setting == "multiturn" else f" ({len(stream)} prompts)"))
        for name, method, weighting in variants(setting):
            runner = arrow_runner if method == "arrow" else fused
            desc = f"{setting} {name}"
            msig = f"{sig}-k{min(arrow_top_k, len(names))}s{seed}" if method == "arrow" else sig
            if setting == "multiturn":
                entry = _run_multiturn(engine, runner, name, method, weighting, convs, s_tasks, cache, msig, p,
                                       route_window, batch_size, progress, desc)
            else:
                t0 = time.perf_counter()
                route_log = None
                if method == "dlp":
                    sets = engine.route([user_message(it["ex"]) for it in stream],  # the prompt text only
                                        routing=_dlp_routing(engine, p, weighting))
                    route_log = top_names(sets)
                else:
                    sets = fixed_sets(method, stream, names)
                route_s = time.perf_counter() - t0
                preds = run_method_items(runner, name, stream, sets, cache, msig, teacher_forced=teacher_forced,
                                         batch_size=batch_size, progress=progress, desc=desc)
                entry = summarise(s_tasks, stream, preds, sets, route_s, route_log)
                if method == "dlp":
                    entry.update({"weighting": weighting, "p": p, "routing_seconds": round(route_s, 4)})
            s_res["methods"][name] = entry
            extra = ""
            if "router_accuracy" in entry:
                extra = f"; router picked the true task {entry['router_accuracy']:.0f}%, {entry['mean_adapters']:.2f} adapters"
            log(f"  {name:>10}: mean {entry['mean']:.2f} in {entry['seconds']:.1f}s{extra}")
        results["settings"][setting] = s_res
    results["settings"] = {x: results["settings"][x] for x in settings}  # report in the order asked
    single = (results["settings"].get("single") or {}).get("methods") or {}
    if "base" in single and "lora" in single:
        pairs = {t: (r, single["base"]["tasks"][t]) for t, r in single["lora"]["tasks"].items()
                 if "main" in r and "main" in single["base"]["tasks"].get(t, {})}
        flagged = lib.record_scores(pairs, source=f"dlp-lora eval --setting single (limit {limit or 'all'})")
        log(f"recorded adapter vs base scores of {len(pairs)} adapters in {lib.root / 'library.json'}")
        for t in flagged:
            a, b = pairs[t]
            log(f"  [FLAG] {t}: adapter {a['main']:.1f} does not beat base {b['main']:.1f} ({a['metric']})")
        results["flagged_adapters"] = flagged
    if p_sweep and "dlp" in methods and "dlp" not in skipped:
        results["p_sweep"] = _run_p_sweep(engine, fused, examples, settings, p_sweep, weightings, cache, sig,
                                          seed, batch_size, progress, log)
    results["cache"] = {"dir": str(cache.dir), "hits": cache.hits, "new_predictions": cache.new}
    results["run_seconds"] = round(time.perf_counter() - t_start, 1)
    if c.note:
        results["note"] = c.note
    if c.write:
        write_outputs(results, out, preamble=c.note)
    return results


def _run_p_sweep(engine, fused, examples, settings, p_values, weightings, cache, sig, seed, batch_size, progress,
                 log) -> dict:
    """`dlp` at each top-p value (and weighting) on the widest composite setting evaluated, against the oracle
    LoRA on the same stream. Teacher-forced scoring is skipped here (generation and choice ranking only)."""
    order = ["composite-26", "composite-17", "composite-9"]
    setting = next((s for s in order if s in settings), "composite-26")
    s_tasks = setting_tasks(setting, examples)
    stream = build_stream(examples, s_tasks, seed=seed)
    texts = [user_message(it["ex"]) for it in stream]
    log(f"== p sweep on {setting}: p in {', '.join(f'{x:g}' for x in p_values)}")
    lora_sets = fixed_sets("lora", stream, engine.names)
    preds = run_method_items(fused, "lora", stream, lora_sets, cache, sig, batch_size=batch_size, progress=progress,
                             desc="p sweep lora")
    lora = summarise(s_tasks, stream, preds, lora_sets, 0.0)
    rows = []
    for weighting in weightings:
        name = dlp_variant(weighting)
        for pv in p_values:
            t0 = time.perf_counter()
            sets = engine.route(texts, routing=_dlp_routing(engine, pv, weighting))
            route_s = time.perf_counter() - t0
            preds = run_method_items(fused, name, stream, sets, cache, sig, batch_size=batch_size, progress=progress,
                                     desc=f"p sweep {name} p={pv:g}")
            e = summarise(s_tasks, stream, preds, sets, route_s, top_names(sets))
            top_w = [max(s.values()) for s in sets if s]
            row = {"p": pv, "weighting": weighting, "method": name, "mean": e["mean"], "seconds": e["seconds"],
                   "router_accuracy": e["router_accuracy"], "mean_adapters": e["mean_adapters"],
                   "max_adapters": max((len(s) for s in sets), default=0),
                   "single_adapter_share": 100 * sum(len(s) == 1 for s in sets) / max(1, len(sets)),
                   "mean_top_weight": sum(top_w) / max(1, len(top_w)),
                   "gap_to_lora": e["mean"] - lora["mean"],
                   "tasks": {t: r.get("main") for t, r in e["tasks"].items()}}
            rows.append(row)
            log(f"  {name:>10} p={pv:<4g}: mean {e['mean']:.2f} (LoRA {lora['mean']:.2f}), "
                f"{e['mean_adapters']:.2f} adapters, top weight {row['mean_top_weight']:.2f}")
    return {"setting": setting, "tasks": s_tasks, "lora_mean": lora["mean"], "lora_seconds": lora["seconds"],
            "rows": rows}


def _warm_up(fused, arrow_runner, names) -> None:
    """One short generation per code path (base, one adapter, mixed rows, Arrow) before anything is timed:
    first calls pay one-off kernel and allocation costs that would otherwise land on whichever method runs first."""
    mixed = [{names[0]: 1.0}, {n: 1.0 / len(names) for n in names}]
    for sets in ([{}], [{names[0]: 1.0}], mixed):
        fused.generate(["warm up"] * len(sets), [[] for _ in sets], sets, [2] * len(sets))
    if arrow_runner is not None:
        arrow_runner.generate(["warm up"], [[]], [{}], [2])


def _run_multiturn(engine, runner, name, method, weighting, convs, tasks, cache, sig, p, route_window, batch_size,
                   progress, desc) -> dict:
    """Turn by turn over all conversations: each turn's history is the earlier turns with this method's own
    answers; the router reads engine.routing_text(turn, history, route_window)."""
    all_items, all_preds, all_sets, route_log = [], [], [], []
    histories = [[] for _ in convs]
    route_s = 0.0
    turns = len(convs[0])
    for t in range(turns):
        items = []
        for c, conv in enumerate(convs):
            step = conv[t]
            uid = "mt-w%d|%s" % (route_window, ">".join(x["uid"] for x in conv[: t + 1]))
            items.append({"uid": uid, "task": step["task"], "ex": step["ex"], "history": list(histories[c]), "turn": t})
        t0 = time.perf_counter()
        if method == "dlp":
            texts = [engine.routing_text(user_message(it["ex"]), it["history"], window=route_window) for it in items]
            sets = engine.route(texts, routing=_dlp_routing(engine, p, weighting))
            route_log += top_names(sets)
        else:
            sets = fixed_sets(method, items, engine.names)
        route_s += time.perf_counter() - t0
        preds = run_method_items(runner, name, items, sets, cache, sig, teacher_forced=False, batch_size=batch_size,
                                 progress=progress, desc=f"{desc} turn {t + 1}")
        for c, (it, pr) in enumerate(zip(items, preds)):
            histories[c] = histories[c] + [{"role": "user", "content": user_message(it["ex"])},
                                           {"role": "assistant", "content": pr.get("gen", "")}]
        all_items += items
        all_preds += preds
        all_sets += sets
    entry = summarise(tasks, all_items, all_preds, all_sets, route_s, route_log if method == "dlp" else None)
    per_turn = []
    for t in range(turns):
        idx = [i for i, it in enumerate(all_items) if it["turn"] == t]
        sub = summarise(tasks, [all_items[i] for i in idx], [all_preds[i] for i in idx], [all_sets[i] for i in idx], 0.0,
                         [route_log[i] for i in idx] if method == "dlp" else None)
        per_turn.append({k: v for k, v in sub.items() if k in ("mean", "router_accuracy", "mean_adapters", "items")})
    entry["per_turn"] = per_turn
    if method == "dlp":
        entry.update({"weighting": weighting, "p": p, "routing_seconds": round(route_s, 4)})
    return entry
