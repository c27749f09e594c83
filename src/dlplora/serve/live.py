"""The live adapter library of a running server: runtime loads and unloads, and routing to what was just loaded.

The served adapters (``/v1/models``), their manifest (``library.json``) and each adapter's routing state change
together, under one lock (:attr:`LiveLibrary.lock`); one load or unload runs at a time (:attr:`LiveLibrary.change`).

Load (:meth:`LiveLibrary.load`): the adapter is validated and copied into the library like ``dlp-lora library add``
(:func:`dlplora.library.stage_adapter`: base fingerprint, targets, shapes, rank, a corrupt file, modules_to_save),
its weights are read, and the scheduler's thread adds it to the fused stacks between two steps
(:meth:`dlplora.serve.scheduler.Scheduler.add_adapter`, or the engine process's
:class:`dlplora.serve.engine_proc.EngineClient`): rows in flight keep the sets gathered into their slots, so they
finish with the set they started with. Then, in one step, it joins ``library.json`` and ``/v1/models``.

Routing states (shown per adapter in ``/v1/models``):

``routable``     the router knows it and may choose it;
``training``     loaded with example prompts: the router is retraining in a background thread on the routing
                 prompts the library keeps for every routable adapter plus these (:func:`dlplora.plugin.
                 train_plugin_from_library`), then swapped in atomically (with ``engine.unroutable``);
``pinned-only``  loaded without examples (or retraining was impossible: the note says why): served only when a
                 request names it (``"model"``) or mixes it (``"adapters"``).

Until an adapter is routable the router never returns it: the engine cuts the router's labels that are not routable
(:attr:`dlplora.engine.DLPLoRA.unroutable`) from its choice and reweights the rest (or picks the base model).

Unload (:meth:`LiveLibrary.unload`) **waits** for the requests that use the adapter rather than answering 409: at
once it leaves ``/v1/models``, ``library.json`` and the router's choices (a new request naming it gets 404), then
the scheduler removes it from the stacks when no queued or running request uses it any more, and its files are
deleted. Waiting is bounded (every request has a deadline, ``--request-timeout``) and fails no accepted request; a
409 would push retry loops onto the operator and could starve under a steady load of the adapter's own prompts.
A request is checked against the served set and queued under the same lock as these changes
(:meth:`dlplora.serve.app.ServerState.submit`), so no request slips between the check and the removal.

On Ray Serve replicas, :class:`dlplora.serve.live_replicas.ReplicaLibrary` runs the same steps, its commits (and the
retrained router) going through the library's actor to every replica.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from ..errors import DLPLoRAError
from .config import ROUTE_ALIASES, APIError

log = logging.getLogger("dlplora.server")
ROUTABLE, TRAINING, PINNED = "routable", "training", "pinned-only"


def save_plugin(plugin, directory: Path) -> None:
    """Write the plugin to a new directory beside `directory`, then swap it in (a reader sees the old plugin, the new
    one, or for a moment none; never one file of each)."""
    swap_in(directory, plugin.save)


def swap_in(directory: Path, write) -> None:
    """`write(new)` fills a new directory beside `directory`, which then replaces it (see :func:`save_plugin`)."""
    directory = Path(directory)
    new = directory.with_name(f".{directory.name}.new-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    write(new)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(new, directory)
    shutil.rmtree(old, ignore_errors=True)


class LiveLibrary:
    """The served adapters of a :class:`dlplora.serve.app.ServerState` and their routing states (see module doc)."""

    shared = False  # True on Ray Serve replicas that follow the library's actor (serve/live_replicas.py)

    def __init__(self, state):
        self.state = state
        self.engine = state.engine
        self.config = state.config
        self.lock = threading.RLock()  # served names, routing states, library.json, the router swap
        self.change = threading.Lock()  # one load or unload at a time
        labels = set(getattr(self.engine.router, "labels", ()) or ())
        self.names: list[str] = list(self.engine.names)  # served, in order (replaced whole, never mutated)
        self.routing = {n: ROUTABLE if n in labels else PINNED for n in self.names}
        self.notes: dict[str, str] = {}
        # what was loaded / unloaded / retrained: op, name(s), seconds (from the call), began / at (wall clock, the
        # change lock held in between), ... (benchmarks and tests read it)
        self.changes: list[dict] = []
        self._dirty = False
        self._trainer: threading.Thread | None = None
        self._closed = False
        self._sync_router()

    @property
    def library(self):
        lib = getattr(self.engine, "library", None)
        if lib is None:
            raise APIError(400, "this server was started without an adapter library, so adapters cannot be loaded "
                                "at runtime", code="no_library")
        return lib

    def models(self) -> list[tuple[str, str, str | None]]:
        """(name, routing state, note) of every served adapter, in order."""
        with self.lock:
            return [(n, self.routing[n], self.notes.get(n)) for n in self.names]

    def _sync_router(self, router=None) -> None:
        """Swap in `router` (when given) and the labels it must not choose, together (under the router lock)."""
        with self.state.router_lock:
            if router is not None:
                self.engine.router = router
            labels = frozenset(getattr(self.engine.router, "labels", ()) or ())
            self.engine.unroutable = labels - {n for n in self.names if self.routing.get(n) == ROUTABLE}

    def _record(self, **what) -> None:
        with self.lock:
            self.changes.append(what)

    # -------------------------------------------------- load
    @contextlib.contextmanager
    def changing(self, op: str, name: str):
        """One load or unload at a time (on Ray Serve replicas: across the replicas, see
        :mod:`dlplora.serve.live_replicas`)."""
        with self.change:
            yield

    def load(self, name: str, path: Path, examples: list[dict] | None) -> dict:
        """Validate, copy, fuse and serve adapter `name` from the directory `path` (see module doc); `examples`:
        routing prompts (rows of :func:`dlplora.library.example_rows`), or None (pinned-only). Blocking."""
        from ..adapters import load_peft_adapter
        from ..library import stage_adapter

        t0 = time.perf_counter()
        lib = self.library
        with self.changing("load", name):
            began = time.time()
            with self.lock:
                if name in self.names:
                    raise APIError(400, f"the LoRA adapter {name!r} has already been loaded; unload it first",
                                   param="lora_name", code="adapter_exists")
            if name == self.state.base_name or name in ROUTE_ALIASES:
                raise APIError(400, f"{name!r} names the base model or routing; pick another lora_name",
                               param="lora_name")
            if name in lib.manifest["adapters"]:
                raise APIError(400, f"the library {lib.root} already holds an adapter named {name!r} that this "
                                    f"server does not serve; pick another lora_name", param="lora_name",
                               code="adapter_exists")
            if self.state.scheduler.has_adapter(name):  # an unload whose requests outlived its call
                raise APIError(409, f"an adapter named {name!r} is still being unloaded (requests still use it); "
                                    f"retry when they have ended", param="lora_name", code="adapter_unloading")
            info = getattr(self.engine, "info", None)
            files = lib.root / "adapters" / name
            try:
                entry = stage_adapter(lib, name, path, model=info.path if info is not None else None,
                                      root=self.config.adapter_root)
                weights = load_peft_adapter(files, name)
                if examples:
                    lib.save_routing_prompts(name, examples)
                staged = time.perf_counter()
                state = TRAINING if examples else PINNED
                self.commit_load(name, entry, files, weights, state)
            except BaseException as exc:
                if name not in self.names:
                    self._discard(lib, name)
                if isinstance(exc, DLPLoRAError):
                    raise APIError(400, f"cannot load LoRA adapter {name!r}: {exc}", param="lora_path",
                                   code="invalid_adapter") from None
                raise
            fused = time.perf_counter()
            ended = time.time()
        if examples:
            self.request_retrain()
        self._record(op="load", name=name, examples=len(examples or ()), seconds=round(time.perf_counter() - t0, 3),
                     fuse_seconds=round(fused - staged, 3), began=began, at=ended)
        log.info("loaded LoRA adapter %s from %s (%s)", name, path, state)
        return {"object": "lora_adapter", "id": name, "loaded": True, "routing": state,
                "rank": entry.get("rank"), "targets": entry.get("targets"), "examples": len(examples or ()),
                "message": f"Success: LoRA adapter '{name}' added successfully."}

    def commit_load(self, name: str, entry: dict, files: Path, weights, state: str) -> None:
        """Add the staged adapter to the stacks (between two steps), then to ``library.json`` and the served names."""
        self.state.scheduler.add_adapter(name, files, weights, timeout=self.config.request_timeout)
        self.serve_loaded(name, entry, state, write=True)

    def serve_loaded(self, name: str, entry: dict, state: str, write: bool) -> None:
        """`name` (in the stacks already) joins the manifest (and ``library.json`` when `write`) and the served names,
        in one step."""
        lib = self.library
        with self.lock:
            try:
                if write:
                    lib.set_entry(name, entry)
                else:
                    lib.manifest["adapters"][name] = entry
            except BaseException:
                lib.manifest["adapters"].pop(name, None)
                raise
            self.names = self.names + [name]
            self.routing[name] = state
            self.notes.pop(name, None)
            self._sync_router()

    def _discard(self, lib, name: str) -> None:
        """Undo a load that failed before it was served: the stacks (a command that ran after its caller gave up on
        it), the copied files and the routing prompts."""
        if self.state.scheduler.has_adapter(name):
            try:
                self.state.scheduler.remove_adapter(name)
            except Exception:  # pragma: no cover - the adapter is not served; only its memory stays taken
                log.exception("could not remove the half-loaded adapter %s", name)
        shutil.rmtree(lib.root / "adapters" / name, ignore_errors=True)
        lib.routing_path(name).unlink(missing_ok=True)

    # -------------------------------------------------- unload
    def unload(self, name: str) -> dict:
        """Stop serving `name` at once, wait until no request uses it, then drop it from the stacks and delete its
        files (see module doc). Blocking."""
        t0 = time.perf_counter()
        lib = self.library
        with self.changing("unload", name):
            began = time.time()
            with self.lock:
                if name not in self.names:
                    raise APIError(404, f"the LoRA adapter {name!r} cannot be found; served: {', '.join(self.names)}",
                                   param="lora_name", code="model_not_found")
                entry = lib.manifest["adapters"].get(name)
            self.commit_unload(name)
            if entry is not None:
                files = (lib.root / str(entry.get("path") or f"adapters/{name}")).resolve()
                if files.is_relative_to((lib.root / "adapters").resolve()):
                    shutil.rmtree(files, ignore_errors=True)
            lib.routing_path(name).unlink(missing_ok=True)
            ended = time.time()
        waited = round(time.perf_counter() - t0, 3)
        if name in (getattr(self.engine.router, "labels", ()) or ()):
            self.request_retrain()  # until then, its label stays cut from the router's choices
        self._record(op="unload", name=name, seconds=waited, began=began, at=ended)
        log.info("unloaded LoRA adapter %s", name)
        return {"object": "lora_adapter", "id": name, "loaded": False, "seconds": waited,
                "message": f"Success: LoRA adapter '{name}' removed successfully."}

    def commit_unload(self, name: str) -> None:
        self.stop_serving(name, write=True)
        self.free(name)

    def stop_serving(self, name: str, write: bool) -> None:
        """`name` leaves the manifest (and ``library.json`` when `write`), the served names and the router's choices at
        once."""
        lib = self.library
        with self.lock:
            if name in lib.manifest["adapters"]:
                if write:
                    lib.remove_entry(name)
                else:
                    lib.manifest["adapters"].pop(name)
            self.names = [n for n in self.names if n != name]
            self.routing.pop(name, None)
            self.notes.pop(name, None)
            self._sync_router()

    def free(self, name: str) -> None:
        """Remove `name` from the stacks once no queued or running request uses it (504 past every deadline)."""
        wait = self.config.request_timeout + 30  # every request has a deadline: the wait ends before this
        try:
            self.state.scheduler.remove_adapter(name, wait=True, timeout=wait)
        except TimeoutError:
            raise APIError(504, f"{name!r} is no longer served, but requests still used it after {wait:g} s; "
                                f"its weights are freed when they end", "timeout_error", code="timeout") from None

    # -------------------------------------------------- retraining the router
    def request_retrain(self) -> None:
        """Retrain the router in the background (again, if a round is running: it runs once more after it)."""
        with self.lock:
            self._dirty = True
            if self._trainer is None or not self._trainer.is_alive():
                self._trainer = threading.Thread(target=self._train_loop, name="dlp-lora-retrain", daemon=True)
                self._trainer.start()

    def wait_trained(self, timeout: float | None = None) -> bool:
        """Wait until no retraining is running or due (tests, benchmarks); False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                t = self._trainer
                if (t is None or not t.is_alive()) and (not self._dirty or self._closed):
                    return True
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(0.05)

    def close(self) -> None:
        with self.lock:
            self._closed = True

    def library_version(self) -> int:
        """The version of the library state a retraining starts from (one process: one trainer, nothing to order)."""
        return 0

    def adopt_router(self, plugin, seq: int, waiting: list[str]) -> bool:
        """Save the retrained router (trained from library version `seq`) and swap it in, `waiting` now routable;
        False when the server stopped."""
        save_plugin(plugin, getattr(self.engine, "plugin_dir", None) or self.library.plugin_dir())
        with self.lock:
            if self._closed:
                return False
            for n in waiting:
                if self.routing.get(n) == TRAINING:
                    self.routing[n] = ROUTABLE
            self._sync_router(plugin)
        return True

    def router_failed(self, waiting: list[str], why: str) -> None:
        """Retraining failed: `waiting` stay pinned-only, with the reason as their note."""
        with self.lock:
            for n in waiting:
                if self.routing.get(n) == TRAINING:
                    self.routing[n] = PINNED
                    self.notes[n] = f"retraining the router failed: {why}"

    def _train_loop(self) -> None:
        from ..plugin import Plugin, train_plugin_from_library

        while True:
            with self.lock:
                if not self._dirty or self._closed:
                    self._trainer = None if self._trainer is threading.current_thread() else self._trainer
                    return
                self._dirty = False
                names = [n for n in self.names if self.routing[n] in (ROUTABLE, TRAINING)]
                waiting = [n for n in names if self.routing[n] == TRAINING]
                seq = self.library_version()  # taken with the names it trains on
            t0 = time.perf_counter()
            try:
                if len(names) < 2:
                    raise DLPLoRAError(f"a router needs at least 2 adapters with routing prompts, got "
                                       f"{', '.join(names) or 'none'}")
                old = self.engine.router
                plugin, report = train_plugin_from_library(self.library, names,
                                                           like=old if isinstance(old, Plugin) else None,
                                                           max_per_adapter=self.config.retrain_max_prompts)
                with self.lock:
                    if self._closed:  # the server stopped while it trained
                        return
                if not self.adopt_router(plugin, seq, waiting):
                    return
            except Exception as exc:
                log.warning("retraining the router failed: %s", exc)
                self.router_failed(waiting, str(exc))
                self._record(op="retrain", names=names, ok=False, error=str(exc), at=time.time())
                continue
            self._record(op="retrain", names=names, ok=True, seconds=round(time.perf_counter() - t0, 3),
                         train_seconds=report["train_seconds"], examples=report["train_examples"], at=time.time())
            log.info("the router retrained on %d adapters in %.1f s; routable now: %s", len(names),
                     time.perf_counter() - t0, ", ".join(waiting) or "(no new adapter)")
