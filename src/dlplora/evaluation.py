"""Metrics, scoring and the evaluation harness (`dlp-lora eval`, `dlp-lora reproduce`).

- Multiple choice: BIG-bench's ``multiple_choice_grade``: the choice with the highest total
  log-likelihood given the prompt wins (computed with the vocabulary head only on choice tokens).
- Exact match (DisflQA, ObjCount): greedy generation, first line, normalised, against every alias.
- Generative tasks: greedy generation, then BLEU (sacrebleu), ROUGE-1 and ROUGE-L (rouge-score),
  and final-answer accuracy for GSM8K.
"""

from __future__ import annotations

import re
import string

import torch

from .errors import DLPLoRAError
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


def choice_logprobs(model, tokenizer, examples: list[dict], batch_size: int = 16,
                    max_len: int = 512) -> list[list[float]]:
    """Total log-probability of each choice's tokens given the example's chat prompt, on `model` as it is
    (a plain or PEFT model): :func:`choice_scores` with no adapter sets and no history."""
    n = len(examples)
    return choice_scores(PeftRunner(model, tokenizer), examples, [{}] * n, [[]] * n, batch_size=batch_size,
                         max_len=max_len)


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


def score_task(model, tokenizer, task: str, examples: list[dict], batch_size: int = 8,
               max_new_tokens: int | None = None) -> dict:
    """Score `model` on examples of one task; returns every metric of the task plus 'main'."""
    if examples and examples[0].get("choices"):
        return accuracy_result(examples, choice_logprobs(model, tokenizer, examples, batch_size=batch_size * 2))
    prompts = [chat_prompt(tokenizer, user_message(ex)) for ex in examples]
    preds = generate_greedy(model, tokenizer, prompts, max_new_tokens or task_max_new_tokens(task), batch_size)
    result = generation_result(task, examples, preds)
    result["examples"] = [{"prediction": p, "target": ex["target"]} for p, ex in list(zip(preds, examples))[:3]]
    return result


# ---------------------------------------------------------------- methods on the fused engine

def score_with_sets(engine, task: str, examples: list[dict], sets: list[dict], batch_size: int = 8) -> dict:
    """Score examples of one task on the fused engine, example i with adapter set sets[i] ({} = base):
    choice ranking or one batched generation, each with a per-row set."""
    if examples and examples[0].get("choices"):
        return accuracy_result(examples, choice_scores(FusedRunner(engine), examples, sets, [[]] * len(examples),
                                                       batch_size=batch_size * 2))
    out = engine.generate([user_message(ex) for ex in examples], adapters=list(sets),
                          max_new_tokens=task_max_new_tokens(task))
    return generation_result(task, examples, [o["text"].strip() for o in out])


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
            top = _top_names(sets)
            entry["router_accuracy"] = 100 * sum(tp == t for tp, (t, _) in zip(top, stream)) / max(1, len(stream))
            entry["mean_adapters"] = sum(len(s) for s in sets) / max(1, len(sets))
        results[method] = entry
        log(f"  {method:>5}: mean {entry['mean']:.1f} in {entry['seconds']:.1f}s")
    return results


# ================================================================ the evaluation harness (`dlp-lora eval`)
#
# Settings (the paper's): "single" (each task's test set, the right adapter given), "composite-17" /
# "composite-9" / "composite-26" (the MCQ / QA / all test prompts of the library's tasks shuffled into one
# stream; a method sees the prompt text only) and "multiturn" (conversations of 3 turns from different
# tasks; routing methods re-decide at every turn with the history as context).
#
# Methods: base (no adapter), lora (oracle: the true task's adapter), dlp (the plugin, top-p, with the
# paper's softmax weighting = "dlp" and the renormalised one = "dlp-renorm"), arrow (PEFT's training-free
# Arrow routing over the same adapters), merge-all (one static uniform merge of every adapter).
#
# Scoring: multiple choice by log-likelihood ranking (BIG-bench multiple_choice_grade, the main figure)
# plus exact match of a greedy generated answer; exact-match tasks by greedy generation; generative tasks
# by greedy generation then BLEU / ROUGE-1 / ROUGE-L (+ final-answer accuracy for GSM8K); optionally a
# clearly labelled teacher-forced variant (argmax at the gold target positions, as the paper's code did).
#
# Every prediction is cached per (library, method, example, kind) in OUT/cache/<method>.jsonl, so a rerun
# or a crashed run resumes; a method's "seconds" is the sum of the compute time of its predictions
# (recorded with them, so it survives a resume) plus, for dlp, the routing time.

import hashlib
import json
import os
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

SETTINGS = ("single", "composite-17", "composite-9", "composite-26", "multiturn")
METHODS = ("base", "lora", "dlp", "arrow", "merge-all")
SINGLE_METHODS = ("base", "lora")
METHOD_LABELS = {"base": "Base", "lora": "LoRA (oracle)", "dlp": "DLP-LoRA", "dlp-renorm": "DLP-LoRA (renorm)",
                 "arrow": "Arrow (PEFT)", "merge-all": "Merge-all"}
RESULTS_FORMAT = 1


def task_group(task: str, examples: list[dict]) -> str:
    """'mcq' or 'qa': the registry's kind (the paper's 17 / 9 split), else multiple choice when the
    prepared examples carry choices."""
    spec = TASKS.get(task)
    if spec is not None:
        return spec.kind
    return "mcq" if examples and examples[0].get("choices") else "qa"


def scoring_kind(task: str, ex: dict) -> str:
    """'choice' (log-likelihood ranking + generated exact match), 'em' (generated exact match) or 'gen'."""
    if ex.get("choices"):
        return "choice"
    spec = TASKS.get(task)
    if spec is not None and spec.metrics == ("exact_match",):
        return "em"
    return "gen"


def setting_tasks(setting: str, examples_by_task: dict[str, list[dict]]) -> list[str]:
    names = list(examples_by_task)
    if setting == "composite-17":
        return [t for t in names if task_group(t, examples_by_task[t]) == "mcq"]
    if setting == "composite-9":
        return [t for t in names if task_group(t, examples_by_task[t]) == "qa"]
    if setting in ("single", "composite-26", "multiturn"):
        return names
    raise DLPLoRAError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")


def parse_settings(value: str | None) -> list[str]:
    items = [s.strip() for s in (value or "composite-26").split(",") if s.strip()]
    out = []
    for s in items:
        group = list(SETTINGS) if s == "all" else [s]
        for g in group:
            if g not in SETTINGS:
                raise DLPLoRAError(f"unknown setting {g!r}; choose from {', '.join(SETTINGS)} (or 'all')")
            if g not in out:
                out.append(g)
    return out


def _parse_choices(value: str | None, allowed, default: str, what: str) -> list[str]:
    """A comma-separated list of allowed names, deduplicated in order."""
    items = [m.strip() for m in (value or default).split(",") if m.strip()]
    for m in items:
        if m not in allowed:
            raise DLPLoRAError(f"unknown {what} {m!r}; choose from {', '.join(allowed)}")
    if not items:
        raise DLPLoRAError(f"no {what}s given")
    return list(dict.fromkeys(items))


def parse_methods(value: str | None) -> list[str]:
    return _parse_choices(value, METHODS, ",".join(METHODS), "method")


def parse_p_values(value: str | None) -> list[float]:
    """'0.3,0.6,0.9' -> [0.3, 0.6, 0.9]; each must be in (0, 1]."""
    out = []
    for part in (value or "").split(","):
        if not part.strip():
            continue
        try:
            x = float(part)
        except ValueError:
            raise DLPLoRAError(f"--p-sweep: {part.strip()!r} is not a number") from None
        out.append(_check_p(x, "--p-sweep values"))
    return out


def _check_p(x: float, what: str) -> float:
    if not 0 < x <= 1:
        raise DLPLoRAError(f"{what} must be in (0, 1], got {x:g}")
    return float(x)


def parse_weightings(value: str | None) -> list[str]:
    from .engine import WEIGHTINGS

    return _parse_choices(value, WEIGHTINGS, "softmax,renorm", "weighting")


def dlp_variant(weighting: str) -> str:
    return "dlp" if weighting == "softmax" else f"dlp-{weighting}"


# ---------------------------------------------------------------- streams and conversations

def build_stream(examples_by_task: dict[str, list[dict]], tasks: list[str], seed: int = 0) -> list[dict]:
    """All test examples of `tasks` shuffled into one stream of items {uid, task, ex, history}.
    The task label stays with the harness (for scoring); methods get only the prompt text."""
    stream = [{"uid": f"{t}/{ex.get('id', i)}", "task": t, "ex": ex, "history": []}
              for t in tasks for i, ex in enumerate(examples_by_task[t])]
    random.Random(seed).shuffle(stream)
    return stream


def build_conversations(examples_by_task: dict[str, list[dict]], tasks: list[str], turns: int = 3, seed: int = 0,
                        limit: int | None = None) -> list[list[dict]]:
    """Conversations of `turns` turns drawn from different tasks (no task repeats inside a conversation
    when there are enough tasks; never the same task twice in a row), each test example used at most once."""
    rng = random.Random(seed)
    pools = {t: [(f"{t}/{ex.get('id', i)}", ex) for i, ex in enumerate(examples_by_task[t])] for t in tasks}
    for p in pools.values():
        rng.shuffle(p)
    convs: list[list[dict]] = []
    if len(tasks) < 2:
        return convs
    while limit is None or len(convs) < limit:
        conv: list[dict] = []
        for _ in range(turns):
            used = {c["task"] for c in conv}
            prev = conv[-1]["task"] if conv else None
            cands = [t for t in tasks if pools[t] and t != prev and t not in used] or \
                    [t for t in tasks if pools[t] and t != prev]
            if not cands:
                break
            most = max(len(pools[t]) for t in cands)
            t = rng.choice([t for t in cands if len(pools[t]) == most])
            uid, ex = pools[t].pop()
            conv.append({"uid": uid, "task": t, "ex": ex})
        if len(conv) < turns:
            break
        convs.append(conv)
    return convs


# ---------------------------------------------------------------- prediction cache

class PredictionCache:
    """Predictions as JSON lines, one file per method: {"k": key, "v": value, "s": seconds}.
    A truncated last line (a crash mid-write) is ignored."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, dict] = {}
        self.hits = 0
        self.new = 0
        for f in sorted(self.dir.glob("*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.data[rec["k"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> dict | None:
        rec = self.data.get(key)
        if rec is not None:
            self.hits += 1
        return rec

    def put_many(self, method: str, records: list[dict]) -> None:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in method)
        with open(self.dir / f"{safe}.jsonl", "a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                self.data[rec["k"]] = rec
            fh.flush()
        self.new += len(records)


# ---------------------------------------------------------------- runners: how a method runs forward passes

class FusedRunner:
    """Forward passes and generation on the DLP-LoRA engine with one weighted adapter set per row."""

    def __init__(self, engine):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer

    def context(self, sets):
        return self.engine.apply(sets)

    def generate(self, texts, histories, sets, max_new) -> list[str]:
        out = self.engine.generate(list(texts), adapters=[dict(s) for s in sets], history=[list(h) for h in histories],
                                   max_new_tokens=[int(m) for m in max_new], on_error="return")
        return [o.get("text", "").strip() for o in out]


class PeftRunner:
    """A model used as it is: a plain or PEFT model, or one that routes by itself (Arrow); adapter sets are
    ignored. Generation uses the engine's decode loop (same greedy decoding, KV cache and EOS handling as the
    other methods)."""

    def __init__(self, model, tokenizer):
        from .engine import eos_token_ids

        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = eos_token_ids(model, tokenizer)

    def context(self, sets):
        return nullcontext()

    @torch.inference_mode()
    def generate(self, texts, histories, sets, max_new) -> list[str]:
        from .engine import decode_loop

        tok = self.tokenizer
        rows = [tok(chat_prompt(tok, t, list(h)), add_special_tokens=False)["input_ids"] for t, h in zip(texts, histories)]
        gen, _ = decode_loop(self.model, rows, [int(m) for m in max_new], self.eos_ids, tok.pad_token_id)
        return [tok.decode(g, skip_special_tokens=True).strip() for g in gen]


def build_arrow_model(library, model=None, top_k: int = 3, temperature: float = 1.0, seed: int = 0):
    """PEFT's Arrow (``ArrowConfig`` + the ``arrow_router`` LoRA variant) over the library's adapters, on a
    fresh copy of the backbone. Built like ``peft.create_arrow_model`` (which loads every adapter as
    ``task_i`` and adds the ``arrow_router`` adapter), except that the router targets exactly the modules
    the adapters cover: create_arrow_model targets every module with a matching leaf name, which fails for
    adapters restricted to some layers (``layers_to_transform``, our --top-layers). Returns (model, names)."""
    from peft import ArrowConfig, LoraConfig, PeftModel

    from .backbone import load_backbone

    names = library.names
    where = model
    if where is None:
        base_path = library.base_model.get("path")
        where = base_path if base_path and Path(base_path).is_dir() else None
    net, tok, _ = load_backbone(where)
    pm = PeftModel.from_pretrained(net, str(library.adapter_dir(names[0])), adapter_name="task_0")
    for i, n in enumerate(names[1:], 1):
        pm.load_adapter(str(library.adapter_dir(n)), adapter_name=f"task_{i}")
    task_names = [f"task_{i}" for i in range(len(names))]
    covered: dict[str, set] = {}
    ranks = set()
    for mod_name, mod in pm.get_base_model().named_modules():
        if hasattr(mod, "lora_A"):
            for tn in task_names:
                if tn in mod.lora_A:
                    covered.setdefault(tn, set()).add(mod_name)
                    ranks.add(mod.lora_A[tn].weight.shape[0])
    mods = covered.get("task_0", set())
    if len(ranks) != 1 or any(covered.get(tn, set()) != mods for tn in task_names):
        raise DLPLoRAError("Arrow needs adapters of one rank on the same modules; this library mixes ranks or "
                           "target modules")
    cfg = ArrowConfig(top_k=min(top_k, len(names)), router_temperature=temperature, rng_seed=seed)
    cfg.task_adapter_names = task_names
    cfg.gks_adapter_names = []
    pm.add_adapter("arrow_router", LoraConfig(arrow_config=cfg, target_modules=sorted(mods), r=ranks.pop()))
    pm.set_adapter("arrow_router")
    pm.eval()
    return pm, tok


# ---------------------------------------------------------------- scoring primitives with per-row sets

def _prompt_ids(tok, ex: dict, history) -> list[int]:
    return tok(chat_prompt(tok, user_message(ex), list(history or [])), add_special_tokens=False).input_ids


def choice_predictions(runner, examples, sets, histories, batch_size: int = 16, max_len: int = 1024) -> list[int]:
    """Index of the most likely choice (total log-likelihood of its tokens) per example, example i scored
    with adapter set sets[i] after chat history histories[i]."""
    scores = choice_scores(runner, examples, sets, histories, batch_size=batch_size, max_len=max_len)
    return [max(range(len(sc)), key=sc.__getitem__) for sc in scores]


@torch.inference_mode()
def choice_scores(runner, examples, sets, histories, batch_size: int = 16, max_len: int = 1024) -> list[list[float]]:
    """Total log-likelihood of each choice's tokens after the prompt, per example (see choice_predictions).

    The prompt is run once per example (KV cache), then every choice's tokens continue from that cache: a task with
    5 choices costs one prompt, not five. Examples are batched by prompt length, up to `batch_size` choice rows."""
    from .engine import _cache_kwarg, _new_cache

    tok = runner.tokenizer
    model = runner.model
    ck = _cache_kwarg()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    dev = next(model.parameters()).device
    items = []
    for i, ex in enumerate(examples):
        c_ids = [tok(c, add_special_tokens=False).input_ids[: max_len // 2] or [tok.eos_token_id] for c in candidates(ex)]
        p_ids = _prompt_ids(tok, ex, histories[i])[-(max_len - max(len(c) for c in c_ids)):]
        items.append((i, p_ids, c_ids))
    out: list[list[float]] = [[] for _ in examples]
    order = sorted(range(len(items)), key=lambda k: len(items[k][1]))
    chunks, cur, rows = [], [], 0
    for k in order:
        n_c = len(items[k][2])
        if cur and (rows + n_c > batch_size):
            chunks.append(cur)
            cur, rows = [], 0
        cur.append(items[k])
        rows += n_c
    if cur:
        chunks.append(cur)
    for chunk in chunks:
        n = len(chunk)
        width = max(len(p) for _, p, _ in chunk)
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, (_, p_ids, _) in enumerate(chunk):
            ids[r, width - len(p_ids):] = torch.tensor(p_ids)
            mask[r, width - len(p_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(model)
        row_sets = [sets[i] for i, _, _ in chunk]
        with runner.context(row_sets):
            first = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                          use_cache=True, logits_to_keep=1, **{ck: cache}).logits[:, -1].float().log_softmax(-1)
        k_max = max(len(c) for _, _, c in chunk)
        c_len = max(len(x) for _, _, c in chunk for x in c)
        cache.batch_repeat_interleave(k_max)
        c_ids = torch.full((n * k_max, c_len), pad, dtype=torch.long)
        c_mask = torch.zeros((n * k_max, c_len), dtype=torch.long)
        for r, (_, _, cs) in enumerate(chunk):
            for j, c in enumerate(cs):
                c_ids[r * k_max + j, : len(c)] = torch.tensor(c)
                c_mask[r * k_max + j, : len(c)] = 1
        c_pos = pos[:, -1:].repeat_interleave(k_max, 0) + 1 + torch.arange(c_len)[None]
        full_mask = torch.cat([mask.repeat_interleave(k_max, 0), c_mask], dim=1)
        with runner.context([s for s in row_sets for _ in range(k_max)]):
            logits = model(input_ids=c_ids.to(dev), attention_mask=full_mask.to(dev), position_ids=c_pos.to(dev),
                           use_cache=True, **{ck: cache}).logits.float()
        logp = logits[:, :-1].log_softmax(-1)  # position t predicts choice token t + 1
        for r, (i, _, cs) in enumerate(chunk):
            scores = []
            for j, c in enumerate(cs):
                row = r * k_max + j
                total = float(first[r, c[0]])
                if len(c) > 1:
                    total += float(logp[row, torch.arange(len(c) - 1), torch.tensor(c[1:])].sum())
                scores.append(total)
            out[i] = scores
    return out


@torch.inference_mode()
def teacher_forced_predictions(runner, examples, sets, batch_size: int = 8, max_len: int = 1024,
                               max_target_tokens: int = 256) -> list[str]:
    """The paper code's QA scoring: feed prompt + gold target, take the argmax token at every target
    position (each predicted from the gold prefix) and detokenise. Inflates BLEU/ROUGE vs generation."""
    tok = runner.tokenizer
    seqs = []
    for i, ex in enumerate(examples):
        t_ids = tok(ex["target"], add_special_tokens=False).input_ids[:max_target_tokens] or [tok.eos_token_id]
        p_ids = _prompt_ids(tok, ex, [])[-(max_len - len(t_ids)):]
        seqs.append((i, p_ids + t_ids, len(p_ids)))
    out = [""] * len(examples)
    body, head = _body_head(runner.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][1]))
    for s in range(0, len(order), batch_size):
        chunk = [seqs[k] for k in order[s:s + batch_size]]
        T = max(len(c[1]) for c in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (_, seq, _) in enumerate(chunk):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
        with runner.context([sets[c[0]] for c in chunk]):
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
            for b, (i, seq, start) in enumerate(chunk):
                pred = head(hidden[b, start - 1: len(seq) - 1]).argmax(-1).tolist()
                out[i] = tok.decode(pred, skip_special_tokens=True).strip()
    return out


def _mcq_gen_budget(tok, ex: dict) -> int:
    longest = max((len(tok(c, add_special_tokens=False).input_ids) for c in candidates(ex)), default=4)
    return min(32, longest + 4)


# ---------------------------------------------------------------- running one method over items

def _gen_budget(tok, item: dict) -> int:
    ex = item["ex"]
    return _mcq_gen_budget(tok, ex) if ex.get("choices") else task_max_new_tokens(item["task"])


def _chunks(seq, n):
    for s in range(0, len(seq), n):
        yield seq[s:s + n]


def _set_tag(s: dict) -> str:
    """The adapter set in a cache key: a prediction is reused only for the same weighted set."""
    return ",".join(f"{n}={w:.4g}" for n, w in sorted(s.items())) if s else "-"


def _cache_namespace(method: str) -> str:
    """The two DLP weightings run the same fused engine: a prompt that both route to the same weighted set (e.g. one
    adapter at weight 1) is the same computation, so they share predictions (and their recorded time). Every other
    method keeps its own, so base / LoRA / DLP times are measured side by side."""
    return "dlp" if method.startswith("dlp") else method


def run_method_items(runner, method: str, items: list[dict], sets: list[dict], cache: PredictionCache, sig: str,
                     teacher_forced: bool = False, batch_size: int = 8, progress: bool = True, desc: str = "") -> list[dict]:
    """Predictions for `items` (in their order, batched as they come): per item {"choice", "gen", "tf"}
    (as applicable) and "seconds" (compute time, from the cache for cached predictions)."""
    from tqdm.auto import tqdm

    tok = runner.tokenizer
    jobs = []  # (what, item index)
    for i, it in enumerate(items):
        kind = scoring_kind(it["task"], it["ex"])
        if kind == "choice":
            jobs.append(("choice", i))
        jobs.append(("gen", i))
        if teacher_forced and kind == "gen" and not it.get("history"):
            jobs.append(("tf", i))
    preds = [{"seconds": 0.0} for _ in items]
    todo: dict[str, list[int]] = {"choice": [], "gen": [], "tf": []}
    ns = _cache_namespace(method)
    for what, i in jobs:
        rec = cache.get(f"{sig}|{ns}|{items[i]['uid']}|{what}|{_set_tag(sets[i])}")
        if rec is None:
            todo[what].append(i)
        else:
            preds[i][what] = rec["v"]
            preds[i]["seconds"] += float(rec.get("s", 0.0))
    # Batch like with like: generation by budget then prompt length, scoring by prompt length. A batch decodes until
    # its longest budget and pads to its longest prompt, so a shuffled stream batched as it comes wastes most of its
    # compute on finished rows and padding. The order depends only on the items, so every method gets the same batches.
    plen = {i: len(items[i]["ex"].get("input", "")) + sum(len(h.get("content", "")) for h in items[i].get("history") or [])
            for i in range(len(items))}
    budget = {i: _gen_budget(tok, items[i]) for i in todo["gen"]}
    todo["gen"].sort(key=lambda i: (budget[i], plen[i]))
    todo["choice"].sort(key=lambda i: plen[i])
    todo["tf"].sort(key=lambda i: plen[i])
    n_todo = sum(len(v) for v in todo.values())
    bar = tqdm(total=len(jobs), initial=len(jobs) - n_todo, desc=desc or method, unit="pred", disable=not progress,
               leave=False, dynamic_ncols=True)
    try:
        for what in ("choice", "gen", "tf"):
            for idx in _chunks(todo[what], batch_size):
                t0 = time.perf_counter()
                exs = [items[i]["ex"] for i in idx]
                row_sets = [sets[i] for i in idx]
                hists = [items[i].get("history") or [] for i in idx]
                if what == "choice":
                    vals = choice_predictions(runner, exs, row_sets, hists, batch_size=2 * batch_size)
                elif what == "gen":
                    vals = runner.generate([user_message(ex) for ex in exs], hists, row_sets, [budget[i] for i in idx])
                else:
                    vals = teacher_forced_predictions(runner, exs, row_sets, batch_size=batch_size)
                dt = (time.perf_counter() - t0) / len(idx)
                recs = []
                for i, v in zip(idx, vals):
                    preds[i][what] = v
                    preds[i]["seconds"] += dt
                    recs.append({"k": f"{sig}|{ns}|{items[i]['uid']}|{what}|{_set_tag(sets[i])}", "v": v, "s": round(dt, 5)})
                cache.put_many(ns, recs)
                bar.update(len(idx))
    finally:
        bar.close()
    return preds


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


def _summarise(tasks: list[str], items: list[dict], preds: list[dict], sets: list[dict] | None, extra_seconds: float,
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


# ---------------------------------------------------------------- the harness

@contextmanager
def _routing_as(engine, p: float, weighting: str):
    old = (engine.p, engine.weighting, engine.top_k)
    engine.p, engine.weighting, engine.top_k = p, weighting, None
    try:
        yield
    finally:
        engine.p, engine.weighting, engine.top_k = old


def _plugin_summary(library) -> dict | None:
    """The plugin's own record (params, held-out routing accuracy, training time) from its plugin.json."""
    cfg = library.plugin_dir() / "plugin.json"
    if not cfg.is_file():
        return None
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return None
    return {"params": d.get("params"), "report": d.get("report"), "default_p": d.get("default_p")}


# The paper's headline claims, as the project brief and the paper's abstract (arXiv 2410.01497v2) state them. Its
# per-task tables are not available to us, so RESULTS.md sets only these beside our numbers.
PAPER_CLAIMS = {
    "plugin_accuracy": 98.45,  # % over 26 tasks
    "gap_to_lora": 0.35,  # "within 0.35% of the oracle single LoRA"
    "time_ratio_max": 2.0,  # "less than 2x the time of single-LoRA inference"
    "time_ratio_avg": (1.18, 1.24),
    "mcq_accuracy": 91.9,  # abstract v2, average over the multiple-choice tasks (backbone not stated)
    "qa_bleu_rouge": (54.1, 43.5, 40.8),  # abstract v2: BLEU, ROUGE-1, ROUGE-L on the QA tasks
}


def _claims_lines(results: dict) -> list[str]:
    """'Against the paper's claims': each claim, the paper's figure, ours (computed from this run), and whether
    ours meets it. Rows whose inputs were not evaluated are left out."""
    st = results.get("settings", {})

    def m(setting, method):
        return ((st.get(setting) or {}).get("methods") or {}).get(method)

    rows = []
    plug = (results.get("config") or {}).get("plugin") or {}
    acc = (plug.get("report") or {}).get("accuracy")
    if acc is not None:
        rows.append(("plugin routing accuracy, held-out training prompts of every task (%)",
                     f"{PAPER_CLAIMS['plugin_accuracy']}", f"{100 * acc:.2f}", 100 * acc >= PAPER_CLAIMS["plugin_accuracy"]))
    for setting in ("composite-26", "composite-17", "composite-9", "multiturn"):
        d, lo, b = m(setting, "dlp"), m(setting, "lora"), m(setting, "base")
        if d and "router_accuracy" in d and setting != "multiturn":
            rows.append((f"router picks the true task, `{setting}` test stream (%)", f"{PAPER_CLAIMS['plugin_accuracy']}",
                         f"{d['router_accuracy']:.2f}", d["router_accuracy"] >= PAPER_CLAIMS["plugin_accuracy"]))
        if d and lo:
            gap = d["mean"] - lo["mean"]
            rows.append((f"DLP-LoRA mean minus oracle LoRA mean, `{setting}` (points)", f"≥ -{PAPER_CLAIMS['gap_to_lora']}",
                         f"{gap:+.2f}", gap >= -PAPER_CLAIMS["gap_to_lora"]))
            if lo.get("seconds"):
                r = d["seconds"] / lo["seconds"]
                rows.append((f"DLP-LoRA time / oracle LoRA time, `{setting}`",
                             f"< {PAPER_CLAIMS['time_ratio_max']:g} (avg {PAPER_CLAIMS['time_ratio_avg'][0]}–"
                             f"{PAPER_CLAIMS['time_ratio_avg'][1]})", f"{r:.2f}x", r < PAPER_CLAIMS["time_ratio_max"]))
        if d and b:
            gain = d["mean"] - b["mean"]
            rows.append((f"DLP-LoRA mean minus base mean, `{setting}` (points)", "> 0 (gains over base)", f"{gain:+.2f}",
                         gain > 0))
    d17 = m("composite-17", "dlp")
    if d17:
        rows.append(("mean accuracy, multiple-choice tasks, `composite-17` (%)",
                     f"{PAPER_CLAIMS['mcq_accuracy']} (7B-8B and 1.5B backbones)", f"{d17['mean']:.2f}",
                     d17["mean"] >= PAPER_CLAIMS["mcq_accuracy"]))
    d9 = m("composite-9", "dlp")
    if d9:
        ts = [r for r in d9["tasks"].values() if "bleu" in r]
        if ts:
            ours = [sum(r[k] for r in ts) / len(ts) for k in ("bleu", "rouge1", "rougeL")]
            paper = PAPER_CLAIMS["qa_bleu_rouge"]
            rows.append(("BLEU / ROUGE-1 / ROUGE-L, generative tasks, `composite-9` (greedy generation)",
                         " / ".join(f"{x}" for x in paper), " / ".join(f"{x:.1f}" for x in ours),
                         all(o >= q for o, q in zip(ours, paper))))
    if not rows:
        return []
    out = ["## Against the paper's claims", "",
           "The paper's figures are its headline claims (the project brief; the abstract of arXiv 2410.01497v2), "
           "measured on 1.5B–8B backbones with its own scoring; ours come from this run on the backbone above.", "",
           "| claim | paper | ours | met |", "|---|---|---|---|"]
    out += [f"| {c} | {p} | {o} | {'yes' if ok else 'no'} |" for c, p, o, ok in rows]
    return out + [""]


def _fixed_sets(method: str, items: list[dict], names: list[str]) -> list[dict]:
    """The adapter sets of the methods that do not route: lora (the item's own task), merge-all (every adapter,
    uniform), base and arrow (none: Arrow routes inside the model)."""
    if method == "lora":
        return [{it["task"]: 1.0} for it in items]
    if method == "merge-all":
        return [{n: 1.0 / len(names) for n in names} for _ in items]
    return [{} for _ in items]


def _top_names(sets: list[dict]) -> list[str | None]:
    """The most weighted adapter of each set (None for the base model): what the router "picked"."""
    return [max(s, key=s.get) if s else None for s in sets]


def library_signature(library) -> str:
    """Changes when the adapters or the plugin change: part of every cache key."""
    h = hashlib.sha1()
    scored = ("score", "beats_base")  # written back by evaluations: not part of what the adapters compute
    adapters = {n: {k: v for k, v in e.items() if k not in scored} for n, e in library.manifest.get("adapters", {}).items()}
    h.update(json.dumps(adapters, sort_keys=True).encode())
    for n in library.names:
        f = library.adapter_dir(n) / "adapter_model.safetensors"
        if f.is_file():
            st = f.stat()
            h.update(f"{n}:{st.st_size}:{int(st.st_mtime)}".encode())
    pj = library.plugin_dir() / "model.safetensors"
    if pj.is_file():
        st = pj.stat()
        h.update(f"plugin:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:10]


def run_evaluation(library: str | os.PathLike, data: str | os.PathLike | None = None, out: str | os.PathLike = "runs/eval",
                   settings=("composite-26",), methods=METHODS, tasks=None, limit: int | None = None, p: float = 0.6,
                   weightings=("softmax", "renorm"), teacher_forced: bool = False, model=None, seed: int = 0,
                   batch_size: int = 8, route_window: int = 1, turns: int = 3, conversations: int | None = None,
                   arrow_top_k: int = 3, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   engine=None, arrow=None, write: bool = True, command: str | None = None, note: str = "",
                   p_sweep=(), log=print) -> dict:
    """Run the settings x methods grid; write OUT/results.json, OUT/RESULTS.md and OUT/figures/*.png.
    `engine` / `arrow` (a (model, tokenizer) pair) may be given to reuse loaded models. `p_sweep`: extra top-p
    values for `dlp` (each weighting) on the widest composite setting evaluated (results["p_sweep"])."""
    from .engine import DLPLoRA
    from .library import Library
    from .tasks import load_split, parse_tasks

    t_start = time.perf_counter()
    lib = Library.open(library)
    data = data or lib.manifest.get("data_dir")
    if not data:
        raise DLPLoRAError(f"no test data: pass --data PREPARED_DIR (the library {library} records no data_dir)")
    if not Path(data).is_dir():
        raise DLPLoRAError(f"prepared data directory {data} does not exist; run `dlp-lora data prepare --out {data}`")
    names = lib.names
    if not names:
        raise DLPLoRAError(f"the library {library} holds no adapters")
    if tasks:
        wanted = parse_tasks(tasks, data) if isinstance(tasks, str) else list(tasks)
        missing = [t for t in wanted if t not in names]
        if missing:
            raise DLPLoRAError(f"task(s) {', '.join(missing)} have no adapter in the library {library} "
                               f"(it holds: {', '.join(names)})")
        eval_tasks = [t for t in names if t in wanted]
    else:
        eval_tasks = list(names)
    if limit is not None and limit < 1:
        raise DLPLoRAError(f"--limit must be at least 1, got {limit}")
    p = _check_p(p, "--p")
    p_sweep = sorted({_check_p(x, "--p-sweep values") for x in p_sweep or ()} | ({p} if p_sweep else set()))
    settings = list(settings)
    methods = list(methods)
    weightings = list(weightings)
    examples = {t: load_split(data, t, "test")[:limit] if limit else load_split(data, t, "test") for t in eval_tasks}
    out = Path(out)
    cache = PredictionCache(cache_dir or out / "cache")

    if engine is None:
        engine = DLPLoRA.from_library(lib.root, model=model, p=p)
    fused = FusedRunner(engine)
    sig = library_signature(lib)
    skipped: dict[str, str] = {}
    if "dlp" in methods and engine.router is None:
        skipped["dlp"] = "the library has no plugin (train one with `dlp-lora train-plugin`)"
    arrow_runner = None
    if "arrow" in methods:
        try:
            if arrow is None:
                arrow = build_arrow_model(lib, model=model, top_k=arrow_top_k, seed=seed)
            arrow_runner = PeftRunner(*arrow)
        except (DLPLoRAError, ValueError, RuntimeError, KeyError) as exc:
            skipped["arrow"] = f"could not build PEFT's Arrow model: {exc}"
    for m, why in skipped.items():
        log(f"skipping {m}: {why}")
    _warm_up(fused, arrow_runner, names)

    results = {"format": RESULTS_FORMAT, "config": {
        "library": str(Path(library).resolve()), "data": str(Path(data).resolve()), "adapters": names,
        "backbone": (engine.info.to_dict() if getattr(engine, "info", None) is not None else None),
        "tasks": eval_tasks, "limit": limit, "p": p, "weightings": weightings, "methods": methods, "settings": settings,
        "teacher_forced": teacher_forced, "seed": seed, "batch_size": batch_size, "route_window": route_window,
        "turns": turns, "arrow": {"top_k": min(arrow_top_k, len(names)), "temperature": 1.0,
                                  "implementation": "peft ArrowConfig / arrow_router LoRA variant"},
        "merge_all": f"every row uses all {len(names)} adapters with weight 1/{len(names)}",
        "command": command, "library_signature": sig, "p_sweep": p_sweep, "plugin": _plugin_summary(lib)},
        "settings": {}, "skipped": skipped}

    def variants(setting):
        out_v = []
        for m in methods:
            if m in skipped or (setting == "single" and m not in SINGLE_METHODS):
                continue
            if m == "dlp":
                out_v += [(dlp_variant(w), "dlp", w) for w in weightings]
            else:
                out_v.append((m, m, None))
        return out_v

    # The widest composite runs first: the narrower settings then reuse its predictions, so every method of every
    # setting is timed on the same shuffled, mixed-task batches (single would otherwise batch base / LoRA by task).
    for setting in sorted(settings, key=lambda x: x != "composite-26"):
        s_tasks = setting_tasks(setting, examples)
        if not s_tasks:
            log(f"== {setting}: no task of this group in the library; skipped")
            results["settings"][setting] = {"tasks": [], "skipped": "no task of this group in the library"}
            continue
        s_res: dict = {"tasks": s_tasks, "n": {t: len(examples[t]) for t in s_tasks}, "methods": {}}
        if setting == "multiturn":
            convs = build_conversations(examples, s_tasks, turns=turns, seed=seed, limit=conversations)
            s_res["conversations"] = len(convs)
            s_res["turns"] = turns
            s_res["route_window"] = route_window
            if not convs:
                s_res["skipped"] = "needs at least 2 tasks"
                results["settings"][setting] = s_res
                continue
        else:
            stream = build_stream(examples, s_tasks, seed=seed) if setting != "single" else \
                [{"uid": f"{t}/{ex.get('id', i)}", "task": t, "ex": ex, "history": []}
                 for t in s_tasks for i, ex in enumerate(examples[t])]
        log(f"== {setting}: {', '.join(s_tasks)}" + (f" ({len(convs)} conversations of {turns} turns)"
                                                     if setting == "multiturn" else f" ({len(stream)} prompts)"))
        for name, method, weighting in variants(setting):
            runner = arrow_runner if method == "arrow" else fused
            desc = f"{setting} {name}"
            msig = f"{sig}-k{min(arrow_top_k, len(names))}s{seed}" if method == "arrow" else sig
            if setting == "multiturn":
                entry = _run_multiturn(engine, runner, name, method, weighting, convs, s_tasks, cache, msig, p,
                                       route_window, batch_size, progress, desc)
            else:
                t0 = time.perf_counter()
                route_log = None
                if method == "dlp":
                    with _routing_as(engine, p, weighting):
                        sets = engine.route([user_message(it["ex"]) for it in stream])  # the prompt text only
                    route_log = _top_names(sets)
                else:
                    sets = _fixed_sets(method, stream, names)
                route_s = time.perf_counter() - t0
                preds = run_method_items(runner, name, stream, sets, cache, msig, teacher_forced=teacher_forced,
                                         batch_size=batch_size, progress=progress, desc=desc)
                entry = _summarise(s_tasks, stream, preds, sets, route_s, route_log)
                if method == "dlp":
                    entry.update({"weighting": weighting, "p": p, "routing_seconds": round(route_s, 4)})
            s_res["methods"][name] = entry
            extra = ""
            if "router_accuracy" in entry:
                extra = f"; router picked the true task {entry['router_accuracy']:.0f}%, {entry['mean_adapters']:.2f} adapters"
            log(f"  {name:>10}: mean {entry['mean']:.2f} in {entry['seconds']:.1f}s{extra}")
        results["settings"][setting] = s_res
    results["settings"] = {x: results["settings"][x] for x in settings}  # report in the order asked
    single = (results["settings"].get("single") or {}).get("methods") or {}
    if "base" in single and "lora" in single:
        pairs = {t: (r, single["base"]["tasks"][t]) for t, r in single["lora"]["tasks"].items()
                 if "main" in r and "main" in single["base"]["tasks"].get(t, {})}
        flagged = lib.record_scores(pairs, source=f"dlp-lora eval --setting single (limit {limit or 'all'})")
        log(f"recorded adapter vs base scores of {len(pairs)} adapters in {lib.root / 'library.json'}")
        for t in flagged:
            a, b = pairs[t]
            log(f"  [FLAG] {t}: adapter {a['main']:.1f} does not beat base {b['main']:.1f} ({a['metric']})")
        results["flagged_adapters"] = flagged
    if p_sweep and "dlp" in methods and "dlp" not in skipped:
        results["p_sweep"] = _run_p_sweep(engine, fused, examples, settings, p_sweep, weightings, cache, sig,
                                          seed, batch_size, progress, log)
    results["cache"] = {"dir": str(cache.dir), "hits": cache.hits, "new_predictions": cache.new}
    results["run_seconds"] = round(time.perf_counter() - t_start, 1)
    if note:
        results["note"] = note
    if write:
        write_outputs(results, out, preamble=note)
    return results


def _run_p_sweep(engine, fused, examples, settings, p_values, weightings, cache, sig, seed, batch_size, progress,
                 log) -> dict:
    """`dlp` at each top-p value (and weighting) on the widest composite setting evaluated, against the oracle
    LoRA on the same stream. Teacher-forced scoring is skipped here (generation and choice ranking only)."""
    order = ["composite-26", "composite-17", "composite-9"]
    setting = next((s for s in order if s in settings), "composite-26")
    s_tasks = setting_tasks(setting, examples)
    stream = build_stream(examples, s_tasks, seed=seed)
    texts = [user_message(it["ex"]) for it in stream]
    log(f"== p sweep on {setting}: p in {', '.join(f'{x:g}' for x in p_values)}")
    lora_sets = _fixed_sets("lora", stream, engine.names)
    preds = run_method_items(fused, "lora", stream, lora_sets, cache, sig, batch_size=batch_size, progress=progress,
                             desc="p sweep lora")
    lora = _summarise(s_tasks, stream, preds, lora_sets, 0.0)
    rows = []
    for weighting in weightings:
        name = dlp_variant(weighting)
        for pv in p_values:
            t0 = time.perf_counter()
            with _routing_as(engine, pv, weighting):
                sets = engine.route(texts)
            route_s = time.perf_counter() - t0
            preds = run_method_items(fused, name, stream, sets, cache, sig, batch_size=batch_size, progress=progress,
                                     desc=f"p sweep {name} p={pv:g}")
            e = _summarise(s_tasks, stream, preds, sets, route_s, _top_names(sets))
            top_w = [max(s.values()) for s in sets if s]
            row = {"p": pv, "weighting": weighting, "method": name, "mean": e["mean"], "seconds": e["seconds"],
                   "router_accuracy": e["router_accuracy"], "mean_adapters": e["mean_adapters"],
                   "max_adapters": max((len(s) for s in sets), default=0),
                   "single_adapter_share": 100 * sum(len(s) == 1 for s in sets) / max(1, len(sets)),
                   "mean_top_weight": sum(top_w) / max(1, len(top_w)),
                   "gap_to_lora": e["mean"] - lora["mean"],
                   "tasks": {t: r.get("main") for t, r in e["tasks"].items()}}
            rows.append(row)
            log(f"  {name:>10} p={pv:<4g}: mean {e['mean']:.2f} (LoRA {lora['mean']:.2f}), "
                f"{e['mean_adapters']:.2f} adapters, top weight {row['mean_top_weight']:.2f}")
    return {"setting": setting, "tasks": s_tasks, "lora_mean": lora["mean"], "lora_seconds": lora["seconds"],
            "rows": rows}


def _warm_up(fused, arrow_runner, names) -> None:
    """One short generation per code path (base, one adapter, mixed rows, Arrow) before anything is timed:
    first calls pay one-off kernel and allocation costs that would otherwise land on whichever method runs first."""
    mixed = [{names[0]: 1.0}, {n: 1.0 / len(names) for n in names}]
    for sets in ([{}], [{names[0]: 1.0}], mixed):
        fused.generate(["warm up"] * len(sets), [[] for _ in sets], sets, [2] * len(sets))
    if arrow_runner is not None:
        arrow_runner.generate(["warm up"], [[]], [{}], [2])


def _run_multiturn(engine, runner, name, method, weighting, convs, tasks, cache, sig, p, route_window, batch_size,
                   progress, desc) -> dict:
    """Turn by turn over all conversations: each turn's history is the earlier turns with this method's own
    answers; the router reads engine.routing_text(turn, history, route_window)."""
    all_items, all_preds, all_sets, route_log = [], [], [], []
    histories = [[] for _ in convs]
    route_s = 0.0
    turns = len(convs[0])
    for t in range(turns):
        items = []
        for c, conv in enumerate(convs):
            step = conv[t]
            uid = "mt-w%d|%s" % (route_window, ">".join(x["uid"] for x in conv[: t + 1]))
            items.append({"uid": uid, "task": step["task"], "ex": step["ex"], "history": list(histories[c]), "turn": t})
        t0 = time.perf_counter()
        if method == "dlp":
            texts = [engine.routing_text(user_message(it["ex"]), it["history"], window=route_window) for it in items]
            with _routing_as(engine, p, weighting):
                sets = engine.route(texts)
            route_log += _top_names(sets)
        else:
            sets = _fixed_sets(method, items, engine.names)
        route_s += time.perf_counter() - t0
        preds = run_method_items(runner, name, items, sets, cache, sig, teacher_forced=False, batch_size=batch_size,
                                 progress=progress, desc=f"{desc} turn {t + 1}")
        for c, (it, pr) in enumerate(zip(items, preds)):
            histories[c] = histories[c] + [{"role": "user", "content": user_message(it["ex"])},
                                           {"role": "assistant", "content": pr.get("gen", "")}]
        all_items += items
        all_preds += preds
        all_sets += sets
    entry = _summarise(tasks, all_items, all_preds, all_sets, route_s, route_log if method == "dlp" else None)
    per_turn = []
    for t in range(turns):
        idx = [i for i, it in enumerate(all_items) if it["turn"] == t]
        sub = _summarise(tasks, [all_items[i] for i in idx], [all_preds[i] for i in idx], [all_sets[i] for i in idx], 0.0,
                         [route_log[i] for i in idx] if method == "dlp" else None)
        per_turn.append({k: v for k, v in sub.items() if k in ("mean", "router_accuracy", "mean_adapters", "items")})
    entry["per_turn"] = per_turn
    if method == "dlp":
        entry.update({"weighting": weighting, "p": p, "routing_seconds": round(route_s, 4)})
    return entry


# ---------------------------------------------------------------- reports: results.json, RESULTS.md, figures

def _fmt(v, nd=1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _method_order(methods: dict) -> list[str]:
    order = ["base", "lora", "dlp", "dlp-renorm", "arrow", "merge-all"]
    return [m for m in order if m in methods] + [m for m in methods if m not in order]


def _evaluated_settings(results: dict):
    """(setting name, its entry, its methods, their display order) for every setting that has results."""
    for sname, s in results.get("settings", {}).items():
        ms = s.get("methods") or {}
        if ms:
            yield sname, s, ms, _method_order(ms)


def _short(task: str) -> str:
    spec = TASKS.get(task)
    return spec.short if spec is not None else task


def format_results_md(results: dict, preamble: str = "") -> str:
    cfg = results.get("config", {})
    bb = cfg.get("backbone") or {}
    lines = ["# DLP-LoRA evaluation results", ""]
    if preamble:
        lines += [preamble.strip(), ""]
    lines += [
        "Every number below was measured by the command shown; nothing is copied from the paper. The paper's "
        "own figures (Qwen-2 1.5B and larger backbones) are not reproduced in a column here: we do not have "
        "them verbatim (only its headline claims, set beside ours below), and a different backbone would not be "
        "comparable anyway.", "",
        "| setting | value |", "|---|---|",
        f"| backbone | {bb.get('name', '?')} ({bb.get('params', 0) / 1e6:.0f}M parameters) |" if bb else "| backbone | ? |",
        f"| adapters | {len(cfg.get('adapters', []))}: {', '.join(cfg.get('adapters', []))} |",
        f"| test examples per task | {cfg.get('limit') or 'all (up to 100)'} |",
        f"| DLP top-p | p = {cfg.get('p')}; weightings: {', '.join(cfg.get('weightings', []))} "
        f"(`dlp` = the paper's softmax over the kept probabilities, `dlp-renorm` = probabilities renormalised) |",
        f"| Arrow | PEFT's Arrow router, top-k {cfg.get('arrow', {}).get('top_k')}, temperature "
        f"{cfg.get('arrow', {}).get('temperature')}, per token and per layer, training-free |",
        f"| Merge-all | {cfg.get('merge_all', '')} |",
        f"| seed | {cfg.get('seed')} |",
    ]
    if cfg.get("command"):
        lines.append(f"| command | `{cfg['command']}` |")
    lines.append("")
    lines += ["Metrics: multiple-choice tasks by log-likelihood ranking of the choices (BIG-bench "
              "`multiple_choice_grade`, the main figure), and the exact match of a greedy generated answer; "
              "ObjCount / DisflQA by exact match of the greedy answer; generative tasks by greedy generation "
              "then BLEU (sacrebleu), ROUGE-1 and ROUGE-L (rouge-score; ROUGE-L is the main figure) and "
              "final-answer accuracy for GSM8K. The *teacher-forced* rows (when present) score the argmax token "
              "at each gold target position, as the paper's code did; they are not generation and read higher. "
              "Means are over tasks of the main figure. Time is the sum of the compute time of a method's "
              "predictions (routing included), measured on this machine (a shared CPU: expect noise). A prediction "
              "(method, example, adapter set) is computed once and shared by every setting that contains it, with "
              "its recorded time: e.g. composite-26 reuses the composite-17 / composite-9 predictions.", ""]
    if results.get("skipped"):
        for m, why in results["skipped"].items():
            lines.append(f"- **{m} skipped**: {why}")
        lines.append("")

    lines += _claims_lines(results)
    # Table 3 style summary
    lines += ["## Summary (Table 3 style): mean score and time per setting", "",
              "| setting | method | mean | time (s) | time / LoRA | router acc. (%) | adapters / prompt |",
              "|---|---|---|---|---|---|---|"]
    for sname, s in results.get("settings", {}).items():
        ms = s.get("methods") or {}
        lora_t = ms.get("lora", {}).get("seconds")
        for m in _method_order(ms):
            e = ms[m]
            ratio = f"{e['seconds'] / lora_t:.2f}x" if lora_t else "–"
            lines.append(f"| {sname} | {METHOD_LABELS.get(m, m)} | {_fmt(e['mean'], 2)} | {_fmt(e['seconds'])} | {ratio} | "
                         f"{_fmt(e.get('router_accuracy'))} | {_fmt(e.get('mean_adapters'), 2)} |")
        if s.get("skipped"):
            lines.append(f"| {sname} | (skipped: {s['skipped']}) | | | | | |")
    lines.append("")

    for sname, s, ms, order in _evaluated_settings(results):
        tasks = s["tasks"]
        first = ms[order[0]]["tasks"]
        header = " | ".join(METHOD_LABELS.get(m, m) for m in order)
        desc = {"single": "each task's test set alone, the right adapter given",
                "composite-17": "the multiple-choice tasks' test prompts shuffled into one stream, no task label",
                "composite-9": "the generative tasks' test prompts shuffled into one stream, no task label",
                "composite-26": "all tasks' test prompts shuffled into one stream, no task label",
                "multiturn": f"{s.get('conversations')} conversations of {s.get('turns')} turns from different "
                             f"tasks; routers re-decide every turn, reading the turn plus {s.get('route_window')} "
                             f"earlier user turn(s)"}.get(sname, "")
        lines += [f"## Setting `{sname}`", "", desc + ".", ""]
        mcq = [t for t in tasks if first.get(t, {}).get("metric") in ("accuracy", "exact_match")]
        qa = [t for t in tasks if first.get(t, {}).get("metric") == "rougeL"]
        if mcq:
            lines += ["### Multiple-choice and exact-match tasks (Table 1 style), %", "",
                      f"| task | n | metric | {header} |", "|---|---|---|" + "---|" * len(order)]
            for t in mcq:
                r0 = first[t]
                lines.append(f"| {_short(t)} | {r0['n']} | {r0['metric']} | " +
                             " | ".join(_fmt(ms[m]['tasks'][t].get('main')) for m in order) + " |")
            lines.append("| **mean** | | | " + " | ".join(
                f"**{_fmt(sum(ms[m]['tasks'][t]['main'] for t in mcq) / len(mcq))}**" for m in order) + " |")
            with_em = [t for t in mcq if first[t]["metric"] == "accuracy"]
            if with_em:
                lines += ["", "Generated-answer exact match on the multiple-choice tasks (greedy answer vs the gold "
                          "choice), %:", "", f"| task | {header} |", "|---|" + "---|" * len(order)]
                for t in with_em:
                    lines.append(f"| {_short(t)} | " + " | ".join(_fmt(ms[m]['tasks'][t].get('exact_match')) for m in order) + " |")
            lines.append("")
        if qa:
            lines += ["### Generative tasks (Table 2 style): BLEU / ROUGE-1 / ROUGE-L", "",
                      f"| task | n | {header} |", "|---|---|" + "---|" * len(order)]
            for t in qa:
                cells = []
                for m in order:
                    r = ms[m]["tasks"][t]
                    cell = f"{_fmt(r.get('bleu'))} / {_fmt(r.get('rouge1'))} / {_fmt(r.get('rougeL'))}"
                    if "answer_accuracy" in r:
                        cell += f" (answer acc. {_fmt(r['answer_accuracy'])})"
                    cells.append(cell)
                lines.append(f"| {_short(t)} | {first[t]['n']} | " + " | ".join(cells) + " |")
            if any("teacher_forced" in ms[m]["tasks"][t] for m in order for t in qa):
                lines += ["", "**Teacher-forced** (paper-code style, NOT generation): BLEU / ROUGE-1 / ROUGE-L", "",
                          f"| task | {header} |", "|---|" + "---|" * len(order)]
                for t in qa:
                    cells = []
                    for m in order:
                        tf = ms[m]["tasks"][t].get("teacher_forced")
                        cells.append(f"{_fmt(tf['bleu'])} / {_fmt(tf['rouge1'])} / {_fmt(tf['rougeL'])}" if tf else "–")
                    lines.append(f"| {_short(t)} | " + " | ".join(cells) + " |")
            lines.append("")
        if sname == "multiturn":
            lines += ["Mean score by turn:", "", "| method | " + " | ".join(f"turn {i + 1}" for i in range(s.get('turns', 0))) + " |",
                      "|---|" + "---|" * s.get("turns", 0)]
            for m in order:
                pt = ms[m].get("per_turn", [])
                cells = []
                for x in pt:
                    c = _fmt(x["mean"])
                    if "router_accuracy" in x:
                        c += f" (router {_fmt(x['router_accuracy'], 0)}%)"
                    cells.append(c)
                lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
            lines.append("")
        if (results.get("figures") or {}).get(sname):
            lines += [f"![{sname}]({results['figures'][sname]})", ""]
    sw = results.get("p_sweep")
    if sw and sw.get("rows"):
        lines += [f"## Effect of top-p (`{sw['setting']}`)", "",
                  f"The same stream as the `{sw['setting']}` setting, routed at each p; the oracle single LoRA scores "
                  f"{_fmt(sw['lora_mean'], 2)} on it. *adapters* is the mean number kept per prompt, *top weight* the "
                  "mean fusion weight of the most probable adapter (1.0 = the single adapter alone). Teacher-forced "
                  "scoring is not part of the sweep.", "",
                  "| weighting | p | mean | vs LoRA | adapters / prompt | single-adapter prompts (%) | top weight | "
                  "router acc. (%) | time (s) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sw["rows"]:
            lines.append(f"| {METHOD_LABELS.get(r['method'], r['method'])} | {r['p']:g} | {_fmt(r['mean'], 2)} | "
                         f"{r['gap_to_lora']:+.2f} | {_fmt(r['mean_adapters'], 2)} | {_fmt(r['single_adapter_share'])} | "
                         f"{_fmt(r['mean_top_weight'], 2)} | {_fmt(r['router_accuracy'])} | {_fmt(r['seconds'])} |")
        lines.append("")
    c = results.get("cache") or {}
    lines += [f"Predictions cached in `{c.get('dir')}` ({c.get('new_predictions', 0)} computed in this run, "
              f"{c.get('hits', 0)} reused); this run took {results.get('run_seconds', 0):.0f}s.", ""]
    return "\n".join(lines)


def plot_results(results: dict, fig_dir: str | os.PathLike, rel_to: str | os.PathLike | None = None) -> dict[str, str]:
    """One grouped bar chart per setting: the main metric per task for each method (like the paper's
    Figure 2). Returns {setting: path relative to `rel_to`}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for sname, s, ms, order in _evaluated_settings(results):
        tasks = s["tasks"]
        width = 0.8 / len(order)
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks) + 2), 4))
        for k, m in enumerate(order):
            vals = [ms[m]["tasks"][t].get("main", 0.0) for t in tasks]
            ax.bar([i + (k - (len(order) - 1) / 2) * width for i in range(len(tasks))], vals, width,
                   label=METHOD_LABELS.get(m, m))
        first = ms[order[0]]["tasks"]
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([f"{_short(t)}\n({first[t].get('metric', '')})" for t in tasks], rotation=45 if len(tasks) > 6 else 0,
                           ha="right" if len(tasks) > 6 else "center", fontsize=8)
        ax.set_ylabel("score (%)")
        ax.set_title(f"{sname}: per-task main metric")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = fig_dir / f"{sname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[sname] = os.path.relpath(path, rel_to) if rel_to else str(path)
    return paths


def write_outputs(results: dict, out: str | os.PathLike, preamble: str = "") -> None:
    """OUT/results.json, OUT/figures/*.png and OUT/RESULTS.md. A hand-written OUT/discussion.md, if present, is
    appended to RESULTS.md under 'Discussion', so regenerating the report keeps it."""
    from .paths import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results["figures"] = plot_results(results, out / "figures", rel_to=out)
    if preamble:
        results["preamble"] = preamble
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False, default=float))
    md = format_results_md(results, preamble=preamble)
    disc = out / "discussion.md"
    if disc.is_file():
        md += "\n## Discussion\n\n_Hand-written from the numbers above (`" + disc.name + "`)._\n\n" + \
            disc.read_text().strip() + "\n"
    atomic_write_text(out / "RESULTS.md", md)


def rewrite_report(results_json: str | os.PathLike) -> Path:
    """Rewrite RESULTS.md and the figures next to a results.json (e.g. after editing discussion.md)."""
    path = Path(results_json)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise DLPLoRAError(f"{path} does not exist (run `dlp-lora eval` or `dlp-lora reproduce` first)") from None
    except json.JSONDecodeError as exc:
        raise DLPLoRAError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(results, dict) or "settings" not in results:
        raise DLPLoRAError(f"{path} is not a results.json written by `dlp-lora eval`")
    write_outputs(results, path.parent, preamble=results.get("preamble", ""))
    return path.parent / "RESULTS.md"
