"""Decoding primitives shared by the engine, the server's scheduler, the evaluation and the benchmarks.

- :func:`decode_loop`: the batched generation loop (EOS, per-row token limits, a step callback) on the
  decoding core (:mod:`dlplora.core`, a static slot KV cache), or on the HF forward pass for models the
  core does not run (a PEFT wrapper such as Arrow's);
- :func:`left_pad` / :func:`prefill` / :func:`decode_step`: that HF path: a batch of token rows,
  left-padded, run through the model once with a fresh dynamic KV cache (explicit per-row positions, a
  2-D attention mask), then one token per row at a time;
- :func:`sample`: greedy, or temperature + nucleus sampling with a generator;
- :class:`StopStreamer`: cuts a growing completion at its first stop string and says which text is
  safe to stream.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch



# ---------------------------------------------------------------- KV cache

def cache_kwarg() -> str:
    """transformers 5 calls the KV cache argument `cache`; older versions `past_key_values`."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def new_cache(model):
    """An empty dynamic KV cache for `model`."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


# ---------------------------------------------------------------- prefill and one step

def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None):
    """Token rows -> (ids [b, L], mask [b, L], positions [b, L]), left-padded to the longest row; the
    positions count each row's own tokens from 0 (padding sits at position 0, masked)."""
    b = len(rows)
    width = max(len(r) for r in rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def prefill(model, rows: Sequence[Sequence[int]], pad_id: int, forward_kwargs: dict | None = None):
    """Run left-padded `rows` through `model` with a fresh KV cache.

    Returns (cache, mask [b, L], positions [b, L], logits [b, vocab] of each row's last token)."""
    dev = next(model.parameters()).device
    ids, mask, pos = left_pad(rows, pad_id, dev)
    cache = new_cache(model)
    kw = dict(forward_kwargs or {})
    kw[cache_kwarg()] = cache
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, use_cache=True, **kw)
    return cache, mask, pos, out.logits[:, -1]


def decode_step(model, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                forward_kwargs: dict | None = None) -> torch.Tensor:
    """One token per row: `tokens` [b], `mask` [b, L] (already including the new column), `positions` [b, 1].
    Returns the next-token logits [b, vocab]."""
    kw = dict(forward_kwargs or {})
    kw[cache_kwarg()] = cache
    out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, logits_to_keep=1,
                use_cache=True, **kw)
    return out.logits[:, -1]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next tokens [b] from logits [b, vocab]: argmax when temperature <= 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------- the loop

@torch.inference_mode()
def decode_loop(model, rows: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], eos_ids: Sequence[int],
                pad_id: int, temperature: float = 0.0, top_p: float = 1.0, generator=None,
                on_step: Callable[[int, list[list[int]], list[bool]], None] | None = None,
                forward_kwargs: dict | None = None, core=None) -> tuple[list[list[int]], list[str]]:
    """Batched generation: prefill, then one token per row per step until EOS or each row's limit.

    Runs on the decoding core (:mod:`dlplora.core`: static slot KV cache, rows in slots ``0..b-1``) when it
    supports the model, `core` or the model's own; else (a PEFT wrapper, another architecture, or
    `forward_kwargs`) on the HF forward pass with a dynamic cache and left padding.
    Returns (generated token ids per row, EOS excluded; finish reason per row: "stop" or "length").
    `on_step(step, generated, done)` runs after every step and may set ``done[i] = True`` (stop strings).
    """
    b = len(rows)
    limits = [max_new_tokens] * b if isinstance(max_new_tokens, int) else list(max_new_tokens)
    dev = next(model.parameters()).device
    if core is None and not forward_kwargs:
        from .core import core_for

        core = core_for(model, b)
    elif core is not None:
        core.ensure_slots(b)
    if core is not None:
        logits = core.prefill(0, rows)

        def step_fn(feed):
            return core.forward(0, feed[:, None])
    else:
        cache, mask, pos, logits = prefill(model, rows, pad_id, forward_kwargs)
        state = {"mask": mask, "pos": pos[:, -1:] + 1}

        def step_fn(feed):
            state["mask"] = torch.cat([state["mask"], torch.ones((b, 1), dtype=mask.dtype, device=dev)], dim=1)
            out = decode_step(model, feed, state["mask"], state["pos"], cache, forward_kwargs)
            state["pos"] = state["pos"] + 1
            return out
    eos = set(int(e) for e in eos_ids)
    generated: list[list[int]] = [[] for _ in range(b)]
    done = [lim <= 0 for lim in limits]
    reasons = ["length"] * b
    for step in range(max(limits + [0])):
        if all(done):
            break
        toks = sample(logits, temperature, top_p, generator).tolist()
        for i, t in enumerate(toks):
            if done[i]:
                continue
            if t in eos:
                done[i], reasons[i] = True, "stop"
                continue
            generated[i].append(t)
            if len(generated[i]) >= limits[i]:
                done[i] = True
        if on_step is not None:
            before = list(done)
            on_step(step, generated, done)
            for i in range(b):
                if done[i] and not before[i]:
                    reasons[i] = "stop"
        if all(done):
            break
        feed = torch.tensor([pad_id if d else t for t, d in zip(toks, done)], dtype=torch.long, device=dev)
        logits = step_fn(feed)
    return generated, reasons


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a turn: the tokenizer's EOS, the generation config's, and the usual chat ends."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(e, int):
        ids.add(e)
    elif isinstance(e, (list, tuple)):
        ids.update(int(x) for x in e)
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        if name in specials:
            ids.add(int(tokenizer.convert_tokens_to_ids(name)))
    return sorted(ids)


# ---------------------------------------------------------------- stop strings and streaming

class StopStreamer:
    """One completion's stop strings and streaming state.

    Feed it the whole decoded text after every token (:meth:`update`): it cuts the text at the first
    stop string and returns the new text that is safe to stream. While the completion runs, it holds
    back the last ``len(longest stop) - 1`` characters (a stop string may still be completing) and a
    trailing U+FFFD (half of a multi-byte character); when the completion ends, everything goes out.
    """

    def __init__(self, stop: Sequence[str] | None = None):
        self.stop = [s for s in (stop or []) if s]
        self.hold = max([len(s) for s in self.stop] + [1]) - 1
        self.text = ""
        self.emitted = 0

    def cut(self, text: str) -> tuple[str, bool]:
        """(text up to the first stop string, whether one was found)."""
        hits = [text.find(s) for s in self.stop if s in text]
        return (text[:min(hits)], True) if hits else (text, False)

    def update(self, text: str, final: bool = False) -> tuple[str, bool]:
        """Take the full decoded text so far (`final`: the completion ended for another reason).
        Returns (text to stream now, possibly empty; whether a stop string ended the completion)."""
        text, stopped = self.cut(text)
        self.text = text
        done = final or stopped
        safe = len(text) if done else len(text) - self.hold
        while not done and safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe <= self.emitted:
            return "", stopped
        delta, self.emitted = text[self.emitted:safe], safe
        return delta, stopped
