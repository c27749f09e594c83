"""Running the app: uvicorn in a background thread (:class:`ServerThread`, tests and benchmarks) or in the foreground
(:func:`serve`, ``dlp-lora serve``)."""

from __future__ import annotations

import threading
import time

from ..errors import DLPLoRAError
from .app import create_app
from .config import ServeConfig

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


def serve(engine, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          engine_spec: dict | None = None) -> None:
    import uvicorn

    from .config import log_config

    app = create_app(engine, config, engine_spec)
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=log_config(log_level),
                timeout_keep_alive=30)
