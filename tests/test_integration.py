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
