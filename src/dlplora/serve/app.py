"""An OpenAI-compatible HTTP server for a DLP-LoRA library, with continuous multi-LoRA batching.

>>> engine = DLPLoRA.from_library("lib")
>>> app = create_app(engine, ServeConfig(max_batch_size=16))
>>> uvicorn.run(app, host="127.0.0.1", port=8000)        # or: dlp-lora serve --library lib

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming SSE or not),
``GET /v1/models`` (each adapter with its routing state), ``GET /health``, ``GET /metrics`` (Prometheus text), and
with ``--allow-runtime-adapters`` ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``
(:mod:`dlplora.serve.adapters_api`; the live library: :mod:`dlplora.serve.live`).

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
apply, with one generator per choice). ``n`` > 1 asks for n choices: sampled ones run as n rows, choice i with
seed ``seed + i`` when a seed is given; greedy choices are all the same, so they are generated once and
repeated. ``logprobs`` (and ``top_logprobs`` in chat) report the log probability of each token and its most
likely alternatives, from the logits the decode computes anyway (:mod:`dlplora.serve.logprobs`). Parameters
this server does not implement (tools, penalties, ``logit_bias``, ``response_format``, ...) are refused with 400
naming them unless they hold their default; unknown fields are ignored and logged (:mod:`dlplora.serve.protocol`).

Security: with ``api_key`` set (``--api-key`` or ``$DLP_LORA_API_KEY``) every route but ``/health`` needs
``Authorization: Bearer <key>`` (else 401, compared in constant time). Limits, each answered with a clear 4xx:
the body size (413), the number of messages, the prompt tokens, ``max_tokens`` and ``n`` (400). A row's results do not depend on its neighbours (padding
is masked, positions are per row), so a greedy request gives the same text batched or alone, up to
float rounding. Requests wait in a bounded queue (``max_queue``; beyond it: 503 with Retry-After);
each has a token limit (``max_tokens_limit``) and a deadline (``request_timeout``; then 504). A
failing prefill is retried row by row so that only the bad request fails; a failing decode step
fails the running rows with 500 and the server keeps serving. A client that disconnects is dropped
from the batch at the next step boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time

from starlette.requests import Request  # module level: FastAPI resolves the handlers' annotations here

from ..engine import adapter_set, routing_field
from ..errors import ContextLengthError, DLPLoRAError
from .adapters_api import adapters_router
from .config import COMPLETIONS_DEFAULT_MAX_TOKENS, ROUTE_ALIASES, APIError, QueueFull, ServeConfig
from .engine_proc import EngineClient
from .live import LiveLibrary
from .metrics import Metrics
from .playground import PLAYGROUND_PATHS, add_playground
from .logprobs import ChoiceLogprobs, TokenText
from .protocol import (ROUTED_HEADER, GenerationParams, ResponseWriter, error_response, parse_generation,
                       read_json, routed_header)
from .scheduler import GenRequest, Scheduler

log = logging.getLogger("dlplora.server")


class ServerState:
    def __init__(self, engine, config: ServeConfig, engine_spec: dict | None = None):
        self.engine = engine
        self.config = config.check()
        self.metrics = Metrics()
        self.tok_lock = threading.Lock()
        self.router_lock = threading.Lock()
        if self.config.engine_process:  # the scheduler and the model in a child process (serve.engine_proc)
            if engine_spec is None:
                raise DLPLoRAError("engine_process needs the engine's recipe (engine_spec: the keyword arguments of "
                                   "DLPLoRA.from_library) to load the model in the engine process")
            self.scheduler = EngineClient(engine, self.config, self.metrics, engine_spec)
        else:
            self.scheduler = Scheduler(engine, self.config, self.metrics, self.tok_lock)
        self._token_text = None
        info = getattr(engine, "info", None)
        self.base_name = config.model_name or (info.name if info is not None else "base")
        self.created = int(time.time())
        self.live = LiveLibrary(self)  # the served adapters and their routing states
        self.metrics_hook = None  # async (this server's /metrics text) -> the text to answer (Ray Serve: the sum)

    def render_metrics(self) -> str:
        """This server's /metrics text (Prometheus), its queue gauges read now."""
        self.metrics.queue_depth = self.scheduler.queued
        self.metrics.running = self.scheduler.running
        return self.metrics.render(self.live.names)

    @property
    def token_text(self) -> TokenText:
        """Token strings for the ``logprobs`` fields (made on first use)."""
        if self._token_text is None:
            self._token_text = TokenText(self.engine.tokenizer, self.tok_lock)
        return self._token_text

    # -------------------------------------------------- adapter choice
    def choose(self, params: GenerationParams) -> tuple[dict | None, str]:
        """(adapter set or None = route, source) from "model" and "adapters"."""
        model = params.model
        names = self.live.names
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

    def prepare(self, params: GenerationParams, default_max: int) -> tuple[list[int], str, int]:
        """Tokenize and check the request: (prompt ids, the text the router reads, max_tokens). Runs in a worker
        thread."""
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
        limit = self.config.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise APIError(400, f"the prompt is {len(ids)} tokens, over this server's limit of {limit} prompt tokens",
                           param="messages" if params.chat else "prompt", code="prompt_too_long")
        max_tokens = params.max_tokens
        if max_tokens is None:
            room = (eng.context_length - len(ids)) if eng.context_length else default_max
            max_tokens = max(1, min(default_max, room))
        return ids, req.route_text, max_tokens

    def route(self, route_text: str) -> tuple[dict, str | None]:
        """The router's set for the request's routing text, and its reason for the base model."""
        try:
            with self.router_lock:
                return self.engine.route_with_reasons([route_text])[0]
        except DLPLoRAError as exc:
            raise APIError(400, str(exc), param="model") from None

    def submit(self, reqs: list[GenRequest], aset: dict | None, source: str, route_text: str,
               why: str | None = None) -> dict:
        """Route the request when `aset` is None, give its rows the set, queue them; returns its ``routing`` (`why`:
        the router's reason for the base model, when `aset` was routed already). All under the live library's lock, so
        a runtime unload either comes before (the router no longer chooses the adapter, and a request naming it gets
        404) or sees the rows queued and waits for them. Runs in a worker thread."""
        with self.live.lock:
            if aset is None:
                aset, why = self.route(route_text)
            gone = [n for n in aset if n not in self.live.routing]
            if gone and source == "plugin":  # routed at a Ray Serve ingress that has not seen an unload yet: route here
                aset, why = self.route(route_text)
                gone = [n for n in aset if n not in self.live.routing]
            if gone:
                raise APIError(404, f"the adapter {gone[0]!r} was unloaded; serve one of: "
                                    f"{', '.join([self.base_name] + self.live.names)}", param="model",
                               code="model_not_found")
            for r in reqs:
                r.adapters = aset
                self.scheduler.submit(r)
        adapters = [{"name": n, "weight": round(float(w), 6)} for n, w in sorted(aset.items(), key=lambda kv: -kv[1])]
        return routing_field(adapters, source, why)


class _Auth:
    """ASGI middleware: every HTTP route but /health (and GET of the playground's static files) needs
    "Authorization: Bearer <key>"; a missing or wrong key gets 401 in the OpenAI format (compared in constant time)."""

    OPEN = ("/health",)
    OPEN_PREFIXES = PLAYGROUND_PATHS  # the playground's static files: the page asks for the key, then sends it

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode("ascii")

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        page = (path == "/" or path.startswith(self.OPEN_PREFIXES)) and scope.get("method") in ("GET", "HEAD")
        if scope["type"] != "http" or path in self.OPEN or page:
            return await self.app(scope, receive, send)
        auth = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
        if auth is None:
            err = "missing API key: send the header 'Authorization: Bearer <key>' (the key given to the server " \
                  "with --api-key or $DLP_LORA_API_KEY)"
        else:
            scheme, _, token = auth.strip().partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
                return await self.app(scope, receive, send)
            err = "incorrect API key provided" if scheme.lower() == b"bearer" else \
                "the Authorization header must be 'Bearer <key>'"
        resp = error_response(APIError(401, err, "invalid_request_error", code="invalid_api_key",
                                       headers={"WWW-Authenticate": "Bearer"}))
        await resp(scope, receive, send)


class _StatusCounter:
    """ASGI middleware: count every HTTP response by endpoint and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                 "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
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
    """POST /v1/chat/completions (`chat`) or /v1/completions: parse, choose and route, queue for the scheduler
    (one row per sampled choice), then answer with the whole completion or stream it (SSE)."""
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    cfg = state.config
    body = await read_json(request, cfg.max_body_bytes)
    params = parse_generation(body, chat, cfg.max_tokens_limit, cfg.max_messages, cfg.max_n)
    if params.ignored:
        log.info("ignoring unknown request fields: %s", ", ".join(repr(k)[:40] for k in params.ignored[:20]))
    aset, source = state.choose(params)
    why = None
    if aset is None and cfg.trust_routing_header:  # routed once at the Ray Serve ingress (serve/ray_serve.py)
        aset, why = routed_header(request.headers.get(ROUTED_HEADER))
    limit = cfg.max_tokens_limit
    default_max = limit if chat else min(limit, COMPLETIONS_DEFAULT_MAX_TOKENS)
    ids, route_text, max_new = await run_in_threadpool(state.prepare, params, default_max)

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    n = params.n
    runs = n if params.temperature > 0 else 1  # greedy choices are all the same: one row, repeated
    seeds = params.choice_seeds()
    deadline = time.monotonic() + cfg.request_timeout

    def emitter(k: int):
        def emit(kind, payload):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (k, kind, payload))
            except RuntimeError:  # the event loop is gone (shutdown)
                pass
        return emit

    reqs = [GenRequest(ids=ids, adapters={}, max_new=max_new, emit=emitter(k), temperature=params.temperature,
                       top_p=params.top_p, seed=seeds[k], stop=params.stop, deadline=deadline,
                       logprobs=params.logprobs) for k in range(runs)]  # their adapter set: state.submit

    def cancel_all():
        for r in reqs:
            if not r.finished:
                r.cancel()

    try:
        routing = await run_in_threadpool(state.submit, reqs, aset, source, route_text, why)
    except QueueFull:
        cancel_all()
        raise APIError(503, f"the server is busy: {cfg.max_queue} requests are already waiting; "
                            f"retry shortly", "server_overloaded", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except BaseException:
        cancel_all()
        raise
    state.metrics.count_routing(routing)
    out = ResponseWriter(params, reqs[0].id, int(time.time()), params.model or state.base_name, routing)
    choices_of = (lambda k: [k]) if runs == n else (lambda k: range(n))  # the choices a row answers
    tracks = [ChoiceLogprobs(r, state.token_text) if params.logprobs is not None else None for r in reqs]

    if not params.stream:
        dones: list = [None] * runs
        try:
            while any(d is None for d in dones):
                try:
                    k, kind, payload = await asyncio.wait_for(queue.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        cancel_all()
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "error":
                    cancel_all()
                    raise payload
                if kind == "done":
                    dones[k] = payload
        except asyncio.CancelledError:
            cancel_all()
            raise
        lps = None
        if params.logprobs is not None:
            lps = await run_in_threadpool(lambda: [t.final(d) for t, d in zip(tracks, dones)])
        if runs != n:
            dones, lps = dones * n, (lps * n if lps is not None else None)
        return out.completion(dones, ids, lps)

    async def events():
        dones: list = [None] * runs
        emitted = [0] * runs
        try:
            if chat:
                for i in range(n):
                    yield out.chunk("", first=True, index=i)
            while any(d is None for d in dones):
                k, kind, payload = await queue.get()
                if kind == "delta":
                    emitted[k] += len(payload)
                    lp = tracks[k].stream(emitted[k]) if tracks[k] is not None else None
                    for i in choices_of(k):
                        yield out.chunk(payload, index=i, logprobs=lp)
                elif kind == "error":
                    yield out.error_chunk(payload)
                    break
                else:
                    dones[k] = payload
                    lp = tracks[k].final(payload) if tracks[k] is not None else None
                    for i in choices_of(k):
                        yield out.chunk(None if chat else "", finish=payload["finish_reason"], index=i, logprobs=lp)
            else:
                if params.include_usage:
                    yield out.usage_chunk(dones * (n // runs))
            yield "data: [DONE]\n\n"
        finally:
            cancel_all()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(engine, config: ServeConfig | None = None, engine_spec: dict | None = None):
    """The FastAPI app for `engine` (a :class:`dlplora.engine.DLPLoRA`); the scheduler thread starts
    with the app's lifespan and stops with it. With ``config.engine_process`` the scheduler runs in a child process
    that loads its own engine from `engine_spec` (:mod:`dlplora.serve.engine_proc`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    state = ServerState(engine, config or ServeConfig(), engine_spec)

    @asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        try:
            yield
        finally:
            state.live.close()
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
        body = {"status": "ok" if ok else "unavailable", "model": state.base_name, "adapters": state.live.names,
                "plugin": engine.router is not None, "running": sch.running, "queued": sch.queued,
                "max_batch_size": state.config.max_batch_size}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        data = [{"id": state.base_name, "object": "model", "created": state.created, "owned_by": "dlp-lora",
                 "root": state.base_name, "parent": None}]
        if state.base_name != ROUTE_ALIASES[0]:  # "dlp-lora": routed by the plugin (each adapter below has "routing")
            data.append(data[0] | {"id": ROUTE_ALIASES[0], "parent": state.base_name})
        for n, routing, note in state.live.models():
            data.append({"id": n, "object": "model", "created": state.created, "owned_by": "dlp-lora", "root": n,
                         "parent": state.base_name, "routing": routing} | ({"routing_note": note} if note else {}))
        return {"object": "list", "data": data, "router": engine.base_decision()}

    @app.get("/metrics")
    async def metrics():
        text = state.render_metrics()
        if state.metrics_hook is not None:  # on Ray Serve: the sum over the replicas (serve/ray_serve.py)
            text = await state.metrics_hook(text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(state, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(state, request, chat=False)

    app.include_router(adapters_router(state))  # /v1/load_lora_adapter, /v1/unload_lora_adapter
    if state.config.playground:
        add_playground(app)  # GET / and /playground/*: static files that call the endpoints above

    if state.config.api_key:
        app.add_middleware(_Auth, key=state.config.api_key)
    app.add_middleware(_StatusCounter, metrics=state.metrics)  # outermost: counts the 401s too
    return app
