"""The offline side of `dlp-lora bench serve`: the same workload through the engine in this process, no HTTP.

Two ways, both at a level's concurrency C, the same sets (a routed request gets the set the plugin chooses), the same
precision:

- **static** (:meth:`Offline.level`): ``DLPLoRA.generate`` in batches of C holding prompts of similar lengths (the
  library's batch API; a static batch computes every row at its longest prompt's width and waits for its longest
  answer). Its texts are the reference every served response is compared with.
- **continuous** (:meth:`Offline.continuous`): the server's own scheduler (:class:`dlplora.serve.scheduler.Scheduler`,
  C slots, continuous batching by slot) driven directly: every request submitted at once, no HTTP, no API process.
  This is "offline batching inference" with the engine the server runs: ``server_vs_offline`` divides by it, so the
  ratio measures what serving costs, not how much better continuous batching is than static batches.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


class Offline:
    """The workload through the engine (loaded once) in batches of a level's concurrency. The batches hold requests
    of similar prompt lengths (the items sorted by length: an offline run may order its work, and a static batch
    computes every row at its longest prompt's width)."""

    def __init__(self, args, lib: Path, items: list):
        import torch

        from ..engine import DLPLoRA

        self.args, self.items = args, items
        self.engine = DLPLoRA.from_library(lib, model=args.model, dtype=args.dtype, device=args.device,
                                           quantize=args.quantize)
        torch.set_num_threads(args.threads)
        if args.compile:
            self.engine.compile()
        self.order = sorted(items, key=lambda it: len(self.engine.tokenizer(it.prompt)["input_ids"]))

    def routes(self) -> list[dict[str, float]]:
        """Each item's set: its own, or for a routed item the one the plugin chooses (as the server routes it)."""
        eng = self.engine
        routed = [it for it in self.items if it.adapters is None]
        sets = [s for s, _ in eng.route_with_reasons([eng.routing_text(it.prompt) for it in routed])] if routed else []
        chosen = {it.index: s for it, s in zip(routed, sets)}
        return [it.adapters if it.adapters is not None else chosen[it.index] for it in self.items]

    def level(self, c: int, log) -> tuple[dict, list[dict]]:
        """(summary, the rows of DLPLoRA.generate in the items' order) at batch size `c`."""
        prompts = [it.prompt for it in self.order]
        sets = [None if it.adapters is None else dict(it.adapters) for it in self.order]
        raws = [not it.chat for it in self.order]

        def batch(k, n_new):
            return self.engine.generate(prompts[k:k + c], max_new_tokens=n_new, adapters=sets[k:k + c],
                                        raw=raws[k:k + c], on_error="return")

        batch(0, 2)  # warm-up
        t0 = time.perf_counter()
        done = [r for k in range(0, len(self.order), c) for r in batch(k, self.args.max_tokens)]
        dt = time.perf_counter() - t0
        rows: list[dict] = [{}] * len(self.items)
        for it, r in zip(self.order, done):
            rows[it.index] = r
        return summary(rows, dt, f"{'offline':<12} batch {c:>3}", log), rows

    def continuous(self, c: int, log) -> tuple[dict, list[dict]]:
        """(summary, rows {"text", "tokens"} in the items' order) through the server's scheduler with `c` slots, every
        request submitted at once (see the module's docstring)."""
        from ..serve.config import ServeConfig
        from ..serve.metrics import Metrics
        from ..serve.scheduler import GenRequest, Scheduler

        eng, items = self.engine, self.items
        sets = self.routes()
        reqs = [eng.prepare_request(it.prompt, None, None, not it.chat, self.args.max_tokens) for it in items]
        rows: list[dict] = [{} for _ in items]
        left = threading.Semaphore(0)

        def emitter(i):
            def emit(kind, payload):
                if kind == "done":
                    rows[i] = {"text": payload["text"], "tokens": payload["completion_tokens"],
                               "routing": {"adapters": [{"name": n, "weight": w} for n, w in sets[i].items()]}}
                    left.release()
                elif kind == "error":
                    rows[i] = {"error": str(payload)}
                    left.release()
            return emit

        sch = Scheduler(eng, ServeConfig(max_batch_size=c, max_queue=len(items) + 2, compile=bool(self.args.compile)),
                        Metrics(), threading.Lock()).start()
        try:
            warm = GenRequest(ids=reqs[0].ids, adapters=dict(sets[0]), max_new=2,
                              emit=lambda kind, _: kind in ("done", "error") and left.release())
            sch.submit(warm)  # warm-up: one short request, as every contender gets
            left.acquire()
            t0 = time.perf_counter()
            for i, (it, r) in enumerate(zip(items, reqs)):
                sch.submit(GenRequest(ids=r.ids, adapters=dict(sets[i]), max_new=self.args.max_tokens,
                                      emit=emitter(i)))
            for _ in items:
                left.acquire()
            dt = time.perf_counter() - t0
        finally:
            sch.stop()
            eng.fusion.clear()
        return summary(rows, dt, f"{'offline-cont':<12} slots {c:>3}", log), rows


def summary(rows: list[dict], dt: float, label: str, log) -> dict:
    """A run's figures from its rows ({"tokens"} or {"error"}) and its duration `dt` (seconds), logged under `label`."""
    ok = [r for r in rows if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    s = {"requests": len(rows), "failed": len(rows) - len(ok), "duration_s": round(dt, 3), "output_tokens": tokens,
         "output_tok_s": round(tokens / dt, 2), "requests_per_s": round(len(ok) / dt, 3)}
    log(f"  {label}:       {s['output_tok_s']:8.1f} tok/s  failed {s['failed']}")
    return s
