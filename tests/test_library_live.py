"""The library's routing prompts: `library add --examples`, `library remove`, `train-plugin --library` from the
prompts the library keeps (LIB/routing, or the data directory recorded in library.json), and an engine whose router
knows an adapter the library lost (never chosen) or not one it gained (pinned only)."""

from __future__ import annotations

import json
import random

import pytest

from dlplora.cli import main
from dlplora.engine import DLPLoRA
from dlplora.errors import DLPLoRAError
from dlplora.library import Library, example_rows, read_examples
from dlplora.testing import random_peft_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = {"alpha": ("add", "sum", "plus", "number", "total", "seven"),
         "beta": ("bonjour", "maison", "voiture", "chat", "pomme", "rouge"),
         "gamma": ("red", "green", "blue", "yellow", "ball", "table")}


def _prompt(name, rng):
    return " ".join(rng.choice(WORDS[name]) for _ in range(8))


def _examples_file(path, name, n=30):
    rng = random.Random(name)
    forms = [lambda t: t, lambda t: {"text": t}, lambda t: {"prompt": t}, lambda t: {"input": t, "task_prefix": "Q.\n"}]
    path.write_text("".join(json.dumps(forms[i % 4](_prompt(name, rng))) + "\n" for i in range(n)))
    return path


def test_add_with_examples_train_from_the_library_then_remove(tiny_model, tmp_path, capsys):
    lib = tmp_path / "lib"
    for i, name in enumerate(WORDS):
        src = random_peft_adapter(tiny_model, tmp_path / name, rank=4, seed=i, std=0.3)
        ex = _examples_file(tmp_path / f"{name}.jsonl", name)
        assert main(["library", "add", name, str(src), "--library", str(lib), "--model", str(tiny_model),
                     "--examples", str(ex), "--create"]) == 0
    assert "kept 30 routing prompts" in capsys.readouterr().out
    kept = Library.open(lib).routing_prompts("alpha")
    assert len(kept) == 30 and kept[3] == {"input": kept[3]["input"], "task_prefix": "Q.\n"}

    # no prepared data: the router learns from LIB/routing
    assert main(["train-plugin", "--library", str(lib), "--epochs", "6", "--background", "none"]) == 0
    assert "routing prompts" in capsys.readouterr().out
    engine = DLPLoRA.from_library(lib)
    rng = random.Random(7)
    for name in WORDS:
        got = engine.route([_prompt(name, rng)])[0]
        assert max(got, key=got.get) == name, (name, got)

    assert main(["library", "remove", "gamma", "--library", str(lib)]) == 0
    assert "still knows gamma" in capsys.readouterr().out
    after = Library.open(lib)
    assert after.names == ["alpha", "beta"] and not (lib / "adapters" / "gamma").exists()
    assert not after.routing_path("gamma").exists()
    engine = DLPLoRA.from_library(lib)  # the router still has gamma's label: loaded, and gamma is never chosen
    assert engine.unroutable == {"gamma"}
    for _ in range(10):
        got = engine.route([_prompt("gamma", rng)])[0]
        assert "gamma" not in got and (not got or abs(sum(got.values()) - 1) < 1e-6)

    # an adapter added without examples: served pinned only, and the router cannot be retrained without its prompts
    src = random_peft_adapter(tiny_model, tmp_path / "delta", rank=4, seed=9)
    assert main(["library", "add", "delta", str(src), "--library", str(lib)]) == 0
    assert "served when pinned or mixed only" in capsys.readouterr().out
    engine = DLPLoRA.from_library(lib)
    assert "delta" in engine.names and "delta" not in engine.router.labels
    assert main(["train-plugin", "--library", str(lib), "--background", "none"]) == 2
    assert "no routing prompts for delta" in capsys.readouterr().err


def test_routing_prompts_fall_back_to_the_recorded_data_dir(tmp_path, tiny_data):
    lib = Library(tmp_path / "lib", {"format": 1, "base_model": {}, "data_dir": str(tiny_data),
                                     "adapters": {"quiz": {"path": "adapters/quiz"}, "sums": {"path": "adapters/sums"},
                                                  "other": {"path": "adapters/other"}}})
    rows = lib.routing_prompts("quiz")
    assert len(rows) == 24 and rows[0]["task_prefix"] == "quiz quiz.\n" and rows[0]["choices"] == ["yes", "no"]
    assert "target" not in rows[0] and lib.routing_prompts("other") is None
    assert lib.keep_routing_prompts(tiny_data) == ["quiz", "sums"]
    lib.manifest["data_dir"] = str(tmp_path / "gone")  # the data directory moved away: the kept copy serves
    assert lib.routing_prompts("quiz") == rows


def test_example_prompts_are_checked(tmp_path):
    assert example_rows(["a", {"text": "b"}, {"input": "c", "choices": ["x"], "target": "t"}]) == [
        {"input": "a"}, {"input": "b"}, {"input": "c", "choices": ["x"]}]
    assert example_rows(["a\ud800b"]) == [{"input": "a?b"}]  # a lone surrogate cannot be stored as UTF-8
    for bad, msg in (([], "empty"), ("text", "must be a list"), ([""], r"examples\[0\]"), ([{"x": 1}], "non-empty"),
                     ([3], "non-empty"), (["x" * 20_001], "over 20000")):
        with pytest.raises(DLPLoRAError, match=msg):
            example_rows(bad)
    f = tmp_path / "ex.jsonl"
    f.write_text('"one"\n\n{"text": "two"}\n{not json\n')
    with pytest.raises(DLPLoRAError, match=r"ex.jsonl:4: not a JSON string or object"):
        read_examples(f)
    f.write_bytes(b'"\xff"\n')
    with pytest.raises(DLPLoRAError, match="not UTF-8"):
        read_examples(f)
    with pytest.raises(DLPLoRAError, match="does not exist"):
        read_examples(tmp_path / "none.jsonl")
