"""`dlp-lora bench replicas` on a tiny random model and a local Ray cluster started by the bench: 1 replica, 2 replicas
placed by Serve and by adapter set, side by side, texts identical to the single-process server's, and a replica
killed under load (replaced by Serve; only what the API cannot retry fails)."""

from __future__ import annotations

import pytest

from dlplora.bench.replicas import workload

pytest.importorskip("ray.serve")


def test_workload_mixes_sets_endpoints_and_streams():
    work = workload(["a", "b", "c"], 24, 4)
    assert len(work) == 24
    assert {p for p, _ in work} == {"/v1/chat/completions", "/v1/completions"}
    assert sum(bool(b.get("stream")) for _, b in work) == 6
    sets = {json_key(b) for _, b in work}
    assert sets == {"model=a", "model=b", "model=c", "mix=a,b", "mix=a,b,c"}


def json_key(body: dict) -> str:
    return f"model={body['model']}" if "model" in body else "mix=" + ",".join(sorted(body["adapters"]))


def test_replicas_bench_on_a_tiny_model(tiny_model, tmp_path):
    import torch

    n = torch.get_num_threads()
    try:
        out = bench_tiny(tiny_model, tmp_path)
    finally:
        torch.set_num_threads(n)
    res = out["results"]
    assert list(res) == ["single process", "1 replica", "2 replicas, serve", "2 replicas, by-set"]
    for label, r in res.items():
        assert r["errors"] == 0 and r["texts"] == 12 and r["tokens_per_s"] > 0, (label, r)
        assert r["identical_texts"] == r["texts"], (label, r)  # the same texts as one process
    assert res["1 replica"]["requests_per_replica"] == [12]
    assert len(res["2 replicas, by-set"]["requests_per_replica"]) <= 2
    assert set(out["ratios"]) == {"2 replicas, serve / 1 replica", "2 replicas, by-set / 1 replica",
                                  "1 replica / single process"}
    k = out["kill_test"]
    assert k["killed"] and k["restarted"] and k["restart_s"] > 0, k
    assert k["ok"] + k["failed"] == k["requests"] == 24
    assert k["failed"] == k["streams_broken"], k  # every other failure was retried into a success


def bench_tiny(tiny_model, tmp_path):
    from dlplora.bench.replicas import bench

    return bench(model=str(tiny_model), adapters=3, rank=4, replicas=2, threads=1, clients=4, requests=12,
                 max_new_tokens=4, max_batch_size=4, rounds=1, placements=("serve", "by-set"), work=str(tmp_path),
                 kill=True, kill_requests=24, retries=2, log=print)
