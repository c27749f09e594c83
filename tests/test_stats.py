"""Uncertainty (dlplora.stats) and what the report makes of it: bootstrap intervals, corpus BLEU resampled
from per-example statistics, the exact sign / McNemar test, the per-example scores a task result carries, and
RESULTS.md with intervals, paired tests and the paper's columns -- or, for a results.json without per-example
scores, without them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dlplora import stats
from dlplora.eval import metrics, report

# ---------------------------------------------------------------- intervals


def test_interval_contains_the_mean_shrinks_with_n_and_is_reproducible():
    widths = []
    for n in (20, 80, 320):
        values = [100] * (n // 2) + [0] * (n - n // 2)  # 50% accuracy
        lo, hi = stats.bootstrap_ci(stats.mean_sample(values))
        assert lo < 50 < hi and 0 <= lo and hi <= 100
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # the normal approximation of a proportion's interval: 2 * 1.96 * sqrt(p(1-p)/n), in points
    assert widths[2] == pytest.approx(2 * 1.96 * 100 * math.sqrt(0.25 / 320), rel=0.15)
    assert stats.bootstrap_ci(stats.mean_sample(values)) == stats.bootstrap_ci(stats.mean_sample(values))
    assert stats.bootstrap_ci(stats.mean_sample([7.0, 7.0, 7.0])) == (7.0, 7.0)
    assert stats.bootstrap_ci(stats.mean_sample([])) is None


def test_interval_of_a_mean_over_tasks_resamples_each_task():
    a, b = stats.mean_sample([100] * 30 + [0] * 10), stats.mean_sample([100] * 10 + [0] * 30)  # 75% and 25%
    lo, hi = stats.bootstrap_ci([a, b])
    assert lo < 50 < hi
    # averaging two independent tasks: narrower than either task's own interval
    la, ha = stats.bootstrap_ci(a)
    assert hi - lo < ha - la


def test_corpus_bleu_from_per_example_statistics():
    from sacrebleu.metrics import BLEU

    preds = ["the cat sat on the mat today", "a quick brown fox", "Hello, world!", "", "one two three four five", "x"]
    refs = ["the cat sat on the mat", "the quick brown fox jumps", "Hello there, world.", "nothing",
            "one two three four five", "x y z"]
    st = metrics.bleu_statistics(preds, refs)
    assert len(st) == 6 and all(len(row) == len(preds) for row in st)
    full = stats.bleu_full_statistics(st)  # the hypothesis n-gram counts, rebuilt from the lengths, are sacrebleu's
    assert full.T.tolist() == BLEU()._extract_corpus_statistics(preds, [refs])
    assert stats.bleu_from_statistics(full.sum(axis=1)) == pytest.approx(metrics.bleu_score(preds, refs))
    # a subset's summed statistics give the subset's corpus BLEU
    sub = [0, 2, 4]
    assert stats.bleu_from_statistics(full[:, sub].sum(axis=1)) == pytest.approx(
        metrics.bleu_score([preds[i] for i in sub], [refs[i] for i in sub]))
    lo, hi = stats.bootstrap_ci(stats.bleu_sample(st), n_resamples=200)
    assert lo <= metrics.bleu_score(preds, refs) <= hi and 0 <= lo < hi <= 100
    # a task result's BLEU, summed from these statistics, is sacrebleu's corpus BLEU
    r = metrics.generation_result("strategyqa", [{"target": t} for t in refs], preds)
    assert r["bleu"] == pytest.approx(metrics.bleu_score(preds, refs)) and r["per_example"]["bleu_stats"] == st


# ---------------------------------------------------------------- the paired test


def test_sign_test_and_mcnemar_p_values():
    assert stats.sign_test(10, 0) == pytest.approx(2 * 0.5 ** 10)
    assert stats.sign_test(0, 10) == stats.sign_test(10, 0)
    assert stats.sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 2 ** 10)  # 0.109375
    assert stats.sign_test(5, 5) == 1.0 and stats.sign_test(0, 0) == 1.0
    # 10 discordant pairs all won by the adapter, 15 ties: McNemar p = 2 * 0.5**10, a significant win
    adapter = [100] * 10 + [100] * 8 + [0] * 7
    base = [0] * 10 + [100] * 8 + [0] * 7
    r = stats.paired_test(adapter, base)
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (10, 0, 15, 25)
    assert r["p"] == pytest.approx(2 * 0.5 ** 10) and r["better"] and not r["worse"]
    assert r["diff"] == pytest.approx(40.0) and r["diff_ci"][0] > 0
    r = stats.paired_test([100, 0, 100, 0], [0, 100, 0, 100])  # 2-2: no evidence either way
    assert r["p"] == 1.0 and not r["better"] and not r["worse"]
    assert stats.paired_test(base, adapter)["worse"]
    with pytest.raises(ValueError):
        stats.paired_test([1, 2], [1])


# ---------------------------------------------------------------- per-example scores in task results


def _items(task, exs):
    return [{"task": task, "ex": ex, "uid": f"{task}/{i}"} for i, ex in enumerate(exs)]


def test_task_results_carry_their_per_example_scores_and_intervals():
    exs = [{"input": f"q{i}", "choices": ["a", "b"], "answer_index": i % 2, "target": ["a", "b"][i % 2]}
           for i in range(12)]
    preds = [{"choice": 0, "gen": "a", "seconds": 0.0} for _ in exs]  # right on the even examples
    r = metrics.task_metrics("winowhy", _items("winowhy", exs), preds)
    assert r["per_example"]["accuracy"] == [100, 0] * 6 and r["accuracy"] == 50.0
    assert r["per_example"]["exact_match"] == [100, 0] * 6
    assert r["ci"]["main"] == r["ci"]["accuracy"] and r["ci"]["main"][0] < 50 < r["ci"]["main"][1]

    gen = [{"input": f"sum {i}", "target": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(8)]
    gpreds = [{"gen": f"{i} + 1 = {i + 1}\n#### {i + 1 if i < 6 else 0}", "seconds": 0.0} for i in range(8)]
    g = metrics.task_metrics("gsm8k", _items("gsm8k", gen), gpreds)
    pe = g["per_example"]
    assert pe["answer_accuracy"] == [100] * 6 + [0] * 2 and g["answer_accuracy"] == 75.0
    assert np.mean(pe["rougeL"]) == pytest.approx(g["rougeL"], abs=0.01) and g["main"] == g["rougeL"]
    assert len(pe["bleu_stats"]) == 6 and {"bleu", "rouge1", "rougeL", "answer_accuracy", "main"} <= set(g["ci"])
    assert g["ci"]["bleu"][0] <= g["bleu"] <= g["ci"]["bleu"][1]

    em = metrics.task_metrics("object_counting", _items("object_counting", [{"input": "x", "target": "3"}] * 4),
                              [{"gen": g_, "seconds": 0.0} for g_ in ("3", "three", "3", "4")])
    assert em["metric"] == "exact_match" and em["per_example"]["exact_match"] == [100, 0, 100, 0]


# ---------------------------------------------------------------- the report


def _results(n=20, with_examples=True):
    """A two-setting results dict made by the real summarise: WinoWhy (multiple choice) and StratQA (generative);
    the adapter is right on every WinoWhy example, the base model on half."""
    exs = [{"input": f"q{i}", "choices": ["a", "b"], "answer_index": 0, "target": "a"} for i in range(n)]
    qa = [{"input": f"is {i} even?", "target": f"yes, {i} is a number and it is even"} for i in range(n)]
    items = _items("winowhy", exs) + _items("strategyqa", qa)
    lora = [{"choice": 0, "gen": "a", "seconds": 0.1} for _ in exs] + \
           [{"gen": f"yes, {i} is a number and it is even", "seconds": 0.1} for i in range(n)]
    base = [{"choice": i % 2, "gen": "b", "seconds": 0.1} for i in range(n)] + \
           [{"gen": "no idea at all", "seconds": 0.1} for _ in range(n)]
    tasks = ["winowhy", "strategyqa"]
    ms = {"base": metrics.summarise(tasks, items, base, None, 0.0),
          "lora": metrics.summarise(tasks, items, lora, None, 0.0)}
    res = {"config": {}, "settings": {"single": {"tasks": tasks, "methods": ms},
                                      "composite-26": {"tasks": tasks, "methods": json.loads(json.dumps(ms))}}}
    if not with_examples:
        for s in res["settings"].values():
            for e in s["methods"].values():
                e.pop("mean_ci", None)
                for r in e["tasks"].values():
                    r.pop("per_example", None)
                    r.pop("ci", None)
    return res


def _row(md: str, start: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(start))


def test_report_sets_intervals_paired_tests_and_the_papers_columns(tmp_path):
    res = _results()
    assert "mean_ci" in res["settings"]["single"]["methods"]["lora"]
    md = report.format_results_md(res)
    head = _row(md, "| task | n | metric |")
    assert "LoRA vs base" in head and "paper Basic (Qwen-2 1.5B)" in head and "paper DLP-LoRA (Qwen-2 1.5B)" in head
    wino = _row(md, "| WinoWhy |")
    # ours with intervals, 10 wins and no loss (p = 2 * 0.5**10), then the paper's Table 1 row
    assert "| 50.0 [" in wino and "| 100.0 [100.0, 100.0] |" in wino and "| 10–0, p 0.002 ✓ |" in wino
    assert wino.endswith("| 43.62 | 94.75 | 96.00 |")
    strat = _row(md, "| StratQA | BLEU |")
    assert strat.endswith("| 56.69 | 60.67 | 63.25 |") and " [" in strat
    rl = next(line for line in md.splitlines() if line.startswith("|  | ROUGE-L |"))
    assert "20–0, p < 0.001 ✓" in rl and rl.endswith("| 49.23 | 54.60 | 56.86 |")
    assert "**2 of 2** tasks" in md  # adapters significantly better than base
    assert "predates per-example scores" not in md
    # our means never include the paper's numbers: the summary mean is ours alone
    lora = res["settings"]["single"]["methods"]["lora"]
    assert lora["mean"] == pytest.approx((100.0 + lora["tasks"]["strategyqa"]["rougeL"]) / 2)
    assert _row(md, "| single | LoRA (oracle) |").startswith(f"| single | LoRA (oracle) | {lora['mean']:.2f} [")

    # results.json: per-example lists on one line each, and the same dict read back
    report.write_outputs(res, tmp_path)
    text = (tmp_path / "results.json").read_text()
    assert '"accuracy": [100, 100, 100,' in text
    assert json.loads(text)["settings"]["single"]["methods"]["base"]["tasks"]["winowhy"]["per_example"]["accuracy"] \
        == [100, 0] * 10


def test_an_old_results_json_without_per_example_scores_still_renders(tmp_path):
    from dlplora.eval.report import rewrite_report

    res = _results(with_examples=False)
    (tmp_path / "results.json").write_text(json.dumps(res))
    md = rewrite_report(tmp_path / "results.json").read_text()
    wino = _row(md, "| WinoWhy |")
    assert "[" not in wino and "LoRA vs base |" not in md and "Adapters significantly better" not in md
    assert "predates per-example scores" in md
    assert wino.endswith("| 50.0 | 100.0 | 43.62 | 94.75 | 96.00 |")
    assert _row(md, "| single | Base |").startswith("| single | Base | 25.00 | ")  # 50 and 0: no interval
