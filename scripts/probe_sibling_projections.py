"""A/B in one process: int8 decode with sibling projections (q/k/v, gate/up) as one product against one by one
(26 random all-linear rank-8 adapters, 2-adapter mixes): PYTHONPATH=src python scripts/probe_sibling_projections.py 1,8,32"""
import copy, sys, time, torch
from dlplora.backbone import load_backbone
from dlplora.engine import DLPLoRA
from dlplora.fusion import LoRAFusion
from dlplora.testing import random_adapter
from dlplora.quantize import apply_quantize
from dlplora.core import core_for
torch.set_num_threads(2)
targets = ("q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj")
base, tok, info = load_backbone(None, dtype=torch.float32)
ads = [random_adapter(base, f"r{i}", rank=8, seed=i, targets=targets) for i in range(26)]
net = copy.deepcopy(base)
eng = DLPLoRA(net, tok, LoRAFusion(net, ads)); apply_quantize(net, "int8"); eng.eos_ids = []
text = "The quick brown fox jumps over the lazy dog. " * 12
core = core_for(net)
orig = core._group
def unfused(*a):
    g = orig(*a)
    return g[:2] + (None,) + g[3:]
def gen(bs, n):
    sets = [{"r0": 0.6, "r1": 0.4}] if bs == 1 else [{f"r{i % 26}": 0.5, f"r{(i + 1) % 26}": 0.5} for i in range(bs)]
    return eng.generate([text] * bs, adapters=sets, max_new_tokens=n, raw=True)
res = {}
for bs in [int(x) for x in sys.argv[1].split(",")]:
    for rep in range(3):
        for name, fn in (("fused", orig), ("unfused", unfused)):
            core._group = fn; core._groups = {}
            gen(bs, 2)
            t0 = time.perf_counter(); o1 = gen(bs, 1); t1 = time.perf_counter(); o2 = gen(bs, 33); t2 = time.perf_counter()
            dt = (t2 - t1) - (t1 - t0)
            res.setdefault((bs, name), []).append(32 * bs / dt)
            res.setdefault((bs, name, "out"), o2)
    f, u = max(res[(bs, "fused")]), max(res[(bs, "unfused")])
    same = res[(bs, "fused", "out")] == res[(bs, "unfused", "out")]
    print(f"batch {bs}: fused {f:.1f} tok/s, one by one {u:.1f} tok/s, ratio {f/u:.3f}, same tokens: {same}", flush=True)
