"""`dlp-lora learning-curve`: test score against training examples seen, to choose the adapters' budget.

One training run per task (the library's recipe: rank, targets, top layers, answer-only loss), with a learning
rate that warms up over :data:`WARMUP` steps and then decays as ``1/sqrt(step)``, so that no point of the curve
depends on where the run will end. At each point (examples seen: 160, 450, 900, 1800, 2700 by default) the
adapter is scored on the task's first ``eval_limit`` test examples, with the training seconds so far.

Resumable: after every point the LoRA weights, the optimizer, the step and the remaining batches are saved
in ``OUT/state/<task>.pt`` and the point is appended to ``OUT/curve.json`` (atomic writes); a rerun continues
where it stopped. ``OUT/curve.png`` plots the curves.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from ..errors import DLPLoRAError
from ..paths import atomic_write_text

DEFAULT_POINTS = (160, 450, 900, 1800, 2700)
WARMUP = 20


def lr_factor(step: int) -> float:
    """Linear warm-up over WARMUP steps, then 1/sqrt(step) decay (WARMUP: 1.0; 4x WARMUP: 0.5)."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    return math.sqrt(WARMUP / step)


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"points": []}


def run_curve(tasks, data_dir, out, points=DEFAULT_POINTS, cfg=None, model=None, eval_limit: int = 100,
              log=print) -> dict:
    """Train and score each task at each point of `points` (examples seen); returns the curve.json record."""
    from ..backbone import load_backbone
    from ..eval.scoring import score_task
    from ..tasks import load_split, parse_tasks
    from .lora import TrainConfig, bottom_cache, bucketed_batches, encode_example, make_peft_model, train_step

    cfg = cfg or TrainConfig()
    cfg.validate()
    points = sorted({int(p) for p in points})
    if not points or points[0] <= 0:
        raise DLPLoRAError(f"--points must be positive example counts, got {points}")
    names = parse_tasks(tasks, data_dir)
    out = Path(out)
    (out / "state").mkdir(parents=True, exist_ok=True)
    rec_path = out / "curve.json"
    rec = _load_json(rec_path)
    rec["config"] = cfg.to_dict()
    rec["eval_limit"] = eval_limit
    net, tok, info = load_backbone(model)
    rec["backbone"] = info.name

    def save_rec():
        atomic_write_text(rec_path, json.dumps(rec, indent=1))

    for task in names:
        done = {p["examples"] for p in rec["points"] if p["task"] == task}
        todo = [p for p in points if p not in done]
        if not todo:
            log(f"{task}: every point done")
            continue
        train = load_split(data_dir, task, "train")
        test = load_split(data_dir, task, "test")[:eval_limit]
        if not any(p["task"] == task and p["examples"] == 0 for p in rec["points"]):
            t0 = time.time()
            base = score_task(net, tok, task, test)
            rec["points"].append({"task": task, "examples": 0, "steps": 0, "train_seconds": 0.0, "score": base["main"],
                                  "n_test": len(test), "eval_seconds": round(time.time() - t0, 1)})
            save_rec()
            log(f"{task}: base model {base['main']:.2f} on {len(test)} test examples")
        pm = make_peft_model(net, cfg)
        try:
            params = [p for p in pm.parameters() if p.requires_grad]
            prefix = bottom_cache(pm, cfg)
            names_p = [n for n, p in pm.named_parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
            encoded = [encode_example(tok, ex, cfg.max_len, cfg.max_answer_tokens) for ex in train]
            lengths = [len(ids) for ids, _ in encoded]
            rng = random.Random(cfg.seed)
            torch.manual_seed(cfg.seed)
            state_path = out / "state" / f"{task}.pt"
            step, seen, train_s, batches = 0, 0, 0.0, []
            if state_path.is_file() and done:
                st = torch.load(state_path, weights_only=False)
                with torch.no_grad():
                    for n, p in zip(names_p, params):
                        p.copy_(st["lora"][n])
                opt.load_state_dict(st["opt"])
                sched.load_state_dict(st["sched"])
                step, seen, train_s, batches = st["step"], st["seen"], st["train_seconds"], st["batches"]
                rng.setstate(st["rng"])
                log(f"{task}: resuming at {seen} examples seen (step {step})")
            pm.train()
            for target in todo:
                t0 = time.time()
                while seen < target:
                    if not batches:
                        batches = bucketed_batches(lengths, cfg.batch_size, rng)
                    idx = batches.pop()
                    loss, _, _ = train_step(pm, [encoded[i] for i in idx], tok.pad_token_id, cfg, params, opt, sched,
                                            f"{task}: step {step}", prefix, idx)
                    step += 1
                    seen += len(idx)
                train_s += time.time() - t0
                pm.eval()
                t1 = time.time()
                score = score_task(pm, tok, task, test)
                pm.train()
                rec["points"].append({"task": task, "examples": target, "seen": seen, "steps": step,
                                      "train_seconds": round(train_s, 1), "score": score["main"], "n_test": len(test),
                                      "eval_seconds": round(time.time() - t1, 1), "last_loss": round(loss, 4)})
                torch.save({"lora": {n: p.detach().clone() for n, p in zip(names_p, params)}, "opt": opt.state_dict(),
                            "sched": sched.state_dict(), "step": step, "seen": seen, "train_seconds": train_s,
                            "batches": batches, "rng": rng.getstate()}, state_path)
                save_rec()
                log(f"{task}: {target} examples ({step} steps, {train_s:.0f} s of training): {score['main']:.2f}")
        finally:
            pm.unload()
    plot_curve(rec, out / "curve.png")
    return rec


def plot_curve(rec: dict, path: Path) -> Path | None:
    """Score against examples seen, one line per task (the base model at 0 examples)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    tasks = sorted({p["task"] for p in rec["points"]})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in tasks:
        pts = sorted((p["examples"], p["score"]) for p in rec["points"] if p["task"] == t)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=t)
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("test score (accuracy / main metric, %)")
    ax.set_title(f"learning curves, {rec.get('backbone', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
