"""End-to-end pipelines: the demo (:mod:`.demo`) and the paper's reproduction (:mod:`.reproduce`)."""

from __future__ import annotations

import json


def plugin_ready(lib) -> bool:
    """Whether the library's plugin is trained and routes to exactly the library's adapters (so it can be reused)."""
    from ..plugin import CONFIG_FILE, WEIGHTS_FILE

    cfg = lib.plugin_dir() / CONFIG_FILE
    if not cfg.is_file() or not (lib.plugin_dir() / WEIGHTS_FILE).is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("labels") == lib.names
    except json.JSONDecodeError:
        return False
