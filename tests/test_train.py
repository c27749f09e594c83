"""Training: the LoRA trainer (target-only loss, bucketing), a library of adapters (resumable), its benchmark."""

import json

import pytest
import torch

from dlplora.errors import DLPLoRAError
from dlplora.train import TrainConfig, train_library
from dlplora.train.lora import ALL_LINEAR, bucketed_batches, collate, encode_example, naive_loss, target_only_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest (and steady when shared)

CFG = dict(steps=3, batch_size=4, max_len=64, rank=4, alpha=8)


def test_target_only_loss_equals_full_logits_loss(tiny_model, tiny_data):
    from dlplora.backbone import load_backbone
    from dlplora.tasks import load_split

    model, tok, _ = load_backbone(str(tiny_model))
    rows = load_split(tiny_data, "sums", "train")[:4]
    batch = collate([encode_example(tok, r, 64, 32) for r in rows], tok.pad_token_id)
    with torch.no_grad():
        a = target_only_loss(model, *batch, bf16=False)
        b = naive_loss(model, *batch)
    assert torch.allclose(a, b, atol=1e-5)
    # only answer tokens (+ end of turn) are targets
    ids, start = encode_example(tok, rows[0], 64, 32)
    assert tok.decode(ids[start:]).startswith(rows[0]["target"]) and ids[-1] == tok.eos_token_id


def test_bucketing_groups_similar_lengths():
    import random

    lengths = [5, 100, 6, 101, 7, 102, 8, 103]
    batches = bucketed_batches(lengths, 4, random.Random(0))
    spans = sorted(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spans == [3, 3] and sorted(i for b in batches for i in b) == list(range(8))


def test_train_library_manifest_resume_and_peft_load(tiny_model, tiny_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lib_dir = tmp_path / "lib"
    logs = []
    # quiz/sums are custom tasks: accepted because prepared data exists for them
    train_library("quiz,sums", tiny_data, lib_dir, model=str(tiny_model), cfg=TrainConfig(**CFG), eval_limit=4,
                  log=logs.append)
    m = json.loads((lib_dir / "library.json").read_text())
    assert set(m["adapters"]) == {"quiz", "sums"}
    e = m["adapters"]["quiz"]
    for key in ("task", "path", "base_model", "rank", "targets", "n_train", "steps", "final_loss", "wall_seconds"):
        assert key in e
    assert e["rank"] == 4 and e["targets"] == list(ALL_LINEAR) and e["steps"] == 3  # the default targets
    assert e["score_detail"]["metric"] == "accuracy" and "beats_base" in e
    assert e["n_test"] > 0 and e["interval"][0] <= e["score"] <= e["interval"][1] and 0 < e["p_value"] <= 1
    assert m["adapters"]["sums"]["score_detail"]["metric"] == "rougeL"
    assert m["base_model"]["fingerprint"]
    # resumable: a second run skips both
    logs.clear()
    train_library("quiz,sums", tiny_data, lib_dir, model=str(tiny_model), cfg=TrainConfig(**CFG), eval_limit=0,
                  log=logs.append)
    assert sum("skip" in l for l in logs) == 2
    # a standard PEFT adapter directory
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = PeftModel.from_pretrained(base, lib_dir / "adapters" / "sums")
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    # no temp dirs left behind
    assert not [p for p in (lib_dir / "adapters").iterdir() if p.name.startswith(".")]


def test_bad_training_input(tiny_model, tiny_data, tmp_path):
    with pytest.raises(DLPLoRAError, match="--rank must be a positive"):
        train_library("winowhy", tiny_data, tmp_path / "l", model=str(tiny_model), cfg=TrainConfig(rank=0))
    with pytest.raises(DLPLoRAError, match="unknown task"):
        train_library("nope", tiny_data, tmp_path / "l", model=str(tiny_model), cfg=TrainConfig())
    with pytest.raises(DLPLoRAError, match="no prepared train data for task winowhy"):
        train_library("winowhy", tiny_data, tmp_path / "l", model=str(tiny_model), cfg=TrainConfig())


def test_unknown_target_module(tiny_model, tiny_data, tmp_path):
    from dlplora.train.lora import check_targets, parse_targets
    from dlplora.backbone import load_backbone

    model, _, _ = load_backbone(str(tiny_model))
    with pytest.raises(DLPLoRAError, match="target module.*c_attn"):
        check_targets(model, parse_targets("q_proj,c_attn"))
    assert "gate_proj" in parse_targets("all-linear")
    check_targets(model, parse_targets("all-linear"))


def test_bench_train_runs_all_contenders_on_tiny(tiny_model, tiny_data):
    from dlplora.tasks import load_split
    from dlplora.bench.train import bench_train

    res = bench_train(str(tiny_model), examples=load_split(tiny_data, "sums", "train"), batch_size=4, repeats=1,
                      max_len=64, log=lambda *_: None)
    assert set(res["tokens_per_second"]) == {"naive_fp32_full_logits", "ours_all_layers", "ours_default_top_layers",
                                             "ours_top_layers_cached_bottom"}
    assert res["cached_bottom_vs_default"] == pytest.approx(
        res["tokens_per_second"]["ours_top_layers_cached_bottom"] / res["tokens_per_second"]["ours_default_top_layers"],
        rel=0.02) and res["prefix_fill_seconds"] > 0
    tps = res["tokens_per_second"]
    # the speed-ups are the ratios of the measured throughputs, on one batch of real (non-padding) tokens
    assert res["speedup"] == pytest.approx(tps["ours_default_top_layers"] / tps["naive_fp32_full_logits"], rel=0.02)
    assert res["speedup_same_adapter"] == pytest.approx(tps["ours_all_layers"] / tps["naive_fp32_full_logits"],
                                                        rel=0.02)
    assert 0 < res["target_tokens"] < res["tokens_per_batch"] <= 4 * 64
    assert res["top_layers"] == 10


def test_learning_curve_scores_each_point_and_resumes(tiny_model, tiny_data, tmp_path):
    from dlplora.train.curve import lr_factor, run_curve

    assert lr_factor(0) == pytest.approx(1 / 20) and lr_factor(20) == 1.0 and lr_factor(80) == pytest.approx(0.5)
    out = tmp_path / "curve"
    cfg = TrainConfig(**dict(CFG, batch_size=4))
    logs = []
    rec = run_curve("quiz,sums", tiny_data, out, points=[8, 16], cfg=cfg, model=str(tiny_model), eval_limit=3,
                    log=logs.append)
    pts = {(p["task"], p["examples"]): p for p in rec["points"]}
    assert set(pts) == {(t, n) for t in ("quiz", "sums") for n in (0, 8, 16)}
    assert pts[("quiz", 16)]["steps"] == 4 and pts[("quiz", 16)]["train_seconds"] >= pts[("quiz", 8)]["train_seconds"]
    assert all(p["n_test"] == 3 for p in rec["points"]) and (out / "curve.png").is_file()
    # a rerun with one more point trains only from 16 to 24 examples, from the saved state
    logs.clear()
    rec = run_curve("quiz", tiny_data, out, points=[8, 16, 24], cfg=cfg, model=str(tiny_model), eval_limit=3,
                    log=logs.append)
    assert any("resuming at 16 examples" in m for m in logs)
    assert [p["steps"] for p in rec["points"] if p["task"] == "quiz"] == [0, 2, 4, 6]
    assert json.loads((out / "curve.json").read_text()) == rec
    with pytest.raises(DLPLoRAError, match="--points must be positive"):
        run_curve("quiz", tiny_data, out, points=[0], cfg=cfg, model=str(tiny_model))


def test_prefix_cache_gives_the_same_loss_and_gradients(tiny_model, tiny_data):
    """Top-layer training from cached bottom-layer states equals the full forward pass (fp32)."""
    from dlplora.backbone import load_backbone
    from dlplora.tasks import load_split
    from dlplora.train.lora import make_peft_model
    from dlplora.train.prefix import PrefixCache, prefix_loss

    model, tok, _ = load_backbone(str(tiny_model))
    cfg = TrainConfig(**dict(CFG, top_layers=1), bf16=False)
    pm = make_peft_model(model, cfg).eval()  # LoRA dropout off, so both passes are deterministic
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a live adapter, so the gradients reach lora_A too
    enc = [encode_example(tok, r, 64, 32) for r in load_split(tiny_data, "sums", "train")[:5]]
    seqs = [ids for ids, _ in enc]
    _, _, rows, pos, tgt = batch = collate(enc, tok.pad_token_id)
    params = [p for p in pm.parameters() if p.requires_grad]

    def grads(loss):
        g = torch.autograd.grad(loss, params)
        return loss.detach(), g

    full, g_full = grads(target_only_loss(pm, *batch, bf16=False))
    cache = PrefixCache(pm, split=1, bf16=False)
    cache.fill([0, 1], seqs[:2], tok.pad_token_id)  # two of them cached earlier, in another batch
    cached, g_cached = grads(prefix_loss(pm, cache, list(range(5)), seqs, tok.pad_token_id, rows, pos, tgt, bf16=False))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_cached, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert cache.computed_tokens == sum(map(len, seqs))  # every example's bottom layers ran once
    again = prefix_loss(pm, cache, [4, 2], [seqs[4], seqs[2]], tok.pad_token_id, *collate([enc[4], enc[2]],
                                                                                          tok.pad_token_id)[2:],
                        bf16=False)
    assert cache.computed_tokens == sum(map(len, seqs)) and torch.isfinite(again)
    pm.unload()


def test_training_with_the_bottom_layers_cached_follows_the_same_losses(tiny_model, tiny_data):
    from dlplora.backbone import load_backbone
    from dlplora.tasks import load_split
    from dlplora.train.lora import make_peft_model, train_adapter

    model, tok, _ = load_backbone(str(tiny_model))
    examples = load_split(tiny_data, "sums", "train")[:8]
    runs = []
    for cached in (False, True):
        cfg = TrainConfig(**dict(CFG, steps=6, top_layers=1), dropout=0.0, bf16=False, cache_bottom=cached)
        pm = make_peft_model(model, cfg)
        runs.append(train_adapter(pm, tok, examples, cfg, progress=False).losses)  # 2 epochs of 2 batches
        pm.unload()
    # the first step is the same computation; later ones drift by float rounding, which Adam's normalised
    # updates amplify on near-zero gradients (the exact equivalence is the gradient test above)
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-4) and len(runs[0]) == 6
    assert runs[0] == pytest.approx(runs[1], rel=0.01)


def test_packed_rows_give_the_same_loss_and_gradients_as_one_example_per_row(tiny_model, tiny_data):
    """Packing (train.pack): examples share a row but not attention; positions restart per example."""
    from dlplora.backbone import load_backbone
    from dlplora.tasks import load_split
    from dlplora.train.lora import make_peft_model
    from dlplora.train.pack import pack_rows, packed_collate, packed_loss

    model, tok, _ = load_backbone(str(tiny_model))
    pm = make_peft_model(model, TrainConfig(**dict(CFG, top_layers=None), bf16=False)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    enc = [encode_example(tok, r, 64, 32) for r in load_split(tiny_data, "sums", "train")[:6]]
    lengths = [len(s) for s, _ in enc]
    rows = pack_rows(lengths, row_tokens=2 * max(lengths))
    assert len(rows) < len(enc) and sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 2 * max(lengths) for r in rows)
    params = [p for p in pm.parameters() if p.requires_grad]
    order = [i for r in rows for i in r]  # the same examples, one per row, in the packed order
    full = target_only_loss(pm, *collate([enc[i] for i in order], tok.pad_token_id), bf16=False)
    packed = packed_loss(pm, *packed_collate(enc, rows, tok.pad_token_id), bf16=False)
    torch.testing.assert_close(packed, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(packed, params), torch.autograd.grad(full, params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # without the block mask the examples would see each other: the loss changes
    ids, positions, segs, *rest = packed_collate(enc, rows, tok.pad_token_id)
    leaky = packed_loss(pm, ids, positions, (segs > 0).long(), *rest, bf16=False)
    assert abs(leaky.item() - full.item()) > 1e-4
    pm.unload()


def test_bench_batching_reports_padding_and_speed_of_the_three_batchings(tiny_model, tiny_data):
    from dlplora.bench.train import bench_batching
    from dlplora.tasks import load_split

    exs = load_split(tiny_data, "sums", "train")
    res = bench_batching(str(tiny_model), examples=exs, n_examples=12, batch_size=4, max_len=64, repeats=1,
                         log=lambda *_: None)
    pad = res["padding_share"]
    assert set(pad) == {"random_order", "length_bucketed", "packed"} and res["examples"] == min(12, len(exs))
    assert 0 <= pad["length_bucketed"] <= pad["random_order"] < 1  # sorting never pads more than random order
    assert res["vs_length_bucketed"]["length_bucketed"] == 1.0 and all(v > 0 for v in res["tokens_per_second"].values())
    assert res["steps_per_epoch"]["length_bucketed"] == -(-res["examples"] // 4)


def test_train_config_reads_targets_as_peft_does():
    assert TrainConfig(targets="all-linear").targets == ALL_LINEAR
    assert TrainConfig(targets="q_proj, v_proj").targets == ("q_proj", "v_proj")
    assert TrainConfig(targets=["o_proj"]).targets == ("o_proj",)
    with pytest.raises(DLPLoRAError, match="empty"):
        TrainConfig(targets=" , ")


def test_scoring_generation_equals_hf_generate_of_the_unmerged_adapter(tiny_model, one_thread):
    """score_task generates with a merged copy of a PEFT model on the decoding core: the same greedy tokens as
    HF generate on the PEFT model itself, which is left as it was."""
    from dlplora.backbone import load_backbone
    from dlplora.decoding import eos_token_ids
    from dlplora.eval.scoring import generate_greedy, inference_copy
    from dlplora.tasks import chat_prompt
    from dlplora.train.lora import make_peft_model

    net, tok, _ = load_backbone(str(tiny_model))
    pm = make_peft_model(net, TrainConfig(rank=4, top_layers=None))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.eval()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    messages = ["what is two plus two", "hi", "name a colour that is not red or blue"]
    prompts = [chat_prompt(tok, q) for q in messages]
    ours = generate_greedy(inference_copy(pm, "float32"), tok, messages, max_new_tokens=12, batch_size=2)
    eos = eos_token_ids(pm, tok)
    ref = []
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=False)
        g = pm.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        ref.append(tok.decode(g[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip())
    assert ours == ref
    assert any(ours)
    with pm.disable_adapter():  # the adapter matters: without it the tokens differ
        enc = tok(prompts[2], return_tensors="pt", add_special_tokens=False)
        g = pm.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        base_ref = tok.decode(g[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip()
        assert base_ref != ours[2]
        # and a copy made with the adapter switched off is the base model (train-loras scores base that way)
        assert generate_greedy(inference_copy(pm, "float32"), tok, messages[2:], max_new_tokens=12) == [base_ref]
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters())
    assert hasattr(pm, "peft_config")


def test_building_the_peft_model_warns_nothing(tiny_model):
    """Issue 33.8: every training command printed PEFT's `is_gradient_checkpointing is deprecated` FutureWarning."""
    import warnings

    from transformers import AutoModelForCausalLM

    from dlplora.train import TrainConfig
    from dlplora.train.lora import make_peft_model

    net = AutoModelForCausalLM.from_pretrained(tiny_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_peft_model(net, TrainConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), top_layers=None))
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    with warnings.catch_warnings(record=True) as caught:  # the filter stays local: the same warning passes after
        warnings.simplefilter("always")
        getattr(net, "is_gradient_checkpointing", None)
    assert any("is_gradient_checkpointing" in str(w.message) for w in caught)
