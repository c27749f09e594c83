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
