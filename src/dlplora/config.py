"""Shared constants and the routing configuration.

Everything that more than one layer checks lives here once: the fusion weightings, the fusion modes,
the default top-p and the range checks of the router's selection arguments. :class:`RoutingConfig`
bundles how the engine routes a prompt (the plugin's selection arguments, the fusion mode and the
chat routing window); the engine, the CLI and the server build one instead of passing six keywords.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from .errors import DLPLoRAError

DEFAULT_P = 0.6
WEIGHTINGS = ("softmax", "renorm")  # kept probabilities -> fusion weights: softmax (paper eq. 5) or renormalised
FUSION_MODES = ("auto", "unmerged", "shared", "merged")  # see dlplora.fusion
QUANTIZE = ("auto", "none", "int8", "int4")  # --quantize, see dlplora.quantize (auto: dlplora.device)
# the scheme behind each name, for cache keys (eval): a new scheme under the same name computes other numbers
QUANTIZE_SCHEMES = {"int8": "int8-per-channel-per-token", "int4": "int4-g32"}
DEFAULT_MAX_NEW_TOKENS = 128
# Joins earlier user turns and the current one in the text the router reads (DLPLoRA.routing_text); the
# plugin's featuriser splits on it to tell the current turn from its context. The record separator is
# not typed by users, and it is whitespace to str.split(), so it never becomes part of an n-gram.
TURN_SEPARATOR = "\n\x1e\n"


def check_p(p, what: str = "top-p threshold p") -> float:
    """p must be a number in (0, 1]; returns it as a float."""
    if p is None or isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0:
        shown = f"{p:g}" if isinstance(p, (int, float)) and not isinstance(p, bool) else repr(p)
        raise DLPLoRAError(f"{what} must be a number in (0, 1], got {shown}")
    return float(p)


def check_selection_args(p: float | None, top_k: int | None, weighting: str, floor: float) -> None:
    """The router's selection arguments: top-p in (0, 1] (unless top_k replaces it), top_k >= 1, a known
    weighting and a confidence floor in [0, 1]."""
    if top_k is None:
        check_p(p)
    elif isinstance(top_k, bool) or not hasattr(top_k, "__index__") or top_k < 1:
        raise DLPLoRAError(f"top-k must be an integer >= 1, got {top_k!r}")
    if weighting not in WEIGHTINGS:
        raise DLPLoRAError(f"unknown weighting {weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not (0.0 <= float(floor) <= 1.0):
        raise DLPLoRAError(f"confidence floor must be a number in [0, 1], got {floor!r}")


def check_base_threshold(thr) -> float | None:
    """The base-model threshold of the router: None (the plugin's calibrated one), or a number >= 0 (math.inf: the
    detector never sends a prompt to the base model)."""
    if thr is None:
        return None
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not thr >= 0:
        raise DLPLoRAError(f"base threshold must be a number >= 0 (inf turns the base-model fallback off), got {thr!r}")
    return float(thr)


def parse_base_cost(value: str | None) -> tuple[float, float, float] | None:
    """--base-cost MISS,FOREIGN[,SHARE]: the points an in-library prompt loses on the base model, those a foreign prompt
    loses on an adapter, and the share of foreign prompts (default 0.5) -> (miss, foreign, share), checked."""
    if value is None:
        return None
    parts = [p.strip() for p in str(value).split(",")]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (2, 3) or not all(math.isfinite(x) and x >= 0 for x in nums):
        raise DLPLoRAError(f"--base-cost takes MISS,FOREIGN[,SHARE] (numbers >= 0, e.g. 8.9,1.0 or 8.9,1.0,0.3), "
                           f"got {value!r}")
    miss, foreign, share = (nums + [0.5])[:3]
    if not 0 < share < 1:
        raise DLPLoRAError(f"--base-cost: the share of foreign prompts must lie in (0, 1), got {share:g}")
    if miss == 0 and foreign == 0:
        raise DLPLoRAError("--base-cost: both costs are 0, so every threshold is as good; give at least one > 0")
    return miss, foreign, share


def base_threshold_of(threshold, off: bool = False) -> float | None:
    """The base threshold of the flags --base-threshold T / --no-base-fallback (`off`): inf when off, else T
    checked (None: the plugin's calibrated one)."""
    if off:
        if threshold is not None:
            raise DLPLoRAError("give --base-threshold or --no-base-fallback, not both")
        return math.inf
    return check_base_threshold(threshold)


def check_mode(mode: str) -> str:
    if mode not in FUSION_MODES:
        raise DLPLoRAError(f"unknown fusion mode {mode!r}; choose one of {', '.join(FUSION_MODES)}")
    return mode


@dataclass(frozen=True)
class RoutingConfig:
    """How the engine picks and applies adapters for a prompt (see ``dlp-lora generate --help``)."""

    p: float = field(default=DEFAULT_P, metadata={"help": "top-p threshold in (0, 1]"})
    top_k: int | None = field(default=None, metadata={"help": "keep at most K adapters (replaces p)"})
    weighting: str = field(default="softmax", metadata={"help": "kept probabilities -> weights: softmax or renorm"})
    floor: float = field(default=0.0, metadata={"help": "route to the base model below this best probability"})
    mode: str = field(default="auto", metadata={"help": "fusion mode: auto, unmerged, shared or merged"})
    window: int = field(default=0, metadata={"help": "earlier user turns the router reads with a chat turn"})
    base_threshold: float | None = field(default=None, metadata={
        "help": "the router's base-model threshold (None: the plugin's calibrated one; inf: never the base model)"})

    def __post_init__(self):
        self.check()

    def check(self) -> "RoutingConfig":
        check_selection_args(self.p, self.top_k, self.weighting, self.floor)
        check_mode(self.mode)
        check_base_threshold(self.base_threshold)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise DLPLoRAError(f"the routing window must be an integer >= 0, got {self.window!r}")
        return self

    def replace(self, **changes) -> "RoutingConfig":
        """A copy with some fields changed; an unknown field name is an error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"RoutingConfig has no field(s) {', '.join(unknown)}")
        return replace(self, **changes)

    def selection(self) -> dict:
        """The keyword arguments of the router's ``route`` (p, top_k, weighting, floor; base_threshold when set)."""
        out = {"p": self.p, "top_k": self.top_k, "weighting": self.weighting, "floor": self.floor}
        return out if self.base_threshold is None else out | {"base_threshold": self.base_threshold}

    def to_dict(self) -> dict:
        return asdict(self)
