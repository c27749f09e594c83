"""The continuous scheduler at C slots on the bench-serve workload, this tree's against the one at git revision REV,
alternated in one process (the old module loaded from `git show REV:src/dlplora/serve/scheduler.py`):

    PYTHONPATH=src python scripts/probe_scheduler_ab.py REV LIB DATA [C] [N] [REPEATS]
"""
import importlib.util
import subprocess
import sys
from types import SimpleNamespace as NS

import dlplora.serve.scheduler as sched_mod
from dlplora.bench import loadgen
from dlplora.bench.offline import Offline
from dlplora.bench.serve import _prompt_tasks
from dlplora.library import Library

rev, lib, data = sys.argv[1], sys.argv[2], sys.argv[3]
c = int(sys.argv[4]) if len(sys.argv) > 4 else 32
n = int(sys.argv[5]) if len(sys.argv) > 5 else 64
repeats = int(sys.argv[6]) if len(sys.argv) > 6 else 2
src = subprocess.run(["git", "show", f"{rev}:src/dlplora/serve/scheduler.py"], capture_output=True, text=True,
                     check=True).stdout
spec = importlib.util.spec_from_loader("dlplora.serve.scheduler_old", loader=None)
old = importlib.util.module_from_spec(spec)
old.__package__ = "dlplora.serve"
sys.modules[spec.name] = old
exec(compile(src, f"{rev}:scheduler.py", "exec"), old.__dict__)
new_cls = sched_mod.Scheduler
names = Library.open(lib).names
items = loadgen.build_workload({t.name: t.tests for t in _prompt_tasks(data, 26)}, names, n, 0)
off = Offline(NS(model=None, dtype="auto", device="cpu", quantize="auto", threads=2, compile=False, max_tokens=64),
              lib, items)
res: dict = {}
for _ in range(repeats):
    for name, cls in (("this tree", new_cls), (rev, old.Scheduler)):
        sched_mod.Scheduler = cls
        s, rows = off.continuous(c, lambda *a: print(name, *a, flush=True))
        res.setdefault(name, []).append(s["output_tok_s"])
print(res)
print(f"this tree / {rev}: {max(res['this tree']) / max(res[rev]):.3f} (best of {repeats} each)")
