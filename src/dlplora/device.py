"""Where the model runs and in what precision: `--device auto|cpu|cuda`, `--dtype auto|float32|bfloat16|float16` and
what `--quantize auto` means on this machine.

``auto`` device: CUDA when torch sees a GPU, else the CPU. ``auto`` dtype: bf16 on CUDA and on a CPU
that computes it natively (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo); fp32 otherwise, since
on an AVX2-only CPU bf16 matrix products are emulated and several times slower than fp32.

``auto`` quantisation (:func:`auto_quantize_name`, the default of ``generate``, ``chat`` and ``serve``): int8 weights
with fp32 activations (fbgemm) on any x86 CPU with AVX2, bf16-native or not: fp32 activations avoid the bf16 that
AVX2-only CPUs emulate, and on the measured `avx2 avx512_bf16` machine int8 was the fastest configuration without
compile for 32 distinct mixes and in prefill, and within 10% of int4 at batch 1 (BENCHMARKS.md, decode table). No quantisation on CUDA, on other CPUs
(fbgemm is x86's), or when ``--dtype`` names a precision.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DLPLoRAError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> list[str]:
    """The CPU flags that decide the fast dtype and are stated beside every figure: those of avx2,
    avx512_bf16 and amx_bf16 that the CPU has."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return sorted(f for f in ("avx2",) + NATIVE_BF16_FLAGS if f in flags)


def auto_dtype_name(device: str = "cpu", flags: list[str] | None = None) -> str:
    if device.startswith("cuda"):
        return "bfloat16"
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if set(NATIVE_BF16_FLAGS) & set(flags) else "float32"


def auto_quantize_name(device: str = "cpu", flags: list[str] | None = None, dtype: str | None = "auto") -> str:
    """What ``--quantize auto`` picks (see the module doc): "int8" on an x86 CPU with AVX2 when the dtype is left to
    auto, else "none"."""
    if device.startswith("cuda") or dtype not in (None, "auto"):
        return "none"
    flags = cpu_flags() if flags is None else flags
    return "int8" if "avx2" in flags else "none"


def resolve_device(device=None):
    """A torch.device from None/"auto"/"cpu"/"cuda"/"cuda:N" or a torch.device."""
    import torch

    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DLPLoRAError(f"--device {name}: this torch build sees no CUDA GPU (use --device cpu or auto)")
        return torch.device(name)
    raise DLPLoRAError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")


def resolve_dtype(dtype=None, device=None):
    """A torch dtype from None (fp32, the default of the Python API), a name of DTYPES, or a torch dtype."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype)
    if name == "auto":
        name = auto_dtype_name(str(resolve_device(device)))
    if name not in DTYPES[1:]:
        raise DLPLoRAError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return getattr(torch, name)
