"""The plugin's own tokenizer: prompt text -> hashed word and byte n-gram bucket ids, per segment.

The text is normalised (lower-cased, whitespace collapsed) and cut into *segments*: its head (first
``head_bytes`` UTF-8 bytes), its body (the first ``body_bytes``; a wider window than the head, so
content past the head counts without leaning on the tail), and its tail (last ``tail_bytes``). A
text no longer than ``head_bytes`` is one segment shared by all slots. Each segment becomes a bag
of bucket ids; the router embeds each bag (mean) and concatenates the slots.

Hashing is deterministic (FNV-style 64-bit polynomial hashes with a murmur3 finaliser, no Python
``hash()``) and vectorised with numpy over a whole batch.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import TURN_SEPARATOR
from ..errors import DLPLoRAError

FEATURIZER = "hashed-ngrams-v1"
RETRAIN_HINT = "retrain with `dlp-lora train-plugin --library LIB`"
SLOTS = ("head", "body", "tail", "history")

_M64 = (1 << 64) - 1
_PRIME = np.uint64(1099511628211)  # the 64-bit FNV prime
_MIX1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX2 = np.uint64(0xC4CEB9FE1A85EC53)



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

    The text is lower-cased and its whitespace collapsed, then cut into the segments of
    :meth:`slots` (see the module docstring); ``body_bytes = 0`` leaves out the body slot (the
    layout of plugins trained before it existed)."""

    bits: int = 18
    char_ngrams: tuple[int, ...] = (3, 4, 5)
    word_ngrams: tuple[int, ...] = (1, 2)
    head_bytes: int = 256
    tail_bytes: int = 256
    body_bytes: int = 0
    history_bytes: int = 0
    lowercase: bool = True

    @property
    def buckets(self) -> int:
        return 1 << self.bits

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(s for s in SLOTS if (s != "body" or self.body_bytes) and (s != "history" or self.history_bytes))

    def to_dict(self) -> dict:
        return {"kind": FEATURIZER, "bits": self.bits, "buckets": self.buckets, "char_ngrams": list(self.char_ngrams),
                "word_ngrams": list(self.word_ngrams), "head_bytes": self.head_bytes, "tail_bytes": self.tail_bytes,
                "body_bytes": self.body_bytes, "history_bytes": self.history_bytes, "lowercase": self.lowercase,
                "turns": "the text after the last turn separator (\\n\\x1e\\n) is the current turn; head, body and "
                         "tail are cut from it, history is the last history_bytes before it",
                "normalise": "lower-case, whitespace runs -> one space",
                "hash": "byte n-grams: 64-bit polynomial hash (FNV prime); word tokens: sum of byte * fixed odd "
                        "position multiplier, word n-grams: polynomial over token hashes; then xor salt(crc32 of kind), "
                        "xor-shift 29, multiply; bucket = top `bits` bits"}

    @classmethod
    def from_dict(cls, d: dict) -> "HashedNgramTokenizer":
        if d.get("kind") != FEATURIZER:
            raise DLPLoRAError(f"plugin tokenizer {d.get('kind')!r} is not supported by this version "
                               f"(expects {FEATURIZER}); {RETRAIN_HINT}")
        return cls(bits=int(d["bits"]), char_ngrams=tuple(d["char_ngrams"]), word_ngrams=tuple(d["word_ngrams"]),
                   head_bytes=int(d["head_bytes"]), tail_bytes=int(d["tail_bytes"]),
                   body_bytes=int(d.get("body_bytes", 0)), history_bytes=int(d.get("history_bytes", 0)),
                   lowercase=bool(d["lowercase"]))

    # -------------------------------------------------------- segments
    def _normalise(self, text: str) -> bytes:
        norm = " ".join(text.split()).replace("\x00", " ")  # NUL separates segments in the batch buffer
        # a lone surrogate (JSON can carry "\ud800") is hashed as its 3 bytes instead of failing to encode
        return (norm.lower() if self.lowercase else norm).encode("utf-8", "surrogatepass")

    def _segments(self, text: str) -> list[bytes]:
        """The segments of one text in slot order; a current turn that fits in the head is one segment
        shared by the head, body and tail slots (then only the history follows, if that slot exists)."""
        history = ""
        if self.history_bytes and TURN_SEPARATOR in text:
            history, text = text.rsplit(TURN_SEPARATOR, 1)
        b = self._normalise(text)
        if len(b) <= self.head_bytes:
            segs = [b]
        else:
            segs = [b[: self.head_bytes]] + ([b[: self.body_bytes]] if self.body_bytes else []) + [b[-self.tail_bytes:]]
        if self.history_bytes:
            segs.append(self._normalise(history)[-self.history_bytes:] if history else b"")
        return segs

    def encode(self, texts: Sequence[str], chunk: int = 2048) -> "Features":
        """Featurise a batch: flat bucket ids grouped by segment, plus each text's segment per slot."""
        if len(texts) <= chunk:
            return self._encode(texts)
        return Features.concat([self._encode(texts[b: b + chunk]) for b in range(0, len(texts), chunk)])

    def _encode(self, texts: Sequence[str]) -> "Features":
        segs: list[bytes] = []
        n_slots = len(self.slots)
        n_turn = n_slots - (1 if self.history_bytes else 0)
        slots = np.empty((len(texts), n_slots), dtype=np.int64)
        for i, t in enumerate(texts):
            s = self._segments(t)
            cur = len(s) - (1 if self.history_bytes else 0)
            slots[i, :n_turn] = len(segs) + (np.arange(n_turn) if cur > 1 else 0)
            if self.history_bytes:
                slots[i, n_turn] = len(segs) + len(s) - 1
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
        return Features(ids, offsets, counts, slots)


@dataclass
class Features:
    ids: np.ndarray  # flat bucket ids, grouped by segment
    offsets: np.ndarray  # start of each segment in ids
    counts: np.ndarray  # ids per segment
    slots: np.ndarray  # [texts, slots]: each text's segment for each slot (all equal for a short text)

    def __len__(self) -> int:
        return len(self.slots)

    @staticmethod
    def concat(parts: list["Features"]) -> "Features":
        seg_base = np.cumsum([0] + [len(f.counts) for f in parts[:-1]])
        id_base = np.cumsum([0] + [len(f.ids) for f in parts[:-1]])
        return Features(np.concatenate([f.ids for f in parts]),
                        np.concatenate([f.offsets + b for f, b in zip(parts, id_base)]),
                        np.concatenate([f.counts for f in parts]),
                        np.concatenate([f.slots + b for f, b in zip(parts, seg_base)]))

    def take(self, rows: np.ndarray) -> "Features":
        """The features of texts `rows`, re-packed contiguously (for minibatches)."""
        segs, inv = np.unique(self.slots[rows], return_inverse=True)
        lengths = self.counts[segs]
        starts = self.offsets[segs]
        total = int(lengths.sum())
        new_off = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        idx = np.repeat(starts - new_off, lengths) + np.arange(total, dtype=np.int64)
        return Features(self.ids[idx], new_off, lengths, inv.reshape(len(rows), -1).astype(np.int64))

    def tensors(self):
        import torch

        return torch.from_numpy(self.ids), torch.from_numpy(self.offsets), torch.from_numpy(self.slots)
