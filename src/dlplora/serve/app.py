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

Continuous batching: one background thread owns the model and decodes every running request together
(:mod:`dlplora.serve.scheduler`); requests are parsed by :mod:`dlplora.serve.protocol`.

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
import logging
import threading
import time

from starlette.requests import Request  # module level: FastAPI resolves the handlers' annotations here

from ..engine import adapter_set, routing_field
from ..errors import ContextLengthError, DLPLoRAError
from .config import COMPLETIONS_DEFAULT_MAX_TOKENS, ROUTE_ALIASES, APIError, QueueFull, ServeConfig
from .metrics import Metrics
from .protocol import GenerationParams, ResponseWriter, error_response, parse_generation, read_json
from .scheduler import GenRequest, Scheduler

log = logging.getLogger("dlplora.server")


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
    def choose(self, params: GenerationParams) -> tuple[dict | None, str]:
        """(adapter set or None = route, source) from "model" and "adapters"."""
        model = params.model
        names = self.engine.names
        adapters = params.adapters
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
            if pinned is not None:
                raise APIError(400, f"give either 'model': {pinned!r} (one adapter) or 'adapters' (a weighted mix), "
                                    f"not both", param="adapters")
            if not isinstance(adapters, dict):
                raise APIError(400, "'adapters' must be an object {\"name\": weight, ...}", param="adapters")
            for n, w in adapters.items():
                if isinstance(w, bool) or not isinstance(w, (int, float)):
                    raise APIError(400, f"'adapters': weight of {n!r} must be a number, got {w!r}", param="adapters")
            try:
                s = adapter_set(adapters, "'adapters'")
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

    def prepare(self, params: GenerationParams, aset: dict | None, source: str,
                default_max: int) -> tuple[list[int], dict, int, dict]:
        """Tokenize and check the request; route it if needed. Runs in a worker thread."""
        eng = self.engine
        try:
            with self.tok_lock:
                req = eng.prepare_request(params.prompt, None, params.history, not params.chat, params.max_tokens or 1)
        except DLPLoRAError as exc:
            field = getattr(exc, "field", None)
            param = "max_tokens" if field == "max_new_tokens" else ("messages" if params.chat else "prompt")
            raise APIError(400, str(exc).replace("max_new_tokens", "max_tokens"), param=param,
                           code="context_length_exceeded" if isinstance(exc, ContextLengthError) else None) from None
        ids = req.ids
        max_tokens = params.max_tokens
        if max_tokens is None:
            room = (eng.context_length - len(ids)) if eng.context_length else default_max
            max_tokens = max(1, min(default_max, room))
        why = None
        if aset is None:
            try:
                with self.router_lock:
                    aset, why = eng.route_with_reasons([req.route_text])[0]
            except DLPLoRAError as exc:
                raise APIError(400, str(exc), param="model") from None
        adapters = [{"name": n, "weight": round(float(w), 6)} for n, w in sorted(aset.items(), key=lambda kv: -kv[1])]
        return ids, routing_field(adapters, source, why), max_tokens, aset


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


async def generate(state: ServerState, request: Request, chat: bool):
    """POST /v1/chat/completions (`chat`) or /v1/completions: parse, choose and route, queue for the scheduler,
    then answer with the whole completion or stream it (SSE)."""
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    body = await read_json(request, state.config.max_body_bytes)
    params = parse_generation(body, chat, state.config.max_tokens_limit)
    aset, source = state.choose(params)
    limit = state.config.max_tokens_limit
    default_max = limit if chat else min(limit, COMPLETIONS_DEFAULT_MAX_TOKENS)
    ids, routing, max_new, aset = await run_in_threadpool(state.prepare, params, aset, source, default_max)

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(kind, payload):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    req = GenRequest(ids=ids, adapters=aset, max_new=max_new, emit=emit, temperature=params.temperature,
                     top_p=params.top_p, seed=params.seed, stop=params.stop,
                     deadline=time.monotonic() + state.config.request_timeout)
    try:
        state.scheduler.submit(req)
    except QueueFull:
        raise APIError(503, f"the server is busy: {state.config.max_queue} requests are already waiting; "
                            f"retry shortly", "server_overloaded", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    state.metrics.count_routing(routing)
    out = ResponseWriter(params, req.id, int(time.time()), params.model or state.base_name, routing)

    if not params.stream:
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
        return out.completion(payload, ids)

    async def events():
        try:
            if chat:
                yield out.chunk("", first=True)
            while True:
                kind, payload = await queue.get()
                if kind == "delta":
                    yield out.chunk(payload)
                elif kind == "error":
                    yield out.error_chunk(payload)
                    break
                else:
                    yield out.chunk(None if chat else "", finish=payload["finish_reason"])
                    if params.include_usage:
                        yield out.usage_chunk(payload)
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not req.finished:
                req.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(engine, config: ServeConfig | None = None):
    """The FastAPI app for `engine` (a :class:`dlplora.engine.DLPLoRA`); the scheduler thread starts
    with the app's lifespan and stops with it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse
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
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), "invalid_request_error", code=kind))

    @app.exception_handler(Exception)
    async def _any_error(request, exc):
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(state, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(state, request, chat=False)

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
