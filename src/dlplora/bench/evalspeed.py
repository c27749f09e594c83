"""`dlp-lora bench eval`: where an evaluation's time goes, per kind of prediction.

Per prompt, on the same prompts and the same library, each dtype in turn: the multiple-choice ranking (the prompt
once, every choice continued from its KV cache) at two batch sizes, and greedy generation of QA prompts with their
tasks' budgets at three batch sizes. The base model's sets (no adapter), so the figures are the evaluation's cost,
not the fusion's.
"""

from __future__ import annotations

import time

MCQ_TASKS = ("epistemic_reasoning", "tracking_shuffled_objects", "abstract_narrative_understanding", "unit_conversion")
QA_TASKS = ("gsm8k", "alpaca", "news_commentary_es", "strategyqa")


def bench_eval(library, data, per_task: int = 8, dtypes=("float32", "bfloat16"), mcq_tasks=MCQ_TASKS,
               qa_tasks=QA_TASKS, log=print) -> dict:
    """Seconds per prompt of choice ranking (batch 16, 32) and generation (batch 8, 16, 32), and generated
    tokens per second, for each dtype."""
    import torch

    from ..engine import DLPLoRA
    from ..eval.runners import FusedRunner
    from ..eval.scoring import choice_predictions, gen_budget
    from ..tasks import load_split, user_message

    mcq = [e for t in mcq_tasks for e in load_split(data, t, "test")[:per_task]]
    qa = [(t, e) for t in qa_tasks for e in load_split(data, t, "test")[:per_task]]
    out: dict = {"mcq_prompts": len(mcq), "qa_prompts": len(qa), "torch_threads": torch.get_num_threads(), "runs": {}}
    for dtype in dtypes:
        eng = DLPLoRA.from_library(library, dtype=dtype)
        runner = FusedRunner(eng)
        tok = eng.tokenizer
        runner.generate(["warm up"], [[]], [{}], [2])
        row: dict = {}
        for bs in (16, 32):
            t0 = time.perf_counter()
            choice_predictions(runner, mcq, [{}] * len(mcq), [[]] * len(mcq), batch_size=bs)
            row[f"choice_batch{bs}_s_per_prompt"] = round((time.perf_counter() - t0) / max(1, len(mcq)), 4)
        budgets = [gen_budget(tok, {"task": t, "ex": e}) for t, e in qa]
        order = sorted(range(len(qa)), key=lambda i: (budgets[i], len(qa[i][1]["input"])))
        for bs in (8, 16, 32):
            t0 = time.perf_counter()
            n_tok = 0
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                texts = runner.generate([user_message(qa[i][1]) for i in idx], [[]] * len(idx), [{}] * len(idx),
                                        [budgets[i] for i in idx])
                n_tok += sum(len(tok(x, add_special_tokens=False).input_ids) for x in texts)
            dt = time.perf_counter() - t0
            row[f"gen_batch{bs}_s_per_prompt"] = round(dt / max(1, len(qa)), 4)
            row[f"gen_batch{bs}_tokens_per_s"] = round(n_tok / dt, 1)
        out["runs"][dtype] = row
        log(f"{dtype}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
        del eng, runner
    return out


def add_arguments(p) -> None:
    p.add_argument("--library", required=True, help="an adapter library (its adapters are not used: base sets)")
    p.add_argument("--data", required=True, help="prepared data with the MCQ and QA tasks below")
    p.add_argument("--per-task", type=int, default=8, help="test prompts per task (default 8)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--mcq-tasks", default=",".join(MCQ_TASKS))
    p.add_argument("--qa-tasks", default=",".join(QA_TASKS))
    p.add_argument("--json", action="store_true")


def run(args) -> None:
    import json

    res = bench_eval(args.library, args.data, per_task=args.per_task, dtypes=tuple(args.dtypes.split(",")),
                     mcq_tasks=tuple(args.mcq_tasks.split(",")), qa_tasks=tuple(args.qa_tasks.split(",")))
    if args.json:
        print(json.dumps(res))
