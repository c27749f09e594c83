"""The server's configuration, its OpenAI-format error and the queue-full signal."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DLPLoRAError

ROUTE_ALIASES = ("dlp-lora", "auto", "dlp-lora/auto")  # model ids that mean "route by content"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions
API_KEY_ENV = "DLP_LORA_API_KEY"  # `dlp-lora serve` reads the API key from here when --api-key is not given
MAX_TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's limit for chat)


@dataclass
class ServeConfig:
    max_batch_size: int = 16
    max_queue: int = 64
    max_tokens_limit: int = 512
    request_timeout: float = 120.0
    max_body_bytes: int = 1 << 20
    model_name: str | None = None  # the public id of the base model (default: the backbone's name)
    prefill_chunk: int = 256  # prompt tokens per prefill chunk (between two decode steps of the running rows)
    compile: bool = False  # torch.compile the decode step (see `dlp-lora bench decode --compile`)
    # run the scheduler and the forward passes in a child process (serve.engine_proc); needs the engine's recipe
    # (create_app's engine_spec). `dlp-lora serve` turns it on; an engine built in this process runs in a thread.
    engine_process: bool = False
    max_messages: int = 256  # chat messages per request; above: 400
    max_prompt_tokens: int | None = None  # prompt tokens per request (None: the context window); above: 400
    max_n: int = 8  # choices per request ('n'); above: 400
    # every route but /health needs "Authorization: Bearer <api_key>" when set (else 401)
    api_key: str | None = field(default=None, repr=False)
    allow_runtime_adapters: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter are on
    adapter_root: str | None = None  # lora_path of a runtime load must lie under this directory (else 403)
    retrain_max_prompts: int = 300  # routing prompts per adapter when the router retrains after a runtime load
    playground: bool = True  # the static playground page at / (serve/playground.py); --no-playground: off
    # one of several Ray Serve replicas (dlplora.serve.ray_serve): the runtime adapter routes answer 501 unless the
    # replica's live library follows the library's actor (dlplora.serve.live_replicas), since a load would reach one
    # replica only
    replicated: bool = False
    # take the adapter set routed by the Ray Serve ingress from the header protocol.ROUTED_HEADER (only on replicas
    # that no client reaches directly: behind the ingress of --placement by-set / ingress)
    trust_routing_header: bool = False

    def check(self) -> "ServeConfig":
        for name in ("max_batch_size", "max_queue", "max_tokens_limit", "max_body_bytes", "prefill_chunk",
                     "max_messages", "max_n", "retrain_max_prompts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DLPLoRAError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        v = self.max_prompt_tokens
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise DLPLoRAError(f"--max-prompt-tokens must be a positive integer, got {v!r}")
        if not (self.request_timeout > 0 and math.isfinite(self.request_timeout)):
            raise DLPLoRAError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str)
                                         or not re.fullmatch(r"[\x21-\x7e]+", self.api_key)):
            raise DLPLoRAError(f"--api-key (or ${API_KEY_ENV}) must be a non-empty string of printable ASCII without "
                               f"spaces (it travels in the header 'Authorization: Bearer <key>')")
        for name in ("allow_runtime_adapters", "replicated", "trust_routing_header", "engine_process"):
            if not isinstance(getattr(self, name), bool):
                raise DLPLoRAError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.adapter_root is not None:
            root = Path(str(self.adapter_root)).expanduser()
            if not str(self.adapter_root).strip() or not root.is_dir():
                raise DLPLoRAError(f"--adapter-root {self.adapter_root}: no such directory")
            self.adapter_root = str(root.resolve())
        return self


class APIError(Exception):
    """An error answered in the OpenAI format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class QueueFull(Exception):
    pass


def log_config(log_level: str = "info") -> dict:
    """uvicorn's logging configuration, with the server's own loggers (``dlplora.*``: unknown request fields, adapter
    loads, retraining, at info) at `log_level` through the same handler (uvicorn configures only its own)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["loggers"]["dlplora"] = {"handlers": ["default"], "level": log_level.upper()}
    return cfg
