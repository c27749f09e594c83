"""End-to-end pipelines: the demo (:mod:`.demo`) and the paper's reproduction (:mod:`.reproduce`)."""

from __future__ import annotations

import json


def plugin_ready(lib) -> bool:
    """Whether the library's plugin is trained, routes to exactly the library's adapters and learnt prompts of the
    current data format (a multiple-choice task's options shuffled), so it can be reused."""
    from ..plugin import CONFIG_FILE, WEIGHTS_FILE
    from ..tasks import stale_options

    cfg = lib.plugin_dir() / CONFIG_FILE
    if not cfg.is_file() or not (lib.plugin_dir() / WEIGHTS_FILE).is_file():
        return False
    try:
        conf = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    training = conf.get("training") or {}
    # each task's own format: a generative task prepared before formats were recorded is format 1 and not stale
    # (an older plugin recorded one "data_format", the least over its tasks)
    formats = training.get("data_formats") or {}
    fmt = int(training.get("data_format", 1))
    return conf.get("labels") == lib.names and not any(stale_options(int(formats.get(n, fmt)), n) for n in lib.names)


def ensure_plugin(lib, data_dir, log) -> None:
    """Reuse the library's plugin when it routes to exactly its adapters, else train and save one."""
    if plugin_ready(lib):
        log(f"reusing the plugin in {lib.plugin_dir()}")
        return
    from ..plugin import train_plugin_from_data

    plugin, report = train_plugin_from_data(data_dir, lib.names)
    plugin.save(lib.plugin_dir())
    lib.keep_routing_prompts(data_dir)  # what it learnt, so that a server can retrain it without the data
    log(f"plugin: {report['params']:,} parameters, held-out routing accuracy {100 * report['accuracy']:.1f}% over "
        f"{report['tasks']} tasks ({100 * report['views']['input_only']:.1f}% on the bare inputs), trained in "
        f"{report['train_seconds']:.1f}s")

