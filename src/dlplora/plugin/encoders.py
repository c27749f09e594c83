"""Text encoders of the router: prompt texts -> the MLP's input vector.

Two kinds, chosen with ``train-plugin --encoder``:

- ``hashed`` (default): the plugin's own tokenizer (:mod:`.features`, hashed word and byte n-grams
  per segment) with a *trained* embedding table (``EmbeddingBag``, mean); the MLP reads the
  segments' embeddings side by side.
- ``backbone``: the backbone's BPE tokenizer and its *frozen* input embeddings, mean-pooled over the
  current turn's first 64, first 256 and last 64 tokens and the history's last 64 (zeros without
  history); only the MLP is trained. A pretrained text representation at no extra download, kept as
  an option for the comparison in docs/plugin.md.

An encoder turns texts into a *batch* (``encode``), slices a batch by rows (``take``), and maps a
batch to vectors inside the network (:class:`EncoderModule`).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ..config import TURN_SEPARATOR
from ..errors import DLPLoRAError
from .features import FEATURIZER, RETRAIN_HINT, Features, HashedNgramTokenizer

ENCODERS = ("hashed", "backbone", "hybrid")
BACKBONE_ENCODER = "backbone-embeddings-v1"
_WINDOWS = (("head", 0, 64), ("body", 0, 256), ("tail", -64, None))
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class HashedEncoder:
    kind = "hashed"

    def __init__(self, tokenizer: HashedNgramTokenizer, dim: int = 18):
        self.tokenizer = tokenizer
        self.dim = dim

    @property
    def out_dim(self) -> int:
        return self.dim * len(self.tokenizer.slots)

    def encode(self, texts: Sequence[str]) -> Features:
        return self.tokenizer.encode(texts)

    @staticmethod
    def take(batch: Features, rows: np.ndarray) -> Features:
        return batch.take(rows)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "tokenizer": self.tokenizer.to_dict()}

    def module(self, weight=None):
        from torch import nn

        return nn.EmbeddingBag(self.tokenizer.buckets, self.dim, mode="mean", _weight=weight)

    @staticmethod
    def forward(module, batch: Features):
        ids, offsets, slots = batch.tensors()
        seg = module(ids, offsets)
        return seg[slots].flatten(1)


class BackboneEncoder:
    """Frozen input embeddings of the backbone, mean-pooled over token windows (no training)."""

    kind = "backbone"

    def __init__(self, model: str | None = None):
        from ..backbone import load_tokenizer, resolve_model

        self.model = resolve_model(model)
        self.tok = load_tokenizer(self.model)
        self.table = _embedding_table(self.model)

    @property
    def out_dim(self) -> int:
        return self.table.shape[1] * (len(_WINDOWS) + 1)

    def _pool(self, ids: list[list[int]], a, b):
        import torch
        import torch.nn.functional as F

        parts = [x[a:b] for x in ids]
        flat = torch.tensor([t for p in parts for t in p], dtype=torch.long)
        offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(p) for p in parts])[:-1]]), dtype=torch.long)
        return F.embedding_bag(flat, self.table, offsets, mode="mean")  # an empty bag gives zeros

    def encode(self, texts: Sequence[str]):
        import torch

        texts = [_LONE_SURROGATE.sub("\ufffd", t) for t in texts]  # the BPE tokenizer cannot encode them
        turns = [t.rsplit(TURN_SEPARATOR, 1) if TURN_SEPARATOR in t else ["", t] for t in texts]
        plain = dict(add_special_tokens=False, split_special_tokens=True)  # a special token's string is text here
        cur = self.tok([c for _, c in turns], **plain)["input_ids"]
        hist = self.tok([h for h, _ in turns], **plain)["input_ids"]
        return torch.cat([self._pool(cur, a, b) for _, a, b in _WINDOWS] + [self._pool(hist, -64, None)], dim=1)

    @staticmethod
    def take(batch, rows: np.ndarray):
        import torch

        return batch[torch.from_numpy(np.asarray(rows))]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "featurizer": BACKBONE_ENCODER, "model": str(self.model),
                "windows": [list(w) for w in _WINDOWS]}

    def module(self, weight=None):
        return None

    @staticmethod
    def forward(module, batch):
        return batch


class HybridEncoder:
    """Both side by side: the hashed n-gram segments (trained table) and the backbone's frozen pooled embeddings;
    the MLP reads their concatenation. A batch is the pair (hashed Features, backbone tensor)."""

    kind = "hybrid"

    def __init__(self, hashed: HashedEncoder, backbone: BackboneEncoder):
        self.hashed, self.backbone = hashed, backbone
        self.tokenizer, self.dim = hashed.tokenizer, hashed.dim

    @property
    def out_dim(self) -> int:
        return self.hashed.out_dim + self.backbone.out_dim

    def encode(self, texts: Sequence[str]):
        return self.hashed.encode(texts), self.backbone.encode(texts)

    @staticmethod
    def take(batch, rows: np.ndarray):
        return HashedEncoder.take(batch[0], rows), BackboneEncoder.take(batch[1], rows)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "hashed": self.hashed.to_dict(), "backbone": self.backbone.to_dict()}

    def module(self, weight=None):
        return self.hashed.module(weight)

    @staticmethod
    def forward(module, batch):
        import torch

        return torch.cat([HashedEncoder.forward(module, batch[0]), batch[1]], dim=1)


def _embedding_table(model_dir: str):
    """The backbone's input embedding matrix (fp32, frozen), read from its safetensors files."""
    from pathlib import Path

    import torch
    from safetensors import safe_open

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith("embed_tokens.weight"):
                    return st.get_tensor(key).to(torch.float32)
    raise DLPLoRAError(f"no input embedding matrix (embed_tokens.weight) in the safetensors files of {model_dir}")


def make_encoder(kind: str, *, tokenizer: HashedNgramTokenizer | None = None, dim: int = 18, bits: int = 18,
                 body_bytes: int = 0, history_bytes: int = 256, model: str | None = None):
    if kind == "hashed":
        return HashedEncoder(tokenizer or HashedNgramTokenizer(bits=bits, body_bytes=body_bytes,
                                                               history_bytes=history_bytes), dim)
    if kind == "backbone":
        return BackboneEncoder(model)
    if kind == "hybrid":
        return HybridEncoder(make_encoder("hashed", tokenizer=tokenizer, dim=dim, bits=bits, body_bytes=body_bytes,
                                          history_bytes=history_bytes), BackboneEncoder(model))
    raise DLPLoRAError(f"unknown plugin encoder {kind!r}; choose one of: {', '.join(ENCODERS)}")


def encoder_from_config(cfg: dict):
    """The encoder of a saved plugin config (plugins of format 1 only have the hashed tokenizer)."""
    enc = cfg.get("encoder")
    if enc is None:  # format 1: hashed n-grams with head/tail segments
        return HashedEncoder(HashedNgramTokenizer.from_dict(cfg["tokenizer"]), int(cfg["model"]["dim"]))
    if enc.get("kind") == "hashed":
        return HashedEncoder(HashedNgramTokenizer.from_dict(enc["tokenizer"]), int(enc["dim"]))
    if enc.get("kind") == "backbone":
        return BackboneEncoder(enc.get("model"))
    if enc.get("kind") == "hybrid":
        return HybridEncoder(encoder_from_config({"encoder": enc["hashed"]}), BackboneEncoder(enc["backbone"].get("model")))
    raise DLPLoRAError(f"plugin encoder {enc.get('kind')!r} is not supported by this version "
                       f"(expects {' or '.join(ENCODERS)}, {FEATURIZER}); {RETRAIN_HINT}")
