"""The router network's forward pass in NumPy, for routing without importing torch.

A saved plugin with the default ``hashed`` encoder is loaded into :class:`NumpyRouterNet` (its weights read with
``safetensors.numpy``), so ``dlp-lora route`` and :meth:`Plugin.route` answer without the 1.5-2 s that importing
torch costs on a small machine. It computes what :func:`.model.build_net`'s ``RouterNet`` computes in eval mode:

    EmbeddingBag(mean) per segment -> the slots' segments side by side -> LayerNorm
    -> [Linear -> GELU (exact, erf) -> LayerNorm] x len(hidden) -> Linear       (dropout is off at inference)

and the base detector's squared Mahalanobis distance to the nearest adapter's mean. Probabilities agree with
torch's to float32 rounding (tests/test_plugin_numpy.py). Training, and the ``backbone`` / ``hybrid`` encoders,
use the torch network (:attr:`Plugin.net` builds it from the same arrays on first use).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import DLPLoRAError

BUFFERS = ("ood_means", "ood_precision")  # the detector's statistics: state, not parameters
_EPS = 1e-5  # torch.nn.LayerNorm's default


class WeightsError(DLPLoRAError):
    """A state dict that is not this network's (missing, unexpected or misshapen tensors)."""


def erf(x: np.ndarray) -> np.ndarray:
    """The error function to float32 precision (max abs error ~1e-7): Abramowitz & Stegun 7.1.26, in float64.
    NumPy has no erf, and SciPy is not a dependency."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x) * (1.0 - poly * np.exp(-z * z))).astype(np.float32)


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / np.float32(np.sqrt(2.0))))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + np.float32(_EPS)) * weight + bias


def expected_shapes(hidden: Sequence[int], n_in: int, n_out: int, emb: tuple[int, int] | None,
                    detector_classes: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the saved state dict and its shape, as ``RouterNet.state_dict()`` names them."""
    shapes: dict[str, tuple[int, ...]] = {}
    if emb is not None:
        shapes["emb.weight"] = tuple(emb)
    shapes |= {"norm.weight": (n_in,), "norm.bias": (n_in,)}
    d = n_in
    for i, h in enumerate(hidden):
        shapes |= {f"mlp.{4 * i}.weight": (h, d), f"mlp.{4 * i}.bias": (h,),
                   f"mlp.{4 * i + 2}.weight": (h,), f"mlp.{4 * i + 2}.bias": (h,)}
        d = h
    shapes |= {f"mlp.{4 * len(hidden)}.weight": (n_out, d), f"mlp.{4 * len(hidden)}.bias": (n_out,)}
    if detector_classes:
        shapes |= {"ood_means": (detector_classes, d), "ood_precision": (d, d)}
    return shapes


class NumpyRouterNet:
    """The eval-mode router network of a ``hashed`` plugin over NumPy arrays (see the module's docstring)."""

    def __init__(self, state: dict[str, np.ndarray], hidden: Sequence[int], n_out: int, n_slots: int,
                 detector_classes: int = 0):
        if "emb.weight" not in state:
            raise WeightsError("no embedding table (emb.weight) in the state")
        emb = state["emb.weight"]
        want = expected_shapes(hidden, emb.shape[1] * n_slots, n_out, emb.shape, detector_classes)
        missing = [k for k in want if k not in state]
        extra = [k for k in state if k not in want]
        wrong = [f"{k} {tuple(state[k].shape)} (expected {want[k]})" for k in want
                 if k in state and tuple(state[k].shape) != want[k]]
        if missing or extra or wrong:
            raise WeightsError("; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                                     f"unexpected {', '.join(extra)}" if extra else "",
                                                     f"shapes {', '.join(wrong)}" if wrong else "") if x))
        self.state = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
        self.hidden = list(hidden)

    @property
    def n_params(self) -> int:
        return sum(v.size for k, v in self.state.items() if k not in BUFFERS)

    def _embed(self, ids: np.ndarray, offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """EmbeddingBag(mode="mean") over segments laid out contiguously in `ids`; an empty segment gives zeros."""
        table = self.state["emb.weight"]
        out = np.zeros((len(counts), table.shape[1]), dtype=np.float32)
        full = counts > 0
        if full.any():
            sums = np.add.reduceat(table[ids], offsets[full], axis=0)
            out[full] = sums / counts[full, None].astype(np.float32)
        return out

    def features(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """(logits, penultimate features) of a :class:`.features.Features` batch."""
        s = self.state
        seg = self._embed(batch.ids, batch.offsets, batch.counts)
        x = layer_norm(seg[batch.slots].reshape(len(batch.slots), -1), s["norm.weight"], s["norm.bias"])
        for i in range(len(self.hidden)):
            x = x @ s[f"mlp.{4 * i}.weight"].T + s[f"mlp.{4 * i}.bias"]
            x = layer_norm(gelu(x), s[f"mlp.{4 * i + 2}.weight"], s[f"mlp.{4 * i + 2}.bias"])
        last = 4 * len(self.hidden)
        return x @ s[f"mlp.{last}.weight"].T + s[f"mlp.{last}.bias"], x

    def distance(self, h: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each feature row to the nearest adapter's mean."""
        d = h[:, None, :] - self.state["ood_means"][None]  # [n, k, d]
        q = np.einsum("nkd,nkd->nk", d @ self.state["ood_precision"], d)  # the product through BLAS
        return q.min(axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
