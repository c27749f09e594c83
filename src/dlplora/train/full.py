"""The full fine-tune bound (issue 28, `dlp-lora train-full`): every weight of the backbone trained on one task's
training examples, the learning rate and the checkpoint chosen on the same validation slice as ``train-loras
--recipe select``, then scored on the task's test split the way the library's adapters are (eval.scoring.score_task,
against the base model, with the paired test). Writes OUT/<task>.json; `dlp-lora report RESULTS_JSON --full-ft
OUT/*.json` puts the tasks beside LoRA and base in RESULTS.md.

Resumable per candidate learning rate: OUT/.<task>/progress.json keeps every scored checkpoint and OUT/.<task>/best.pt
the best weights so far (a killed run restarts the learning rate it was on).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import DLPLoRAError
from ..paths import atomic_write_text
from .select import (VAL_SIZE, Selection, better, load_weights, loss_summary, point_steps, run_with_checkpoints,
                     validation_score, validation_split, weights_of)

FULL_LRS = (1e-5, 5e-5)  # the usual range for fully fine-tuning a small decoder with AdamW
FULL_POINTS = (225, 450, 900)


def train_full(task: str, data_dir, out, selection: Selection | None = None, cfg=None, model=None,
               eval_limit: int = 100, command: str | None = None, log=print) -> dict:
    """Fully fine-tune the backbone on `task` per learning rate of `selection` (checkpoints at its points), keep the
    best on the validation slice, score it on the first `eval_limit` test examples against the base model and write
    OUT/<task>.json. Returns that record."""
    import dataclasses

    import torch

    from ..backbone import load_backbone
    from ..eval.scoring import score_task
    from ..library import score_record
    from ..tasks import load_split
    from .lora import TrainConfig, encode_example

    selection = selection or Selection(lrs=FULL_LRS, points=FULL_POINTS)
    selection.validate()
    cfg = cfg or TrainConfig(top_layers=None, cache_bottom=False)
    train, val = validation_split(load_split(data_dir, task, "train"), selection.val_size, cfg.seed)
    test = load_split(data_dir, task, "test")[:eval_limit]
    if not test:
        raise DLPLoRAError(f"{task}: no test examples to score on")
    out = Path(out)
    work = out / f".{task}"
    work.mkdir(parents=True, exist_ok=True)
    prog_path = work / "progress.json"
    prog = json.loads(prog_path.read_text()) if prog_path.is_file() else {"candidates": [], "best": None}
    steps = point_steps(selection.points, cfg.batch_size)
    info = None
    for lr in selection.lrs:
        done = {r["steps"] for r in prog["candidates"] if r["lr"] == lr}
        if all(s in done for s in steps):
            continue
        net, tok, info = load_backbone(model)
        for p in net.parameters():
            p.requires_grad_(True)
        c = dataclasses.replace(cfg, lr=lr, steps=steps[-1], top_layers=None, cache_bottom=False)
        enc_val = [encode_example(tok, ex, c.max_len, c.max_answer_tokens) for ex in val]

        def on_point(step, st, net=net, tok=tok, lr=lr, c=c, enc_val=enc_val, done=done):
            if step in done:  # scored before the run was killed (no mid-run state: the learning rate restarts)
                return
            v = validation_score(net, tok, task, val, enc_val, c.bf16)
            first, final = loss_summary(st["losses"])
            rec = {"lr": lr, "examples": step * c.batch_size, "steps": step, "val": v["score"], "val_loss": v["loss"],
                   "val_metric": v["metric"], "val_seconds": v["seconds"], "train_seconds": st["train_seconds"],
                   "examples_seen": st["seen"], "first_loss": first, "final_loss": final}
            prog["candidates"].append(rec)
            if better(rec, prog["best"]):
                tmp = work / "best.tmp"
                torch.save(weights_of(net), tmp)
                tmp.replace(work / "best.pt")
                prog["best"] = rec
            atomic_write_text(prog_path, json.dumps(prog, indent=1))
            log(f"{task} full fine-tune: lr {lr:g}, {rec['examples']} examples: validation {v['metric']} "
                f"{v['score']:.4g} (loss {v['loss']:.3f}), {st['train_seconds']:.0f} s of training")

        run_with_checkpoints(net, tok, train, c, steps, on_point, desc=f"{task} full lr {lr:g}", log=log)
        del net
    best = prog["best"]
    t0 = time.time()
    net, tok, info = load_backbone(model)
    base = score_task(net, tok, task, test)
    load_weights(net, torch.load(work / "best.pt", weights_only=True))
    tuned = score_task(net, tok, task, test)
    rec = {"task": task, "method": "full fine-tune", "backbone": info.name, "n_train": len(train),
           "n_validation": len(val), "selection": selection.to_dict(), "batch_size": cfg.batch_size,
           "max_len": cfg.max_len, "chosen": {k: best[k] for k in ("lr", "examples", "steps", "val", "val_metric")},
           "candidates": prog["candidates"],
           "train_seconds": round(sum(max(r["train_seconds"] for r in prog["candidates"] if r["lr"] == lr)
                                      for lr in selection.lrs), 1),
           "validation_seconds": round(sum(r["val_seconds"] for r in prog["candidates"]), 1),
           "test_seconds": round(time.time() - t0, 1),
           **score_record(tuned, base, source=f"train-full (first {len(test)} test examples)"),
           "test_result": _kept(tuned), "base_result": _kept(base), "command": command}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{task}.json", json.dumps(rec, indent=1))
    (work / "best.pt").unlink(missing_ok=True)  # 0.5 GB; the record keeps what the report needs
    log(f"{task}: full fine-tune {rec['score']:.2f} against base {rec['base_score']:.2f} "
        f"(lr {best['lr']:g}, {best['examples']} examples); wrote {out / f'{task}.json'}")
    return rec


def _kept(result: dict) -> dict:
    """A task result's metric, main figure and per-example scores (what a paired test against LoRA needs)."""
    return {k: result[k] for k in ("metric", "main", "n", "per_example") if k in result}
