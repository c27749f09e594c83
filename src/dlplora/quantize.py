"""`--quantize int8`: int8 weights for the base model's linear layers, the LoRA delta kept in float.

PyTorch's dynamic quantisation (``torch.ao.quantization.quantize_dynamic``): each ``nn.Linear`` of the
backbone, the fused layers' base projections and the vocabulary head included, keeps its weight as int8
with a per-tensor scale and quantises its input per batch on the fly (fbgemm kernels on x86). The fused
adapters' A and B stay in float and are added beside the int8 product (modes ``shared`` / ``unmerged``;
``merged`` would have to write into the int8 weight, so ``auto`` picks ``shared``). At batch 1 decoding
reads the weights once per token, so a quarter of the bytes of fp32 is most of the gain
(`dlp-lora bench decode --quantize int8`).
"""

from __future__ import annotations

from .errors import DLPLoRAError

QUANTIZE = ("none", "int8")


def quantize_int8(model):
    """Quantise the model's linear layers to int8 in place (CPU, fp32 activations); returns the model."""
    import torch
    from torch import nn

    p = next(model.parameters())
    if p.device.type != "cpu":
        raise DLPLoRAError(f"--quantize int8 runs on the CPU only (the model is on {p.device.type})")
    if p.dtype != torch.float32:
        raise DLPLoRAError(f"--quantize int8 needs float32 activations; load the model with --dtype float32 "
                           f"(it is {str(p.dtype).replace('torch.', '')})")
    torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else \
        torch.backends.quantized.engine
    import warnings

    with warnings.catch_warnings():  # torch.ao's deprecation notice: the API is what this option measures
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def apply_quantize(model, quantize: str | None):
    if quantize in (None, "none"):
        return model
    if quantize == "int8":
        return quantize_int8(model)
    raise DLPLoRAError(f"unknown quantisation {quantize!r}; choose one of: {', '.join(QUANTIZE)}")
