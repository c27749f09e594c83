"""Metrics: exact match, ROUGE, BLEU, GSM8K final-answer accuracy, and the per-task / per-method summaries.

- Multiple choice: BIG-bench's ``multiple_choice_grade`` (the choice with the highest log-likelihood wins),
  plus the exact match of a greedy generated answer;
- exact match (DisflQA, ObjCount): greedy generation, first line, normalised, against every alias;
- generative tasks: BLEU (sacrebleu), ROUGE-1 and ROUGE-L (rouge-score; the main figure), and final-answer
  accuracy for GSM8K.
"""

from __future__ import annotations

import re
import string

from ..tasks import TASKS


def normalize_answer(text: str) -> str:
    text = text.strip().split("\n")[0].lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, targets: list[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(t) for t in targets if t is not None))


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1 (x100), with rouge-score's default tokenizer and stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1 = rl = 0.0
    for p, r in zip(predictions, references):
        s = scorer.score(r, p)
        r1 += s["rouge1"].fmeasure
        rl += s["rougeL"].fmeasure
    n = max(1, len(predictions))
    return {"rouge1": 100 * r1 / n, "rougeL": 100 * rl / n}


def bleu_score(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenisation), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


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


def accuracy_result(examples: list[dict], logprobs: list[list[float]]) -> dict:
    """Multiple-choice accuracy (x100): the choice with the highest log-likelihood wins."""
    correct = [max(range(len(lp)), key=lp.__getitem__) == ex["answer_index"] for lp, ex in zip(logprobs, examples)]
    acc = 100 * sum(correct) / max(1, len(correct))
    return {"n": len(examples), "accuracy": acc, "main": acc, "metric": "accuracy"}


def generation_result(task: str, examples: list[dict], preds: list[str]) -> dict:
    """The metrics of a task's generated answers: exact match for the exact-match tasks, else BLEU,
    ROUGE-1, ROUGE-L (the main figure) and, for GSM8K, final-answer accuracy."""
    spec = TASKS.get(task)
    refs = [ex["target"] for ex in examples]
    if spec is not None and spec.metrics == ("exact_match",):
        em = 100 * sum(exact_match(p, [ex["target"], *ex.get("aliases", [])])
                       for p, ex in zip(preds, examples)) / max(1, len(examples))
        return {"n": len(examples), "exact_match": em, "main": em, "metric": "exact_match"}
    result = {"n": len(examples), **rouge_scores(preds, refs), "bleu": bleu_score(preds, refs), "metric": "rougeL"}
    if task == "gsm8k":
        result["answer_accuracy"] = 100 * gsm8k_accuracy(preds, refs)
    result["main"] = result["rougeL"]
    return result


def scoring_kind(task: str, ex: dict) -> str:
    """'choice' (log-likelihood ranking + generated exact match), 'em' (generated exact match) or 'gen'."""
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
        res["accuracy"] = 100 * sum(p.get("choice") == ex["answer_index"] for p, ex in zip(preds, exs)) / n
        res["main"], res["metric"] = res["accuracy"], "accuracy"
        res["exact_match"] = 100 * sum(exact_match(g, [ex["target"], *(ex.get("aliases") or [])])
                                       for g, ex in zip(gens, exs)) / n
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
    tf = [r["teacher_forced"] for r in per_task.values() if "teacher_forced" in r]
    if tf:
        entry["teacher_forced_mean"] = {k: sum(x[k] for x in tf) / len(tf) for k in ("bleu", "rouge1", "rougeL")}
    if route_log is not None and items:
        top = route_log
        entry["router_accuracy"] = 100 * sum(tp == it["task"] for tp, it in zip(top, items)) / len(items)
        entry["mean_adapters"] = sum(len(s) for s in sets) / len(sets)
        entry["base_fallback"] = sum(not s for s in sets)
    return entry
