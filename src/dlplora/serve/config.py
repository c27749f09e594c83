"""The server's configuration, its OpenAI-format error and the queue-full signal."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import DLPLoRAError

ROUTE_ALIASES = ("dlp-lora", "auto", "dlp-lora/auto")  # model ids that mean "route by content"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions


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

    def check(self) -> "ServeConfig":
        for name in ("max_batch_size", "max_queue", "max_tokens_limit", "max_body_bytes", "prefill_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DLPLoRAError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not (self.request_timeout > 0 and math.isfinite(self.request_timeout)):
            raise DLPLoRAError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout!r}")
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
