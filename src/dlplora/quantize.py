"""`--quantize int8|int4`: quantised weights for the base model's linear layers, the LoRA delta kept in float.

``int8``  int8 weights with a scale per output channel; each input row (token) quantised to int8 on the fly
          with its own scale, the product in int32 (``torch._int_mm``), fp32 activations (:class:`Int8Linear`).
          A row's result does not depend on the rest of its batch.
``int4``  weight-only int4 in groups of :data:`INT4_GROUP` input columns, each with its own scale and offset
          (the layout of llama.cpp's Q4_1, which the embedded backbone was shipped in), computed by PyTorch's
          CPU kernel ``_weight_int4pack_mm_for_cpu``; bf16 activations. Batch-1 decoding reads the weights once
          per token, so an eighth of the bytes of fp32 is most of the gain. Inputs of many rows (a prefill)
          dequantise the weight from one-byte codes and run a bf16 GEMM instead, which is faster there; the
          codes cost 1 byte per weight beside the packed half byte.

Both cover the backbone's linears, the fused layers' base projections and the vocabulary head. The fused
adapters' A and B stay in float and are added beside the quantised product (modes ``shared``,
``unmerged`` and ``slots``; ``merged`` would write into the quantised weight, so ``auto`` picks ``shared``).
Measured by `dlp-lora bench decode --quantize int8|int4`.
"""

from __future__ import annotations


import torch
from torch import nn

from .config import QUANTIZE  # noqa: F401 (re-exported)
from .errors import DLPLoRAError

# QUANTIZE lives in config so that the CLI reads it without importing torch
INT4_GROUP = 32
INT4_TILES = 8
PREFILL_ROWS = 64  # from this many input rows on, Int4Linear dequantises to bf16 and runs a plain GEMM


def _check_cpu(model, what: str):
    p = next(model.parameters())
    if p.device.type != "cpu":
        raise DLPLoRAError(f"--quantize {what} runs on the CPU only (the model is on {p.device.type})")
    return p


class Int8Linear(nn.Module):
    """int8 weights with a scale per output channel; each input row (token) quantised to int8 with a scale of its own
    on the fly, the product accumulated in int32 by ``torch._int_mm``, then rescaled to float32.

    Per-token activation scales make a row's result independent of the other rows of its batch: PyTorch's dynamic
    quantisation (``quantize_dynamic``) takes one scale for the whole input tensor, so in a server's batch one
    request's outlier coarsened every other request's activations (10x the error of the other rows in a measured
    case) and a response changed with its neighbours. The price, measured beside it on the embedded backbone (one
    forward of 1 / 8 / 32 one-token rows, 2 threads, CPU flags avx2 avx512_bf16): 26 / 32 / 55 ms against 20 / 23 /
    38 ms (fp32: 59 / 86 / 131 ms); the int32 product itself is faster than fbgemm's for the 576-wide layers, the
    difference is the per-token quantisation's small ops and the vocabulary head at one row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("qweight_t", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).T.contiguous())
        self.register_buffer("wscale", scale)
        self.bias = linear.bias
        self.out_features, self.in_features = w.shape

    def weight(self) -> torch.Tensor:
        """The dequantised weight [out, in] (float32), for inspection and tests."""
        return (self.qweight_t.T.float() * self.wscale[:, None])

    @classmethod
    def concat(cls, layers: "list[Int8Linear]") -> "Int8Linear":
        """One layer whose outputs are those of `layers` (same inputs) side by side: their int8 columns and scales
        concatenated, so one per-token quantisation and one int32 product serve them all. Each output equals the
        layer's own, bit for bit (the scales are per channel and per token, the int32 sums exact)."""
        if len({l.in_features for l in layers}) != 1:
            raise DLPLoRAError("Int8Linear.concat: the layers read inputs of different widths")
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.register_buffer("qweight_t", torch.cat([l.qweight_t for l in layers], 1).contiguous())
        out.register_buffer("wscale", torch.cat([l.wscale for l in layers]))
        biases = [l.bias for l in layers]
        out.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else l.wscale.new_zeros(l.out_features) for b, l in zip(biases, layers)])
        out.in_features, out.out_features = layers[0].in_features, sum(l.out_features for l in layers)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        amax = torch.linalg.vector_norm(x2, float("inf"), dim=1, keepdim=True).clamp_(min=1e-12)
        xq = (x2 * (127.0 / amax)).round_().to(torch.int8)
        y = torch._int_mm(xq, self.qweight_t).mul(self.wscale).mul_(amax * (1.0 / 127.0))
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per channel, per-token activations"


def _replace_linears(model, make):
    """Every plain nn.Linear of `model` replaced in place by ``make(linear)``; returns the model."""
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))
    return model


def quantize_int8(model):
    """Replace every nn.Linear of the model by an :class:`Int8Linear` (CPU, fp32 activations), in place."""
    p = _check_cpu(model, "int8")
    if p.dtype != torch.float32:
        raise DLPLoRAError(f"--quantize int8 needs float32 activations; load the model with --dtype float32 "
                           f"(it is {str(p.dtype).replace('torch.', '')})")
    if not hasattr(torch, "_int_mm"):
        raise DLPLoRAError("--quantize int8 needs PyTorch's _int_mm (torch >= 2.2)")
    return _replace_linears(model, Int8Linear)


class Int4Linear(nn.Module):
    """A linear layer with int4 weights in groups of `group` input columns (scale and offset per group)."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__()
        w = linear.weight.detach().float()
        out_f, in_f = w.shape
        pad = -out_f % 16  # the packing takes output rows in sixteens: zero rows, cut from the result
        if pad:
            w = torch.cat([w, w.new_zeros(pad, in_f)])
        if in_f % group:
            raise DLPLoRAError(f"--quantize int4: a layer of {in_f} inputs is not a multiple of the group {group}")
        g = w.reshape(-1, group)
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-8) / 15
        rows = out_f + pad
        q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(rows, in_f)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        sz = torch.cat([scale.reshape(rows, -1, 1), zero.reshape(rows, -1, 1)], 2).transpose(0, 1)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, INT4_TILES))
        self.register_buffer("scales_zeros", sz.contiguous().to(torch.bfloat16))
        # the same codes, one byte each, for many-row inputs (prefill): dequantised to bf16 for a plain GEMM,
        # which beats the int4 kernel from PREFILL_ROWS rows on (measured 1.6x at 128 rows, 2.2x at 512)
        self.register_buffer("codes", q[:out_f].to(torch.uint8).reshape(out_f, -1, group))
        self.register_buffer("group_scale", scale.reshape(rows, -1)[:out_f, :, None].to(torch.bfloat16))
        self.register_buffer("group_low", lo.reshape(rows, -1)[:out_f, :, None].to(torch.bfloat16))
        self.bias = linear.bias
        self.in_features, self.out_features, self.group = in_f, out_f, group

    def weight(self) -> torch.Tensor:
        """The dequantised weight [out, in] (float32), for inspection and tests."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        out = torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_zeros)
        return out[:, :self.out_features].float().T

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] in bf16, from the byte codes."""
        return (self.codes.to(torch.bfloat16) * self.group_scale + self.group_low).reshape(self.out_features, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.numel() >= PREFILL_ROWS * shape[-1]:
            y = torch.nn.functional.linear(x.to(torch.bfloat16), self.dequantized())
            return y if self.bias is None else y + self.bias.to(y.dtype)
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed, self.group,
                                              self.scales_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 groups of {self.group}"


def quantize_int4(model):
    """Replace every nn.Linear of the model by an :class:`Int4Linear` (CPU, bf16 activations), in place."""
    p = _check_cpu(model, "int4")
    if p.dtype != torch.bfloat16:
        raise DLPLoRAError(f"--quantize int4 computes with bfloat16 activations; load the model with --dtype bfloat16 "
                           f"(it is {str(p.dtype).replace('torch.', '')})")
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        raise DLPLoRAError("--quantize int4 needs PyTorch's _weight_int4pack_mm_for_cpu (torch >= 2.5)")
    return _replace_linears(model, Int4Linear)


def resolve_quantize(quantize: str | None, device=None, dtype=None) -> str:
    """"auto" -> this machine's choice (:func:`dlplora.device.auto_quantize_name`); other names are checked."""
    from .device import auto_quantize_name, resolve_device

    name = "none" if quantize is None else str(quantize)
    if name == "auto":
        return auto_quantize_name(str(resolve_device(device)), dtype=None if dtype is None else str(dtype))
    if name not in QUANTIZE:
        raise DLPLoRAError(f"unknown quantisation {quantize!r}; choose one of: {', '.join(QUANTIZE)}")
    return name


def quantize_dtype(quantize: str | None) -> str | None:
    """The activation dtype a quantisation computes with (None: any)."""
    return {"int8": "float32", "int4": "bfloat16"}.get(quantize or "none")


def apply_quantize(model, quantize: str | None):
    if quantize in (None, "none"):
        return model
    if quantize == "int8":
        return quantize_int8(model)
    if quantize == "int4":
        return quantize_int4(model)
    raise DLPLoRAError(f"unknown quantisation {quantize!r}; choose one of: {', '.join(QUANTIZE)}")
