"""A static KV cache in slots: per layer ``[slots, kv_heads, capacity, head_dim]`` keys and values.

A sequence owns one slot (a row) for its whole life. Its keys and values are written in place at their
positions; nothing is concatenated, merged or re-padded while it runs. The running rows are kept in
the first slots (``0..n-1``) so that every step reads plain views ``k[:n, :, :width]``. When a row leaves,
the last running row moves into its slot: one row's keys and values are copied, once.

The capacity grows in steps of :data:`GROW` positions, up to the model's context, when some row needs more
(the only reallocation). The width a step attends over is the longest running row rounded up to
:data:`GROW`, so short rows do not pay for the capacity.
"""

from __future__ import annotations

import torch

from .errors import DLPLoRAError

GROW = 128  # capacity and attention width are multiples of this


def round_up(n: int, step: int = GROW) -> int:
    return max(step, -(-int(n) // step) * step)


class SlotKVCache:
    """Keys and values of `slots` sequences for `n_layers` layers (see module doc)."""

    def __init__(self, n_layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device, capacity: int = GROW):
        if slots <= 0:
            raise DLPLoRAError(f"a KV cache needs at least one slot, got {slots}")
        self.n_layers, self.slots, self.kv_heads, self.head_dim = n_layers, slots, kv_heads, head_dim
        self.max_len = int(max_len)
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths = [0] * slots  # tokens held by each slot
        self.reserve(min(capacity, self.max_len))

    def _alloc(self, cap: int) -> torch.Tensor:
        return torch.zeros(self.slots, self.kv_heads, cap, self.head_dim, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every slot (grows by whole GROW steps, copies the old data)."""
        if length > self.max_len:
            raise DLPLoRAError(f"a sequence of {length} tokens does not fit the model's context of {self.max_len}")
        if length <= self.capacity:
            return
        cap = min(round_up(length), round_up(self.max_len))
        old = self.capacity
        new_k, new_v = [], []
        for i in range(self.n_layers):
            k, v = self._alloc(cap), self._alloc(cap)
            if old:
                k[:, :, :old] = self.k[i]
                v[:, :, :old] = self.v[i]
            new_k.append(k)
            new_v.append(v)
        self.k, self.v, self.capacity = new_k, new_v, cap

    @torch.inference_mode()
    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` (a row leaving the middle of the running block)."""
        if src == dst:
            return
        n = self.lengths[src]
        for k, v in zip(self.k, self.v):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
