"""The router network and the checks on what it is given (adapter names, prompts)."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from ..errors import DLPLoRAError

FORMAT = 2
FORMATS = (1, 2)  # format 1: hashed head/tail plugins without the "none of these" class


def build_net(encoder, hidden: Sequence[int], n_out: int, dropout: float, emb_weight=None, detector_classes: int = 0):
    """Encoder module (a trained embedding table, or nothing for frozen features) + LayerNorm + MLP.
    With `detector_classes` > 0 the net also holds the base-model detector's statistics (buffers): the
    mean penultimate feature of each adapter's prompts and the inverse of their pooled covariance."""
    import torch
    from torch import nn

    class RouterNet(nn.Module):
        def __init__(self):
            super().__init__()
            emb = encoder.module(emb_weight)
            if emb is not None:
                self.emb = emb
            self.norm = nn.LayerNorm(encoder.out_dim)
            layers: list[nn.Module] = []
            d = encoder.out_dim
            for h in hidden:
                layers += [nn.Linear(d, h), nn.GELU(), nn.LayerNorm(h), nn.Dropout(dropout)]
                d = h
            layers.append(nn.Linear(d, n_out))
            self.mlp = nn.Sequential(*layers)
            if detector_classes:
                self.register_buffer("ood_means", torch.zeros(detector_classes, d))
                self.register_buffer("ood_precision", torch.zeros(d, d))

        def features(self, batch):
            """(logits, penultimate features) of a batch."""
            h = self.mlp[:-1](self.norm(encoder.forward(getattr(self, "emb", None), batch)))
            return self.mlp[-1](h), h

        def forward(self, batch):
            return self.features(batch)[0]

        def distance(self, h):
            """Mahalanobis distance of each feature row to the nearest adapter's mean (squared)."""
            d = h[:, None, :] - self.ood_means[None]
            return torch.einsum("nkd,de,nke->nk", d, self.ood_precision, d).min(dim=1).values

    return RouterNet()


def score_features(dist: np.ndarray, full: np.ndarray, none_class: bool) -> np.ndarray:
    """What the logistic base score reads per prompt: log(1 + distance), log p("none of these") (with that class),
    log of the best adapter's probability."""
    cols = [np.log1p(np.maximum(dist, 0.0))]
    if none_class:
        cols.append(np.log(full[:, -1] + 1e-6))
        full = full[:, :-1]
    cols.append(np.log(full.max(axis=1) + 1e-6))
    return np.stack(cols, axis=1).astype(np.float64)


def foreign_score(params: dict, dist: np.ndarray, full: np.ndarray, none_class: bool) -> np.ndarray:
    """The logistic base score: sigmoid(w . standardised :func:`score_features` + b), fitted to tell held-back
    in-library prompts (in every view) from prompts of held-out background tasks (:mod:`.train`)."""
    x = (score_features(dist, full, none_class) - np.asarray(params["mean"])) / np.asarray(params["std"])
    return 1.0 / (1.0 + np.exp(-(x @ np.asarray(params["weights"]) + float(params["bias"]))))


def check_labels(label_names: Sequence[str]) -> list[str]:
    names = [str(n) for n in label_names] if label_names is not None else []
    if not names:
        raise DLPLoRAError("the plugin needs adapter names to route to, got none (is the library empty? "
                           "add adapters with `dlp-lora train-loras` first)")
    if any(not n.strip() for n in names):
        raise DLPLoRAError("adapter names must be non-empty")
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise DLPLoRAError(f"duplicate adapter names: {', '.join(dup)}; each adapter needs a unique name")
    if len(names) < 2:
        raise DLPLoRAError(f"a router needs at least 2 adapters to choose between, got only {names[0]!r} "
                           "(with one adapter, apply it directly)")
    return names


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    for i, t in enumerate(texts, 1):  # counted from 1, as `generate` counts them
        if not isinstance(t, str):
            raise DLPLoRAError(f"prompt {i} is not a string ({type(t).__name__})")
        if not t.strip():
            raise DLPLoRAError(f"prompt {i} is empty; give the router some text to route")
    return texts
