"""What several commands share: the model option's help, the routing options, JSON output."""

from __future__ import annotations

import json
import shlex
import sys

from ..config import DEFAULT_P, WEIGHTINGS, RoutingConfig, base_threshold_of
from ..errors import DLPLoRAError

MODEL_HELP = "base model: a local Hugging Face directory or hub id (default: embedded SmolLM2-135M-Instruct)"
LIBRARY_MODEL_HELP = ("base model: a local Hugging Face directory or hub id (default: the library's base model, else "
                      "the embedded SmolLM2-135M-Instruct)")


def print_json(obj) -> None:
    """A JSON object as the last line of a command's output."""
    print(json.dumps(obj, ensure_ascii=False, default=float))


def add_base_arguments(parser) -> None:
    """--base-threshold / --no-base-fallback: the operator's control of the router's base-model decision."""
    parser.add_argument("--base-threshold", type=float, default=None, metavar="T",
                        help="send a prompt to the base model when the router's out-of-library score is over T "
                             "(default: the threshold calibrated in plugin.json; see docs/plugin.md)")
    parser.add_argument("--no-base-fallback", action="store_true",
                        help="never send a prompt to the base model because it looks foreign to every adapter "
                             "(the same as --base-threshold inf; --floor still applies)")


def base_threshold_from_args(args) -> float | None:
    """The base threshold of --base-threshold / --no-base-fallback (None: the plugin's calibrated one)."""
    return base_threshold_of(getattr(args, "base_threshold", None), getattr(args, "no_base_fallback", False))


def add_routing_arguments(parser) -> None:
    """The router's selection options, the same for `route`, `generate`, `chat` and `serve`."""
    parser.add_argument("--p", type=float, default=DEFAULT_P, help=f"top-p threshold in (0, 1] (default {DEFAULT_P})")
    parser.add_argument("--top-k", type=int, default=None, help="keep at most K adapters (default: no limit)")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="softmax",
                        help="kept probabilities -> weights: softmax (paper eq. 5, default) or renorm")
    parser.add_argument("--floor", type=float, default=0.0,
                        help="route to the base model when the best probability is below this (default 0: off)")
    add_base_arguments(parser)


def add_precision_arguments(parser, dtype_default: str = "auto", quantize: bool = True,
                            quantize_default: str = "auto", compile: bool = True) -> None:
    """--dtype and --device (see dlplora.device), and --quantize (dlplora.quantize) and --compile, for the commands
    that load the model to generate."""
    from ..config import QUANTIZE
    from ..device import DEVICES, DTYPES

    if quantize:
        parser.add_argument("--quantize", choices=QUANTIZE, default=quantize_default,
                            help="quantised weights for the base model's linear layers, adapters in float (CPU): "
                                 "int8 (per-channel weights, per-token activations, fp32), int4 (weight-only, groups of 32, bf16 "
                                 "activations), none, or auto = int8 on an x86 CPU with AVX2 (the fastest or within "
                                 "10%% of it at batch 1, for batches of distinct mixes and in prefill, on AVX2-only "
                                 "and bf16-native CPUs alike; BENCHMARKS.md), none on CUDA or when --dtype names a "
                                 f"precision (default {quantize_default})")
    if compile:
        parser.add_argument("--compile", action="store_true",
                            help="torch.compile the decode step: the first token waits for the compile, several "
                                 "minutes on a CPU (289 s measured for a 16-token `generate --quantize int4 --compile` "
                                 "on 2 cores), announced on stderr; it pays off over long generations or a server's "
                                 "lifetime only (`dlp-lora bench decode --compile` measures the gain here)")
    parser.add_argument("--dtype", choices=DTYPES, default=dtype_default,
                        help="weights and activations: auto = bf16 on CUDA or on a CPU with native bf16 "
                             f"(avx512_bf16 / amx_bf16), else float32 (default {dtype_default})")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto = CUDA when torch sees a GPU, else the CPU (default auto)")


def routing_from_args(args) -> RoutingConfig:
    """The RoutingConfig of the routing options (and --mode, --route-window where the command has them)."""
    return RoutingConfig(p=args.p, top_k=args.top_k, weighting=args.weighting, floor=args.floor,
                         mode=getattr(args, "mode", "auto"), window=getattr(args, "route_window", 0) or 0,
                         base_threshold=base_threshold_from_args(args))


def parse_top_layers(value: str) -> int | None:
    """--top-layers: a positive integer, or 'all' (None)."""
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise DLPLoRAError(f"--top-layers must be a positive integer or 'all', got {value!r}") from None


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, without the value of --note (a paragraph that belongs in the report, not here)."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--note":
            kept.append("--note '...'")
            skip = True
            continue
        if a.startswith("--note="):
            kept.append("--note '...'")
            continue
        kept.append(shlex.quote(a))
    return "dlp-lora " + " ".join(kept)
