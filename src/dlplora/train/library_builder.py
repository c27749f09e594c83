"""Build an adapter library by training: one LoRA per task (`dlp-lora train-loras`), locally or as Ray tasks.

Resumable: adapters already in the library are skipped (unless ``force``); the base model's score on each
task is cached in LIB/base_scores.json, so it is computed once per task and evaluation size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..adapters import ADAPTER_META, CONFIG_FILE, WEIGHTS_FILE
from ..errors import DLPLoRAError
from ..library import Library, base_record, score_line, score_record
from ..paths import atomic_write_text


def _adapter_complete(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _base_scores_path(root: Path) -> Path:
    return root / "base_scores.json"


def train_one(model, tokenizer, task: str, data_dir: str | os.PathLike, cfg, lib_root: Path, base: dict,
              eval_limit: int = 100, progress: bool = True, base_score: dict | None = None) -> tuple[dict, dict | None]:
    """Train, save (atomically) and score one task's adapter. Returns (manifest entry, base score used)."""
    import time

    from ..tasks import load_split, prepared_format
    from .lora import make_peft_model, train_adapter

    t0 = time.time()
    train = load_split(data_dir, task, "train")
    pm = make_peft_model(model, cfg)
    try:
        res = train_adapter(pm, tokenizer, train, cfg, desc=f"{task}", progress=progress)
        save_adapter(pm, lib_root, task, {"task": task, "base_model": base, "train": cfg.to_dict()})
        entry = adapter_entry(task, base, cfg, n_train=len(train), examples_seen=res.examples, steps=res.steps,
                              tokens=res.tokens, first_loss=res.first_loss, final_loss=res.final_loss,
                              train_seconds=res.wall_seconds, data_format=prepared_format(data_dir, task))
        base_score = score_against_base(pm, tokenizer, task, data_dir, eval_limit, entry, base_score)
        entry["wall_seconds"] = round(time.time() - t0, 1)
    finally:
        pm.unload()  # restore the plain backbone for the next task
    return entry, base_score


def save_adapter(pm, lib_root: Path, name: str, meta: dict) -> Path:
    """Save the PEFT model's adapter as LIB/adapters/<name> (atomically: a temporary directory, then a rename)."""
    import shutil

    final = Path(lib_root) / "adapters" / name
    tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pm.save_pretrained(tmp)
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    return final


def adapter_entry(name: str, base: dict, cfg, **fields) -> dict:
    """A trained adapter's manifest entry: where it is, its shape, and the training `fields` (steps, tokens, losses,
    train_seconds, ...; tokens_per_second is derived)."""
    entry = {"task": name, "path": f"adapters/{name}",
             "base_model": {"name": base.get("name"), "fingerprint": base.get("fingerprint")},
             "rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets),
             "top_layers": cfg.top_layers, "lr": cfg.lr, **fields}
    entry["tokens_per_second"] = round(entry.get("tokens", 0) / max(entry.get("train_seconds", 0), 1e-9), 1)
    return entry


def score_against_base(pm, tokenizer, task, data_dir, eval_limit: int, entry: dict, base_score: dict | None):
    """Score the adapter of `pm` and (unless given) the base model on the first `eval_limit` test examples, and
    record the comparison in `entry` (library.score_record); returns the base score."""
    from ..eval.scoring import score_task
    from ..tasks import load_split

    if eval_limit > 0:
        test = load_split(data_dir, task, "test")[:eval_limit]
        adapter_score = score_task(pm, tokenizer, task, test)
        if base_score is None:
            with pm.disable_adapter():
                base_score = score_task(pm, tokenizer, task, test)
        entry.update(score_record(adapter_score, base_score, source=f"train-loras (first {len(test)} test examples)"))
    return base_score


def train_selected(model, tokenizer, task: str, data_dir, cfg, selection, lib_root: Path, base: dict,
                   eval_limit: int = 100, base_score: dict | None = None, log=print) -> tuple[dict, dict | None]:
    """``--recipe select``: hold out `selection.val_size` training examples, train one run per learning rate with
    checkpoints at `selection.points` examples seen, score each on the validation slice, keep the best and score it
    on the test split against base. Resumable per candidate: LIB/.select/<task>/ keeps every scored checkpoint
    (progress.json), the best weights (best.pt) and the run in progress (state-lr<lr>.pt)."""
    import dataclasses
    import time

    from ..paths import atomic_write_text
    from ..tasks import load_split, prepared_format
    from .lora import bottom_cache, encode_example, make_peft_model
    from .select import (better, load_weights, loss_summary, point_steps, run_with_checkpoints, validation_score,
                         validation_split, weights_of)

    work = Path(lib_root) / ".select" / task
    work.mkdir(parents=True, exist_ok=True)
    prog_path = work / "progress.json"
    prog = json.loads(prog_path.read_text()) if prog_path.is_file() else {"candidates": [], "best": None}
    train, val = validation_split(load_split(data_dir, task, "train"), selection.val_size, cfg.seed)
    enc_val = [encode_example(tokenizer, ex, cfg.max_len, cfg.max_answer_tokens) for ex in val]
    steps = point_steps(selection.points, cfg.batch_size)
    for lr in selection.lrs:
        done = {r["steps"] for r in prog["candidates"] if r["lr"] == lr}
        if all(s in done for s in steps):
            continue
        c = dataclasses.replace(cfg, lr=lr, steps=steps[-1])
        pm = make_peft_model(model, c)
        try:
            def on_point(step, st, pm=pm, lr=lr):
                if step in done:
                    return
                v = validation_score(pm, tokenizer, task, val, enc_val, c.bf16)
                first, final = loss_summary(st["losses"])
                rec = {"lr": lr, "examples": step * c.batch_size, "steps": step, "val": v["score"],
                       "val_loss": v["loss"], "val_metric": v["metric"], "val_seconds": v["seconds"],
                       "train_seconds": st["train_seconds"], "examples_seen": st["seen"], "tokens": st["tokens"],
                       "first_loss": first, "final_loss": final}
                prog["candidates"].append(rec)
                if better(rec, prog["best"]):
                    torch_save(weights_of(pm), work / "best.pt")
                    prog["best"] = rec
                atomic_write_text(prog_path, json.dumps(prog, indent=1))
                log(f"{task}: lr {lr:g}, {rec['examples']} examples: validation {v['metric']} {v['score']:.4g} "
                    f"(loss {v['loss']:.3f})")

            run_with_checkpoints(pm, tokenizer, train, c, steps, on_point, state_path=work / f"state-lr{lr:g}.pt",
                                 prefix=bottom_cache(pm, c), desc=f"{task} lr {lr:g}", log=log)
        finally:
            pm.unload()
    best = prog["best"]
    t_final = time.time()
    c = dataclasses.replace(cfg, lr=best["lr"], steps=best["steps"])
    pm = make_peft_model(model, c)
    try:
        import torch

        load_weights(pm, torch.load(work / "best.pt", weights_only=True))
        recipe = {"preset": "select", **selection.to_dict(), "top_layers": cfg.top_layers,
                  "chosen": {k: best[k] for k in ("lr", "examples", "steps", "val", "val_loss", "val_metric")},
                  "candidates": prog["candidates"]}
        save_adapter(pm, lib_root, task, {"task": task, "base_model": base, "train": c.to_dict(), "recipe": recipe})
        train_s = sum(max(r["train_seconds"] for r in prog["candidates"] if r["lr"] == lr) for lr in selection.lrs)
        val_s = sum(r["val_seconds"] for r in prog["candidates"])
        entry = adapter_entry(task, base, c, n_train=len(train), n_validation=len(val),
                              examples_seen=best["examples_seen"], steps=best["steps"], tokens=best["tokens"],
                              first_loss=best["first_loss"], final_loss=best["final_loss"], train_seconds=train_s,
                              validation_seconds=round(val_s, 1), data_format=prepared_format(data_dir, task),
                              recipe=recipe)
        base_score = score_against_base(pm, tokenizer, task, data_dir, eval_limit, entry, base_score)
        # the candidates' training and validation (summed over resumed sittings), then this sitting's test scoring
        entry["wall_seconds"] = round(train_s + val_s + time.time() - t_final, 1)
    finally:
        pm.unload()
    return entry, base_score


def torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _ray_train_task(model_path, task, data_dir, cfg_dict, lib_root, base, eval_limit, base_score, selection=None):
    """Runs inside a Ray worker: load the backbone, train one adapter into the (shared) library directory."""
    from ..backbone import load_backbone
    from .lora import TrainConfig
    from .select import Selection

    cfg_dict = dict(cfg_dict, targets=tuple(cfg_dict["targets"]))
    model, tok, _ = load_backbone(model_path)
    if selection is not None:
        sel = Selection(lrs=tuple(selection["lrs"]), points=tuple(selection["points"]), val_size=selection["val_size"])
        return train_selected(model, tok, task, data_dir, TrainConfig(**cfg_dict), sel, Path(lib_root), base,
                              eval_limit, base_score=base_score, log=lambda *a: None)
    return train_one(model, tok, task, data_dir, TrainConfig(**cfg_dict), Path(lib_root), base, eval_limit,
                     progress=False, base_score=base_score)


def recipe_name(entry: dict) -> str:
    """The recipe an adapter was trained with: "select" (validation-chosen) or "single" (one fixed run)."""
    return (entry.get("recipe") or {}).get("preset", "single")


def train_library(tasks, data_dir: str | os.PathLike, out: str | os.PathLike, model=None, cfg=None,
                  force: bool = False, eval_limit: int = 100, ray_address: str | None = None, log=print,
                  selection=None) -> Library:
    """Train one adapter per task into the library at `out` (resumable: finished adapters are skipped; an adapter of
    another recipe is retrained). `selection` (a :class:`dlplora.train.select.Selection`): the validation-chosen
    recipe (:func:`train_selected`), else one run of `cfg` per task."""
    from ..backbone import load_backbone, resolve_model
    from ..tasks import DATA_FORMAT, load_split, parse_tasks, prepared_format, stale_options
    from .lora import TrainConfig, check_targets

    cfg = cfg or TrainConfig()
    cfg.validate()
    if selection is not None:
        selection.validate()
    wanted = "single" if selection is None else "select"
    names = parse_tasks(tasks, data_dir)
    for n in names:  # fail before any training if data is missing
        load_split(data_dir, n, "train")
        if eval_limit > 0:
            load_split(data_dir, n, "test")
    if ray_address:
        from ..cluster import join_ray

        join_ray(ray_address)  # no cluster there: one clear line before anything loads
    where = resolve_model(model)
    net, tok, info = load_backbone(where)
    check_targets(net, cfg.targets)
    base = base_record(info)
    lib = Library.open_or_create(out, base)
    lib.manifest["base_model"] = lib.manifest.get("base_model") or base
    lib.manifest["data_dir"] = str(Path(data_dir).resolve())
    root = Path(out)
    # an adapter trained on data that has changed since (a multiple-choice task's options in the task file's order)
    stale = [n for n in names if n in lib.manifest["adapters"]
             and stale_options(int(lib.manifest["adapters"][n].get("data_format", 1)), n)]
    other = [n for n in names if n in lib.manifest["adapters"] and recipe_name(lib.manifest["adapters"][n]) != wanted]
    todo = [n for n in names if force or n not in lib.manifest["adapters"] or n in stale or n in other
            or not _adapter_complete(root / "adapters" / n)]
    for n in names:
        if n in other and not force:
            log(f"retrain {n}: its adapter was trained with the recipe {recipe_name(lib.manifest['adapters'][n])!r}, "
                f"not {wanted!r}")
        elif n in stale and not force:
            log(f"retrain {n}: its adapter was trained on data of format {lib.manifest['adapters'][n].get('data_format', 1)} "
                f"(options in the task file's order); the data is now format {DATA_FORMAT}")
        elif n not in todo:
            log(f"skip {n}: already in the library (use --force to retrain)")
    lib.save()
    base_cache = json.loads(_base_scores_path(root).read_text()) if _base_scores_path(root).is_file() else {}

    def cached_base(task):
        key = f"{base['fingerprint']}:{task}:{eval_limit}:data{prepared_format(data_dir, task)}"
        return key, base_cache.get(key)

    def record(task, entry, bscore):
        key, _ = cached_base(task)
        if bscore is not None:
            base_cache[key] = bscore
            atomic_write_text(_base_scores_path(root), json.dumps(base_cache, indent=2))
        lib.set_entry(task, entry)
        msg = f"{task}: loss {entry['first_loss']:.3f} -> {entry['final_loss']:.3f} in {entry['train_seconds']:.0f}s"
        if entry.get("score") is not None:
            msg += f"; {score_line(entry)}"
            if not entry["beats_base"]:
                msg += "  [FLAG: does not beat the base model]"
        log(msg)

    if ray_address and todo:
        import ray
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        remote = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)(_ray_train_task)
        futures = {remote.remote(str(info.path), n, str(Path(data_dir).resolve()), cfg.to_dict(), str(root.resolve()),
                                 base, eval_limit, cached_base(n)[1],
                                 None if selection is None else selection.to_dict()): n for n in todo}
        log(f"training {len(todo)} adapters on Ray at {ray_address} ({'GPU' if use_gpu else 'CPU'} workers)")
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                entry, bscore = ray.get(done[0])
            except Exception as exc:
                raise DLPLoRAError(f"training {futures[done[0]]} on Ray failed: {exc}") from exc
            record(futures[done[0]], entry, bscore)
    else:
        for i, n in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] training {n}")
            if selection is not None:
                entry, bscore = train_selected(net, tok, n, data_dir, cfg, selection, root, base, eval_limit,
                                               base_score=cached_base(n)[1], log=log)
            else:
                entry, bscore = train_one(net, tok, n, data_dir, cfg, root, base, eval_limit,
                                          base_score=cached_base(n)[1])
            record(n, entry, bscore)
    return lib
