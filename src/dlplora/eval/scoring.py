"""Scoring with a model: multiple-choice log-likelihoods (each prompt run once, every choice continued from its
KV cache), teacher-forced predictions, and the per-task generation budgets. :func:`score_task` scores a plain or
PEFT model on one task (used by `dlp-lora train-loras` to score each adapter against the base model).
"""

from __future__ import annotations

import torch

from ..backbone import decoder_and_head
from ..decoding import cache_kwarg, prefill
from ..tasks import candidates, chat_prompt, user_message
from .metrics import accuracy_result, generation_result
from .runners import PeftRunner


def task_max_new_tokens(task: str) -> int:
    """A generation budget per task, sized to its targets (CPU-friendly)."""
    return {"gsm8k": 160, "cnn_dailymail": 96, "topical_chat": 48, "alpaca": 128, "strategyqa": 48,
            "disfl_qa": 16, "object_counting": 8}.get(task, 64)


def mcq_gen_budget(tok, ex: dict) -> int:
    longest = max((len(tok(c, add_special_tokens=False).input_ids) for c in candidates(ex)), default=4)
    return min(32, longest + 4)


def gen_budget(tok, item: dict) -> int:
    ex = item["ex"]
    return mcq_gen_budget(tok, ex) if ex.get("choices") else task_max_new_tokens(item["task"])


def prompt_ids(tok, ex: dict, history) -> list[int]:
    return tok(chat_prompt(tok, user_message(ex), list(history or [])), add_special_tokens=False).input_ids


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
    tok = runner.tokenizer
    model = runner.model
    ck = cache_kwarg()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    dev = next(model.parameters()).device
    items = []
    for i, ex in enumerate(examples):
        c_ids = [tok(c, add_special_tokens=False).input_ids[: max_len // 2] or [tok.eos_token_id] for c in candidates(ex)]
        p_ids = prompt_ids(tok, ex, histories[i])[-(max_len - max(len(c) for c in c_ids)):]
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
        row_sets = [sets[i] for i, _, _ in chunk]
        with runner.context(row_sets):
            cache, mask, pos, last = prefill(model, [p for _, p, _ in chunk], pad)
        first = last.float().log_softmax(-1)
        k_max = max(len(c) for _, _, c in chunk)
        c_len = max(len(x) for _, _, c in chunk for x in c)
        cache.batch_repeat_interleave(k_max)
        c_ids = torch.full((n * k_max, c_len), pad, dtype=torch.long)
        c_mask = torch.zeros((n * k_max, c_len), dtype=torch.long)
        for r, (_, _, cs) in enumerate(chunk):
            for j, c in enumerate(cs):
                c_ids[r * k_max + j, : len(c)] = torch.tensor(c)
                c_mask[r * k_max + j, : len(c)] = 1
        c_pos = pos[:, -1:].repeat_interleave(k_max, 0) + 1 + torch.arange(c_len, device=pos.device)[None]
        full_mask = torch.cat([mask.repeat_interleave(k_max, 0), c_mask.to(dev)], dim=1)
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
        p_ids = prompt_ids(tok, ex, [])[-(max_len - len(t_ids)):]
        seqs.append((i, p_ids + t_ids, len(p_ids)))
    out = [""] * len(examples)
    body, head = decoder_and_head(runner.model)
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
