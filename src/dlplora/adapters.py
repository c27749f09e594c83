"""The one reader of PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``).

- :func:`read_adapter_config`: the config, checked (a LoRA, a positive rank, a finite alpha, no DoRA /
  fan_in_fan_out, no ``modules_to_save``, trained biases or trainable tokens), with PEFT's ``rank_pattern`` /
  ``alpha_pattern`` rule (:func:`pattern_value`);
- :func:`lora_pairs`: the weight file's keys grouped into (lora_A, lora_B) per module; any other tensor (a full
  copy of ``lm_head`` or ``embed_tokens``, a bias) is refused: the fused engine applies only the low-rank
  deltas, so skipping it would change the adapter's outputs;
- :func:`load_peft_adapter`: an adapter as plain tensors, for the fused layers (:mod:`dlplora.fusion`);
- :func:`validate_adapter`: an adapter checked against a base model's layers without loading its
  weights (``dlp-lora library add``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .errors import DLPLoRAError

log = logging.getLogger("dlplora.library")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_META = "dlp_adapter.json"  # what dlp-lora records beside an adapter it trained (task, base model, config)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def pattern_value(patterns: Mapping[str, float] | None, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key is a regex matched at the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class AdapterConfig:
    """The parts of a PEFT LoRA config that fusion and validation use."""

    path: Path
    where: str  # how messages name the adapter
    rank: int
    alpha: float
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)  # the whole adapter_config.json

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    def rank_for(self, module: str) -> int:
        return int(pattern_value(self.rank_pattern, module, self.rank))

    def scale_for(self, module: str, rank: int) -> float:
        """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        alpha = float(pattern_value(self.alpha_pattern, module, self.alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def read_adapter_config(path: str | os.PathLike, name: str | None = None) -> AdapterConfig:
    """Read and check ``adapter_config.json`` of a PEFT LoRA directory; errors name the adapter (`name`) or path."""
    path = Path(path)
    where = f"adapter {name!r}" if name else str(path)
    if not path.is_dir():
        raise DLPLoRAError(f"{where + ': ' if name else ''}{path}: no such adapter directory")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise DLPLoRAError(f"{where}: {cfg_path} is missing, so {path} is not a PEFT adapter directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DLPLoRAError(f"{where}: {cfg_path} is corrupt: {exc}") from exc
    if not isinstance(cfg, dict):
        raise DLPLoRAError(f"{where}: {cfg_path} is not a JSON object")
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise DLPLoRAError(f"{where}: peft_type {ptype} is not supported (only LoRA adapters can be fused)")
    if cfg.get("use_dora"):
        raise DLPLoRAError(f"{where}: DoRA adapters are not supported by the fused engine")
    if cfg.get("fan_in_fan_out"):
        raise DLPLoRAError(f"{where}: fan_in_fan_out adapters (Conv1D models) are not supported")
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise DLPLoRAError(f"{where}: rank r={_short(r)} in {CONFIG_FILE}; it must be a positive integer")
    alpha = cfg.get("lora_alpha", r)
    if not _finite(alpha):
        raise DLPLoRAError(f"{where}: lora_alpha={_short(alpha)} in {CONFIG_FILE}; it must be a finite number")
    if cfg.get("modules_to_save"):
        raise DLPLoRAError(f"{where}: {CONFIG_FILE} has modules_to_save={_short(cfg['modules_to_save'])}: the adapter "
                           f"carries full copies of those modules, which the fused engine cannot apply (only LoRA "
                           f"deltas are fused), so its outputs would differ from PEFT's; retrain without "
                           f"modules_to_save")
    if cfg.get("bias") not in (None, "none"):
        raise DLPLoRAError(f"{where}: bias={_short(cfg['bias'])} in {CONFIG_FILE}: the adapter trains the base layers' "
                           f"biases, which the fused engine does not apply; only bias='none' adapters are supported")
    if cfg.get("trainable_token_indices"):
        raise DLPLoRAError(f"{where}: trainable_token_indices in {CONFIG_FILE}: trained token embeddings are not "
                           f"supported by the fused engine")
    if cfg.get("use_rslora") not in (None, True, False):
        raise DLPLoRAError(f"{where}: use_rslora={_short(cfg['use_rslora'])} in {CONFIG_FILE}; it must be true or "
                           f"false")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict):
            raise DLPLoRAError(f"{where}: {key} in {CONFIG_FILE} must be an object {{module regex: value}}")
        for k, v in pat.items():
            try:
                re.compile(rf"(.*\.)?({k})$")  # as pattern_value uses it
            except re.error as exc:
                raise DLPLoRAError(f"{where}: {key} key {_short(k)} in {CONFIG_FILE} is not a valid regex: "
                                   f"{exc}") from None
            ok = (isinstance(v, int) and not isinstance(v, bool) and v > 0) if key == "rank_pattern" else _finite(v)
            if not ok:
                raise DLPLoRAError(f"{where}: {key}[{_short(k)}] = {_short(v)} in {CONFIG_FILE}; it must be a "
                                   f"{'positive integer' if key == 'rank_pattern' else 'finite number'}")
        patterns[key] = pat
    if not (path / WEIGHTS_FILE).is_file():
        raise DLPLoRAError(f"{where}: {path / WEIGHTS_FILE} is missing (save adapters with safe_serialization)")
    return AdapterConfig(path=path, where=where, rank=r, alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora")),
                         rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"], raw=cfg)


def _short(v, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def lora_pairs(items: Mapping[str, object], where: str) -> dict[str, dict[str, object]]:
    """Weight-file entries (key -> tensor or shape) grouped per module: {module: {"A": ..., "B": ...}}."""
    pairs: dict[str, dict[str, object]] = {}
    others = []
    for key, value in items.items():
        m = _KEY.match(key)
        if m is None:
            if "lora_embedding" in key or "magnitude" in key:
                raise DLPLoRAError(f"{where}: tensor {key} (embedding LoRA / DoRA) is not supported")
            others.append(key)
            continue
        ab = pairs.setdefault(m["module"], {})
        if m["ab"] in ab:
            raise DLPLoRAError(f"{where}: the weights hold two lora_{m['ab']} tensors for layer {m['module']} "
                               f"(several adapters in one file?)")
        ab[m["ab"]] = value
    if others:
        full = [k for k in others if "modules_to_save" in k or re.search(r"(lm_head|embed_tokens|wte|embed_out)", k)]
        what = ("full copies of modules (modules_to_save, e.g. lm_head / embed_tokens)" if full else
                "tensors that are not LoRA factors (lora_A / lora_B)")
        raise DLPLoRAError(f"{where}: the weights hold {len(others)} {what}: {', '.join(sorted(others)[:3])}"
                           f"{', ...' if len(others) > 3 else ''}; the fused engine applies only the low-rank deltas, "
                           f"so this adapter's outputs would differ from PEFT's. Save an adapter of LoRA layers only")
    if not pairs:
        raise DLPLoRAError(f"{where}: the weights hold no lora_A/lora_B tensors")
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise DLPLoRAError(f"{where}: layer {module} has only lora_{''.join(ab)} (file incomplete?)")
    return dict(sorted(pairs.items()))


def _read_weights(cfg: AdapterConfig, shapes_only: bool) -> dict:
    import torch
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(cfg.weights_file), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                if shapes_only:
                    out[k] = tuple(fh.get_slice(k).get_shape())
                    continue
                t = fh.get_tensor(k)
                if not t.is_floating_point():
                    raise DLPLoRAError(f"{cfg.where}: tensor {k} in {cfg.weights_file} is {t.dtype}, not floating "
                                       f"point")
                if not bool(torch.isfinite(t).all()):
                    raise DLPLoRAError(f"{cfg.where}: tensor {k} in {cfg.weights_file} holds NaN or infinite values")
                out[k] = t
    except DLPLoRAError:
        raise
    except Exception as exc:  # truncated or garbage file
        raise DLPLoRAError(f"{cfg.where}: could not read {cfg.weights_file}: it is unreadable or corrupt "
                           f"({type(exc).__name__}: {exc})") from exc
    return out


# ---------------------------------------------------------------- for fusion: the weights

@dataclass
class AdapterWeights:
    """One PEFT LoRA adapter as plain tensors: ``layers[module] = (A [r, in], B [out, r], scale)``."""

    name: str
    path: str
    rank: int
    alpha: float
    use_rslora: bool
    targets: list[str]
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)


def load_peft_adapter(path: str | os.PathLike, name: str | None = None) -> AdapterWeights:
    """Read a PEFT LoRA directory into an :class:`AdapterWeights` (CPU, fp32)."""
    path = Path(path)
    name = name or path.name
    cfg = read_adapter_config(path, name)
    layers = {}
    for module, ab in lora_pairs(_read_weights(cfg, shapes_only=False), cfg.where).items():
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise DLPLoRAError(f"{cfg.where}: layer {module}: lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)} do not form a low-rank pair")
        layers[module] = (a.float(), b.float(), cfg.scale_for(module, a.shape[0]))
    targets = sorted({m.rsplit(".", 1)[-1] for m in layers})
    return AdapterWeights(name=name, path=str(path), rank=cfg.rank, alpha=cfg.alpha, use_rslora=cfg.use_rslora,
                          targets=targets, layers=layers)


# ---------------------------------------------------------------- for the library: validation against a base model

@contextlib.contextmanager
def peft_wrapping():
    """Around building a PEFT model: PEFT (0.21, the newest) reads ``model.is_gradient_checkpointing``, which
    transformers 5 deprecates with a FutureWarning on every training and test run; that one warning, from that one
    call, is not the user's to act on. Every other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _same_model(named: str, base: dict, model=None) -> bool:
    """Whether an adapter config's base_model_name_or_path names the library's base (`base`, `model` its directory):
    the same directory, or the same last path component (hub id or directory name), case aside."""
    paths = [p for p in (base.get("path"), model) if p]
    if Path(named).exists() and any(Path(p).exists() and Path(named).resolve() == Path(p).resolve() for p in paths):
        return True
    tail = named.rstrip("/").rsplit("/", 1)[-1].lower()
    return tail in {str(x).rstrip("/").rsplit("/", 1)[-1].lower() for x in [base.get("name"), *paths] if x}


def validate_adapter(path: str | os.PathLike, model=None, base: dict | None = None) -> dict:
    """Check that a PEFT LoRA fits the base model `model` (a path or hub id; None = the embedded one): same base
    (when recorded), targets present, A [r, in] and B [out, r] shapes that match the model's layers and the
    configured rank. Returns the manifest fields {rank, alpha, targets, use_rslora}."""
    import torch
    from transformers import AutoModelForCausalLM

    from .backbone import load_config

    path = Path(path)
    cfg = read_adapter_config(path)
    meta = path / ADAPTER_META
    if base and meta.is_file():
        try:
            theirs = json.loads(meta.read_text())
        except (ValueError, RecursionError) as exc:
            raise DLPLoRAError(f"{path}: {meta.name} is corrupt: {exc}") from None
        theirs = theirs.get("base_model") if isinstance(theirs, dict) else None
        theirs = theirs if isinstance(theirs, dict) else {}
        if theirs.get("fingerprint") and base.get("fingerprint") and theirs["fingerprint"] != base["fingerprint"]:
            raise DLPLoRAError(f"{path} was trained on base model {theirs.get('name')} ({theirs['fingerprint']}), "
                               f"but the library's base is {base.get('name')} ({base['fingerprint']})")
    # the whole tensors, not only the shapes: a NaN or a damaged tensor is refused here rather than at serving
    pairs = lora_pairs({k: tuple(t.shape) for k, t in _read_weights(cfg, shapes_only=False).items()}, cfg.where)
    config = load_config(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    modules = dict(net.named_modules())
    targets = set()
    for mod_name, ab in pairs.items():
        layer = modules.get(mod_name)
        if layer is None:
            raise DLPLoRAError(f"{path}: the adapter targets {mod_name}, which the base model {config.model_type} "
                               f"(hidden {config.hidden_size}, {config.num_hidden_layers} layers) does not have")
        if not isinstance(layer, torch.nn.Linear):
            raise DLPLoRAError(f"{path}: {mod_name} is not a linear layer")
        r = cfg.rank_for(mod_name)
        a_shape, b_shape = ab["A"], ab["B"]
        if a_shape != (r, layer.in_features) or b_shape != (layer.out_features, r):
            raise DLPLoRAError(f"{path}: shape mismatch at {mod_name}: A {list(a_shape)}, B {list(b_shape)}; the base "
                               f"layer is {layer.in_features}->{layer.out_features} and the rank is {r}, so A must be "
                               f"[{r}, {layer.in_features}] and B [{layer.out_features}, {r}]")
        targets.add(mod_name.rsplit(".", 1)[-1])
    named = cfg.raw.get("base_model_name_or_path")
    if base and named and not meta.is_file() and not _same_model(str(named), base, model):
        log.warning("warning: %s: its %s names base model %s, not the library's base %s; its shapes match, so it is "
                    "added, but it was probably trained on another model", path, CONFIG_FILE, named, base.get("name"))
    return {"rank": cfg.rank, "alpha": cfg.raw.get("lora_alpha", cfg.rank), "targets": sorted(targets),
            "use_rslora": cfg.use_rslora}
