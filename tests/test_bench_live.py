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


class _FakeServer:
    """/v1/models says `name` is training, then routable; the router never sends a probe to it (a router trained on
    too few examples): what made `bench live-library --examples 10` poll until --timeout (issue 32.4)."""

    def __init__(self, name, training_polls=2):
        self.name, self.polls, self.training_polls = name, 0, training_polls

    def get(self, path):
        self.polls += 1
        state = "training" if self.polls <= self.training_polls else "routable"
        return _Response({"data": [{"id": "dlp-lora"}, {"id": "old", "routing": "routable"},
                                   {"id": self.name, "routing": state}]})

    def post(self, path, json):
        return _Response({"routing": {"adapters": [{"name": "old", "weight": 1.0}]}})


class _Response:
    def __init__(self, obj):
        self.obj = obj

    def json(self):
        return self.obj


def testwait_routable_measures_a_router_that_never_routes_to_the_new_adapter():
    import time

    from dlplora.bench.live import wait_routable

    t0 = time.perf_counter()
    a = wait_routable(_FakeServer("new"), "new", ["p1", "p2", "p3"], timeout=30)
    assert time.perf_counter() - t0 < 10  # it does not poll until the timeout
    assert a["routable_after_s"] is not None and a["routed_after_s"] is None and a["probe_routed_share"] == 0


def test_ctrl_c_during_the_load_test_leaves_no_thread_running(tiny_model, tiny_data):
    """An interrupt while the clients run and the router retrains: the clients, the server's scheduler and the
    retraining thread have all ended when the KeyboardInterrupt leaves `bench` (a torch thread still running at
    exit aborted the process: `terminate called without an active exception`)."""
    import threading

    def interrupt(msg, *a, **kw):
        if msg.startswith("  load "):  # just after a runtime load: retraining in the background, clients running
            raise KeyboardInterrupt

    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        bench(model=str(tiny_model), data=str(tiny_data), adapters=3, examples=30, loads=1, unloads=0, clients=2,
              max_new_tokens=2, gap=0.1, settle=0.1, probe=2, timeout=120, max_batch_size=2, log=interrupt)
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, left
