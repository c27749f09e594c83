"""The live library on a Ray Serve replica: runtime loads and unloads that reach every replica, through the library's
actor (:class:`dlplora.serve.library_actor.LibraryHub`). Used by :mod:`dlplora.serve.ray_replicas`.

A load or unload that reaches one replica runs the single-process steps (:class:`dlplora.serve.live.LiveLibrary`:
the checks, validation and copy into the library, on storage every node shares), holding the hub's lease so that
changes happen one at a time across the replicas. The change itself is committed through the hub, which writes
``library.json`` and hands it to every replica; each replica, this one too, applies it from :meth:`follow` as the
single-process server does, between two decode steps (the scheduler's ``add_adapter`` / ``remove_adapter``), then
acknowledges. The HTTP call returns when every live replica has applied it.

The router is retrained once per change, by the replica that took the request, in its background thread (as the
single-process server does): that replica has the backbone, which a plugin with frozen backbone embeddings needs to
train, where the hub (no CPU reserved, no model) has none. The hub takes the result as the plugin's files, writes them
into the library's plugin directory and hands them to every replica, where it is swapped in, its adapters
``routable``; until then they are ``training`` on every replica. A router trained at an earlier library version than
one already adopted is dropped (the later change's retraining covers both). If the training replica dies first, its
adapters stay ``training`` (pinned-only in effect) until the next change with examples retrains the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
import time
from pathlib import Path

from .config import APIError
from .live import PINNED, LiveLibrary

log = logging.getLogger("dlplora.server")


def plugin_files(plugin) -> dict:
    """{file name: bytes} of a saved plugin."""
    with tempfile.TemporaryDirectory(prefix="dlp-plugin-") as d:
        plugin.save(d)
        return {f.name: f.read_bytes() for f in Path(d).iterdir() if f.is_file()}


def plugin_from_files(files: dict):
    from ..plugin import Plugin
    from .library_actor import write_files

    with tempfile.TemporaryDirectory(prefix="dlp-plugin-") as d:
        write_files(files, Path(d))
        return Plugin.load(d)


class ReplicaLibrary(LiveLibrary):
    """The live library of one replica (see module doc); `hub()` returns the hub's actor handle (asked again after a
    failure: Serve may have recreated it)."""

    shared = True

    def __init__(self, state, hub, replica: str):
        super().__init__(state)
        self.hub, self.replica = hub, replica
        self.version: int | None = None  # the last change applied (None: none yet)
        self.incarnation: str | None = None
        self.caught_up = threading.Condition()
        self.token: str | None = None
        self._preloaded: tuple | None = None  # (name, weights) of the load this replica staged: not read twice
        self._follower: asyncio.Task | None = None

    def _call(self, method: str, *args):
        """A call of the hub, from a worker thread; 503 while the hub is unreachable (Serve recreates it)."""
        import ray

        try:
            return ray.get(getattr(self.hub(), method).remote(*args))
        except (ray.exceptions.RayError, ValueError) as exc:
            raise APIError(503, f"the library's actor is unreachable ({type(exc).__name__}); retry", "server_error",
                           code="library_unreachable", headers={"Retry-After": "1"}) from None

    # -------------------------------------------------- a change that this replica took
    @contextlib.contextmanager
    def changing(self, op: str, name: str):
        """This replica's change lock and the hub's lease; the checks that follow see every earlier change."""
        timeout = self.config.request_timeout
        with self.change:
            got = self._call("begin", self.replica, op, name, timeout)
            if "error" in got:
                status, message, code = got["error"]
                raise APIError(status, message, "server_error", code=code, headers={"Retry-After": "1"})
            self.token = got["token"]
            try:
                with self.caught_up:
                    if not self.caught_up.wait_for(lambda: (self.version or 0) >= got["v"], timeout):
                        raise APIError(503, "this replica has not caught up with the library's last change; retry",
                                       "server_error", code="replica_behind", headers={"Retry-After": "1"})
                yield
            finally:
                if self.token is not None:
                    token, self.token = self.token, None
                    self._call("end", token)

    def _commit(self, change: dict, wait_s: float) -> None:
        token, self.token = self.token, None
        got = self._call("commit", token, change, wait_s)
        if "error" in got:
            status, message, code = got["error"]
            raise APIError(status, message, "server_error", code=code)
        if got["lagging"]:
            log.warning("library change %s: replicas %s had not applied it after %.0f s", got["v"],
                        ", ".join(got["lagging"]), wait_s)

    def commit_load(self, name, entry, files, weights, state) -> None:
        self._preloaded = (name, weights)
        self._commit({"op": "load", "name": name, "entry": entry, "state": state}, self.config.request_timeout)

    def commit_unload(self, name) -> None:
        self._commit({"op": "unload", "name": name}, self.config.request_timeout + 60)

    # -------------------------------------------------- the router this replica retrained
    def library_version(self) -> int:
        return self.version or 0

    def adopt_router(self, plugin, seq, waiting) -> bool:
        """Publish the router trained from library version `seq` (the version when its adapters were read: one trained
        from an older state than the last published is dropped by the hub, even if it finishes later)."""
        with self.lock:
            if self._closed:
                return False
        if not self._call("publish_router", seq, plugin_files(plugin), list(waiting)):
            log.info("a router retrained at library version %d was dropped: a later one came first", seq)
        return True

    def router_failed(self, waiting, why) -> None:
        try:
            self._call("router_failed", list(waiting), why)
        except APIError as exc:  # the hub is gone: its successor starts from the library on disk
            log.warning("could not report the failed retraining: %s", exc.message)

    # -------------------------------------------------- following the hub
    def apply(self, change: dict) -> None:
        """Apply one change of the hub (every replica, in order); blocking (the stacks change between two steps)."""
        from ..adapters import load_peft_adapter

        op, name, lib = change["op"], change.get("name"), self.library
        if op == "load" and name not in self.names:
            files = lib.root / str(change["entry"].get("path") or f"adapters/{name}")
            pre = self._preloaded
            weights = pre[1] if pre and pre[0] == name else load_peft_adapter(files, name)
            self._preloaded = None
            if not self.state.scheduler.has_adapter(name):
                self.state.scheduler.add_adapter(name, files, weights, timeout=self.config.request_timeout)
            self.serve_loaded(name, change["entry"], change["state"], write=False)
        elif op == "unload" and name in self.names:
            self.stop_serving(name, write=False)
            self.free(name)
        self._settle(change)

    def _settle(self, state: dict) -> None:
        """Take the hub's routing states, notes and router (when it carries one), and its version."""
        plugin = plugin_from_files(state["plugin"]) if state.get("plugin") else None
        with self.lock:
            self.routing = {n: state["routing"].get(n, PINNED) for n in self.names}
            self.notes = {n: t for n, t in state["notes"].items() if n in self.routing}
            self._sync_router(plugin)
        with self.caught_up:
            self.version = state["v"]
            self.caught_up.notify_all()

    def resync(self, snap: dict) -> None:
        """Serve exactly the hub's library (a replica that starts, or a hub that was recreated)."""
        for name in [n for n in self.names if n not in snap["names"]]:
            self.stop_serving(name, write=False)
            self.free(name)
        for name in [n for n in snap["names"] if n not in self.names]:
            self.apply({"op": "load", "name": name, "entry": snap["entries"][name], "state": PINNED,
                        "routing": snap["routing"], "notes": snap["notes"], "v": self.version or 0})
        with self.lock:
            self.names = [n for n in snap["names"] if n in self.names]
        self.incarnation = snap["incarnation"]
        self._settle(snap)

    async def sync(self, timeout: float = 5.0) -> bool:
        """One long poll of the hub, its changes applied and acknowledged; False when the hub did not answer."""
        try:
            got = await self.hub().poll.remote(self.replica, self.version, self.incarnation, timeout)
        except Exception as exc:  # the hub is being (re)created
            log.debug("polling the library hub failed: %s", exc)
            return False
        before = self.version
        if "snapshot" in got:
            await asyncio.to_thread(self.resync, got["snapshot"])
        for change in got.get("changes", ()):
            if change["v"] > (self.version or 0):
                await asyncio.to_thread(self.apply, change)
        if self.version != before or "snapshot" in got:
            await self.hub().ack.remote(self.replica, self.version)
        return True

    async def start(self, timeout: float = 120.0) -> None:
        """Take the hub's library before serving (a replica that starts later comes up with the current one), then
        follow it in the background."""
        end = time.monotonic() + timeout
        while not await self.sync(timeout=0):
            if time.monotonic() > end:
                raise RuntimeError("the library hub did not answer: this replica cannot serve the current library")
            await asyncio.sleep(0.5)
        self._follower = asyncio.get_running_loop().create_task(self.follow())

    async def follow(self) -> None:
        while not self._closed:
            try:
                if not await self.sync():
                    await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # a change that failed here: logged; the next snapshot (resync) repairs it
                log.exception("applying a library change failed on replica %s", self.replica)
                self.incarnation = None
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        self.close()
        if self._follower is not None:
            self._follower.cancel()
        try:
            await self.hub().leave.remote(self.replica)
        except Exception:
            pass
