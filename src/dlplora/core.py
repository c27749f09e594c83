"""The decoding core: the backbone's forward pass over a static slot KV cache (gpt-fast's shape).

:class:`DecodeCore` runs a Llama-family model (Llama, Qwen2, Mistral without sliding windows) with its own
short forward pass, calling the model's own modules: the embedding, every decoder layer's norms, its
``q/k/v/o`` projections and MLP (fused LoRA layers, :mod:`dlplora.fusion`; PEFT LoRA layers; int8 or int4 ones,
:mod:`dlplora.quantize`), the rotary embedding, the final norm and the head. What it replaces is the
HF model's outer loop, its mask building and its dynamic cache: keys and values are written in place into
a :class:`~dlplora.kvcache.SlotKVCache` and attention reads views of it (grouped-query attention as two
batched matmuls).

One call, :meth:`DecodeCore.forward`, serves every use: rows ``first..first+b-1`` of the cache each take
their next tokens (``t`` of them, right-padded; ``t = 1`` is a decode step, a longer ``t`` a prefill or a
prefill chunk) at their own positions, and the logits of each row's last real token come back. The layers'
LoRA routing is whatever the fusion has set (per-row sets, shared, merged, or per slot).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import DLPLoRAError
from .kvcache import GROW, SlotKVCache, round_up

log = logging.getLogger("dlplora.core")
COMPILE_NOTE = ("compiling the decode step with torch.compile (can take several minutes the first time: 289 s measured "
                "for a 16-token `generate --quantize int4 --compile` on 2 CPU cores; a later start with the same model "
                "loads the kernels from inductor's cache in CACHE/inductor)...")

SUPPORTED = ("llama", "qwen2", "mistral")
PREFILL_CHUNK = 256  # prompt tokens per forward pass in a prefill


def unwrap(model):
    """The causal LM inside a PEFT wrapper (its LoRA layers stay in place and run in the core's pass)."""
    inner = getattr(model, "get_base_model", None)
    return inner() if callable(inner) else model


def unsupported_reason(model) -> str | None:
    """Why the core cannot run `model` (None when it can)."""
    model = unwrap(model)
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} (the decoding core runs {', '.join(SUPPORTED)})"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a causal LM of the supported kind"
    layer_types = getattr(cfg, "layer_types", None) or []
    if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        return "sliding-window attention"
    if kind == "mistral" and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    return None


def _concat_int8(bases):
    """One :class:`~dlplora.quantize.Int8Linear` for sibling int8 projections (None when any is not int8)."""
    from .quantize import Int8Linear

    if not all(type(m) is Int8Linear for m in bases):
        return None
    return Int8Linear.concat(list(bases))


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class DecodeCore:
    """Forward passes of `model` over a static slot KV cache (see module doc).

    `slots`: rows the cache holds (grown by :meth:`ensure_slots`); `max_len`: positions per row (default:
    the model's context)."""

    def __init__(self, model, slots: int = 1, max_len: int | None = None):
        why = unsupported_reason(model)
        if why is not None:
            raise DLPLoRAError(f"the decoding core cannot run this model: {why}")
        model = unwrap(model)
        self.model = model
        cfg = model.config
        self.inner = model.model
        self.layers = list(self.inner.layers)
        attn = self.layers[0].self_attn
        self.head_dim = int(getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.n_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.max_len = int(max_len or getattr(cfg, "max_position_embeddings", 2048))
        p = next(model.parameters())
        self.device = p.device
        self.dtype = self.inner.embed_tokens.weight.dtype
        self.cache = self._new_cache(slots)
        self._compiled = None
        self._compile_noted = False
        self._groups: dict = {}  # (layer, 0 = q/k/v | 1 = gate/up) -> (the base layers, their concatenation or None)

    def _new_cache(self, slots: int) -> SlotKVCache:
        return SlotKVCache(len(self.layers), slots, self.kv_heads, self.head_dim, self.max_len, self.dtype, self.device)

    # -------------------------------------------------- slots
    def ensure_slots(self, n: int) -> None:
        """At least `n` slots (a new, empty cache when it must grow; only between generations)."""
        if n > self.cache.slots:
            cap = self.cache.capacity
            self.cache = self._new_cache(n)
            self.cache.reserve(cap)

    def reset(self, slots: Sequence[int] | None = None) -> None:
        for s in (range(self.cache.slots) if slots is None else slots):
            self.cache.free(s)

    # -------------------------------------------------- the forward pass
    @torch.inference_mode()
    def forward(self, first: int, ids: torch.Tensor, n_tokens: Sequence[int] | None = None) -> torch.Tensor:
        """Rows ``first..first+b-1`` of the cache take `ids` [b, t] (row i's first ``n_tokens[i]`` are real,
        the rest right padding) at positions following what each row already holds. Returns the logits
        [b, vocab] at each row's last real token, and advances the rows' lengths."""
        b, t = ids.shape
        cache = self.cache
        if first < 0 or first + b > cache.slots:
            raise DLPLoRAError(f"rows {first}..{first + b - 1} are outside the cache's {cache.slots} slots")
        n_tok = [t] * b if n_tokens is None else [int(n) for n in n_tokens]
        starts = cache.lengths[first:first + b]
        ends = [s + n for s, n in zip(starts, n_tok)]
        if max(ends) > self.max_len:
            raise DLPLoRAError(f"a sequence of {max(ends)} tokens does not fit the model's context of {self.max_len}")
        need = max(s + t for s in starts) + 1  # right padding lands past every real position
        # one step of headroom: the attended width then stays below the capacity, so a compiled step is not
        # specialised on "width == capacity" (and recompiled when that stops holding)
        cache.reserve(min(need + GROW, self.max_len) if need <= self.max_len else need)
        width = min(round_up(max(s + t for s in starts)), cache.capacity)  # the columns this pass attends over
        dev = self.device
        start_t = torch.tensor(starts, dtype=torch.long, device=dev)
        pos = start_t[:, None] + torch.arange(t, device=dev)[None, :]  # [b, t]
        pos_w = pos.clamp(max=cache.capacity - 1)
        mask = torch.arange(width, device=dev)[None, None, None, :] <= pos[:, None, :, None]  # [b, 1, t, W]
        rows = torch.arange(first, first + b, device=dev)[:, None]
        last = torch.tensor([n - 1 for n in n_tok], dtype=torch.long, device=dev)
        if self._compiled is not None:  # the compiled step finds its groups built (eager code, not traced)
            self._refresh_groups()
        step = self._compiled if (self._compiled is not None and t == 1) else self._layers
        if step is self._compiled and not self._compile_noted:  # torch.compile works at the first call: say so
            self._compile_noted = True
            log.warning(COMPILE_NOTE)
            t0 = time.perf_counter()
            logits = step(ids.to(dev), pos, pos_w, mask, rows, last, first, width)
            log.warning("compiled the decode step in %.0f s", time.perf_counter() - t0)
        else:
            logits = step(ids.to(dev), pos, pos_w, mask, rows, last, first, width)
        for i, e in enumerate(ends):
            cache.lengths[first + i] = e
        return logits

    def _layers(self, ids, pos, pos_w, mask, rows, last, first: int, width: int):
        b, t = ids.shape
        cache = self.cache
        x = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(x, pos)
        cos, sin = cos[:, None], sin[:, None]  # [b, 1, t, D]
        D, Hq, Hk = self.head_dim, self.n_heads, self.kv_heads
        for li, layer in enumerate(self.layers):
            at, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)
            q, k, v = self._siblings(li, 0, (at.q_proj, at.k_proj, at.v_proj), h)
            # rotary over the query and key heads at once
            qk = torch.cat([q.view(b, t, Hq, D), k.view(b, t, Hk, D)], 2).transpose(1, 2)
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk[:, :Hq], qk[:, Hq:]
            v = v.view(b, t, Hk, D)
            K, V = cache.k[li], cache.v[li]
            K[rows, :, pos_w] = k.transpose(1, 2).to(K.dtype)
            V[rows, :, pos_w] = v.to(V.dtype)
            o = self._attend(q, K[first:first + b, :, :width], V[first:first + b, :, :width], mask)
            x = x + at.o_proj(o.transpose(1, 2).reshape(b, t, Hq * D))
            g, u = self._siblings(li, 1, (mlp.gate_proj, mlp.up_proj), layer.post_attention_layernorm(x))
            x = x + mlp.down_proj(mlp.act_fn(g) * u)
        hidden = x[torch.arange(b, device=x.device), last]
        return self.model.lm_head(self.inner.norm(hidden))

    def _refresh_groups(self) -> None:
        """Build or check every sibling group (before a compiled step, which must not trace their building)."""
        for li, layer in enumerate(self.layers):
            at, mlp = layer.self_attn, layer.mlp
            self._group(li, 0, (at.q_proj, at.k_proj, at.v_proj))
            self._group(li, 1, (mlp.gate_proj, mlp.up_proj))

    def _group(self, li: int, which: int, mods) -> tuple:
        """(modules, base layers, their int8 concatenation or None, output sizes) of one sibling group, rebuilt when a
        module or a fused layer's base changed since (quantising, or fusing a library, after the core was made); the
        check is by identity, a few hundred nanoseconds a group."""
        g = self._groups.get((li, which))
        if g is not None and all(m is gm and (gb is m or m.base is gb) for m, gm, gb in zip(mods, g[0], g[1])):
            return g
        bases = tuple(m.base if hasattr(m, "add_delta") else m for m in mods)
        g = self._groups[(li, which)] = (tuple(mods), bases, _concat_int8(bases), [m.out_features for m in bases])
        return g

    def _siblings(self, li: int, which: int, mods, h) -> list:
        """The projections `mods` of one input `h` (a layer's q/k/v, or its gate/up). Where their base layers are
        int8 (:class:`~dlplora.quantize.Int8Linear`), one concatenated layer computes them all: one per-token
        quantisation and one int32 product instead of one per projection, with equal results; a fused adapter
        layer then adds its own low-rank delta (``add_delta``). Otherwise each projection runs as it is."""
        _, bases, fused, sizes = self._group(li, which, mods)
        if fused is None:
            return [m(h) for m in mods]
        outs = fused(h).split(sizes, -1)
        return [y if m is base else m.add_delta(y, h) for m, base, y in zip(mods, bases, outs)]

    def _attend(self, q, k, v, mask):
        """Grouped-query attention: q [b, Hq, t, D] over k, v [b, Hk, W, D] with mask [b, 1, t, W]. Each key
        head serves its G = Hq / Hk query heads as one [G*t, D] block (no repeated keys): two batched matmuls,
        the softmax in float32. (SDPA's CPU flash kernel is ~20x slower for one query token.)"""
        b, hq, t, d = q.shape
        hk, w = k.shape[1], k.shape[2]
        g = hq // hk
        qg = q.reshape(b, hk, g * t, d)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * self.scaling  # [b, Hk, G*t, W]
        m = mask.expand(b, g, t, w).reshape(b, 1, g * t, w)
        probs = scores.masked_fill(~m, float("-inf")).softmax(-1).to(v.dtype)
        return torch.matmul(probs, v).reshape(b, hq, t, d)

    def compile(self, dynamic: bool = True, **kw) -> None:
        """Compile the decode step (t = 1) with torch.compile (inductor: C++ kernels on the CPU). Shapes are
        dynamic by default, so batch sizes and attention widths share one compiled graph; the first steps
        pay the compile time (`dlp-lora bench decode --compile` reports it). Inductor's FX graph and AOTAutograd
        caches live in the project's cache directory (:func:`compile_cache_dir`), so a later process compiling the
        same model and shapes loads the kernels instead of building them (a warm start)."""
        import torch._dynamo

        compile_cache_dir()
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._compiled = torch.compile(self._layers, dynamic=dynamic, **kw)

    def warm_up(self, sizes: Sequence[int] = (1, 2), before=None) -> float:
        """Run the compiled step at each batch size in `sizes` (at two attention widths), so that compiling happens
        now and not in the first requests; `before(b)` sets up the fused layers for rows 0..b-1. The rows are freed
        after. Returns the seconds taken."""
        t0 = time.perf_counter()
        for b in sizes:
            if b > self.cache.slots:
                continue
            if before is not None:
                before(b)
            ids = torch.zeros(b, 1, dtype=torch.long, device=self.device)
            for _ in range(2):
                self.forward(0, ids)
            self.cache.lengths[0:b] = [GROW + 1] * b  # a wider attention window, as a longer prompt gives
            self.forward(0, ids)
            self.reset(range(b))
        return time.perf_counter() - t0

    @property
    def compiled(self) -> bool:
        return self._compiled is not None


    def prefill_chunk(self, first: int, parts: Sequence[Sequence[int]]) -> torch.Tensor:
        """One chunk of prompts into rows ``first..``: row i takes the tokens ``parts[i]``, right-padded into
        one forward pass. A row with no tokens left (already in) takes one padding token that is not kept (its
        length is restored). Returns the logits [b, vocab] at each row's last token of this chunk."""
        n = [max(len(p), 1) for p in parts]
        ids = torch.zeros(len(parts), max(n), dtype=torch.long)
        for i, p in enumerate(parts):
            if p:
                ids[i, :len(p)] = torch.tensor(list(p), dtype=torch.long)
        before = self.cache.lengths[first:first + len(parts)]
        out = self.forward(first, ids, n)
        for i, p in enumerate(parts):
            if not p:
                self.cache.lengths[first + i] = before[i]
        return out

    def prefill(self, first: int, rows: Sequence[Sequence[int]], chunk: int = PREFILL_CHUNK) -> torch.Tensor:
        """Prompts into slots ``first..``, `chunk` tokens per forward pass; the logits of each last token."""
        if any(len(r) == 0 for r in rows):
            raise DLPLoRAError("cannot prefill an empty prompt")
        self.reset(range(first, first + len(rows)))
        logits: list[torch.Tensor | None] = [None] * len(rows)
        for c0 in range(0, max(len(r) for r in rows), chunk):
            parts = [r[c0:c0 + chunk] for r in rows]
            out = self.prefill_chunk(first, parts)
            for i, p in enumerate(parts):
                if len(p) and c0 + len(p) >= len(rows[i]):
                    logits[i] = out[i]
        return torch.stack(logits)


_CORES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def core_for(model, slots: int = 1) -> DecodeCore | None:
    """The model's decoding core (made once, kept while the model lives), with at least `slots` slots;
    None when the core cannot run this model (the caller falls back to the HF forward pass)."""
    if unsupported_reason(model) is not None:
        return None
    model = unwrap(model)
    core = _CORES.get(model)
    dev = next(model.parameters()).device
    if core is None or core.device != dev or core.dtype != model.model.embed_tokens.weight.dtype:
        core = _CORES[model] = DecodeCore(model, slots)
    core.ensure_slots(slots)
    return core


def compile_cache_dir() -> str:
    """Point inductor's on-disk caches (FX graph cache, AOTAutograd cache: torch's defaults, on) at
    CACHE/inductor unless $TORCHINDUCTOR_CACHE_DIR says otherwise; returns the directory."""
    import os

    from .paths import cache_dir

    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
