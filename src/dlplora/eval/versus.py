"""RESULTS.md's sections on the two references of issue 28: DLP-LoRA and the oracle against the multi-task LoRA
baseline (one adapter trained on every task; the harness's ``versus_multitask`` of each setting), and the full
fine-tune bound (``dlp-lora train-full``'s records, kept in results.json under ``full_finetune``) beside LoRA and
base."""

from __future__ import annotations

from pathlib import Path

from ..errors import DLPLoRAError
from .. import stats
from .settings import METHOD_LABELS
from .tables import ci_text, fmt, short


def multitask_lines(results: dict) -> list[str]:
    """Per setting and multi-task adapter: DLP-LoRA − multitask and oracle LoRA − multitask (means over tasks, each
    with its paired 95% interval) and the tasks where each is significantly better or worse (paired sign test)."""
    rows = []
    for sname, s in results.get("settings", {}).items():
        for mt, by in (s.get("versus_multitask") or {}).items():
            for m, v in by.items():
                ci = v.get("ci")
                sig = "yes, above 0" if ci and ci[0] > 0 else "yes, below 0" if ci and ci[1] < 0 else "no"
                rows.append(f"| `{sname}` | {METHOD_LABELS.get(m, m)} − {mt} | {v['diff']:+.2f}{ci_text(ci, 2, True)} | "
                            f"{sig} | {len(v['better_tasks'])} / {len(v['worse_tasks'])} |")
    if not rows:
        return []
    mt_cfg = (results.get("config") or {}).get("multitask") or {}
    about = "; ".join(f"`{n}`: rank {e.get('rank')}, top {e.get('top_layers') or 'all'} layers, {e.get('steps')} "
                      f"steps over {e.get('n_train')} examples, {float(e.get('train_seconds') or 0) / 3600:.2f} h"
                      for n, e in mt_cfg.items())
    return ["## Against the multi-task LoRA baseline", "",
            "One adapter trained on the union of the tasks' training examples (`dlp-lora train-multitask`), merged into "
            f"the weights and used for every prompt ({about}). A difference is over the setting's mean of the tasks' "
            "main figures; its interval resamples the test examples of both methods together (paired); the last "
            "column counts the tasks where the method is significantly better / worse than the multi-task adapter "
            "(paired sign test, 95%).", "",
            "| setting | difference | points | interval excludes 0 | tasks better / worse |", "|---|---|---|---|---|",
            *rows, ""]


def load_full_ft(paths) -> dict[str, dict]:
    """`dlp-lora train-full` records ({task: record}) from their JSON files."""
    from ..paths import read_json

    out = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DLPLoRAError(f"--full-ft {path}: no such file")
        rec = read_json(path, "give the JSON files `dlp-lora train-full` writes")
        if not isinstance(rec, dict) or rec.get("method") != "full fine-tune" or "task" not in rec:
            raise DLPLoRAError(f"--full-ft {path}: not a record written by `dlp-lora train-full`")
        out[rec["task"]] = rec
    return out


def full_ft_lines(results: dict) -> list[str]:
    """The full fine-tune bound per task beside base and the oracle LoRA of the `single` setting (when evaluated),
    with full FT − LoRA and its paired interval on the same test examples."""
    ft = results.get("full_finetune") or {}
    if not ft:
        return []
    single = ((results.get("settings") or {}).get("single") or {}).get("methods") or {}
    lora = (single.get("lora") or {}).get("tasks") or {}
    rows = []
    for t, r in ft.items():
        lo = lora.get(t)
        gap = "–"
        if lo is not None and stats.main_scores(lo) and stats.main_scores(r["test_result"]):
            a, b = stats.main_scores(r["test_result"]), stats.main_scores(lo)
            if len(a) == len(b):
                test = stats.paired_test(a, b)
                gap = f"{r['score'] - lo['main']:+.1f}{ci_text(test.get('diff_ci'), 1, True)}"
        wlt = r.get("wins_losses_ties") or ["–", "–", "–"]
        ch = r.get("chosen") or {}
        rows.append(f"| {short(t)} | {r.get('n_test')} | {(r.get('score_detail') or {}).get('metric', '')} | "
                    f"{fmt(r.get('base_score'))} | {fmt(lo.get('main')) if lo else '–'} | "
                    f"{fmt(r['score'])}{ci_text(r.get('interval'))} | {wlt[0]}–{wlt[1]}, p {r.get('p_value', 1):.3g} | "
                    f"{gap} | {ch.get('lr', 0):g} / {ch.get('examples')} | {float(r.get('train_seconds') or 0):.0f} |")
    return ["## The full fine-tune bound", "",
            "Every weight of the backbone trained on the task's training examples (`dlp-lora train-full`), the "
            "learning rate and the checkpoint chosen on the validation slice the adapters' recipe holds out; scored "
            "on the test split as the adapters are (the first `n` test examples). *Full FT − LoRA* pairs the two on "
            "the same examples (the `single` setting's oracle LoRA).", "",
            "| task | n | metric | base | LoRA | full FT | full FT vs base (wins–losses, p) | full FT − LoRA | "
            "chosen lr / examples | training (s) |", "|---|---|---|---|---|---|---|---|---|---|",
            *rows, ""]
