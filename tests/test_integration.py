"""Integration: the real embedded SmolLM2 backbone and the real BIG-bench files (downloaded once, cached)."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration


def test_real_bigbench_prepare_and_smollm2_generation(tmp_path):
    from dlplora.backbone import load_backbone
    from dlplora.tasks import chat_prompt, load_split, prepare, user_message

    model, tok, info = load_backbone(None)
    assert info.name == "smollm2-135m-instruct" and info.architecture == "llama" and info.num_layers == 30
    summary = prepare("winowhy,object_counting,logical_deduction", tmp_path / "data", tokenizer=tok)
    assert [(r["n_train"], r["n_test"]) for r in summary] == [(900, 100)] * 3
    train = load_split(tmp_path / "data", "winowhy", "train")
    assert train[0]["choices"] == ["correct", "incorrect"] or set(train[0]["choices"]) == {"correct", "incorrect"}
    assert user_message(train[0]).startswith("Please answer the following questions")
    # the options are listed in a shuffled order: the answer is not always first (the task files list it first in
    # every ConParaKC example)
    prepare("contextual_parametric_knowledge_conflicts", tmp_path / "data")
    firsts = [r["answer_index"] == 0 for r in load_split(tmp_path / "data", "contextual_parametric_knowledge_conflicts", "test")]
    assert 0.3 < sum(firsts) / len(firsts) < 0.7
    subtasks = {r["subtask"] for r in load_split(tmp_path / "data", "logical_deduction", "train")}
    assert subtasks == {"three_objects", "five_objects", "seven_objects"}
    ids = tok(chat_prompt(tok, "What is the capital of France?"), return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


def test_model_info_json_path_loads_with_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = subprocess.run([sys.executable, "-m", "dlplora.cli", "model", "info", "--json"], capture_output=True,
                         text=True, check=True)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert AutoTokenizer.from_pretrained(info["path"]).eos_token == "<|im_end|>"
    assert AutoModelForCausalLM.from_pretrained(info["path"]).config.num_hidden_layers == 30


def test_router_on_real_bigbench_views_and_out_of_library(tmp_path):
    """The plugin on 5 real BIG-bench tasks with the real background pool: prompts without their
    scaffolding still route right, and a 6th task that no adapter covers goes mostly to the base model."""
    import numpy as np

    from dlplora.plugin import load_task_rows, train_plugin_from_data
    from dlplora.plugin.views import view_texts
    from dlplora.tasks import prepare

    tasks = ["language_identification", "elementary_math_qa", "vitaminc_fact_verification", "logical_deduction",
             "winowhy"]
    outside = "tracking_shuffled_objects"
    prepare(",".join(tasks + [outside]), tmp_path / "data")
    plugin, rep = train_plugin_from_data(tmp_path / "data", tasks)
    assert plugin.none_class and rep["background_prompts"] > 1000 and rep["train_seconds"] < 60
    assert rep["views"]["rendered"] >= 0.97
    # the cases that failed before views augmentation (language id without its choices and "Language:",
    # a math problem without its options), scaffolding stripped, routed on the content alone
    for v in ("no_choices", "no_io_prefixes"):
        assert rep["views_adapters_only"][v] >= 0.95, (v, rep["views_per_task"][v])
    texts, _ = view_texts(load_task_rows(tmp_path / "data", [outside], "test"), "rendered")
    to_base = np.mean([not r for r in plugin.route(texts)])
    assert to_base >= 0.6, to_base
