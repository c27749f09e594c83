"""Metrics: exact match, ROUGE, BLEU, GSM8K final-answer accuracy, and the per-task / per-method summaries.

- Multiple choice: BIG-bench's ``multiple_choice_grade`` (the choice with the highest log-likelihood wins),
  plus the exact match of a greedy generated answer;
- exact match (DisflQA, ObjCount): greedy generation, first line, normalised, against every alias;
- generative tasks: BLEU (sacrebleu), ROUGE-1 and ROUGE-L (rouge-score; the main figure), and final-answer
  accuracy for GSM8K.

A task result also carries its per-example scores (``per_example``) and the 95% bootstrap interval of each figure
(``ci``, see :mod:`.stats`); a method's summary the interval of its mean over tasks (``mean_ci``).
"""

from __future__ import annotations

import re
import string

from ..tasks import TASKS
from ..stats import BLEU_ORDER, bleu_from_statistics, bleu_full_statistics, mean_interval, task_intervals


def normalize_answer(text: str) -> str:
    text = text.strip().split("\n")[0].lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, targets: list[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(t) for t in targets if t is not None))


def rouge_per_example(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1 and ROUGE-L F1 (x100) of each prediction, with rouge-score's default tokenizer and stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {k: [100 * s[k].fmeasure for s in scores] for k in ("rouge1", "rougeL")}


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1 (x100), with rouge-score's default tokenizer and stemming."""
    per = rouge_per_example(predictions, references)
    n = max(1, len(predictions))
    return {k: sum(v) / n for k, v in per.items()}


def bleu_score(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenisation), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def bleu_statistics(predictions: list[str], references: list[str]) -> list[list[int]]:
    """sacrebleu's per-sentence BLEU statistics as 6 rows of one integer per example: hypothesis length, reference
    length, matched 1- to 4-grams (the hypothesis n-gram counts follow from its length; see
    :data:`.stats.BLEU_ORDER`). Summed over any subset of the examples they give that subset's corpus BLEU
    (:func:`.stats.bleu_from_statistics`), which is how its interval is resampled."""
    from sacrebleu.metrics import BLEU

    rows = BLEU()._extract_corpus_statistics(predictions, [references])  # what corpus_bleu sums
    return [list(col) for col in zip(*rows)][:2 + BLEU_ORDER] if rows else []


_NUM = re.compile(r"-?\d[\d,]*\.?\d*")


def gsm8k_answer(text: str) -> str | None:
    """The final number: after '####' when present, else the last number in the text."""
    if "####" in text:
        text = text.split("####", 1)[1]
        m = _NUM.search(text)
    else:
        found = _NUM.findall(text)
        m = None
        if found:
            return found[-1].replace(",", "").rstrip(".")
    return m.group(0).replace(",", "").rstrip(".") if m else None


def gsm8k_accuracy(predictions: list[str], references: list[str]) -> float:
    ok = 0
    for p, r in zip(predictions, references):
        a, b = gsm8k_answer(p), gsm8k_answer(r)
        if a is not None and b is not None:
            try:
                ok += float(a) == float(b)
            except ValueError:
                ok += a == b
    return ok / max(1, len(predictions))


def _hits(flags) -> list[int]:
    """0/1 outcomes on the figure's scale: 0 or 100 per example."""
    return [100 if f else 0 for f in flags]


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def with_intervals(result: dict) -> dict:
    """`result` with the 95% bootstrap interval of each figure that has per-example scores (``ci``)."""
    ci = task_intervals(result)
    if ci:
        result["ci"] = ci
    return result


def accuracy_result(examples: list[dict], logprobs: list[list[float]]) -> dict:
    """Multiple-choice accuracy (x100): the choice with the highest log-likelihood wins."""
    correct = _hits(max(range(len(lp)), key=lp.__getitem__) == ex["answer_index"] for lp, ex in zip(logprobs, examples))
    acc = _mean(correct)
    return with_intervals({"n": len(examples), "accuracy": acc, "main": acc, "metric": "accuracy",
                           "per_example": {"accuracy": correct}})


def generation_result(task: str, examples: list[dict], preds: list[str]) -> dict:
    """The metrics of a task's generated answers: exact match for the exact-match tasks, else BLEU,
    ROUGE-1, ROUGE-L (the main figure) and, for GSM8K, final-answer accuracy."""
    spec = TASKS.get(task)
    refs = [ex["target"] for ex in examples]
    if spec is not None and spec.metrics == ("exact_match",):
        hits = _hits(exact_match(p, [ex["target"], *(ex.get("aliases") or [])]) for p, ex in zip(preds, examples))
        em = _mean(hits)
        return with_intervals({"n": len(examples), "exact_match": em, "main": em, "metric": "exact_match",
                               "per_example": {"exact_match": hits}})
    rouge = rouge_per_example(preds, refs)
    per = {k: [round(x, 2) for x in v] for k, v in rouge.items()}
    per["bleu_stats"] = bleu_statistics(preds, refs)
    bleu = bleu_from_statistics(bleu_full_statistics(per["bleu_stats"]).sum(axis=1)) if preds else 0.0  # = bleu_score
    result = {"n": len(examples), **{k: _mean(v) for k, v in rouge.items()}, "bleu": bleu, "metric": "rougeL"}
    if task == "gsm8k":
        result["answer_accuracy"] = 100 * gsm8k_accuracy(preds, refs)
        per["answer_accuracy"] = _hits(gsm8k_accuracy([p], [r]) for p, r in zip(preds, refs))
    result["main"] = result["rougeL"]
    result["per_example"] = per
    return with_intervals(result)


def scoring_kind(task: str, ex: dict) -> str:
    """'choice' (log-likelihood ranking, + optionally the generated answer's exact match), 'em' (generated exact
    match) or 'gen'."""
    if ex.get("choices"):
        return "choice"
    spec = TASKS.get(task)
    if spec is not None and spec.metrics == ("exact_match",):
        return "em"
    return "gen"


def task_metrics(task: str, items: list[dict], preds: list[dict]) -> dict:
    """Every metric of one task from its items' predictions; 'main' is the headline figure."""
    n = len(items)
    res: dict = {"n": n}
    if not n:
        return res
    kind = scoring_kind(task, items[0]["ex"])
    exs = [it["ex"] for it in items]
    gens = [p.get("gen", "") for p in preds]
    if kind == "choice":
        acc = _hits(p.get("choice") == ex["answer_index"] for p, ex in zip(preds, exs))
        res.update({"accuracy": _mean(acc), "main": _mean(acc), "metric": "accuracy",
                    "per_example": {"accuracy": acc}})
        if all("gen" in p for p in preds):  # the generated answers are optional (EvalConfig.mcq_exact_match)
            em = _hits(exact_match(g, [ex["target"], *(ex.get("aliases") or [])]) for g, ex in zip(gens, exs))
            res["exact_match"] = _mean(em)
            res["per_example"]["exact_match"] = em
        with_intervals(res)
    else:
        res.update(generation_result(task, exs, gens))
    if kind == "gen":
        refs = [ex["target"] for ex in exs]
        tf = [p.get("tf") for p in preds]
        if all(t is not None for t in tf):
            r = rouge_scores(tf, refs)
            res["teacher_forced"] = {"bleu": bleu_score(tf, refs), "rouge1": r["rouge1"], "rougeL": r["rougeL"]}
    return res


def summarise(tasks: list[str], items: list[dict], preds: list[dict], sets: list[dict] | None, extra_seconds: float,
               route_log: list[str | None] | None = None) -> dict:
    per_task = {}
    for t in tasks:
        idx = [i for i, it in enumerate(items) if it["task"] == t]
        per_task[t] = task_metrics(t, [items[i] for i in idx], [preds[i] for i in idx])
    mains = [r["main"] for r in per_task.values() if "main" in r]
    entry = {"tasks": per_task, "mean": sum(mains) / max(1, len(mains)), "items": len(items),
             "seconds": round(sum(p["seconds"] for p in preds) + extra_seconds, 3)}
    ci = mean_interval([r for r in per_task.values() if "main" in r])
    if ci is not None:
        entry["mean_ci"] = ci
    tf = [r["teacher_forced"] for r in per_task.values() if "teacher_forced" in r]
    if tf:
        entry["teacher_forced_mean"] = {k: sum(x[k] for x in tf) / len(tf) for k in ("bleu", "rouge1", "rougeL")}
    if route_log is not None and items:
        top = route_log
        entry["router_accuracy"] = 100 * sum(tp == it["task"] for tp, it in zip(top, items)) / len(items)
        entry["mean_adapters"] = sum(len(s) for s in sets) / len(sets)
        entry["base_fallback"] = sum(not s for s in sets)
    return entry
