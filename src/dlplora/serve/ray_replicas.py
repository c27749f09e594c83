"""The Ray Serve deployments of :mod:`dlplora.serve.ray_serve`: the engine replicas (:class:`EngineHTTP`, the
proxy's ingress; :class:`EngineBehindIngress`, behind :class:`Ingress`), the ingress that routes once, the request
router that places requests by adapter set (:class:`SetAffinityRouter`) and the actor that sums the replicas'
metrics (:class:`MetricsHub`); the library's actor is :mod:`dlplora.serve.library_actor`. Imported on Ray only."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import random
import threading
import time
from pathlib import Path

import ray
from ray import serve

from ..errors import DLPLoRAError
from .config import ROUTE_ALIASES, APIError
from .metrics import sum_expositions
from .protocol import ROUTED_HEADER, error_response, parse_generation

log = logging.getLogger("dlplora.server")
REPLICA_HEADER = "x-dlp-lora-replica"
LIBRARY_HEADER = "x-dlp-lora-library"  # the version of the live library a replica answered with (the ingress follows)
METRICS_ACTOR, METRICS_PUSH_S, METRICS_TTL_S = "metrics", 2.0, 10.0
LIBRARY_ACTOR = "library"  # the deployment-scoped actor of the live library (serve/library_actor.py)
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def library_stamp(library: str | Path) -> str:
    """A digest of the library's manifest and plugin files (size and time): part of the replicas' arguments, so that
    deploying again after the library changed replaces the replicas."""
    root = Path(library)
    h = hashlib.blake2b(digest_size=8)
    for f in sorted([root / "library.json", *(root / "plugin").glob("*")]):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def load_engine(spec: dict):
    """The engine of one replica, from the deployment's `spec` (see :func:`deploy`)."""
    import torch

    from ..engine import DLPLoRA

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    return DLPLoRA.from_library(spec["library"], model=spec.get("model"), plugin_dir=spec.get("plugin"),
                                routing=spec.get("routing"), dtype=spec.get("dtype"), device=spec.get("device"),
                                quantize=spec.get("quantize"))


# ---------------------------------------------------------------- the engine replicas

class MountedApp:
    """ASGI middleware: the app sees its own paths under Serve's route prefix (``root_path`` cut from ``path``), and
    every response names the replica that answered (:data:`REPLICA_HEADER`) and, when the library is live, the
    version of it that the replica serves (:data:`LIBRARY_HEADER`, from `version()`)."""

    def __init__(self, app, replica: str, version=None):
        self.server_app, self.replica, self.version = app, replica.encode(), version

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.server_app(scope, receive, send)
        root, path = scope.get("root_path", ""), scope.get("path", "")
        if root and path.startswith(root):
            scope = dict(scope, path=path[len(root):] or "/", raw_path=(path[len(root):] or "/").encode(), root_path="")

        async def send_(msg):
            if msg["type"] == "http.response.start":
                extra = [(REPLICA_HEADER.encode(), self.replica)]
                if self.version is not None:
                    extra.append((LIBRARY_HEADER.encode(), str(self.version()).encode()))
                msg = dict(msg, headers=list(msg.get("headers", [])) + extra)
            await send(msg)

        await self.server_app(scope, receive, send_)


@ray.remote(num_cpus=0)
class MetricsHub:
    """The replicas' latest /metrics texts; :meth:`total` sums those seen in the last `ttl` seconds."""

    def __init__(self):
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def drop(self, replica: str) -> None:
        self.texts.pop(replica, None)

    def total(self, ttl: float) -> tuple[str, int]:
        now = time.monotonic()
        live = [t for at, t in self.texts.values() if now - at <= ttl]
        return sum_expositions(live), len(live)


class EngineReplica:
    """One replica: an engine and the server's app (:func:`dlplora.serve.app.create_app`), runtime adapter changes
    through the library's actor (with --allow-runtime-adapters), /metrics summed over the replicas."""

    async def __init__(self, spec: dict, behind_ingress: bool = False):
        from .app import create_app

        engine = await asyncio.to_thread(load_engine, spec)
        config = dataclasses.replace(spec["config"], replicated=True, trust_routing_header=behind_ingress)
        try:
            self.replica = serve.get_replica_context().replica_tag
        except Exception:  # pragma: no cover - outside a replica
            self.replica = f"local-{id(self):x}"
        self.server_app = create_app(engine, config)
        self.state = self.server_app.state.dlp
        if config.allow_runtime_adapters:  # loads and unloads reach every replica (serve/live_replicas.py)
            from .live_replicas import ReplicaLibrary

            self.state.live = ReplicaLibrary(self.state, lambda: serve.get_deployment_actor(LIBRARY_ACTOR),
                                             self.replica)
            await self.state.live.start()  # the current library, before serving
        self.state.metrics_hook = self.all_metrics
        live = self.state.live if self.state.live.shared else None
        self.server_app.add_middleware(MountedApp, replica=self.replica,
                                       version=(lambda: live.version or 0) if live is not None else None)
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        log.info("replica %s: %d adapters, torch threads %s", self.replica, len(engine.names), spec.get("threads"))

    def check_health(self) -> None:
        """Serve's health check: a replica whose scheduler thread stopped is restarted."""
        if not self.state.scheduler.alive:
            raise RuntimeError("the scheduler thread of this replica stopped")

    def describe(self) -> dict:
        return {"replica": self.replica, "base_name": self.state.base_name, "names": self.state.live.names}

    async def _hub(self):
        return serve.get_deployment_actor(METRICS_ACTOR)

    async def _push_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_PUSH_S)
            try:
                await (await self._hub()).put.remote(self.replica, self.state.render_metrics())
            except Exception as exc:  # the hub is being restarted: the next push tries again
                log.debug("metrics push failed: %s", exc)

    async def all_metrics(self, own: str) -> str:
        """The sum of the replicas' /metrics (this one's of now); this replica's alone when the hub is unreachable."""
        try:
            hub = await self._hub()
            await hub.put.remote(self.replica, own)
            text, n = await hub.total.remote(METRICS_TTL_S)
        except Exception as exc:
            log.warning("summing the replicas' metrics failed: %s", exc)
            return f"# dlp-lora: this replica ({self.replica}) only; summing over the replicas failed\n" + own
        return (f"# dlp-lora: the sum over {n} Ray Serve replicas\n# HELP dlp_lora_replicas Replicas summed here.\n"
                f"# TYPE dlp_lora_replicas gauge\ndlp_lora_replicas {n}\n" + text)

    async def _stop_pusher(self) -> None:
        self._pusher.cancel()
        if self.state.live.shared:
            await self.state.live.stop()
        try:
            await (await self._hub()).drop.remote(self.replica)
        except Exception:
            pass


class EngineHTTP(EngineReplica):
    """The engine as Serve's HTTP ingress (``--placement serve``): the proxy sends requests straight to it."""

    def __serve_build_asgi_app__(self):
        return self.server_app

    async def __del__(self):
        await self._stop_pusher()


class EngineBehindIngress(EngineReplica):
    """The engine behind :class:`Ingress` (``--placement by-set`` / ``ingress``): it runs the app's lifespan itself
    and answers HTTP requests handed over as calls of :meth:`http`."""

    async def __init__(self, spec: dict):
        await super().__init__(spec, behind_ingress=True)
        self._life = self.server_app.router.lifespan_context(self.server_app)
        await self._life.__aenter__()  # starts the scheduler

    async def __del__(self):
        await self._stop_pusher()
        await self._life.__aexit__(None, None, None)

    async def http(self, method: str, path: str, query: bytes, headers: list, body: bytes, client=None,
                   placement: str | None = None):
        """Run one HTTP request through the app; yields its ASGI messages (the response start, then body chunks).
        `placement` is what :class:`SetAffinityRouter` placed the request by. Closing the generator (the client went
        away) tells the app the client disconnected."""
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "root_path": "", "headers": [(bytes(k), bytes(v)) for k, v in headers],
                 "client": tuple(client) if client else None, "server": None}
        given = False

        async def receive():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def run():
            try:
                await self.server_app(scope, receive, out.put)
            finally:
                await out.put(None)

        task = asyncio.get_running_loop().create_task(run())
        try:
            while (msg := await out.get()) is not None:
                yield msg
            await task
        finally:
            gone.set()
            if not task.done():
                task.cancel()


# ---------------------------------------------------------------- the ingress and the request router

class RouterView:
    """What :meth:`dlplora.engine.DLPLoRA.route_with_reasons` and ``routing_text`` read, without a backbone: the
    ingress routes with the engine's own code, plugin and settings."""

    def __init__(self, spec: dict):
        from ..config import RoutingConfig
        from ..library import Library

        lib = Library.open(spec["library"])
        pdir = Path(spec["plugin"]) if spec.get("plugin") else lib.plugin_dir()
        self.router = None
        if pdir.is_dir() and any(pdir.iterdir()):
            from ..plugin import Plugin

            self.router = Plugin.load(pdir, expected_labels=lib.names, partial=True)
        self.library, self.fusion = lib, frozenset(lib.names)
        self.routing = spec.get("routing") or RoutingConfig()
        self.unroutable = frozenset(getattr(self.router, "labels", ())) - self.fusion

    def routing_text(self, text: str, history=None) -> str:
        from ..engine import DLPLoRA

        return DLPLoRA.routing_text(self, text, history)

    def route_with_reasons(self, texts: list[str]) -> list[tuple[dict, str | None]]:
        from ..engine import DLPLoRA

        return DLPLoRA.route_with_reasons(self, texts)


class AsgiCall:
    """An ASGI app that calls `fn` (uvicorn, running the lifespan for Serve, tells ASGI 3 by an async __call__)."""

    def __init__(self, fn):
        self.fn = fn

    async def __call__(self, scope, receive, send):
        await self.fn(scope, receive, send)


class Ingress:
    """The front of ``--placement by-set`` / ``ingress``: routes each generation request once and hands the HTTP
    request to an engine replica through a Serve handle (by-set: the key of its adapter set goes with it)."""

    def __init__(self, engine, spec: dict, affinity: bool):
        import torch

        torch.set_num_threads(1)
        self.engine, self.affinity, self.config = engine, affinity, spec["config"]
        self.spec, self.view, self.library_version = spec, RouterView(spec), None
        self.lock = threading.Lock()
        self.info: dict | None = None

    def __serve_build_asgi_app__(self):
        return AsgiCall(self.asgi)

    async def place(self, method: str, path: str, headers: dict, body: bytes) -> tuple[str | None, dict | None]:
        """(the placement key: the names of the request's adapter set, the routed set for the header) of a generation
        request; (None, None) for anything else, or anything the replica will refuse (it answers that)."""
        cfg = self.config
        if method != "POST" or path not in GENERATION_PATHS or len(body) > cfg.max_body_bytes:
            return None, None
        if cfg.api_key:
            scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), cfg.api_key.encode()):
                return None, None
        try:
            data = json.loads(body)
            params = parse_generation(data, path.endswith("chat/completions"), cfg.max_tokens_limit,
                                      cfg.max_messages, cfg.max_n)
        except (ValueError, RecursionError, APIError, AttributeError, TypeError):
            return None, None
        if self.info is None:
            self.info = await self.engine.describe.remote()
        model, adapters = params.model, params.adapters
        if adapters is not None:
            return (json.dumps(sorted(map(str, adapters))) if isinstance(adapters, dict) else None), None
        if isinstance(model, str) and model in self.info["names"]:
            return json.dumps([model]), None
        if not (model in (None, "", self.info["base_name"]) or model in ROUTE_ALIASES) or self.view.router is None:
            return None, None
        text = self.view.routing_text(params.prompt, params.history)

        def route():
            with self.lock:
                return self.view.route_with_reasons([text])[0]

        try:
            aset, why = await asyncio.to_thread(route)
        except DLPLoRAError:
            return None, None
        return json.dumps(sorted(aset)), {"adapters": aset, "why": why}

    def _follow_library(self, headers) -> None:
        """A replica answered from another version of the live library than the one this ingress read: read the
        library and its router again (``library.json`` and the plugin directory, which the library's actor keeps
        current), so that loaded adapters are placed and routed to, and unloaded ones no longer are."""
        version = next((v for k, v in headers if k == LIBRARY_HEADER.encode()), None)
        if version is None or version == self.library_version:
            return
        self.library_version, self.info = version, None  # the served names: asked again
        asyncio.get_running_loop().create_task(self._reread())

    async def _reread(self) -> None:
        try:
            view = await asyncio.to_thread(RouterView, self.spec)
        except Exception as exc:  # the replicas still route what the ingress does not (submit's fallback)
            log.warning("reading the library again failed: %s", exc)
            return
        with self.lock:
            self.view = view

    async def asgi(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        root, path = scope.get("root_path", ""), scope.get("path", "")
        path = (path[len(root):] if root and path.startswith(root) else path) or "/"
        chunks, size, more = [], 0, True
        while more and size <= self.config.max_body_bytes:  # the replica answers 413 beyond the limit
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        routed_name = ROUTED_HEADER.encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != routed_name]
        try:
            key, routed = await self.place(scope["method"], path, dict(headers), body)
        except Exception as exc:  # no placement is no failure: any replica answers, routing the request itself
            log.warning("placing a request failed: %s: %s", type(exc).__name__, exc)
            key, routed = None, None
        if routed is not None:
            headers.append((routed_name, json.dumps(routed).encode()))
        handle = self.engine.options(stream=True)
        gen = handle.http.remote(scope["method"], path, scope.get("query_string", b""), headers, body,
                                 scope.get("client"), placement=key if self.affinity else None)
        started, stream, finished = False, False, False
        try:
            async for msg in gen:
                if msg["type"] == "http.response.start":
                    started = True
                    self._follow_library(msg.get("headers", []))
                    stream = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                 for k, v in msg.get("headers", []))
                await send(msg)
            finished = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the replica died: before the answer began, a 503 the client may retry
            log.warning("the engine replica failed during a request: %s", exc)
            if not started:
                err = APIError(503, f"the engine replica failed: {type(exc).__name__}; retry", "server_error",
                               code="replica_failed", headers={"Retry-After": "1"})
                await error_response(err)(scope, receive, send)
            else:
                tail = b""
                if stream:
                    tail = b"data: " + json.dumps({"error": {"message": "the engine replica failed", "type":
                                                             "server_error", "param": None, "code": "replica_failed"}
                                                   }).encode() + b"\n\n"
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            finished = True
        finally:
            if not finished:
                gen.cancel()


def _weight(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\x00{replica}".encode(), digest_size=8).digest(), "big")


try:  # the public request-router surface (Ray >= 2.45)
    from ray.serve.request_router import RequestRouter
except ImportError:  # pragma: no cover
    RequestRouter = object


class SetAffinityRouter(RequestRouter):
    """Serve request router of ``--placement by-set``: a request whose call carries ``placement=KEY`` goes to the
    first replica in the rendezvous-hash order of KEY whose requests in flight (counted here, at the ingress) are
    under ``load_factor`` x the mean (consistent hashing with bounded loads); the others follow in that order, should
    it refuse (queue full). A request without a key: two random replicas, the shorter queue wins (Serve's
    default)."""

    def initialize_state(self, load_factor: float = 1.25):
        self.load_factor = float(load_factor)
        self.inflight: dict = {}
        self.where: dict = {}

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        key = pending_request.kwargs.get("placement") if pending_request is not None else None
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        if not key:
            return [random.sample(list(candidate_replicas), min(2, len(candidate_replicas)))]
        order = sorted(candidate_replicas, key=lambda r: _weight(key, r.replica_id.unique_id), reverse=True)
        load = [self.inflight.get(r.replica_id, 0) for r in order]
        bound = math.ceil(self.load_factor * (sum(load) + 1) / len(order))
        first = next((i for i, n in enumerate(load) if n < bound), 0)
        return [[order[first]], order[:first] + order[first + 1:]]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        self.where[pending_request.metadata.internal_request_id] = replica_id
        self.inflight[replica_id] = self.inflight.get(replica_id, 0) + 1

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        rid = self.where.pop(internal_request_id, None)
        if rid is not None:
            self.inflight[rid] = max(0, self.inflight.get(rid, 0) - 1)
