"""The engine in its own process: the scheduler and the forward passes away from the HTTP interpreter.

``dlp-lora serve`` (``ServeConfig.engine_process``, the default there) runs the continuous-batching
:class:`dlplora.serve.scheduler.Scheduler` in a child process that loads the model, while the API process keeps HTTP,
parsing, tokenisation, routing, logprob text and SSE framing. The split follows vLLM V1's ``EngineCore``: the
forward passes never wait for the GIL of the HTTP side, and a crash of the engine does not take the API down.

Transport: one duplex :func:`multiprocessing.Pipe` (pickled messages, spawn context).

* API -> engine: ``("submit", fields)``, ``("cancel", id)``, ``("op", call_id, name, args)`` (a change of the
  fused stacks, run between two steps by :meth:`Scheduler.call`), ``("stop",)``.
* engine -> API: ``("ready", names)``, ``("events", [(id, kind, payload, new_tokens, new_entries), ...],
  metrics)`` (one message per flush: every event the scheduler emitted since the last one, with the engine's
  counters), ``("result", call_id, ok, value)``.

:class:`EngineClient` is the API side. It has the scheduler's surface (``submit``, ``alive``, ``running``,
``queued``, ``add_adapter``, ``remove_adapter``, ``has_adapter``, ``start``, ``stop``), so the app and the live
library do not know which one they hold. It tracks every request it sent; when the engine process dies, each of them
gets a 500 at once (never a hang), new requests get 503 while a fresh engine loads, and the engine is restarted
from the library on disk (runtime loads are in ``library.json`` by then).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
import time

from ..errors import DLPLoRAError
from .config import APIError, QueueFull, ServeConfig
from .metrics import Metrics

log = logging.getLogger("dlplora.server")

# the GenRequest fields that travel to the engine (the rest is the scheduler's state or the API side's)
WIRE_FIELDS = ("ids", "adapters", "max_new", "temperature", "top_p", "seed", "stop", "deadline", "logprobs", "id")
METRIC_FIELDS = ("generated_tokens", "prompt_tokens", "cancelled", "timeouts", "batch_counts", "batch_sum",
                 "batch_n", "latency_counts", "latency_sum", "latency_n")
READY_TIMEOUT = 1800.0  # seconds for a child to load the model (a first compile can take minutes)


def error_to_wire(err: APIError) -> dict:
    return {"status": err.status, "message": err.message, "type": err.type, "param": err.param, "code": err.code,
            "headers": err.headers}


def error_from_wire(d: dict) -> APIError:
    return APIError(d["status"], d["message"], d["type"], param=d["param"], code=d["code"], headers=d["headers"])


def metrics_snapshot(m: Metrics) -> dict:
    with m.lock:
        snap = {k: (list(v) if isinstance(v, list) else v) for k, v in ((f, getattr(m, f)) for f in METRIC_FIELDS)}
    snap["queue_depth"], snap["running"] = m.queue_depth, m.running
    return snap


# ---------------------------------------------------------------- the engine process

def engine_main(conn, spec: dict, config: ServeConfig) -> None:
    """The child process: build the engine from `spec` (keyword arguments of
    :meth:`dlplora.engine.DLPLoRA.from_library`, plus ``threads``), run the scheduler, serve the pipe."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the API process, which stops us
    logging.basicConfig(level=spec.pop("log_level", "WARNING"), format="engine: %(levelname)s %(message)s")
    import torch

    from ..adapters import load_peft_adapter
    from ..engine import DLPLoRA
    from .scheduler import GenRequest, Scheduler

    threads = spec.pop("threads", 0)
    if threads:
        torch.set_num_threads(threads)
    engine = DLPLoRA.from_library(**spec)
    metrics = Metrics()
    sched = Scheduler(engine, config, metrics, threading.Lock())
    send_lock = threading.Lock()
    cv = threading.Condition()
    outbox: list = []
    reqs: dict[str, GenRequest] = {}
    stopping = threading.Event()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    def emitter(rid: str):
        done = [0, 0]  # tokens and logprob entries sent so far (requests with logprobs): the emitter's own, so a
        # cancel landing between two events (it pops `reqs` on the pipe's thread) cannot break the scheduler's step

        def emit(kind, payload):
            r = reqs.get(rid)
            new_tokens = new_entries = None
            if r is not None and r.logprobs is not None:  # the API side's logprob text needs the tokens and entries
                new_tokens, new_entries = r.generated[done[0]:], r.entries[done[1]:]
                done[0], done[1] = len(r.generated), len(r.entries)
            if kind == "error":
                payload = error_to_wire(payload)
            if kind in ("done", "error"):
                reqs.pop(rid, None)
            with cv:
                outbox.append((rid, kind, payload, new_tokens, new_entries))
                cv.notify()
        return emit

    def flusher() -> None:
        last = 0.0
        while not stopping.is_set():
            with cv:
                if not outbox:
                    cv.wait(0.25)
                batch = outbox[:]
                outbox.clear()
            now = time.monotonic()
            if batch or now - last > 0.25:  # counters at least 4 times a second while idle
                last = now
                metrics.queue_depth, metrics.running = len(sched.pending), sched.running
                try:
                    send(("events", batch, metrics_snapshot(metrics)))
                except (OSError, EOFError, BrokenPipeError):
                    return

    def and_names(change):
        """`change` of the stacks, then the engine's adapter names to the API side (also when the change lands after
        its call timed out: an unload that waited for its requests)."""
        def run():
            change()
            send(("names", list(engine.names)))
        return run

    def run_op(call_id: int, name: str, args: dict) -> None:
        try:
            if name == "add_adapter":
                weights = load_peft_adapter(args["files"], args["name"])
                sched.call(and_names(lambda: engine.fusion.add_adapter(weights)), timeout=args.get("timeout"))
                value = None
            elif name == "remove_adapter":
                n = args["name"]
                ready = (lambda: not sched.uses(n)) if args.get("wait") else None
                sched.call(and_names(lambda: engine.fusion.remove_adapter(n)), ready=ready,
                           timeout=args.get("timeout"), drop_on_timeout=not args.get("wait"))
                value = None
            elif name == "crash":  # tests: the engine process dies as a segfault would take it
                import os

                os._exit(int(args.get("code", 70)))
            else:
                raise DLPLoRAError(f"unknown engine operation {name!r}")
            send(("result", call_id, True, value))
        except TimeoutError as exc:
            send(("result", call_id, False, ("timeout", str(exc))))
        except APIError as exc:
            send(("result", call_id, False, ("api", error_to_wire(exc))))
        except Exception as exc:
            send(("result", call_id, False, ("error", f"{type(exc).__name__}: {exc}")))

    sched.start()
    threading.Thread(target=flusher, name="dlp-lora-engine-flush", daemon=True).start()
    send(("ready", engine.names))
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the API process is gone
                break
            kind = msg[0]
            if kind == "submit":
                f = msg[1]
                r = GenRequest(emit=emitter(f["id"]), **f)
                reqs[r.id] = r
                try:
                    sched.submit(r)
                except APIError as exc:
                    r.emit("error", exc)
                except QueueFull:
                    r.emit("error", APIError(503, "the engine's queue is full; retry shortly", "server_overloaded",
                                             code="queue_full", headers={"Retry-After": "1"}))
            elif kind == "cancel":  # the scheduler drops the row at its next step; nobody waits for its events
                r = reqs.pop(msg[1], None)
                if r is not None:
                    r.cancel()
            elif kind == "op":
                threading.Thread(target=run_op, args=msg[1:], name="dlp-lora-engine-op", daemon=True).start()
            elif kind == "stop":
                break
    finally:
        sched.stop()
        stopping.set()
        with cv:
            cv.notify_all()
        try:
            with send_lock:
                conn.close()
        except OSError:  # pragma: no cover
            pass


# ---------------------------------------------------------------- the API side

def _engine_gone() -> APIError:
    return APIError(503, "the engine process is gone; retry shortly", "server_error", code="engine_unavailable",
                    headers={"Retry-After": "2"})


class EngineClient:
    """The API process's handle on the engine process (see module doc): the scheduler's surface over a pipe."""

    def __init__(self, engine, config: ServeConfig, metrics: Metrics, spec: dict):
        self.engine = engine  # the API side's copy: tokenizer, router, library, names (its model never runs)
        self.config = config
        self.metrics = metrics
        self.spec = dict(spec)
        self.ctx = multiprocessing.get_context("spawn")
        self.lock = threading.Lock()  # the request table, the process, the state
        self.send_lock = threading.Lock()
        self.reqs: dict = {}  # id -> GenRequest (API side), until done or error
        self.calls: dict[int, tuple[threading.Event, list]] = {}
        self.call_ids = itertools.count()
        self.names: set[str] = set(engine.names)  # adapters in the engine's stacks
        self.proc = None
        self.conn = None
        self.state = "new"  # new -> starting -> ready -> (restarting -> ready)* -> stopped
        self.restarts = 0
        self.base = {f: 0 for f in METRIC_FIELDS}  # counters of engines that died (the exposition stays monotonic)
        self.base["batch_counts"] = [0] * len(metrics.batch_counts)
        self.base["latency_counts"] = [0] * len(metrics.latency_counts)
        self.snap: dict = {}
        self.last_exit: int | None = None

    # -------------------------------------------------- lifecycle
    def start(self) -> "EngineClient":
        import atexit

        atexit.register(self._exiting)  # runs before multiprocessing's own exit hook terminates the child
        self._spawn()
        return self

    def _exiting(self) -> None:
        with self.lock:
            self.state = "stopped"  # the child's end at interpreter exit is not a crash to recover from

    def _spawn(self) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        spec = dict(self.spec, log_level=logging.getLevelName(logging.getLogger("dlplora").getEffectiveLevel()))
        proc = self.ctx.Process(target=engine_main, args=(child, spec, self.config), name="dlp-lora-engine",
                                daemon=True)
        with self.lock:
            self.state = "starting" if self.state == "new" else "restarting"
            self.conn, self.proc = parent, proc
        proc.start()
        child.close()
        t0 = time.monotonic()
        while not parent.poll(0.2):
            if not proc.is_alive():
                with self.lock:
                    self.state = "failed"
                raise DLPLoRAError(f"the engine process exited with code {proc.exitcode} while loading the model "
                                   f"(see the log above)")
            if time.monotonic() - t0 > READY_TIMEOUT:
                proc.kill()
                raise DLPLoRAError(f"the engine process did not load the model within {READY_TIMEOUT:g} s")
        msg = parent.recv()
        if msg[0] != "ready":  # pragma: no cover - the protocol's first message
            raise DLPLoRAError(f"the engine process answered {msg[0]!r} before 'ready'")
        with self.lock:
            self.names = set(msg[1])
            self.state = "ready"
        threading.Thread(target=self._reader, args=(parent, proc), name="dlp-lora-engine-reader", daemon=True).start()
        log.info("engine process %d ready in %.1f s", proc.pid, time.monotonic() - t0)

    def stop(self, timeout: float = 10.0) -> None:
        with self.lock:
            self.state = "stopped"
            proc, conn = self.proc, self.conn
        if proc is None:
            return
        try:
            with self.send_lock:
                conn.send(("stop",))
        except (OSError, BrokenPipeError):
            pass
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        self._fail_outstanding(APIError(503, "the server is shutting down", "server_error", code="shutting_down"))

    @property
    def alive(self) -> bool:
        return self.state == "ready" and self.proc is not None and self.proc.is_alive()

    @property
    def running(self) -> int:
        return int(self.snap.get("running", 0))

    @property
    def queued(self) -> int:
        return int(self.snap.get("queue_depth", 0))

    # -------------------------------------------------- requests
    def _send(self, msg) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def submit(self, req) -> None:
        with self.lock:
            if self.state != "ready":
                what = "shutting down" if self.state == "stopped" else "restarting its engine"
                raise APIError(503, f"the server is {what}; retry shortly", "server_error",
                               code="engine_unavailable", headers={"Retry-After": "2"})
            if len(self.reqs) >= self.config.max_batch_size + self.config.max_queue:
                raise QueueFull()
            self.reqs[req.id] = req
            req.on_cancel = self._cancel
        try:  # outside the table's lock, which the pipe's reader thread takes to deliver events
            self._send(("submit", {f: getattr(req, f) for f in WIRE_FIELDS}))
        except (OSError, BrokenPipeError):
            with self.lock:
                self.reqs.pop(req.id, None)
            raise _engine_gone() from None

    def _cancel(self, req) -> None:
        with self.lock:  # the app waits for nothing more from a cancelled request
            known = self.reqs.pop(req.id, None) is not None
        if known:
            try:
                self._send(("cancel", req.id))
            except (OSError, BrokenPipeError):  # the engine is gone: the reader fails the request
                pass

    def _reader(self, conn, proc) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "events":
                self._deliver(msg[1])
                self._absorb(msg[2])
            elif msg[0] == "names":
                self._sync_names(msg[1])
            elif msg[0] == "result":
                _, call_id, ok, value = msg
                waiter = self.calls.pop(call_id, None)
                if waiter is not None:
                    waiter[1][:] = [ok, value]
                    waiter[0].set()
        proc.join(5)
        self._died(proc)

    def _deliver(self, events: list) -> None:
        for rid, kind, payload, new_tokens, new_entries in events:
            r = self.reqs.get(rid)
            if r is None:
                continue
            if new_tokens:
                r.generated.extend(new_tokens)
            if new_entries:
                r.entries.extend(new_entries)
            if kind == "error":
                payload = error_from_wire(payload)
            if kind in ("done", "error"):
                with self.lock:
                    self.reqs.pop(rid, None)
                r.finished = True
            r.emit(kind, payload)

    def _absorb(self, snap: dict) -> None:
        self.snap = snap
        m = self.metrics
        with m.lock:
            for f in METRIC_FIELDS:
                b, v = self.base[f], snap[f]
                setattr(m, f, [x + y for x, y in zip(b, v)] if isinstance(v, list) else b + v)

    def _fail_outstanding(self, err: APIError) -> None:
        with self.lock:
            reqs, self.reqs = list(self.reqs.values()), {}
            calls, self.calls = list(self.calls.values()), {}
        for r in reqs:
            if not r.finished:
                r.finished = True
                r.emit("error", err)
        for ev, box in calls:
            box[:] = [False, ("api", error_to_wire(err))]
            ev.set()

    def _died(self, proc) -> None:
        """The pipe closed: a stop, or a crash (then fail every request in flight and start a fresh engine)."""
        if self.state == "stopped" or proc is not self.proc:
            return
        self.last_exit = proc.exitcode
        log.error("the engine process %s exited with code %s; failing %d requests in flight and restarting it",
                  proc.pid, proc.exitcode, len(self.reqs))
        for f in METRIC_FIELDS:  # keep the counters of the dead engine
            v = self.snap.get(f)
            if v is not None:
                self.base[f] = [x + y for x, y in zip(self.base[f], v)] if isinstance(v, list) else self.base[f] + v
        self.snap = {}
        with self.lock:
            self.state = "restarting"
        self._fail_outstanding(APIError(500, f"the engine process exited (code {proc.exitcode}) while this request "
                                             f"ran; the server is restarting it", "server_error",
                                        code="engine_crashed"))
        self.restarts += 1
        self.metrics.engine_restarts = self.restarts
        try:
            self._spawn()
        except Exception as exc:
            log.error("could not restart the engine process: %s", exc)
            with self.lock:
                self.state = "failed"

    # -------------------------------------------------- changes to the stacks
    def _op(self, op: str, timeout: float | None = None, **args):
        if self.state != "ready":
            raise APIError(503, "the engine is restarting; retry shortly", "server_error", code="engine_unavailable")
        ev, box = threading.Event(), []
        call_id = next(self.call_ids)
        self.calls[call_id] = (ev, box)
        try:
            self._send(("op", call_id, op, dict(args, timeout=timeout)))
        except (OSError, BrokenPipeError):  # the engine died: the restart is under way
            self.calls.pop(call_id, None)
            raise _engine_gone() from None
        if not ev.wait(None if timeout is None else timeout + 30):
            self.calls.pop(call_id, None)
            raise TimeoutError(f"the engine did not run {op} within {timeout:g} s")
        ok, value = box
        if ok:
            return value
        kind, detail = value
        if kind == "timeout":
            raise TimeoutError(detail)
        if kind == "api":
            raise error_from_wire(detail)
        raise DLPLoRAError(f"the engine could not {op.replace('_', ' ')}: {detail}")

    def add_adapter(self, name: str, files, weights, timeout: float | None = None) -> None:
        """Load adapter `name` from `files` into the engine's stacks (and `weights` into the API side's copy, which
        the router's checks read)."""
        self._op("add_adapter", timeout, name=name, files=str(files))  # the engine's names came before its answer
        with self.engine.lock:
            if name not in self.engine.fusion:
                self.engine.fusion.add_adapter(weights)

    def remove_adapter(self, name: str, wait: bool = False, timeout: float | None = None) -> None:
        """Remove `name` from the engine's stacks; the engine's names (and the API side's copy with them, see
        :meth:`_sync_names`) follow before the answer, or later for an unload that outlived its call."""
        self._op("remove_adapter", timeout, name=name, wait=wait)

    def has_adapter(self, name: str) -> bool:
        return name in self.names

    def _sync_names(self, names) -> None:
        """The engine's stacks changed: its names, and the API side's copy loses what the engine dropped."""
        with self.lock:
            gone, self.names = self.names - set(names), set(names)
        with self.engine.lock:
            for n in gone:
                if n in self.engine.fusion:
                    self.engine.fusion.remove_adapter(n)

    def crash(self) -> None:
        """Kill the engine process from inside (tests of the recovery)."""
        with self.send_lock:
            self.conn.send(("op", next(self.call_ids), "crash", {}))

