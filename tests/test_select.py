"""Issue 28: validation-chosen recipes (train-loras --recipe select), the resumable checkpointed loop, and the full
fine-tune bound (train-full), on the tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

from dlplora.errors import DLPLoRAError
from dlplora.library import Library
from dlplora.train import TrainConfig, train_library
from dlplora.train import select as sel_mod
from dlplora.train.select import Selection, validation_split

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = dict(batch_size=4, max_len=64, top_layers=None)


def test_validation_split_is_seeded_disjoint_and_never_empty():
    exs = [{"input": f"q{i}", "target": "a"} for i in range(20)]
    train, val = validation_split(exs, 5, seed=0)
    assert len(val) == 5 and len(train) == 15
    assert {e["input"] for e in train}.isdisjoint({e["input"] for e in val})
    assert validation_split(exs, 5, seed=0) == (train, val)  # the same slice on every run
    assert validation_split(exs, 5, seed=1)[1] != val
    with pytest.raises(DLPLoRAError, match="no training example"):
        validation_split(exs, 20)
    with pytest.raises(DLPLoRAError, match="increasing"):
        Selection(points=(8, 4)).validate()


def test_a_killed_run_resumes_to_the_same_weights(tiny_model, tiny_data, tmp_path):
    """run_with_checkpoints: killed after its first checkpoint, a rerun ends on the weights of an uninterrupted run."""
    from dlplora.backbone import load_backbone
    from dlplora.tasks import load_split
    from dlplora.train.lora import make_peft_model

    net, tok, _ = load_backbone(str(tiny_model))
    exs = load_split(tiny_data, "quiz", "train")
    cfg = TrainConfig(steps=4, **CFG)

    def run(state, kill_at=None):
        torch.manual_seed(0)  # the same LoRA initialisation in every run
        pm = make_peft_model(net, cfg)
        seen = []

        def on_point(step, st):
            if step == kill_at:
                raise KeyboardInterrupt
            seen.append(step)
        try:
            sel_mod.run_with_checkpoints(pm, tok, exs, cfg, [2, 4], on_point, state_path=state, log=lambda *a: None)
        except KeyboardInterrupt:
            pass
        w = sel_mod.weights_of(pm)
        pm.unload()
        return w, seen

    whole, seen = run(tmp_path / "a.pt")
    assert seen == [2, 4]
    run(tmp_path / "b.pt", kill_at=4)  # the state of step 2 was saved, step 4 never finished
    resumed, seen = run(tmp_path / "b.pt")
    assert seen == [4]  # resumed after the first checkpoint
    assert set(resumed) == set(whole)
    for n in whole:
        torch.testing.assert_close(resumed[n], whole[n])


def test_select_recipe_records_every_candidate_keeps_the_best_and_resumes(tiny_model, tiny_data, tmp_path,
                                                                          monkeypatch):
    lib_dir = tmp_path / "lib"
    sel = Selection(lrs=(1e-3, 5e-3), points=(4, 8), val_size=6)
    kw = dict(model=str(tiny_model), cfg=TrainConfig(**CFG), eval_limit=6, log=lambda *a: None, selection=sel)
    lib = train_library(["quiz", "sums"], tiny_data, lib_dir, **kw)
    for task, metric in (("quiz", "accuracy"), ("sums", "answer_loss")):
        e = lib.manifest["adapters"][task]
        rec = e["recipe"]
        assert rec["preset"] == "select" and rec["lrs"] == [1e-3, 5e-3] and rec["points"] == [4, 8]
        cands = rec["candidates"]
        assert [(c["lr"], c["examples"]) for c in cands] == [(1e-3, 4), (1e-3, 8), (5e-3, 4), (5e-3, 8)]
        assert all(c["val_metric"] == metric and c["train_seconds"] >= 0 for c in cands)
        best = max(cands, key=lambda c: (c["val"], -c["val_loss"]))
        assert (rec["chosen"]["lr"], rec["chosen"]["examples"]) == (best["lr"], best["examples"])
        assert e["lr"] == best["lr"] and e["steps"] == best["steps"] and e["top_layers"] is None
        assert e["n_train"] == 18 and e["n_validation"] == 6  # 24 training examples, 6 held out
        # the single recipe's fields stay: score against base on the test split
        assert {"score", "base_score", "beats_base", "interval", "train_seconds", "wall_seconds"} <= set(e)
    # the saved adapter is the chosen checkpoint: its validation loss is the recorded one
    from dlplora.backbone import load_backbone
    from dlplora.tasks import load_split
    from dlplora.train.lora import encode_example
    from peft import PeftModel

    net, tok, _ = load_backbone(str(tiny_model))
    pm = PeftModel.from_pretrained(net, str(lib_dir / "adapters" / "sums"))
    val = validation_split(load_split(tiny_data, "sums", "train"), 6)[1]
    enc = [encode_example(tok, ex, 64, 128) for ex in val]
    chosen = lib.manifest["adapters"]["sums"]["recipe"]["chosen"]
    assert sel_mod.answer_loss(pm, enc, tok.pad_token_id, TrainConfig().bf16) == pytest.approx(chosen["val_loss"],
                                                                                              abs=2e-3)

    # resumable per candidate: with the adapter gone but LIB/.select kept, nothing is trained or scored again
    calls = []
    monkeypatch.setattr(sel_mod, "validation_score", lambda *a, **k: calls.append(a) or {})
    man = json.loads((lib_dir / "library.json").read_text())
    del man["adapters"]["quiz"]
    (lib_dir / "library.json").write_text(json.dumps(man))
    lib = train_library(["quiz", "sums"], tiny_data, lib_dir, **kw)
    assert calls == []
    assert len(lib.manifest["adapters"]["quiz"]["recipe"]["candidates"]) == 4
    # an adapter of another recipe is retrained: the single recipe replaces the select one
    lib = train_library(["quiz"], tiny_data, lib_dir, model=str(tiny_model), cfg=TrainConfig(steps=1, **CFG),
                        eval_limit=0, log=lambda *a: None)
    assert "recipe" not in lib.manifest["adapters"]["quiz"] and lib.manifest["adapters"]["quiz"]["steps"] == 1


def test_train_loras_cli_select_flags(tmp_path):
    from dlplora.cli import main

    assert main(["train-loras", "--tasks", "x", "--data", str(tmp_path), "--out", str(tmp_path / "l"),
                 "--recipe", "select", "--select-points", "450,150"]) == 2
    assert main(["train-loras", "--tasks", "x", "--data", str(tmp_path), "--out", str(tmp_path / "l"),
                 "--recipe", "select", "--select-lrs", "fast"]) == 2


def test_train_full_chooses_on_validation_scores_on_test_and_reports(tiny_model, tiny_data, tmp_path, capsys):
    from dlplora.cli import main
    from dlplora.eval.report import rewrite_report

    out = tmp_path / "full"
    assert main(["train-full", "--task", "quiz", "--data", str(tiny_data), "--out", str(out), "--lrs", "1e-4,1e-3",
                 "--points", "4,8", "--val-size", "6", "--batch-size", "4", "--max-len", "64",
                 "--model", str(tiny_model), "--json"]) == 0
    rec = json.loads((out / "quiz.json").read_text())
    assert rec["method"] == "full fine-tune" and rec["n_train"] == 18 and rec["n_validation"] == 6
    assert [(c["lr"], c["examples"]) for c in rec["candidates"]] == [(1e-4, 4), (1e-4, 8), (1e-3, 4), (1e-3, 8)]
    best = max(rec["candidates"], key=lambda c: (c["val"], -c["val_loss"]))
    assert (rec["chosen"]["lr"], rec["chosen"]["examples"]) == (best["lr"], best["examples"])
    assert rec["n_test"] == 6 and len(rec["test_result"]["per_example"]["accuracy"]) == 6
    assert rec["beats_base"] == (rec["score"] > rec["base_score"]) and not (out / ".quiz" / "best.pt").exists()
    assert len({c["val_loss"] for c in rec["candidates"]}) == 4  # every checkpoint moved the weights
    # beside base and LoRA in RESULTS.md
    results = {"format": 2, "config": {}, "settings": {"single": {"tasks": ["quiz"], "methods": {"lora": {"tasks": {
        "quiz": {"metric": "accuracy", "main": 50.0, "n": 6, "per_example": {"accuracy": [1, 0, 1, 0, 1, 0]}}},
        "mean": 50.0, "seconds": 1.0}}}}}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(json.dumps(results))
    md = rewrite_report(tmp_path / "r" / "results.json", full_ft=[out / "quiz.json"]).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| quiz | 6 | accuracy |"))
    assert f"{rec['score']:.1f}" in row and "| 50.0 |" in row
    assert json.loads((tmp_path / "r" / "results.json").read_text())["full_finetune"]["quiz"]["score"] == rec["score"]
    assert main(["report", str(tmp_path / "r" / "results.json"), "--full-ft", str(tmp_path / "nope.json")]) == 2


def test_reproduce_wires_select_multitask_and_full_ft_and_resumes(tiny_data, tiny_model, tmp_path):
    import shutil

    from dlplora.pipelines.reproduce import run_reproduce
    from dlplora.train.full import train_full

    work, out = tmp_path / "work", tmp_path / "docs"
    shutil.copytree(tiny_data, work / "data")
    train_full("quiz", work / "data", tmp_path / "ft", selection=Selection(lrs=(1e-4,), points=(4,), val_size=6),
               cfg=TrainConfig(batch_size=4, max_len=64, top_layers=None, cache_bottom=False), model=str(tiny_model),
               log=lambda *a: None)
    kw = dict(out=out, work=work, tasks="quiz,sums", limit=2, model=str(tiny_model), settings="composite-26,single",
              methods="base,lora,dlp,merge-all,multitask", weightings="softmax", progress=False, log=lambda *a: None,
              recipe="select", select_points="8,16", val_size=6, top_layers=None, multitask_ranks="8,16",
              multitask_examples=8, full_ft=str(tmp_path / "ft"))
    r1 = run_reproduce(**kw)
    lib = Library.open(work / "library")
    assert lib.names == ["quiz", "sums"] and lib.special_names == ["multitask", "multitask-r16"]
    assert all(lib.entry(t)["recipe"]["preset"] == "select" for t in lib.names)
    c26 = r1["settings"]["composite-26"]
    assert {"merge-all", "multitask", "multitask-r16"} <= set(c26["methods"])
    assert set(c26["versus_multitask"]) == {"multitask", "multitask-r16"}
    hours = r1["reproduce"]["hours"]
    assert set(hours) == {"library", "multitask", "grid", "budget"} and set(hours["multitask"]) == {"multitask",
                                                                                                   "multitask-r16"}
    walls = [lib.entry(t)["wall_seconds"] for t in lib.names]  # recorded per adapter (0.0 when a tiny run is that fast)
    assert all(w >= 0 for w in walls)
    assert r1["reproduce"]["recorded_seconds"]["adapters_training_seconds"] == pytest.approx(sum(walls), abs=0.05)
    assert r1["reproduce"]["recipe"]["preset"] == "select" and set(r1["full_finetune"]) == {"quiz"}
    md = (out / "RESULTS.md").read_text()
    assert "## Against the multi-task LoRA baseline" in md and "## The full fine-tune bound" in md
    r2 = run_reproduce(**kw)  # resumed: nothing trained, nothing predicted again
    assert r2["cache"]["new_predictions"] == 0
    assert Library.open(work / "library").manifest == lib.manifest
