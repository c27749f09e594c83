"""The fused multi-LoRA layers against PEFT, on a tiny random Llama in fp32."""

from __future__ import annotations

import json

import pytest
import torch

from dlplora.errors import DLPLoRAError
from dlplora.fusion import FusedLoRALinear, LoRAFusion, load_peft_adapter
from dlplora.testing import random_adapter
from dlplora.testing import random_peft_adapter, tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


ATOL = 1e-4

# name -> (rank, alpha, targets, rslora)
SPECS = {
    "a": (4, 8, ["q_proj", "v_proj"], False),
    "b": (8, 4, ["q_proj", "v_proj"], False),
    "c": (2, 4, ["q_proj", "o_proj"], False),  # another target set
    "d": (6, 12, ["k_proj", "v_proj", "down_proj"], True),  # rsLoRA, MLP layer too
}


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return m.eval()


def _make_adapter(model_dir, out, rank, alpha, targets, rslora, seed):
    return random_peft_adapter(model_dir, out, rank, alpha, targets, seed=seed, std=0.3, factors=("lora_A", "lora_B"),
                               use_rslora=rslora)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    model_dir = tiny_model_dir(root / "model")
    dirs = {}
    for seed, (name, (r, alpha, targets, rs)) in enumerate(SPECS.items()):
        dirs[name] = str(_make_adapter(model_dir, root / name, r, alpha, targets, rs, seed + 1))
    torch.manual_seed(0)
    ids = torch.randint(3, 400, (1, 12))
    return model_dir, dirs, ids


def _fused(setup, names=None):
    model_dir, dirs, _ = setup
    model = _base(model_dir)
    names = names or list(dirs)
    return model, LoRAFusion.from_dirs(model, {n: dirs[n] for n in names})


@torch.inference_mode()
def _logits(model, ids):
    return model(input_ids=ids).logits


def _peft(setup, name):
    from peft import PeftModel

    model_dir, dirs, _ = setup
    return PeftModel.from_pretrained(_base(model_dir), dirs[name], adapter_name=name).eval()


def test_single_adapter_matches_peft(setup):
    ids = setup[2]
    model, fusion = _fused(setup)
    assert len(fusion.layers) == 2 * 5  # q,k,v,o,down in 2 layers
    base = _logits(model, ids)
    for name in SPECS:
        ref = _logits(_peft(setup, name), ids)
        assert not torch.allclose(ref, base, atol=1e-2), "adapter delta should be non-zero"
        for mode in ("unmerged", "shared", "merged"):
            with fusion.routing([{name: 1.0}], mode=mode) as used:
                assert used == mode
                got = _logits(model, ids)
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(model, ids), base, atol=0, rtol=0)


def test_weighted_set_matches_peft_cat(setup):
    ids = setup[2]
    model, fusion = _fused(setup)
    for combo in ({"a": 0.3, "b": 0.7}, {"a": 0.5, "c": 0.2, "d": 0.3}):
        pm = _peft(setup, "a")
        for n in combo:
            if n != "a":
                pm.load_adapter(setup[1][n], adapter_name=n)
        pm.add_weighted_adapter(list(combo), list(combo.values()), adapter_name="mix", combination_type="cat")
        pm.set_adapter("mix")
        ref = _logits(pm, ids)
        with fusion.routing([combo], mode="unmerged"):
            got = _logits(model, ids)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_mixed_batch_rows_equal_rows_alone(setup):
    model, fusion = _fused(setup)
    torch.manual_seed(1)
    batch = torch.randint(3, 400, (4, 10))
    sets = [{"a": 1.0}, {"b": 0.4, "d": 0.6}, {}, {"c": 0.25, "a": 0.25, "b": 0.5}]
    with fusion.routing(sets) as used:
        assert used == "unmerged"
        got = _logits(model, batch)
    for row, s in enumerate(sets):
        with fusion.routing([s]) as used:
            assert used == ("merged" if s else None)
            alone = _logits(model, batch[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], alone, atol=ATOL, rtol=0)
    # the empty row is exactly the base model
    base = _logits(model, batch[2:3])
    torch.testing.assert_close(got[2:3], base, atol=1e-5, rtol=0)
    # and a single-adapter row is PEFT's
    torch.testing.assert_close(got[0:1], _logits(_peft(setup, "a"), batch[0:1]), atol=ATOL, rtol=0)


def test_mixed_batch_matches_peft_adapter_names(setup):
    model_dir, dirs, _ = setup
    model, fusion = _fused(setup, ["a", "b"])
    pm = _peft(setup, "a")
    pm.load_adapter(dirs["b"], adapter_name="b")
    torch.manual_seed(2)
    batch = torch.randint(3, 400, (3, 9))
    with torch.inference_mode():
        ref = pm(input_ids=batch, adapter_names=["a", "b", "__base__"]).logits
    with fusion.routing([{"a": 1.0}, {"b": 1.0}, {}]):
        got = _logits(model, batch)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_merged_equals_unmerged_and_restores_exactly(setup):
    ids = setup[2]
    model, fusion = _fused(setup)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    combo = [{"a": 0.2, "b": 0.3, "c": 0.1, "d": 0.4}] * 2
    batch = torch.cat([ids, ids.flip(1)])
    with fusion.routing(combo, mode="unmerged"):
        unmerged = _logits(model, batch)
    with fusion.routing(combo, mode="shared"):
        shared = _logits(model, batch)
    with fusion.routing(combo) as used:
        assert used == "merged"
        changed = any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
        merged = _logits(model, batch)
    assert changed
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)
    torch.testing.assert_close(shared, unmerged, atol=ATOL, rtol=0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # a new routing while merged also restores first
    fusion.set_routing([{"a": 1.0}], mode="merged")
    fusion.set_routing([{"b": 1.0}], mode="merged")
    fusion.clear()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_weights_scale_linearly_and_zero_weight_is_base(setup):
    ids = setup[2]
    model, fusion = _fused(setup, ["a"])
    base = _logits(model, ids)
    with fusion.routing([{"a": 0.0}]) as used:
        assert used is None
        torch.testing.assert_close(_logits(model, ids), base, atol=0, rtol=0)
    # the delta of q/v at layer 0 is linear in the weight
    layer = fusion.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 3, layer.in_features)
    with torch.inference_mode():
        y0 = layer.base(x)
        with fusion.routing([{"a": 0.5}] * 2, mode="shared"):
            y1 = layer(x) - y0
        with fusion.routing([{"a": 1.0}] * 2, mode="unmerged"):
            y2 = layer(x) - y0
    torch.testing.assert_close(2 * y1, y2, atol=1e-5, rtol=1e-5)


def test_routing_validation(setup):
    model, fusion = _fused(setup, ["a", "b"])
    with pytest.raises(DLPLoRAError, match="unknown adapter 'zzz'"):
        fusion.set_routing([{"zzz": 1.0}])
    with pytest.raises(DLPLoRAError, match="non-negative"):
        fusion.set_routing([{"a": -0.5}])
    with pytest.raises(DLPLoRAError, match="finite"):
        fusion.set_routing([{"a": float("nan")}])
    with pytest.raises(DLPLoRAError, match="do not match"):
        fusion.set_routing(torch.tensor([[0, 1]]), torch.tensor([[1.0]]))
    with pytest.raises(DLPLoRAError, match="out of range"):
        fusion.set_routing(torch.tensor([[5]]), torch.tensor([[1.0]]))
    with pytest.raises(DLPLoRAError, match="same adapter set"):
        fusion.set_routing([{"a": 1.0}, {"b": 1.0}], mode="merged")
    with pytest.raises(DLPLoRAError, match="unknown fusion mode"):
        fusion.set_routing([{"a": 1.0}], mode="fast")
    assert fusion.mode is None


def test_unfuse_restores_plain_linears(setup):
    model, fusion = _fused(setup)
    assert any(isinstance(m, FusedLoRALinear) for m in model.modules())
    with pytest.raises(DLPLoRAError, match="already has fused"):
        LoRAFusion.from_dirs(model, {"a": setup[1]["a"]})
    fusion.unfuse()
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, setup[2]), _logits(_base(setup[0]), setup[2]), atol=0, rtol=0)


def test_load_errors(setup, tmp_path):
    model_dir, dirs, _ = setup
    # an adapter for a bigger model: shapes do not fit
    big = tiny_model_dir(tmp_path / "big", hidden=96)
    wrong = _make_adapter(big, tmp_path / "wrong", 4, 8, ["q_proj"], False, 0)
    model = _base(model_dir)
    with pytest.raises(DLPLoRAError, match=r"adapter 'wrong', layer model\.layers\.0\.self_attn\.q_proj.*\(96"):
        LoRAFusion.from_dirs(model, {"wrong": wrong})
    # an adapter for a deeper model: targets a layer the model lacks
    deep = tiny_model_dir(tmp_path / "deep", layers=3)
    deep_ad = _make_adapter(deep, tmp_path / "deep_ad", 4, 8, ["v_proj"], False, 0)
    with pytest.raises(DLPLoRAError, match=r"adapter 'deep' targets module model\.layers\.2\.self_attn\.v_proj"):
        LoRAFusion.from_dirs(model, {"deep": deep_ad})
    # corrupt weights file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(DLPLoRAError, match="adapter 'bad': could not read"):
        load_peft_adapter(bad, "bad")
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(DLPLoRAError, match="corrupt"):
        load_peft_adapter(bad, "bad")
    with pytest.raises(DLPLoRAError, match="no such adapter directory"):
        load_peft_adapter(tmp_path / "nothing", "nothing")
    (bad / "adapter_config.json").unlink()
    with pytest.raises(DLPLoRAError, match="adapter_config.json is missing"):
        load_peft_adapter(bad, "bad")
    # the model is untouched after a failed fusion
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())


def test_mixed_ranks_are_padded(setup):
    model, fusion = _fused(setup)
    q = fusion.layers["model.layers.0.self_attn.q_proj"]
    assert q.A.shape[:2] == (4, 8)  # a (4), b (8), c (2), d (absent: zeros)
    assert torch.count_nonzero(q.A[fusion.index("d")]) == 0
    assert torch.count_nonzero(q.A[fusion.index("c"), 2:]) == 0
    ad = load_peft_adapter(setup[1]["d"], "d")
    assert ad.use_rslora and abs(ad.layers["model.layers.0.self_attn.v_proj"][2] - 12 / 6 ** 0.5) < 1e-6


def test_random_adapter_shapes(setup):
    model = _base(setup[0])
    ad = random_adapter(model, "r", rank=8)
    assert set(ad.layers) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    LoRAFusion(model, [ad, random_adapter(model, "s", seed=1)])
