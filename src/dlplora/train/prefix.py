"""Training through the top layers only: the frozen layers below the LoRA layers are run once per example.

With ``--top-layers N`` the adapter sits in the last N decoder layers; the layers below carry no adapter and
are frozen, so their output for a training example never changes. :class:`PrefixCache` computes it once
(no grad; bf16 autocast where the trainer uses it), keeps it per example, and :func:`prefix_loss` runs every
later step through the top layers, the final norm and the vocabulary head at the answer positions only:
the same loss as :func:`dlplora.train.lora.target_only_loss`, without the bottom layers' forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbone import decoder_and_head


def _causal_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """[b, T] key mask -> additive [b, 1, T, T] causal mask (0 where visible, the dtype's min elsewhere)."""
    T = mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    keep = causal[None, None] & mask[:, None, None, :].bool()
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


def _run_layers(body, layers, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, T = mask.shape
    pos = torch.arange(T, device=hidden.device)[None].expand(b, T)
    emb = body.rotary_emb(hidden, pos)
    attn = _causal_mask(mask, hidden.dtype)
    for layer in layers:
        hidden = layer(hidden, attention_mask=attn, position_ids=pos, position_embeddings=emb)
    return hidden


class PrefixCache:
    """The hidden states after the first `split` decoder layers, per training example (computed on first use)."""

    def __init__(self, model, split: int, bf16: bool):
        self.body, _ = decoder_and_head(model)
        self.split = split
        self.bf16 = bf16
        self.states: dict[int, torch.Tensor] = {}
        self.computed_tokens = 0

    @torch.no_grad()
    def fill(self, keys: list[int], seqs: list[list[int]], pad_id: int) -> None:
        """Compute the states of the examples `keys` (token rows `seqs`) that are not cached yet."""
        todo = [(k, s) for k, s in zip(keys, seqs) if k not in self.states]
        if not todo:
            return
        T = max(len(s) for _, s in todo)
        ids = torch.full((len(todo), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(todo), T), dtype=torch.long)
        for i, (_, s) in enumerate(todo):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.body.embed_tokens(ids)
            hidden = _run_layers(self.body, self.body.layers[:self.split], hidden, mask)
        for i, (k, s) in enumerate(todo):
            self.states[k] = hidden[i, :len(s)].clone()
            self.computed_tokens += len(s)

    def batch(self, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded states [b, T, H] and the key mask [b, T] of cached examples."""
        rows = [self.states[k] for k in keys]
        T = max(r.shape[0] for r in rows)
        hidden = rows[0].new_zeros(len(rows), T, rows[0].shape[1])
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            hidden[i, :r.shape[0]] = r
            mask[i, :r.shape[0]] = 1
        return hidden, mask


def prefix_loss(model, cache: PrefixCache, keys: list[int], seqs: list[list[int]], pad_id: int, rows, pos, tgt,
                bf16: bool = True) -> torch.Tensor:
    """Cross-entropy on the answer tokens (`rows`, `pos` -> `tgt`, as collate gives them), from the cached
    states through the top layers."""
    body, head = decoder_and_head(model)
    cache.fill(keys, seqs, pad_id)
    hidden, mask = cache.batch(keys)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = _run_layers(body, body.layers[cache.split:], hidden, mask)
        logits = head(body.norm(hidden[rows, pos]))
    return F.cross_entropy(logits.float(), tgt)
