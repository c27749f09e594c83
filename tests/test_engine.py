"""The DLP-LoRA engine (routing once per turn + fused batched generation) and its CLI, on tiny models."""

from __future__ import annotations

import io
import json


import pytest
import torch

from dlplora.decoding import decode_loop
from dlplora.engine import DLPLoRA, parse_adapters
from dlplora.errors import DLPLoRAError
from dlplora.library import Library
from dlplora.testing import random_peft_library, tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


SPECS = {"alpha": (4, 8, ["q_proj", "v_proj"]), "beta": (8, 8, ["q_proj", "v_proj"]), "gamma": (2, 4, ["o_proj"])}


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_library(root, model_dir, specs=SPECS, std=0.5):
    return random_peft_library(root, model_dir, specs, std=std, factors=("lora_A", "lora_B"), seed=10)


def FakeRouting(names=(), indices=(), weights=(), probs=(), reason=None):
    """The plugin's own Routing type, as a real router returns it."""
    from dlplora.plugin import Routing

    return Routing(list(names), list(indices), list(weights), list(probs), base_reason=reason)


class FakeRouter:
    """Routes by keyword: 'math' -> alpha+beta, 'poem' -> gamma, anything else -> base."""

    def __init__(self):
        self.calls = []

    def route(self, texts, p=0.6, top_k=None, weighting="softmax", floor=0.0):
        self.calls.append((list(texts), p, weighting))
        out = []
        for t in texts:
            if "math" in t:
                out.append(FakeRouting(["alpha", "beta"], [0, 1], [0.7, 0.3], [0.5, 0.2]))
            elif "poem" in t:
                out.append(FakeRouting(["gamma"], [2], [1.0], [0.9]))
            else:
                out.append(FakeRouting(reason="the prompt matches none of the adapters' tasks"))
        return out


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    model_dir = tiny_model_dir(root / "model")
    return make_library(root / "lib", model_dir), model_dir


@pytest.fixture(scope="module")
def engine(lib):
    return DLPLoRA.from_library(lib[0], router=FakeRouter())


def _peft(lib, name):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(lib[1]), str(lib[0] / "adapters" / name)).eval()


def test_single_adapter_generation_matches_peft_generate(engine, lib):
    from dlplora.tasks import chat_prompt

    prompt = "Translate the following German text"
    res = engine.generate([prompt], adapters={"alpha": 1.0}, max_new_tokens=12)[0]
    assert res["routing"] == {"adapters": [{"name": "alpha", "weight": 1.0}], "source": "explicit"}
    assert res["mode"] == "slots" and 0 < res["tokens"] <= 12  # short: no merge, the slot table
    longer = engine.generate([prompt], adapters={"alpha": 1.0}, max_new_tokens=40)[0]
    assert longer["mode"] == "merged" and longer["text"].startswith(res["text"])
    tok = engine.tokenizer
    ids = tok(chat_prompt(tok, prompt), add_special_tokens=False, return_tensors="pt")
    pm = _peft(lib, "alpha")
    with torch.inference_mode():
        ref = pm.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                          eos_token_id=engine.eos_ids)
    assert tok.decode(ref[0, ids.input_ids.shape[1]:], skip_special_tokens=True) == res["text"]
    base = engine.generate([prompt], adapters={}, max_new_tokens=12)[0]
    assert base["mode"] == "base" and base["routing"]["adapters"] == [] and base["text"] != res["text"]


def test_mixed_batch_equals_rows_alone_and_modes_agree(engine):
    prompts = ["The quick brown fox", "Solve the following math problem step by step. What is 12 plus 7?",
               "yes no", "choice: correct incorrect valid"]
    sets = [{"alpha": 1.0}, {"beta": 0.4, "gamma": 0.6}, {}, {"alpha": 0.2, "beta": 0.3, "gamma": 0.5}]
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    batch = engine.generate(prompts, adapters=sets, max_new_tokens=10)
    assert {r["mode"] for r in batch} == {"slots"}
    for p, s, r in zip(prompts, sets, batch):
        alone = engine.generate([p], adapters=s, max_new_tokens=10)[0]
        assert alone["text"] == r["text"] and alone["tokens"] == r["tokens"]
        forced = engine.generate([p], adapters=s, max_new_tokens=10, mode="unmerged")[0]
        assert forced["text"] == r["text"]
    same = engine.generate(prompts[:2], adapters=sets[1], max_new_tokens=10, mode="shared")
    merged = engine.generate(prompts[:2], adapters=sets[1], max_new_tokens=10, mode="merged")
    assert merged[0]["mode"] == "merged" and [r["text"] for r in same] == [r["text"] for r in merged]
    assert all(torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())


def test_router_runs_once_per_batch_and_sets_routing(engine):
    router = engine.router
    router.calls.clear()
    prompts = ["a math question: 3+4", "write a poem", "hello there"]
    res = engine.generate(prompts, max_new_tokens=6)
    assert len(router.calls) == 1 and router.calls[0][0] == prompts and router.calls[0][1] == 0.6
    assert res[0]["routing"] == {"adapters": [{"name": "alpha", "weight": 0.7}, {"name": "beta", "weight": 0.3}],
                                 "source": "plugin"}
    assert res[1]["routing"]["adapters"] == [{"name": "gamma", "weight": 1.0}]
    assert res[2]["routing"]["adapters"] == [] and res[2]["mode"] == "slots"
    assert res[2]["routing"]["base_model"] is True and "none of the adapters" in res[2]["routing"]["base_reason"]
    explicit = engine.generate(prompts[:1], adapters={"alpha": 0.7, "beta": 0.3}, max_new_tokens=6)[0]
    assert explicit["text"] == res[0]["text"]
    # explicit adapters bypass the router; a list may mix explicit rows and routed rows
    router.calls.clear()
    mixed = engine.generate(prompts[:2], adapters=[{"beta": 0.9}, None], max_new_tokens=4)
    assert router.calls[0][0] == prompts[1:2]
    assert mixed[0]["routing"]["adapters"] == [{"name": "beta", "weight": 0.9}]


def test_no_plugin_error(lib):
    eng = DLPLoRA.from_library(lib[0])
    assert eng.router is None
    with pytest.raises(DLPLoRAError, match=r"dlp-lora train-plugin --library .*lib"):
        eng.generate(["hello"], max_new_tokens=2)
    out = eng.generate(["hello", "hi"], adapters=[None, {"alpha": 1}], max_new_tokens=2, on_error="return")
    assert "train-plugin" in out[0]["error"] and out[1]["tokens"] == 2


def test_bad_requests(engine):
    g = engine.generate
    with pytest.raises(DLPLoRAError, match="unknown adapter 'nope'"):
        g(["hi"], adapters={"nope": 1.0})
    with pytest.raises(DLPLoRAError, match=r"is -1; each weight must be in \[0, 1\]"):
        g(["hi"], adapters={"alpha": -1.0})
    with pytest.raises(DLPLoRAError, match="finite"):
        g(["hi"], adapters={"alpha": float("nan")})
    with pytest.raises(DLPLoRAError, match="2 weights for 1 adapters"):
        g(["hi"], adapters=FakeRouting(["alpha"], [0], [0.5, 0.5]))
    with pytest.raises(DLPLoRAError, match="empty"):
        g(["   "], adapters={})
    with pytest.raises(DLPLoRAError, match=r"prompt 2: .*at most 412 .*context window 512"):
        g(["hi", "fox " * 600], adapters={}, max_new_tokens=100)
    with pytest.raises(DLPLoRAError, match="max_new_tokens"):
        g(["hi"], adapters={}, max_new_tokens=0)
    with pytest.raises(DLPLoRAError, match="2 entries for 3 prompts"):
        g(["a", "b", "c"], adapters=[{}, {}])
    with pytest.raises(DLPLoRAError, match="unknown fusion mode"):
        g(["hi"], adapters={}, mode="turbo")


def test_bad_row_does_not_spoil_others(engine):
    prompts = ["The quick brown fox", "", "Solve the following math problem", "fox " * 600]
    sets = [{"alpha": 1.0}, {}, {"beta": 0.5, "gamma": 0.5}, {}]
    errs = engine.validate(prompts, adapters=sets, max_new_tokens=8)
    assert errs[0] is None and "empty" in errs[1] and errs[2] is None and "context window" in errs[3]
    res = engine.generate(prompts, adapters=sets, max_new_tokens=8, on_error="return")
    assert set(res[1]) == {"error"} and set(res[3]) == {"error"}
    for i in (0, 2):
        assert res[i]["text"] == engine.generate([prompts[i]], adapters=sets[i], max_new_tokens=8)[0]["text"]
    res = engine.generate(["hi", "hello"], adapters=[{"alpha": 1}, {"zzz": 1}], max_new_tokens=3, on_error="return")
    assert "unknown adapter 'zzz'" in res[1]["error"] and res[0]["tokens"] == 3


def test_stop_strings_eos_and_limits(engine):
    prompt = "The quick brown fox jumps"
    full = engine.generate([prompt], adapters={"beta": 1.0}, max_new_tokens=20)[0]
    assert full["tokens"] <= 20
    text = full["text"]
    assert len(text) > 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = engine.generate([prompt], adapters={"beta": 1.0}, max_new_tokens=20, stop=[stop])[0]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"
    # EOS: a decode loop where the EOS is whatever the model picks first stops at once
    first = engine.generate([prompt], adapters={"beta": 1.0}, max_new_tokens=1, raw=True)[0]
    ids = engine.tokenizer(prompt)["input_ids"]
    with engine.apply([{"beta": 1.0}]):
        gen1, _ = decode_loop(engine.model, [ids], 1, [], engine.tokenizer.pad_token_id)
        gen, why = decode_loop(engine.model, [ids], 5, gen1[0], engine.tokenizer.pad_token_id)
    assert first["tokens"] == 1 and gen == [[]] and why == ["stop"]


def test_sampling_is_seeded(engine):
    kw = dict(adapters={"alpha": 0.5, "beta": 0.5}, max_new_tokens=12, temperature=1.5, top_p=0.9)
    a = engine.generate(["The quick", "brown fox"], seed=3, **kw)
    b = engine.generate(["The quick", "brown fox"], seed=3, **kw)
    assert [r["text"] for r in a] == [r["text"] for r in b]
    greedy = engine.generate(["The quick"], adapters={"alpha": 0.5, "beta": 0.5}, max_new_tokens=12)[0]
    others = {engine.generate(["The quick"], seed=s, **kw)[0]["text"] for s in range(4)}
    assert len(others | {greedy["text"]}) > 1


def test_raw_mode_skips_template(engine):
    r = engine.generate(["The quick brown fox"], adapters={}, raw=True, max_new_tokens=3)[0]
    assert r["prompt_tokens"] == len(engine.tokenizer("The quick brown fox")["input_ids"])
    c = engine.generate(["The quick brown fox"], adapters={}, max_new_tokens=3)[0]
    assert c["prompt_tokens"] > r["prompt_tokens"]
    # one batch holding a chat row and a raw row (bench serve's offline run of chat and completions requests)
    both = engine.generate(["The quick brown fox"] * 2, adapters={}, raw=[False, True], max_new_tokens=3)
    assert [b["prompt_tokens"] for b in both] == [c["prompt_tokens"], r["prompt_tokens"]]
    assert [b["text"] for b in both] == [c["text"], r["text"]]
    with pytest.raises(DLPLoRAError, match="raw: 1 entries for 2 prompts"):
        engine.generate(["a", "b"], adapters={}, raw=[True], max_new_tokens=1)


def test_chat_keeps_history_reroutes_and_streams(engine):
    engine.router.calls.clear()
    engine.route_window = 1
    try:
        chat = engine.chat(max_new_tokens=8)
        pieces = []
        r1 = chat.send("a math question", on_token=pieces.append)
        assert "".join(pieces) == r1["text"] and r1["routing"]["source"] == "plugin"
        assert [a["name"] for a in r1["routing"]["adapters"]] == ["alpha", "beta"]
        pieces.clear()
        r2 = chat.send("now a poem", on_token=pieces.append)
        assert "".join(pieces) == r2["text"]
        # the second turn is routed on the previous user turn + this one, joined by the turn separator
        from dlplora.config import TURN_SEPARATOR

        assert engine.router.calls[-1][0] == ["a math question" + TURN_SEPARATOR + "now a poem"]
        assert len(engine.router.calls) == 2
        assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
        assert r2["prompt_tokens"] > r1["prompt_tokens"]
    finally:
        engine.route_window = 0


def test_streaming_with_stop_matches_final_text(engine):
    full = engine.generate(["Solve the following"], adapters={"gamma": 1.0}, max_new_tokens=16)[0]["text"]
    stop = full[5:8] if len(full) > 8 else None
    pieces: list = []
    r = engine.generate(["Solve the following"], adapters={"gamma": 1.0}, max_new_tokens=16,
                        stop=[stop] if stop else None, on_token=lambda i, t: pieces.append(t))[0]
    assert "".join(pieces) == r["text"]


def test_parse_adapters():
    assert parse_adapters("a=0.5, b=0.3") == {"a": 0.5, "b": 0.3}
    assert parse_adapters("a") == {"a": 1.0}
    for bad in ("", "a=x", "=1"):
        with pytest.raises(DLPLoRAError):
            parse_adapters(bad)


def test_cli_generate_and_chat(lib, capsys, monkeypatch):
    from dlplora.cli import main

    rc = main(["generate", "--library", str(lib[0]), "--adapters", "alpha=0.5,beta=0.5", "--max-new-tokens", "5",
               "--json", "The quick brown fox"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    obj = json.loads(out[-1])
    assert set(obj) >= {"text", "routing"} and obj["routing"]["adapters"][0]["name"] in ("alpha", "beta")
    rc = main(["generate", "--library", str(lib[0]), "--adapters", "alpha=1", "--max-new-tokens", "3", "--json",
               "--raw", "--mode", "unmerged", "one", "two"])
    objs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and isinstance(objs, list) and len(objs) == 2
    # no plugin, no adapters: one-line error, exit 2
    rc = main(["generate", "--library", str(lib[0]), "hello"])
    assert rc == 2 and "train-plugin" in capsys.readouterr().err
    rc = main(["generate", "--library", str(lib[0]), "--adapters", "nope=1", "hello"])
    assert rc == 2 and "unknown adapter 'nope'" in capsys.readouterr().err
    # chat: reads stdin lines until /exit
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nsecond turn\n/exit\nnever read\n"))
    rc = main(["chat", "--library", str(lib[0]), "--adapters", "gamma=1", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("[adapters: gamma=1") == 2


def test_bench_fusion_runs_on_a_tiny_model(lib, capsys):
    import argparse

    from dlplora.bench import fusion as bench_fusion

    parser = argparse.ArgumentParser()
    bench_fusion.add_arguments(parser)
    args = parser.parse_args(["--model", str(lib[1]), "--quick", "--adapters", "4", "--batch", "3",
                              "--scaling", "4,6", "--json"])
    res = bench_fusion.run(args)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(res))
    # every time is the minimum of its interleaved repeats, and every ratio is the ratio of those times
    for scenario, times in last["seconds"].items():
        for contender, t in times.items():
            runs = last["all_seconds"][scenario][contender]
            assert len(runs) == last["repeats"] and t == pytest.approx(min(runs), abs=1e-4)  # raw: rounded
    b1, mixed = last["seconds"]["batch1"], last["seconds"]["mixed_batch"]
    assert last["dlp_vs_single_lora"] == pytest.approx(b1["dlp"] / b1["single_lora"], abs=1e-3)
    assert last["mixed_batch_throughput_vs_single"] == pytest.approx(mixed["single_lora"] / mixed["dlp_mixed"], abs=1e-3)
    assert last["mixed_batch_throughput_vs_peft_mixed"] == pytest.approx(mixed["peft_mixed"] / mixed["dlp_mixed"],
                                                                         abs=1e-3)
    assert last["targets"]["dlp_vs_single_lora <= 1.05"] == (last["dlp_vs_single_lora"] <= 1.05)
    assert set(last["scaling"]) == {"4", "6"} and last["batch1_mode"] == "slots"  # 4 tokens: no merge
    assert last["mixed_batch_mode"] == "slots" and 2 <= last["mixed_batch_adapters_per_row"][0] <= 3
    # the stand-in router picks 2-3 adapters with weights summing to 1
    r = bench_fusion.StandInRouter([f"a{i}" for i in range(26)]).route(["x", "y"], p=0.6, top_k=3)
    assert all(2 <= len(x.names) <= 3 and abs(sum(x.weights) - 1) < 1e-5 for x in r)


@pytest.mark.integration
def test_real_backbone_single_adapter_matches_peft(tmp_path):
    """SmolLM2-135M with one random q/v adapter: the engine's greedy tokens == PEFT's."""
    from peft import PeftModel

    from dlplora.backbone import load_backbone
    from dlplora.fusion import LoRAFusion, load_peft_adapter
    from dlplora.tasks import chat_prompt

    model, tok, info = load_backbone()
    root = random_peft_library(tmp_path / "lib", info.path, {"rand": (8, 16, ("q_proj", "v_proj"))}, model=model)
    pm = PeftModel.from_pretrained(model, str(root / "adapters" / "rand")).eval()
    ids = tok(chat_prompt(tok, "Name a primary colour."), add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        ref = pm.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    ref_text = tok.decode(ref[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    base = pm.unload()  # the plain backbone again (no second load)
    fusion = LoRAFusion(base, [load_peft_adapter(root / "adapters" / "rand", "rand")])
    eng = DLPLoRA(base, tok, fusion, library=Library.open(root))
    res = eng.generate(["Name a primary colour."], adapters={"rand": 1.0}, max_new_tokens=12)[0]
    assert res["text"].strip() and res["text"] == ref_text
