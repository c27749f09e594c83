"""The adapter library: manifest, `library add` (validation against the base model), `library list`."""

import json
import subprocess
import sys

import pytest

from dlplora.errors import DLPLoRAError
from dlplora.library import Library, add_adapter
from dlplora.testing import random_peft_adapter


def _peft_adapter(model_dir, out, r=4, targets=("q_proj", "v_proj"), seed=0):
    """A PEFT LoRA as PEFT initialises it (lora_B = 0)."""
    return random_peft_adapter(model_dir, out, rank=r, targets=targets, seed=seed, factors=())


def test_library_add_validates_and_creates(tiny_model, tmp_path):
    good = _peft_adapter(tiny_model, tmp_path / "good")
    lib_dir = tmp_path / "lib"
    entry = add_adapter(lib_dir, "mine", good, model=str(tiny_model))
    assert entry["rank"] == 4 and entry["targets"] == ["q_proj", "v_proj"]
    assert Library.open(lib_dir).names == ["mine"]
    with pytest.raises(DLPLoRAError, match="already has an adapter named 'mine'"):
        add_adapter(lib_dir, "mine", good)
    # an adapter for another base model (different hidden size): shape mismatch named
    from dlplora.testing import tiny_model_dir

    other = tiny_model_dir(tmp_path / "other", hidden=32)
    wrong = _peft_adapter(other, tmp_path / "wrong")
    with pytest.raises(DLPLoRAError, match="shape mismatch at model.layers.0.self_attn.q_proj"):
        add_adapter(lib_dir, "wrong", wrong)
    # rank in config disagrees with tensors
    cfg = json.loads((good / "adapter_config.json").read_text())
    bad_rank = tmp_path / "badrank"
    bad_rank.mkdir()
    (bad_rank / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    (bad_rank / "adapter_config.json").write_text(json.dumps(dict(cfg, r=8)))
    with pytest.raises(DLPLoRAError, match="the rank is 8"):
        add_adapter(lib_dir, "badrank", bad_rank)
    # corrupt weights
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps(cfg))
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(DLPLoRAError, match="unreadable or corrupt"):
        add_adapter(lib_dir, "corrupt", corrupt)
    # what the fused engine cannot load is refused at the door (the one adapter reader: dlplora.adapters)
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(DLPLoRAError, match="DoRA adapters are not supported"):
        add_adapter(lib_dir, "dora", dora)
    with pytest.raises(DLPLoRAError, match="adapter_config.json is missing"):
        add_adapter(lib_dir, "x", tmp_path)
    assert Library.open(lib_dir).names == ["mine"]  # nothing bad got in


def test_library_for_another_base_is_refused(tiny_model, tmp_path):
    from dlplora.testing import tiny_model_dir

    lib_dir = tmp_path / "lib"
    add_adapter(lib_dir, "a", _peft_adapter(tiny_model, tmp_path / "a"), model=str(tiny_model))
    other = tiny_model_dir(tmp_path / "other", seed=5)
    with pytest.raises(DLPLoRAError, match="was built for base model"):
        add_adapter(lib_dir, "b", _peft_adapter(other, tmp_path / "b"), model=str(other))


def test_cli_library_add_creates_library(tiny_model, tmp_path):
    good = _peft_adapter(tiny_model, tmp_path / "good")
    cmd = [sys.executable, "-m", "dlplora.cli", "library", "add", "mine", str(good), "--library", str(tmp_path / "lib"),
           "--model", str(tiny_model), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)  # a missing (mistyped) library: refused without --create
    assert res.returncode == 2 and "no library there" in res.stderr and "--create" in res.stderr, res.stderr
    assert not (tmp_path / "lib").exists()
    res = subprocess.run(cmd + ["--create"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["rank"] == 4
    res = subprocess.run([sys.executable, "-m", "dlplora.cli", "library", "add", "other", str(tmp_path / "nope"),
                          "--library", str(tmp_path / "lib")], capture_output=True, text=True)
    assert res.returncode == 2 and "no such adapter directory" in res.stderr
    assert res.stderr.count(str(tmp_path / "nope")) == 1, res.stderr  # the path once
    res = subprocess.run([sys.executable, "-m", "dlplora.cli", "library", "list", "--library", str(tmp_path / "lib")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.split()[:2] == ["mine", "r=4"] for line in lines)
    assert not any(line.startswith(("training:", "scores:")) for line in lines)  # added, not trained or scored here


def test_library_list_totals_and_training_lines():
    from dlplora.library import library_totals, train_line

    man = {"adapters": {
        "a": {"wall_seconds": 1800, "steps": 113, "examples_seen": 900, "first_loss": 1.5, "final_loss": 0.5,
              "score": 60.0, "base_score": 50.0, "significant": True, "beats_base": True},
        "b": {"wall_seconds": 1800, "steps": 113, "examples_seen": 128, "score": 40.0, "base_score": 45.0,
              "significant": False, "beats_base": False},
        "c": {"rank": 4}}}
    assert library_totals(man) == [
        "training: 2 of 3 adapters trained here, 1.00 h in total (the sum of their wall times)",
        "scores: 1 of 2 scored adapters beat the base model on their own task, 1 significantly (paired test, 95%)"]
    assert train_line(man["adapters"]["a"]) == "113 steps over 900 distinct examples in 30.0 min, loss 1.50 -> 0.50"
    assert train_line(man["adapters"]["b"]) == "113 steps over 128 distinct examples in 30.0 min"
    assert train_line(man["adapters"]["c"]) == "" and library_totals({"adapters": {}}) == []


def test_an_adapter_naming_another_base_model_is_added_with_a_warning(tiny_model, tmp_path, caplog):
    """Matching shapes, but adapter_config.json names another base model: added, with a warning naming both."""
    import logging

    src = _peft_adapter(tiny_model, tmp_path / "a")
    cfg = json.loads((src / "adapter_config.json").read_text())
    caplog.set_level(logging.WARNING)
    add_adapter(tmp_path / "lib", "same", src, model=str(tiny_model))
    assert not caplog.records  # its config names the library's base model (the tiny model's directory)
    cfg["base_model_name_or_path"] = "Qwen/Qwen2-1.5B-Instruct"
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    add_adapter(tmp_path / "lib", "other", src, model=str(tiny_model))
    [rec] = caplog.records
    base = json.loads((tmp_path / "lib" / "library.json").read_text())["base_model"]["name"]
    assert "names base model Qwen/Qwen2-1.5B-Instruct" in rec.getMessage() and f"library's base {base}" in rec.getMessage()


def test_the_backbone_to_load_is_the_given_model_else_the_recorded_one_where_it_still_exists(tmp_path, tiny_model):
    lib = Library.open_or_create(tmp_path / "lib", {"name": "tiny", "path": str(tiny_model), "fingerprint": "x"})
    assert lib.base_model_dir() == str(tiny_model)
    assert lib.base_model_dir("other/model") == "other/model"
    moved = Library.open_or_create(tmp_path / "moved", {"name": "tiny", "path": str(tmp_path / "gone"), "fingerprint": "x"})
    assert moved.base_model_dir() is None  # a library from another machine: the embedded default
