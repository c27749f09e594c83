"""Training the router: the training set (views and "none of these" prompts), the optimisation loop,
and the calibration of the base-model threshold.

The training set (:func:`build_training_set`) holds every training prompt as rendered, plus
`n_views` random combinations of views per prompt (:func:`dlplora.plugin.views.augment`: parts of the
scaffolding dropped, cut short, another task's turn before it, light noise), so that the router
learns a task from its content. With *background* prompts (texts of tasks outside the library, see
:mod:`.background`), one more output, "none of these", learns to send them to the base model.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np

from ..errors import DLPLoRAError
from .encoders import make_encoder
from ..config import DEFAULT_P, check_selection_args
from .model import FORMAT, build_net, check_labels, check_texts, score_features
from .views import augment, compose

# Share of the held-back in-library prompts (as rendered and in every view) that the calibrated
# threshold sends to the base model (measured trade-off in docs/plugin.md).
BASE_FALSE_RATE = 0.015


def build_training_set(rows_by_task: dict[str, list[dict]], *, n_views: int = 2, background: Sequence[str] = (),
                       seed: int = 0) -> tuple[list[str], list[str | None]]:
    """Every training row as rendered, plus `n_views` augmented views of it (another task's rendered
    turn available for the history part), plus each background text as rendered and in one augmented
    form. Labels are task names; None marks a background ("none of these") text."""
    rng = random.Random(seed)
    names = list(rows_by_task)
    texts: list[str] = []
    labels: list[str | None] = []
    for task, rows in rows_by_task.items():
        others = [n for n in names if n != task]
        for r in rows:
            texts.append(compose(r))
            labels.append(task)
            for _ in range(n_views):
                other = compose(rng.choice(rows_by_task[rng.choice(others)])) if others else None
                texts.append(augment(r, rng, other))
                labels.append(task)
    for t in background:
        texts.append(t)
        labels.append(None)
        texts.append(augment({"input": t}, rng, None))
        labels.append(None)
    return texts, labels


def _label_ids(labels: Sequence, names: list[str], none_class: bool) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    y = np.empty(len(labels), dtype=np.int64)
    for i, lab in enumerate(labels):
        if lab is None and none_class:
            y[i] = len(names)
        elif isinstance(lab, (int, np.integer)) and not isinstance(lab, bool):
            if not 0 <= lab < len(names):
                raise DLPLoRAError(f"label {lab} of example {i} is out of range (0..{len(names) - 1})")
            y[i] = int(lab)
        elif lab in index:
            y[i] = index[lab]
        else:
            raise DLPLoRAError(f"label {lab!r} of example {i} is not one of the adapter names")
    missing = [names[c] for c in range(len(names)) if not (y == c).any()]
    if missing:
        raise DLPLoRAError(f"no training prompts for adapter(s): {', '.join(missing)}")
    return y


class LazyAdamRows:
    """Adam on the rows of the hashed embedding table that a batch touches ("lazy" Adam, as
    ``torch.optim.SparseAdam``), with the gradient computed as a second bag.

    Measured against PyTorch's own path, ``nn.EmbeddingBag(sparse=True)`` + ``SparseAdam``, on the
    same 44k prompts (2 epochs, 1 thread): 16-22 s here against 38 s there, whose bag backward scatters
    element by element on CPU (docs/plugin.md, "Training speed"). So this path is kept."""

    b1, b2, eps = 0.9, 0.999, 1e-8

    def __init__(self, weight, lr: float):
        import torch

        self.w, self.lr, self.t = weight, lr, 0
        with torch.no_grad():
            weight.normal_(0.0, 0.1)
        weight.requires_grad_(False)
        self.m = torch.zeros_like(weight)
        self.v = torch.zeros_like(weight)

    def bags(self, fb):
        """Mean embedding of every segment of the batch, as a leaf that collects its gradient."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            seg = F.embedding_bag(torch.from_numpy(fb.ids), self.w, torch.from_numpy(fb.offsets), mode="mean")
        return seg.requires_grad_(True)

    def step(self, fb, seg_grad, scale: float) -> None:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            # embedding gradient = transposed bag: elements sorted by bucket, each bucket's run summing
            # d(loss)/d(segment) / segment length over the segments it occurs in
            order = _argsort_small_ints(fb.ids)
            sids = fb.ids[order]
            starts = np.flatnonzero(np.concatenate([[True], sids[1:] != sids[:-1]])) if len(sids) else sids
            if not len(sids):
                return
            u = torch.from_numpy(sids[starts])
            seg_of = np.repeat(np.arange(len(fb.counts)), fb.counts)[order]
            gs = seg_grad / torch.from_numpy(np.maximum(fb.counts, 1)).to(seg_grad.dtype)[:, None]
            g = F.embedding_bag(torch.from_numpy(seg_of), gs, torch.from_numpy(starts), mode="sum")
            mu = self.m.index_select(0, u).mul_(self.b1).add_(g, alpha=1 - self.b1)
            vu = self.v.index_select(0, u).mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            self.m.index_copy_(0, u, mu)
            self.v.index_copy_(0, u, vu)
            self.t += 1
            c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
            rows = self.w.index_select(0, u) - (self.lr * scale / c1) * mu / vu.div_(c2).sqrt_().add_(self.eps)
            self.w.index_copy_(0, u, rows)


def _argsort_small_ints(a: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative ints below 2^32: two radix passes over 16-bit halves."""
    o1 = np.argsort((a & 0xFFFF).astype(np.uint16), kind="stable")
    hi = (a[o1] >> 16).astype(np.uint16)
    return o1[np.argsort(hi, kind="stable")]


def _check_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise DLPLoRAError(f"{name} must be an integer >= 1, got {v!r}")


def train_router(cls, texts: Sequence[str], labels: Sequence, label_names: Sequence[str], *, epochs: int = 2,
                 batch_size: int = 512, lr: float = 4e-3, emb_lr: float = 3e-2, dim: int = 18,
                 hidden: Sequence[int] = (512, 256, 128), dropout: float = 0.1, bits: int = 18,
                 body_bytes: int = 0, history_bytes: int = 256, encoder: str = "hashed", model: str | None = None, seed: int = 0,
                 default_p: float = DEFAULT_P, tokenizer=None, log=None, threads: int | None = 1):
    """Train a router on (text, label) pairs; `labels` are names from `label_names`, indices into it,
    or None for a "none of these" text (any None adds that class). `encoder` is "hashed" (trained
    hashed n-gram embeddings) or "backbone" (frozen backbone embeddings). `threads` (default 1: the
    work is memory-bound gathers, and one thread is fastest on a busy 2-core machine) applies only
    while training; None keeps torch's setting."""
    import torch
    from torch import nn

    names = check_labels(label_names)
    texts = check_texts(texts)
    labels = list(labels)
    if len(labels) != len(texts):
        raise DLPLoRAError(f"{len(texts)} training texts but {len(labels)} labels")
    if not texts:
        raise DLPLoRAError("no training prompts")
    none_class = any(lab is None for lab in labels)
    y = _label_ids(labels, names, none_class)
    check_selection_args(default_p, None, "softmax", 0.0)
    _check_int("epochs", epochs)
    _check_int("batch size", batch_size)

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        enc = make_encoder(encoder, tokenizer=tokenizer, dim=dim, bits=bits, body_bytes=body_bytes,
                           history_bytes=history_bytes, model=model)
        feats = enc.encode(texts)
        net = build_net(enc, hidden, len(names) + none_class, dropout)
        emb = net.emb.weight if hasattr(net, "emb") else None
        lazy = LazyAdamRows(emb, emb_lr) if emb is not None else None
        dense = [p for n_, p in net.named_parameters() if not n_.startswith("emb.")]
        opt = torch.optim.AdamW(dense, lr=lr, weight_decay=0.01)
        steps_per_epoch = math.ceil(len(texts) / batch_size)
        total = max(1, epochs * steps_per_epoch)
        warm = max(1, steps_per_epoch // 4)

        def lr_at(step):  # short warm-up, then cosine to 5%
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
        yt = torch.from_numpy(y)
        net.train()
        step = 0
        for ep in range(epochs):
            perm = rng.permutation(len(texts))
            tot_loss = 0.0
            for b in range(0, len(perm), batch_size):
                rows = perm[b: b + batch_size]
                scale = lr_at(step)
                for g in opt.param_groups:
                    g["lr"] = lr * scale
                fb = enc.take(feats, rows)
                hb, dense_in = (fb if enc.kind == "hybrid" else (fb, None))
                if lazy is not None:
                    seg = lazy.bags(hb)
                    x = seg[torch.from_numpy(hb.slots)].flatten(1)
                    if dense_in is not None:
                        x = torch.cat([x, dense_in], dim=1)
                else:
                    x = fb
                loss = loss_fn(net.mlp(net.norm(x)), yt[torch.from_numpy(rows)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if lazy is not None:
                    lazy.step(hb, seg.grad, scale)
                tot_loss += float(loss.detach()) * len(rows)
                step += 1
            if log:
                log(f"epoch {ep + 1}/{epochs}: loss {tot_loss / len(texts):.4f}")
        net.eval()
    finally:
        torch.set_num_threads(old_threads)
    config = {"format": FORMAT, "labels": names, "encoder": enc.to_dict(),
              "model": {"kind": f"{enc.kind}-mlp", "hidden": list(hidden), "dropout": dropout,
                        "inputs": f"LayerNorm(concat of {enc.kind} encodings), {enc.out_dim}-d"},
              "none_class": none_class, "default_p": float(default_p),
              "params": sum(p.numel() for p in net.parameters()),
              "training": {"examples": len(texts), "none_examples": int((y == len(names)).sum()), "epochs": epochs,
                           "batch_size": batch_size, "lr": lr, "emb_lr": emb_lr, "seed": seed}}
    return cls(net, names, enc, config)


def cost_threshold(inside: np.ndarray, foreign: np.ndarray, cost) -> tuple[float, dict]:
    """The threshold that minimises the expected loss in score per prompt, ``(1 - share) * miss * P(an in-library
    prompt goes to base) + share * foreign * P(a foreign prompt gets an adapter)``, given the base scores of in-library
    prompts (`inside`) and of foreign ones, and `cost` = (miss, foreign, share): the points an in-library prompt loses
    on the base model, those a foreign prompt loses on an adapter, and the share of foreign prompts in the traffic.
    Ties go to the higher threshold (fewer prompts to base). Returns (threshold, what it gives)."""
    miss, foreign_cost, share = (float(x) for x in cost)
    cands = np.unique(np.concatenate([inside, foreign, [math.inf]]))
    s_in, s_out = np.sort(inside), np.sort(foreign)
    to_base = 1.0 - np.searchsorted(s_in, cands, side="right") / max(1, len(s_in))  # P(in > t)
    kept = np.searchsorted(s_out, cands, side="right") / max(1, len(s_out))  # P(foreign <= t)
    loss = (1 - share) * miss * to_base + share * foreign_cost * kept
    i = len(loss) - 1 - int(np.argmin(loss[::-1]))
    return float(cands[i]), {"miss_cost": miss, "foreign_cost": foreign_cost, "foreign_share": share,
                             "in_library_to_base": float(to_base[i]), "foreign_to_base": float(1 - kept[i]),
                             "expected_loss": float(loss[i])}


def calibrate_base_threshold(plugin, fit_texts: Sequence[str], fit_labels: Sequence[str],
                             held_back_texts: Sequence[str], false_rate: float = BASE_FALSE_RATE,
                             foreign_texts: Sequence[str] = (), cost=None) -> float:
    """Fit the base-model detector and calibrate its threshold.

    The detector: the mean penultimate MLP feature of each adapter's training prompts (`fit_texts`,
    labelled with adapter names) and the inverse of their pooled covariance; a prompt's distance is its
    squared Mahalanobis distance to the nearest mean (Lee et al., 2018). With `foreign_texts` (prompts of
    tasks the router never trained on, e.g. held-out background tasks), the score is a logistic regression
    of that distance, p("none of these") and the best adapter's probability, fitted to tell the held-back
    in-library prompts from the foreign ones (:func:`.router.foreign_score`); without them, the distance
    itself. The threshold is the score that `false_rate` of the held-back in-library prompts (never
    trained on, in every view) exceed; with `cost` (miss, foreign, share) and foreign prompts, the one of least
    expected loss on the held-back and the foreign prompts (:func:`cost_threshold`)."""
    import torch

    names = plugin.labels
    y = np.array([names.index(lab) for lab in fit_labels])
    missing = [names[c] for c in range(len(names)) if not (y == c).any()]
    if missing:
        raise DLPLoRAError(f"no prompts to fit the base detector for adapter(s): {', '.join(missing)}")
    with torch.inference_mode():
        h = torch.cat([plugin.net.features(plugin.encoder.encode(list(fit_texts[b: b + 1024])))[1].float()
                       for b in range(0, len(fit_texts), 1024)]).double()
    yt = torch.from_numpy(y)
    means = torch.stack([h[yt == c].mean(0) for c in range(len(names))])
    centred = h - means[yt]
    cov = centred.T @ centred / max(1, len(h) - len(names))
    cov += torch.eye(cov.shape[0], dtype=cov.dtype) * (1e-3 * float(cov.diagonal().mean()) + 1e-8)
    net = plugin.net
    for name, value in (("ood_means", means.float()), ("ood_precision", torch.linalg.inv(cov).float())):
        if hasattr(net, name):
            getattr(net, name).copy_(value)
        else:
            net.register_buffer(name, value)
    plugin.config["base_detector"] = "mahalanobis"
    plugin.config["base_threshold"] = math.inf
    plugin.config.pop("base_score", None)
    if len(foreign_texts) and len(held_back_texts):
        plugin.config["base_score"] = fit_foreign_score(plugin, held_back_texts, foreign_texts)
        plugin.config["base_detector"] = "mahalanobis+logistic"
    _, dist = plugin.scores(list(held_back_texts)) if held_back_texts else (None, np.zeros(0))
    thr = float(np.quantile(dist, 1.0 - false_rate, method="higher")) if len(dist) else math.inf
    by_cost = None
    if cost is not None:
        if not len(foreign_texts) or not len(dist):
            raise DLPLoRAError("a cost-based base threshold needs held-back prompts and foreign prompts (background "
                               "tasks held out of training); this training set has none")
        thr, by_cost = cost_threshold(dist, plugin.scores(list(foreign_texts))[1], cost)
    plugin.config["base_threshold"] = thr
    plugin.config["base_calibration"] = {
        "false_rate": false_rate if by_cost is None else by_cost["in_library_to_base"], "by_cost": by_cost,
        "held_back_prompts": int(len(dist)), "fit_prompts": len(fit_texts),
        "foreign_prompts": len(foreign_texts),
        "rule": "base model when the squared Mahalanobis distance of the penultimate features to the nearest "
                "adapter's mean exceeds base_threshold" if "base_score" not in plugin.config else
                "base model when the logistic score of that distance, p('none of these') and the best adapter's "
                "probability (base_score) exceeds base_threshold"}
    return thr


def fit_foreign_score(plugin, inside: Sequence[str], foreign: Sequence[str]) -> dict:
    """The logistic base score's parameters for `plugin`: :func:`fit_logistic` on the :func:`.model.score_features`
    of in-library prompts and foreign ones."""
    xs = []
    for texts in (inside, foreign):
        full, dist = plugin.scores(list(texts))
        xs.append(score_features(dist, full, plugin.none_class))
    return fit_logistic(*xs) | {"in_library_prompts": len(xs[0]), "foreign_prompts": len(xs[1])}


def fit_logistic(x_in: np.ndarray, x_out: np.ndarray) -> dict:
    """Logistic regression of standardised features, in-library rows (label 0) against foreign ones (label 1),
    both classes weighted equally, a small L2 penalty, fitted by L-BFGS -> {"weights", "bias", "mean", "std"}."""
    import torch

    x = np.concatenate([x_in, x_out])
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    xt = torch.from_numpy((x - mean) / std)
    y = torch.cat([torch.zeros(len(x_in)), torch.ones(len(x_out))]).double()
    wt = torch.where(y > 0, 0.5 / len(x_out), 0.5 / len(x_in)).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, y, reduction="none") * wt).sum()
        loss = loss + 1e-4 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"weights": w.detach().tolist(), "bias": float(b.detach()), "mean": mean.tolist(), "std": std.tolist()}
