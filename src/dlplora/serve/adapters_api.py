"""``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``, in vLLM's request shapes.

    POST /v1/load_lora_adapter    {"lora_name": "my_task", "lora_path": "/adapters/my_task",
                                   "examples": ["a prompt of the task", ...],      # optional: route to it
                                   "examples_path": "/adapters/my_task/examples.jsonl"}   # optional, JSONL
    POST /v1/unload_lora_adapter  {"lora_name": "my_task"}

Both are off unless the server runs with ``--allow-runtime-adapters``; then they answer 404, as vLLM does without
``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` (its routes do not exist), with a message that says how to turn them on. The
API key (``--api-key``) applies to them as to every route. With ``--adapter-root DIR``, ``lora_path`` and
``examples_path`` must resolve inside DIR (a relative path is taken from DIR; ``..`` and symbolic links are
resolved first, every file of the adapter directory included): else 403; the files are then copied (and the
examples file read) through descriptors opened from the resolved root with O_NOFOLLOW
(:func:`dlplora.paths.copy_tree_under`), so a file swapped for a symbolic link after these checks is refused, and
what is validated and served is the copy. Without it, any path the server can read
is accepted, so give one whenever clients are not trusted with the server's file system.

Answers: 200 with ``{"object": "lora_adapter", "id", "loaded", "routing", "message", ...}`` (``message`` is
vLLM's success text); 400 for a bad body, a name already served, or an adapter that fails validation (the message
names the problem: base model, targets, shapes, rank, corrupt or missing files, modules_to_save); 404 for a path
that does not exist or an unload of an adapter not served; 403 outside the adapter root; 409 for the name of an
adapter still being unloaded. On Ray Serve replicas a load or unload reaches every replica
(:mod:`dlplora.serve.live_replicas`); 501 on a replicated app that does not follow the library's actor. What happens
to requests in flight, routing states and the unload policy: :mod:`dlplora.serve.live`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from starlette.requests import Request  # module level: FastAPI resolves the handlers' annotations here

from ..errors import DLPLoRAError
from .config import APIError
from .protocol import read_json

log = logging.getLogger("dlplora.server")
MAX_FILES = 1000  # entries of an adapter directory checked against the adapter root; more: refused
LOAD_FIELDS = ("lora_name", "lora_path", "examples", "examples_path")


def confine(value, root: str | None, param: str) -> Path:
    """The path a client gave, resolved (symbolic links and ``..`` followed); with `root`, it and (for a directory)
    everything in it must lie inside `root` (else 403)."""
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, f"'{param}' must be a non-empty string (a path on the server)", param=param)
    if "\x00" in value or len(value) > 4096:
        raise APIError(400, f"'{param}' is not a valid path", param=param)
    try:
        path = Path(value)
        full = ((Path(root) / path) if root is not None and not path.is_absolute() else path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise APIError(400, f"'{param}' is not a valid path: {exc}", param=param) from None
    if root is None:
        return full
    outside = APIError(403, f"'{param}' lies outside the server's adapter root (--adapter-root); only adapters "
                            f"under it can be loaded", "permission_error", param=param, code="path_not_allowed")
    if not full.is_relative_to(root):
        raise outside
    if full.is_dir():
        try:
            for i, f in enumerate(full.rglob("*")):
                if i >= MAX_FILES:
                    raise APIError(400, f"'{param}' holds over {MAX_FILES} files; it is not an adapter directory",
                                   param=param)
                if not f.resolve().is_relative_to(root):
                    raise outside
        except OSError as exc:
            raise APIError(400, f"'{param}' cannot be read: {exc}", param=param) from None
    return full


def parse_load(body: dict, root: str | None) -> tuple[str, Path, list[dict] | None]:
    """(lora_name, the adapter directory, routing prompts or None) of a load request."""
    from ..library import check_adapter_name, example_rows, read_examples

    name, path = body.get("lora_name"), body.get("lora_path")
    if not name or not path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                       param="lora_name" if not name else "lora_path")
    try:
        check_adapter_name(name)
    except DLPLoRAError as exc:
        raise APIError(400, str(exc), param="lora_name") from None
    where = confine(path, root, "lora_path")
    if not where.is_dir():
        raise APIError(404, f"No adapter found at {path!r} (no such directory on the server)", param="lora_path",
                       code="adapter_not_found")
    rows: list[dict] = []
    try:
        if body.get("examples") is not None:
            rows += example_rows(body["examples"], "'examples'")
        if body.get("examples_path") is not None:
            file = confine(body["examples_path"], root, "examples_path")
            if not file.is_file():
                raise APIError(404, f"'examples_path' {body['examples_path']!r}: no such file on the server",
                               param="examples_path")
            rows += read_examples(file, root=root)
    except DLPLoRAError as exc:
        raise APIError(400, str(exc), param="examples") from None
    ignored = [k for k in body if k not in LOAD_FIELDS]
    if ignored:
        log.info("load_lora_adapter: ignoring unknown fields: %s", ", ".join(repr(k)[:40] for k in ignored[:20]))
    return name, where, rows or None


def adapters_router(state):
    """The APIRouter of the two routes for a :class:`dlplora.serve.app.ServerState`."""
    from fastapi import APIRouter
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()

    async def body_of(request: Request) -> dict:
        cfg = state.config
        if not cfg.allow_runtime_adapters:
            raise APIError(404, f"{request.url.path} is off: start the server with --allow-runtime-adapters to load "
                                f"and unload LoRA adapters at runtime", code="not_found")
        if cfg.replicated and not state.live.shared:
            raise APIError(501, f"{request.url.path} is not available on this replica: it does not follow the library's "
                                f"actor, so a load or unload would change one replica only. Deploy with dlp-lora serve "
                                f"--ray-address ... --allow-runtime-adapters", "not_implemented_error",
                           code="not_implemented")
        body = await read_json(request, cfg.max_body_bytes)
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await body_of(request)
        name, path, rows = await run_in_threadpool(parse_load, body, state.config.adapter_root)
        return await run_in_threadpool(state.live.load, name, path, rows)

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await body_of(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "'lora_name' must be provided.", param="lora_name")
        return await run_in_threadpool(state.live.unload, name)

    return router
