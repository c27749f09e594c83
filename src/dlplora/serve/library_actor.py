"""The library's state on Ray Serve: :class:`LibraryHub`, the deployment-scoped actor that owns the served adapters,
their routing states, ``library.json``, the router (its plugin files) and a version number. Imported on Ray only.

One change at a time: a replica that takes ``/v1/load_lora_adapter`` or ``/v1/unload_lora_adapter`` holds the hub's
lease (:meth:`LibraryHub.begin`) while it validates and stages the adapter, then :meth:`LibraryHub.commit`\\ s the
change: the hub writes ``library.json``, numbers the change and wakes every replica's long poll
(:meth:`LibraryHub.poll`); each replica applies it between two decode steps and acknowledges
(:meth:`LibraryHub.ack`); ``commit`` returns when every live replica has, so ``/v1/models`` is the same on all of them
when the HTTP call returns. A retrained router comes back as its plugin's files (:meth:`LibraryHub.publish_router`),
which the hub writes into the library's plugin directory and hands to every replica the same way. A replica that
starts (or restarts) asks for the whole state before it serves (a poll without a version: a snapshot).

The state is rebuilt from disk when the actor is (re)created (``library.json``, the plugin's labels): only the
``training`` / ``pinned-only`` notes of the moment are lost, and the replicas then take the new snapshot.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import ray

from ..library import Library
from .live import PINNED, ROUTABLE, TRAINING, swap_in

POLL_S = 5.0  # a long poll returns after this long without a change (a replica's sign of life)
DEAD_S = 20.0  # a replica not heard from for this long (and not applying a change) is not waited for
LEASE_S = 300.0  # a replica that took the lease and went silent loses it after this long
KEEP = 64  # changes kept for the replicas' polls; a replica further behind gets a snapshot


def write_files(files: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        (directory / Path(fname).name).write_bytes(data)


def plugin_labels(directory: Path) -> list[str]:
    try:
        return list(json.loads((Path(directory) / "plugin.json").read_text())["labels"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


@ray.remote(num_cpus=0)
class LibraryHub:
    """See the module doc. `library`: the library's directory; `plugin_dir`: the router's (default LIB/plugin)."""

    def __init__(self, library: str, plugin_dir: str | None = None):
        self.lib = Library.open(library)
        self.plugin_dir = Path(plugin_dir) if plugin_dir else self.lib.plugin_dir()
        labels = set(plugin_labels(self.plugin_dir))
        self.incarnation = uuid.uuid4().hex
        self.version = 0
        self.names = list(self.lib.all_names)
        self.routing = {n: ROUTABLE if n in labels else PINNED for n in self.names}
        self.notes: dict[str, str] = {}
        self.plugin: dict | None = None  # the files of the router retrained since this actor started
        self.router_seq = -1  # the library version the adopted router was trained at
        self.log: list[dict] = []  # the last KEEP changes, in order
        self.changed = asyncio.Condition()
        self.holder: str | None = None  # the change holding the lease
        self.token: str | None = None
        self.lease_until = 0.0
        self.acked: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.seen: dict[str, float] = {}

    # -------------------------------------------------- reading
    def snapshot(self) -> dict:
        return {"incarnation": self.incarnation, "v": self.version, "names": list(self.names),
                "entries": {n: self.lib.manifest["adapters"].get(n) for n in self.names},
                "routing": dict(self.routing), "notes": dict(self.notes), "plugin": self.plugin}

    def state(self) -> dict:
        """What the replicas follow, and how far each has come (tests, benchmarks)."""
        return {"v": self.version, "names": list(self.names), "routing": dict(self.routing),
                "acked": dict(self.acked), "live": self._live()}

    async def poll(self, replica: str, version: int | None, incarnation: str | None, timeout: float = POLL_S) -> dict:
        """The changes after `version` ({"changes": [...]}), waiting up to `timeout` seconds for one; a snapshot
        ({"snapshot": ...}) for a replica that starts, followed an earlier incarnation of this actor, or is further
        behind than the changes kept."""
        self.seen[replica] = time.monotonic()
        if version is None or incarnation != self.incarnation or (self.log and version < self.log[0]["v"] - 1):
            self.sent[replica] = self.version
            return {"snapshot": self.snapshot()}
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.version > version), timeout)
            except asyncio.TimeoutError:
                pass
        self.seen[replica] = time.monotonic()
        self.sent[replica] = self.version
        return {"changes": [c for c in self.log if c["v"] > version]}

    async def ack(self, replica: str, version: int) -> None:
        self.acked[replica] = version
        self.seen[replica] = time.monotonic()
        async with self.changed:
            self.changed.notify_all()

    def leave(self, replica: str) -> None:
        for d in (self.acked, self.sent, self.seen):
            d.pop(replica, None)

    def _live(self) -> list[str]:
        """Replicas to wait for: heard from within DEAD_S, or applying a change they were sent (for up to LEASE_S: a
        replica that died while applying one never acks or leaves, and Serve restarts it under another tag)."""
        now = time.monotonic()
        return [r for r, t in self.seen.items()
                if now - t < DEAD_S or (self.sent.get(r, 0) > self.acked.get(r, -1) and now - t < LEASE_S)]

    # -------------------------------------------------- changing
    async def begin(self, replica: str, op: str, name: str, timeout: float) -> dict:
        """Take the lease for one change (waiting up to `timeout` s for the one in progress; a lease whose replica
        went silent lapses after :data:`LEASE_S`); {"v": the version the replica must have applied before it checks
        the change, "token"} or {"error": (status, message, code)}."""
        end = time.monotonic() + timeout
        while self.holder is not None and time.monotonic() < self.lease_until:
            if time.monotonic() > end:
                return {"error": (503, f"another adapter change ({self.holder}) is still in progress; retry",
                                  "adapter_change_in_progress")}
            await asyncio.sleep(0.05)
        self.holder, self.token = f"{op} {name} on {replica}", uuid.uuid4().hex
        self.lease_until = time.monotonic() + LEASE_S
        return {"v": self.version, "token": self.token}

    def end(self, token: str) -> None:
        """Give the lease back (after a commit, or without one: the replica's checks or validation refused it)."""
        if token == self.token:
            self.holder = self.token = None

    async def commit(self, token: str, change: dict, wait_s: float) -> dict:
        """Record `change` ({"op": "load", "name", "entry", "state"} or {"op": "unload", "name"}) in
        ``library.json`` and the state, hand it to every replica, wait (up to `wait_s`) until every live replica has
        applied it, and give the lease back. Returns {"v", "lagging": replicas that had not applied it}."""
        if token != self.token:
            return {"error": (503, "the adapter change took too long and lost its turn; retry", "lease_lapsed")}
        self.lease_until = time.monotonic() + wait_s + LEASE_S
        try:
            name = change["name"]
            if change["op"] == "load":
                self.lib.set_entry(name, change["entry"])
                self.names = self.names + [name]
                self.routing[name] = change["state"]
                self.notes.pop(name, None)
            else:
                if name in self.lib.manifest["adapters"]:
                    self.lib.remove_entry(name)
                self.names = [n for n in self.names if n != name]
                self.routing.pop(name, None)
                self.notes.pop(name, None)
            v = await self._publish(change)
            end = time.monotonic() + wait_s
            async with self.changed:
                while True:
                    lagging = [r for r in self._live() if self.acked.get(r, -1) < v]
                    if not lagging or time.monotonic() > end:
                        break
                    try:
                        await asyncio.wait_for(self.changed.wait(), min(1.0, max(0.01, end - time.monotonic())))
                    except asyncio.TimeoutError:
                        pass
            return {"v": v, "lagging": lagging}
        finally:
            self.end(token)

    async def _publish(self, change: dict) -> int:
        async with self.changed:
            self.version += 1
            self.log.append({**change, "v": self.version, "routing": dict(self.routing), "notes": dict(self.notes)})
            del self.log[:-KEEP]
            self.changed.notify_all()
        return self.version

    async def publish_router(self, seq: int, files: dict, waiting: list[str]) -> bool:
        """A router retrained at library version `seq` (its plugin `files`): written to the plugin directory and handed
        to every replica, `waiting` routable; refused (False) when one trained at a later version came first."""
        if seq < self.router_seq:
            return False
        self.router_seq = seq
        swap_in(self.plugin_dir, lambda new: write_files(files, new))
        self.plugin = files
        for n in waiting:
            if self.routing.get(n) == TRAINING:
                self.routing[n] = ROUTABLE
        await self._publish({"op": "router", "plugin": files})
        return True

    async def router_failed(self, waiting: list[str], why: str) -> None:
        for n in waiting:
            if self.routing.get(n) == TRAINING:
                self.routing[n] = PINNED
                self.notes[n] = f"retraining the router failed: {why}"
        await self._publish({"op": "routing"})
