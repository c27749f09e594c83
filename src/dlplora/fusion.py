"""Fused multi-LoRA layers: many PEFT LoRA adapters applied at once, with a per-row weighted set.

Every linear layer that some adapter of the library targets is wrapped in a
:class:`FusedLoRALinear` that holds, for the N adapters,

* ``A``: ``[N, r_max, in]`` and ``B``: ``[N, out, r_max]`` (ranks below ``r_max`` are zero-padded;
  an adapter that does not target this layer has zero ``A``/``B`` here),
* ``scale``: ``[N]``, PEFT's ``alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).

A routing gives each batch row up to ``k`` adapters: ``indices [b, k]`` and ``weights [b, k]``
(padding has weight 0; a row with no adapter runs the base model). The layer computes::

    y = W x + sum_k w_k s_k B_k (A_k x)

The routing is set once per generation (:meth:`LoRAFusion.set_routing`); at that moment every layer
gathers its selected adapters into ``A_sel [b, k*r, in]`` and ``B_sel [b, out, k*r]`` with
``w_k * s_k`` folded into ``B_sel``. Each forward pass is then two batched matmuls, with no Python loop
over adapters or rows. Modes:

``unmerged``  per-row sets, two ``bmm`` per layer (any batch).
``shared``    every row uses the same set: one ``[k*r, in]`` / ``[out, k*r]`` pair, plain matmuls.
``merged``    every row uses the same set: the fused delta is added to the weights for the whole
              generation; the original weights are saved and copied back by :meth:`clear`.
``slots``     per-row sets kept in a table of slots (the server's continuous batching): each slot's set is
              gathered once, when its request joins (:meth:`LoRAFusion.set_slot`); a forward pass over
              slots ``first..first+b-1`` reads views of the table (:meth:`LoRAFusion.use_slots`).
``auto``      all rows share one set (batch of one included): merged for a generation of at least
              ``MERGE_MIN_TOKENS`` tokens (or when the length is not given), else shared;
              different sets: unmerged.

Adapters are read straight from the PEFT files by :func:`dlplora.adapters.load_peft_adapter` and
checked here against the model's layers. A live library adds and removes adapters between forward passes
(:meth:`LoRAFusion.add_adapter` / ``remove_adapter``: one stack row more or less; a slot keeps the copy it gathered,
so a row in flight finishes with its weights). Callers name adapters, never stack indices (a removal shifts the
indices after it): :meth:`LoRAFusion.encode` maps names to indices at gather time.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Mapping, Sequence

import torch
from torch import nn

from .adapters import AdapterWeights, load_peft_adapter
from .config import FUSION_MODES as MODES
from .errors import DLPLoRAError

__all__ = ["MODES", "MERGE_MIN_TOKENS", "AdapterWeights", "FusedLoRALinear", "LoRAFusion", "RoutingState",
           "load_peft_adapter"]
# auto mode merges only when at least this many tokens will be generated (merging + restoring costs
# about as much as ~25 decode steps of the shared low-rank path on SmolLM2-135M, CPU)
MERGE_MIN_TOKENS = 32


# ---------------------------------------------------------------- routing

class RoutingState:
    """The routing shared by all fused layers of one model (set once per generation)."""

    def __init__(self):
        self.mode: str | None = None  # None = base model
        self.batch = 0
        self.first = 0  # slots mode: the forward pass covers slots first..first+batch-1
        self.table = "default"  # slots mode: whose slot table (the server's scheduler and the engine keep their own)

    def __repr__(self):
        return f"RoutingState(mode={self.mode}, batch={self.batch})"


class FusedLoRALinear(nn.Module):
    """A linear layer plus N LoRA adapters, applied with per-row weighted sets (see module doc)."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                 state: RoutingState, name: str = ""):
        super().__init__()
        self.base = base
        self.name = name
        self.register_buffer("A", A, persistent=False)  # [N, r, in]
        self.register_buffer("B", B, persistent=False)  # [N, out, r]
        self.register_buffer("scale", scale, persistent=False)  # [N]
        self.state = state
        self.in_features, self.out_features = base.in_features, base.out_features
        self._A_sel = self._B_sel = None  # A_sel^T, B_sel^T: [b, in, kr], [b, kr, out] (unmerged) or [in, kr], [kr, out]
        self._saved_weight = None  # the original weight while merged
        self._slots: dict[str, list[torch.Tensor]] = {}  # slot tables by owner: [A [slots, in, KR], B [slots, KR, out]]

    @property
    def weight(self):  # so code that inspects `.weight` of a projection keeps working
        w = self.base.weight
        return w() if callable(w) else w  # an int8 base (dlplora.quantize) gives its packed weight by a call

    @property
    def bias(self):
        return self.base.bias

    # -------------------------------------------------- routing set-up (once per generation)
    def _select(self, indices: torch.Tensor, weights: torch.Tensor):
        """Gather the chosen adapters: A_sel [b, k*r, in], B_sel [b, out, k*r] with w*s folded into B."""
        b, k = indices.shape
        r = self.A.shape[1]
        a_sel = self.A[indices].reshape(b, k * r, self.in_features)
        coef = (weights.to(self.scale.dtype) * self.scale[indices]).to(self.B.dtype)  # [b, k]
        b_sel = self.B[indices] * coef[:, :, None, None]  # [b, k, out, r]
        b_sel = b_sel.permute(0, 2, 1, 3).reshape(b, self.out_features, k * r)
        return a_sel, b_sel

    def route(self, indices: torch.Tensor, weights: torch.Tensor, mode: str) -> None:
        """Prepare the layer for a routing. The selected factors are stored transposed and contiguous
        (A_sel^T [b, in, k*r], B_sel^T [b, k*r, out]): the layout batched matmuls read fastest."""
        self.restore()
        self._A_sel = self._B_sel = None
        if mode == "unmerged":
            a_sel, b_sel = self._select(indices, weights)
            self._A_sel = a_sel.transpose(1, 2).contiguous()
            self._B_sel = b_sel.transpose(1, 2).contiguous()
        elif mode in ("shared", "merged"):
            a_sel, b_sel = self._select(indices[:1], weights[:1])
            a_sel, b_sel = a_sel[0], b_sel[0]
            if mode == "shared":
                self._A_sel, self._B_sel = a_sel.T.contiguous(), b_sel.T.contiguous()
            else:
                w = self.base.weight
                self._saved_weight = w.detach().clone()
                with torch.no_grad():
                    w.add_((b_sel.float() @ a_sel.float()).to(w.dtype))

    # -------------------------------------------------- slots (set once per request)
    def init_slots(self, table: str, slots: int, kr: int) -> None:
        # on the CPU the table is float32 whatever the model's dtype: the batched low-rank products are small,
        # and PyTorch's bf16 bmm is 3-9x slower than fp32 at these shapes (`dlp-lora bench decode` measures it)
        dt = torch.float32 if self.A.device.type == "cpu" else self.A.dtype
        self._slots[table] = [torch.zeros(slots, self.in_features, kr, dtype=dt, device=self.A.device),
                              torch.zeros(slots, kr, self.out_features, dtype=dt, device=self.B.device)]

    def set_slot(self, table: str, slot: int, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """Gather a set (indices [k], weights [k]; k may be 0) into `slot`, in place (the table only grows
        wider when a set needs more columns than any before)."""
        t = self._slots[table]
        for x in t:
            x[slot].zero_()
        if indices.numel() == 0:
            return
        a_sel, b_sel = self._select(indices[None], weights[None])  # [1, kr, in], [1, out, kr]
        kr = a_sel.shape[1]
        if kr > t[0].shape[2]:
            grow = kr - t[0].shape[2]
            t[0] = torch.cat([t[0], t[0].new_zeros(t[0].shape[0], self.in_features, grow)], 2)
            t[1] = torch.cat([t[1], t[1].new_zeros(t[1].shape[0], grow, self.out_features)], 1)
        t[0][slot, :, :kr] = a_sel[0].T.to(t[0].dtype)
        t[1][slot, :kr] = b_sel[0].T.to(t[1].dtype)

    def move_slot(self, table: str, src: int, dst: int) -> None:
        for t in self._slots[table]:
            t[dst] = t[src]

    def add_row(self, ab: tuple[torch.Tensor, torch.Tensor, float] | None) -> None:
        """One adapter more at the end of the stacks: its (A [r, in], B [out, r], scale), or zeros (None: it does not
        target this layer); r_max grows (zero-padded) when r is larger."""
        n, r_max = self.A.shape[0], self.A.shape[1]
        r = ab[0].shape[0] if ab is not None else 0
        if r > r_max:
            self.A = torch.cat([self.A, self.A.new_zeros(n, r - r_max, self.in_features)], 1)
            self.B = torch.cat([self.B, self.B.new_zeros(n, self.out_features, r - r_max)], 2)
        a_row, b_row = self.A.new_zeros(1, *self.A.shape[1:]), self.B.new_zeros(1, *self.B.shape[1:])
        if ab is not None:
            a_row[0, :r], b_row[0, :, :r] = ab[0].to(a_row), ab[1].to(b_row)
        self.A, self.B = torch.cat([self.A, a_row]), torch.cat([self.B, b_row])
        self.scale = torch.cat([self.scale, self.scale.new_tensor([ab[2] if ab is not None else 0.0])])

    def remove_row(self, i: int) -> None:
        self.A, self.B, self.scale = (torch.cat([t[:i], t[i + 1:]]) for t in (self.A, self.B, self.scale))

    def restore(self) -> None:
        """Undo a merge: copy the saved original weight back (bit-exact)."""
        if self._saved_weight is not None:
            with torch.no_grad():
                self.base.weight.copy_(self._saved_weight)
            self._saved_weight = None

    def clear(self) -> None:
        self.restore()
        self._A_sel = self._B_sel = None

    # -------------------------------------------------- forward (hot path)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_delta(self.base(x), x)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`y` (the base projection of `x`, computed by the caller: the decoding core computes sibling projections
        in one product) plus the routed adapters' low-rank delta of `x`."""
        mode = self.state.mode
        if mode is None or mode == "merged":
            return y
        if mode == "slots":
            first, n = self.state.first, self.state.batch
            a_all, b_all = self._slots[self.state.table]
            a_t, b_t = a_all[first:first + n], b_all[first:first + n]
        else:
            a_t, b_t = self._A_sel, self._B_sel  # transposed: [.., in, kr], [.., kr, out]
        xa = x.to(a_t.dtype)
        if mode == "shared":
            return y + ((xa @ a_t) @ b_t).to(y.dtype)
        # unmerged: one routing row per batch row
        shape = x.shape
        b = shape[0]
        if b != a_t.shape[0]:
            raise DLPLoRAError(f"fused layer {self.name}: the routing is for {a_t.shape[0]} rows but the "
                               f"input has {b}")
        x3 = xa.reshape(b, -1, self.in_features)
        delta = torch.bmm(torch.bmm(x3, a_t), b_t)
        return y + delta.reshape(*shape[:-1], self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.A.shape[0]}, r_max={self.A.shape[1]}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


# ---------------------------------------------------------------- the fusion of a library into a model

class LoRAFusion:
    """N adapters fused into `model` (modified in place: targeted linears become FusedLoRALinear).

    >>> fusion = LoRAFusion(model, [load_peft_adapter(d, n) for n, d in dirs.items()])
    >>> with fusion.routing([{"a": 1.0}, {"a": 0.3, "b": 0.7}, {}]):
    ...     logits = model(input_ids).logits
    """

    def __init__(self, model: nn.Module, adapters: Sequence[AdapterWeights]):
        if not adapters:
            raise DLPLoRAError("no adapters to fuse")
        names = [a.name for a in adapters]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise DLPLoRAError(f"duplicate adapter names: {', '.join(sorted(dup))}")
        self.model = model
        self.names = names
        self._index = {n: i for i, n in enumerate(names)}
        self.state = RoutingState()
        self.layers: dict[str, FusedLoRALinear] = {}
        self.mode: str | None = None
        self.slot_tables: dict[str, int] = {}  # slots mode: owner -> number of slots

        modules = dict(model.named_modules())
        if any(isinstance(m, FusedLoRALinear) for m in modules.values()):
            raise DLPLoRAError("this model already has fused LoRA layers; call unfuse() on the old fusion first")
        by_layer: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
        for i, ad in enumerate(adapters):
            for mod_name, (a, b, s) in self._fit(ad, modules).items():
                by_layer.setdefault(mod_name, []).append((i, a, b, s))
        self._targets = {ad.name: set(ad.layers) for ad in adapters}  # the layers each adapter targets

        for mod_name, entries in by_layer.items():
            self._wrap(modules[mod_name], mod_name, len(adapters), entries)

    def _fit(self, ad: AdapterWeights, modules: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Check that every layer `ad` targets exists in the model, is linear and fits its factors' shapes."""
        for mod_name, (a, b, _) in ad.layers.items():
            mod = modules.get(mod_name)
            if mod is None:
                raise DLPLoRAError(f"adapter {ad.name!r} targets module {mod_name}, which the model lacks "
                                   f"(was it trained on another base model?)")
            base = mod.base if isinstance(mod, FusedLoRALinear) else mod
            if not isinstance(mod, FusedLoRALinear) and not isinstance(base, nn.Linear):
                raise DLPLoRAError(f"adapter {ad.name!r} targets {mod_name}, a {type(base).__name__}; "
                                   f"only linear layers are supported (of a quantised model: only the layers "
                                   f"that the library's adapters target)")
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise DLPLoRAError(
                    f"adapter {ad.name!r}, layer {mod_name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                    f"do not fit the model's layer ({base.out_features} x {base.in_features}); expected "
                    f"lora_A [r, {base.in_features}] and lora_B [{base.out_features}, r]")
        return ad.layers

    def _wrap(self, base: nn.Module, mod_name: str, n: int, entries) -> "FusedLoRALinear":
        """Replace the linear `base` by a fused layer of `n` adapters; `entries`: (index, A, B, scale) of those
        that target it (the others are zero here). A layer made after the slot tables gets them, empty."""
        w = base.weight
        r_max = max(a.shape[0] for _, a, _, _ in entries)
        A = torch.zeros(n, r_max, base.in_features, dtype=w.dtype, device=w.device)
        B = torch.zeros(n, base.out_features, r_max, dtype=w.dtype, device=w.device)
        scale = torch.zeros(n, dtype=torch.float32, device=w.device)
        for i, a, b, s in entries:
            r = a.shape[0]
            A[i, :r], B[i, :, :r], scale[i] = a.to(A), b.to(B), s
        fused = FusedLoRALinear(base, A, B, scale, self.state, mod_name)
        for table, slots in self.slot_tables.items():
            fused.init_slots(table, slots, r_max)
        _set_module(self.model, mod_name, fused)
        self.layers[mod_name] = fused
        return fused

    # -------------------------------------------------- a live library
    def _check_idle(self, what: str) -> None:
        if self.mode not in (None, "slots"):  # its gathered (or merged) weights would not match the stacks
            raise DLPLoRAError(f"cannot {what} while a {self.mode} routing is set; call clear() first")

    def add_adapter(self, ad: AdapterWeights) -> None:
        """Add `ad` at the end of every stack (index N; the others keep theirs), wrapping the layers only it targets.
        Between forward passes: refused while a per-generation routing is set; slots mode is fine (each slot holds
        its own gathered copy, and a new layer's slots are empty, as no set in them uses `ad`)."""
        if ad.name in self._index:
            raise DLPLoRAError(f"an adapter named {ad.name!r} is already loaded")
        self._check_idle(f"add adapter {ad.name!r}")
        modules = dict(self.model.named_modules())
        layers = self._fit(ad, modules)
        n = len(self.names)
        with torch.no_grad():
            for mod_name, layer in self.layers.items():
                layer.add_row(layers.get(mod_name))
            for mod_name, (a, b, s) in layers.items():
                if mod_name not in self.layers:
                    self._wrap(modules[mod_name], mod_name, n + 1, [(n, a, b, s)])
        self._targets[ad.name] = set(layers)
        self.names = self.names + [ad.name]  # a new list: readers in other threads see the old or the new one
        self._index = {name: i for i, name in enumerate(self.names)}

    def remove_adapter(self, name: str) -> None:
        """Remove adapter `name` from every stack (the indices after it shift down by one) and unwrap the layers no
        other adapter targets. The caller makes sure that no running row uses it (a slot's gathered set would
        survive, but an unwrapped layer would drop its part); the server waits for those rows."""
        i = self.index(name)  # the last one too: then no layer stays wrapped, and the model is the base model
        self._check_idle(f"remove adapter {name!r}")
        others = set().union(*(t for n, t in self._targets.items() if n != name))
        with torch.no_grad():
            for mod_name in list(self.layers):
                layer = self.layers[mod_name]
                layer.remove_row(i)
                if mod_name not in others:
                    layer.restore()
                    _set_module(self.model, mod_name, self.layers.pop(mod_name).base)
        del self._targets[name]
        self.names = [n for n in self.names if n != name]
        self._index = {n: j for j, n in enumerate(self.names)}

    @classmethod
    def from_dirs(cls, model: nn.Module, dirs: Mapping[str, str | os.PathLike]) -> "LoRAFusion":
        return cls(model, [load_peft_adapter(d, n) for n, d in dirs.items()])

    # -------------------------------------------------- routing
    def __contains__(self, name) -> bool:  # whether an adapter of this name is loaded
        return name in self._index

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise DLPLoRAError(f"unknown adapter {name!r}; loaded: {', '.join(self.names)}") from None

    def encode(self, sets: Sequence[Mapping[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row {name: weight} dicts -> padded (indices [b, k], weights [b, k])."""
        k = max([len(s) for s in sets] + [1])
        idx = torch.zeros(len(sets), k, dtype=torch.long)
        wts = torch.zeros(len(sets), k, dtype=torch.float32)
        for row, s in enumerate(sets):
            for j, (name, w) in enumerate(s.items()):
                idx[row, j] = self.index(name)
                wts[row, j] = float(w)
        return idx, wts

    @property
    def quantized(self) -> bool:
        """Whether the base linears of the fused layers hold quantised (int8 / int4) weights (see :mod:`dlplora.quantize`)."""
        return any(not isinstance(layer.base, nn.Linear) for layer in self.layers.values())

    def set_routing(self, indices, weights=None, mode: str = "auto", expected_tokens: int | None = None) -> str | None:
        """Set the per-row routing for the following forward passes; returns the mode used
        (None = no adapter anywhere, plain base model).

        `indices` is an int tensor [b, k] with `weights` [b, k], or a list of {name: weight} dicts
        (then `weights` is omitted). `expected_tokens` (tokens to generate) lets auto mode skip merging
        for short generations."""
        if mode not in MODES:
            raise DLPLoRAError(f"unknown fusion mode {mode!r}; choose one of {', '.join(MODES)}")
        if weights is None:
            indices, weights = self.encode(indices)
        indices = torch.as_tensor(indices, dtype=torch.long)
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if indices.dim() == 1:
            indices, weights = indices[None], weights[None] if weights.dim() == 1 else weights
        if indices.shape != weights.shape or indices.dim() != 2:
            raise DLPLoRAError(f"routing weights {tuple(weights.shape)} do not match indices {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self.names)):
            raise DLPLoRAError(f"routing index out of range 0..{len(self.names) - 1}")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise DLPLoRAError("routing weights must be finite and non-negative")
        # canonical form: zero-weight slots point at adapter 0 (so identical sets compare equal)
        indices = torch.where(weights > 0, indices, torch.zeros_like(indices))
        self.clear()
        if not (weights > 0).any():
            return None
        same = bool((indices == indices[:1]).all() and (weights == weights[:1]).all())
        if mode == "auto":
            if not same:
                mode = "unmerged"
            elif self.quantized:  # quantised weights cannot take the delta: add it beside them
                mode = "shared"
            else:
                mode = "merged" if expected_tokens is None or expected_tokens >= MERGE_MIN_TOKENS else "shared"
        elif mode == "merged" and self.quantized:
            raise DLPLoRAError("fusion mode 'merged' adds the delta into the weights, which are int8/int4 here "
                               "(quantised); use 'shared', 'unmerged' or 'auto'")
        elif mode in ("shared", "merged") and not same:
            raise DLPLoRAError(f"fusion mode {mode!r} needs every row to use the same adapter set; "
                               f"use 'unmerged' or 'auto' for a mixed batch")
        # drop columns that are zero in every row
        keep = (weights > 0).any(0)
        indices, weights = indices[:, keep], weights[:, keep]
        dev = next(iter(self.layers.values())).A.device
        indices, weights = indices.to(dev), weights.to(dev)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.route(indices, weights, mode)
        self.state.mode = mode
        self.state.batch = indices.shape[0]
        self.mode = mode
        return mode

    # -------------------------------------------------- slots (continuous batching)
    def init_slots(self, slots: int, table: str = "default") -> None:
        """A table of `slots` per-row sets (all empty) for slots mode, owned by `table` (the server's scheduler
        and the engine keep their own); replaces that owner's earlier table."""
        if slots <= 0:
            raise DLPLoRAError(f"the slot table needs at least one slot, got {slots}")
        for layer in self.layers.values():
            layer.init_slots(table, slots, layer.A.shape[1])
        self.slot_tables[table] = slots

    def set_slot(self, slot: int, adapters: Mapping[str, float], table: str = "default") -> None:
        """Put one request's {name: weight} set into `slot` (gathered once; {} = the base model)."""
        n = self.slot_tables.get(table, 0)
        if not 0 <= slot < n:
            raise DLPLoRAError(f"slot {slot} is outside the slot table {table!r} ({n} slots; call init_slots first)")
        live = {n: float(w) for n, w in adapters.items() if float(w) != 0.0}
        idx, wts = self.encode([live])  # names checked first: an unknown adapter is an error, also with none loaded
        if not torch.isfinite(wts).all() or (wts < 0).any():
            raise DLPLoRAError("routing weights must be finite and non-negative")
        if not self.layers:  # no adapter loaded: every slot is the base model
            return
        dev = next(iter(self.layers.values())).A.device
        idx, wts = idx[0, :len(live)].to(dev), wts[0, :len(live)].to(dev)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.set_slot(table, slot, idx, wts)

    def move_slot(self, src: int, dst: int, table: str = "default") -> None:
        """Copy slot `src`'s set into slot `dst` (a row moving to fill a hole)."""
        if src != dst:
            for layer in self.layers.values():
                layer.move_slot(table, src, dst)

    def use_slots(self, first: int, batch: int, table: str = "default") -> None:
        """Following forward passes cover slots ``first..first+batch-1`` of `table`, each row with its slot's set."""
        n = self.slot_tables.get(table, 0)
        if first < 0 or batch <= 0 or first + batch > n:
            raise DLPLoRAError(f"slots {first}..{first + batch - 1} are outside the slot table {table!r} ({n} slots)")
        if self.mode not in (None, "slots"):
            self.clear()
        self.state.mode = self.mode = "slots"
        self.state.first, self.state.batch, self.state.table = first, batch, table

    def clear(self) -> None:
        """Back to the base model; merged weights are restored exactly."""
        for layer in self.layers.values():
            layer.clear()
        self.state.mode, self.state.batch, self.mode = None, 0, None

    @contextmanager
    def routing(self, indices, weights=None, mode: str = "auto", expected_tokens: int | None = None):
        try:
            yield self.set_routing(indices, weights, mode, expected_tokens)
        finally:
            self.clear()

    def unfuse(self) -> nn.Module:
        """Put the plain linear layers back and return the model."""
        self.clear()
        for name, layer in self.layers.items():
            _set_module(self.model, name, layer.base)
        self.layers = {}
        return self.model
