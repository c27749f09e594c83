"""Metrics and scoring.

- Multiple choice: BIG-bench's ``multiple_choice_grade``: the choice with the highest total
  log-likelihood given the prompt wins (computed with the vocabulary head only on choice tokens).
- Exact match (DisflQA, ObjCount): greedy generation, first line, normalised, against every alias.
- Generative tasks: greedy generation, then BLEU (sacrebleu), ROUGE-1 and ROUGE-L (rouge-score),
  and final-answer accuracy for GSM8K.
"""

from __future__ import annotations

import re
import string
from typing import Callable

import torch

from .tasks import TASKS, candidates, chat_prompt, user_message

# ---------------------------------------------------------------- metric functions


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


# ---------------------------------------------------------------- model scoring


def _body_head(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.lm_head


@torch.inference_mode()
def choice_logprobs(model, tokenizer, examples: list[dict], batch_size: int = 16, max_len: int = 512,
                    history_fn: Callable[[dict], list] | None = None) -> list[list[float]]:
    """Total log-probability of each choice's tokens given the example's chat prompt."""
    seqs = []  # (example index, choice index, ids, start)
    for i, ex in enumerate(examples):
        prompt_ids = tokenizer(chat_prompt(tokenizer, user_message(ex)), add_special_tokens=False).input_ids
        for j, choice in enumerate(candidates(ex)):
            c_ids = tokenizer(choice, add_special_tokens=False).input_ids[: max_len // 2]
            p_ids = prompt_ids[-(max_len - len(c_ids)):]
            seqs.append((i, j, p_ids + c_ids, len(p_ids)))
    out = [[0.0] * len(candidates(ex)) for ex in examples]
    body, head = _body_head(model)
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][2]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for s in range(0, len(order), batch_size):
        chunk = [seqs[k] for k in order[s:s + batch_size]]
        T = max(len(c[2]) for c in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        rows, pos, tgt = [], [], []
        for b, (_, _, seq, start) in enumerate(chunk):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            for t in range(start, len(seq)):
                rows.append(b), pos.append(t - 1), tgt.append(seq[t])
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        rows_t, pos_t, tgt_t = torch.tensor(rows), torch.tensor(pos), torch.tensor(tgt)
        logp = torch.log_softmax(head(hidden[rows_t, pos_t]).float(), -1).gather(1, tgt_t[:, None])[:, 0]
        sums = torch.zeros(len(chunk)).index_add_(0, rows_t, logp)
        for b, (i, j, _, _) in enumerate(chunk):
            out[i][j] = float(sums[b])
    return out


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
                    max_len: int = 1024) -> list[str]:
    """Plain batched greedy generation (left padding) with the model as it is, for scoring."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_len, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for b, i in enumerate(idx):
                outs[i] = tokenizer.decode(gen[b, enc.input_ids.shape[1]:], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = old_side
    return outs


def task_max_new_tokens(task: str) -> int:
    """A generation budget per task, sized to its targets (CPU-friendly)."""
    return {"gsm8k": 160, "cnn_dailymail": 96, "topical_chat": 48, "alpaca": 128, "strategyqa": 48,
            "disfl_qa": 16, "object_counting": 8}.get(task, 64)


def main_metric(task: str) -> str:
    spec = TASKS.get(task)
    if spec is None or spec.kind == "qa":
        return "rougeL"
    return spec.metrics[0]


def score_task(model, tokenizer, task: str, examples: list[dict], batch_size: int = 8,
               max_new_tokens: int | None = None) -> dict:
    """Score `model` on examples of one task; returns every metric of the task plus 'main'."""
    spec = TASKS.get(task)
    has_choices = bool(examples and examples[0].get("choices"))
    result: dict = {"n": len(examples)}
    if has_choices:
        lps = choice_logprobs(model, tokenizer, examples, batch_size=batch_size * 2)
        correct = [max(range(len(lp)), key=lp.__getitem__) == ex["answer_index"] for lp, ex in zip(lps, examples)]
        result["accuracy"] = 100 * sum(correct) / max(1, len(correct))
        result["main"], result["metric"] = result["accuracy"], "accuracy"
        return result
    prompts = [chat_prompt(tokenizer, user_message(ex)) for ex in examples]
    preds = generate_greedy(model, tokenizer, prompts, max_new_tokens or task_max_new_tokens(task), batch_size)
    refs = [ex["target"] for ex in examples]
    if spec is not None and spec.metrics == ("exact_match",):
        result["exact_match"] = 100 * sum(exact_match(p, [ex["target"], *ex.get("aliases", [])])
                                          for p, ex in zip(preds, examples)) / max(1, len(examples))
        result["main"], result["metric"] = result["exact_match"], "exact_match"
    else:
        result.update(rouge_scores(preds, refs))
        result["bleu"] = bleu_score(preds, refs)
        if task == "gsm8k":
            result["answer_accuracy"] = 100 * gsm8k_accuracy(preds, refs)
        result["main"], result["metric"] = result["rougeL"], "rougeL"
    result["examples"] = [{"prediction": p, "target": r} for p, r in list(zip(preds, refs))[:3]]
    return result


# ---------------------------------------------------------------- methods on the fused engine

def _set_key(s: dict) -> tuple:
    return tuple(sorted((n, round(float(w), 6)) for n, w in s.items()))


def score_with_sets(engine, task: str, examples: list[dict], sets: list[dict], batch_size: int = 8) -> dict:
    """Score examples of one task on the fused engine, example i with adapter set sets[i] ({} = base).
    Multiple choice: examples sharing a set are scored together with that set merged into the weights.
    Generative: one batched generation with a per-row set."""
    from collections import defaultdict

    tok = engine.tokenizer
    if examples and examples[0].get("choices"):
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, s in enumerate(sets):
            groups[_set_key(s)].append(i)
        correct = [False] * len(examples)
        for key, idx in groups.items():
            with engine.apply([dict(key)]):
                lps = choice_logprobs(engine.model, tok, [examples[i] for i in idx], batch_size=batch_size * 2)
            for i, lp in zip(idx, lps):
                correct[i] = max(range(len(lp)), key=lp.__getitem__) == examples[i]["answer_index"]
        acc = 100 * sum(correct) / max(1, len(correct))
        return {"n": len(examples), "accuracy": acc, "main": acc, "metric": "accuracy"}
    prompts = [user_message(ex) for ex in examples]
    out = engine.generate(prompts, adapters=list(sets), max_new_tokens=task_max_new_tokens(task))
    preds = [o["text"].strip() for o in out]
    refs = [ex["target"] for ex in examples]
    spec = TASKS.get(task)
    if spec is not None and spec.metrics == ("exact_match",):
        em = 100 * sum(exact_match(p, [ex["target"], *ex.get("aliases", [])]) for p, ex in zip(preds, examples)) / max(1, len(examples))
        return {"n": len(examples), "exact_match": em, "main": em, "metric": "exact_match"}
    result = {"n": len(examples), **rouge_scores(preds, refs), "bleu": bleu_score(preds, refs), "metric": "rougeL"}
    if task == "gsm8k":
        result["answer_accuracy"] = 100 * gsm8k_accuracy(preds, refs)
    result["main"] = result["rougeL"]
    return result


def evaluate_composite(engine, examples_by_task: dict[str, list[dict]], methods=("base", "lora", "dlp"),
                       seed: int = 0, log=print) -> dict:
    """The composite setting: all test prompts shuffled into one stream. `dlp` sees only the prompt text
    (never the task label) and routes it with the plugin; `lora` is the oracle adapter of the true task;
    `base` uses no adapter. Per method: per-task metrics, the mean of the main metrics and wall time."""
    import random
    import time

    stream = [(t, ex) for t, exs in examples_by_task.items() for ex in exs]
    random.Random(seed).shuffle(stream)
    results: dict = {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "base":
            sets = [{} for _ in stream]
        elif method == "lora":
            sets = [{t: 1.0} for t, _ in stream]
        elif method == "dlp":
            sets = engine.route([user_message(ex) for _, ex in stream])  # the text alone: no label
        else:
            raise ValueError(f"unknown method {method!r}")
        per_task = {}
        for task in examples_by_task:
            idx = [i for i, (t, _) in enumerate(stream) if t == task]
            per_task[task] = score_with_sets(engine, task, [stream[i][1] for i in idx], [sets[i] for i in idx])
        entry = {"tasks": per_task, "mean": sum(r["main"] for r in per_task.values()) / max(1, len(per_task)),
                 "seconds": time.perf_counter() - t0}
        if method == "dlp":
            top = [max(s, key=s.get) if s else None for s in sets]
            entry["router_accuracy"] = 100 * sum(tp == t for tp, (t, _) in zip(top, stream)) / max(1, len(stream))
            entry["mean_adapters"] = sum(len(s) for s in sets) / max(1, len(sets))
        results[method] = entry
        log(f"  {method:>5}: mean {entry['mean']:.1f} in {entry['seconds']:.1f}s")
    return results
