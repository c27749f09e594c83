"""The demo pipeline (README's first command) on a tiny random model with a tiny budget."""

import json

import pytest

from dlplora.pipelines.demo import run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_pipeline_runs_end_to_end(tiny_model, tiny_data, tmp_path):
    logs = []
    report = run_demo(tmp_path / "demo", model=str(tiny_model), tasks=("quiz", "sums"), data_dir=tiny_data, steps=2,
                      max_len=64, n_eval=4, conversation=["Is 3 plus 4 even?", "Add 2 and 5."], log=logs.append)
    text = "\n".join(map(str, logs))
    for method in ("base", "lora", "dlp"):
        assert set(report["results"][method]["tasks"]) == {"quiz", "sums"}
        assert report["results"][method]["seconds"] > 0
    # the plugin (trained on the tasks' training prompts) routes the test prompts to their own task's adapter, and
    # the single-LoRA figures are those of each prompt's own adapter
    dlp, lora = report["results"]["dlp"], report["results"]["lora"]
    assert dlp["router_accuracy"] == 100 and dlp["mean_adapters"] >= 1
    assert {t: r["main"] for t, r in dlp["tasks"].items()} == {t: r["main"] for t, r in lora["tasks"].items()} \
        or dlp["mean_adapters"] > 1
    assert len(report["case_study"]) == 2 and all("routing" in t for t in report["case_study"])
    assert "DLP-LoRA / single-LoRA time" in text and "turn 2 user" in text and "dlp-lora serve --library" in text
    # the table says, per task, how the adapter did against the base model on the same prompts (paired)
    table = (tmp_path / "demo" / "report.md").read_text()
    assert "| LoRA vs base |" in table and table.count(", p=") == 2
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["tasks"] == ["quiz", "sums"]
    # a second run reuses adapters and plugin
    logs.clear()
    run_demo(tmp_path / "demo", model=str(tiny_model), tasks=("quiz", "sums"), data_dir=tiny_data, steps=2, max_len=64,
             n_eval=4, conversation=["Add 1 and 1."], log=logs.append)
    text = "\n".join(map(str, logs))
    assert "skip quiz" in text and "reusing the plugin" in text and "reusing the evaluation" in text
