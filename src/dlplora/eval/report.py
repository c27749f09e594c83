"""The report: OUT/results.json, OUT/RESULTS.md (tables in the paper's style, the paper's claims and its Qwen-2 1.5B
numbers beside ours, 95% intervals, adapter vs base paired tests) and OUT/figures/*.png.

A results.json written before per-example scores were kept (format 1) still renders: its intervals and paired
tests are left blank."""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

from ..errors import DLPLoRAError
from ..library import training_seconds
from .. import stats
from . import paper
from .settings import METHOD_LABELS
from .tables import ci_text, fmt, fmt_ci, method_order, p_sweep_lines, setting_lines, short
from .versus import full_ft_lines, load_full_ft, multitask_lines

# The paper's headline claims, as the project brief and the paper's abstract (arXiv 2410.01497v2) state them. Its
# per-task numbers (Qwen-2 1.5B) are in :mod:`.paper`; the per-task tables set them beside ours.
PAPER_CLAIMS = {
    "plugin_accuracy": 98.45,  # % over 26 tasks
    "gap_to_lora": 0.35,  # "within 0.35% of the oracle single LoRA"
    "time_ratio_max": 2.0,  # "less than 2x the time of single-LoRA inference"
    "time_ratio_avg": (1.18, 1.24),
    "mcq_accuracy": 91.9,  # abstract v2, average over the multiple-choice tasks (backbone not stated)
    "qa_bleu_rouge": (54.1, 43.5, 40.8),  # abstract v2: BLEU, ROUGE-1, ROUGE-L on the QA tasks
}


def _claims_lines(results: dict) -> list[str]:
    """'Against the paper's claims': each claim, the paper's figure, ours (computed from this run), and whether
    ours meets it. Rows whose inputs were not evaluated are left out."""
    st = results.get("settings", {})

    def m(setting, method):
        return ((st.get(setting) or {}).get("methods") or {}).get(method)

    rows = []
    plug = (results.get("config") or {}).get("plugin") or {}
    acc = (plug.get("report") or {}).get("accuracy")
    if acc is not None:
        rows.append(("plugin routing accuracy, held-out training prompts of every task (%)",
                     f"{PAPER_CLAIMS['plugin_accuracy']}", f"{100 * acc:.2f}", 100 * acc >= PAPER_CLAIMS["plugin_accuracy"]))
    for setting in ("composite-26", "composite-17", "composite-9", "multiturn"):
        d, lo, b = m(setting, "dlp"), m(setting, "lora"), m(setting, "base")
        if d and "router_accuracy" in d and setting != "multiturn":
            rows.append((f"router picks the true task, `{setting}` test stream (%)", f"{PAPER_CLAIMS['plugin_accuracy']}",
                         f"{d['router_accuracy']:.2f}", d["router_accuracy"] >= PAPER_CLAIMS["plugin_accuracy"]))
        if d and lo:
            gap = d["mean"] - lo["mean"]
            rows.append((f"DLP-LoRA mean minus oracle LoRA mean, `{setting}` (points)", f"≥ -{PAPER_CLAIMS['gap_to_lora']}",
                         f"{gap:+.2f}{ci_text(_gap_ci(d, lo), signed=True)}", gap >= -PAPER_CLAIMS["gap_to_lora"]))
            if lo.get("seconds"):
                r = d["seconds"] / lo["seconds"]
                rows.append((f"DLP-LoRA time / oracle LoRA time, `{setting}`",
                             f"< {PAPER_CLAIMS['time_ratio_max']:g} (avg {PAPER_CLAIMS['time_ratio_avg'][0]}–"
                             f"{PAPER_CLAIMS['time_ratio_avg'][1]})", f"{r:.2f}x", r < PAPER_CLAIMS["time_ratio_max"]))
        if d and b:
            gain = d["mean"] - b["mean"]
            rows.append((f"DLP-LoRA mean minus base mean, `{setting}` (points)", "> 0 (gains over base)",
                         f"{gain:+.2f}{ci_text(_gap_ci(d, b), signed=True)}", gain > 0))
        for mt, vs in ((st.get(setting) or {}).get("versus_multitask") or {}).items():
            if "dlp" in vs:  # issue 28's stretch goal: routing ahead of one adapter trained on every task
                ci = vs["dlp"].get("ci")
                rows.append((f"DLP-LoRA mean minus {mt} (one LoRA on every task) mean, `{setting}` (points)",
                             "> 0, interval above 0 (not a paper claim: issue 28)",
                             f"{vs['dlp']['diff']:+.2f}{ci_text(ci, signed=True)}", bool(ci and ci[0] > 0)))
    d17 = m("composite-17", "dlp")
    if d17:
        rows.append(("mean accuracy, multiple-choice tasks, `composite-17` (%)",
                     f"{PAPER_CLAIMS['mcq_accuracy']} (7B-8B and 1.5B backbones)",
                     f"{d17['mean']:.2f}{ci_text(d17.get('mean_ci'))}",
                     d17["mean"] >= PAPER_CLAIMS["mcq_accuracy"]))
    d9 = m("composite-9", "dlp")
    if d9:
        ts = [r for r in d9["tasks"].values() if "bleu" in r]
        if ts:
            ours = [sum(r[k] for r in ts) / len(ts) for k in ("bleu", "rouge1", "rougeL")]
            cis = [stats.mean_interval(ts, k) for k in ("bleu", "rouge1", "rougeL")]
            claim = PAPER_CLAIMS["qa_bleu_rouge"]
            rows.append(("BLEU / ROUGE-1 / ROUGE-L, generative tasks, `composite-9` (greedy generation)",
                         " / ".join(f"{x}" for x in claim),
                         " / ".join(f"{x:.1f}{ci_text(c)}" for x, c in zip(ours, cis)),
                         all(o >= q for o, q in zip(ours, claim))))
    if not rows:
        return []
    out = ["## Against the paper's claims", "",
           "The paper's figures are its headline claims (the project brief; the abstract of arXiv 2410.01497v2), "
           "measured on 1.5B–8B backbones with its own scoring; ours come from this run on the backbone above "
           "(a difference's interval resamples the test examples of both methods together, pairing them).", "",
           "| claim | paper | ours | met |", "|---|---|---|---|"]
    out += [f"| {c} | {p} | {o} | {'yes' if ok else 'no'} |" for c, p, o, ok in rows]
    return out + [""]


def _gap_ci(a: dict, b: dict) -> list[float] | None:
    """The paired interval of method a's mean over tasks minus method b's (same setting, same examples)."""
    return stats.paired_mean_interval([a["tasks"][t] for t in a["tasks"]], [b["tasks"].get(t, {}) for t in a["tasks"]])


def _paper_composite_lines(results: dict) -> list[str]:
    """The paper's Table 3 (Qwen-2 1.5B composites) beside ours, and the averages of its Tables 1 and 2."""
    st = results.get("settings", {})
    rows = []
    for setting, by_method in paper.COMPOSITES.items():
        ours_ms = (st.get(setting) or {}).get("methods") or {}
        if not ours_ms:
            continue
        for pm, figs in by_method.items():
            ours = ours_ms.get(paper.OUR_METHOD[pm])
            label = f"{paper.METHOD_LABELS[pm]} / {METHOD_LABELS.get(paper.OUR_METHOD[pm])}"
            if "accuracy" in figs:
                cell = f"{ours['mean']:.2f}{ci_text(ours.get('mean_ci'))}" if ours else "–"
                rows.append(f"| `{setting}` | {label} | accuracy (%) | {figs['accuracy']:.2f} | {cell} |")
            else:
                keys = ("bleu", "rouge1", "rougeL")
                ts = [r for r in (ours or {}).get("tasks", {}).values() if "bleu" in r]
                cell = " / ".join(f"{sum(r[k] for r in ts) / len(ts):.1f}{ci_text(stats.mean_interval(ts, k))}"
                                  for k in keys) if ts else "–"
                rows.append(f"| `{setting}` | {label} | BLEU / ROUGE-1 / ROUGE-L | "
                            f"{' / '.join(f'{figs[k]:.2f}' for k in keys)} | {cell} |")
    if not rows:
        return []
    av = paper.AVERAGES
    return [f"## The paper's composites ({paper.BACKBONE}) beside ours", "",
            f"The paper's column is its Table 3 on {paper.BACKBONE} ({paper.ARXIV}); ours is this run on the backbone "
            "above. Our composite-17 figure is the mean of each task's main figure (exact match for DisflQA and "
            "ObjCount, accuracy elsewhere).", "",
            f"| setting | method (paper / ours) | figure | paper, {paper.BACKBONE} | ours |", "|---|---|---|---|---|",
            *rows, "",
            f"The paper's printed per-task averages on {paper.BACKBONE}: accuracy over its 17 multiple-choice tasks "
            f"Basic {av['accuracy']['basic']:.2f}, LoRA {av['accuracy']['lora']:.2f} (Table 1); BLEU / ROUGE-1 / "
            f"ROUGE-L over its 9 QA tasks Basic {av['bleu']['basic']:.2f} / {av['rouge1']['basic']:.2f} / "
            f"{av['rougeL']['basic']:.2f}, LoRA {av['bleu']['lora']:.2f} / {av['rouge1']['lora']:.2f} / "
            f"{av['rougeL']['lora']:.2f} (Table 2).", ""]


def _evaluated_settings(results: dict):
    """(setting name, its entry, its methods, their display order) for every setting that has results."""
    for sname, s in results.get("settings", {}).items():
        ms = s.get("methods") or {}
        if ms:
            yield sname, s, ms, method_order(ms)


def format_results_md(results: dict, preamble: str = "") -> str:
    """RESULTS.md: the run's configuration, the paper's claims beside ours, the summary, one section per setting,
    the effect of p, and where the predictions are cached."""
    lines = (_header_lines(results, preamble) + _claims_lines(results) + _paper_composite_lines(results)
             + _summary_lines(results) + multitask_lines(results) + full_ft_lines(results))
    for sname, s, ms, order in _evaluated_settings(results):
        lines += setting_lines(sname, s, ms, order, (results.get("figures") or {}).get(sname))
    lines += p_sweep_lines(results.get("p_sweep"))
    lines += training_lines((results.get("reproduce") or {}).get("adapters"))
    c = results.get("cache") or {}
    lines += [f"Predictions cached in `{c.get('dir')}` ({c.get('new_predictions', 0)} computed in this run, "
              f"{c.get('hits', 0)} reused); this run took {results.get('run_seconds', 0):.0f}s."
              + (f" The grid's {c['grid']['predictions']} predictions (p sweep excluded) took "
                 f"{c['grid']['compute_seconds'] / 60:.1f} min of compute in all, counted from the time recorded with "
                 f"each, whichever run computed it (model loading and report writing not included)."
                 if c.get("grid") else ""), ""]
    return "\n".join(lines)


def training_lines(adapters: dict | None) -> list[str]:
    """The adapters' training, one row each from library.json (reproduce records it): examples seen, tokens,
    wall time, tokens per second, first and last training loss; the total, and the whole library's tokens at the
    median rate (what the library would take on an idle machine, if some adapters shared the CPU)."""
    if not adapters:
        return []
    lines = ["## Adapter training", "",
             "Per adapter, from `library.json` (wall time includes the cached bottom layers' pass; a machine shared "
             "with other jobs inflates it).", "",
             "| task | examples seen | tokens | wall (s) | tokens/s | loss first → last |", "|---|---|---|---|---|---|"]
    for name, e in adapters.items():
        lines.append(f"| {short(name)} | {e.get('examples_seen', '–')} | {e.get('tokens', 0):,} | "
                     f"{float(e.get('wall_seconds') or 0):.0f} | {float(e.get('tokens_per_second') or 0):.0f} | "
                     f"{e.get('first_loss', float('nan')):.3f} → {e.get('final_loss', float('nan')):.3f} |")
    wall = training_seconds(adapters)
    tokens = sum(int(e.get("tokens") or 0) for e in adapters.values())
    rates = [float(e["tokens_per_second"]) for e in adapters.values() if e.get("tokens_per_second")]
    median = statistics.median(rates) if rates else 0.0
    lines += [f"| **total** | | **{tokens:,}** | **{wall:.0f}** ({wall / 3600:.2f} h) | | |", ""]
    if median:
        lines += [f"At the median rate ({median:.0f} tokens/s) the library's {tokens:,} tokens take "
                  f"{tokens / median / 3600:.2f} h.", ""]
    return lines


def _has_per_example(results: dict) -> bool:
    """Whether any task result of the run carries per-example scores (results.json format 2 on)."""
    return any(r.get("per_example") for s in results.get("settings", {}).values()
               for e in (s.get("methods") or {}).values() for r in e.get("tasks", {}).values())


def _header_lines(results: dict, preamble: str) -> list[str]:
    cfg = results.get("config", {})
    bb = cfg.get("backbone") or {}
    lines = ["# DLP-LoRA evaluation results", ""]
    if preamble:
        lines += [preamble.strip(), ""]
    lines += [
        "Every number of ours was measured by the command shown. The columns headed *paper* are the paper's own "
        f"numbers ({paper.SOURCE}; its {paper.BACKBONE} columns Basic / LoRA / DLP-LoRA), set beside ours for "
        f"reference only: they were measured on its backbone ({paper.BACKBONE}), with its adapters and its "
        "scoring, and never enter our means.", "",
        "| setting | value |", "|---|---|",
        f"| backbone | {bb.get('name', '?')} ({bb.get('params', 0) / 1e6:.0f}M parameters) |" if bb else "| backbone | ? |",
        f"| adapters | {len(cfg.get('adapters', []))}: {', '.join(cfg.get('adapters', []))} |",
        f"| test examples per task | {cfg.get('limit') or 'all (up to 100)'} |",
        f"| DLP top-p | p = {cfg.get('p')}; weightings: {', '.join(cfg.get('weightings', []))} "
        f"(`dlp` = the paper's softmax over the kept probabilities, `dlp-renorm` = probabilities renormalised) |",
        f"| Arrow | PEFT's Arrow router, top-k {cfg.get('arrow', {}).get('top_k')}, temperature "
        f"{cfg.get('arrow', {}).get('temperature')}, per token and per layer, training-free |",
        f"| Merge-all | {cfg.get('merge_all', '')} |",
        *([f"| TIES merge | PEFT `add_weighted_adapter(combination_type='ties', density={cfg['ties']['density']:g})` "
           f"over every adapter, weight 1 each, merged into the weights |"] if cfg.get("ties") and "ties" in
          cfg.get("methods", []) else []),
        f"| seed | {cfg.get('seed')} |",
    ]
    if cfg.get("command"):
        lines.append(f"| command | `{cfg['command']}` |")
    lines.append("")
    lines += ["Metrics: multiple-choice tasks by log-likelihood ranking of the choices (BIG-bench "
              "`multiple_choice_grade`, the main figure), and, when the run asked for it (`--mcq-exact-match`), the exact "
              "match of a greedy generated answer; "
              "ObjCount / DisflQA by exact match of the greedy answer; generative tasks by greedy generation "
              "then BLEU (sacrebleu), ROUGE-1 and ROUGE-L (rouge-score; ROUGE-L is the main figure) and "
              "final-answer accuracy for GSM8K. The *teacher-forced* rows (when present) score the argmax token "
              "at each gold target position, as the paper's code did, for the paper's methods (base, LoRA, DLP-LoRA); "
              "they are not generation and read higher. "
              "Means are over tasks of the main figure. Time is the sum of the compute time of a method's "
              "predictions (choice ranking and generation, routing included; not the teacher-forced scoring), "
              "measured on this machine (a shared CPU: expect noise). A prediction "
              "(method, example, adapter set) is computed once and shared by every setting that contains it, with "
              "its recorded time: e.g. composite-26 reuses the composite-17 / composite-9 predictions.", "",
              "Uncertainty: *[lo, hi]* after a figure is its 95% percentile-bootstrap interval over the test "
              f"examples ({stats.N_RESAMPLES} resamples, seed {stats.SEED}; BLEU recomputed as corpus BLEU on each "
              "resample; a mean over tasks resamples each task on its own). *LoRA vs base* compares the two on the "
              "same test examples: wins–losses (examples where the adapter scores higher / lower), and the exact "
              "two-sided sign-test p-value (the exact McNemar test on 0/1 scores; per-example ROUGE-L for generative "
              "tasks); ✓ marks an adapter significantly better than base at 95%, ✗ significantly worse." +
              ("" if _has_per_example(results) else " **This results.json predates per-example scores: it shows "
               "no interval and no paired test.**"), ""]
    if results.get("skipped"):
        for m, why in results["skipped"].items():
            lines.append(f"- **{m} skipped**: {why}")
        lines.append("")

    return lines


def _summary_lines(results: dict) -> list[str]:
    """The Table 3 style summary: mean score and time per setting and method."""
    lines: list[str] = []
    lines += ["## Summary (Table 3 style): mean score and time per setting", "",
              "| setting | method | mean | time (s) | time / LoRA | router acc. (%) | adapters / prompt |",
              "|---|---|---|---|---|---|---|"]
    for sname, s in results.get("settings", {}).items():
        ms = s.get("methods") or {}
        lora_t = ms.get("lora", {}).get("seconds")
        for m in method_order(ms):
            e = ms[m]
            ratio = f"{e['seconds'] / lora_t:.2f}x" if lora_t else "–"
            lines.append(f"| {sname} | {METHOD_LABELS.get(m, m)} | {fmt_ci(e['mean'], e.get('mean_ci'), 2)} | "
                         f"{fmt(e['seconds'])} | {ratio} | "
                         f"{fmt(e.get('router_accuracy'))} | {fmt(e.get('mean_adapters'), 2)} |")
        if s.get("skipped"):
            lines.append(f"| {sname} | (skipped: {s['skipped']}) | | | | | |")
    lines.append("")

    return lines


def plot_results(results: dict, fig_dir: str | os.PathLike, rel_to: str | os.PathLike | None = None) -> dict[str, str]:
    """One grouped bar chart per setting: the main metric per task for each method (like the paper's
    Figure 2). Returns {setting: path relative to `rel_to`}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for sname, s, ms, order in _evaluated_settings(results):
        tasks = s["tasks"]
        width = 0.8 / len(order)
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks) + 2), 4))
        for k, m in enumerate(order):
            vals = [ms[m]["tasks"][t].get("main", 0.0) for t in tasks]
            ax.bar([i + (k - (len(order) - 1) / 2) * width for i in range(len(tasks))], vals, width,
                   label=METHOD_LABELS.get(m, m))
        first = ms[order[0]]["tasks"]
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([f"{short(t)}\n({first[t].get('metric', '')})" for t in tasks], rotation=45 if len(tasks) > 6 else 0,
                           ha="right" if len(tasks) > 6 else "center", fontsize=8)
        ax.set_ylabel("score (%)")
        ax.set_title(f"{sname}: per-task main metric")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = fig_dir / f"{sname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[sname] = os.path.relpath(path, rel_to) if rel_to else str(path)
    return paths


_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_NUMBER_LIST = re.compile(rf"\[\n\s*({_NUMBER}(?:,\n\s*{_NUMBER})*)\n\s*\]")


def results_json_text(results: dict) -> str:
    """results.json's text: indented, but each list of plain numbers (the per-example scores) on one line."""
    text = json.dumps(results, indent=2, ensure_ascii=False, default=float)
    return _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)


def write_outputs(results: dict, out: str | os.PathLike, preamble: str = "") -> None:
    """OUT/results.json, OUT/figures/*.png and OUT/RESULTS.md. A hand-written OUT/discussion.md, if present, is
    appended to RESULTS.md under 'Discussion', so regenerating the report keeps it."""
    from ..paths import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results["figures"] = plot_results(results, out / "figures", rel_to=out)
    if preamble:
        results["preamble"] = preamble
    atomic_write_text(out / "results.json", results_json_text(results))
    md = format_results_md(results, preamble=preamble)
    disc = out / "discussion.md"
    if disc.is_file():
        md += "\n## Discussion\n\n_Hand-written from the numbers above (`" + disc.name + "`)._\n\n" + \
            disc.read_text().strip() + "\n"
    atomic_write_text(out / "RESULTS.md", md)


def rewrite_report(results_json: str | os.PathLike, full_ft=()) -> Path:
    """Rewrite RESULTS.md and the figures next to a results.json (e.g. after editing discussion.md); `full_ft`:
    `dlp-lora train-full` records (JSON files) to add to its ``full_finetune`` (and to RESULTS.md)."""
    path = Path(results_json)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise DLPLoRAError(f"{path} does not exist (run `dlp-lora eval` or `dlp-lora reproduce` first)") from None
    except json.JSONDecodeError as exc:
        raise DLPLoRAError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(results, dict) or "settings" not in results:
        raise DLPLoRAError(f"{path} is not a results.json written by `dlp-lora eval`")
    if full_ft:
        results["full_finetune"] = {**(results.get("full_finetune") or {}), **load_full_ft(full_ft)}
    write_outputs(results, path.parent, preamble=results.get("preamble", ""))
    return path.parent / "RESULTS.md"
