"""Issue 28: the multi-task LoRA baseline as a special adapter of the library (trained, never routed to, servable by
name) and the static merges that evaluate it and merge-all at the base model's cost, on the tiny random model."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from dlplora.library import MULTITASK, Library
from dlplora.testing import random_peft_library
from wordplugin import train_word_plugin

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = {"alpha": ("add", "sum", "plus", "number", "total", "seven"),
         "beta": ("bonjour", "maison", "voiture", "chat", "pomme", "rouge")}


@pytest.fixture(scope="module")
def lib_with_multitask(tiny_model, tmp_path_factory):
    """Two random task adapters (q/v and o_proj, different ranks), a word plugin for them, and a random rank-16
    adapter on every linear layer added as the special multi-task adapter."""
    from dlplora.testing import random_peft_adapter

    root = tmp_path_factory.mktemp("mt") / "lib"
    random_peft_library(root, tiny_model, {"alpha": (4, 8, ("q_proj", "v_proj")), "beta": (8, 8, ("o_proj",))},
                        std=0.5, seed=3)
    train_word_plugin(root, WORDS)
    src = random_peft_adapter(str(tiny_model), root.parent / "mt_src", rank=16,
                              targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"), std=0.3, seed=9)
    from dlplora.library import add_adapter

    add_adapter(root, "multitask", src)
    lib = Library.open(root)
    lib.manifest["adapters"]["multitask"]["special"] = MULTITASK
    lib.save()
    return root


def test_a_special_adapter_is_outside_the_task_adapters(lib_with_multitask, capsys):
    from dlplora.cli import main
    from dlplora.eval.cache import library_signature

    lib = Library.open(lib_with_multitask)
    assert lib.names == ["alpha", "beta"] and lib.special_names == ["multitask"] and lib.multitask_names() == ["multitask"]
    assert lib.all_names == ["alpha", "beta", "multitask"]
    sig = library_signature(lib)
    del lib.manifest["adapters"]["multitask"]  # adding or removing it keeps the task adapters' cached predictions
    assert library_signature(lib) == sig
    assert main(["library", "list", "--library", str(lib_with_multitask)]) == 0
    assert "[multitask: never routed to]" in capsys.readouterr().out


def test_static_merges_equal_the_fused_and_peft_forward(lib_with_multitask, tiny_model):
    """merge-all merged once equals the fused engine's uniform set; the multi-task merge equals PEFT's model."""
    from peft import PeftModel

    from dlplora.backbone import load_backbone
    from dlplora.engine import DLPLoRA
    from dlplora.eval.runners import build_static_merge

    lib = Library.open(lib_with_multitask)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    engine = DLPLoRA.from_library(lib_with_multitask, model=str(tiny_model), adapters=lib.names)
    uniform = {n: 0.5 for n in lib.names}
    with torch.no_grad(), engine.apply([uniform]):
        fused = engine.model(input_ids=ids).logits
    merged, _ = build_static_merge(lib, uniform, model=str(tiny_model))
    with torch.no_grad():
        static = merged(input_ids=ids).logits
        base = load_backbone(str(tiny_model))[0](input_ids=ids).logits
    torch.testing.assert_close(static, fused, atol=1e-4, rtol=1e-4)
    assert (static - base).abs().max() > 1e-2  # the adapters do change the outputs

    mt, _ = build_static_merge(lib, {"multitask": 1.0}, model=str(tiny_model))
    pm = PeftModel.from_pretrained(load_backbone(str(tiny_model))[0], str(lib.adapter_dir("multitask")))
    with torch.no_grad():
        torch.testing.assert_close(mt(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_the_server_serves_multitask_by_name_and_never_routes_to_it(lib_with_multitask, tiny_model):
    from dlplora.engine import DLPLoRA
    from dlplora.serve import ServeConfig, ServerThread, create_app

    engine = DLPLoRA.from_library(lib_with_multitask, model=str(tiny_model))
    assert engine.names == ["alpha", "beta", "multitask"] and "multitask" not in engine.router.labels
    prompts = [" ".join(WORDS[n][i % 6] for i in range(k, k + 8)) for n in WORDS for k in range(3)]
    for s in engine.route(prompts, routing=engine.routing.replace(p=0.999, top_k=None)):
        assert "multitask" not in s and s
    app = create_app(engine, ServeConfig(max_batch_size=4, max_tokens_limit=16, request_timeout=60))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        models = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert {"alpha", "beta", "multitask"} <= models
        r = http.post("/v1/chat/completions", json={"model": "multitask", "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "add sum plus"}]})
        assert r.status_code == 200, r.text
        assert [a["name"] for a in r.json()["routing"]["adapters"]] == ["multitask"]
        routed = http.post("/v1/chat/completions", json={"model": engine_name(http), "max_tokens": 4, "messages": [
            {"role": "user", "content": "add sum plus number total seven add sum"}]}).json()
        assert [a["name"] for a in routed["routing"]["adapters"]] == ["alpha"]


def engine_name(http) -> str:
    return http.get("/health").json()["model"]


def test_train_multitask_on_the_union_records_a_special_adapter_and_resumes(tiny_model, tiny_data, tmp_path):
    from dlplora.cli import main
    from dlplora.train import TrainConfig, train_library
    from dlplora.train.multitask import union_examples

    lib_dir = tmp_path / "lib"
    train_library(["quiz", "sums"], tiny_data, lib_dir, model=str(tiny_model),
                  cfg=TrainConfig(steps=1, batch_size=4, max_len=64), eval_limit=0, log=lambda *a: None)
    args = ["train-multitask", "--library", str(lib_dir), "--examples", "8", "--batch-size", "4", "--max-len", "64",
            "--val-size", "6", "--model", str(tiny_model), "--rank", "4", "--name", "multitask-r4"]
    assert main(args) == 0
    lib = Library.open(lib_dir)
    e = lib.entry("multitask-r4")
    assert e["special"] == MULTITASK and e["routable"] is False and e["rank"] == 4 and e["tasks"] == ["quiz", "sums"]
    assert e["n_train"] == 36 and e["steps"] == 2 and e["top_layers"] == 10  # the task adapters' layers
    assert lib.names == ["quiz", "sums"] and lib.multitask_names() == ["multitask-r4"]
    union = union_examples(["quiz", "sums"], tiny_data, 6, 0)
    assert len(union) == 36 and {ex["input"] for ex in union} <= {json.loads(line)["input"] for t in ("quiz", "sums")
                                                                 for line in open(tiny_data / t / "train.jsonl")}
    mtime = (lib_dir / "adapters" / "multitask-r4" / "adapter_model.safetensors").stat().st_mtime
    assert main(args) == 0  # already there: skipped
    assert (lib_dir / "adapters" / "multitask-r4" / "adapter_model.safetensors").stat().st_mtime == mtime
    assert main(args[:2] + ["/nope"] + args[3:]) == 2
    assert main(args[:-1] + ["quiz"]) == 2  # a task adapter's name
