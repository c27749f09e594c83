"""The README's two-adapter flow, end to end on the tiny model: `train-loras` on 2 tasks, then `train-plugin`
with its defaults (leave-tasks-out draws included), which must adapt to the library's size and never fail."""

from __future__ import annotations

import json

from dlplora import cli
from dlplora.plugin import leave_out_size
from dlplora.testing import tiny_examples, write_prepared


def test_leave_out_size_adapts_to_the_library():
    assert [leave_out_size(n) for n in range(7)] == [0, 0, 0, 1, 2, 3, 3]
    assert leave_out_size(26, k=5) == 5


def test_readme_two_adapter_flow_train_loras_then_train_plugin(tiny_model, tiny_data, tmp_path, capsys):
    lib = tmp_path / "lib"
    assert cli.main(["train-loras", "--tasks", "quiz,sums", "--data", str(tiny_data), "--out", str(lib),
                     "--model", str(tiny_model), "--steps", "2", "--eval-limit", "0"]) == 0
    capsys.readouterr()
    assert cli.main(["train-plugin", "--library", str(lib), "--data", str(tiny_data), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["tasks"] == 2 and "leave_out" not in report
    assert "leave-tasks-out skipped: with 2 prepared tasks" in out
    assert (lib / "plugin" / "plugin.json").is_file()
    assert cli.main(["route", "--library", str(lib), "--json", "Which option is right?"]) == 0


def test_three_adapters_hold_one_task_out_per_draw(tiny_data, tmp_path):
    from dlplora.plugin import train_plugin_from_data

    data = tmp_path / "data"
    for t in ("quiz", "sums"):
        (data / t).mkdir(parents=True)
        for f in (tiny_data / t).iterdir():
            (data / t / f.name).write_bytes(f.read_bytes())
    write_prepared(data, "more", tiny_examples("more", 24, "mcq", seed=3), tiny_examples("more", 6, "mcq", seed=4))
    _, report = train_plugin_from_data(data, ["quiz", "sums", "more"], ood_draws=5, epochs=1, augment=False,
                                       background="none", robustness=False)
    lo = report["leave_out"]
    assert lo["k"] == 1 and len(lo["draws"]) == 3  # three distinct held-out tasks, not five draws with repeats
    assert sorted(d["held_out"][0] for d in lo["draws"]) == ["more", "quiz", "sums"]
