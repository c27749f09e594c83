"""RESULTS.md's per-setting tables (:mod:`.report` writes the rest): Table 1 style (multiple-choice and
exact-match tasks) and Table 2 style (generative tasks, one row per metric), each figure with its 95% interval, the
oracle LoRA against base paired test per task, and the paper's Qwen-2 1.5B columns beside ours; the per-turn means of
the multiturn setting; the effect of top-p; and the number formats the report shares."""

from __future__ import annotations

from ..tasks import TASKS
from .. import stats
from . import paper
from .settings import METHOD_LABELS


def fmt(v, nd=1) -> str:
    """A figure with `nd` decimals, '–' for none."""
    return "–" if v is None else f"{v:.{nd}f}"


def ci_text(ci, nd=1, signed=False) -> str:
    """' [lo, hi]' for a 95% interval, '' when there is none (results without per-example scores)."""
    if not ci:
        return ""
    f = f"{{:+.{nd}f}}" if signed else f"{{:.{nd}f}}"
    return f" [{f.format(ci[0])}, {f.format(ci[1])}]"


def fmt_ci(v, ci, nd=1) -> str:
    """A figure and its interval, e.g. '45.0 [35.0, 55.0]'."""
    return "–" if v is None else fmt(v, nd) + ci_text(ci, nd)


def _task_ci(r: dict, key: str = "main"):
    """The interval of one figure of a task result: stored with it, else computed from its per-example scores."""
    ci = (r.get("ci") or {}).get(key)
    if ci is None and r.get("per_example"):
        s = stats.task_sample(r, key)
        ci = stats.bootstrap_ci(s) if s is not None else None
    return ci


def _paired(s: dict, ms: dict) -> dict:
    """The setting's paired tests of the oracle LoRA against base, per task (empty without per-example scores)."""
    if s.get("paired") is not None:
        return s["paired"]
    if "lora" in ms and "base" in ms:
        return stats.paired_tests(ms["lora"]["tasks"], ms["base"]["tasks"])
    return {}


def _paired_cell(r: dict | None) -> str:
    """'wins–losses, p' of a paired test, with ✓ when the adapter is significantly better and ✗ when worse."""
    if not r:
        return "–"
    mark = " ✓" if r["better"] else " ✗" if r.get("worse") else ""
    p = "p < 0.001" if r["p"] < 0.001 else f"p {r['p']:.3f}"
    return f"{r['wins']}–{r['losses']}, {p}{mark}"


_PAPER_HEADER = " | ".join(f"paper {paper.METHOD_LABELS[m]} ({paper.BACKBONE})" for m in paper.METHODS)


def _paper_cells(task: str, metric: str) -> str:
    row = paper.paper_scores(task, metric)
    return " | ".join(fmt(row[m], 2) if row else "–" for m in paper.METHODS)


def method_order(methods: dict) -> list[str]:
    """The methods in the tables' order (base, the oracle LoRA, DLP-LoRA, then the other baselines)."""
    order = ["base", "lora", "dlp", "dlp-renorm", "arrow", "merge-all", "ties"]
    return [m for m in order if m in methods] + [m for m in methods if m not in order]


def short(task: str) -> str:
    """The paper's short name of a task (e.g. AbsNarr), or the name itself for a task of the user's."""
    spec = TASKS.get(task)
    return spec.short if spec is not None else task


def setting_lines(sname: str, s: dict, ms: dict, order: list[str], figure: str | None) -> list[str]:
    """One setting: its tables of multiple-choice and generative tasks (and turns), then its figure."""
    tasks = s["tasks"]
    first = ms[order[0]]["tasks"]
    header = " | ".join(METHOD_LABELS.get(m, m) for m in order)
    desc = {"single": "each task's test set alone, the right adapter given",
            "composite-17": "the multiple-choice tasks' test prompts shuffled into one stream, no task label",
            "composite-9": "the generative tasks' test prompts shuffled into one stream, no task label",
            "composite-26": "all tasks' test prompts shuffled into one stream, no task label",
            "multiturn": f"{s.get('conversations')} conversations of {s.get('turns')} turns from different "
                         f"tasks; routers re-decide every turn, reading the turn plus {s.get('route_window')} "
                         f"earlier user turn(s)"}.get(sname, "")
    lines: list[str] = []
    lines += [f"## Setting `{sname}`", "", desc + ".", ""]
    mcq = [t for t in tasks if first.get(t, {}).get("metric") in ("accuracy", "exact_match")]
    qa = [t for t in tasks if first.get(t, {}).get("metric") == "rougeL"]
    paired = _paired(s, ms)
    if mcq:
        lines += _mcq_lines(mcq, first, ms, order, header, paired)
    if qa:
        lines += _qa_lines(qa, first, ms, order, header, paired)
    if paired:
        better = sum(r["better"] for r in paired.values())
        worse = sum(bool(r.get("worse")) for r in paired.values())
        lines += [f"**Adapters significantly better than base** (LoRA (oracle) vs Base, paired sign test, 95%): "
                  f"**{better} of {len(paired)}** tasks; significantly worse: {worse}.", ""]
    if sname == "multiturn":
        lines += _turn_lines(s, ms, order)
    if figure:
        lines += [f"![{sname}]({figure})", ""]
    return lines


def _mcq_lines(mcq: list[str], first: dict, ms: dict, order: list[str], header: str, paired: dict) -> list[str]:
    """The Table 1 style table: our main figure per task and method with its interval, the LoRA vs base paired
    test, and the paper's Qwen-2 1.5B accuracy columns; then the generated-answer exact match."""
    with_paper = any(paper.paper_scores(t) for t in mcq)
    head = header + (" | LoRA vs base" if paired else "") + (f" | {_PAPER_HEADER}" if with_paper else "")
    ncols = len(order) + bool(paired) + 3 * with_paper
    lines: list[str] = ["### Multiple-choice and exact-match tasks (Table 1 style), %", ""]
    if with_paper:
        lines += [f"The *paper* columns are the paper's accuracy on {paper.BACKBONE} ({paper.ARXIV}, Table 1; it "
                  "scores DisflQA and ObjCount by accuracy), not ours; their mean row is the mean of the paper's "
                  f"rows shown (its printed 17-task averages: Basic {paper.AVERAGES['accuracy']['basic']:.2f}, "
                  f"LoRA {paper.AVERAGES['accuracy']['lora']:.2f}).", ""]
    lines += [f"| task | n | metric | {head} |", "|---|---|---|" + "---|" * ncols]
    for t in mcq:
        r0 = first[t]
        cells = [fmt_ci(ms[m]["tasks"][t].get("main"), _task_ci(ms[m]["tasks"][t])) for m in order]
        if paired:
            cells.append(_paired_cell(paired.get(t)))
        if with_paper:
            cells.append(_paper_cells(t, "main"))
        lines.append(f"| {short(t)} | {r0['n']} | {r0['metric']} | " + " | ".join(cells) + " |")
    cells = []
    for m in order:
        rs = [ms[m]["tasks"][t] for t in mcq]
        cells.append(f"**{fmt(sum(r['main'] for r in rs) / len(rs))}**{ci_text(stats.mean_interval(rs))}")
    if paired:
        cells.append("")
    if with_paper:
        pm = paper.paper_mean(mcq)
        cells.append(" | ".join(fmt(pm[m], 2) if pm else "–" for m in paper.METHODS))
    lines.append("| **mean** | | | " + " | ".join(cells) + " |")
    with_em = [t for t in mcq if first[t]["metric"] == "accuracy" and all("exact_match" in ms[m]["tasks"][t]
                                                                            for m in order)]
    if with_em:
        lines += ["", "Generated-answer exact match on the multiple-choice tasks (greedy answer vs the gold "
                  "choice), %:", "", f"| task | {header} |", "|---|" + "---|" * len(order)]
        for t in with_em:
            lines.append(f"| {short(t)} | " + " | ".join(
                fmt_ci(ms[m]["tasks"][t].get("exact_match"), _task_ci(ms[m]["tasks"][t], "exact_match"))
                for m in order) + " |")
    lines.append("")
    return lines


_QA_METRICS = (("bleu", "BLEU"), ("rouge1", "ROUGE-1"), ("rougeL", "ROUGE-L"))


def _qa_lines(qa: list[str], first: dict, ms: dict, order: list[str], header: str, paired: dict) -> list[str]:
    """The Table 2 style table: one row per task and metric (BLEU, ROUGE-1, ROUGE-L, and GSM8K's final-answer
    accuracy) with intervals, the LoRA vs base paired test on ROUGE-L, and the paper's Qwen-2 1.5B columns for the
    same metric; then the mean rows; then the teacher-forced figures when present."""
    with_paper = any(paper.paper_scores(t) for t in qa)
    head = header + (" | LoRA vs base" if paired else "") + (f" | {_PAPER_HEADER}" if with_paper else "")
    ncols = len(order) + bool(paired) + 3 * with_paper
    lines: list[str] = ["### Generative tasks (Table 2 style): BLEU / ROUGE-1 / ROUGE-L", ""]
    if with_paper:
        lines += [f"The *paper* columns are the paper's figures on {paper.BACKBONE} ({paper.ARXIV}, Table 2), "
                  "not ours; their mean rows are the means of the paper's rows shown. The paired test is on "
                  "ROUGE-L, our main figure.", ""]
    lines += [f"| task | metric | n | {head} |", "|---|---|---|" + "---|" * ncols]
    for t in qa:
        keys = list(_QA_METRICS) + ([("answer_accuracy", "answer acc. (%)")]
                                    if any("answer_accuracy" in ms[m]["tasks"][t] for m in order) else [])
        for i, (key, label) in enumerate(keys):
            cells = [short(t) if i == 0 else "", label, str(first[t]["n"]) if i == 0 else ""]
            cells += [fmt_ci(ms[m]["tasks"][t].get(key), _task_ci(ms[m]["tasks"][t], key)) for m in order]
            if paired:
                cells.append(_paired_cell(paired.get(t)) if key == "rougeL" else "")
            if with_paper:
                cells.append(_paper_cells(t, key))
            lines.append("| " + " | ".join(cells) + " |")
    for key, label in _QA_METRICS:
        cells = []
        for m in order:
            rs = [ms[m]["tasks"][t] for t in qa]
            cells.append(f"**{fmt(sum(r.get(key, 0.0) for r in rs) / len(rs))}**"
                         f"{ci_text(stats.mean_interval(rs, key))}")
        if paired:
            cells.append("")
        if with_paper:
            pm = paper.paper_mean(qa, key)
            cells.append(" | ".join(fmt(pm[m], 2) if pm else "–" for m in paper.METHODS))
        lines.append(f"| **mean** | {label} | | " + " | ".join(cells) + " |")
    if any("teacher_forced" in ms[m]["tasks"][t] for m in order for t in qa):
        lines += ["", "**Teacher-forced** (paper-code style, NOT generation): BLEU / ROUGE-1 / ROUGE-L", "",
                  f"| task | {header} |", "|---|" + "---|" * len(order)]
        for t in qa:
            cells = []
            for m in order:
                tf = ms[m]["tasks"][t].get("teacher_forced")
                cells.append(f"{fmt(tf['bleu'])} / {fmt(tf['rouge1'])} / {fmt(tf['rougeL'])}" if tf else "–")
            lines.append(f"| {short(t)} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _turn_lines(s: dict, ms: dict, order: list[str]) -> list[str]:
    lines: list[str] = []
    lines += ["Mean score by turn:", "", "| method | " + " | ".join(f"turn {i + 1}" for i in range(s.get('turns', 0))) + " |",
              "|---|" + "---|" * s.get("turns", 0)]
    for m in order:
        pt = ms[m].get("per_turn", [])
        cells = []
        for x in pt:
            c = fmt_ci(x["mean"], x.get("mean_ci"))
            if "router_accuracy" in x:
                c += f" (router {fmt(x['router_accuracy'], 0)}%)"
            cells.append(c)
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def p_sweep_lines(sw: dict | None) -> list[str]:
    if not sw or not sw.get("rows"):
        return []
    lines: list[str] = []
    lines += [f"## Effect of top-p (`{sw['setting']}`)", "",
              f"The same stream as the `{sw['setting']}` setting, routed at each p; the oracle single LoRA scores "
              f"{fmt_ci(sw['lora_mean'], sw.get('lora_mean_ci'), 2)} on it. *adapters* is the mean number kept "
              "per prompt, *top weight* the mean fusion weight of the most probable adapter (1.0 = the single "
              "adapter alone). Teacher-forced scoring is not part of the sweep.", "",
              "| weighting | p | mean | vs LoRA | adapters / prompt | single-adapter prompts (%) | top weight | "
              "router acc. (%) | time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sw["rows"]:
        lines.append(f"| {METHOD_LABELS.get(r['method'], r['method'])} | {r['p']:g} | "
                     f"{fmt_ci(r['mean'], r.get('mean_ci'), 2)} | "
                     f"{r['gap_to_lora']:+.2f} | {fmt(r['mean_adapters'], 2)} | {fmt(r['single_adapter_share'])} | "
                     f"{fmt(r['mean_top_weight'], 2)} | {fmt(r['router_accuracy'])} | {fmt(r['seconds'])} |")
    lines.append("")
    return lines
