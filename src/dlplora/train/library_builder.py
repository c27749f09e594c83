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
    import shutil
    import time

    from ..eval.scoring import score_task
    from ..tasks import load_split, prepared_format
    from .lora import make_peft_model, train_adapter

    t0 = time.time()
    train = load_split(data_dir, task, "train")
    pm = make_peft_model(model, cfg)
    try:
        res = train_adapter(pm, tokenizer, train, cfg, desc=f"{task}", progress=progress)
        final = lib_root / "adapters" / task
        tmp = final.with_name(f".{task}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pm.save_pretrained(tmp)
        (tmp / ADAPTER_META).write_text(json.dumps({"task": task, "base_model": base, "train": cfg.to_dict()}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        entry = {"task": task, "path": f"adapters/{task}", "base_model": {"name": base.get("name"), "fingerprint": base.get("fingerprint")},
                 "rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets), "n_train": len(train),
                 "examples_seen": res.examples, "steps": res.steps, "tokens": res.tokens, "first_loss": res.first_loss,
                 "final_loss": res.final_loss, "train_seconds": res.wall_seconds,
                 "tokens_per_second": round(res.tokens / max(res.wall_seconds, 1e-9), 1),
                 "data_format": prepared_format(data_dir, task)}
        if eval_limit > 0:
            test = load_split(data_dir, task, "test")[:eval_limit]
            adapter_score = score_task(pm, tokenizer, task, test)
            if base_score is None:
                with pm.disable_adapter():
                    base_score = score_task(pm, tokenizer, task, test)
            entry.update(score_record(adapter_score, base_score, source=f"train-loras (first {len(test)} test examples)"))
        entry["wall_seconds"] = round(time.time() - t0, 1)
    finally:
        pm.unload()  # restore the plain backbone for the next task
    return entry, base_score


def _ray_train_task(model_path, task, data_dir, cfg_dict, lib_root, base, eval_limit, base_score):
    """Runs inside a Ray worker: load the backbone, train one adapter into the (shared) library directory."""
    from ..backbone import load_backbone
    from .lora import TrainConfig

    cfg_dict = dict(cfg_dict, targets=tuple(cfg_dict["targets"]))
    model, tok, _ = load_backbone(model_path)
    return train_one(model, tok, task, data_dir, TrainConfig(**cfg_dict), Path(lib_root), base, eval_limit,
                     progress=False, base_score=base_score)


def train_library(tasks, data_dir: str | os.PathLike, out: str | os.PathLike, model=None, cfg=None,
                  force: bool = False, eval_limit: int = 100, ray_address: str | None = None, log=print) -> Library:
    """Train one adapter per task into the library at `out` (resumable: finished adapters are skipped)."""
    from ..backbone import load_backbone, resolve_model
    from ..tasks import DATA_FORMAT, load_split, parse_tasks, prepared_format, stale_options
    from .lora import TrainConfig, check_targets

    cfg = cfg or TrainConfig()
    cfg.validate()
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
    todo = [n for n in names if force or n not in lib.manifest["adapters"] or n in stale
            or not _adapter_complete(root / "adapters" / n)]
    for n in names:
        if n in stale and not force:
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
                                 base, eval_limit, cached_base(n)[1]): n for n in todo}
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
            entry, bscore = train_one(net, tok, n, data_dir, cfg, root, base, eval_limit, base_score=cached_base(n)[1])
            record(n, entry, bscore)
    return lib
