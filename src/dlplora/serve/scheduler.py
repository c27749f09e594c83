"""Continuous batching by slot: one background thread owns the model and decodes every running request together.

It runs on the decoding core (:mod:`dlplora.core`): a static KV cache of ``max_batch_size`` slots and the
fused layers' slot table (:meth:`dlplora.fusion.LoRAFusion.set_slot`). The decoding rows occupy slots
``0..n-1``; requests joining sit in the slots after them. At every iteration the scheduler

1. drops rows that finished (EOS, token limit, stop string), were cancelled (client gone) or timed out,
   and fills each hole with the last decoding row (one row of keys and values copied; nothing is merged
   or re-padded);
2. admits waiting requests (FIFO) into free slots: each one's adapter set is gathered into its slot once;
3. runs one prefill chunk of the joining requests (at most ``prefill_chunk`` prompt tokens in all), so a
   long prompt delays the decoding rows by one chunk at a time, not by its whole prefill; when every
   joining prompt is in, their first tokens are sampled and they join the decoding rows;
4. runs one decode step for the decoding rows (each with its own adapter set) and samples each row with
   its own settings.

A failing prefill fails the joining requests; a failing decode step fails the running rows with 500; the scheduler
keeps serving either way. Sampling and stop strings: :mod:`dlplora.decoding`; ``logprobs``: :mod:`.logprobs`.

Changes to the model (a runtime adapter load or unload) are commands run by this thread between two iterations
(:meth:`Scheduler.call`), under the engine's lock, so no forward pass sees half a change. A row in flight keeps the
adapter set gathered into its slot (a copy, not stack indices), so it finishes with the set it started with; a
command can wait until no queued or running request uses an adapter (`ready`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core import DecodeCore
from ..decoding import StopStreamer, sample
from ..errors import DLPLoRAError
from .config import APIError, QueueFull, ServeConfig
from .logprobs import record_logprobs
from .metrics import Metrics

log = logging.getLogger("dlplora.server")
TABLE = "server"  # the scheduler's slot table in the fused layers


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
    logprobs: int | None = None  # record log probabilities with this many alternatives per token (None: none)
    # (chosen token id, its log probability, [(alternative id, log probability), ...] best first), one per pick
    entries: list = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    on_cancel: Callable | None = field(default=None, repr=False)  # told of a cancel (the engine process's client)
    # scheduler state
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    generator: Any = None
    prefilled: int = 0  # prompt tokens already in the cache
    logits: Any = None  # the logits after the last prompt token, until the first token is sampled
    streamer: StopStreamer = field(init=False)

    def __post_init__(self):
        self.streamer = StopStreamer(self.stop)

    @property
    def text(self) -> str:
        """The completion so far (cut at a stop string)."""
        return self.streamer.text

    def cancel(self) -> None:
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel(self)


class Scheduler:
    """The background thread that owns the model and runs continuous batching by slot (see module doc)."""

    def __init__(self, engine, config: ServeConfig, metrics: Metrics, tok_lock: threading.Lock):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tok_lock = tok_lock
        slots = config.max_batch_size
        self.core = DecodeCore(engine.model, slots=slots)
        if config.compile:
            self.core.compile()
        engine.fusion.init_slots(slots, table=TABLE)
        self.pending: collections.deque[GenRequest] = collections.deque()
        self.commands: list[tuple[Callable[[], Any], Callable[[], bool] | None, concurrent.futures.Future]] = []
        self.cv = threading.Condition()
        self.rows: list[GenRequest] = []  # decoding: rows[i] is in slot i
        self.feed: list[int] = []  # the token each decoding row feeds next
        self.joining: list[GenRequest] = []  # prefilling, in slots jfirst.. (= len(rows) between steps)
        self.jfirst = 0
        self._stop = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="dlp-lora-scheduler", daemon=True)
        self.dev = next(engine.model.parameters()).device
        self._eos = set(int(e) for e in engine.eos_ids)

    # -------------------------------------------------- public
    def start(self) -> "Scheduler":
        if self.config.compile:  # compile now (or load the kernels from inductor's cache), not in the first requests
            with torch.inference_mode(), self.engine.lock:  # the server's slots start empty: the base model's rows
                secs = self.core.warm_up((1, 2), lambda b: self.engine.fusion.use_slots(0, b, table=TABLE))
                log.warning("the decode step is compiled for batches of 1 and more (%.0f s)", secs)
                self.engine.fusion.clear()
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
        return len(self.rows) + len(self.joining)

    @property
    def queued(self) -> int:
        return len(self.pending)

    # changes to the fused stacks, between two steps (the same surface as serve.engine_proc.EngineClient)
    def add_adapter(self, name: str, files, weights, timeout: float | None = None) -> None:
        self.call(lambda: self.engine.fusion.add_adapter(weights), timeout=timeout)

    def remove_adapter(self, name: str, wait: bool = False, timeout: float | None = None) -> None:
        """Remove `name` from the stacks; with `wait`, once no queued or running request uses it."""
        self.call(lambda: self.engine.fusion.remove_adapter(name), ready=(lambda: not self.uses(name)) if wait else None,
                  timeout=timeout, drop_on_timeout=not wait)

    def has_adapter(self, name: str) -> bool:
        return name in self.engine.fusion

    def call(self, fn: Callable[[], Any], ready: Callable[[], bool] | None = None, timeout: float | None = None,
             drop_on_timeout: bool = True):
        """Run `fn()` in the scheduler's thread between two iterations, under the engine's lock, once `ready()`
        (checked there, between iterations; default: at once) is true; returns its result or raises its error.
        Commands run in the order they become ready. A scheduler that is not running runs `fn` here (under the lock).
        On `timeout` (seconds): TimeoutError; the command is dropped if it has not started (`drop_on_timeout`), else
        it still runs when ready."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.cv:
            inline = not self.thread.is_alive() and not self._stop
            if not inline:
                if self._stop:
                    raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
                self.commands.append((fn, ready, fut))
                self.cv.notify()
        if inline:
            with self.engine.lock:
                return fn()
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            if drop_on_timeout:
                fut.cancel()
            raise TimeoutError(f"the scheduler did not run the command within {timeout:g} s") from None

    def uses(self, name: str) -> bool:
        """Whether a queued, joining or running request uses adapter `name` (call in the scheduler's thread, e.g.
        from a command's `ready`)."""
        return any(name in r.adapters for r in (*self.pending, *self.joining, *self.rows) if not r.finished)

    def _due_commands(self) -> list:
        """Pop the commands that are ready (under the condition's lock)."""
        due, keep = [], []
        for fn, ready, fut in self.commands:
            if fut.cancelled():
                continue
            try:
                ok = ready is None or ready()
            except Exception as exc:  # a failing check fails its command
                fut.set_exception(exc)
                continue
            if ok:
                due.append((fn, fut))
            else:
                keep.append((fn, ready, fut))
        self.commands = keep
        return due

    def _run_commands(self, due: list) -> None:
        with self.engine.lock:  # not inference mode: the stacks and slot tables are written outside it too
            for fn, fut in due:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:
                        fut.set_exception(exc)

    # -------------------------------------------------- the loop
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                if self._stop:
                    break
                self._expire_pending()
                due = self._due_commands() if self.commands else []
                if not due and not self.rows and not self.joining and not self.pending:
                    self.cv.wait(0.05)
                    continue
                new = []
                if not self.joining:  # a new group joins once the previous one is in
                    room = self.config.max_batch_size - self.running
                    new = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
                self.metrics.queue_depth = len(self.pending)
            if due:
                self._run_commands(due)
            try:
                with torch.inference_mode(), self.engine.lock:
                    self._drop_gone()
                    if new:
                        self._admit(new)
            except Exception as exc:  # pragma: no cover - admission only gathers adapters
                log.exception("admission failed")
                self._fail_all(exc, self.joining + [r for r in new if not r.finished])
                self.joining = []
            try:
                with torch.inference_mode(), self.engine.lock:
                    if self.joining:
                        self._prefill_chunk()
            except Exception as exc:
                log.exception("prefill failed")
                self._fail_all(exc, self.joining, "prefill failed")
                self.joining = []
            try:
                with torch.inference_mode(), self.engine.lock:
                    if self.rows:
                        self._step()
            except Exception as exc:  # a bug or an out-of-memory: fail the running rows, keep serving
                log.exception("decode step failed")
                self._fail_all(exc, self.rows)
                self.rows, self.feed = [], []
                self._place_joining()
            self.metrics.running = self.running
        # shutting down: answer everyone still waiting
        err = APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        for r in list(self.pending) + self.rows + self.joining:
            self._fail(r, err)
        for _, _, fut in self.commands:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(err)
        self.pending.clear()
        self.commands = []
        self.rows, self.feed, self.joining = [], [], []
        with contextlib.suppress(Exception):
            self.engine.fusion.clear()

    def _fail_all(self, exc: Exception, reqs: list[GenRequest], what: str = "generation failed") -> None:
        for r in reqs:
            self._fail(r, APIError(500, f"{what}: {type(exc).__name__}: {exc}", "server_error"))
        try:
            self.engine.fusion.clear()
        except Exception:  # pragma: no cover
            log.exception("could not clear the fusion")

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

    def _gone(self, r: GenRequest, now: float) -> bool:
        if r.finished:
            return True
        if r.cancelled:
            self.metrics.cancelled += 1
            r.finished = True
            return True
        if now > r.deadline:
            self._timeout(r)
            return True
        return False

    def _drop_gone(self) -> None:
        now = time.monotonic()
        gone = [self._gone(r, now) for r in self.rows]
        gone_j = [self._gone(r, now) for r in self.joining]
        if any(gone) or any(gone_j):
            self._remove([i for i, g in enumerate(gone) if g], [i for i, g in enumerate(gone_j) if g])

    # -------------------------------------------------- slots
    def _move(self, src: int, dst: int) -> None:
        self.core.cache.move(src, dst)
        self.engine.fusion.move_slot(src, dst, table=TABLE)

    def _remove(self, rows: list[int], joining: list[int] = ()) -> None:
        """Free the decoding rows `rows` and the joining requests `joining` (indices into the lists): each hole
        below the new end is filled by a surviving row from beyond it (one row of the cache copied), then
        the joining requests slide down to the slots right after the decoding rows."""
        n, gone = len(self.rows), set(rows)
        for i in gone:
            self.core.cache.free(i)
        new_n = n - len(gone)
        holes = [h for h in sorted(gone) if h < new_n]
        tail = [i for i in range(new_n, n) if i not in gone]
        order = list(range(n))
        for h, src in zip(holes, tail):
            self._move(src, h)
            order[h] = src
        self.rows = [self.rows[i] for i in order[:new_n]]
        self.feed = [self.feed[i] for i in order[:new_n]]
        out = set(joining)
        for i in out:
            self.core.cache.free(self.jfirst + i)
        slots = [self.jfirst + i for i in range(len(self.joining)) if i not in out]
        self.joining = [r for i, r in enumerate(self.joining) if i not in out]
        self._place_joining(slots)

    def _place_joining(self, slots: list[int] | None = None) -> None:
        """Move the joining requests (now in `slots`) to the slots right after the decoding rows."""
        slots = list(range(self.jfirst, self.jfirst + len(self.joining))) if slots is None else slots
        first = len(self.rows)
        for k, src in enumerate(slots):
            self._move(src, first + k)
        self.jfirst = first

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
        asked = [i for i, r in enumerate(reqs) if r.logprobs is not None and not r.finished]
        if asked:
            record_logprobs([reqs[i] for i in asked], logits[asked], [out[i] for i in asked])
        return out

    # -------------------------------------------------- prefill / decode
    def _admit(self, new: list[GenRequest]) -> None:
        for r in new:
            if r.cancelled and not r.finished:
                self.metrics.cancelled += 1
                r.finished = True
        new = [r for r in new if not r.finished]
        if not new:
            return
        first, ok = len(self.rows), []
        # longest prompt first: the rows with prompt tokens left are then the group's first ones (_prefill_chunk)
        for r in sorted(new, key=lambda r: -len(r.ids)):
            slot = first + len(ok)
            try:  # a set naming an adapter that is not loaded (the server checks before queueing; this is the guard)
                self.engine.fusion.set_slot(slot, r.adapters, table=TABLE)
            except DLPLoRAError as exc:
                self._fail(r, APIError(404, f"the request's adapters cannot be applied: {exc}", param="model",
                                       code="model_not_found"))
                continue
            self.core.cache.free(slot)
            r.prefilled, r.logits = 0, None
            ok.append(r)
        new = ok
        if not new:
            return
        self.core.cache.reserve(max(len(r.ids) + r.max_new for r in new) + 1)
        self.joining = new
        self.jfirst = first

    def _prefill_chunk(self) -> None:
        """One chunk of the joining prompts; when all are in, sample their first tokens and let them join."""
        group = self.joining
        first = len(self.rows)
        # the rows with prompt tokens left, a prefix of the group (sorted longest first): the chunk covers them only
        k = max((i + 1 for i, r in enumerate(group) if r.prefilled < len(r.ids)), default=0)
        per_row = max(16, self.config.prefill_chunk // max(1, k))
        parts = [r.ids[r.prefilled:r.prefilled + per_row] for r in group[:k]]
        self.engine.fusion.use_slots(first, max(k, 1), table=TABLE)
        logits = self.core.prefill_chunk(first, parts) if k else None
        for i, (r, p) in enumerate(zip(group, parts)):
            if p:
                r.prefilled += len(p)
                self.metrics.add_tokens(prompt=len(p))
                if r.prefilled >= len(r.ids):
                    r.logits = logits[i:i + 1]
        if any(r.prefilled < len(r.ids) for r in group):
            return
        toks = self._pick(group, torch.cat([r.logits for r in group]))
        done = []
        for i, (r, t) in enumerate(zip(group, toks)):
            r.logits = None
            if self._accept(r, t):
                done.append(i)
        self.joining = []
        self.rows = self.rows + group
        self.feed = self.feed + toks
        if done:
            self._remove([first + i for i in done])

    def _step(self) -> None:
        n = len(self.rows)
        self.metrics.observe_batch(n)
        self.engine.fusion.use_slots(0, n, table=TABLE)
        feed = torch.tensor(self.feed, dtype=torch.long, device=self.dev)[:, None]
        logits = self.core.forward(0, feed)
        self.steps += 1
        toks = self._pick(self.rows, logits)
        done = []
        for i, (r, t) in enumerate(zip(self.rows, toks)):
            if r.finished:
                done.append(i)
                continue
            if r.cancelled:
                self.metrics.cancelled += 1
                r.finished = True
                done.append(i)
                continue
            if self._accept(r, t):
                done.append(i)
            else:
                self.feed[i] = t
        if done:
            self._remove(done)
