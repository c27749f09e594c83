"""The playground: a static page at ``/`` that chats with the server and shows the router at work.

Plain HTML, JavaScript and CSS shipped in the package (``serve/static``, package data): no build step, nothing
fetched from the internet. The page is a client like any other: it calls the OpenAI-compatible endpoints
(``GET /v1/models`` for the adapters and their routing states, ``POST /v1/chat/completions`` with ``stream``
for the answer, whose chunks carry ``routing``); it has no private API. The static files need no API key; the
page asks for one when ``/v1/models`` answers 401 and sends it as ``Authorization: Bearer``. On by default;
``dlp-lora serve --no-playground`` (``ServeConfig.playground``) leaves it out.
"""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).with_name("static")
PLAYGROUND_PATHS = ("/playground/",)  # with "/" itself: open without the API key (GET only)
FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}


def add_playground(app) -> None:
    """GET / (the page) and GET /playground/<file> on a FastAPI `app`."""
    from fastapi.responses import FileResponse

    from .config import APIError

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP})

    @app.get("/playground/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in FILES:
            raise APIError(404, f"no playground file {name!r}", code="not_found")
        return FileResponse(STATIC / name, media_type=FILES[name], headers={"Cache-Control": "no-cache"})


# the page runs its own script and style only, and talks to this server only
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:"
