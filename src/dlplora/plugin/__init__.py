"""The DLP plugin: a ~5M-parameter mini-MLP router that picks and weights adapters per prompt.

Modules, in the order the data flows (see docs/plugin.md)::

    views.py       the ways a user writes a task's prompt (training augmentation, robustness table)
    features.py    the plugin's own tokenizer: hashed word/byte n-grams per segment (head, body, tail)
    encoders.py    texts -> the MLP's input (hashed n-gram embeddings, or frozen backbone embeddings)
    model.py       the network (encoder module, LayerNorm, 4-layer MLP) and input checks
    router.py      top-p selection and weights (paper eq. 4-5), base-model decision, load/save, routing
    train.py       training set, optimisation, calibration of the base-model threshold
    evaluate.py    accuracy per view, leave-tasks-out, routing latency

:func:`train_plugin_from_data` ties them together for prepared task data, :func:`train_plugin_from_library` for the
routing prompts an adapter library keeps (LIB/routing; a running server retrains with it after a runtime load).
"""

from __future__ import annotations

import os
import random
import time
from typing import Sequence

from ..errors import DLPLoRAError
from .evaluate import BASE, bench_routing, evaluate, evaluate_own_words, leave_out, leave_out_size, view_table
from .features import FEATURIZER, Features, HashedNgramTokenizer
from ..config import DEFAULT_P, WEIGHTINGS, check_selection_args
from .model import FORMAT
from .router import CONFIG_FILE, RETRAIN_HINT, WEIGHTS_FILE, Plugin, Routing, select
from .train import build_training_set, calibrate_base_threshold
from .views import VIEWS, render_view

__all__ = ["BASE", "CONFIG_FILE", "DEFAULT_P", "FEATURIZER", "FORMAT", "Features", "HashedNgramTokenizer", "Plugin",
           "RETRAIN_HINT", "Routing", "VIEWS", "WEIGHTINGS", "WEIGHTS_FILE", "bench_routing", "build_training_set",
           "calibrate_base_threshold", "check_selection_args", "evaluate", "evaluate_own_words", "fit", "leave_out", "leave_out_size",
           "load_task_rows", "render_view", "retrain_settings", "select", "train_plugin_from_data", "train_plugin_from_library",
           "view_table"]

CALIBRATION_SHARE = 0.05  # of each task's training rows, held back to calibrate the base threshold
BACKGROUND_CALIBRATION_SHARE = 0.2  # of the background tasks, held out of training to fit the base score on


def load_task_rows(data_dir: str | os.PathLike, tasks: Sequence[str], split: str) -> dict[str, list[dict]]:
    from ..tasks import load_split

    out = {}
    for t in tasks:
        rows = load_split(data_dir, t, split)
        if not rows:
            raise DLPLoRAError(f"the prepared {split} split of {t} in {data_dir} is empty")
        out[t] = rows
    return out


def resolve_background(background, names: Sequence[str], log=None) -> list:
    """Background ("none of these") prompts: "auto" = the cached BIG-bench pool (:mod:`dlplora.background`;
    built when missing if the BIG-bench tasks are cached, else none), None/"none" = no none class, a
    path = a JSONL file ({"task", "text"} rows), or a list of texts. Rows of tasks that are adapters here are
    left out."""
    from ..background import read_background
    from ..tasks import ensure_background

    if background is None or background == "none":
        return []
    if isinstance(background, (list, tuple)):
        return [str(t) for t in background]
    path = ensure_background(log=log or (lambda *_: None)) if background == "auto" else background
    if path is None:
        if log:
            log("no background prompts cached (the BIG-bench tasks are not in use): training without the "
                "'none of these' class; give --background FILE to add one")
        return []
    return read_background(path, exclude_tasks=names)


def split_background(background: Sequence, seed: int) -> tuple[list[str], list[str]]:
    """(texts to train the "none of these" class on, texts of held-out background *tasks* to fit the base score
    on): a seeded :data:`BACKGROUND_CALIBRATION_SHARE` of the tasks (rows {"task", "text"}; a text without a task
    is its own) when there are at least 10 of them, else no held-out part."""
    rows = [b if isinstance(b, dict) else {"task": "", "text": str(b)} for b in background]
    groups = sorted({r["task"].split("/")[0] or r["text"] for r in rows})
    if len(groups) < 10:
        return [r["text"] for r in rows], []
    held = set(random.Random(seed).sample(groups, max(1, int(len(groups) * BACKGROUND_CALIBRATION_SHARE))))
    keep = [(r["task"].split("/")[0] or r["text"]) not in held for r in rows]
    return [r["text"] for r, k in zip(rows, keep) if k], [r["text"] for r, k in zip(rows, keep) if not k]


def split_calibration(rows_by_task: dict[str, list[dict]], seed: int) -> tuple[dict, dict]:
    rng = random.Random(seed)
    train, calib = {}, {}
    for t, rows in rows_by_task.items():
        idx = list(range(len(rows)))
        rng.shuffle(idx)
        n = max(1, int(len(rows) * CALIBRATION_SHARE)) if len(rows) >= 10 else 0
        calib[t] = [rows[i] for i in idx[:n]]
        train[t] = [rows[i] for i in idx[n:]]
    return train, calib


def fit(train_rows: dict[str, list[dict]], *, background: Sequence[str] = (), n_views: int = 2, seed: int = 0,
        epochs: int = 2, detector: bool = True, base_cost=None, log=None, **train_kw) -> Plugin:
    """Train a router on prepared rows (labels = task names): views augmentation, the background (texts, or
    {"task", "text"} rows) as the "none of these" class, and (`detector`) the base-model detector fitted on the
    training rows, its score fitted on held-back rows in every view against held-out background tasks
    (:func:`split_background`), and its threshold calibrated on the held-back rows."""
    from .views import view_texts

    fit_rows, calib_rows = split_calibration(train_rows, seed)
    background, foreign = split_background(background, seed)
    texts, labels = build_training_set(fit_rows, n_views=n_views, background=background, seed=seed)
    plugin = Plugin.train(texts, labels, list(train_rows), epochs=epochs, seed=seed, log=log, **train_kw)
    calib = {t: r for t, r in calib_rows.items() if r}
    if detector:
        fit_texts, fit_labels = view_texts(fit_rows, "rendered")
        calib_texts = [x for v in VIEWS for x in view_texts(calib, v, seed)[0]] if calib else []
        calibrate_base_threshold(plugin, fit_texts, fit_labels, calib_texts, foreign_texts=foreign, cost=base_cost)
    plugin.config["training"].update({"n_views": n_views, "calibration_rows": sum(map(len, calib_rows.values())),
                                      "background_trained": len(background), "background_held_out": len(foreign)})
    return plugin


def train_plugin_from_data(data_dir: str | os.PathLike, tasks: Sequence[str] | str, *, epochs: int = 2, seed: int = 0,
                           augment: bool = True, n_views: int = 2, background="auto", robustness: bool = True,
                           ood_draws: int = 0, detector: bool = True, base_cost=None, log=None, extra_rows=None,
                           **train_kw) -> tuple[Plugin, dict]:
    """Train a router on the prepared train splits of `tasks` (labels = task names) and measure it on
    their test splits. Returns (plugin, report): `accuracy` (mean over tasks of held-out top-1, as
    rendered), per_task, confusions, params, tasks, train_seconds, and with `robustness` the accuracy
    under every view (`views`); with `ood_draws` > 0, leave-3-tasks-out over that many draws
    (`ood_to_base`, `leave_out`). `extra_rows` ({label: rows}): labels of `tasks` that are no task of `data_dir`
    (a library's own adapters) and their training prompts (its routing prompts); they have no test split, so the
    measures cover the prepared tasks only (`measured`). Fewer tasks are held out for a library of 3 or 4
    (:func:`leave_out_size`), none below 3, and then `leave_out_note` says why."""
    from ..tasks import parse_tasks, prepared_format

    extra = dict(extra_rows or {})
    names = parse_tasks(tasks, data_dir) if isinstance(tasks, str) else list(tasks)
    prepared = [n for n in names if n not in extra]
    if not prepared:
        raise DLPLoRAError(f"none of the labels is a task prepared in {data_dir}")
    parse_tasks(prepared, data_dir)  # every other label must be a known task or have prepared data
    loaded = load_task_rows(data_dir, prepared, "train")
    train_rows = {n: extra[n] if n in extra else loaded[n] for n in names}  # in the labels' order
    test_rows = load_task_rows(data_dir, prepared, "test")
    bg = resolve_background(background, names, log)
    views = n_views if augment else 0
    t0 = time.perf_counter()
    plugin = fit(train_rows, background=bg, n_views=views, seed=seed, epochs=epochs, detector=detector, log=log,
                 base_cost=base_cost, **train_kw)
    train_s = time.perf_counter() - t0
    plugin.config["training"].update({"augment": augment, "data_dir": str(data_dir), "background": len(bg),
                                       "data_formats": {n: prepared_format(data_dir, n) for n in prepared}})
    table = view_table(plugin, test_rows, VIEWS if robustness else ("rendered",))
    clean = table["rendered"]
    report = {"accuracy": clean["accuracy"], "micro_accuracy": clean["micro_accuracy"], "per_task": clean["per_task"],
              "confusions": clean["confusions"], "params": plugin.params, "tasks": len(names),
              "train_examples": plugin.config["training"]["examples"], "test_examples": clean["n"],
              "measured": prepared,
              "train_seconds": round(train_s, 2), "epochs": epochs, "seed": seed, "encoder": plugin.encoder.kind,
              "none_class": plugin.none_class, "background_prompts": len(bg),
              "base_threshold": plugin.base_threshold,
              "views": {v: r["accuracy"] for v, r in table.items()},
              "views_adapters_only": {v: r["adapters_only"] for v, r in table.items()},
              "views_per_task": {v: r["per_task"] for v, r in table.items()},
              "views_confusions": {v: r["confusions"][:5] for v, r in table.items()},
              "views_to_base": {v: r["to_base"] for v, r in table.items()}}
    own = evaluate_own_words(plugin)
    report.update(own_words=own["accuracy"] if own else None, own_words_detail=own)
    if ood_draws:
        def train_fn(tr, _te):
            return fit(tr, background=bg, n_views=views, seed=seed, epochs=epochs, detector=detector,
                       base_cost=base_cost, **train_kw)

        k = leave_out_size(len(prepared))
        if k:
            lo = leave_out({n: loaded[n] for n in prepared}, test_rows, draws=ood_draws, k=k, seed=seed, train_fn=train_fn)
            report["ood_to_base"] = lo["ood_to_base"]
            report["leave_out"] = lo
        else:
            report["leave_out_note"] = (f"leave-tasks-out skipped: with {len(prepared)} prepared tasks no task can be held "
                                        "out (the router trained on the rest needs 2); it needs 3 or more")
    plugin.config["report"] = {k: report[k] for k in ("accuracy", "train_seconds", "tasks", "views", "ood_to_base",
                                                      "own_words")
                               if k in report}
    return plugin, report


def retrain_settings(plugin: Plugin) -> dict:
    """Keyword arguments of :func:`fit` that train a router like `plugin`: the same encoder (its hashed tokenizer,
    dimension), network sizes and training settings, and whether it had a "none of these" class."""
    cfg = plugin.config
    tr, model = cfg.get("training") or {}, cfg.get("model") or {}
    out = {k: tr[k] for k in ("epochs", "seed", "n_views", "batch_size", "lr", "emb_lr") if k in tr}
    if "hidden" in model:
        out["hidden"] = tuple(model["hidden"])
    if "dropout" in model:
        out["dropout"] = float(model["dropout"])
    enc = plugin.encoder
    out["encoder"] = enc.kind
    if enc.kind in ("hashed", "hybrid"):
        out.update(tokenizer=enc.tokenizer, dim=enc.dim)
    if enc.kind != "hashed":
        out["model"] = getattr(getattr(enc, "backbone", enc), "model", None)
    out["none_class"], out["default_p"] = plugin.none_class, plugin.default_p
    by_cost = (cfg.get("base_calibration") or {}).get("by_cost")
    if by_cost:  # a threshold calibrated by expected loss stays so
        out["base_cost"] = (by_cost["miss_cost"], by_cost["foreign_cost"], by_cost["foreign_share"])
    return out


def train_plugin_from_library(lib, names: Sequence[str] | None = None, *, like: Plugin | None = None,
                              max_per_adapter: int | None = None, background="cached", log=None,
                              **kw) -> tuple[Plugin, dict]:
    """Train a router for the library's adapters (`names`, default all) on the routing prompts it keeps
    (:meth:`dlplora.library.Library.routing_prompts`), with the settings of `like` (:func:`retrain_settings`) or the
    defaults, overridden by `kw`. At most `max_per_adapter` prompts per adapter (a seeded sample). `background`:
    "cached" = the BIG-bench pool when it is cached (never downloaded) and `like` had a "none of these" class (or
    there is no `like`), "none", or as :func:`resolve_background`. Returns (plugin, report)."""
    names = list(lib.names if names is None else names)
    settings = retrain_settings(like) if like is not None else {}
    none_class = settings.pop("none_class", True)
    settings.update(kw)
    rows, missing = {}, []
    rng = random.Random(settings.get("seed", 0))
    for n in names:
        got = lib.routing_prompts(n)
        if not got:
            missing.append(n)
        else:
            rows[n] = rng.sample(got, max_per_adapter) if max_per_adapter and len(got) > max_per_adapter else got
    if missing:
        raise DLPLoRAError(f"no routing prompts for {', '.join(missing)} in {lib.root}: add them with "
                           f"`dlp-lora library add NAME DIR --examples FILE --force` (or keep the data directory "
                           f"recorded in library.json)")
    if background == "cached":
        from ..background import read_background
        from ..tasks import background_path

        path = background_path()
        bg = read_background(path, exclude_tasks=names) if none_class and path.is_file() else []
    else:
        bg = resolve_background(background, names, log)
    t0 = time.perf_counter()
    plugin = fit(rows, background=bg, log=log, **settings)
    train_s = time.perf_counter() - t0
    plugin.config["training"].update({"source": "library routing prompts", "background": len(bg),
                                      "max_per_adapter": max_per_adapter})
    return plugin, {"params": plugin.params, "tasks": len(names), "train_examples": plugin.config["training"]["examples"],
                    "train_seconds": round(train_s, 2), "background_prompts": len(bg),
                    "prompts": {n: len(r) for n, r in rows.items()}}
