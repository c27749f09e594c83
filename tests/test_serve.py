"""The OpenAI-compatible server: real uvicorn servers on 127.0.0.1, a tiny random model and library,
talked to with the official `openai` client and with raw HTTP (httpx)."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from dlplora.engine import DLPLoRA
from dlplora.serve import ServeConfig, ServerThread, create_app
from dlplora.testing import random_peft_library
from wordplugin import train_word_plugin

openai = pytest.importorskip("openai")

SPECS = {"alpha": (4, 8, ["q_proj", "v_proj"]), "beta": (8, 8, ["q_proj", "v_proj"]), "gamma": (2, 4, ["o_proj"])}
WORDS = {"alpha": ("add", "sum", "plus", "number", "total", "seven"),
         "beta": ("bonjour", "maison", "voiture", "chat", "pomme", "rouge"),
         "gamma": ("red", "green", "blue", "yellow", "ball", "table")}


pytestmark = pytest.mark.usefixtures("one_thread")


def _make_library(root, model_dir):
    return random_peft_library(root, model_dir, SPECS, std=0.5, seed=10)


OTHER = ("weather", "rain", "football", "goal", "guitar", "song", "forest", "river")  # no adapter's words


@pytest.fixture(scope="module")
def libs(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("serve")
    lib = _make_library(root / "lib", tiny_model)
    bare = root / "bare"
    shutil.copytree(lib, bare)  # the same adapters, no plugin
    train_word_plugin(lib, WORDS, OTHER)
    return lib, bare


@pytest.fixture(scope="module")
def server(libs):
    engine = DLPLoRA.from_library(libs[0])
    app = create_app(engine, ServeConfig(max_batch_size=16, max_queue=64, max_tokens_limit=64, request_timeout=60))
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture(scope="module")
def slow_server(libs):
    """No plugin; every forward pass sleeps 60 ms; one row at a time, one waiting; 8 s timeout. The sleeps
    dominate the tiny model's compute, so the timings hold on a loaded machine too."""
    engine = DLPLoRA.from_library(libs[1])
    engine.model.lm_head.register_forward_pre_hook(lambda *a: time.sleep(0.06))  # once per forward pass
    app = create_app(engine, ServeConfig(max_batch_size=1, max_queue=1, max_tokens_limit=256, request_timeout=8.0))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(content, **kw):
    return {"messages": [{"role": "user", "content": content}], **kw}


def _err(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def _metric(text, name, labels=""):
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not in metrics")


# ---------------------------------------------------------------- info endpoints

def test_models_health_and_openai_client_listing(http, client):
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["plugin"] is True and h["adapters"] == ["alpha", "beta", "gamma"]
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == h["model"] and ids[1:] == ["dlp-lora", "alpha", "beta", "gamma"]  # requests may name dlp-lora
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list" and all(m["object"] == "model" for m in raw["data"])
    assert [m["parent"] for m in raw["data"][1:]] == [h["model"]] * 4
    assert [m["id"] for m in raw["data"] if "routing" in m] == ["alpha", "beta", "gamma"]


# ---------------------------------------------------------------- adapter choice

def test_pinned_adapter_and_weighted_mix_with_the_openai_client(client, http):
    r = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "bonjour la maison"}],
                                       max_tokens=6, extra_body={"return_token_ids": True})
    assert r.object == "chat.completion" and r.model == "beta"
    assert r.routing == {"adapters": [{"name": "beta", "weight": 1.0}], "source": "pinned"}
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(r.choices[0].token_ids) <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    mix = client.chat.completions.create(model="dlp-lora", messages=[{"role": "user", "content": "bonjour la maison"}],
                                         max_tokens=6, extra_body={"adapters": {"alpha": 0.25, "beta": 0.75},
                                                                   "return_token_ids": True})
    assert mix.routing == {"adapters": [{"name": "beta", "weight": 0.75}, {"name": "alpha", "weight": 0.25}],
                           "source": "explicit"}
    # adapters change the output: base ({} = no adapter), beta alone and the mix all differ
    base = http.post("/v1/chat/completions", json=_chat("bonjour la maison", max_tokens=6, adapters={},
                                                        return_token_ids=True)).json()
    assert base["routing"] == {"adapters": [], "source": "explicit"}
    outs = {tuple(base["choices"][0]["token_ids"]), tuple(r.choices[0].token_ids), tuple(mix.choices[0].token_ids)}
    assert len(outs) == 3
    # the same pinned request again gives the same greedy output
    again = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "bonjour la maison"}],
                                           max_tokens=6, extra_body={"return_token_ids": True})
    assert again.choices[0].token_ids == r.choices[0].token_ids


def test_plugin_routes_by_content_and_chat_routes_the_last_user_turn(http, server):
    for name, words in WORDS.items():
        r = http.post("/v1/chat/completions", json=_chat(" ".join(words), model="dlp-lora", max_tokens=3)).json()
        assert r["routing"]["source"] == "plugin"
        assert r["routing"]["adapters"][0]["name"] == name
        assert math.isclose(sum(a["weight"] for a in r["routing"]["adapters"]), 1.0, abs_tol=1e-4)
    # history is context; the last user turn decides
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red green blue yellow ball"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "add sum plus number total seven"}]
    base_name = http.get("/health").json()["model"]
    r = http.post("/v1/chat/completions", json={"model": base_name, "messages": msgs, "max_tokens": 3}).json()
    assert r["routing"]["source"] == "plugin" and r["routing"]["adapters"][0]["name"] == "alpha"
    # /v1/completions routes the prompt too
    r = http.post("/v1/completions", json={"model": "dlp-lora", "prompt": "bonjour maison voiture chat",
                                           "max_tokens": 3}).json()
    assert r["object"] == "text_completion" and r["routing"]["adapters"][0]["name"] == "beta"
    assert isinstance(r["choices"][0]["text"], str) and r["usage"]["completion_tokens"] <= 3
    assert "base_model" not in r["routing"]
    # a prompt of no adapter's task goes to the base model, and the response says so and why
    r = http.post("/v1/chat/completions", json=_chat("weather rain football goal song river", model="dlp-lora",
                                                     max_tokens=3)).json()
    assert r["routing"]["adapters"] == [] and r["routing"]["base_model"] is True
    assert "none of the adapters' tasks" in r["routing"]["base_reason"]


# ---------------------------------------------------------------- streaming

def test_streaming_chat_and_completions_match_non_streaming(client, http):
    kw = dict(model="gamma", messages=[{"role": "user", "content": "The quick brown fox"}], max_tokens=12)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.routing["adapters"] == [{"name": "gamma", "weight": 1.0}] for c in chunks)
    # raw SSE framing for /v1/completions
    body = {"model": "alpha", "prompt": "Solve the following math problem", "max_tokens": 10}
    plain = http.post("/v1/completions", json=body).json()
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == plain["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_stop_strings_cut_the_text(http):
    body = {"model": "alpha", "prompt": "The quick brown fox", "max_tokens": 16}
    full = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(full) > 2
    stop = full[1:3]
    cut = http.post("/v1/completions", json=body | {"stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[:full.find(stop)] and cut["finish_reason"] == "stop"


# ---------------------------------------------------------------- bad input

def test_mix_weights_out_of_0_1_are_refused_naming_the_field(http):
    """Issue 33.7: a weight of 1.5 extrapolated the adapter and answered empty text; now a 400 on `adapters`."""
    for bad in (1.5, 1.0001, -0.5):
        err = _err(http.post("/v1/chat/completions", json=_chat("hi", adapters={"alpha": bad, "beta": 0.5})), 400,
                   "adapters")
        assert "'alpha'" in err["message"] and "[0, 1]" in err["message"]
    r = http.post("/v1/chat/completions", json=_chat("hi", adapters={"alpha": 1.0, "beta": 0.0}, max_tokens=2))
    assert r.status_code == 200 and r.json()["routing"]["adapters"] == [{"name": "alpha", "weight": 1.0}]


def test_unknown_request_fields_are_logged_at_the_default_level(libs, caplog):
    """Issue 33.6: with the logging `dlp-lora serve` sets up (--log-level info, the default), an ignored field is in
    the log (the dlplora loggers had no level, so their info records were dropped)."""
    import logging
    import logging.config

    from dlplora.serve.config import log_config

    logging.config.dictConfig(log_config("info"))
    try:
        engine = DLPLoRA.from_library(libs[1])
        with ServerThread(create_app(engine, ServeConfig(max_tokens_limit=8))) as srv:
            r = httpx.post(srv.url + "/v1/chat/completions", json=_chat("hi", model="alpha", max_tokens=2, foo_bar=1),
                           timeout=60)
        assert r.status_code == 200, r.text
        [rec] = [rec for rec in caplog.records if "foo_bar" in rec.getMessage()]
        assert rec.levelname == "INFO" and "ignoring unknown request fields" in rec.getMessage()
    finally:
        for name in ("dlplora", "uvicorn", "uvicorn.error", "uvicorn.access"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.setLevel(logging.NOTSET)
            logger.propagate = True


def test_bad_requests_answer_openai_errors_and_the_server_stays_healthy(http, client, server):
    url = "/v1/chat/completions"
    hdr = {"content-type": "application/json"}
    assert _err(http.post(url, content=b"{not json", headers=hdr), 400)["code"] == "invalid_json"
    _err(http.post(url, content=b"[1, 2]", headers=hdr), 400)
    _err(http.post(url, json={"model": "alpha"}), 400, "messages")
    _err(http.post(url, json={"model": "alpha", "messages": []}), 400, "messages")
    _err(http.post(url, json=_chat("   ", model="alpha")), 400, "messages")
    _err(http.post(url, json={"model": "alpha", "messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "yo"}]}), 400, "messages")
    _err(http.post(url, json={"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages")
    assert _err(http.post(url, json=_chat("hi", model="nope")), 404, "model")["code"] == "model_not_found"
    _err(http.post(url, json=_chat("hi", adapters={"nope": 1.0})), 400, "adapters")
    _err(http.post(url, json=_chat("hi", adapters={"alpha": -0.5})), 400, "adapters")
    _err(http.post(url, content=b'{"messages": [{"role": "user", "content": "hi"}], "adapters": {"alpha": NaN}}',
                   headers=hdr), 400, "adapters")
    _err(http.post(url, json=_chat("hi", adapters={"alpha": "heavy"})), 400, "adapters")
    _err(http.post(url, json=_chat("hi", adapters=["alpha"])), 400, "adapters")
    _err(http.post(url, json=_chat("hi", model="alpha", adapters={"beta": 1})), 400, "adapters")
    for bad in (0, -3, 65, 2.5, "8", True):
        _err(http.post(url, json=_chat("hi", model="alpha", max_tokens=bad)), 400, "max_tokens")
    _err(http.post(url, json=_chat("hi", model="alpha", temperature=-1)), 400, "temperature")
    _err(http.post(url, json=_chat("hi", model="alpha", top_p=0)), 400, "top_p")
    for bad in (0, 9, 1.5, "2"):  # n > 1 is served up to the server's max_n (8 by default)
        _err(http.post(url, json=_chat("hi", model="alpha", n=bad)), 400, "n")
    long = " ".join(["quick brown fox"] * 400)  # far over the tiny model's 512-token context
    err = _err(http.post(url, json=_chat(long, model="alpha", max_tokens=8)), 400, "messages")
    assert err["code"] == "context_length_exceeded" and "context window" in err["message"]
    assert "max_tokens 8" in err["message"] and "max_new_tokens" not in err["message"]
    err = _err(http.post("/v1/completions", json={"model": "alpha", "prompt": long, "max_tokens": 8}), 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    _err(http.post("/v1/completions", json={"model": "alpha", "prompt": ""}), 400, "prompt")
    _err(http.post("/v1/completions", json={"model": "alpha", "prompt": [1, 2, 3]}), 400, "prompt")
    big = json.dumps(_chat("x" * (1 << 20), model="alpha")).encode()
    assert _err(http.post(url, content=big, headers=hdr), 413)["code"] == "request_too_large"
    assert _err(http.post(url, content=b"messages=hi", headers={"content-type": "text/plain"}), 415)["code"] == \
        "unsupported_media_type"
    _err(http.get("/v1/nothing"), 404)
    # the official client raises the matching exception types
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    assert "limit of 64" in str(exc.value)
    # still serving
    assert http.get("/health").json()["status"] == "ok"
    ok = http.post(url, json=_chat("hi", model="alpha", max_tokens=2))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
    m = http.get("/metrics").text
    assert _metric(m, "dlp_lora_requests_total", '{endpoint="/v1/chat/completions",status="413"}') >= 1
    assert _metric(m, "dlp_lora_requests_total", '{endpoint="/v1/chat/completions",status="400"}') >= 20


# ---------------------------------------------------------------- no plugin, limits, disconnects

def test_library_without_plugin_serves_pinned_and_explains_routing(slow_server):
    with httpx.Client(base_url=slow_server.url, timeout=30) as c:
        assert c.get("/health").json()["plugin"] is False
        err = _err(c.post("/v1/chat/completions", json=_chat("hi", model="dlp-lora")), 400)
        assert err["code"] == "no_plugin" and "dlp-lora train-plugin --library" in err["message"]
        _err(c.post("/v1/completions", json={"prompt": "hi"}), 400)
        r = c.post("/v1/chat/completions", json=_chat("hi", model="gamma", max_tokens=3))
        assert r.status_code == 200 and r.json()["routing"]["adapters"] == [{"name": "gamma", "weight": 1.0}]
        r = c.post("/v1/completions", json={"prompt": "hi", "adapters": {"alpha": 0.5, "gamma": 0.5},
                                            "max_tokens": 3})
        assert r.status_code == 200 and len(r.json()["routing"]["adapters"]) == 2


def test_queue_limit_timeout_and_client_disconnect(slow_server):
    url = slow_server.url
    long = {"model": "alpha", "prompt": "The quick brown fox", "max_tokens": 40}  # ~2.5 s at 60 ms a step

    def post(body):
        with httpx.Client(base_url=url, timeout=30) as c:
            return c.post("/v1/completions", json=body)

    # one row runs, one waits, the rest are turned away with 503 + Retry-After
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(post, long)
        time.sleep(0.5)
        rest = [pool.submit(post, long) for _ in range(5)]
        results = [first.result()] + [f.result() for f in rest]
    assert results[0].status_code == 200
    busy = [r for r in results if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" for r in busy)
    assert _err(busy[0], 503)["code"] == "queue_full"
    assert sorted(r.status_code for r in results) == [200, 200, 503, 503, 503, 503], [r.text[:80] for r in results]
    # past the 8 s deadline (over 150 tokens at 60 ms a step): 504, and the server goes on
    err = _err(post({"model": "alpha", "prompt": "hi", "max_tokens": 250}), 504)
    assert err["code"] == "timeout"
    # a client that goes away mid-stream is dropped; the next request is served at once. The greedy
    # continuation of "hi" is the same as above: over 150 tokens, so ~9 s of streaming.
    with httpx.Client(base_url=url, timeout=30) as c:
        before = _metric(c.get("/metrics").text, "dlp_lora_cancelled_total")
        body = {"model": "alpha", "prompt": "hi", "max_tokens": 250, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            time.sleep(0.2)  # then hang up
        t0 = time.monotonic()
        ok = c.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        assert time.monotonic() - t0 < 3.0  # did not wait for the ~9 s abandoned stream
        assert _metric(c.get("/metrics").text, "dlp_lora_cancelled_total") == before + 1
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["running"] == 0 and h["queued"] == 0


# ---------------------------------------------------------------- continuous batching under load

def _load_requests(n=64):
    rng = random.Random(7)
    prompts = ["The quick brown fox", "Translate the following German text into English.", "What is 12 plus 7?",
               "add sum plus number total", "bonjour maison voiture chat", "red green blue yellow ball table",
               "choice: correct incorrect valid invalid", "yes no same different"]
    choices = [{"model": "alpha"}, {"model": "beta"}, {"model": "gamma"}, {"model": "dlp-lora"},
               {"adapters": {"alpha": 0.5, "beta": 0.5}}, {"adapters": {"beta": 0.2, "gamma": 0.8}},
               {"adapters": {"alpha": 0.3, "beta": 0.3, "gamma": 0.4}}, {"adapters": {}}]
    out = []
    for i in range(n):
        body = dict(choices[i % len(choices)], max_tokens=rng.randint(3, 24), return_token_ids=True)
        prompt = prompts[rng.randrange(len(prompts))] + ("" if i % 3 else f" case {i}")
        if i % 4 == 3:
            out.append(("/v1/completions", body | {"prompt": prompt}))
        else:
            out.append(("/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt}]}))
    return out


def test_64_concurrent_mixed_requests_batch_and_match_their_solo_outputs(server, http):
    reqs = _load_requests(64)
    m0 = http.get("/metrics").text
    steps0 = _metric(m0, "dlp_lora_batch_size_count")
    rows0 = _metric(m0, "dlp_lora_batch_size_sum")

    def post(item):
        path, body = item
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post(path, json=body)

    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(post, reqs))
    assert [r.status_code for r in together] == [200] * 64, [r.text for r in together if r.status_code != 200][:2]
    assert sum(r.json()["usage"]["completion_tokens"] for r in together) > 400  # real generations, not just EOS
    m1 = http.get("/metrics").text
    steps = _metric(m1, "dlp_lora_batch_size_count") - steps0
    rows = _metric(m1, "dlp_lora_batch_size_sum") - rows0
    assert rows / steps > 2  # requests really shared decode steps
    assert _metric(m1, "dlp_lora_batch_size_bucket", '{le="16"}') == _metric(m1, "dlp_lora_batch_size_count")
    alone = [post(item) for item in reqs]  # one at a time: a batch of one row each
    for (path, body), a, b in zip(reqs, together, alone):
        ja, jb = a.json(), b.json()
        ca, cb = ja["choices"][0], jb["choices"][0]
        assert ca["token_ids"] == cb["token_ids"], (path, body)
        assert ca["finish_reason"] == cb["finish_reason"] and ja["routing"] == jb["routing"]
        assert ja["usage"] == jb["usage"] and ja["usage"]["completion_tokens"] <= body["max_tokens"]
        assert (ca.get("text") or ca.get("message", {}).get("content")) == \
            (cb.get("text") or cb.get("message", {}).get("content"))
    # routing counters: every routed request counted its adapters
    m2 = http.get("/metrics").text
    assert _metric(m2, "dlp_lora_adapter_routed_total", '{adapter="alpha"}') >= 2 * 24
    assert _metric(m2, "dlp_lora_routing_source_total", '{source="plugin"}') >= 16
    assert _metric(m2, "dlp_lora_queue_depth") == 0 and _metric(m2, "dlp_lora_running_requests") == 0
    assert _metric(m2, "dlp_lora_generated_tokens_total") >= sum(
        r.json()["usage"]["completion_tokens"] for r in together + alone)


# ---------------------------------------------------------------- the CLI

def test_serve_cli_checks_limits_and_serves_in_a_subprocess(libs, capsys):
    import socket
    import subprocess
    import sys

    from dlplora.cli import main

    assert main(["serve", "--library", str(libs[1]), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be a positive integer" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dlplora.cli", "serve", "--library", str(libs[1]), "--port",
                             str(port), "--threads", "1", "--log-level", "warning", "--max-tokens-limit", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data][1:] == ["dlp-lora", "alpha", "beta", "gamma"]
        r = c.completions.create(model="alpha", prompt="The quick brown fox", max_tokens=4)
        assert r.routing["adapters"] == [{"name": "alpha", "weight": 1.0}] and r.usage.completion_tokens <= 4
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="alpha", prompt="hi", max_tokens=9)
    finally:
        proc.terminate()
        proc.wait(30)
