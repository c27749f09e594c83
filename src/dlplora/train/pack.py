"""Packing: several short training examples in one row, with no attention across them.

A batch of right-padded rows spends compute on padding; length-bucketed batches (``lora.bucketed_batches``) already
remove most of it. Packing is the other way: first-fit-decreasing puts examples into rows of at most ``row_tokens``
tokens; each example keeps its own positions (from 0) and sees only itself (a block-diagonal causal mask), so the
loss is the same as on separate rows (tested). ``dlp-lora bench train --epoch N`` measures it against bucketing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbone import decoder_and_head


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `row_tokens` tokens (first fit, longest first; an example
    longer than `row_tokens` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_tokens - lengths[i])
    return rows


def packed_collate(encoded: list[tuple[list[int], int]], rows: list[list[int]], pad_id: int):
    """Rows of concatenated examples: ids [R, T], positions [R, T] (restarting at 0 per example), segment ids
    [R, T] (1, 2, ... per example, 0 on padding) and the (row, position) -> target triples of the answer tokens."""
    T = max(sum(len(encoded[i][0]) for i in row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), T), dtype=torch.long)
    segs = torch.zeros((len(rows), T), dtype=torch.long)
    r_idx, p_idx, tgt = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row, 1):
            seq, start = encoded[i]
            n = len(seq)
            ids[r, at:at + n] = torch.tensor(seq)
            positions[r, at:at + n] = torch.arange(n)
            segs[r, at:at + n] = s
            for t in range(start, n):
                r_idx.append(r)
                p_idx.append(at + t - 1)
                tgt.append(seq[t])
            at += n
    return ids, positions, segs, torch.tensor(r_idx), torch.tensor(p_idx), torch.tensor(tgt)


def block_causal_mask(segs: torch.Tensor, dtype) -> torch.Tensor:
    """[R, T] segment ids -> additive [R, 1, T, T] mask: a token sees the earlier tokens of its own example."""
    T = segs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segs.device).tril()
    same = (segs[:, :, None] == segs[:, None, :]) & (segs[:, :, None] > 0)
    keep = (causal[None] & same)[:, None]
    return torch.zeros(keep.shape, dtype=dtype, device=segs.device).masked_fill(~keep, torch.finfo(dtype).min)


def packed_loss(model, ids, positions, segs, rows, pos, tgt, bf16: bool = True) -> torch.Tensor:
    """Cross-entropy on the answer tokens of packed rows (the same figure as ``lora.target_only_loss`` on the
    examples one per row)."""
    body, head = decoder_and_head(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = body.embed_tokens(ids)
        emb = body.rotary_emb(hidden, positions)
        attn = block_causal_mask(segs, hidden.dtype)
        for layer in body.layers:
            hidden = layer(hidden, attention_mask=attn, position_ids=positions, position_embeddings=emb)
        logits = head(body.norm(hidden[rows, pos]))
    return F.cross_entropy(logits.float(), tgt)
