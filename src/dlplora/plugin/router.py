"""The trained router: network, selection (paper eq. 4-5), persistence and batched routing.

    prompt --encoder--> vector --LayerNorm--> 4-layer MLP --> softmax over adapters (+ "none of these")
           --base check (p_none >= threshold, or best probability < floor) --> base model
           --top-p (or top-k) + weighting--> Routing(names, indices, weights, probs, base_reason)
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import DEFAULT_P, check_base_threshold, check_selection_args
from ..errors import DLPLoRAError
from ..paths import read_json
from .encoders import HashedEncoder, encoder_from_config
from .model import FORMAT, FORMATS, build_net, check_texts, foreign_score
from .numpy_net import NumpyRouterNet, WeightsError, softmax

CONFIG_FILE = "plugin.json"
# "mahalanobis": the score is the squared Mahalanobis distance to the nearest adapter's prompts; "mahalanobis+logistic":
# a logistic score in [0, 1] of that distance and the network's probabilities (:func:`foreign_score`)
DETECTORS = ("mahalanobis", "mahalanobis+logistic")
WEIGHTS_FILE = "model.safetensors"
RETRAIN_HINT = "retrain with `dlp-lora train-plugin --library LIB`"


log = logging.getLogger("dlplora.plugin")


def stale_note(directory, labels: Sequence[str], library: Sequence[str]) -> str:
    """The one warning for a router trained for another adapter set than the library's (every entry point loads it
    with ``partial=True``): it routes among the adapters it knows that the library holds; it cannot route to the
    others (served when a request names them); the adapters the library lost are never chosen."""
    known = [n for n in library if n in labels]
    new = [n for n in library if n not in labels]
    gone = [n for n in labels if n not in library]
    parts = [f"the router at {directory} was trained for another adapter set than the library's: it routes among "
             f"the {len(known)} of the library's {len(library)} adapters it knows ({', '.join(known)})"]
    if new:
        parts.append(f"it cannot route to {', '.join(new)} (served only when a request names them)")
    if gone:
        parts.append(f"it never chooses {', '.join(gone)} (no longer in the library)")
    return "; ".join(parts) + f"; {RETRAIN_HINT}"


def without(r: "Routing", hidden) -> "Routing":
    """`r` without the adapters in `hidden` (labels the router may not choose), the others' weights renormalised;
    none left: the base model, saying why."""
    keep = [i for i, n in enumerate(r.names) if n not in hidden]
    if len(keep) == len(r.names):
        return r
    if not keep:
        cut = ", ".join(n for n in r.names if n in hidden)
        return Routing([], [], [], [], f"the router chose {cut}, which it cannot route to", r.p_none)
    total = sum(r.weights[i] for i in keep)
    return Routing([r.names[i] for i in keep], [r.indices[i] for i in keep], [r.weights[i] / total for i in keep],
                   [r.probs[i] for i in keep], None, r.p_none)


# ---------------------------------------------------------------- selection (paper eq. 4-5)

@dataclass
class Routing:
    """The adapters chosen for one prompt: names/indices in descending probability, their fusion
    weights (summing to 1), and the router's probabilities for them. Empty = use the base model, and
    `base_reason` says why (the prompt looks like none of the adapters' tasks, or the best
    probability is under the floor). `p_none` is the "none of these" probability (None for a
    plugin trained without that class)."""

    names: list[str]
    indices: list[int]
    weights: list[float]
    probs: list[float]
    base_reason: str | None = None
    p_none: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __bool__(self) -> bool:
        return bool(self.indices)


def select(probs: Sequence[float], p: float | None = DEFAULT_P, top_k: int | None = None, weighting: str = "softmax",
           floor: float = 0.0) -> tuple[list[int], list[float], list[float]]:
    """Pick adapters from one probability vector -> (indices, weights, kept probabilities).

    top-p (default): sort descending and keep adapters until the cumulative probability reaches p
    (``>= p``, with a 1e-9 tolerance for float rounding); at least one is always kept and p = 1 keeps
    all. top-k (when `top_k` is given, it replaces p): the k most probable (all if k > N).
    Weights: "softmax" = softmax over the kept probabilities (paper eq. 5), "renorm" = kept
    probabilities divided by their sum. If the best probability is below `floor`, nothing is kept
    (route to the base model)."""
    check_selection_args(p, top_k, weighting, floor)
    pr = np.asarray(probs, dtype=np.float64)
    n = len(pr)
    if n == 0:
        return [], [], []
    order = np.argsort(-pr, kind="stable")
    if pr[order[0]] < floor:
        return [], [], []
    if top_k is not None:
        k = min(int(top_k), n)
    elif p >= 1.0:
        k = n
    else:
        cum = np.cumsum(pr[order])
        k = int(np.searchsorted(cum, p - 1e-9, side="left")) + 1
        k = max(1, min(k, n))
    kept = order[:k]
    kp = pr[kept]
    if weighting == "softmax":
        e = np.exp(kp - kp.max())
        w = e / e.sum()
    else:
        s = kp.sum()
        w = kp / s if s > 0 else np.full(k, 1.0 / k)
    return [int(i) for i in kept], [float(x) for x in w], [float(x) for x in kp]


# ---------------------------------------------------------------- the plugin

class Plugin:
    """A trained router. Build one with :meth:`train` (see :mod:`.train`) or :meth:`load`.

    The base-model detector (``config["base_detector"] == "mahalanobis"``): a prompt whose penultimate
    MLP features are farther than ``config["base_threshold"]`` (squared Mahalanobis distance, pooled
    covariance) from every adapter's mean goes to the base model; the threshold is calibrated on
    held-back in-library prompts (:mod:`.train`). With a "none of these" class (``config["none_class"]``,
    trained on prompts of other tasks) the network has one output more than there are adapters;
    :meth:`probs` gives the adapters' probabilities renormalised without it."""

    def __init__(self, net, labels: list[str], encoder, config: dict, fast=None):
        """`net`: the torch ``RouterNet`` (None: built from `fast`'s arrays on first use of :attr:`net`); `fast`:
        a :class:`.numpy_net.NumpyRouterNet` that routes without torch while the torch network is not built."""
        self._net = net
        self._fast = fast
        self.backend = "auto"  # "auto" | "numpy" | "torch": see _use_numpy
        self.labels = list(labels)
        self.encoder = encoder
        self.config = config

    def _use_numpy(self) -> bool:
        """Route in NumPy: a loaded hashed plugin whose torch network was never built, while torch is not imported
        (`backend` "auto"; "numpy" forces it where it can). Once a process holds torch anyway (the engine, the
        server), its network is as cheap to build and runs on torch's thread settings, which OpenBLAS's threads
        on a busy machine are not."""
        if self._fast is None or self._net is not None or self.backend == "torch":
            return False
        return self.backend == "numpy" or "torch" not in sys.modules

    @property
    def net(self):
        """The torch network (training, the detector's statistics, the non-hashed encoders). A plugin loaded with
        the hashed encoder routes in NumPy (:mod:`.numpy_net`) and builds this only when asked; from then on it
        routes with this network, so changes made to it are what routing sees."""
        if self._net is None:
            import torch

            state = {k: torch.from_numpy(v.copy()) for k, v in self._fast.state.items()}
            self._net = self._build_torch(self.encoder, self.config, self.labels, state)
        return self._net

    @net.setter
    def net(self, value):
        self._net = value

    @staticmethod
    def _shape(cfg: dict, labels) -> tuple[int, int]:
        """(the network's outputs: the adapters and "none of these" when it has that class, the detector's classes)."""
        n_out = len(labels) + (1 if cfg.get("none_class") else 0)
        return n_out, len(labels) if cfg.get("base_detector") in DETECTORS else 0

    @staticmethod
    def _build_torch(encoder, cfg: dict, labels, state):
        m = cfg["model"]
        n_out, detector = Plugin._shape(cfg, labels)
        net = build_net(encoder, m["hidden"], n_out, float(m.get("dropout", 0.0)), emb_weight=state.get("emb.weight"),
                        detector_classes=detector)
        net.load_state_dict(state, assign=True)
        net.eval()
        return net

    # ------------------------------------------------------------ facts
    @property
    def tokenizer(self):
        return getattr(self.encoder, "tokenizer", None)

    @property
    def params(self) -> int:
        if self._net is None:
            return self._fast.n_params
        return sum(p.numel() for p in self._net.parameters())

    @property
    def default_p(self) -> float:
        return float(self.config.get("default_p", DEFAULT_P))

    @property
    def none_class(self) -> bool:
        return bool(self.config.get("none_class"))

    @property
    def has_detector(self) -> bool:
        return self.config.get("base_detector") in DETECTORS

    @property
    def base_threshold(self) -> float | None:
        """The calibrated distance over which a prompt goes to the base model (None: no detector)."""
        return float(self.config["base_threshold"]) if self.has_detector else None

    @classmethod
    def train(cls, texts: Sequence[str], labels: Sequence, label_names: Sequence[str], **kw) -> "Plugin":
        """Train on (text, label) pairs; see :func:`dlplora.plugin.train.train_router`."""
        from .train import train_router

        return train_router(cls, texts, labels, label_names, **kw)

    # ------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from ..paths import atomic_write_text

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        tmp = d / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
        save_file(state, str(tmp), metadata={"format": str(self.config.get("format", FORMAT)),
                                             "encoder": self.encoder.kind})
        os.replace(tmp, d / WEIGHTS_FILE)
        atomic_write_text(d / CONFIG_FILE, json.dumps(self.config, indent=2, ensure_ascii=False))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, expected_labels: Sequence[str] | None = None,
             partial: bool = False) -> "Plugin":
        """Load a saved plugin; with `expected_labels` (the library's adapter names, in order),
        refuse a plugin trained for other adapters; with `partial`, only one that knows none of them, and warn once
        (:func:`stale_note`) when it knows others: the adapters it does not know are served pinned only, and its
        labels the library lost are never chosen (:func:`without`)."""
        d = Path(directory)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise DLPLoRAError(f"no plugin at {d} ({CONFIG_FILE} and {WEIGHTS_FILE} expected); "
                               f"train one with `dlp-lora train-plugin --library LIB` (or --data DIR --tasks ... --out {d})")
        cfg = read_json(cfg_path, RETRAIN_HINT)
        if not isinstance(cfg, dict) or cfg.get("format") not in FORMATS or "labels" not in cfg:
            raise DLPLoRAError(f"{cfg_path} is not a dlp-lora plugin config of format "
                               f"{' or '.join(map(str, FORMATS))}; {RETRAIN_HINT}")
        labels = list(cfg["labels"])
        if expected_labels is not None:
            expected = list(expected_labels)
            if partial and set(expected) != set(labels) and set(expected) & set(labels):
                log.warning("%s", stale_note(d, labels, expected))
            if expected != labels and not (partial and set(expected) & set(labels)):
                if sorted(expected) == sorted(labels):
                    why = "the same adapters in a different order"
                else:
                    extra = [n for n in expected if n not in labels]
                    gone = [n for n in labels if n not in expected]
                    why = "; ".join(x for x in (f"library adapters it does not know: {', '.join(extra)}" if extra else "",
                                                f"adapters no longer in the library: {', '.join(gone)}" if gone else "") if x)
                raise DLPLoRAError(f"the plugin at {d} was trained for {len(labels)} other adapters than the library's "
                                   f"{len(expected)} ({why}); {RETRAIN_HINT}")
        try:
            encoder = encoder_from_config(cfg)
            if isinstance(encoder, HashedEncoder):  # routes in NumPy: no torch import (numpy_net.py)
                from safetensors.numpy import load_file as load_arrays

                n_out, detector = cls._shape(cfg, labels)
                fast = NumpyRouterNet(load_arrays(str(w_path)), cfg["model"]["hidden"], n_out,
                                      len(encoder.tokenizer.slots), detector)
                return cls(None, labels, encoder, cfg, fast=fast)
            from safetensors.torch import load_file

            net = cls._build_torch(encoder, cfg, labels, load_file(str(w_path)))
        except DLPLoRAError as exc:
            if not isinstance(exc, WeightsError):
                raise
            raise DLPLoRAError(f"{w_path} does not hold this plugin's weights ({exc}); {RETRAIN_HINT}") from exc
        except Exception as exc:  # a truncated file, a foreign state dict
            raise DLPLoRAError(f"{w_path} does not hold this plugin's weights ({exc}); {RETRAIN_HINT}") from exc
        return cls(net, labels, encoder, cfg)

    # ------------------------------------------------------------ inference
    def full_probs(self, texts: Sequence[str] | str) -> np.ndarray:
        """The network's softmax, shape (len(texts), N adapters [+ 1 for "none of these", last])."""
        return self.scores(texts, distances=False)[0]

    def scores(self, texts: Sequence[str] | str, batch: int = 1024, distances: bool = True,
               raw: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(:meth:`full_probs`, the base detector's score per text -- with `raw`, the Mahalanobis distance it
        reads -- or None without a detector or with `distances` false)."""
        texts = check_texts(texts)
        n_out = len(self.labels) + (1 if self.none_class else 0)
        probs, dists = [np.zeros((0, n_out), dtype=np.float32)], [np.zeros(0, dtype=np.float32)]
        if self._use_numpy():
            for b in range(0, len(texts), batch):
                logits, h = self._fast.features(self.encoder.encode(texts[b: b + batch]))
                probs.append(softmax(logits))
                if distances and self.has_detector:
                    dists.append(self._fast.distance(h))
        else:
            import torch

            net = self.net  # built from the arrays on first use
            with torch.inference_mode():
                for b in range(0, len(texts), batch):
                    logits, h = net.features(self.encoder.encode(texts[b: b + batch]))
                    probs.append(torch.softmax(logits.float(), dim=-1).numpy())
                    if distances and self.has_detector:
                        dists.append(net.distance(h.float()).numpy())
        if not (distances and self.has_detector):
            return np.concatenate(probs), None
        full, dist = np.concatenate(probs), np.concatenate(dists)
        return full, (dist if raw else self._score(full, dist))

    def _score(self, full: np.ndarray, dist: np.ndarray) -> np.ndarray:
        """The base decision's score from the probabilities and the Mahalanobis distances."""
        if self.config.get("base_detector") == "mahalanobis":
            return dist
        return foreign_score(self.config["base_score"], dist, full, self.none_class)

    @staticmethod
    def _split(full: np.ndarray, none_class: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if not none_class:
            return full, None
        adapters = full[:, :-1]
        return adapters / np.maximum(adapters.sum(axis=1, keepdims=True), 1e-12), full[:, -1]

    def probs(self, texts: Sequence[str] | str) -> np.ndarray:
        """Adapter probabilities, shape (len(texts), len(labels)), rows in the order of `labels` (summing
        to 1 over the adapters; the none class, if any, is left out: see :meth:`full_probs`)."""
        return self._split(self.full_probs(texts), self.none_class)[0]

    def _threshold(self, base_threshold: float | None) -> float | None:
        """The detector threshold in force: the calibrated one unless overridden (None: no detector)."""
        check_base_threshold(base_threshold)
        return self.base_threshold if base_threshold is None else float(base_threshold)

    def base_decision(self, base_threshold: float | None = None) -> dict:
        """The base-model decision with `base_threshold` (None: the calibrated one), for /v1/models and reports:
        `base_threshold` in force (None: no prompt goes to base for looking foreign), `calibrated`, `base_fallback`,
        `set_by` ("plugin" or "operator") and the `detector`."""
        thr = self.threshold_in_use(base_threshold)
        cal = self.threshold_in_use()
        return {"base_threshold": thr, "calibrated": cal, "base_fallback": thr is not None,
                "set_by": "plugin" if base_threshold is None else "operator",
                "detector": self.config.get("base_detector")}

    def threshold_in_use(self, base_threshold: float | None = None) -> float | None:
        """The threshold :meth:`route` applies with `base_threshold` (None: the calibrated one), for reports:
        None when no prompt can go to the base model for looking foreign (no detector, or the check is off)."""
        thr = self._threshold(base_threshold)
        return thr if thr is not None and math.isfinite(thr) else None

    @staticmethod
    def _far(dist: np.ndarray | None, thr: float | None, n: int) -> np.ndarray:
        """Per text: is it farther than `thr` from every adapter (all False without a detector)."""
        return np.zeros(n, dtype=bool) if dist is None or thr is None else dist > thr

    def route(self, texts: Sequence[str] | str, p: float | None = None, top_k: int | None = None,
              weighting: str = "softmax", floor: float = 0.0, base_threshold: float | None = None) -> list[Routing]:
        """Batched routing: one :class:`Routing` per prompt (see :func:`select`). A prompt goes to the
        base model (empty routing, with `base_reason`) when the detector finds it farther than
        `base_threshold` (default: the calibrated one in plugin.json; ``math.inf`` turns the check off)
        from every adapter's prompts, or when the best adapter's probability is under `floor`."""
        if p is None:
            p = self.default_p
        check_selection_args(p, top_k, weighting, floor)
        thr = self._threshold(base_threshold)
        which = "calibrated" if base_threshold is None else "operator's threshold"
        full, dist = self.scores(texts, raw=True)
        score = None if dist is None else self._score(full, dist)
        far = self._far(score, thr, len(full))
        pr, pn = self._split(full, self.none_class)
        out = []
        for i, row in enumerate(pr):
            p_none = None if pn is None else float(pn[i])
            if far[i]:
                none = f"; 'none of these' {p_none:.3f}" if p_none is not None else ""
                out.append(Routing([], [], [], [], base_reason=self._base_reason(float(score[i]), float(dist[i]),
                                                                                   float(row.max()), thr, which, none),
                                   p_none=p_none))
                continue
            idx, w, kp = select(row, p=p, top_k=top_k, weighting=weighting, floor=floor)
            reason = None if idx else (f"the best adapter's probability {float(row.max()):.3f} is below the "
                                       f"floor {floor:.3f}")
            out.append(Routing([self.labels[i] for i in idx], idx, w, kp, base_reason=reason, p_none=p_none))
        return out

    def _base_reason(self, score: float, dist: float, best: float, thr: float, which: str, none: str) -> str:
        if self.config.get("base_detector") == "mahalanobis":
            return (f"the prompt matches none of the adapters' tasks: its distance to the nearest adapter's prompts is "
                    f"{dist:.1f}, over the {which} {thr:.1f}{none}")
        return (f"the prompt matches none of the adapters' tasks: its out-of-library score is {score:.3f}, over the "
                f"{which} {thr:.3f} (distance to the nearest adapter's prompts {dist:.1f}{none}; best adapter's "
                f"probability {best:.3f})")

    def decide(self, texts: Sequence[str] | str) -> tuple[list[str], np.ndarray]:
        """Per prompt, in one pass: the top-1 adapter name, and whether the calibrated detector sends the
        prompt to the base model (all False without a detector)."""
        full, dist = self.scores(texts)
        n = len(self.labels)
        return [self.labels[i] for i in full[:, :n].argmax(axis=1)], self._far(dist, self.base_threshold, len(full))

    def predict(self, texts: Sequence[str] | str, base: str | None = None) -> list[str | None]:
        """Top-1 adapter name per prompt; with `base` given, prompts that :meth:`route` sends to the
        base model (by the calibrated detector) get `base` instead."""
        names, far = self.decide(texts)
        return names if base is None else [base if f else name for f, name in zip(far, names)]
