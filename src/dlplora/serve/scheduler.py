"""Continuous batching: one background thread owns the model and decodes every running request together.

The running batch is one KV cache (left-padded rows) with a 2-D attention mask and explicit per-row position
ids. At every decode-step boundary the scheduler

1. drops rows that finished (EOS, token limit, stop string), were cancelled (client gone) or timed
   out: their rows are cut out of the cache, and leading all-padding columns are trimmed;
2. admits waiting requests (FIFO, up to ``max_batch_size`` rows): the newcomers are prefilled
   together in their own left-padded batch with their own routing, their first token is sampled,
   then their cache is merged into the running one (the shorter of the two is left-padded with
   zeros along the sequence axis, the mask with 0, and both are concatenated along the batch axis);
3. re-sets the fused layers' per-row routing when the batch composition changed (one
   ``{name: weight}`` set per row: ``unmerged`` bmm path for a mixed batch; when every row uses the
   same set, ``auto`` mode uses the shared path, or merges the weights when the fewest tokens any
   row still has to generate is enough to repay the merge);
4. runs one decode step for every row and samples each row with its own settings.

A failing prefill is retried row by row so that only the bad request fails; a failing decode step
fails the running rows with 500 and the scheduler keeps serving. The prefill, the decode step, the
sampling, the stop strings and the cache surgery are :mod:`dlplora.decoding`'s.
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..decoding import (StopStreamer, cache_concat_rows, cache_drop_columns, cache_select_rows, check_cache_support,
                        decode_step, pad_left, prefill, sample)
from .config import APIError, QueueFull, ServeConfig
from .metrics import Metrics

log = logging.getLogger("dlplora.server")


@dataclass(eq=False)
class GenRequest:
    """A validated request, as the scheduler sees it. Events go to `emit(kind, payload)`:
    ("delta", text), ("done", {...}), ("error", APIError)."""

    ids: list[int]
    adapters: dict[str, float]
    max_new: int
    emit: Callable[[str, Any], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    deadline: float = math.inf
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # scheduler state
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    generator: Any = None
    streamer: StopStreamer = field(init=False)

    def __post_init__(self):
        self.streamer = StopStreamer(self.stop)

    @property
    def text(self) -> str:
        """The completion so far (cut at a stop string)."""
        return self.streamer.text

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class RunningBatch:
    """Rows decoding together: one KV cache, a [b, L] mask, next positions [b, 1], the token each
    row feeds next."""

    reqs: list[GenRequest]
    cache: Any
    mask: torch.Tensor
    pos: torch.Tensor
    feed: list[int]

    def select(self, keep: list[int]) -> None:
        if len(keep) == len(self.reqs):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        cache_select_rows(self.cache, idx)
        self.mask = self.mask.index_select(0, idx)
        self.pos = self.pos.index_select(0, idx)
        self.reqs = [self.reqs[i] for i in keep]
        self.feed = [self.feed[i] for i in keep]
        self.trim()

    def trim(self) -> None:
        """Drop leading columns that are padding in every row."""
        if not self.reqs:
            return
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start > 0:
            cache_drop_columns(self.cache, start)
            self.mask = self.mask[:, start:]

    def merge(self, other: "RunningBatch", model) -> "RunningBatch":
        width = max(self.mask.shape[1], other.mask.shape[1])
        mask = torch.cat([pad_left(self.mask, width, 1), pad_left(other.mask, width, 1)], 0)
        return RunningBatch(self.reqs + other.reqs, cache_concat_rows(model, self.cache, other.cache, width), mask,
                            torch.cat([self.pos, other.pos], 0), self.feed + other.feed)


class Scheduler:
    """The background thread that owns the model and runs continuous batching (see module doc)."""

    def __init__(self, engine, config: ServeConfig, metrics: Metrics, tok_lock: threading.Lock):
        check_cache_support(engine.model)
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tok_lock = tok_lock
        self.pending: collections.deque[GenRequest] = collections.deque()
        self.cv = threading.Condition()
        self.batch: RunningBatch | None = None
        self._routed_for: tuple | None = None
        self._stop = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="dlp-lora-scheduler", daemon=True)
        self.dev = next(engine.model.parameters()).device
        self._eos = set(int(e) for e in engine.eos_ids)
        self._pad = engine.tokenizer.pad_token_id
        self._takes_expected = "expected_tokens" in inspect.signature(engine.fusion.set_routing).parameters

    # -------------------------------------------------- public
    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stop

    def submit(self, req: GenRequest) -> None:
        with self.cv:
            if self._stop:
                raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
            if len(self.pending) >= self.config.max_queue:
                raise QueueFull()
            self.pending.append(req)
            self.metrics.queue_depth = len(self.pending)
            self.cv.notify()

    @property
    def running(self) -> int:
        b = self.batch
        return len(b.reqs) if b is not None else 0

    # -------------------------------------------------- the loop
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                if self._stop:
                    break
                self._expire_pending()
                if self.batch is None and not self.pending:
                    self.cv.wait(0.05)
                    continue
                room = self.config.max_batch_size - self.running
                new = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
                self.metrics.queue_depth = len(self.pending)
            try:
                with torch.inference_mode(), self.engine.lock:
                    self._drop_gone()
                    if new:
                        self._admit(new)
                    if self.batch is not None:
                        self._step()
            except Exception as exc:  # a bug or an out-of-memory: fail the running rows, keep serving
                log.exception("decode step failed")
                for r in (self.batch.reqs if self.batch is not None else []) + [r for r in new if not r.finished]:
                    self._fail(r, APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error"))
                self.batch = None
                self._routed_for = None
                try:
                    self.engine.fusion.clear()
                except Exception:  # pragma: no cover
                    log.exception("could not clear the fusion")
            self.metrics.running = self.running
        # shutting down: answer everyone still waiting
        err = APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        for r in list(self.pending) + (self.batch.reqs if self.batch is not None else []):
            self._fail(r, err)
        self.pending.clear()
        self.batch = None
        try:
            self.engine.fusion.clear()
        except Exception:  # pragma: no cover
            pass

    def _expire_pending(self) -> None:
        now = time.monotonic()
        keep = collections.deque()
        for r in self.pending:
            if r.cancelled:
                self.metrics.cancelled += 1
            elif now > r.deadline:
                self._timeout(r)
            else:
                keep.append(r)
        self.pending = keep
        self.metrics.queue_depth = len(keep)

    def _drop_gone(self) -> None:
        b = self.batch
        if b is None:
            return
        now = time.monotonic()
        keep = []
        for i, r in enumerate(b.reqs):
            if r.cancelled:
                self.metrics.cancelled += 1
                r.finished = True
            elif now > r.deadline:
                self._timeout(r)
            else:
                keep.append(i)
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self.batch = None
        else:
            self.batch.select(keep)

    # -------------------------------------------------- events
    def _fail(self, r: GenRequest, err: APIError) -> None:
        if not r.finished:
            r.finished = True
            r.emit("error", err)

    def _timeout(self, r: GenRequest) -> None:
        self.metrics.timeouts += 1
        self._fail(r, APIError(504, f"the request ran past the server's timeout of {self.config.request_timeout:g} s "
                                    f"({len(r.generated)} tokens generated)", "timeout_error", code="timeout"))

    def _decode(self, ids: list[int]) -> str:
        with self.tok_lock:
            return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    def _accept(self, r: GenRequest, t: int) -> bool:
        """Take row `r`'s sampled token; stream what is safe; True when the row is finished."""
        reason = None
        if t in self._eos:
            reason = "stop"
        else:
            r.generated.append(t)
            if len(r.generated) >= r.max_new:
                reason = "length"
        delta, stopped = r.streamer.update(self._decode(r.generated), final=reason is not None)
        if stopped:
            reason = "stop"
        if delta:
            r.emit("delta", delta)
        if reason is not None:
            r.finished = True
            self.metrics.add_tokens(generated=len(r.generated))
            self.metrics.observe_latency(time.monotonic() - r.arrived)
            r.emit("done", {"finish_reason": reason, "text": r.text, "completion_tokens": len(r.generated),
                            "prompt_tokens": len(r.ids), "token_ids": list(r.generated)})
            return True
        return False

    def _pick(self, reqs: list[GenRequest], logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, r in enumerate(reqs):
            if r.temperature <= 0:
                out.append(greedy[i])
                continue
            if r.generator is None:
                r.generator = torch.Generator(device=self.dev)
                r.generator.manual_seed(r.seed if r.seed is not None else int(torch.randint(0, 2 ** 31, (1,))))
            out.append(int(sample(logits[i:i + 1], r.temperature, r.top_p, r.generator)[0]))
        return out

    def _set_routing(self, reqs: list[GenRequest]) -> None:
        key = tuple(r.id for r in reqs)
        if key != self._routed_for:
            kw = {}
            if self._takes_expected:
                # the routing holds at most until the first row finishes: auto mode merges the weights
                # only when that is long enough to repay the merge
                kw["expected_tokens"] = min(r.max_new - len(r.generated) for r in reqs)
            self.engine.fusion.set_routing([r.adapters for r in reqs], mode=self.engine.mode, **kw)
            self._routed_for = key

    # -------------------------------------------------- prefill / decode
    def _prefill(self, reqs: list[GenRequest]) -> tuple[RunningBatch, torch.Tensor]:
        self._set_routing(reqs)
        cache, mask, pos, logits = prefill(self.engine.model, [r.ids for r in reqs], self._pad)
        self.metrics.add_tokens(prompt=sum(len(r.ids) for r in reqs))
        return RunningBatch(list(reqs), cache, mask, pos[:, -1:] + 1, [0] * len(reqs)), logits

    def _admit(self, new: list[GenRequest]) -> None:
        for r in new:
            if r.cancelled and not r.finished:
                self.metrics.cancelled += 1
                r.finished = True
        new = [r for r in new if not r.finished]
        if not new:
            return
        try:
            groups = [self._prefill(new)]
        except Exception:
            # retry one by one so that only the request that breaks fails
            log.exception("prefill of %d requests failed; retrying them one by one", len(new))
            groups = []
            for r in new:
                try:
                    groups.append(self._prefill([r]))
                except Exception as exc:
                    self._fail(r, APIError(500, f"prefill failed: {type(exc).__name__}: {exc}", "server_error"))
        for nb, logits in groups:
            toks = self._pick(nb.reqs, logits)
            keep = []
            for i, (r, t) in enumerate(zip(nb.reqs, toks)):
                if not self._accept(r, t):
                    nb.feed[i] = t
                    keep.append(i)
            if not keep:
                continue
            nb.select(keep)
            self.batch = nb if self.batch is None else self.batch.merge(nb, self.engine.model)
        self._routed_for = None  # the prefill changed the routing

    def _step(self) -> None:
        b = self.batch
        self._set_routing(b.reqs)
        self.metrics.observe_batch(len(b.reqs))
        feed = torch.tensor(b.feed, dtype=torch.long, device=self.dev)
        b.mask = torch.cat([b.mask, torch.ones((len(b.reqs), 1), dtype=b.mask.dtype, device=self.dev)], 1)
        logits = decode_step(self.engine.model, feed, b.mask, b.pos, b.cache)
        b.pos = b.pos + 1
        self.steps += 1
        toks = self._pick(b.reqs, logits)
        keep = []
        for i, (r, t) in enumerate(zip(b.reqs, toks)):
            if r.finished:
                continue
            if r.cancelled:
                self.metrics.cancelled += 1
                r.finished = True
                continue
            if not self._accept(r, t):
                b.feed[i] = t
                keep.append(i)
        self._keep(keep)
