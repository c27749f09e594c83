"""The OpenAI-compatible HTTP server: configuration (:mod:`.config`), request parsing and responses
(:mod:`.protocol`), continuous batching (:mod:`.scheduler`), Prometheus metrics (:mod:`.metrics`) and the
FastAPI app (:mod:`.app`) and its runners (:mod:`.running`)."""

from .app import create_app
from .running import ServerThread, serve
from .config import APIError, ServeConfig

__all__ = ["APIError", "ServeConfig", "ServerThread", "create_app", "serve"]
