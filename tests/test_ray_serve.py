"""Scale-out serving: a real local Ray cluster (head on 127.0.0.1, 2 CPUs), the server as 2 Ray Serve replicas of
1 CPU each, talked to with the official `openai` client through Serve's HTTP proxy; placement by Serve's default
router, then by adapter set behind the ingress. The cluster is stopped at the end, even on failure."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from dlplora.engine import DLPLoRA
from dlplora.serve import ServeConfig, ServerThread, create_app
from dlplora.testing import random_peft_library
from raycluster import free_port, local_ray_cluster
from wordplugin import train_word_plugin

KEY = "sk-ray-test-0123"
SPECS = {"alpha": (4, 8, ["q_proj", "v_proj"]), "beta": (8, 8, ["q_proj", "v_proj"])}
WORDS = {"alpha": ("add", "sum", "plus", "number", "total", "seven"),
         "beta": ("bonjour", "maison", "voiture", "chat", "pomme", "rouge")}
ALPHA_PROMPT = [{"role": "user", "content": "add the sum plus seven number total"}]


def test_serving_without_ray_address_does_not_import_ray():
    """`dlp-lora serve` without --ray-address (the app, the CLI's parser and its checks) never imports Ray; nor do
    `eval` and `reproduce` (the harness, the pipeline, their flags; tests/test_ray_cluster.py runs a whole eval)."""
    code = ("import sys\nimport dlplora.serve.app, dlplora.serve\nfrom dlplora.cli import build_parser\n"
            "from dlplora.cli.serve import config_from_args\n"
            "import dlplora.eval.harness, dlplora.pipelines.reproduce, dlplora.serve.live\n"
            "args = build_parser().parse_args(['serve', '--library', 'lib', '--threads', '1'])\n"
            "config_from_args(args)\n"
            "assert args.ray_address is None and args.replicas is None\n"
            "for argv in (['eval', '--library', 'lib'], ['reproduce']):\n"
            "    assert build_parser().parse_args(argv).ray_address is None\n"
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "assert not bad, bad\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_ray_flags_are_checked_before_anything_loads(tmp_path):
    from dlplora.cli import build_parser
    from dlplora.errors import DLPLoRAError

    for argv, msg in ((["--replicas", "2"], "need --ray-address"),
                      (["--ray-address", "auto", "--replicas", "2", "--max-replicas", "3"], "not both"),
                      (["--ray-address", "auto", "--min-replicas", "3", "--max-replicas", "2"], "over --max"),
                      (["--ray-address", "auto", "--max-replicas", "2"], "needs both")):
        args = build_parser().parse_args(["serve", "--library", str(tmp_path), *argv])
        with pytest.raises(DLPLoRAError) as exc:
            args.func(args)
        assert msg in str(exc.value), (argv, exc.value)


def test_sum_of_replica_metrics_adds_samples_and_keeps_families_together():
    from dlplora.serve.metrics import Metrics, sum_expositions

    a, b = Metrics(), Metrics()
    a.count_request("/v1/chat/completions", 200)
    a.count_request("/v1/chat/completions", 200)
    b.count_request("/v1/chat/completions", 404)  # a label set only one replica has
    a.observe_batch(3)
    b.observe_batch(5)
    b.add_tokens(prompt=7, generated=2)
    text = sum_expositions([a.render(["x"]), b.render(["x"])])
    lines = text.splitlines()
    assert 'dlp_lora_requests_total{endpoint="/v1/chat/completions",status="200"} 2' in lines
    assert 'dlp_lora_requests_total{endpoint="/v1/chat/completions",status="404"} 1' in lines
    assert "dlp_lora_batch_size_sum 8" in lines and "dlp_lora_batch_size_count 2" in lines
    assert 'dlp_lora_batch_size_bucket{le="4"} 1' in lines and 'dlp_lora_batch_size_bucket{le="+Inf"} 2' in lines
    assert "dlp_lora_prompt_tokens_total 7" in lines
    # each family's samples follow its HELP / TYPE lines, none after another family's
    family = None
    for line in lines:
        if line.startswith("# TYPE "):
            family = line.split()[2]
        elif not line.startswith("#"):
            assert line.startswith(family), (family, line)
    assert text.count("# TYPE dlp_lora_requests_total") == 1


def test_a_routed_set_from_the_ingress_is_used_only_where_trusted(tiny_model, tmp_path, one_thread):
    """Behind the Ray Serve ingress the replica takes the set the ingress routed to (source stays 'plugin'); a
    server that does not trust the header ignores it; a malformed header is a 400."""
    from dlplora.serve.protocol import ROUTED_HEADER

    lib = random_peft_library(tmp_path / "lib", tiny_model, SPECS, std=0.5, seed=10)
    train_word_plugin(lib, WORDS)
    engine = DLPLoRA.from_library(lib)
    header = {ROUTED_HEADER: json.dumps({"adapters": {"beta": 1.0}, "why": None})}
    body = {"messages": ALPHA_PROMPT, "max_tokens": 2}
    for trusted in (True, False):
        with ServerThread(create_app(engine, ServeConfig(max_batch_size=4, trust_routing_header=trusted))) as srv:
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=header, timeout=60)
            assert r.status_code == 200, r.text
            routing = r.json()["routing"]
            assert routing["source"] == "plugin"
            assert routing["adapters"][0]["name"] == ("beta" if trusted else "alpha")
            if trusted:
                r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={ROUTED_HEADER: "{"}, timeout=60)
                assert r.status_code == 400 and ROUTED_HEADER in r.json()["error"]["message"]
                r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)  # no header: it routes
                assert r.json()["routing"]["adapters"][0]["name"] == "alpha"
                # routed at an ingress that has not seen an unload yet: the replica routes it itself
                gone = {ROUTED_HEADER: json.dumps({"adapters": {"gamma": 1.0}, "why": None})}
                r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=gone, timeout=60)
                assert r.status_code == 200 and r.json()["routing"]["adapters"][0]["name"] == "alpha", r.text
    # a replica that does not follow the library's actor (serve/live_replicas.py) refuses runtime changes
    with ServerThread(create_app(engine, ServeConfig(replicated=True, allow_runtime_adapters=True))) as srv:
        r = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "alpha"}, timeout=60)
        assert r.status_code == 501 and r.json()["error"]["code"] == "not_implemented"


# ---------------------------------------------------------------- on a real cluster

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")


def test_set_affinity_router_keeps_a_set_on_one_replica_within_a_bounded_load():
    import asyncio
    import collections
    from types import SimpleNamespace

    from dlplora.serve.ray_replicas import SetAffinityRouter

    router = SetAffinityRouter.__new__(SetAffinityRouter)  # its Serve state is not needed for the choice
    router.initialize_state(load_factor=1.25)
    rid = collections.namedtuple("ReplicaID", "unique_id")  # hashable, as Serve's
    replicas = [SimpleNamespace(replica_id=rid(f"r{i}")) for i in range(3)]

    def choose(key):
        req = SimpleNamespace(kwargs={"placement": key}, routing_context=SimpleNamespace(should_backoff=False))
        ranks = asyncio.run(router.choose_replicas(replicas, req))
        assert sorted(r.replica_id.unique_id for rank in ranks for r in rank) == ["r0", "r1", "r2"]
        return ranks[0][0]

    first = {k: choose(k) for k in ("a", "b", "c", "d", "e", "f")}
    assert all(choose(k) is r for k, r in first.items())  # the same replica while loads are even
    assert choose("a") is choose("a") and len({id(r) for r in first.values()}) > 1
    hot = first["a"]
    router.inflight[hot.replica_id] = 10  # over 1.25x the mean: its sets go to the next replica in their order
    assert choose("a") is not hot
    router.inflight[hot.replica_id] = 0
    assert choose("a") is hot
    any_two = asyncio.run(router.choose_replicas(replicas, SimpleNamespace(
        kwargs={}, routing_context=SimpleNamespace(should_backoff=False))))
    assert len(any_two) == 1 and len(any_two[0]) == 2  # no key: Serve's two random choices


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray_cluster(before_shutdown=lambda: serve.shutdown()) as address:
        yield address


@pytest.fixture(scope="module")
def lib(tmp_path_factory, tiny_model):
    root = random_peft_library(tmp_path_factory.mktemp("rayserve") / "lib", tiny_model, SPECS, std=0.5, seed=10)
    train_word_plugin(root, WORDS)
    return root


CONFIG = dict(max_batch_size=8, max_queue=32, max_tokens_limit=32, request_timeout=60, api_key=KEY)


@pytest.fixture(scope="module")
def reference(lib):
    """The single-process server's answers, for the same requests."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ServerThread(create_app(DLPLoRA.from_library(lib), ServeConfig(**CONFIG))) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
            yield {"routed": _chat(c, "dlp-lora", ALPHA_PROMPT), "beta": _chat(c, "beta", ALPHA_PROMPT)}
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def proxy(ray_cluster):
    from dlplora.serve.ray_serve import connect

    port = free_port()
    connect(ray_cluster, port=port)
    return f"http://127.0.0.1:{port}"


def _chat(client, model, messages, **kw):
    r = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8, **kw)
    out = r.parse()
    return {"text": out.choices[0].message.content, "routing": out.model_extra["routing"],
            "replica": r.headers.get("x-dlp-lora-replica")}


def _deploy(lib, name, placement):
    from dlplora.serve.ray_serve import deploy, replica_spec

    spec = replica_spec(lib, ServeConfig(**CONFIG), threads=1)
    t0 = time.perf_counter()
    deploy(spec, name=name, replicas=2, placement=placement, cpus=1.0)
    return time.perf_counter() - t0


def _ok_chats(text: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('dlp_lora_requests_total{endpoint="/v1/chat/completions",status="200"}'))


def _summed_metrics(http, replicas: int, ok_chats: int = 0) -> str:
    """/metrics once it sums `replicas` replicas and counts `ok_chats` answered chats (each replica pushes its
    counters every 2 s)."""
    end = time.monotonic() + 20
    while True:
        text = http.get("/metrics").text
        if (f"dlp_lora_replicas {replicas}" in text and _ok_chats(text) >= ok_chats) or time.monotonic() > end:
            return text
        time.sleep(0.5)


def _common_checks(proxy, reference):
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=KEY, max_retries=0, timeout=60)
    http = httpx.Client(base_url=proxy, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    assert [m.id for m in client.models.list().data][1:] == ["dlp-lora", "alpha", "beta"]
    # routed by the plugin, pinned, a mix: the single-process server's texts and routing
    routed = _chat(client, "dlp-lora", ALPHA_PROMPT)
    assert routed["text"] == reference["routed"]["text"] and routed["routing"] == reference["routed"]["routing"]
    assert routed["routing"]["source"] == "plugin" and routed["routing"]["adapters"][0]["name"] == "alpha"
    pinned = _chat(client, "beta", ALPHA_PROMPT)
    assert pinned["text"] == reference["beta"]["text"] and pinned["routing"]["source"] == "pinned"
    mix = _chat(client, "dlp-lora", ALPHA_PROMPT, extra_body={"adapters": {"alpha": 0.5, "beta": 0.5}})
    assert mix["routing"]["source"] == "explicit" and {a["name"] for a in mix["routing"]["adapters"]} == {"alpha",
                                                                                                          "beta"}
    # streamed: the same text as the whole answer
    stream = client.chat.completions.create(model="beta", messages=ALPHA_PROMPT, max_tokens=8, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == pinned["text"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # bad requests: 4xx in the OpenAI format
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="nope", messages=ALPHA_PROMPT, max_tokens=4)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="alpha", messages=ALPHA_PROMPT, max_tokens=-1)
    assert exc.value.param == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    # runtime adapters: off unless deployed with --allow-runtime-adapters (tests/test_ray_cluster.py), as one process
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 404 and "--allow-runtime-adapters" in r.json()["error"]["message"]
    assert http.get("/health").json()["status"] == "ok"
    return client, http


def test_two_replicas_behind_serves_proxy(ray_cluster, proxy, lib, reference):
    seconds = _deploy(lib, "rs-serve", "serve")
    print(f"deployed 2 replicas in {seconds:.1f} s")
    try:
        client, http = _common_checks(proxy, reference)
        seen = {_chat(client, "alpha", ALPHA_PROMPT)["replica"] for _ in range(12)}
        assert len(seen) == 2, seen  # Serve's router uses both replicas
        text = _summed_metrics(http, 2, ok_chats=16)
        assert "dlp_lora_replicas 2" in text, text[:400]
        assert _ok_chats(text) == 16  # the chats above, counted on both replicas, summed
    finally:
        serve.delete("rs-serve")


def test_placement_by_adapter_set(ray_cluster, proxy, lib, reference):
    seconds = _deploy(lib, "rs-byset", "by-set")
    print(f"deployed the ingress and 2 replicas in {seconds:.1f} s")
    try:
        client, http = _common_checks(proxy, reference)
        alpha = {_chat(client, "alpha", ALPHA_PROMPT)["replica"] for _ in range(4)}
        beta = {_chat(client, "beta", ALPHA_PROMPT)["replica"] for _ in range(4)}
        routed = {_chat(client, "dlp-lora", ALPHA_PROMPT)["replica"] for _ in range(3)}  # routed to alpha
        assert len(alpha) == 1 and len(beta) == 1 and routed == alpha, (alpha, beta, routed)
        # a client cannot pass its own routed set: the ingress drops the header, the replica routes
        r = http.post("/v1/chat/completions", json={"messages": ALPHA_PROMPT, "max_tokens": 4},
                      headers={"x-dlp-lora-routed": json.dumps({"adapters": {"beta": 1.0}, "why": None})})
        assert r.status_code == 200 and r.json()["routing"]["adapters"][0]["name"] == "alpha"
        assert "dlp_lora_replicas 2" in _summed_metrics(http, 2)
    finally:
        serve.delete("rs-byset")


def test_too_few_cpus_are_refused_before_deploying(ray_cluster, proxy, lib, tiny_model):
    """Issue 33.2: what the 2-CPU cluster cannot hold is refused, saying what is missing, before anything loads or
    is deployed (Serve would wait for the CPUs forever)."""
    from dlplora.bench.replicas import bench
    from dlplora.errors import DLPLoRAError
    from dlplora.serve.ray_serve import replica_spec, serve_on_ray

    with pytest.raises(DLPLoRAError, match=r"has 2 of its 2 CPUs free, and this benchmark \(1 \+ 1 x 2 replicas of 1 "
                                           r"CPU each, deployed together\) needs 3: 1 CPUs are missing"):
        bench(model=str(tiny_model), adapters=2, rank=4, replicas=2, threads=1, placements=("serve",),
              ray_address=ray_cluster, kill=False, log=lambda *a, **k: None)
    spec = replica_spec(lib, ServeConfig(**CONFIG), threads=1)
    with pytest.raises(DLPLoRAError, match="3 replicas of 1 CPU needs 3: 1 CPUs are missing"):
        serve_on_ray(spec, ray_cluster, port=free_port(), name="rs-big", replicas=3, cpus=1.0, log=lambda *a, **k: None)
    assert not serve.status().applications.get("rs-big")


def test_ctrl_c_while_deploying_deletes_the_application(ray_cluster, proxy, lib, monkeypatch):
    """Issue 33.3: a Ctrl-C after the replicas answer but before `deployed` is printed tears the application down
    (without --detach)."""
    from dlplora.serve import ray_serve

    real_deploy = ray_serve.deploy

    def deploy_then_ctrl_c(spec, name, **kw):
        real_deploy(spec, name=name, **kw)
        assert serve.status().applications[name].status == "RUNNING"
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_serve, "deploy", deploy_then_ctrl_c)
    spec = ray_serve.replica_spec(lib, ServeConfig(**CONFIG), threads=1)
    logs = []
    try:
        ray_serve.serve_on_ray(spec, ray_cluster, port=free_port(), name="rs-ctrl-c", replicas=1, cpus=1.0,
                               log=lambda msg, **k: logs.append(msg))
    except KeyboardInterrupt:
        pass
    try:
        assert "rs-ctrl-c" not in serve.status().applications, logs
        assert logs == ["deleted 'rs-ctrl-c'"]
    finally:
        serve.delete("rs-ctrl-c")
