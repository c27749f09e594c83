"""How one long row slows a decode step of short ones (the attended width is the longest row's), int8 backbone, 2 threads:
PYTHONPATH=src python scripts/probe_attention_width.py"""
import copy, time, torch
from dlplora.backbone import load_backbone
from dlplora.core import DecodeCore
from dlplora.quantize import apply_quantize
torch.set_num_threads(2)
base, tok, info = load_backbone(None, dtype=torch.float32)
apply_quantize(base, "int8")
core = DecodeCore(base, slots=32)
def setlens(lens):
    core.reset(); core.cache.reserve(max(lens) + 2)
    core.cache.lengths[:len(lens)] = list(lens)
def step(b):
    ids = torch.zeros(b, 1, dtype=torch.long)
    before = list(core.cache.lengths[:b])
    core.forward(0, ids)
    core.cache.lengths[:b] = before
for name, lens in (("32 rows at 200", [200]*32), ("31 at 200 + 1 at 1200", [200]*31 + [1200]), ("32 at 1200", [1200]*32), ("32 rows at 64", [64]*32)):
    setlens(lens)
    for _ in range(2): step(32)
    t = time.perf_counter()
    for _ in range(5): step(32)
    print(f"{name}: {(time.perf_counter()-t)/5*1000:.1f} ms/step", flush=True)
