"""A library that mixes a user's own adapter (routing prompts from `library add --examples`) with prepared tasks
(issue 32.1), and one rule for a router trained for another adapter set than the library's (issue 32.3)."""

from __future__ import annotations

import json
import logging

import pytest

from dlplora import cli
from dlplora.library import Library
from dlplora.testing import tiny_examples, write_prepared


@pytest.fixture
def small_router(monkeypatch):
    """Keep the CLI's router training fast: a small table and network."""
    from dlplora import plugin as plugin_mod

    real_train = plugin_mod.Plugin.train.__func__

    def small_train(cls, *a, **kw):
        kw.update(bits=12, dim=8, hidden=(32, 32, 16), batch_size=32)
        return real_train(cls, *a, **kw)

    monkeypatch.setattr(plugin_mod.Plugin, "train", classmethod(small_train))


def _mixed(tmp_path) -> tuple[Library, object]:
    """DATA with two prepared tasks; LIB with adapters for them and `my_task`, whose only prompts are the routing
    prompts `library add --examples` keeps."""
    data = tmp_path / "data"
    a = tiny_examples("winowhy", 40, kind="mcq", seed=1)
    b = tiny_examples("gsm8k", 40, kind="qa", seed=2)
    write_prepared(data, "winowhy", a[:30], a[30:])
    write_prepared(data, "gsm8k", b[:30], b[30:])
    lib = Library(tmp_path / "lib", {"format": 1, "base_model": {}, "adapters": {
        n: {"path": f"adapters/{n}"} for n in ("winowhy", "my_task", "gsm8k")}})
    lib.save()
    lib.save_routing_prompts("my_task", [{"input": f"Write a short poem about the sea number {i}"} for i in range(30)])
    return lib, data


def test_train_plugin_and_bench_routing_mix_data_and_routing_prompts(tmp_path, capsys, small_router):
    lib, data = _mixed(tmp_path)
    assert cli.main(["train-plugin", "--library", str(lib.root), "--data", str(data), "--epochs", "6", "--json",
                     "--background", "none", "--ood-draws", "0"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["sources"]["winowhy"].startswith("prepared train split")
    assert report["sources"]["my_task"] == f"routing prompts {lib.routing_path('my_task')}"
    assert f"  my_task: routing prompts {lib.routing_path('my_task')}" in out  # said on the console too
    assert report["measured"] == ["winowhy", "gsm8k"] and "not measured (no test split): my_task" in out
    plugin = json.loads((lib.plugin_dir() / "plugin.json").read_text())
    assert plugin["labels"] == ["winowhy", "my_task", "gsm8k"]
    assert cli.main(["route", "--library", str(lib.root), "--json", "Write a short poem about the sea number 99"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["routings"][0]["adapters"][0] == "my_task"

    assert cli.main(["bench", "routing", "--library", str(lib.root), "--data", str(data), "--json"]) == 0
    out = capsys.readouterr().out
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["sources"]["gsm8k"].startswith("prepared test split")
    assert rep["sources"]["my_task"].startswith("routing prompts") and "in-sample" in out
    assert set(rep["views_per_task"]["rendered"]) == {"winowhy", "my_task", "gsm8k"}


def test_train_plugin_names_adapters_without_any_prompts(tmp_path, capsys, small_router):
    lib, data = _mixed(tmp_path)
    lib.manifest["adapters"]["stray"] = {"path": "adapters/stray"}
    lib.save()
    assert cli.main(["train-plugin", "--library", str(lib.root), "--data", str(data), "--background", "none"]) == 2
    err = capsys.readouterr().err
    assert "no prompts for stray" in err and "--examples" in err and "Traceback" not in err


WORDS = {"alpha": ("add", "sum", "plus", "number", "total", "seven"),
         "beta": ("bonjour", "maison", "voiture", "chat", "pomme", "rouge"),
         "gamma": ("red", "green", "blue", "yellow", "ball", "table")}
GAMMA = "red green blue yellow ball table red blue"
ALPHA = "add sum plus number total seven add sum"


def test_a_stale_router_follows_one_rule_everywhere(tiny_model, tmp_path, capsys, caplog, one_thread):
    """The router knows alpha, beta, gamma; the library now holds alpha, beta, delta. The CLI's route and generate, the
    Python API and the server all route among alpha and beta, warn once naming what it cannot route to (delta) and
    what it never chooses (gamma), and never choose gamma."""
    from dlplora.engine import DLPLoRA
    from dlplora.library import add_adapter, remove_adapter
    from dlplora.serve import ServeConfig, create_app
    from dlplora.testing import random_peft_adapter, random_peft_library
    from wordplugin import train_word_plugin

    lib = random_peft_library(tmp_path / "lib", tiny_model, {n: (4, 8, ("q_proj", "v_proj")) for n in WORDS}, std=0.5)
    train_word_plugin(lib, WORDS)
    remove_adapter(lib, "gamma")
    add_adapter(lib, "delta", random_peft_adapter(tiny_model, tmp_path / "delta", rank=4), model=str(tiny_model))

    def warned():
        notes = [r.getMessage() for r in caplog.records if "another adapter set" in r.getMessage()]
        caplog.clear()
        assert len(notes) == 1, notes
        assert "routes among the 2 of the library's 3 adapters it knows (alpha, beta)" in notes[0]
        assert "cannot route to delta" in notes[0] and "never chooses gamma" in notes[0]

    caplog.set_level(logging.WARNING)
    assert cli.main(["route", "--library", str(lib), "--json", GAMMA, ALPHA]) == 0
    warned()
    routings = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["routings"]
    assert "gamma" not in routings[0]["adapters"] and routings[1]["adapters"][0] == "alpha"
    assert routings[0]["adapters"] or "cannot route to" in routings[0]["base_reason"]

    assert cli.main(["generate", "--library", str(lib), "--max-new-tokens", "2", "--json", GAMMA]) == 0
    warned()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "gamma" not in [a["name"] for a in out["routing"]["adapters"]]

    engine = DLPLoRA.from_library(lib)
    warned()
    assert all("gamma" not in s for s in engine.route([GAMMA, ALPHA]))
    live = create_app(engine, ServeConfig()).state.dlp.live
    states = {n: routing for n, routing, _ in live.models()}
    assert states["alpha"] == states["beta"] == "routable" and states["delta"] != "routable"
