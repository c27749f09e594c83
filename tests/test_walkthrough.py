"""Stops a new user hit walking through the README (issue 33): the reproduce output, --compile's cost, bad prompts and
mix weights refused before anything loads."""

from __future__ import annotations

import logging
import os

import pytest

from dlplora import cli
from dlplora.errors import RequestError


def test_reproduce_writes_to_a_run_directory_by_default():
    from dlplora.pipelines.reproduce import ReproduceConfig

    args = cli.build_parser().parse_args(["reproduce"])
    assert args.out == ReproduceConfig().out == os.path.join("runs", "reproduce")
    assert cli.build_parser().parse_args(["reproduce", "--out", "docs"]).out == "docs"  # docs only when asked for


def test_compile_help_states_the_cost_and_the_compile_is_announced(tiny_model, monkeypatch, caplog, one_thread):
    import torch

    from dlplora.core import COMPILE_NOTE
    from dlplora.engine import DLPLoRA
    from dlplora.testing import random_peft_library

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["generate"]
    help_text = next(a.help for a in sub._actions if a.dest == "compile")
    assert "several minutes" in help_text and "289 s" in help_text and "~1 min" not in help_text
    # the compile happens at the first decode step: a note on the log (stderr in the CLI) before, the time after
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the real compile takes minutes; the note is the test
    lib = random_peft_library(tiny_model.parent / "walk-lib", tiny_model, 1)
    engine = DLPLoRA.from_library(lib).compile()
    caplog.set_level(logging.WARNING, logger="dlplora")
    engine.generate(["hello there"], adapters={"rand0": 1.0}, max_new_tokens=3)
    engine.generate(["hello again"], adapters={"rand0": 1.0}, max_new_tokens=3)
    notes = [r.getMessage() for r in caplog.records]
    assert notes[0] == COMPILE_NOTE and "can take several minutes" in notes[0]
    assert notes[1].startswith("compiled the decode step in ") and len(notes) == 2  # once


def test_empty_prompts_are_counted_from_1_and_refused_before_loading(tmp_path, capsys, monkeypatch):
    from dlplora.engine import DLPLoRA

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the prompt was checked")

    monkeypatch.setattr(DLPLoRA, "from_library", no_load)
    assert cli.main(["generate", "--library", str(tmp_path), "fine", "  "]) == 2
    assert "prompt 2 is empty" in capsys.readouterr().err
    assert cli.main(["route", "--plugin", str(tmp_path), ""]) == 2
    assert "prompt 1 is empty" in capsys.readouterr().err
    # a mix weight out of [0, 1] too (issue 33.7), named with its flag
    assert cli.main(["generate", "--library", str(tmp_path), "--adapters", "a=1.5", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--adapters: weight of adapter 'a' is 1.5; each weight must be in [0, 1]" in err


def test_mix_weights_are_checked_in_the_python_api():
    from dlplora.engine import adapter_set

    assert adapter_set({"a": 1.0, "b": 0.0, "c": 0.25}, "adapters") == {"a": 1.0, "c": 0.25}
    for bad in (1.5, -0.1, float("inf")):
        with pytest.raises(RequestError) as exc:
            adapter_set({"a": bad}, "adapters")
        assert exc.value.field == "adapters"
