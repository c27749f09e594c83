"""The OpenAI-compatible HTTP server: configuration (:mod:`.config`), request parsing and responses
(:mod:`.protocol`), continuous batching (:mod:`.scheduler`), Prometheus metrics (:mod:`.metrics`) and the
FastAPI app with its runners (:mod:`.app`)."""

from .app import ServerThread, create_app, serve
from .config import APIError, ServeConfig

__all__ = ["APIError", "ServeConfig", "ServerThread", "create_app", "serve"]
