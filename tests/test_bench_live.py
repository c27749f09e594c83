"""`dlp-lora bench live-library` on a tiny random model: the load-to-routable figure and the closed-loop load test
during loads and unloads (nothing failed, nothing changed against the solo replays)."""

from __future__ import annotations

import pytest

from dlplora.bench.live import bench, make_tasks, synthetic_task

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tasks_from_data_then_synthetic(tiny_data):
    tasks = make_tasks(str(tiny_data), 4)
    assert [t.name for t in tasks] == ["quiz", "sums", "synth00", "synth01"]
    assert tasks[0].tests[0].startswith("quiz quiz.") and len(tasks[0].rows) == 24
    a, b = synthetic_task(0), synthetic_task(1)
    assert a.tests != b.tests and a.rows[0] == synthetic_task(0).rows[0]


def test_live_library_bench_on_a_tiny_model(tiny_model, tiny_data):
    out = bench(model=str(tiny_model), data=str(tiny_data), adapters=3, examples=30, loads=2, unloads=2, clients=4,
                max_new_tokens=4, gap=0.3, settle=0.5, probe=4, timeout=120, max_batch_size=4, log=lambda *a: None)
    a, b = out["load_to_routable"], out["load_test"]
    assert a["routed_after_s"] is not None and a["routed_after_s"] >= a["routable_after_s"] >= 0
    assert a["retrain_s"] > 0 and 0 <= a["probe_routed_share"] <= 1
    assert [(o["op"], o["status"]) for o in b["ops"]] == [("load", 200), ("unload", 200), ("load", 200),
                                                          ("unload", 200)]
    assert b["ops"][1]["name"] == "quiz" and b["ops"][3]["name"] == "synth03"  # a first adapter, then the newest
    assert b["responses"] > 0 and b["failed"] == 0, b["failed_examples"]
    assert b["changed"] == 0, b["changed_examples"]
    assert 0 < b["compared"] <= b["responses"]
