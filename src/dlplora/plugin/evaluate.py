"""Measuring the router: accuracy per view (the robustness table), leave-tasks-out (prompts that belong
to no adapter), and routing latency."""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DLPLoRAError
from .model import check_texts
from .router import Plugin
from .views import VIEWS, view_texts

BASE = "<base>"  # the prediction "use the base model" in tables and confusions
# Prompts of the 26 tasks in a user's own words, from sources the router never trains on (built by
# scripts/build_own_words.py; each row says where it comes from; docs/plugin.md, "Own words").
OWN_WORDS = Path(__file__).with_name("own_words.jsonl")


def predict_all(plugin: Plugin, texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(predictions with the base decision, `BASE` for prompts sent to the base model; top-1 adapter
    predictions with it off), from one scoring pass."""
    names, far = plugin.decide(list(texts))
    return [BASE if f else n for n, f in zip(names, far)], names


def accuracy_table(gold: Sequence[str], pred: Sequence[str | None], names: Sequence[str],
                   top_confusions: int = 10) -> dict:
    """Mean over tasks of top-1 accuracy (a prompt sent to the base model counts as wrong), micro
    accuracy, per-task accuracy and the most common confusions."""
    per_task, conf = {}, Counter()
    for task in names:
        pairs = [(g, p) for g, p in zip(gold, pred) if g == task]
        if pairs:
            per_task[task] = sum(g == p for g, p in pairs) / len(pairs)
        conf.update((g, p) for g, p in pairs if g != p)
    return {"accuracy": float(np.mean(list(per_task.values()))) if per_task else 0.0,
            "micro_accuracy": sum(g == p for g, p in zip(gold, pred)) / max(1, len(gold)), "per_task": per_task,
            "confusions": [{"gold": g, "pred": p, "count": c} for (g, p), c in conf.most_common(top_confusions)],
            "n": len(gold)}


def evaluate(plugin: Plugin, rows_by_task: dict[str, list[dict]], view: str = "rendered", seed: int = 1,
             top_confusions: int = 10) -> dict:
    """Held-out top-1 accuracy per task for every example of `rows_by_task` in `view`."""
    if view not in VIEWS:
        raise DLPLoRAError(f"unknown view {view!r}; views: {', '.join(VIEWS)}")
    texts, gold = view_texts(rows_by_task, view, seed)
    pred, top1 = predict_all(plugin, texts)
    res = accuracy_table(gold, pred, list(rows_by_task), top_confusions)
    res["view"] = view
    res["to_base"] = sum(p == BASE for p in pred) / max(1, len(pred))
    # the same prompts with the base decision off: top-1 among the adapters alone
    res["adapters_only"] = accuracy_table(gold, top1, list(rows_by_task), 0)["accuracy"]
    return res


def view_table(plugin: Plugin, rows_by_task: dict[str, list[dict]], views: Sequence[str] = VIEWS,
               seed: int = 1) -> dict[str, dict]:
    """:func:`evaluate` for each view -> {view: result}."""
    return {v: evaluate(plugin, rows_by_task, v, seed) for v in views}


def leave_out_size(n_tasks: int, k: int = 3) -> int:
    """How many tasks a leave-out draw holds out of `n_tasks`: `k`, fewer when the library is small (a router
    trained on the rest needs 2 tasks), 0 below 3 tasks (no draw possible)."""
    return max(0, min(k, n_tasks - 2)) if n_tasks >= 3 else 0


def load_own_words(path: str | Path = OWN_WORDS) -> list[dict]:
    """The own-words evaluation set: rows {"task", "text", "source", "input_sha1"[, "n_source"]}."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise DLPLoRAError(f"the own-words set {path} is unreadable ({exc})") from exc
    return rows


def evaluate_own_words(plugin: Plugin, rows: Sequence[dict] | None = None) -> dict | None:
    """Top-1 accuracy per task on the own-words prompts of the plugin's labels (a prompt sent to the base model
    counts as wrong), mean over tasks; also with the base decision off, the share sent to base, and where the
    prompts come from. None when the set has no prompt of the plugin's labels."""
    rows = [r for r in (load_own_words() if rows is None else rows) if r["task"] in plugin.labels]
    if not rows:
        return None
    gold = [r["task"] for r in rows]
    pred, top1 = predict_all(plugin, [r["text"] for r in rows])
    names = [n for n in plugin.labels if n in set(gold)]
    res = accuracy_table(gold, pred, names, 5)
    return {"accuracy": res["accuracy"], "adapters_only": accuracy_table(gold, top1, names, 0)["accuracy"],
            "to_base": sum(p == BASE for p in pred) / len(pred), "per_task": res["per_task"],
            "confusions": res["confusions"], "n": len(rows), "tasks": len(names),
            "sources": dict(Counter(r["source"].split(":", 1)[0] for r in rows))}


def format_own_words(ow: dict | None) -> str:
    if not ow:
        return "own-words set: no prompts of these adapters' tasks"
    return (f"own-words set ({ow['n']} prompts of {ow['tasks']} tasks, never trained on): {100 * ow['accuracy']:.2f}% "
            f"mean per-task top-1 ({100 * ow['adapters_only']:.2f}% with the base decision off; "
            f"{100 * ow['to_base']:.2f}% sent to base)")


def leave_out(train_rows: dict[str, list[dict]], test_rows: dict[str, list[dict]], *, draws: int = 3, k: int = 3,
              seed: int = 0, train_fn=None) -> dict:
    """Leave-tasks-out: for each draw, hold out `k` tasks, train a router on the others with
    `train_fn(train_rows, test_rows) -> plugin`, and measure on the test prompts (as rendered) the share
    of the held-out tasks' prompts routed to the base model (`ood_to_base`), the in-library accuracy
    (base counts as wrong), and that accuracy without the base decision (`in_library_argmax`): their
    difference is what sending prompts to base costs in-library."""
    names = list(train_rows)
    if len(names) - k < 2:
        raise DLPLoRAError(f"leave-{k}-out needs at least {k + 2} tasks, got {len(names)}")
    rng = random.Random(seed)
    out, seen = [], set()
    draws = min(draws, math.comb(len(names), k))  # distinct held-out sets only
    while len(out) < draws:
        held = sorted(rng.sample(names, k))
        if tuple(held) in seen:
            continue
        seen.add(tuple(held))
        keep = [n for n in names if n not in held]
        plugin = train_fn({n: train_rows[n] for n in keep}, {n: test_rows[n] for n in keep})
        texts_in, gold_in = view_texts({n: test_rows[n] for n in keep}, "rendered")
        texts_out, gold_out = view_texts({n: test_rows[n] for n in held}, "rendered")
        pred_in, top1_in = predict_all(plugin, texts_in)
        with_base = accuracy_table(gold_in, pred_in, keep)["accuracy"]
        argmax = accuracy_table(gold_in, top1_in, keep)["accuracy"]
        pred_out, _ = predict_all(plugin, texts_out)
        per_held = {n: float(np.mean([p == BASE for p, g in zip(pred_out, gold_out) if g == n])) for n in held}
        out.append({"held_out": held, "ood_to_base": sum(p == BASE for p in pred_out) / len(pred_out),
                    "ood_to_base_per_task": per_held, "in_library": with_base, "in_library_argmax": argmax,
                    "in_library_loss_points": round(100 * (argmax - with_base), 3)})
    return {"draws": out, "k": k, "ood_to_base": float(np.mean([d["ood_to_base"] for d in out])),
            "in_library": float(np.mean([d["in_library"] for d in out])),
            "in_library_loss_points": float(np.mean([d["in_library_loss_points"] for d in out]))}


def bench_routing(plugin: Plugin, texts: Sequence[str], batch_size: int = 64, repeats: int = 3,
                  threads: int | None = None, **route_kw) -> dict:
    """Median-of-`repeats` wall time of :meth:`Plugin.route` over `texts` in batches -> ms per prompt
    (featurisation + forward + selection), plus single-prompt latency. `threads` sets torch's thread
    count for the measurement (restored after)."""
    import torch

    if threads:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return bench_routing(plugin, texts, batch_size, repeats, None, **route_kw)
        finally:
            torch.set_num_threads(old)
    texts = check_texts(texts)
    if not texts:
        raise DLPLoRAError("bench_routing needs at least one prompt")
    plugin.route(texts[:batch_size], **route_kw)  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in range(0, len(texts), batch_size):
            plugin.route(texts[b: b + batch_size], **route_kw)
        runs.append((time.perf_counter() - t0) * 1000 / len(texts))
    singles = []
    for t in texts[: min(len(texts), 200)]:
        t0 = time.perf_counter()
        plugin.route([t], **route_kw)
        singles.append((time.perf_counter() - t0) * 1000)
    return {"ms_per_prompt": float(np.median(runs)), "batch_size": batch_size, "prompts": len(texts),
            "single_prompt_ms": float(np.median(singles)), "threads": torch.get_num_threads()}


def routing_benchmark(plugin: Plugin, test_rows: dict[str, list[dict]], batch_size: int = 64,
                      threads: int | None = 1) -> dict:
    """The robustness table of a trained plugin on prepared test prompts (accuracy per view, share
    sent to the base model) and its routing latency on the prompts as rendered."""
    table = view_table(plugin, test_rows)
    texts, _ = view_texts(test_rows, "rendered")
    speed = bench_routing(plugin, texts, batch_size=batch_size, threads=threads)
    own = evaluate_own_words(plugin)
    return {"own_words": own["accuracy"] if own else None, "own_words_detail": own,"accuracy": table["rendered"]["accuracy"], "views": {v: r["accuracy"] for v, r in table.items()},
            "views_adapters_only": {v: r["adapters_only"] for v, r in table.items()},
            "views_per_task": {v: r["per_task"] for v, r in table.items()},
            "views_to_base": {v: r["to_base"] for v, r in table.items()},
            "views_confusions": {v: r["confusions"][:5] for v, r in table.items()},
            "routing_ms_per_prompt": speed["ms_per_prompt"], "routing_single_prompt_ms": speed["single_prompt_ms"],
            "routing_batch_size": batch_size, "routing_threads": speed["threads"], "tasks": len(test_rows),
            "test_examples": len(texts), "encoder": plugin.encoder.kind, "params": plugin.params}


def format_view_table(report: dict, names: Sequence[str]) -> str:
    """Per-task held-out accuracy under each view, the mean per view, the share sent to the base model,
    the mean with the base decision off, and the top confusions as rendered (a report of
    :func:`dlplora.plugin.train_plugin_from_data` or :func:`routing_benchmark`)."""
    views = list(report["views"])
    width = max(len(n) for n in names)
    lines = [f"{'task':{width}}  " + "  ".join(f"{v[:14]:>14}" for v in views)]
    for n in names:
        lines.append(f"{n:{width}}  " + "  ".join(f"{report['views_per_task'][v].get(n, float('nan')):14.3f}"
                                                 for v in views))
    lines.append(f"{'mean over tasks':{width}}  " + "  ".join(f"{report['views'][v]:14.4f}" for v in views))
    lines.append(f"{'sent to base':{width}}  " + "  ".join(f"{report['views_to_base'][v]:14.4f}" for v in views))
    lines.append(f"{'mean, no base':{width}}  " + "  ".join(f"{report['views_adapters_only'][v]:14.4f}"
                                                          for v in views))
    conf = report["views_confusions"].get("rendered") or []
    lines.append("top confusions as rendered (gold -> predicted: count): " +
                 "; ".join(f"{c['gold']} -> {c['pred']}: {c['count']}" for c in conf) if conf
                 else "no confusions on the held-out prompts as rendered")
    return "\n".join(lines)


def format_sources(sources: dict[str, str]) -> str:
    """Where each adapter's prompts came from ({name: source}), one line each."""
    return "prompts per adapter:\n" + "\n".join(f"  {n}: {src}" for n, src in sources.items())


def format_leave_out(lo: dict) -> str:
    lines = [f"leave-{lo['k']}-out {', '.join(d['held_out'])}: {d['ood_to_base']:.3f} of their prompts to base; "
             f"in-library {d['in_library']:.4f} (without the base decision {d['in_library_argmax']:.4f})"
             for d in lo["draws"]]
    lines.append(f"out-of-library prompts routed to base: {lo['ood_to_base']:.4f} (mean of {len(lo['draws'])} "
                 f"draws); in-library accuracy loss from the base decision: {lo['in_library_loss_points']:.2f} points")
    return "\n".join(lines)
