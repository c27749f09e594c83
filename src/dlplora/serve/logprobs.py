"""Per-token log probabilities for the OpenAI ``logprobs`` fields, from the logits the decode already computes.

The scheduler picks each row's next token from the logits of its step (the first token after the prefill and every
decode step); for a request that asked for log probabilities (:class:`dlplora.serve.scheduler.GenRequest` with
``logprobs`` = the number of alternatives) it calls :func:`record_logprobs`, which records the chosen token's log
probability and the ``logprobs`` most likely tokens. They are read from the model's raw distribution (log-softmax of
the logits, before temperature and top-p), as OpenAI and vLLM report them. Entry ``i`` belongs to the request's
``i``-th generated token; the entry of an EOS token (not part of the completion) and any entry past the end are never
reported. Rows that did not ask cost nothing.

:class:`ChoiceLogprobs` turns one choice's entries into the tokens of its text: each token's string and bytes, its
character offset in the completion, and which tokens a streamed prefix of the text covers (a token is reported
once the text it starts in has gone out; after a stop string, only the tokens that start before the cut).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


def record_logprobs(reqs: list, logits: torch.Tensor, toks: list[int]) -> None:
    """Append one entry to each request's ``entries`` (requests with ``logprobs`` and ``entries``, as
    :class:`dlplora.serve.scheduler.GenRequest`): the log probability of its token ``toks[i]`` under
    ``logits[i]`` and its ``logprobs`` most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(toks, device=lp.device)[:, None])[:, 0].tolist()
    k = min(max(r.logprobs for r in reqs), lp.shape[-1])
    if k > 0:
        top_v, top_i = lp.topk(k, dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
    else:
        top_v = top_i = [[] for _ in reqs]
    for j, r in enumerate(reqs):
        n = r.logprobs
        r.entries.append((toks[j], chosen[j], list(zip(top_i[j][:n], top_v[j][:n]))))


@dataclass
class TokenLogprob:
    """One reported token: its text, bytes, log probability, character offset in the completion and its
    alternatives [(text, bytes, log probability)]."""

    token: str
    bytes: list[int]
    logprob: float
    offset: int
    top: list[tuple[str, list[int], float]]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level BPE token uses -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Token strings and bytes for one tokenizer (shared by the requests of a server; uses its lock)."""

    def __init__(self, tokenizer, lock: threading.Lock | None = None):
        self.tok = tokenizer
        self.lock = lock or threading.Lock()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self._bytes = _byte_decoder() if self.byte_level else {}
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def token(self, tid: int) -> tuple[str, list[int]]:
        """(the token's text, its UTF-8 bytes; for a byte-level BPE the exact bytes, which may be part of a
        character whose text then shows U+FFFD)."""
        got = self._cache.get(tid)
        if got is None:
            text = self.tok.decode([tid], skip_special_tokens=False)
            raw = None
            if self.byte_level and tid not in self._special:
                piece = self.tok.convert_ids_to_tokens(tid)
                if isinstance(piece, str) and all(c in self._bytes for c in piece):
                    raw = [self._bytes[c] for c in piece]
            got = (text, raw if raw is not None else list(text.encode("utf-8", "surrogatepass")))
            if len(self._cache) < 1 << 16:
                self._cache[tid] = got
        return got

    def decoded_len(self, ids: list[int]) -> int:
        return len(self.tok.decode(ids, skip_special_tokens=True))


class ChoiceLogprobs:
    """The log probabilities of one choice, reported in order: :meth:`stream` for what a streamed prefix of the
    text covers, :meth:`final` for the rest once the choice is done."""

    def __init__(self, req, text: TokenText):  # req: a GenRequest that asked for log probabilities
        self.req, self.text = req, text
        self.sent = 0  # tokens reported so far
        self._offsets = [0]  # _offsets[j]: characters in the decoded first j tokens (made non-decreasing)

    def _offset(self, ids: list[int], j: int) -> int:
        while len(self._offsets) <= j:
            m = len(self._offsets)
            self._offsets.append(max(self._offsets[-1], self.text.decoded_len(ids[:m])))
        return self._offsets[j]

    def _take(self, ids: list[int], upto: int) -> list[TokenLogprob]:
        out = []
        entries = self.req.entries
        with self.text.lock:
            for j in range(self.sent, min(upto, len(ids), len(entries))):
                tid, lp, top = entries[j]
                tok, raw = self.text.token(tid)
                alts = [(*self.text.token(a), v) for a, v in top]
                out.append(TokenLogprob(tok, raw, lp, self._offset(ids, j), alts))
        self.sent += len(out)
        return out

    def stream(self, emitted_chars: int) -> list[TokenLogprob]:
        """The tokens not yet reported that start inside the first `emitted_chars` characters of the text."""
        ids = list(self.req.generated)
        n = self.sent
        with self.text.lock:
            while n < len(ids) and self._offset(ids, n) < emitted_chars:
                n += 1
        return self._take(ids, n)

    def final(self, done: dict) -> list[TokenLogprob]:
        """The rest of the tokens of the finished choice (`done`: the scheduler's "done" payload): all of them,
        or, when a stop string cut the text, those that start before the cut."""
        ids, text = list(done["token_ids"]), done["text"]
        n = len(ids)
        with self.text.lock:
            if self.text.decoded_len(ids) > len(text):  # a stop string cut the text
                n = self.sent
                while n < len(ids) and self._offset(ids, n) < len(text):
                    n += 1
        return self._take(ids, n)
