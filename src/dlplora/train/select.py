"""Recipes chosen on validation data (issue 28): a fixed, seeded validation slice of each task's training
examples, a resumable training loop that stops at checkpoints, and the validation score of a checkpoint.

Used by ``train-loras --recipe select`` (:func:`dlplora.train.library_builder.train_selected`), the multi-task
baseline (:mod:`.multitask`) and the full fine-tune bound (:mod:`.full`). The test split is never read here.

- :func:`validation_split`: the last ``n`` of a seeded shuffle of the training examples (the same slice on every
  run, whatever the recipe), the rest for training.
- :func:`run_with_checkpoints`: the library's training step and cosine schedule over ``steps[-1]`` steps, calling
  ``on_point`` after each step in ``steps`` (then saving the run's state there when ``state_path`` is given, so a
  killed run resumes from its last checkpoint).
- :func:`validation_score`: accuracy by log-likelihood ranking (multiple choice) or minus the mean answer-token
  loss (generative tasks: a greedy generation of 100 answers costs 80-320 s per checkpoint, the loss a few seconds).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DLPLoRAError

VAL_SIZE = 100  # of 900 training examples; the test split is never used to choose


@dataclass(frozen=True)
class Selection:
    """The candidate set of ``--recipe select``: one run per learning rate, scored on the validation slice after
    ``points`` examples seen (its checkpoints); the best (learning rate, checkpoint) is kept."""

    lrs: tuple[float, ...] = (1e-3,)
    points: tuple[int, ...] = (225, 450)
    val_size: int = VAL_SIZE

    def validate(self) -> None:
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise DLPLoRAError(f"--select-lrs must be positive learning rates, got {list(self.lrs)}")
        if not self.points or any(p <= 0 for p in self.points) or list(self.points) != sorted(set(self.points)):
            raise DLPLoRAError(f"--select-points must be increasing positive example counts, got {list(self.points)}")
        if self.val_size < 1:
            raise DLPLoRAError(f"--val-size must be at least 1, got {self.val_size}")

    def candidates(self) -> int:
        return len(self.lrs) * len(self.points)

    def to_dict(self) -> dict:
        return {"lrs": list(self.lrs), "points": list(self.points), "val_size": self.val_size}


def parse_floats(value: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in str(value).split(",") if x.strip())
    except ValueError:
        raise DLPLoRAError(f"{what} {value!r}: expected comma-separated numbers") from None


def parse_ints(value: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(value).split(",") if x.strip())
    except ValueError:
        raise DLPLoRAError(f"{what} {value!r}: expected comma-separated integers") from None


def validation_split(examples: list[dict], n_val: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training examples, validation examples): the validation slice is the last `n_val` of a seeded shuffle."""
    if n_val >= len(examples):
        raise DLPLoRAError(f"a validation slice of {n_val} leaves no training example of {len(examples)}; "
                           f"lower --val-size")
    order = list(range(len(examples)))
    random.Random(f"validation-{seed}").shuffle(order)
    cut = len(order) - n_val
    return [examples[i] for i in sorted(order[:cut])], [examples[i] for i in sorted(order[cut:])]


def point_steps(points, batch_size: int) -> list[int]:
    """Optimizer steps at which a run has seen each number of examples of `points` (rounded up)."""
    return sorted({max(1, -(-int(p) // batch_size)) for p in points})


@torch.no_grad()
def answer_loss(model, encoded: list[tuple[list[int], int]], pad_id: int, bf16: bool, batch_size: int = 8) -> float:
    """The mean loss per answer token of `model` over encoded examples (lora.encode_example's), teacher-forced."""
    from .lora import collate, target_only_loss

    was_training = model.training
    model.eval()
    total = n = 0.0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    for s in range(0, len(order), batch_size):
        ids, mask, rows, pos, tgt = collate([encoded[i] for i in order[s:s + batch_size]], pad_id)
        loss = target_only_loss(model, ids, mask, rows, pos, tgt, bf16=bf16)
        total += float(loss) * len(tgt)
        n += len(tgt)
    model.train(was_training)
    return total / max(n, 1)


def validation_score(model, tokenizer, task: str, val: list[dict], encoded_val, bf16: bool) -> dict:
    """{"metric", "score" (higher is better), "loss"} of `model` on the validation slice. Multiple choice: accuracy by
    log-likelihood ranking, and as "loss" minus the mean log-likelihood of the right choice (from the same ranking
    pass: no second forward); generative tasks: the mean answer-token loss."""
    from ..eval.metrics import accuracy_result
    from ..eval.scoring import choice_logprobs

    t0 = time.time()
    if val and val[0].get("choices"):
        was_training = model.training
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as training runs: 2.4x fp32's ranking
            lps = choice_logprobs(model, tokenizer, val)
        model.train(was_training)
        acc = accuracy_result(val, lps)["main"]
        loss = -sum(lp[ex["answer_index"]] for lp, ex in zip(lps, val)) / len(val)
        out = {"metric": "accuracy", "score": round(acc, 2), "loss": round(loss, 4)}
    else:
        loss = answer_loss(model, encoded_val, tokenizer.pad_token_id, bf16)
        out = {"metric": "answer_loss", "score": round(-loss, 4), "loss": round(loss, 4)}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def better(rec: dict, best: dict | None) -> bool:
    """Higher validation score; on a tie the lower validation loss (accuracy on 100 examples ties often)."""
    return best is None or (rec["val"], -rec["val_loss"]) > (best["val"], -best["val_loss"])


def weights_of(model) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters (a LoRA's factors; every weight of a fully fine-tuned model)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise DLPLoRAError(f"a saved checkpoint does not fit this model (e.g. {missing[0]}); delete it and retrain")
    for n, w in weights.items():
        params[n].copy_(w)


def run_with_checkpoints(model, tokenizer, examples: list[dict], cfg, steps: list[int], on_point,
                         state_path: Path | None = None, prefix=None, desc: str = "train", log=print) -> None:
    """Train the trainable parameters of `model` on `examples` for ``steps[-1]`` steps of `cfg` (its learning rate,
    batch size, the cosine schedule over ``steps[-1]`` steps) and call ``on_point(step, stats)`` after each step in
    `steps` (stats: seen (distinct examples), tokens, losses, train_seconds). With `state_path`, the weights, optimizer,
    schedule, sampler and stats are saved there after each point, and a rerun resumes from the last one."""
    from .lora import bucketed_batches, train_step, training_setup

    rng, encoded, lengths, params, opt, sched = training_setup(model, tokenizer, examples, cfg, steps[-1], desc)
    step, batches, seen, stats = 0, [], set(), {"tokens": 0, "losses": [], "train_seconds": 0.0}
    if state_path is not None and state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        load_weights(model, st["weights"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step, batches, seen, stats = st["step"], st["batches"], set(st["seen"]), st["stats"]
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])  # LoRA dropout: a resumed run draws what the uninterrupted one draws
        log(f"{desc}: resuming at step {step} of {steps[-1]}")
    model.train()
    for target in [s for s in steps if s > step]:
        t0 = time.time()
        while step < target:
            if not batches:
                batches = bucketed_batches(lengths, cfg.batch_size, rng)
            idx = batches.pop()
            seen.update(idx)
            loss, n_tok, _ = train_step(model, [encoded[i] for i in idx], tokenizer.pad_token_id, cfg, params, opt,
                                        sched, f"{desc}: step {step}", prefix, idx)
            stats["losses"].append(round(loss, 4))
            stats["tokens"] += n_tok
            step += 1
        stats["train_seconds"] = round(stats["train_seconds"] + time.time() - t0, 1)
        on_point(step, dict(stats, seen=len(seen)))
        model.train()
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_suffix(".tmp")
            torch.save({"weights": weights_of(model), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "batches": batches, "seen": sorted(seen), "stats": stats,
                        "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, tmp)
            tmp.replace(state_path)
    model.eval()


def loss_summary(losses: list[float]) -> tuple[float, float]:
    """(first loss, mean of the last fifth): what library.json records of a training run."""
    if not losses:
        return float("nan"), float("nan")
    tail = losses[-max(1, len(losses) // 5):]
    return round(losses[0], 4), round(sum(tail) / len(tail), 4)
