"""The DLP plugin: a ~5M-parameter mini-MLP router that picks and weights adapters per prompt.

Pipeline (see docs/plugin.md)::

    prompt --normalise--> head segment (first 512 bytes) + tail segment (last 512 bytes)
           --hash-->      word 1-2-grams + byte 3/4/5-grams, each into one of 2^18 buckets
           --EmbeddingBag(mean, dim 18)--> one 18-d vector per segment
           --concat [head, tail]--> 36-d --> 4-layer MLP 36-512-256-128-N --> softmax over adapters
           --top-p (or top-k) + weighting--> Routing(names, indices, weights, probs)

The hashing is deterministic (FNV-style 64-bit polynomial hashes with a murmur3 finaliser, no
Python ``hash()``), vectorised with numpy over a whole batch; the forward pass is one batched torch
call. The head/tail split lets the MLP learn that, when a chat history is prepended, the end of the
text (the current turn) decides the task.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DLPLoRAError
from .paths import read_json

FORMAT = 1
FEATURIZER = "hashed-ngrams-v1"
CONFIG_FILE = "plugin.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_P = 0.6
WEIGHTINGS = ("softmax", "renorm")
RETRAIN_HINT = "retrain with `dlp-lora train-plugin --library LIB`"
HISTORY_SEPARATOR = "\n\n"

_M64 = (1 << 64) - 1
_PRIME = np.uint64(1099511628211)  # the 64-bit FNV prime
_MIX1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX2 = np.uint64(0xC4CEB9FE1A85EC53)


# ---------------------------------------------------------------- tokenizer (hashed n-grams)

def _fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, vectorised (uint64 arithmetic wraps)."""
    h = h ^ (h >> np.uint64(33))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(33))
    h = h * _MIX2
    return h ^ (h >> np.uint64(33))


def _mix(h: np.ndarray, salt: np.uint64) -> np.ndarray:
    """Cheap finaliser before taking the top bits as the bucket: xor-shift, multiply (one round of fmix64)."""
    h = h ^ salt
    h = h ^ (h >> np.uint64(29))
    return h * _MIX1


# multipliers for a byte's position inside a word token (fixed, odd)
_POS_MULT = _fmix64(np.arange(1, 33, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)


def _salt(kind: str) -> np.uint64:
    return np.uint64(zlib.crc32(kind.encode()) * 0x9E3779B1 & _M64)


@dataclass(frozen=True)
class HashedNgramTokenizer:
    """Text -> bucket ids of its word n-grams and byte n-grams (deterministic, no vocabulary).

    The text is lower-cased and its whitespace collapsed; the head segment is its first
    ``head_bytes`` UTF-8 bytes and the tail segment its last ``tail_bytes`` (one shared segment
    when the text is no longer than ``head_bytes``)."""

    bits: int = 18
    char_ngrams: tuple[int, ...] = (3, 4, 5)
    word_ngrams: tuple[int, ...] = (1, 2)
    head_bytes: int = 256
    tail_bytes: int = 256
    lowercase: bool = True

    @property
    def buckets(self) -> int:
        return 1 << self.bits

    def to_dict(self) -> dict:
        return {"kind": FEATURIZER, "bits": self.bits, "buckets": self.buckets, "char_ngrams": list(self.char_ngrams),
                "word_ngrams": list(self.word_ngrams), "head_bytes": self.head_bytes, "tail_bytes": self.tail_bytes,
                "lowercase": self.lowercase, "normalise": "lower-case, whitespace runs -> one space",
                "hash": "byte n-grams: 64-bit polynomial hash (FNV prime); word tokens: sum of byte * fixed odd "
                        "position multiplier, word n-grams: polynomial over token hashes; then xor salt(crc32 of kind), "
                        "xor-shift 29, multiply; bucket = top `bits` bits"}

    @classmethod
    def from_dict(cls, d: dict) -> "HashedNgramTokenizer":
        if d.get("kind") != FEATURIZER:
            raise DLPLoRAError(f"plugin tokenizer {d.get('kind')!r} is not supported by this version "
                               f"(expects {FEATURIZER}); {RETRAIN_HINT}")
        return cls(bits=int(d["bits"]), char_ngrams=tuple(d["char_ngrams"]), word_ngrams=tuple(d["word_ngrams"]),
                   head_bytes=int(d["head_bytes"]), tail_bytes=int(d["tail_bytes"]), lowercase=bool(d["lowercase"]))

    # -------------------------------------------------------- segments
    def _segments(self, text: str) -> list[bytes]:
        norm = " ".join(text.split())
        if self.lowercase:
            norm = norm.lower()
        b = norm.encode("utf-8")
        if len(b) <= self.head_bytes:
            return [b]
        return [b[: self.head_bytes], b[-self.tail_bytes:]]

    def encode(self, texts: Sequence[str], chunk: int = 2048) -> "Features":
        """Featurise a batch: flat bucket ids grouped by segment, plus each text's head/tail segment."""
        if len(texts) <= chunk:
            return self._encode(texts)
        return Features.concat([self._encode(texts[b: b + chunk]) for b in range(0, len(texts), chunk)])

    def _encode(self, texts: Sequence[str]) -> "Features":
        segs: list[bytes] = []
        head = np.empty(len(texts), dtype=np.int64)
        tail = np.empty(len(texts), dtype=np.int64)
        for i, t in enumerate(texts):
            s = self._segments(t)
            head[i] = len(segs)
            tail[i] = len(segs) + len(s) - 1
            segs.extend(s)
        nseg = len(segs)
        shift = np.uint64(64 - self.bits)
        parts: list[tuple[np.ndarray, np.ndarray]] = []  # (bucket ids, segment of each), sorted by segment

        # one buffer for the batch: each segment padded with a space, segments separated by NUL
        buf = np.frombuffer(b"\x00".join(b" " + s + b" " for s in segs), dtype=np.uint8)
        zc = np.cumsum(buf == 0)  # segment index of each byte (NULs count as the next segment)
        L = len(buf)
        b64 = buf.astype(np.uint64)

        # byte n-grams: h_n = h_{n-1} * P + b (rolling), valid when inside one segment
        h = b64.copy()
        for n in range(2, max(self.char_ngrams, default=0) + 1):
            m = L - n + 1
            if m <= 0:
                break
            h = h[:m] * _PRIME + b64[n - 1: n - 1 + m]
            if n in self.char_ngrams:
                ok = zc[n - 1: n - 1 + m] == zc[:m]
                ok &= buf[:m] != 0
                hh = _mix(h[ok], _salt(f"c{n}"))
                parts.append(((hh >> shift).astype(np.int64), zc[:m][ok]))

        # words: runs of [0-9a-z_] or non-ASCII bytes; every other non-space byte is a token by itself.
        # token hash = sum(byte * R[position in token]) (wrapping), then n-grams as above.
        isw = ((buf >= 48) & (buf <= 57)) | ((buf >= 97) & (buf <= 122)) | ((buf >= 65) & (buf <= 90)) | (buf == 95) | (buf >= 128)
        isp = ~isw & (buf != 32) & (buf != 0) & (buf != 9) & (buf != 10) & (buf != 13)
        prev_w = np.concatenate([[False], isw[:-1]])
        start = isp | (isw & ~prev_w)
        in_tok = isw | isp
        starts = np.flatnonzero(start)
        if len(starts):
            tok_of = np.cumsum(start) - 1
            pos = np.arange(L) - starts[np.maximum(tok_of, 0)]
            sel = np.flatnonzero(in_tok)
            contrib = b64[sel] * _POS_MULT[np.minimum(pos[sel], len(_POS_MULT) - 1)]
            first = np.searchsorted(sel, starts)
            th = np.add.reduceat(contrib, first)
            ts = zc[starts]
            for n in self.word_ngrams:
                m = len(th) - n + 1
                if m <= 0:
                    continue
                g = th[:m].copy()
                for j in range(1, n):
                    g = g * _PRIME + th[j: j + m]
                ok = ts[:m] == ts[n - 1: n - 1 + m]
                g = _mix(g[ok], _salt(f"w{n}"))
                parts.append(((g >> shift).astype(np.int64), ts[:m][ok]))

        # merge the parts segment by segment without sorting: scatter each part after the previous ones
        counts_p = [np.bincount(s, minlength=nseg) for _, s in parts]
        counts = np.sum(counts_p, axis=0).astype(np.int64) if parts else np.zeros(nseg, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        ids = np.empty(int(counts.sum()), dtype=np.int64)
        base = offsets.copy()
        for (pid, s), c in zip(parts, counts_p):
            first = np.concatenate([[0], np.cumsum(c)[:-1]])
            ids[base[s] + np.arange(len(s)) - first[s]] = pid
            base += c
        return Features(ids, offsets, counts, head, tail)


@dataclass
class Features:
    ids: np.ndarray  # flat bucket ids, grouped by segment
    offsets: np.ndarray  # start of each segment in ids
    counts: np.ndarray  # ids per segment
    head: np.ndarray  # per text: its head segment
    tail: np.ndarray  # per text: its tail segment (== head for a short text)

    def __len__(self) -> int:
        return len(self.head)

    @staticmethod
    def concat(parts: list["Features"]) -> "Features":
        seg_base = np.cumsum([0] + [len(f.counts) for f in parts[:-1]])
        id_base = np.cumsum([0] + [len(f.ids) for f in parts[:-1]])
        return Features(np.concatenate([f.ids for f in parts]),
                        np.concatenate([f.offsets + b for f, b in zip(parts, id_base)]),
                        np.concatenate([f.counts for f in parts]),
                        np.concatenate([f.head + b for f, b in zip(parts, seg_base)]),
                        np.concatenate([f.tail + b for f, b in zip(parts, seg_base)]))

    def take(self, rows: np.ndarray) -> "Features":
        """The features of texts `rows`, re-packed contiguously (for minibatches)."""
        segs, inv = np.unique(np.concatenate([self.head[rows], self.tail[rows]]), return_inverse=True)
        lengths = self.counts[segs]
        starts = self.offsets[segs]
        total = int(lengths.sum())
        new_off = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        idx = np.repeat(starts - new_off, lengths) + np.arange(total, dtype=np.int64)
        k = len(rows)
        return Features(self.ids[idx], new_off, lengths, inv[:k].astype(np.int64), inv[k:].astype(np.int64))


# ---------------------------------------------------------------- the network

def _build_net(buckets: int, dim: int, hidden: Sequence[int], n_out: int, dropout: float, emb_weight=None):
    import torch
    from torch import nn

    class RouterNet(nn.Module):
        def __init__(self):
            super().__init__()
            # a loaded table is passed in (no 4.7M-value random init on load)
            self.emb = nn.EmbeddingBag(buckets, dim, mode="mean", _weight=emb_weight)
            self.norm = nn.LayerNorm(2 * dim)
            layers: list[nn.Module] = []
            d = 2 * dim
            for h in hidden:
                layers += [nn.Linear(d, h), nn.GELU(), nn.LayerNorm(h), nn.Dropout(dropout)]
                d = h
            layers.append(nn.Linear(d, n_out))
            self.mlp = nn.Sequential(*layers)

        def forward(self, ids, offsets, head, tail):
            seg = self.emb(ids, offsets)
            x = torch.cat([seg[head], seg[tail]], dim=1)
            return self.mlp(self.norm(x))

    return RouterNet()


def _argsort_small_ints(a: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative ints below 2^32: two radix passes over 16-bit halves."""
    o1 = np.argsort((a & 0xFFFF).astype(np.uint16), kind="stable")
    hi = (a[o1] >> 16).astype(np.uint16)
    return o1[np.argsort(hi, kind="stable")]


def _tensors(f: Features):
    import torch

    return (torch.from_numpy(f.ids), torch.from_numpy(f.offsets), torch.from_numpy(f.head), torch.from_numpy(f.tail))


# ---------------------------------------------------------------- selection (paper eq. 4-5)

@dataclass
class Routing:
    """The adapters chosen for one prompt: names/indices in descending probability, their fusion
    weights (summing to 1), and the router's probabilities for them. Empty = use the base model."""

    names: list[str]
    indices: list[int]
    weights: list[float]
    probs: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    def __bool__(self) -> bool:
        return bool(self.indices)


def check_selection_args(p: float | None, top_k: int | None, weighting: str, floor: float) -> None:
    if top_k is None:
        if p is None or isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < float(p) <= 1.0):
            raise DLPLoRAError(f"top-p threshold p must be a number in (0, 1], got {p!r}")
    else:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise DLPLoRAError(f"top-k must be an integer >= 1, got {top_k!r}")
    if weighting not in WEIGHTINGS:
        raise DLPLoRAError(f"unknown weighting {weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not (0.0 <= float(floor) <= 1.0):
        raise DLPLoRAError(f"confidence floor must be a number in [0, 1], got {floor!r}")


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

def _check_labels(label_names: Sequence[str]) -> list[str]:
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


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DLPLoRAError(f"prompt {i} is not a string ({type(t).__name__})")
        if not t.strip():
            raise DLPLoRAError(f"prompt {i} is empty; give the router some text to route")
    return texts


class Plugin:
    """A trained router. Build one with :meth:`train` or :meth:`load`."""

    def __init__(self, net, labels: list[str], tokenizer: HashedNgramTokenizer, config: dict):
        self.net = net
        self.labels = list(labels)
        self.tokenizer = tokenizer
        self.config = config

    # ------------------------------------------------------------ facts
    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    @property
    def default_p(self) -> float:
        return float(self.config.get("default_p", DEFAULT_P))

    # ------------------------------------------------------------ training
    @classmethod
    def train(cls, texts: Sequence[str], labels: Sequence, label_names: Sequence[str], *, epochs: int = 2,
              batch_size: int = 512, lr: float = 4e-3, emb_lr: float = 3e-2, dim: int = 18,
              hidden: Sequence[int] = (512, 256, 128), dropout: float = 0.1, bits: int = 18, seed: int = 0,
              default_p: float = DEFAULT_P, tokenizer: HashedNgramTokenizer | None = None, log=None,
              threads: int | None = 1) -> "Plugin":
        """Train on (text, label) pairs; `labels` are names from `label_names` or indices into it.
        `threads` (default 1: the work is memory-bound gathers, and one thread is fastest on a busy
        2-core machine) applies only while training; None keeps torch's setting."""
        import torch
        import torch.nn.functional as F
        from torch import nn

        names = _check_labels(label_names)
        texts = _check_texts(texts)
        labels = list(labels)
        if len(labels) != len(texts):
            raise DLPLoRAError(f"{len(texts)} training texts but {len(labels)} labels")
        if not texts:
            raise DLPLoRAError("no training prompts")
        index = {n: i for i, n in enumerate(names)}
        y = np.empty(len(labels), dtype=np.int64)
        for i, lab in enumerate(labels):
            if isinstance(lab, (int, np.integer)) and not isinstance(lab, bool):
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
        check_selection_args(default_p, None, "softmax", 0.0)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise DLPLoRAError(f"epochs must be an integer >= 1, got {epochs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DLPLoRAError(f"batch size must be an integer >= 1, got {batch_size!r}")

        tok = tokenizer or HashedNgramTokenizer(bits=bits)
        old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            torch.manual_seed(seed)
            rng = np.random.default_rng(seed)
            feats = tok.encode(texts)
            net = _build_net(tok.buckets, dim, hidden, len(names), dropout)
            emb = net.emb.weight
            with torch.no_grad():
                emb.normal_(0.0, 0.1)
            # The embedding table is trained by hand: torch's EmbeddingBag backward on CPU scatters
            # element by element and dominates the step, so the gradient is computed as a second bag over
            # the batch's elements sorted by bucket, and lazy Adam updates only the rows a batch touches.
            m_state = torch.zeros_like(emb)
            v_state = torch.zeros_like(emb)
            b1, b2, eps = 0.9, 0.999, 1e-8
            dense = [p for n_, p in net.named_parameters() if not n_.startswith("emb.")]
            opt_d = torch.optim.AdamW(dense, lr=lr, weight_decay=0.01)
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
                    for g in opt_d.param_groups:
                        g["lr"] = lr * scale
                    fb = feats.take(rows)
                    ids_t = torch.from_numpy(fb.ids)
                    with torch.no_grad():
                        seg = F.embedding_bag(ids_t, emb.detach(), torch.from_numpy(fb.offsets), mode="mean")
                    seg.requires_grad_(True)
                    x = torch.cat([seg[torch.from_numpy(fb.head)], seg[torch.from_numpy(fb.tail)]], dim=1)
                    logits = net.mlp(net.norm(x))
                    loss = loss_fn(logits, yt[torch.from_numpy(rows)])
                    opt_d.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_d.step()
                    with torch.no_grad():
                        # embedding gradient = transposed bag: elements sorted by bucket, each bucket's
                        # run summing d(loss)/d(segment) / segment length over the segments it occurs in
                        order = _argsort_small_ints(fb.ids)
                        sids = fb.ids[order]
                        starts = np.flatnonzero(np.concatenate([[True], sids[1:] != sids[:-1]]))
                        u = torch.from_numpy(sids[starts])
                        seg_of = np.repeat(np.arange(len(fb.counts)), fb.counts)[order]
                        gs = seg.grad / torch.from_numpy(np.maximum(fb.counts, 1)).to(seg.dtype)[:, None]
                        g = F.embedding_bag(torch.from_numpy(seg_of), gs, torch.from_numpy(starts), mode="sum")
                        # lazy Adam on the touched rows
                        mu = m_state.index_select(0, u).mul_(b1).add_(g, alpha=1 - b1)
                        vu = v_state.index_select(0, u).mul_(b2).addcmul_(g, g, value=1 - b2)
                        m_state.index_copy_(0, u, mu)
                        v_state.index_copy_(0, u, vu)
                        c1, c2 = 1 - b1 ** (step + 1), 1 - b2 ** (step + 1)
                        new_rows = emb.index_select(0, u) - (emb_lr * scale / c1) * mu / vu.div_(c2).sqrt_().add_(eps)
                        emb.index_copy_(0, u, new_rows)
                    tot_loss += float(loss.detach()) * len(rows)
                    step += 1
                if log:
                    log(f"epoch {ep + 1}/{epochs}: loss {tot_loss / len(texts):.4f}")
            net.eval()
        finally:
            torch.set_num_threads(old_threads)
        params = sum(p.numel() for p in net.parameters())
        config = {"format": FORMAT, "labels": names, "tokenizer": tok.to_dict(),
                  "model": {"kind": "hashed-bag-mlp", "dim": dim, "hidden": list(hidden), "dropout": dropout,
                            "inputs": "concat(mean-embedding(head segment), mean-embedding(tail segment))"},
                  "default_p": float(default_p), "params": params,
                  "training": {"examples": len(texts), "epochs": epochs, "batch_size": batch_size, "lr": lr,
                               "emb_lr": emb_lr, "seed": seed}}
        return cls(net, names, tok, config)

    # ------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from .paths import atomic_write_text

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        tmp = d / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
        save_file(state, str(tmp), metadata={"format": str(FORMAT), "featurizer": FEATURIZER})
        os.replace(tmp, d / WEIGHTS_FILE)
        atomic_write_text(d / CONFIG_FILE, json.dumps(self.config, indent=2, ensure_ascii=False))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, expected_labels: Sequence[str] | None = None) -> "Plugin":
        """Load a saved plugin; with `expected_labels` (the library's adapter names, in order),
        refuse a plugin trained for other adapters."""
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise DLPLoRAError(f"no plugin at {d} ({CONFIG_FILE} and {WEIGHTS_FILE} expected); "
                               f"train one with `dlp-lora train-plugin --library LIB` (or --data DIR --tasks ... --out {d})")
        cfg = read_json(cfg_path, RETRAIN_HINT)
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or "labels" not in cfg:
            raise DLPLoRAError(f"{cfg_path} is not a dlp-lora plugin config of format {FORMAT}; {RETRAIN_HINT}")
        labels = list(cfg["labels"])
        if expected_labels is not None:
            expected = list(expected_labels)
            if expected != labels:
                if sorted(expected) == sorted(labels):
                    why = "the same adapters in a different order"
                else:
                    extra = [n for n in expected if n not in labels]
                    gone = [n for n in labels if n not in expected]
                    why = "; ".join(x for x in (f"library adapters it does not know: {', '.join(extra)}" if extra else "",
                                                f"adapters no longer in the library: {', '.join(gone)}" if gone else "") if x)
                raise DLPLoRAError(f"the plugin at {d} was trained for {len(labels)} other adapters than the library's "
                                   f"{len(expected)} ({why}); {RETRAIN_HINT}")
        tok = HashedNgramTokenizer.from_dict(cfg["tokenizer"])
        m = cfg["model"]
        try:
            state = load_file(str(w_path))
            net = _build_net(tok.buckets, int(m["dim"]), m["hidden"], len(labels), float(m.get("dropout", 0.0)),
                             emb_weight=state.get("emb.weight"))
            net.load_state_dict(state, assign=True)
        except Exception as exc:  # a truncated file, a foreign state dict
            raise DLPLoRAError(f"{w_path} does not hold this plugin's weights ({exc}); {RETRAIN_HINT}") from exc
        net.eval()
        return cls(net, labels, tok, cfg)

    # ------------------------------------------------------------ inference
    def probs(self, texts: Sequence[str] | str) -> np.ndarray:
        """Router probabilities, shape (len(texts), len(labels)), rows in the order of `labels`."""
        import torch

        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        with torch.inference_mode():
            logits = self.net(*_tensors(self.tokenizer.encode(texts)))
            return torch.softmax(logits.float(), dim=-1).numpy()

    def route(self, texts: Sequence[str] | str, p: float | None = None, top_k: int | None = None,
              weighting: str = "softmax", floor: float = 0.0) -> list[Routing]:
        """Batched routing: one :class:`Routing` per prompt (see :func:`select`)."""
        if p is None:
            p = self.default_p
        check_selection_args(p, top_k, weighting, floor)
        pr = self.probs(texts)
        out = []
        for row in pr:
            idx, w, kp = select(row, p=p, top_k=top_k, weighting=weighting, floor=floor)
            out.append(Routing([self.labels[i] for i in idx], idx, w, kp))
        return out

    def predict(self, texts: Sequence[str] | str) -> list[str]:
        pr = self.probs(texts)
        return [self.labels[i] for i in pr.argmax(axis=1)]


# ---------------------------------------------------------------- data, evaluation, benchmark

def _history_text(prev: str, current: str) -> str:
    return prev + HISTORY_SEPARATOR + current


def build_training_set(rows_by_task: dict[str, list[dict]], *, no_prefix_frac: float = 0.3, history_frac: float = 0.3,
                       seed: int = 0) -> tuple[list[str], list[str]]:
    """Every training row rendered as at inference (``user_message(row)``), plus augmented copies
    of a random `no_prefix_frac` of rows without the task prefix and of `history_frac` with a
    previous turn from another task prepended (``prev + "\\n\\n" + current``)."""
    from .tasks import user_message

    rng = random.Random(seed)
    names = list(rows_by_task)
    texts, labels = [], []
    for task, rows in rows_by_task.items():
        for r in rows:
            texts.append(user_message(r))
            labels.append(task)
    others = {t: [n for n in names if n != t] for t in names}
    for task, rows in rows_by_task.items():
        for r in rows:
            if no_prefix_frac and rng.random() < no_prefix_frac and r.get("task_prefix"):
                texts.append(user_message(r, with_prefix=False))
                labels.append(task)
            if history_frac and others[task] and rng.random() < history_frac:
                prev_task = rng.choice(others[task])
                prev = rng.choice(rows_by_task[prev_task])
                cur = user_message(r, with_prefix=rng.random() >= no_prefix_frac)
                texts.append(_history_text(user_message(prev), cur))
                labels.append(task)
    return texts, labels


def evaluate(plugin: Plugin, rows_by_task: dict[str, list[dict]], variant: str = "clean", seed: int = 1,
             top_confusions: int = 10) -> dict:
    """Held-out accuracy per task (top-1) for prompts rendered `variant`: "clean" (as at inference),
    "no_prefix" (task prefix removed) or "history" (a previous turn of another task prepended)."""
    from .tasks import user_message

    rng = random.Random(seed)
    names = list(rows_by_task)
    texts, gold = [], []
    for task, rows in rows_by_task.items():
        for r in rows:
            if variant == "clean":
                t = user_message(r)
            elif variant == "no_prefix":
                t = user_message(r, with_prefix=False)
            elif variant == "history":
                prev_task = rng.choice([n for n in names if n != task])
                t = _history_text(user_message(rng.choice(rows_by_task[prev_task])), user_message(r))
            else:
                raise ValueError(variant)
            texts.append(t)
            gold.append(task)
    pred = []
    for b in range(0, len(texts), 512):
        pred += plugin.predict(texts[b: b + 512])
    per_task, conf = {}, Counter()
    for task in names:
        pairs = [(g, p) for g, p in zip(gold, pred) if g == task]
        per_task[task] = sum(g == p for g, p in pairs) / len(pairs)
        conf.update((g, p) for g, p in pairs if g != p)
    return {"variant": variant, "accuracy": sum(per_task.values()) / len(per_task),
            "micro_accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold), "per_task": per_task,
            "confusions": [{"gold": g, "pred": p, "count": c} for (g, p), c in conf.most_common(top_confusions)],
            "n": len(texts)}


def bench_routing(plugin: Plugin, texts: Sequence[str], batch_size: int = 64, repeats: int = 3,
                  threads: int | None = None, **route_kw) -> dict:
    """Median-of-`repeats` wall time of :meth:`Plugin.route` over `texts` in batches -> ms per prompt
    (featurisation + forward + selection), plus single-prompt latency. `threads` sets torch's thread
    count for the measurement (restored after)."""
    import torch

    if threads:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return bench_routing(plugin, texts, batch_size, repeats, None, **route_kw)
        finally:
            torch.set_num_threads(old)
    texts = _check_texts(texts)
    if not texts:
        raise DLPLoRAError("bench_routing needs at least one prompt")
    plugin.route(texts[:batch_size], **route_kw)  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in range(0, len(texts), batch_size):
            plugin.route(texts[b: b + batch_size], **route_kw)
        runs.append((time.perf_counter() - t0) * 1000 / len(texts))
    singles = []
    for t in texts[: min(len(texts), 200)]:
        t0 = time.perf_counter()
        plugin.route([t], **route_kw)
        singles.append((time.perf_counter() - t0) * 1000)
    return {"ms_per_prompt": float(np.median(runs)), "batch_size": batch_size, "prompts": len(texts),
            "single_prompt_ms": float(np.median(singles)), "threads": torch.get_num_threads()}


def load_task_rows(data_dir: str | os.PathLike, tasks: Sequence[str], split: str) -> dict[str, list[dict]]:
    from .tasks import load_split

    out = {}
    for t in tasks:
        rows = load_split(data_dir, t, split)
        if not rows:
            raise DLPLoRAError(f"the prepared {split} split of {t} in {data_dir} is empty")
        out[t] = rows
    return out


def train_plugin_from_data(data_dir: str | os.PathLike, tasks: Sequence[str] | str, *, epochs: int = 2, seed: int = 0,
                           augment: bool = True, robustness: bool = True, log=None, **train_kw) -> tuple[Plugin, dict]:
    """Train a router on the prepared train splits of `tasks` (labels = task names) and measure it on
    their test splits. Returns (plugin, report) with accuracy (mean over tasks of held-out top-1),
    per_task, confusions, params, tasks, train_seconds and, with `robustness`, the no-prefix and
    history-prepended accuracies."""
    from .tasks import parse_tasks

    names = parse_tasks(tasks, data_dir) if isinstance(tasks, str) else list(tasks)
    _check_labels(names)
    parse_tasks(names, data_dir)  # every label must be a known task or have prepared data
    train_rows = load_task_rows(data_dir, names, "train")
    test_rows = load_task_rows(data_dir, names, "test")
    t0 = time.perf_counter()
    texts, labels = build_training_set(train_rows, seed=seed, **({} if augment else
                                                                 {"no_prefix_frac": 0.0, "history_frac": 0.0}))
    plugin = Plugin.train(texts, labels, names, epochs=epochs, seed=seed, log=log, **train_kw)
    train_s = time.perf_counter() - t0
    plugin.config["training"].update({"augment": augment, "data_dir": str(data_dir)})
    clean = evaluate(plugin, test_rows, "clean")
    report = {"accuracy": clean["accuracy"], "micro_accuracy": clean["micro_accuracy"], "per_task": clean["per_task"],
              "confusions": clean["confusions"], "params": plugin.params, "tasks": len(names),
              "train_examples": len(texts), "test_examples": clean["n"], "train_seconds": round(train_s, 2),
              "epochs": epochs, "seed": seed}
    if robustness:
        for v in ("no_prefix", "history"):
            r = evaluate(plugin, test_rows, v)
            report[f"{v}_accuracy"] = r["accuracy"]
            report[f"{v}_per_task"] = r["per_task"]
            report[f"{v}_confusions"] = r["confusions"][:5]
    plugin.config["report"] = {k: report[k] for k in ("accuracy", "train_seconds", "tasks")
                               if k in report} | {k: report[k] for k in ("no_prefix_accuracy", "history_accuracy")
                                                  if k in report}
    return plugin, report
