"""The paper's numbers (dlplora.eval.paper): one entry per task of ours, and every value equal to the table rows of
the paper's text (arXiv 2410.01497v2, Tables 1-3) when that text is at hand (../shared/paper)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dlplora.eval import paper
from dlplora.tasks import TASKS

_TEXT_CANDIDATES = [Path(__file__).resolve().parents[1].parent / "shared" / "paper" / "dlp-lora-paper.txt",
                    Path("/work/shared/paper/dlp-lora-paper.txt")]
_NUM = re.compile(r"\d+(?:\.\d+)?")


def _rows() -> list[list[str]]:
    """The Markdown table rows of the paper's text, as lists of stripped cells."""
    text = next((p for p in _TEXT_CANDIDATES if p.is_file()), None)
    if text is None:
        pytest.skip("the paper's text (../shared/paper/dlp-lora-paper.txt) is not here")
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.read_text().splitlines() if line.startswith("|")]


def _nums(cells: list[str], k: int = 3) -> tuple[float, ...]:
    return tuple(float(c) for c in cells[:k])


def test_every_task_of_ours_has_the_papers_numbers():
    assert set(paper.TABLE1) | set(paper.TABLE2) == set(TASKS) and len(TASKS) == 26
    assert not set(paper.TABLE1) & set(paper.TABLE2)
    for t, spec in TASKS.items():
        table = paper.TABLE1 if spec.kind == "mcq" else paper.TABLE2
        assert t in table, t
        main = paper.paper_scores(t)
        assert set(main) == {"basic", "lora", "dlp"} and all(0 <= v <= 100 for v in main.values())
    assert paper.paper_scores("winowhy", "exact_match") == {"basic": 43.62, "lora": 94.75, "dlp": 96.00}
    assert paper.paper_scores("gsm8k", "bleu") == {"basic": 80.00, "lora": 84.70, "dlp": 83.87}
    assert paper.paper_scores("gsm8k") == paper.paper_scores("gsm8k", "rougeL")
    assert paper.paper_scores("gsm8k", "answer_accuracy") is None and paper.paper_scores("winowhy", "bleu") is None
    assert paper.paper_scores("quiz") is None and paper.paper_mean(["winowhy", "quiz"]) is None
    assert paper.paper_mean(["winowhy", "unit_conversion"])["lora"] == pytest.approx((94.75 + 100.0) / 2)


def test_table1_matches_the_text():
    short = {spec.short: t for t, spec in TASKS.items() if spec.kind == "mcq"}
    seen = {}
    for cells in _rows():
        if cells[0] in short and len(cells) >= 13 and _NUM.fullmatch(cells[1]):
            seen[short[cells[0]]] = _nums(cells[1:])  # the first three numbers: the Qwen-2 1.5B columns
        if cells[0] == "Avg." and _NUM.fullmatch(cells[1]):
            assert _nums(cells[1:], 2) == (paper.AVERAGES["accuracy"]["basic"], paper.AVERAGES["accuracy"]["lora"])
    assert seen == paper.TABLE1
    # the printed Table 1 averages are the means of its rows
    assert paper.paper_mean(list(paper.TABLE1))["basic"] == pytest.approx(31.88, abs=0.005)
    assert paper.paper_mean(list(paper.TABLE1))["lora"] == pytest.approx(90.65, abs=0.005)


def test_table2_matches_the_text():
    short = {spec.short: t for t, spec in TASKS.items() if spec.kind == "qa"}
    metric = {"BLEU": "bleu", "ROUGE-1": "rouge1", "ROUGE-L": "rougeL"}
    seen: dict[str, dict] = {}
    task = None
    for cells in _rows():
        if len(cells) >= 5 and cells[1] in metric:  # a task's first row: task | metric | numbers
            task = short.get(cells[0], cells[0])
            name, values = metric[cells[1]], cells[2:]
        elif task and cells[0] in metric:  # its next rows: metric | numbers
            name, values = metric[cells[0]], cells[1:]
        else:
            continue
        if task == "Avg.":
            assert _nums(values, 2) == (paper.AVERAGES[name]["basic"], paper.AVERAGES[name]["lora"])
        else:
            seen.setdefault(task, {})[name] = _nums(values)
    assert seen == paper.TABLE2


def test_table3_composites_match_the_text():
    rows = _rows()
    i = next(k for k, c in enumerate(rows) if c[:3] == ["Qwen-2 1.5B", "Basic", "9"])
    basic9, basic17, dlp9, dlp17 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
    c9, c17 = paper.COMPOSITES["composite-9"], paper.COMPOSITES["composite-17"]
    assert _nums(basic9[4:]) == tuple(c9["basic"][m] for m in ("bleu", "rouge1", "rougeL"))
    assert basic17[0] == "17" and float(basic17[1]) == c17["basic"]["accuracy"]
    assert dlp9[:2] == ["DLP-LoRA", "9"] and _nums(dlp9[3:]) == tuple(c9["dlp"][m] for m in ("bleu", "rouge1", "rougeL"))
    assert dlp17[0] == "17" and float(dlp17[1]) == c17["dlp"]["accuracy"]
