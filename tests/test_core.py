"""The decoding core (static slot KV cache) against the HF forward pass and PEFT, and the server's slot scheduler."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from dlplora.core import DecodeCore, core_for, unsupported_reason
from dlplora.decoding import decode_loop
from dlplora.engine import DLPLoRA
from dlplora.errors import DLPLoRAError
from dlplora.fusion import LoRAFusion, load_peft_adapter
from dlplora.kvcache import SlotKVCache
from dlplora.serve.config import ServeConfig
from dlplora.serve.metrics import Metrics
from dlplora.serve.scheduler import GenRequest, Scheduler
from dlplora.testing import random_peft_library, tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = {"a": (4, 8, ["q_proj", "v_proj"]), "b": (8, 8, ["q_proj", "v_proj", "down_proj"]), "c": (2, 4, ["o_proj"])}
ROWS = [list(range(5, 12)), [12, 13, 14], list(range(20, 61)), [7]]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    d = tiny_model_dir(tmp_path_factory.mktemp("core") / request.param, arch=request.param)
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def lib(tiny_model, tmp_path_factory):
    return random_peft_library(tmp_path_factory.mktemp("corelib") / "lib", tiny_model, SPECS, std=0.5, seed=3)


def _hf_last_logits(model, row):
    with torch.no_grad():
        return model(torch.tensor([row])).logits[0, -1]


def test_prefill_in_chunks_and_decode_steps_match_the_hf_forward_pass(model):
    core = DecodeCore(model, slots=len(ROWS))
    logits = core.prefill(0, ROWS, chunk=8)  # rows of 1..41 tokens, in chunks of 8, right-padded together
    for i, r in enumerate(ROWS):
        torch.testing.assert_close(logits[i], _hf_last_logits(model, r), atol=1e-5, rtol=1e-5)
    seqs = [list(r) for r in ROWS]
    for _ in range(3):  # decode steps: every row at its own position
        nxt = logits.argmax(-1)
        for s, t in zip(seqs, nxt.tolist()):
            s.append(t)
        logits = core.forward(0, nxt[:, None])
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i], _hf_last_logits(model, s), atol=1e-5, rtol=1e-5)
    assert core.cache.lengths[:len(ROWS)] == [len(s) for s in seqs]


def test_decode_loop_on_the_core_matches_the_hf_path(model):
    eos = [-1]
    on_core = decode_loop(model, ROWS, [6, 3, 9, 1], eos, pad_id=0)
    assert core_for(model) is not None
    on_hf = decode_loop(model, ROWS, [6, 3, 9, 1], eos, pad_id=0, forward_kwargs={"output_attentions": False})
    assert on_core == on_hf
    assert [len(g) for g in on_core[0]] == [6, 3, 9, 1]


def test_a_row_moved_to_another_slot_decodes_on_unchanged(model):
    core = DecodeCore(model, slots=3)
    core.prefill(0, [ROWS[0], ROWS[1], ROWS[2]])
    core.cache.move(2, 0)  # row 0 leaves; the last row takes its slot
    assert core.cache.lengths[:3] == [len(ROWS[2]), len(ROWS[1]), 0]
    got = core.forward(0, torch.tensor([[9], [9]]))
    torch.testing.assert_close(got[0], _hf_last_logits(model, ROWS[2] + [9]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], _hf_last_logits(model, ROWS[1] + [9]), atol=1e-5, rtol=1e-5)


def test_the_cache_grows_in_place_and_refuses_what_the_context_cannot_hold(model):
    core = DecodeCore(model, slots=1, max_len=300)
    row = list(range(3, 200))  # past the first 128 positions: the cache grows, keeping what it holds
    torch.testing.assert_close(core.prefill(0, [row], chunk=100)[0], _hf_last_logits(model, row), atol=1e-5, rtol=1e-5)
    assert core.cache.capacity >= 200
    with pytest.raises(DLPLoRAError, match="does not fit the model's context of 300"):
        core.forward(0, torch.zeros(1, 120, dtype=torch.long))
    with pytest.raises(DLPLoRAError, match="empty prompt"):
        core.prefill(0, [[]])
    with pytest.raises(DLPLoRAError, match="outside the cache"):
        core.forward(1, torch.zeros(1, 1, dtype=torch.long))
    cache = SlotKVCache(1, 2, 1, 4, 1000, torch.float32, "cpu")
    assert cache.capacity == 128
    cache.reserve(129)
    assert cache.capacity == 256


def test_a_peft_model_runs_on_the_core_with_its_own_lora_layers(tiny_model, lib):
    from peft import PeftModel

    net = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    pm = PeftModel.from_pretrained(net, str(lib / "adapters" / "b")).eval()
    assert unsupported_reason(pm) is None and core_for(pm).model is pm.get_base_model()
    on_core = decode_loop(pm, ROWS, 5, [-1], pad_id=0)
    on_hf = decode_loop(pm, ROWS, 5, [-1], pad_id=0, forward_kwargs={"output_attentions": False})
    assert on_core == on_hf
    with pytest.raises(DLPLoRAError, match="cannot run this model: model type 'gpt2'"):
        from transformers import GPT2Config, GPT2LMHeadModel

        DecodeCore(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))


def test_slots_mode_equals_peft_and_the_per_row_mode(tiny_model, lib):
    """Each slot holds its own set; a forward pass over the slots gives what PEFT gives each set alone."""
    from peft import PeftModel

    net = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    fusion = LoRAFusion(net, [load_peft_adapter(lib / "adapters" / n, n) for n in SPECS])
    core = DecodeCore(net, slots=3)
    fusion.init_slots(3)
    sets = [{"a": 1.0}, {"b": 0.3, "c": 0.7}, {}]
    for i, s in enumerate(sets):
        fusion.set_slot(i, s)
    rows = ROWS[:3]
    fusion.use_slots(0, 3)
    got = core.prefill(0, rows, chunk=16)
    for i, (r, st) in enumerate(zip(rows, sets)):  # each row alone through the HF pass, with its set
        with fusion.routing([st], mode="unmerged"):
            torch.testing.assert_close(got[i], _hf_last_logits(net, r), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], _hf_last_logits(net, rows[2]), atol=1e-5, rtol=1e-5)  # {}: the base model
    fusion.unfuse()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    pm = PeftModel.from_pretrained(ref, str(lib / "adapters" / "a")).eval()
    torch.testing.assert_close(got[0], _hf_last_logits(pm, rows[0]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_sibling_projections_run_as_one_product_with_equal_results(arch, tmp_path):
    """With int8 bases, q/k/v and gate/up each run as one concatenated product (plus each fused layer's own delta);
    the logits equal those of the projections run one by one, bit for bit (qwen2: q/k/v with biases)."""
    from dlplora.quantize import apply_quantize

    d = tiny_model_dir(tmp_path / arch, arch=arch)
    net = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    specs = {"a": (4, 8, ["q_proj", "v_proj", "up_proj"]), "b": (8, 8, ["k_proj", "gate_proj", "down_proj"])}
    lib8 = random_peft_library(tmp_path / "lib", d, specs, std=0.5, seed=3)
    fusion = LoRAFusion(net, [load_peft_adapter(lib8 / "adapters" / n, n) for n in specs])
    apply_quantize(net, "int8")
    core = DecodeCore(net, slots=3)
    fusion.init_slots(3)
    for i, s in enumerate([{"a": 1.0}, {"a": 0.4, "b": 0.6}, {}]):
        fusion.set_slot(i, s)
    fusion.use_slots(0, 3)

    def run():
        core.reset()
        out = [core.prefill(0, ROWS[:3], chunk=16)]
        nxt = out[0].argmax(-1)
        for _ in range(3):
            out.append(core.forward(0, nxt[:, None]))
            nxt = out[-1].argmax(-1)
        return torch.stack(out)

    fused = run()
    groups = core._groups
    assert len(groups) == 2 * len(core.layers) and all(g[2] is not None for g in groups.values())
    real = core._group
    core._group = lambda *a: real(*a)[:2] + (None,) + real(*a)[3:]  # the projections one by one
    assert torch.equal(fused, run())
    assert core.forward(0, torch.tensor([[1], [2], [3]])).shape[0] == 3  # and unfused layers still run


def test_slot_table_errors_name_the_problem(tiny_model, lib):
    net = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    fusion = LoRAFusion(net, [load_peft_adapter(lib / "adapters" / "a", "a")])
    with pytest.raises(DLPLoRAError, match="call init_slots first"):
        fusion.set_slot(0, {"a": 1.0})
    fusion.init_slots(2)
    with pytest.raises(DLPLoRAError, match="outside the slot table"):
        fusion.use_slots(1, 2)
    with pytest.raises(DLPLoRAError, match="unknown adapter 'zz'"):
        fusion.set_slot(0, {"zz": 1.0})
    with pytest.raises(DLPLoRAError, match="finite and non-negative"):
        fusion.set_slot(0, {"a": -1.0})


def _run_scheduler(engine, bodies, prefill_chunk):
    config = ServeConfig(max_batch_size=4, max_queue=64, prefill_chunk=prefill_chunk)
    sched = Scheduler(engine, config, Metrics(), threading.Lock()).start()
    done = {}
    events = []
    try:
        reqs = []
        for i, (ids, adapters, max_new) in enumerate(bodies):
            ev = threading.Event()

            def emit(kind, payload, i=i, ev=ev):
                if kind == "done":
                    done[i] = payload["token_ids"]
                if kind in ("done", "error"):
                    events.append((i, kind, payload))
                    ev.set()
            reqs.append((GenRequest(ids=ids, adapters=adapters, max_new=max_new, emit=emit), ev))
        for r, _ in reqs:
            sched.submit(r)
        for _, ev in reqs:
            assert ev.wait(60)
    finally:
        sched.stop()
    assert all(kind == "done" for _, kind, _ in events), events
    return [done[i] for i in range(len(bodies))], sched


def test_the_slot_scheduler_with_chunked_prefill_matches_solo_generation(lib):
    """10 requests through 4 slots: rows join by chunks of 8 prompt tokens while others decode, leave from the
    middle of the block, and their slots are reused; every output equals the engine's solo generation."""
    engine = DLPLoRA.from_library(lib)
    sets = [{"a": 1.0}, {"b": 0.5, "c": 0.5}, {}, {"c": 1.0}, {"a": 0.2, "b": 0.8}]
    bodies = []
    for i in range(10):
        ids = engine.tokenizer(f"The quick brown fox {i} " * (1 + i % 4), add_special_tokens=False)["input_ids"]
        bodies.append((ids, sets[i % len(sets)], 3 + (7 * i) % 11))
    chunks = []
    real = DecodeCore.prefill_chunk

    def spy(core, first, parts):
        chunks.append([len(p) for p in parts])
        return real(core, first, parts)

    DecodeCore.prefill_chunk = spy
    try:
        got, sched = _run_scheduler(engine, bodies, prefill_chunk=8)
    finally:
        DecodeCore.prefill_chunk = real
    assert max(len(b[0]) for b in bodies) > 16  # some prompts took several chunks
    # a chunk covers only the rows with prompt tokens left (the group sorted longest first): none rides along empty
    assert chunks and all(n > 0 for c in chunks for n in c)
    for (ids, adapters, max_new), tokens in zip(bodies, got):
        with engine.lock:
            engine.fusion.set_routing([adapters], mode="unmerged")
            try:
                solo, _ = decode_loop(engine.model, [ids], max_new, engine.eos_ids, engine.tokenizer.pad_token_id)
            finally:
                engine.fusion.clear()
        assert tokens == solo[0], (adapters, max_new)
    assert sched.rows == [] and sched.joining == [] and sched.core.cache.lengths == [0] * 4
