"""A live fusion: adapters added to and removed from the stacks between forward passes (LoRAFusion.add_adapter /
remove_adapter), against a fusion built with the final set, and the slots of rows in flight across changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlplora.errors import DLPLoRAError
from dlplora.fusion import FusedLoRALinear, LoRAFusion
from dlplora.testing import random_adapter
from dlplora.testing import tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (rank, targets): c adds o_proj (a new fused layer), d k_proj / down_proj and a rank above the others'
SPECS = {"a": (4, ("q_proj", "v_proj")), "b": (8, ("q_proj", "v_proj")), "c": (2, ("q_proj", "o_proj")),
         "d": (12, ("k_proj", "v_proj", "down_proj"))}


def _model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _adapters(model):
    return {n: random_adapter(model, n, rank=r, targets=t, seed=i, std=0.2) for i, (n, (r, t)) in enumerate(SPECS.items())}


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(0)
    return torch.randint(3, 400, (2, 10))


@torch.inference_mode()
def _logits(model, ids):
    return model(input_ids=ids).logits


def _routed(model, fusion, sets, ids):
    with fusion.routing(sets, mode="unmerged"):
        return _logits(model, ids)


def test_added_and_removed_adapters_equal_a_fusion_built_with_the_final_set(tiny_model, ids):
    model, fresh_model = _model(tiny_model), _model(tiny_model)
    ads = _adapters(model)
    fusion = LoRAFusion(model, [ads["a"], ads["b"]])
    fusion.add_adapter(ads["c"])
    fusion.add_adapter(ads["d"])
    assert fusion.names == ["a", "b", "c", "d"] and "o_proj" in " ".join(fusion.layers)
    sets = [{"a": 0.3, "c": 0.7}, {"b": 0.5, "d": 0.5}]
    fresh = LoRAFusion(fresh_model, [ads[n] for n in "abcd"])
    torch.testing.assert_close(_routed(model, fusion, sets, ids), _routed(fresh_model, fresh, sets, ids),
                               atol=1e-6, rtol=0)
    fresh.unfuse()

    fusion.remove_adapter("b")  # indices of c and d shift down by one
    assert fusion.names == ["a", "c", "d"] and fusion.index("d") == 2
    sets = [{"a": 0.3, "c": 0.7}, {"d": 1.0}]
    fresh = LoRAFusion(fresh_model, [ads[n] for n in "acd"])
    torch.testing.assert_close(_routed(model, fusion, sets, ids), _routed(fresh_model, fresh, sets, ids),
                               atol=1e-6, rtol=0)
    fresh.unfuse()

    fusion.remove_adapter("c")  # the only one on o_proj: those layers are plain linears again
    o_proj = model.model.layers[0].self_attn.o_proj
    assert type(o_proj) is nn.Linear and not any(k.endswith("o_proj") for k in fusion.layers)
    fresh = LoRAFusion(fresh_model, [ads[n] for n in "ad"])
    sets = [{"a": 1.0}, {"a": 0.4, "d": 0.6}]
    torch.testing.assert_close(_routed(model, fusion, sets, ids), _routed(fresh_model, fresh, sets, ids),
                               atol=1e-6, rtol=0)
    fusion.unfuse()
    fresh.unfuse()
    assert torch.equal(_logits(model, ids), _logits(fresh_model, ids))  # the base weights were never touched


def test_slots_in_flight_keep_their_set_across_loads_and_unloads(tiny_model, ids):
    model = _model(tiny_model)
    ads = _adapters(model)
    fusion = LoRAFusion(model, [ads["a"], ads["b"]])
    fusion.init_slots(4, table="server")
    fusion.set_slot(0, {"a": 0.5, "b": 0.5}, table="server")
    fusion.set_slot(1, {"b": 1.0}, table="server")
    fusion.use_slots(0, 2, table="server")
    before = _logits(model, ids)
    fusion.add_adapter(ads["c"])  # a new layer (o_proj) gets empty slots: no set in flight uses c
    fusion.add_adapter(ads["d"])  # r_max grows
    assert torch.equal(_logits(model, ids), before)
    fusion.remove_adapter("a")  # slot 0 uses a: its gathered copy survives (q/v stay fused for b)
    assert torch.equal(_logits(model, ids), before)
    fusion.set_slot(2, {"b": 1.0}, table="server")  # b is now index 0: names are mapped at gather time
    fusion.set_slot(3, {"c": 1.0}, table="server")
    fusion.use_slots(1, 3, table="server")
    out = _logits(model, ids[:1].expand(3, -1))
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=0)
    assert not torch.allclose(out[0], out[2], atol=1e-4)


def test_changes_are_refused_while_a_routing_is_set_and_leave_the_fusion_as_it_was(tiny_model, tmp_path, ids):
    model = _model(tiny_model)
    ads = _adapters(model)
    fusion = LoRAFusion(model, [ads["a"], ads["b"]])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fusion.set_routing([{"a": 1.0}], mode="merged")  # the delta is in the weights until clear()
    with pytest.raises(DLPLoRAError, match="merged routing is set"):
        fusion.add_adapter(ads["c"])
    with pytest.raises(DLPLoRAError, match="merged routing is set"):
        fusion.remove_adapter("b")
    fusion.clear()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())

    with pytest.raises(DLPLoRAError, match="already loaded"):
        fusion.add_adapter(ads["a"])
    other = _model(tiny_model_dir(tmp_path / "other", hidden=32))
    stacks = {k: layer.A.shape for k, layer in fusion.layers.items()}
    with pytest.raises(DLPLoRAError, match="do not fit the model's layer"):
        fusion.add_adapter(random_adapter(other, "wrong", targets=("q_proj", "o_proj")))
    assert fusion.names == ["a", "b"] and {k: layer.A.shape for k, layer in fusion.layers.items()} == stacks
    assert all(isinstance(m, FusedLoRALinear) == k.endswith(("q_proj", "v_proj"))
               for k, m in model.named_modules() if k.endswith("_proj"))
    with pytest.raises(DLPLoRAError, match="unknown adapter"):
        fusion.remove_adapter("zz")
    fusion.remove_adapter("a")
    fusion.remove_adapter("b")  # the last one too (as vLLM allows): the base model, no layer wrapped
    assert fusion.names == [] and fusion.layers == {} and not any(isinstance(m, FusedLoRALinear)
                                                                  for m in model.modules())
    plain = {k.replace(".base.", "."): v for k, v in base.items()}  # the fused layers' base weights, unwrapped
    assert all(torch.equal(v, plain[k]) for k, v in model.state_dict().items())
    fusion.add_adapter(ads["a"])  # and it takes adapters again
    assert fusion.names == ["a"]


def test_with_every_adapter_removed_a_slot_still_refuses_an_unknown_adapter(tiny_model):
    """An empty fusion serves every slot as the base model, but a set naming an adapter it lacks is an error (the
    scheduler's guard), not silently the base model."""
    model = _model(tiny_model)
    fusion = LoRAFusion(model, list(_adapters(model).values())[:1])
    fusion.init_slots(2)
    fusion.remove_adapter(fusion.names[0])
    assert not fusion.layers
    fusion.set_slot(0, {})
    with pytest.raises(DLPLoRAError, match="unknown adapter 'ghost'"):
        fusion.set_slot(1, {"ghost": 1.0})
