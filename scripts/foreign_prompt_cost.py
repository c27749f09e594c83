"""Issue 29: what a foreign prompt costs when the router gives it an adapter. Each adapter of LIB, pinned at weight 1,
answers the test prompts of the tasks in DATA that LIB has no adapter for, against the base model on the same prompts
(the eval harness's predictions and metrics; resumable: predictions are cached under OUT).

    PYTHONPATH=src python scripts/foreign_prompt_cost.py LIB DATA OUT [--limit N] [--dtype auto]

Prints per adapter the mean per-example main score (accuracy for multiple choice, ROUGE-L or exact match for
generation, all on a 0-100 scale) minus base's, with its paired 95% bootstrap interval and the sign test, over all foreign prompts, and
writes OUT/foreign_cost.json.
"""
import argparse
import json
from pathlib import Path

from dlplora.engine import DLPLoRA
from dlplora.eval.cache import PredictionCache, adapters_signature, precision_tag
from dlplora.eval.harness import run_method_items
from dlplora.eval.metrics import task_metrics
from dlplora.eval.runners import FusedRunner
from dlplora.library import Library
from dlplora.stats import main_scores, paired_test
from dlplora.tasks import TASKS, load_split

ap = argparse.ArgumentParser()
ap.add_argument("library")
ap.add_argument("data")
ap.add_argument("out")
ap.add_argument("--limit", type=int, default=20)
ap.add_argument("--dtype", default="auto")
args = ap.parse_args()
lib = Library.open(args.library)
names = lib.names
foreign = [t for t in TASKS if t not in names and (Path(args.data) / t).is_dir()]
engine = DLPLoRA.from_library(lib.root, dtype=args.dtype)
runner = FusedRunner(engine)
cache = PredictionCache(Path(args.out) / "cache")
items = [{"uid": f"{t}/{ex.get('id', i)}", "task": t, "ex": ex, "history": []}
         for t in foreign for i, ex in enumerate(load_split(args.data, t, "test")[:args.limit])]
print(f"{len(names)} adapters ({', '.join(names)}); {len(foreign)} foreign tasks, {len(items)} prompts; "
      f"{engine.model.dtype}", flush=True)


def scores(sets, key):
    preds = run_method_items(runner, key, items, [sets] * len(items), cache, key + precision_tag(engine),
                             choice_gen=False, desc=key)
    out = {}
    for t in foreign:
        idx = [i for i, it in enumerate(items) if it["task"] == t]
        out[t] = main_scores(task_metrics(t, [items[i] for i in idx], [preds[i] for i in idx])) or []
    return out


base = scores({}, "base")
report = {"library": str(lib.root), "foreign_tasks": foreign, "limit": args.limit, "adapters": {}}
for n in names:
    got = scores({n: 1.0}, f"pinned-{adapters_signature(lib, [n])}")
    a = [x for t in foreign for x in got[t]]
    b = [x for t in foreign for x in base[t]]
    test = paired_test(a, b)
    per_task = {t: round((sum(got[t]) - sum(base[t])) / max(1, len(got[t])), 2) for t in foreign}
    report["adapters"][n] = {"diff_points": round(test["diff"], 2),
                             "ci_points": [round(x, 2) for x in test["diff_ci"]], "wins": test["wins"],
                             "losses": test["losses"], "p": test["p"], "per_task_points": per_task}
    print(f"{n}: {test['diff']:+.2f} points [{test['diff_ci'][0]:+.2f}, {test['diff_ci'][1]:+.2f}] "
          f"over {test['n']} foreign prompts ({test['wins']} wins, {test['losses']} losses, p {test['p']:.3f})",
          flush=True)
Path(args.out, "foreign_cost.json").write_text(json.dumps(report, indent=1))
