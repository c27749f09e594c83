"""Runtime adapters on a real server: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's shapes), the
routing states in /v1/models, routing to a new adapter once the router has retrained, requests in flight across
loads and unloads, the adapter root, bad adapters, the API key, and loads that arrive together. A tiny random model,
library and plugin; httpx and the official `openai` client against uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from dlplora.engine import DLPLoRA
from dlplora.library import Library
from dlplora.serve import ServeConfig, ServerThread, create_app
from dlplora.testing import random_peft_adapter, random_peft_library, tiny_model_dir

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "sk-live-0123456789"
SPECS = {"alpha": (4, 8, ["q_proj", "v_proj"]), "beta": (8, 8, ["q_proj", "v_proj"]), "gamma": (2, 4, ["q_proj"])}
WORDS = {"alpha": ("add", "sum", "plus", "number", "total", "seven"),
         "beta": ("bonjour", "maison", "voiture", "chat", "pomme", "rouge"),
         "gamma": ("red", "green", "blue", "yellow", "ball", "table"),
         "delta": ("guitar", "song", "drum", "piano", "melody", "rhythm")}
SLOW = [0.0]  # seconds each forward pass of the live server sleeps (a request stays in flight)


def _prompts(name, n, seed=0):
    rng = random.Random(f"{name}{seed}")
    return [" ".join(rng.choice(WORDS[name]) for _ in range(8)) for _ in range(n)]


@pytest.fixture(scope="module")
def base_lib(tmp_path_factory, tiny_model):
    """alpha, beta, gamma with their routing prompts, and a tiny router trained on them."""
    from dlplora.plugin import Plugin, calibrate_base_threshold

    root = tmp_path_factory.mktemp("live")
    lib_dir = random_peft_library(root / "lib", tiny_model, SPECS, std=0.5, seed=10)
    lib = Library.open(lib_dir)
    texts, labels = [], []
    for name in SPECS:
        prompts = _prompts(name, 40)
        lib.save_routing_prompts(name, [{"input": p} for p in prompts])
        texts += prompts
        labels += [name] * len(prompts)
    plugin = Plugin.train(texts, labels, list(SPECS), epochs=8, batch_size=32, bits=12, dim=8, hidden=(32, 32, 16),
                          seed=0)
    calibrate_base_threshold(plugin, texts, labels, texts, false_rate=0.0)
    plugin.save(lib.plugin_dir())
    return lib_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model):
    """The adapter root: adapters to load, good and bad."""
    d = tmp_path_factory.mktemp("adapters")
    for i, (name, targets) in enumerate({"delta": ("q_proj", "v_proj"), "epsilon": ("q_proj",),
                                         "zeta": ("o_proj",), "c1": ("q_proj",), "c2": ("v_proj",),
                                         "c3": ("q_proj", "v_proj")}.items()):
        random_peft_adapter(tiny_model, d / name, rank=4, targets=targets, seed=50 + i, std=0.5)
    other = tiny_model_dir(d.parent / "other-model", hidden=32)
    random_peft_adapter(other, d / "wrongbase", rank=4, seed=1)
    for name, damage in (("corrupt", "truncate"), ("mts", "modules_to_save"), ("foreign", "fingerprint")):
        shutil.copytree(d / "delta", d / name)
        if damage == "truncate":
            w = d / name / "adapter_model.safetensors"
            w.write_bytes(w.read_bytes()[:100])
        elif damage == "modules_to_save":
            cfg = json.loads((d / name / "adapter_config.json").read_text())
            (d / name / "adapter_config.json").write_text(json.dumps(cfg | {"modules_to_save": ["lm_head"]}))
        else:
            (d / name / "dlp_adapter.json").write_text(json.dumps({"base_model": {"name": "other",
                                                                                  "fingerprint": "f" * 16}}))
    (d / "delta.jsonl").write_text("".join(json.dumps(p) + "\n" for p in _prompts("delta", 30)))
    return d


@pytest.fixture(scope="module")
def server(base_lib, root, tmp_path_factory):
    lib = tmp_path_factory.mktemp("served") / "lib"
    shutil.copytree(base_lib, lib)
    engine = DLPLoRA.from_library(lib)
    engine.model.lm_head.register_forward_pre_hook(lambda *a: time.sleep(SLOW[0]))
    cfg = ServeConfig(max_batch_size=8, max_tokens_limit=64, request_timeout=60, api_key=KEY,
                      allow_runtime_adapters=True, adapter_root=str(root))
    app = create_app(engine, cfg)
    with ServerThread(app) as srv:
        srv.lib, srv.live = lib, app.state.dlp.live
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _err(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def _states(http):
    return {m["id"]: m["routing"] for m in http.get("/v1/models").json()["data"] if "routing" in m}


def _consistent(http, server):
    """/v1/models and library.json list the same adapters, in the same order."""
    served = list(_states(http))
    assert served == Library.open(server.lib).names
    return served


def _chat(http, content, **kw):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 4,
                                                "model": "dlp-lora", "return_token_ids": True} | kw)
    assert r.status_code == 200, r.text
    return r.json()


def _top(resp):
    ads = resp["routing"]["adapters"]
    return ads[0]["name"] if ads else None


# ---------------------------------------------------------------- off, and the API key

def test_the_routes_are_off_without_the_flag_and_need_the_api_key(base_lib, server):
    engine = DLPLoRA.from_library(base_lib)
    with ServerThread(create_app(engine, ServeConfig(max_batch_size=2))) as off, \
            httpx.Client(base_url=off.url, timeout=30) as c:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            err = _err(c.post(path, json={"lora_name": "delta", "lora_path": "/x"}), 404)
            assert "--allow-runtime-adapters" in err["message"]
        assert [m["routing"] for m in c.get("/v1/models").json()["data"][2:]] == ["routable"] * 3
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        body = {"lora_name": "delta", "lora_path": "delta"}
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            _err(anon.post(path, json=body), 401, code="invalid_api_key")
            _err(anon.post(path, json=body, headers={"Authorization": "Bearer sk-wrong"}), 401, code="invalid_api_key")
    assert "delta" not in server.live.names


# ---------------------------------------------------------------- load, route, unload

def test_load_pinned_only_then_routable_after_the_router_retrains(http, client, server, root):
    assert _states(http) == {"alpha": "routable", "beta": "routable", "gamma": "routable"}
    _err(http.post("/v1/chat/completions", json={"model": "epsilon", "messages": [{"role": "user", "content": "x"}]}),
         404, code="model_not_found")
    # no examples: pinned-only
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "epsilon", "lora_path": str(root / "epsilon")})
    assert r.status_code == 200, r.text
    assert r.json()["routing"] == "pinned-only" and "added successfully" in r.json()["message"]
    assert _consistent(http, server) == ["alpha", "beta", "gamma", "epsilon"]
    pinned = client.chat.completions.create(model="epsilon", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert pinned.routing == {"adapters": [{"name": "epsilon", "weight": 1.0}], "source": "pinned"}
    mixed = _chat(http, "hi", adapters={"epsilon": 0.5, "alpha": 0.5})
    assert {a["name"] for a in mixed["routing"]["adapters"]} == {"epsilon", "alpha"}

    # with examples (a list and a file under the root): training, then routable, and delta prompts go to delta
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": "delta",
                                                 "examples": _prompts("delta", 10, seed=1),
                                                 "examples_path": "delta.jsonl"})
    assert r.status_code == 200, r.text
    assert r.json()["routing"] == "training" and r.json()["examples"] == 40
    t0 = time.monotonic()
    seen = []  # the choice for a delta prompt routed while delta was still training: never delta
    while (state := _states(http)["delta"]) != "routable":
        assert state == "training" and time.monotonic() - t0 < 60
        top = _top(_chat(http, _prompts("delta", 1, seed=len(seen))[0]))
        if _states(http)["delta"] == "training":  # still training after the answer: it was routed while training
            seen.append(top)  # (else the router may have been swapped in between the two polls, and delta is right)
        time.sleep(0.05)
    assert "delta" not in seen
    assert _states(http) == {"alpha": "routable", "beta": "routable", "gamma": "routable", "epsilon": "pinned-only",
                             "delta": "routable"}
    for p in _prompts("delta", 5, seed=9):
        assert _top(_chat(http, p)) == "delta"
    for name in ("alpha", "beta", "gamma"):  # the old adapters are still routed to
        assert _top(_chat(http, _prompts(name, 1, seed=5)[0])) == name
    for p in _prompts("delta", 3, seed=11) + _prompts("alpha", 3, seed=11):
        assert "epsilon" not in {a["name"] for a in _chat(http, p)["routing"]["adapters"]}
    lib = Library.open(server.lib)
    assert len(lib.routing_prompts("delta")) == 40 and lib.entry("delta")["rank"] == 4
    assert json.loads((lib.plugin_dir() / "plugin.json").read_text())["labels"] == ["alpha", "beta", "gamma", "delta"]
    assert [c["op"] for c in server.live.changes][-1] == "retrain"

    # unload: gone from /v1/models and library.json, files deleted, 404 for requests naming it
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "epsilon"})
    assert r.status_code == 200 and "removed successfully" in r.json()["message"]
    assert _consistent(http, server) == ["alpha", "beta", "gamma", "delta"]
    assert not (server.lib / "adapters" / "epsilon").exists()
    _err(http.post("/v1/chat/completions", json={"model": "epsilon", "messages": [{"role": "user", "content": "x"}]}),
         404, code="model_not_found")
    _err(http.post("/v1/unload_lora_adapter", json={"lora_name": "epsilon"}), 404, code="model_not_found")
    assert http.get("/health").json()["adapters"] == ["alpha", "beta", "gamma", "delta"]


def test_a_request_in_flight_keeps_its_set_through_a_load_and_an_unload_waits_for_it(http, server, root):
    body = {"messages": [{"role": "user", "content": "The quick brown fox"}], "max_tokens": 40, "return_token_ids": True}
    mix = body | {"model": "dlp-lora", "adapters": {"alpha": 0.5, "beta": 0.5}}
    solo = http.post("/v1/chat/completions", json=mix).json()
    solo_g = http.post("/v1/chat/completions", json=body | {"model": "gamma"}).json()
    assert solo["usage"]["completion_tokens"] == 40 == solo_g["usage"]["completion_tokens"]
    SLOW[0] = 0.03
    try:
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(http.post, "/v1/chat/completions", json=mix)
            while http.get("/health").json()["running"] < 1:
                time.sleep(0.01)
            # zeta targets o_proj, which no adapter did: those layers are wrapped while the row decodes
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "zeta", "lora_path": "zeta"})
            assert r.status_code == 200 and not running.done()
            out = running.result().json()
            assert out["choices"][0]["token_ids"] == solo["choices"][0]["token_ids"]
            assert out["routing"] == solo["routing"]

            # unload gamma while a request uses it: it is gone at once for new requests, and the call returns
            # after that request has finished, whose output is its solo output
            busy = pool.submit(http.post, "/v1/chat/completions", json=body | {"model": "gamma"})
            while http.get("/health").json()["running"] < 1:
                time.sleep(0.01)
            unload = pool.submit(http.post, "/v1/unload_lora_adapter", json={"lora_name": "gamma"})
            while "gamma" in _states(http):
                time.sleep(0.01)
            _err(http.post("/v1/chat/completions", json=body | {"model": "gamma"}), 404, code="model_not_found")
            assert not busy.done() and not unload.done()
            assert unload.result().status_code == 200
            done = busy.result().json()
            assert done["choices"][0]["token_ids"] == solo_g["choices"][0]["token_ids"]
            assert done["routing"] == solo_g["routing"]
    finally:
        SLOW[0] = 0.0
    assert "gamma" not in server.live.engine.fusion  # out of the stacks once the unload returned
    assert _consistent(http, server)[-1] == "zeta"
    # routed gamma-like prompts never reach gamma (unloaded; the router still has its label until it retrains)
    for p in _prompts("gamma", 4, seed=3):
        assert "gamma" not in {a["name"] for a in _chat(http, p)["routing"]["adapters"]}
    after = http.post("/v1/chat/completions", json=mix).json()  # the stacks changed: the same mix, the same output
    assert after["choices"][0]["token_ids"] == solo["choices"][0]["token_ids"]


# ---------------------------------------------------------------- refusals

def test_bad_loads_are_refused_with_4xx_and_change_nothing(http, server, root, tmp_path):
    before = _consistent(http, server)
    manifest = (server.lib / "library.json").read_text()
    outside = tmp_path / "outside"
    shutil.copytree(root / "delta", outside)
    (root / "link").unlink(missing_ok=True)
    os.symlink(outside, root / "link")
    sneaky = root / "sneaky"
    shutil.rmtree(sneaky, ignore_errors=True)
    sneaky.mkdir()
    shutil.copy(root / "delta" / "adapter_config.json", sneaky)
    os.symlink(outside / "adapter_model.safetensors", sneaky / "adapter_model.safetensors")
    cases = [
        ({"lora_name": "x1", "lora_path": str(outside)}, 403, "path_not_allowed"),
        ({"lora_name": "x1", "lora_path": "../" + outside.name}, 403, "path_not_allowed"),
        ({"lora_name": "x1", "lora_path": str(root / ".." / root.name / ".." / outside.name)}, 403, None),
        ({"lora_name": "x1", "lora_path": "link"}, 403, "path_not_allowed"),
        ({"lora_name": "x1", "lora_path": "sneaky"}, 403, "path_not_allowed"),
        ({"lora_name": "x1", "lora_path": "delta", "examples_path": str(outside / "adapter_config.json")}, 403, None),
        ({"lora_name": "x1", "lora_path": "nothing-here"}, 404, "adapter_not_found"),
        ({"lora_name": "x1", "lora_path": "wrongbase"}, 400, "invalid_adapter"),
        ({"lora_name": "x1", "lora_path": "foreign"}, 400, "invalid_adapter"),
        ({"lora_name": "x1", "lora_path": "corrupt"}, 400, "invalid_adapter"),
        ({"lora_name": "x1", "lora_path": "mts"}, 400, "invalid_adapter"),
        ({"lora_name": "alpha", "lora_path": "delta"}, 400, "adapter_exists"),
        ({"lora_name": "../x", "lora_path": "delta"}, 400, None),
        ({"lora_name": "x1"}, 400, None),
        ({"lora_path": "delta"}, 400, None),
        ({"lora_name": "x1", "lora_path": "delta", "examples": "one prompt"}, 400, None),
        ({"lora_name": "x1", "lora_path": "delta", "examples": [""]}, 400, None),
        ({"lora_name": "x1", "lora_path": "delta\u0000"}, 400, None),
        ({"lora_name": "x1", "lora_path": ["delta"]}, 400, None),
    ]
    words = {"wrongbase": "shape mismatch", "foreign": "trained on base model", "corrupt": "corrupt",
             "mts": "modules_to_save"}
    for body, status, code in cases:
        err = _err(http.post("/v1/load_lora_adapter", json=body), status, code)
        if str(body.get("lora_path")) in words:
            assert words[body["lora_path"]] in err["message"], err
    # still in the stacks, no longer served (an unload whose requests outlived its call): a load of the name waits
    from dlplora.adapters import load_peft_adapter

    ghost, sch, fusion = load_peft_adapter(root / "c1", "ghost"), server.live.state.scheduler, server.live.engine.fusion
    sch.call(lambda: fusion.add_adapter(ghost))
    _err(http.post("/v1/load_lora_adapter", json={"lora_name": "ghost", "lora_path": "c1"}), 409, "adapter_unloading")
    sch.call(lambda: fusion.remove_adapter("ghost"))
    _err(http.post("/v1/unload_lora_adapter", json={"lora_name": "nobody"}), 404, "model_not_found")
    _err(http.post("/v1/unload_lora_adapter", json={}), 400)
    _err(http.post("/v1/load_lora_adapter", content=b"[1]", headers={"content-type": "application/json"}), 400)
    assert http.get("/health").json()["status"] == "ok"
    assert _consistent(http, server) == before and (server.lib / "library.json").read_text() == manifest
    assert not (server.lib / "adapters" / "x1").exists() and not list((server.lib / "adapters").glob(".*"))
    assert _chat(http, "hello")["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_loads_and_unloads_are_serialised(http, server, root):
    start = len(server.live.changes)
    with ThreadPoolExecutor(3) as pool:
        rs = list(pool.map(lambda n: http.post("/v1/load_lora_adapter", json={"lora_name": n, "lora_path": n}),
                           ("c1", "c2", "c3")))
    assert [r.status_code for r in rs] == [200] * 3, [r.text for r in rs]
    served = _consistent(http, server)
    assert set(served[-3:]) == {"c1", "c2", "c3"}
    loads = [c for c in server.live.changes[start:] if c["op"] == "load"]
    spans = sorted((c["began"], c["at"]) for c in loads)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # one after the other
    with ThreadPoolExecutor(3) as pool:
        rs = list(pool.map(lambda n: http.post("/v1/unload_lora_adapter", json={"lora_name": n}), ("c1", "c2", "c3")))
    assert [r.status_code for r in rs] == [200] * 3
    assert _consistent(http, server) == served[:-3]
    for n in ("alpha", "c1"):
        ok = n in served[:-3]
        r = http.post("/v1/chat/completions", json={"model": n, "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 2})
        assert r.status_code == (200 if ok else 404)


# ---------------------------------------------------------------- fuzzing the load request

def test_load_requests_of_any_shape_get_4xx_never_an_exception(root):
    from hypothesis import given
    from hypothesis import strategies as st

    from dlplora.serve.adapters_api import parse_load
    from dlplora.serve.config import APIError

    from fuzzing import FUZZ, json_values, short_texts

    paths = st.one_of(short_texts, st.sampled_from(["delta", "../delta", "/etc", "link", "sneaky", "delta/..", "~",
                                                    str(root), str(root / "delta"), "a\x00b", "x" * 5000]))
    bodies = st.fixed_dictionaries({}, optional={"lora_name": st.one_of(short_texts, json_values),
                                                 "lora_path": st.one_of(paths, json_values),
                                                 "examples": st.one_of(st.lists(short_texts, max_size=4), json_values),
                                                 "examples_path": st.one_of(paths, json_values)})

    @FUZZ
    @given(bodies, st.sampled_from([str(root), None]))
    def check(body, adapter_root):
        try:
            name, path, rows = parse_load(body, adapter_root)
        except APIError as exc:
            assert 400 <= exc.status < 500 and exc.message
            return
        assert path.is_dir() and (adapter_root is None or path.is_relative_to(adapter_root))
        assert rows is None or all(r["input"].strip() for r in rows)

    check()
