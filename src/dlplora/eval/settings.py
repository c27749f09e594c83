"""The evaluation's settings, methods and streams.

Settings (the paper's): "single" (each task's test set, the right adapter given), "composite-17" /
"composite-9" / "composite-26" (the MCQ / QA / all test prompts of the library's tasks shuffled into one
stream; a method sees the prompt text only) and "multiturn" (conversations of 3 turns from different
tasks; routing methods re-decide at every turn with the history as context).

Methods: base (no adapter), lora (oracle: the true task's adapter), dlp (the plugin, top-p, with the
paper's softmax weighting = "dlp" and the renormalised one = "dlp-renorm"), arrow (PEFT's training-free
Arrow routing over the same adapters), merge-all (one static uniform merge of every adapter, merged into the weights
once), ties (PEFT's ``add_weighted_adapter(combination_type="ties", density=0.2)`` over every adapter, merged into the
weights), multitask (each multi-task adapter of the library, ``dlp-lora train-multitask``, merged into the weights;
reported under the adapter's name, e.g. "multitask" and "multitask-r32").
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Sequence

from ..config import DEFAULT_P, WEIGHTINGS, check_p
from ..errors import DLPLoRAError
from ..tasks import TASKS, candidates

SETTINGS = ("single", "composite-17", "composite-9", "composite-26", "multiturn")
METHODS = ("base", "lora", "dlp", "arrow", "merge-all", "ties", "multitask")
SINGLE_METHODS = ("base", "lora", "multitask")  # the methods that need no routing; multitask: issue 28
MT_MCQ_REPLIES = ("choice", "generated")  # EvalConfig.mt_mcq_reply
# The teacher-forced variant (EvalConfig.teacher_forced) scores the paper's code's way, for the paper's own methods
# only: it is a secondary figure, and it costs about a fifth of a method's compute (262 of the base model's
# 1,424 s on the full composite-26 stream), which the three baselines would pay again for a figure nobody compares.
TEACHER_FORCED_METHODS = ("base", "lora", "dlp")
METHOD_LABELS = {"base": "Base", "lora": "LoRA (oracle)", "dlp": "DLP-LoRA", "dlp-renorm": "DLP-LoRA (renorm)",
                 "arrow": "Arrow (PEFT)", "merge-all": "Merge-all", "ties": "TIES merge (PEFT)",
                 "multitask": "Multi-task LoRA"}
RESULTS_FORMAT = 2  # 2: per-example scores, bootstrap intervals ("ci", "mean_ci") and paired tests ("paired")


def task_group(task: str, examples: list[dict]) -> str:
    """'mcq' or 'qa': the registry's kind (the paper's 17 / 9 split), else multiple choice when the
    prepared examples carry choices."""
    spec = TASKS.get(task)
    if spec is not None:
        return spec.kind
    return "mcq" if examples and examples[0].get("choices") else "qa"


def setting_tasks(setting: str, examples_by_task: dict[str, list[dict]]) -> list[str]:
    names = list(examples_by_task)
    if setting == "composite-17":
        return [t for t in names if task_group(t, examples_by_task[t]) == "mcq"]
    if setting == "composite-9":
        return [t for t in names if task_group(t, examples_by_task[t]) == "qa"]
    if setting in ("single", "composite-26", "multiturn"):
        return names
    raise DLPLoRAError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")


def parse_settings(value: str | None) -> list[str]:
    items = [s.strip() for s in (value or "composite-26").split(",") if s.strip()]
    out = []
    for s in items:
        group = list(SETTINGS) if s == "all" else [s]
        for g in group:
            if g not in SETTINGS:
                raise DLPLoRAError(f"unknown setting {g!r}; choose from {', '.join(SETTINGS)} (or 'all')")
            if g not in out:
                out.append(g)
    return out


def _parse_choices(value: str | None, allowed, default: str, what: str) -> list[str]:
    """A comma-separated list of allowed names, deduplicated in order."""
    items = [m.strip() for m in (value or default).split(",") if m.strip()]
    for m in items:
        if m not in allowed:
            raise DLPLoRAError(f"unknown {what} {m!r}; choose from {', '.join(allowed)}")
    if not items:
        raise DLPLoRAError(f"no {what}s given")
    return list(dict.fromkeys(items))


def parse_methods(value: str | None) -> list[str]:
    return _parse_choices(value, METHODS, ",".join(METHODS), "method")


def parse_p_values(value: str | None) -> list[float]:
    """'0.3,0.6,0.9' -> [0.3, 0.6, 0.9]; each must be in (0, 1]."""
    out = []
    for part in (value or "").split(","):
        if not part.strip():
            continue
        try:
            x = float(part)
        except ValueError:
            raise DLPLoRAError(f"--p-sweep: {part.strip()!r} is not a number") from None
        out.append(check_p(x, "--p-sweep values"))
    return out


def parse_weightings(value: str | None) -> list[str]:
    return _parse_choices(value, WEIGHTINGS, ",".join(WEIGHTINGS), "weighting")


def dlp_variant(weighting: str) -> str:
    return "dlp" if weighting == "softmax" else f"dlp-{weighting}"


def build_stream(examples_by_task: dict[str, list[dict]], tasks: list[str], seed: int = 0) -> list[dict]:
    """All test examples of `tasks` shuffled into one stream of items {uid, task, ex, history}.
    The task label stays with the harness (for scoring); methods get only the prompt text."""
    stream = [{"uid": f"{t}/{ex.get('id', i)}", "task": t, "ex": ex, "history": []}
              for t in tasks for i, ex in enumerate(examples_by_task[t])]
    random.Random(seed).shuffle(stream)
    return stream


def build_conversations(examples_by_task: dict[str, list[dict]], tasks: list[str], turns: int = 3, seed: int = 0,
                        limit: int | None = None) -> list[list[dict]]:
    """Conversations of `turns` turns drawn from different tasks (no task repeats inside a conversation
    when there are enough tasks; never the same task twice in a row), each test example used at most once."""
    rng = random.Random(seed)
    pools = {t: [(f"{t}/{ex.get('id', i)}", ex) for i, ex in enumerate(examples_by_task[t])] for t in tasks}
    for p in pools.values():
        rng.shuffle(p)
    convs: list[list[dict]] = []
    if len(tasks) < 2:
        return convs
    while limit is None or len(convs) < limit:
        conv: list[dict] = []
        for _ in range(turns):
            used = {c["task"] for c in conv}
            prev = conv[-1]["task"] if conv else None
            cands = [t for t in tasks if pools[t] and t != prev and t not in used] or \
                    [t for t in tasks if pools[t] and t != prev]
            if not cands:
                break
            most = max(len(pools[t]) for t in cands)
            t = rng.choice([t for t in cands if len(pools[t]) == most])
            uid, ex = pools[t].pop()
            conv.append({"uid": uid, "task": t, "ex": ex})
        if len(conv) < turns:
            break
        convs.append(conv)
    return convs


def fixed_sets(method: str, items: list[dict], names: list[str]) -> list[dict]:
    """The adapter sets of the methods that do not route: lora (the item's own task), merge-all (every adapter,
    uniform: merged into its model's weights, the set is what it holds), base, arrow, ties and multitask (none: Arrow
    routes inside its model, TIES and the multi-task adapter are merged into their weights)."""
    if method == "lora":
        return [{it["task"]: 1.0} for it in items]
    if method == "merge-all":
        return [{n: 1.0 / len(names) for n in names} for _ in items]
    return [{} for _ in items]


def top_names(sets: list[dict]) -> list[str | None]:
    """The most weighted adapter of each set (None for the base model): what the router "picked"."""
    return [max(s, key=s.get) if s else None for s in sets]


@dataclass
class EvalConfig:
    """What `dlp-lora eval` runs (each field is a flag of the command; see ``dlp-lora eval --help``)."""

    library: str | os.PathLike = field(metadata={"help": "adapter library directory (with its plugin)"})
    data: str | os.PathLike | None = field(default=None, metadata={"help": "prepared data (default: the library's)"})
    out: str | os.PathLike = field(default=os.path.join("runs", "eval"), metadata={"help": "output directory"})
    settings: Sequence[str] = field(default=("composite-26",), metadata={"help": f"some of {', '.join(SETTINGS)}"})
    methods: Sequence[str] = field(default=METHODS, metadata={"help": f"some of {', '.join(METHODS)}"})
    tasks: str | Sequence[str] | None = field(default=None, metadata={"help": "restrict to these tasks"})
    limit: int | None = field(default=None, metadata={"help": "test examples per task (None: all)"})
    p: float = field(default=DEFAULT_P, metadata={"help": "DLP top-p threshold"})
    base_threshold: float | None = field(default=None, metadata={
        "help": "DLP's base-model threshold (None: the plugin's calibrated one; inf: never the base model)"})
    weightings: Sequence[str] = field(default=WEIGHTINGS, metadata={"help": "DLP fusion weightings to report"})
    teacher_forced: bool = field(default=False, metadata={
        "help": "also score generative tasks teacher-forced (base, LoRA and DLP-LoRA: the paper's methods)"})
    mcq_exact_match: bool = field(default=False, metadata={
        "help": "also generate an answer to each single-turn multiple-choice prompt and report its exact match "
                "(a secondary figure; it costs a generation per prompt)"})
    model: str | os.PathLike | None = field(default=None, metadata={"help": "base model (default: the library's)"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16 (dlplora.device)"})
    device: str = field(default="cpu", metadata={"help": "auto, cpu or cuda"})
    quantize: str = field(default="none", metadata={
        "help": "quantised base linears for the fused methods (none, int8, int4, auto: dlplora.quantize); the "
                "PEFT baselines (Arrow, TIES) stay in --dtype"})
    seed: int = field(default=0, metadata={"help": "shuffling / conversation seed"})
    batch_size: int = field(default=16, metadata={"help": "prompts per batch"})
    route_window: int = field(default=1, metadata={"help": "multiturn: earlier user turns the router reads"})
    turns: int = field(default=3, metadata={"help": "multiturn: turns per conversation"})
    conversations: int | None = field(default=None, metadata={"help": "multiturn: at most this many conversations"})
    mt_mcq_reply: str = field(default="choice", metadata={
        "help": "multiturn: the assistant reply a multiple-choice turn leaves in the history: 'choice' (the ranked "
                "choice, the answer its score counts; no generation) or 'generated' (a generated answer, as a chat "
                "would have; one more generation per multiple-choice turn)"})
    arrow_top_k: int = field(default=3, metadata={"help": "Arrow: adapters mixed per token"})
    ties_density: float = field(default=0.2, metadata={"help": "TIES: share of each task vector kept (TIES' k)"})
    cache_dir: str | os.PathLike | None = field(default=None, metadata={"help": "prediction cache (default OUT/cache)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    write: bool = field(default=True, metadata={"help": "write results.json, RESULTS.md and figures to OUT"})
    command: str | None = field(default=None, metadata={"help": "the command line, recorded in the report"})
    note: str = field(default="", metadata={"help": "a paragraph put at the top of RESULTS.md"})
    p_sweep: Sequence[float] = field(default=(), metadata={"help": "extra top-p values for dlp (a table of p)"})
    ray_address: str | None = field(default=None, metadata={
        "help": "compute the predictions on the Ray cluster at this address (eval/ray_grid.py); None: here"})
    ray_workers: int | None = field(default=None, metadata={
        "help": "evaluation workers on the cluster, 1 CPU each (None: one per free CPU)"})


def assistant_reply(item: dict, pred: dict, mcq_reply: str = "choice") -> str:
    """What a multiturn turn leaves in the conversation as the assistant's reply: the generated answer, or for a
    multiple-choice turn under ``mcq_reply="choice"`` the text of the choice it ranked first."""
    choices = candidates(item["ex"])
    if choices and mcq_reply == "choice" and "choice" in pred:
        return choices[int(pred["choice"])]
    return pred.get("gen", "")
