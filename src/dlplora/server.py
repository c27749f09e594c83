"""An OpenAI-compatible HTTP server for a DLP-LoRA library, with continuous multi-LoRA batching.

>>> engine = DLPLoRA.from_library("lib")
>>> app = create_app(engine, ServeConfig(max_batch_size=16))
>>> uvicorn.run(app, host="127.0.0.1", port=8000)        # or: dlp-lora serve --library lib

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming SSE or not),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Adapter choice per request (every response carries ``routing``: the adapters used and their weights):

* ``"model": "<base model>"`` (or ``"dlp-lora"`` / ``"auto"``, or no model): the plugin routes the
  request by its content, once (chat: the last user turn plus the engine's ``route_window`` earlier
  user turns);
* ``"model": "<adapter>"``: that adapter alone, weight 1 (like vLLM's LoRA serving);
* ``"adapters": {"name": weight, ...}`` (extension field): this weighted mix, used as given
  (``{}`` = the base model).

Continuous batching (:class:`Scheduler`): one background thread owns the model. The running batch
is one KV cache (left-padded rows) with a 2-D attention mask and explicit per-row position ids. At
every decode-step boundary the scheduler

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

Sampling is greedy unless the request gives ``temperature`` (> 0; then ``top_p`` and ``seed``
apply, with one generator per request). A row's results do not depend on its neighbours (padding
is masked, positions are per row), so a greedy request gives the same text batched or alone, up to
float rounding. Requests wait in a bounded queue (``max_queue``; beyond it: 503 with Retry-After);
each has a token limit (``max_tokens_limit``) and a deadline (``request_timeout``; then 504). A
failing prefill is retried row by row so that only the bad request fails; a failing decode step
fails the running rows with 500 and the server keeps serving. A client that disconnects is dropped
from the batch at the next step boundary.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from starlette.requests import Request  # module level: FastAPI resolves the handlers' annotations here

from .errors import DLPLoRAError

log = logging.getLogger("dlplora.server")

ROUTE_ALIASES = ("dlp-lora", "auto", "dlp-lora/auto")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class ServeConfig:
    max_batch_size: int = 16
    max_queue: int = 64
    max_tokens_limit: int = 512
    request_timeout: float = 120.0
    max_body_bytes: int = 1 << 20
    model_name: str | None = None  # the public id of the base model (default: the backbone's name)

    def check(self) -> "ServeConfig":
        for name in ("max_batch_size", "max_queue", "max_tokens_limit", "max_body_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DLPLoRAError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not (self.request_timeout > 0 and math.isfinite(self.request_timeout)):
            raise DLPLoRAError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout!r}")
        return self


class APIError(Exception):
    """An error answered in the OpenAI format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class QueueFull(Exception):
    pass


# ---------------------------------------------------------------- metrics

class Metrics:
    """Counters rendered as Prometheus text exposition (no client library needed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> n
        self.routed: collections.Counter = collections.Counter()  # adapter -> n
        self.sources: collections.Counter = collections.Counter()  # plugin / pinned / explicit -> n
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.cancelled = 0
        self.timeouts = 0
        self.batch_counts = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0
        self.batch_n = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_n = 0
        self.queue_depth = 0
        self.running = 0

    @staticmethod
    def _bucket(buckets, value) -> int:
        for i, b in enumerate(buckets):
            if value <= b:
                return i
        return len(buckets)

    def observe_batch(self, size: int) -> None:
        with self.lock:
            self.batch_counts[self._bucket(BATCH_BUCKETS, size)] += 1
            self.batch_sum += size
            self.batch_n += 1

    def observe_latency(self, seconds: float) -> None:
        with self.lock:
            self.latency_counts[self._bucket(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds
            self.latency_n += 1

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, int(status))] += 1

    def count_routing(self, routing: dict) -> None:
        with self.lock:
            self.sources[routing["source"]] += 1
            for a in routing["adapters"]:
                self.routed[a["name"]] += 1

    def add_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def render(self, adapters: list[str]) -> str:
        def esc(s: str) -> str:
            return str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

        def hist(name, help_, buckets, counts, total, n):
            out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
            acc = 0
            for b, c in zip(list(buckets) + ["+Inf"], counts):
                acc += c
                out.append(f'{name}_bucket{{le="{b}"}} {acc}')
            out += [f"{name}_sum {total}", f"{name}_count {n}"]
            return out

        with self.lock:
            lines = ["# HELP dlp_lora_requests_total HTTP requests by endpoint and status code.",
                     "# TYPE dlp_lora_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f'dlp_lora_requests_total{{endpoint="{esc(ep)}",status="{st}"}} {n}')
            lines += ["# HELP dlp_lora_generated_tokens_total Completion tokens generated.",
                      "# TYPE dlp_lora_generated_tokens_total counter",
                      f"dlp_lora_generated_tokens_total {self.generated_tokens}",
                      "# HELP dlp_lora_prompt_tokens_total Prompt tokens prefilled.",
                      "# TYPE dlp_lora_prompt_tokens_total counter",
                      f"dlp_lora_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP dlp_lora_cancelled_total Requests dropped because the client went away.",
                      "# TYPE dlp_lora_cancelled_total counter",
                      f"dlp_lora_cancelled_total {self.cancelled}",
                      "# HELP dlp_lora_timeouts_total Requests that ran past the request timeout.",
                      "# TYPE dlp_lora_timeouts_total counter",
                      f"dlp_lora_timeouts_total {self.timeouts}"]
            lines += hist("dlp_lora_batch_size", "Rows in each decode step of the running batch.", BATCH_BUCKETS,
                          self.batch_counts, self.batch_sum, self.batch_n)
            lines += hist("dlp_lora_request_latency_seconds", "Time from arrival to the last token.",
                          LATENCY_BUCKETS, self.latency_counts, round(self.latency_sum, 6), self.latency_n)
            lines += ["# HELP dlp_lora_queue_depth Requests waiting to join the running batch.",
                      "# TYPE dlp_lora_queue_depth gauge", f"dlp_lora_queue_depth {self.queue_depth}",
                      "# HELP dlp_lora_running_requests Rows in the running batch.",
                      "# TYPE dlp_lora_running_requests gauge", f"dlp_lora_running_requests {self.running}",
                      "# HELP dlp_lora_adapter_routed_total Requests that used each adapter (any weight).",
                      "# TYPE dlp_lora_adapter_routed_total counter"]
            for name in adapters:
                lines.append(f'dlp_lora_adapter_routed_total{{adapter="{esc(name)}"}} {self.routed.get(name, 0)}')
            lines += ["# HELP dlp_lora_routing_source_total Requests by how their adapters were chosen.",
                      "# TYPE dlp_lora_routing_source_total counter"]
            for src in ("plugin", "pinned", "explicit"):
                lines.append(f'dlp_lora_routing_source_total{{source="{src}"}} {self.sources.get(src, 0)}')
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- one generation request

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
    text: str = ""
    emitted: int = 0
    finished: bool = False
    generator: Any = None

    def cancel(self) -> None:
        self.cancelled = True


# ---------------------------------------------------------------- KV-cache surgery

def _layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise DLPLoRAError("continuous batching needs transformers' layered DynamicCache (transformers >= 4.56)")
    return layers


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in _layers(cache)]


def _cache_from(model, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=kv, config=model.config)
    except TypeError:
        return DynamicCache(ddp_cache_data=kv)


def _check_cache_support(model) -> None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    bad = {type(layer).__name__ for layer in getattr(cache, "layers", []) if type(layer) is not DynamicLayer}
    if bad:
        raise DLPLoRAError(f"the server's continuous batching needs full-attention KV caches; this model uses "
                           f"{', '.join(sorted(bad))} layers")


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


@dataclass
class _Batch:
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
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)
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
            for layer in _layers(self.cache):
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]
            self.mask = self.mask[:, start:]

    def merge(self, other: "_Batch", model) -> "_Batch":
        width = max(self.mask.shape[1], other.mask.shape[1])
        kv = []
        for (k1, v1), (k2, v2) in zip(_kv(self.cache), _kv(other.cache)):
            kv.append((torch.cat([_left_pad(k1, width, 2), _left_pad(k2, width, 2)], 0),
                       torch.cat([_left_pad(v1, width, 2), _left_pad(v2, width, 2)], 0)))
        mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)], 0)
        return _Batch(self.reqs + other.reqs, _cache_from(model, kv), mask, torch.cat([self.pos, other.pos], 0),
                      self.feed + other.feed)


# ---------------------------------------------------------------- the scheduler

class Scheduler:
    """The background thread that owns the model and runs continuous batching (see module doc)."""

    def __init__(self, engine, config: ServeConfig, metrics: Metrics, tok_lock: threading.Lock):
        _check_cache_support(engine.model)
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tok_lock = tok_lock
        self.pending: collections.deque[GenRequest] = collections.deque()
        self.cv = threading.Condition()
        self.batch: _Batch | None = None
        self._routed_for: tuple | None = None
        self._stop = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="dlp-lora-scheduler", daemon=True)
        self.dev = next(engine.model.parameters()).device
        self._eos = set(int(e) for e in engine.eos_ids)
        self._pad = engine.tokenizer.pad_token_id
        self._kw = None
        import inspect

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
        from .engine import _cache_kwarg

        self._kw = _cache_kwarg()
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
        text = self._decode(r.generated)
        if r.stop:
            hits = [text.find(s) for s in r.stop if s in text]
            if hits:
                text, reason = text[:min(hits)], "stop"
        r.text = text
        if reason is None:
            hold = max([len(s) for s in r.stop] + [1]) - 1
            safe = len(text) - hold
            while safe > r.emitted and text[safe - 1] == "\ufffd":
                safe -= 1
        else:
            safe = len(text)
        if safe > r.emitted:
            r.emit("delta", text[r.emitted:safe])
            r.emitted = safe
        if reason is not None:
            r.finished = True
            self.metrics.add_tokens(generated=len(r.generated))
            self.metrics.observe_latency(time.monotonic() - r.arrived)
            r.emit("done", {"finish_reason": reason, "text": text, "completion_tokens": len(r.generated),
                            "prompt_tokens": len(r.ids), "token_ids": list(r.generated)})
            return True
        return False

    def _pick(self, reqs: list[GenRequest], logits: torch.Tensor) -> list[int]:
        from .engine import _sample

        greedy = logits.argmax(-1).tolist()
        out = []
        for i, r in enumerate(reqs):
            if r.temperature <= 0:
                out.append(greedy[i])
                continue
            if r.generator is None:
                r.generator = torch.Generator(device=self.dev)
                r.generator.manual_seed(r.seed if r.seed is not None else int(torch.randint(0, 2 ** 31, (1,))))
            out.append(int(_sample(logits[i:i + 1], r.temperature, r.top_p, r.generator)[0]))
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
    def _prefill(self, reqs: list[GenRequest]) -> tuple[_Batch, torch.Tensor]:
        from .engine import _new_cache

        model = self.engine.model
        width = max(len(r.ids) for r in reqs)
        ids = torch.full((len(reqs), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.ids):] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, width - len(r.ids):] = 1
        ids, mask = ids.to(self.dev), mask.to(self.dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        self._set_routing(reqs)
        cache = _new_cache(model)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, use_cache=True,
                    **{self._kw: cache})
        self.metrics.add_tokens(prompt=sum(len(r.ids) for r in reqs))
        return _Batch(list(reqs), cache, mask, pos[:, -1:] + 1, [0] * len(reqs)), out.logits[:, -1]

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
        feed = torch.tensor(b.feed, dtype=torch.long, device=self.dev)[:, None]
        b.mask = torch.cat([b.mask, torch.ones((len(b.reqs), 1), dtype=b.mask.dtype, device=self.dev)], 1)
        out = self.engine.model(input_ids=feed, attention_mask=b.mask, position_ids=b.pos, logits_to_keep=1,
                                use_cache=True, **{self._kw: b.cache})
        b.pos = b.pos + 1
        self.steps += 1
        toks = self._pick(b.reqs, out.logits[:, -1])
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


# ---------------------------------------------------------------- request parsing

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a number, got {v!r}", param=name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise APIError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}", param=name)
    return float(v)


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is supported
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, f"{where}: only text content parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise APIError(400, f"{where}: 'content' must be a string or a list of text parts", param="messages")


def _parse_messages(body: dict) -> tuple[str, list[dict]]:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "'messages' is required: a list of {\"role\", \"content\"} objects", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}]: role must be system, user or assistant, got {role!r}",
                           param="messages")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content_text(m.get("content"), f"messages[{i}]")})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be a user message (the turn to answer)", param="messages")
    if not out[-1]["content"].strip():
        raise APIError(400, "the last user message is empty", param="messages")
    return out[-1]["content"], out[:-1]


def _parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    return [s for s in stop if s]


# ---------------------------------------------------------------- the app

class ServerState:
    def __init__(self, engine, config: ServeConfig):
        self.engine = engine
        self.config = config.check()
        self.metrics = Metrics()
        self.tok_lock = threading.Lock()
        self.router_lock = threading.Lock()
        self.scheduler = Scheduler(engine, self.config, self.metrics, self.tok_lock)
        info = getattr(engine, "info", None)
        self.base_name = config.model_name or (info.name if info is not None else "base")
        self.created = int(time.time())

    # -------------------------------------------------- adapter choice
    def choose(self, body: dict) -> tuple[dict | None, str]:
        """(adapter set or None = route, source) from "model" and "adapters"."""
        model = body.get("model")
        names = self.engine.names
        adapters = body.get("adapters")
        if model is not None and not isinstance(model, str):
            raise APIError(400, f"'model' must be a string, got {type(model).__name__}", param="model")
        pinned = None
        if model in (None, "", self.base_name) or model in ROUTE_ALIASES:
            pinned = None
        elif model in names:
            pinned = model
        else:
            raise APIError(404, f"the model {model!r} does not exist; serve one of: "
                                f"{', '.join([self.base_name] + names)} (or 'dlp-lora' to route by content)",
                           param="model", code="model_not_found")
        if adapters is not None:
            from .engine import _as_set

            if pinned is not None:
                raise APIError(400, f"give either 'model': {pinned!r} (one adapter) or 'adapters' (a weighted mix), "
                                    f"not both", param="adapters")
            if not isinstance(adapters, dict):
                raise APIError(400, "'adapters' must be an object {\"name\": weight, ...}", param="adapters")
            for n, w in adapters.items():
                if isinstance(w, bool) or not isinstance(w, (int, float)):
                    raise APIError(400, f"'adapters': weight of {n!r} must be a number, got {w!r}", param="adapters")
            try:
                s = _as_set(adapters, "'adapters'")
            except DLPLoRAError as exc:
                raise APIError(400, str(exc), param="adapters") from None
            unknown = [n for n in s if n not in names]
            if unknown:
                raise APIError(400, f"'adapters': unknown adapter {unknown[0]!r}; the library holds: "
                                    f"{', '.join(names)}",
                               param="adapters", code="adapter_not_found")
            return s, "explicit"
        if pinned is not None:
            return {pinned: 1.0}, "pinned"
        if self.engine.router is None:
            lib = self.engine.library.root if getattr(self.engine, "library", None) is not None else "LIB"
            raise APIError(400, f"this library has no plugin, so requests cannot be routed by content; train one with "
                                f"`dlp-lora train-plugin --library {lib}`, or pin adapters: 'model': '<adapter>' "
                                f"(one of {', '.join(names)}) or 'adapters': {{name: weight}}",
                           param="model", code="no_plugin")
        return None, "plugin"

    def prepare(self, prompt: str, history: list[dict] | None, raw: bool, aset: dict | None, source: str,
                max_tokens: int | None, default_max: int) -> tuple[list[int], dict, int, dict]:
        """Tokenize and check the request; route it if needed. Runs in a worker thread."""
        eng = self.engine
        try:
            with self.tok_lock:
                req = eng._prepare(prompt, None, history, raw, max_tokens or 1)
        except DLPLoRAError as exc:
            msg = str(exc)
            param = "max_tokens" if "max_new_tokens" in msg and "prompt is" not in msg else (
                "messages" if not raw else "prompt")
            raise APIError(400, msg.replace("max_new_tokens", "max_tokens"), param=param,
                           code="context_length_exceeded" if "context window" in msg else None) from None
        ids = req["ids"]
        if max_tokens is None:
            room = (eng.context_length - len(ids)) if eng.context_length else default_max
            max_tokens = max(1, min(default_max, room))
        if aset is None:
            try:
                with self.router_lock:
                    aset = eng.route([req["route_text"]])[0]
            except DLPLoRAError as exc:
                raise APIError(400, str(exc), param="model") from None
        adapters = [{"name": n, "weight": round(float(w), 6)} for n, w in sorted(aset.items(), key=lambda kv: -kv[1])]
        return ids, {"adapters": adapters, "source": source}, max_tokens, aset


def _error_response(err: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _read_json(request, limit: int) -> dict:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"the request body must be JSON with Content-Type: application/json, got "
                            f"{ctype or 'no Content-Type'}", code="unsupported_media_type")
    too_big = APIError(413, f"the request body is over the server's limit of {limit} bytes", code="request_too_large")
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            if int(cl) > limit:
                raise too_big
        except ValueError:
            raise APIError(400, f"bad Content-Length {cl!r}") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


class _StatusCounter:
    """ASGI middleware: count every HTTP response by endpoint and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
        endpoint = path if path in known else "other"
        status = {"code": 500}

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        finally:
            self.metrics.count_request(endpoint, status["code"])


def create_app(engine, config: ServeConfig | None = None):
    """The FastAPI app for `engine` (a :class:`dlplora.engine.DLPLoRA`); the scheduler thread starts
    with the app's lifespan and stops with it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    state = ServerState(engine, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        try:
            yield
        finally:
            state.scheduler.stop()

    app = FastAPI(title="dlp-lora", lifespan=lifespan)
    app.state.dlp = state

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), "invalid_request_error", code=kind))

    @app.exception_handler(Exception)
    async def _any_error(request, exc):
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    # -------------------------------------------------- info endpoints
    @app.get("/health")
    async def health():
        sch = state.scheduler
        ok = sch.alive
        body = {"status": "ok" if ok else "unavailable", "model": state.base_name, "adapters": engine.names,
                "plugin": engine.router is not None, "running": sch.running, "queued": len(sch.pending),
                "max_batch_size": state.config.max_batch_size}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        data = [{"id": state.base_name, "object": "model", "created": state.created, "owned_by": "dlp-lora",
                 "root": state.base_name, "parent": None}]
        for n in engine.names:
            data.append({"id": n, "object": "model", "created": state.created, "owned_by": "dlp-lora", "root": n,
                         "parent": state.base_name})
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        state.metrics.queue_depth = len(state.scheduler.pending)
        state.metrics.running = state.scheduler.running
        return PlainTextResponse(state.metrics.render(engine.names), media_type="text/plain; version=0.0.4")

    # -------------------------------------------------- generation
    async def _generate(request: Request, chat: bool):
        body = await _read_json(request, state.config.max_body_bytes)
        if chat:
            prompt, history = _parse_messages(body)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if prompt is None:
                raise APIError(400, "'prompt' is required", param="prompt")
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string (batched or token prompts are not supported)",
                               param="prompt")
            if not prompt.strip():
                raise APIError(400, "'prompt' is empty", param="prompt")
            history = None
        n = body.get("n", 1)
        if n not in (1, None):
            raise APIError(400, "only n=1 is supported", param="n")
        limit = state.config.max_tokens_limit
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(key)
        if max_tokens is not None:
            if not _is_int(max_tokens) or max_tokens < 1:
                raise APIError(400, f"'{key}' must be a positive integer, got {max_tokens!r}", param=key)
            if max_tokens > limit:
                raise APIError(400, f"'{key}' is {max_tokens}, over this server's limit of {limit}", param=key)
        temperature = _number(body, "temperature", 0.0, 0.0, 2.0)  # default greedy (OpenAI: 1)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise APIError(400, f"'seed' must be an integer, got {seed!r}", param="seed")
        stop = _parse_stop(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be true or false", param="stream")
        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        return_ids = body.get("return_token_ids") is True
        aset, source = state.choose(body)
        default_max = limit if chat else min(limit, COMPLETIONS_DEFAULT_MAX_TOKENS)
        ids, routing, max_new, aset = await run_in_threadpool(state.prepare, prompt, history, not chat, aset, source,
                                                              max_tokens, default_max)

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind, payload):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        req = GenRequest(ids=ids, adapters=aset, max_new=max_new, emit=emit, temperature=temperature, top_p=top_p,
                         seed=seed, stop=stop, deadline=time.monotonic() + state.config.request_timeout)
        try:
            state.scheduler.submit(req)
        except QueueFull:
            raise APIError(503, f"the server is busy: {state.config.max_queue} requests are already waiting; "
                                f"retry shortly", "server_overloaded", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        state.metrics.count_routing(routing)
        model_id = body.get("model") or state.base_name
        rid = ("chatcmpl-" if chat else "cmpl-") + req.id[:24]
        created = int(time.time())

        def usage(done):
            return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                    "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

        if not stream:
            try:
                while True:
                    try:
                        kind, payload = await asyncio.wait_for(queue.get(), 0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            req.cancel()
                            return JSONResponse({}, status_code=499)
                        continue
                    if kind == "error":
                        raise payload
                    if kind == "done":
                        break
            except asyncio.CancelledError:
                req.cancel()
                raise
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": payload["text"]},
                          "logprobs": None, "finish_reason": payload["finish_reason"]}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": payload["text"], "logprobs": None,
                          "finish_reason": payload["finish_reason"]}
                obj = "text_completion"
            if return_ids:  # extension (as in vLLM): the prompt's and the completion's token ids
                choice["token_ids"] = payload["token_ids"]
                choice["prompt_token_ids"] = list(ids)
            return {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice],
                    "usage": usage(payload), "routing": routing, "system_fingerprint": None}

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish=None, first=False) -> str:
            if chat:
                delta = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            c = {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice],
                 "routing": routing}
            if include_usage:
                c["usage"] = None
            return "data: " + json.dumps(c, ensure_ascii=False) + "\n\n"

        async def events():
            try:
                if chat:
                    yield chunk("", first=True)
                while True:
                    kind, payload = await queue.get()
                    if kind == "delta":
                        yield chunk(payload)
                    elif kind == "error":
                        yield "data: " + json.dumps(payload.body()) + "\n\n"
                        break
                    else:
                        yield chunk(None if chat else "", finish=payload["finish_reason"])
                        if include_usage:
                            u = {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [],
                                 "usage": usage(payload), "routing": routing}
                            yield "data: " + json.dumps(u) + "\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not req.finished:
                    req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, chat=False)

    app.add_middleware(_StatusCounter, metrics=state.metrics)
    return app


# ---------------------------------------------------------------- running

class ServerThread:
    """uvicorn serving `app` in a background thread (tests, benchmarks).

    >>> with ServerThread(app) as srv:
    ...     httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                   timeout_keep_alive=30, access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="dlp-lora-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive():
                raise DLPLoRAError(f"the server did not start on {self.url}")
            if time.monotonic() - t0 > timeout:
                raise DLPLoRAError(f"the server did not start on {self.url} within {timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve(engine, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    app = create_app(engine, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)
