"""Issue 31 on a real local multi-node Ray cluster (a head and a worker node on 127.0.0.1, 1 CPU each), started and
stopped here: runtime loads and unloads on 2 Ray Serve replicas under concurrent requests (behind Serve's proxy, and
behind the by-set ingress), a replica restarted after a load, and `dlp-lora eval --ray-address` against the
one-machine `eval`. The no-cluster message of `eval` / `reproduce --ray-address`: tests/test_ray_address.py."""

from __future__ import annotations

import concurrent.futures
import json
import random
import subprocess
import sys
import threading
import time

import httpx
import pytest

from dlplora.serve import ServeConfig
from dlplora.testing import random_peft_adapter, random_peft_library
from raycluster import free_port, local_ray_cluster
from wordplugin import train_word_plugin

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

KEY = "sk-ray-live-0123"
WORDS = {"alpha": ("add", "sum", "plus", "number", "total", "seven"),
         "beta": ("bonjour", "maison", "voiture", "chat", "pomme", "rouge")}
GAMMA = ("planet", "orbit", "comet", "galaxy", "star", "moon")


# ---------------------------------------------------------------- on the cluster

@pytest.fixture(scope="module")
def cluster():
    # Serve's proxy (on the head only: both nodes share 127.0.0.1) sends requests to either node's replica, not
    # mostly to its own node's: both replicas answer, under load and for /v1/models
    with local_ray_cluster(before_shutdown=lambda: serve.shutdown(), cpus=1, worker_cpus=1,
                           env={"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}) as address:
        yield address


def _prompt(words, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(8))


def _models(http, want_replicas: int = 2, tries: int = 40) -> dict:
    """{replica: [(id, routing state)] of /v1/models} from `want_replicas` replicas (Serve's router picks)."""
    seen = {}
    for _ in range(tries):
        r = http.get("/v1/models")
        assert r.status_code == 200, r.text
        seen[r.headers["x-dlp-lora-replica"]] = [(m["id"], m.get("routing")) for m in r.json()["data"]]
        if len(seen) >= want_replicas:
            break
    assert len(seen) == want_replicas, seen
    return seen


class Load:
    """Chat requests from 4 threads until stopped: pinned to alpha, and routed by the plugin."""

    def __init__(self, url):
        self.url, self.stop, self.codes = url, threading.Event(), []
        self.pool = concurrent.futures.ThreadPoolExecutor(4)
        self.futures = [self.pool.submit(self.run, i) for i in range(4)]

    def run(self, i):
        with httpx.Client(base_url=self.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            k = 0
            while not self.stop.is_set():
                model = "alpha" if i % 2 else "dlp-lora"
                r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 4, "messages": [
                    {"role": "user", "content": _prompt(WORDS["alpha"] + GAMMA, f"{i}-{k}")}]})
                self.codes.append(r.status_code)
                k += 1

    def end(self) -> list[int]:
        self.stop.set()
        for f in self.futures:
            f.result()
        self.pool.shutdown()
        return self.codes


def _library(root, tiny_model):
    """alpha and beta with routing prompts and a word router; gamma, to load, under root/adapters."""
    from dlplora.library import Library

    lib = random_peft_library(root / "lib", tiny_model, {"alpha": (4, 8, ["q_proj", "v_proj"]),
                                                         "beta": (4, 8, ["q_proj", "v_proj"])}, std=0.5, seed=10)
    library = Library.open(lib)
    for name, bag in WORDS.items():
        library.save_routing_prompts(name, [{"input": _prompt(bag, f"{name}{i}")} for i in range(40)])
    train_word_plugin(lib, WORDS)
    random_peft_adapter(tiny_model, root / "adapters" / "gamma", rank=4, targets=("q_proj", "v_proj"), seed=77, std=0.5)
    return lib, root / "adapters"


@pytest.fixture(scope="module")
def proxy(cluster):
    from dlplora.cluster import join_ray

    join_ray(cluster)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    return f"http://127.0.0.1:{port}"


def _deploy(lib, adapters, name, placement):
    from dlplora.serve.ray_serve import deploy, replica_spec

    config = ServeConfig(max_batch_size=8, max_queue=64, max_tokens_limit=16, request_timeout=60, api_key=KEY,
                         allow_runtime_adapters=True, adapter_root=str(adapters))
    deploy(replica_spec(lib, config, threads=1), name=name, replicas=2, placement=placement, cpus=1.0)


def _routed_to(http, words, seed) -> str | None:
    """The top adapter the plugin routed a prompt of `words` to (None: the base model)."""
    out = http.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
        {"role": "user", "content": _prompt(words, seed)}]}).json()
    return out["routing"]["adapters"][0]["name"] if out["routing"]["adapters"] else None


def test_load_and_unload_on_two_replicas(cluster, proxy, tmp_path_factory, tiny_model):
    from dlplora.library import Library
    from dlplora.serve.ray_serve import replica_actors, running_replicas

    lib, adapters = _library(tmp_path_factory.mktemp("raylive"), tiny_model)
    _deploy(lib, adapters, "live", "serve")
    url = proxy
    http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
    try:
        nodes = {a["NodeID"] for a in ray.nodes() if a["Alive"]}
        assert len(nodes) == 2
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "x"}, headers={"Authorization": "Bearer no"}
                         ).status_code == 401
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"})
        assert r.status_code == 403, r.text  # outside --adapter-root

        # a load with examples, under concurrent requests
        load = Load(url)
        time.sleep(1.0)
        t0 = time.monotonic()
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": "gamma",
                                                     "examples": [_prompt(GAMMA, f"g{i}") for i in range(30)]})
        assert r.status_code == 200, r.text
        assert r.json()["routing"] == "training"
        views = _models(http)
        # served by both replicas once it returned; training, or routable where the retrained router already arrived
        assert {json.dumps([m for m, _ in v]) for v in views.values()} == {json.dumps(
            ["llama", "dlp-lora", "alpha", "beta", "gamma"])}, views
        assert all(dict(v)["gamma"] in ("training", "routable") for v in views.values()), views
        while True:  # routed on every replica
            views = _models(http)
            if all(("gamma", "routable") in v for v in views.values()):
                break
            assert time.monotonic() - t0 < 60, views
            time.sleep(0.5)
        assert len({json.dumps(v) for v in views.values()}) == 1, views
        routable_s = time.monotonic() - t0
        codes = load.end()
        assert codes and set(codes) == {200}, [c for c in codes if c != 200][:5]
        print(f"gamma routable on both replicas {routable_s:.1f} s after the load began; {len(codes)} requests, "
              f"all 200")
        assert "gamma" in Library.open(lib).all_names
        assert json.loads((lib / "plugin" / "plugin.json").read_text())["labels"] == ["alpha", "beta", "gamma"]
        assert all(_routed_to(http, GAMMA, f"q{seed}") == "gamma" for seed in range(6))  # on both replicas

        # a replica restarted after the load comes up with gamma, routable
        before = set(replica_actors("live"))
        ray.kill(next(iter(replica_actors("live").values())), no_restart=True)
        t1 = time.monotonic()
        while not (running_replicas("live") == 2 and set(replica_actors("live")) - before):
            assert time.monotonic() - t1 < 120
            time.sleep(0.5)
        views = _models(http, tries=60)
        assert len({json.dumps(v) for v in views.values()}) == 1, views
        assert ("gamma", "routable") in next(iter(views.values()))

        # an unload under concurrent requests
        load = Load(url)
        time.sleep(1.0)
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
        assert r.status_code == 200, r.text
        views = _models(http)
        assert len({json.dumps(v) for v in views.values()}) == 1, views
        assert "gamma" not in {m for m, _ in next(iter(views.values()))}
        codes = load.end()
        assert codes and set(codes) == {200}, [c for c in codes if c != 200][:5]
        assert "gamma" not in Library.open(lib).all_names and not (lib / "adapters" / "gamma").exists()
        r = http.post("/v1/chat/completions", json={"model": "gamma", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404
    finally:
        http.close()
        serve.delete("live")


def test_load_and_unload_behind_the_ingress(cluster, proxy, tmp_path_factory, tiny_model):
    """--placement by-set: the ingress routes with its own view of the library, which follows the replicas' version."""
    lib, adapters = _library(tmp_path_factory.mktemp("raybyset"), tiny_model)
    _deploy(lib, adapters, "byset", "by-set")
    http = httpx.Client(base_url=proxy, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
    try:
        assert _routed_to(http, GAMMA, "x") != "gamma"
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": "gamma",
                                                     "examples": [_prompt(GAMMA, f"g{i}") for i in range(30)]})
        assert r.status_code == 200, r.text
        t0 = time.monotonic()
        while _routed_to(http, GAMMA, f"w{time.monotonic()}") != "gamma":  # routed at the ingress, once it re-read
            assert time.monotonic() - t0 < 60
            time.sleep(0.5)
        assert all(_routed_to(http, GAMMA, f"q{seed}") == "gamma" for seed in range(4))
        load = Load(proxy)
        time.sleep(1.0)
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
        assert r.status_code == 200, r.text
        time.sleep(1.0)
        codes = load.end()
        assert codes and set(codes) == {200}, [c for c in codes if c != 200][:5]
        assert all(_routed_to(http, GAMMA, f"u{seed}") != "gamma" for seed in range(4))
    finally:
        http.close()
        serve.delete("byset")


def test_eval_on_the_cluster_equals_one_machine(cluster, tiny_data, tiny_model, tmp_path):
    """The one-machine eval runs in a fresh process (where it must not import Ray), the other on the cluster's 2
    workers: the same predictions, key by key, and the same scores; then a resume on one machine from the cluster's
    cache computes nothing."""
    from dlplora.eval.harness import run_evaluation
    from dlplora.eval.settings import EvalConfig

    lib = random_peft_library(tmp_path / "lib", tiny_model, {"quiz": (4, 8, ["q_proj", "v_proj"]),
                                                             "sums": (4, 8, ["q_proj", "v_proj"])}, std=0.5, seed=3)
    train_word_plugin(lib, {"quiz": ("which", "option", "choose", "answer"), "sums": ("add", "sum", "plus", "total")})
    kw = dict(data=str(tiny_data), settings=["composite-26", "multiturn"], methods=["base", "lora", "dlp", "merge-all"],
              model=str(tiny_model), progress=False, batch_size=4, mcq_exact_match=True)
    code = ("import sys, json, torch\nfrom dlplora.eval.harness import run_evaluation\n"
            "from dlplora.eval.settings import EvalConfig\ntorch.set_num_threads(1)  # as each worker (1 CPU)\n"
            f"run_evaluation(EvalConfig({str(lib)!r}, out={str(tmp_path / 'here')!r}, **json.loads(sys.argv[1])), "
            "log=lambda *a: None)\n"
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\nassert not bad, bad\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, json.dumps(kw)], capture_output=True, text=True, timeout=600)
    t_here = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    here = json.loads((tmp_path / "here" / "results.json").read_text())
    # the cluster's run in a fresh interpreter too: this process holds Ray state (connections, a Serve app's actors)
    # from the tests before, which is not what a user's `eval --ray-address` starts from
    cluster_code = ("import sys, json, time, ray\nfrom dlplora.cluster import join_ray\n"
                    "from dlplora.eval.harness import run_evaluation\nfrom dlplora.eval.settings import EvalConfig\n"
                    f"join_ray({cluster!r})\n"
                    "for _ in range(120):  # the previous tests' replicas gone: both CPUs free for the 2 workers\n"
                    "    if ray.available_resources().get('CPU', 0) >= 2: break\n    time.sleep(1)\n"
                    f"run_evaluation(EvalConfig({str(lib)!r}, out={str(tmp_path / 'there')!r}, ray_address={cluster!r}, "
                    "**json.loads(sys.argv[1])), log=print)\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", cluster_code, json.dumps(kw)], capture_output=True, text=True, timeout=600)
    t_there = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    logs = r.stdout.splitlines()
    there = json.loads((tmp_path / "there" / "results.json").read_text())
    print(f"eval in one process {t_here:.1f} s (its start included), on the 2-node cluster {t_there:.1f} s")
    assert any("2 workers of 1 CPU" in line for line in logs), logs
    assert there["cache"]["new_predictions"] == here["cache"]["new_predictions"] > 0

    def predictions(out):
        recs = {}
        for f in sorted((out / "cache").glob("*.jsonl")):
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                recs[rec["k"]] = rec["v"]
        return recs

    mine, theirs = predictions(tmp_path / "here"), predictions(tmp_path / "there")
    assert mine == theirs  # the same predictions, key by key
    assert len(list((tmp_path / "there" / "cache").glob("*.*.jsonl"))) >= 2  # written by the workers themselves
    for s, res in here["settings"].items():
        for m, entry in res["methods"].items():
            assert there["settings"][s]["methods"][m]["mean"] == entry["mean"], (s, m)
    # resumed on one machine from the cluster's cache: nothing left to compute
    again = run_evaluation(EvalConfig(lib, out=tmp_path / "there", **kw), log=lambda *a: None)
    assert again["cache"]["new_predictions"] == 0
