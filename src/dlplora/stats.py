"""Uncertainty: 95% percentile-bootstrap intervals over test examples, and the paired test of an adapter against
the base model on one task.

- An interval resamples a task's test examples with replacement (:data:`N_RESAMPLES` times, fixed :data:`SEED`)
  and recomputes the figure on each resample: the mean of the per-example scores (accuracy, exact match, ROUGE),
  or corpus BLEU from the resample's summed n-gram statistics (:func:`bleu_from_statistics`, sacrebleu's own
  formula) -- corpus BLEU is not a mean of sentence scores. The interval of a mean over tasks resamples each task
  on its own (stratified) and averages the tasks' figures.
- The paired test compares two methods example by example on the same test examples (:func:`paired_test`): the
  exact two-sided sign test on the examples where they differ. For 0/1 scores (accuracy, exact match) that is the
  exact McNemar test on the discordant pairs; for ROUGE-L, the sign test of the per-example differences.

Per-example scores are stored in a task result's ``per_example`` (see :func:`.metrics.task_metrics`) on the scale
of the figure: 0 or 100 per example for accuracy and exact match, ROUGE F1 x 100, so that their mean is the figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
ALPHA = 0.05
BLEU_ORDER = 4
"""Per-example BLEU statistics are stored as 6 rows of one integer per example: hypothesis length, reference length
(in tokens) and matched n-grams for n = 1..4. The hypothesis n-gram counts that complete sacrebleu's statistics
follow from the hypothesis length (max(0, length - n + 1)), so they are not stored."""


@dataclass(frozen=True)
class Sample:
    """One task's figure as a function of its `n` test examples: ``statistic(idx)`` is the figure of each resample
    given an index matrix idx (resamples x n)."""

    n: int
    statistic: Callable[[np.ndarray], np.ndarray]


def mean_sample(values: Sequence[float]) -> Sample:
    """A figure that is the mean of per-example scores."""
    v = np.asarray(values, dtype=float)
    return Sample(len(v), lambda idx: v[idx].mean(axis=1))


def bleu_full_statistics(stats: Sequence[Sequence[int]]) -> np.ndarray:
    """The stored per-example rows (:data:`BLEU_ORDER`) completed with the hypothesis n-gram counts: sacrebleu's
    10 statistics per example, as an array (10, n)."""
    s = np.asarray(stats, dtype=np.int64).reshape(2 + BLEU_ORDER, -1)
    totals = np.stack([np.maximum(s[0] - k, 0) for k in range(BLEU_ORDER)])
    return np.concatenate([s, totals])


def bleu_from_statistics(stats: Sequence[int]) -> float:
    """Corpus BLEU (0-100) from sacrebleu's 10 statistics summed over the examples (hypothesis length, reference
    length, matched and hypothesis n-grams for n = 1..4), as its corpus_bleu computes it (exponential smoothing)."""
    from sacrebleu.metrics import BLEU

    s = [int(x) for x in stats]
    return float(BLEU.compute_bleu(s[2:2 + BLEU_ORDER], s[2 + BLEU_ORDER:2 + 2 * BLEU_ORDER], s[0], s[1],
                                   smooth_method="exp").score)


def bleu_sample(stats: Sequence[Sequence[int]]) -> Sample:
    """A figure that is corpus BLEU over the examples; `stats` holds the stored rows of :data:`BLEU_ORDER`."""
    s = bleu_full_statistics(stats)
    return Sample(s.shape[1], lambda idx: np.array([bleu_from_statistics(t) for t in s[:, idx].sum(axis=2).T]))


def bootstrap_ci(samples: Sample | Sequence[Sample], *, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile-bootstrap interval of one task's figure, or (a list of samples) of the mean of several tasks'
    figures, each task resampled on its own. None when there is no example to resample."""
    group = [samples] if isinstance(samples, Sample) else list(samples)
    if not group or any(s.n == 0 for s in group):
        return None
    rng = np.random.default_rng(seed)
    reps = np.zeros(n_resamples)
    for s in group:
        reps += s.statistic(rng.integers(0, s.n, size=(n_resamples, s.n)))
    reps /= len(group)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def sign_test(wins: int, losses: int) -> float:
    """The exact two-sided sign test: the probability, under a fair coin, of a split of `wins` + `losses` at least
    as uneven as this one. Ties are left out before. On 0/1 scores it is the exact McNemar test, the discordant
    pairs being the wins and the losses."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_test(a: Sequence[float], b: Sequence[float], *, alpha: float = ALPHA, n_resamples: int = N_RESAMPLES,
                seed: int = SEED) -> dict:
    """`a` against `b`, per-example scores of two methods on the same examples in the same order: the examples
    where a scores higher (wins), lower (losses) or the same (ties), the exact sign test p-value, the mean
    difference with its paired bootstrap interval, and whether a is better at level 1 - alpha."""
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} against {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = sign_test(wins, losses)
    ci = bootstrap_ci(mean_sample(d), n_resamples=n_resamples, seed=seed)
    return {"n": len(d), "wins": wins, "losses": losses, "ties": len(d) - wins - losses,
            "diff": float(d.mean()) if len(d) else 0.0, "diff_ci": list(ci) if ci else None, "p": p,
            "better": bool(p < alpha and wins > losses), "worse": bool(p < alpha and losses > wins)}


def main_scores(result: dict) -> list[float] | None:
    """A task result's per-example scores of its main figure, or None (a results.json from before they were kept,
    or a main figure that is not a mean of per-example scores)."""
    return (result.get("per_example") or {}).get(result.get("metric"))


def task_sample(result: dict, key: str = "main") -> Sample | None:
    """The bootstrap sample of one figure of a task result ("main", "accuracy", "exact_match", "rouge1", "rougeL",
    "answer_accuracy" or "bleu"), from its per-example data; None when the result does not carry it."""
    pe = result.get("per_example") or {}
    if key == "main":
        key = result.get("metric")
    if key == "bleu":
        return bleu_sample(pe["bleu_stats"]) if pe.get("bleu_stats") else None
    return mean_sample(pe[key]) if pe.get(key) is not None else None


def task_intervals(result: dict) -> dict[str, list[float]]:
    """The 95% interval of every figure of a task result that has per-example data, "main" included."""
    out = {}
    for key in ("accuracy", "exact_match", "rouge1", "rougeL", "answer_accuracy", "bleu"):
        s = task_sample(result, key)
        ci = bootstrap_ci(s) if s is not None else None
        if ci is not None:
            out[key] = [round(ci[0], 3), round(ci[1], 3)]
    if result.get("metric") in out:
        out["main"] = out[result["metric"]]
    return out


def mean_interval(results: Sequence[dict], key: str = "main") -> list[float] | None:
    """The interval of the mean of `key` over several task results (each resampled on its own), or None unless
    every one carries its per-example data."""
    samples = [task_sample(r, key) for r in results]
    if not samples or any(s is None for s in samples):
        return None
    ci = bootstrap_ci(samples)
    return [round(ci[0], 3), round(ci[1], 3)] if ci else None


def paired_tests(adapter: dict[str, dict], base: dict[str, dict]) -> dict[str, dict]:
    """Per task, the paired test of the adapter's main per-example scores against the base model's (both task
    results of one setting, hence the same examples in the same order); tasks without per-example data on both
    sides are left out."""
    out = {}
    for t, r in adapter.items():
        a, b = main_scores(r), main_scores(base.get(t) or {})
        if a is not None and b is not None and len(a) == len(b) and a:
            out[t] = {"metric": r.get("metric"), **paired_test(a, b)}
    return out


def paired_mean_interval(a: Sequence[dict], b: Sequence[dict]) -> list[float] | None:
    """The interval of method a's mean main figure over tasks minus method b's, `a` and `b` being their results
    on the same tasks (in the same order): each task's examples are resampled once for both methods (paired). None
    unless every task carries per-example scores of the same examples on both sides."""
    samples = []
    for ra, rb in zip(a, b):
        x, y = main_scores(ra), main_scores(rb)
        if x is None or y is None or len(x) != len(y) or not x:
            return None
        samples.append(mean_sample(np.asarray(x, dtype=float) - np.asarray(y, dtype=float)))
    ci = bootstrap_ci(samples) if samples else None
    return [round(ci[0], 3), round(ci[1], 3)] if ci else None


def versus(a: dict, b: dict) -> dict:
    """Method `a` against method `b` on one setting's tasks (two method entries of a results.json, same examples): the
    difference of their means over tasks with its paired 95% interval, and per task the paired sign test of a
    against b (tasks where a is significantly better / worse)."""
    tasks = [t for t in a["tasks"] if t in b["tasks"]]
    tests = paired_tests({t: a["tasks"][t] for t in tasks}, {t: b["tasks"][t] for t in tasks})
    return {"diff": round(a["mean"] - b["mean"], 4),
            "ci": paired_mean_interval([a["tasks"][t] for t in tasks], [b["tasks"][t] for t in tasks]),
            "better_tasks": sorted(t for t, r in tests.items() if r["better"]),
            "worse_tasks": sorted(t for t, r in tests.items() if r.get("worse"))}
