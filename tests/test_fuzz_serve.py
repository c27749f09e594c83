"""Fuzzing the HTTP server (hypothesis): hostile bodies, odd JSON, lone surrogates, NULs, huge strings, every field
wrong in every way, through the ASGI app with a tiny model, a library and a plugin. Nothing answers 500, every
refusal is an OpenAI error body, and /health stays OK."""

from __future__ import annotations

import json
import random

import pytest
from fuzzing import FUZZ, deep, json_values, short_texts, texts
from hypothesis import given
from hypothesis import strategies as st

from dlplora.engine import DLPLoRA
from dlplora.serve import ServeConfig, create_app
from dlplora.serve.protocol import UNSUPPORTED
from dlplora.testing import random_peft_library

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = {"alpha": ("add", "sum", "plus", "number"), "beta": ("bonjour", "maison", "voiture", "chat")}
KEY = "fuzz-key"
JSON = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model):
    from fastapi.testclient import TestClient

    from dlplora.plugin import Plugin

    lib = random_peft_library(tmp_path_factory.mktemp("fuzz-serve") / "lib", tiny_model,
                              {"alpha": (4, 8, ["q_proj", "v_proj"]), "beta": (2, 4, ["o_proj"])}, std=0.5, seed=3)
    rng = random.Random(0)
    xs = [" ".join(rng.choice(w) for _ in range(6)) for w in WORDS.values() for _ in range(30)]
    ys = [n for n in WORDS for _ in range(30)]
    Plugin.train(xs, ys, list(WORDS), epochs=4, batch_size=32, bits=12, dim=8, hidden=(16, 16, 8), seed=0).save(
        lib / "plugin")
    engine = DLPLoRA.from_library(lib)
    cfg = ServeConfig(max_batch_size=4, max_tokens_limit=3, request_timeout=30, max_body_bytes=200_000,
                      max_messages=8, max_n=3, api_key=KEY)
    with TestClient(create_app(engine, cfg), raise_server_exceptions=False) as c:
        yield c


def _check(r):
    """Not a server error; a refusal is an OpenAI error body; a stream ends with [DONE]."""
    assert r.status_code < 500, r.text[:500]
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    elif r.headers["content-type"].startswith("text/event-stream"):
        lines = [ln for ln in r.text.split("\n") if ln]
        assert lines[-1] == "data: [DONE]"
        for ln in lines[:-1]:
            assert "error" not in json.loads(ln[6:]), ln
    else:
        body = r.json()
        assert body["choices"] and body["usage"]["completion_tokens"] <= 3 * len(body["choices"])


def _post(client, path, body: bytes, headers=JSON):
    r = client.post(path, content=body, headers=headers)
    _check(r)
    return r


content = st.one_of(texts, st.lists(st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                                              json_values), max_size=3), json_values)
roles = st.sampled_from(["user", "system", "assistant", "developer", "tool"])
message = st.one_of(st.fixed_dictionaries({"role": roles, "content": content}), json_values)
small = st.one_of(st.integers(-2, 5), json_values)
fields = {"model": st.one_of(st.sampled_from(["alpha", "beta", "dlp-lora", "auto", "nope", ""]), json_values),
          "max_tokens": small, "max_completion_tokens": small, "n": small, "logprobs": st.one_of(st.booleans(), small),
          "top_logprobs": small, "temperature": st.one_of(st.floats(0, 2), json_values),
          "top_p": st.one_of(st.floats(0, 1), json_values), "seed": st.one_of(st.integers(-(2 ** 64), 2 ** 64),
                                                                             json_values),
          "stop": st.one_of(texts, st.lists(texts, max_size=5), json_values), "stream": st.one_of(st.booleans(),
                                                                                            json_values),
          "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
          "adapters": st.one_of(st.dictionaries(st.sampled_from(["alpha", "beta", "x"]),
                                                st.one_of(st.floats(), json_values), max_size=3), json_values),
          "return_token_ids": json_values,
          **{name: json_values for name in UNSUPPORTED}}
chat_bodies = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=10), json_values)},
                                    optional=fields)
completion_bodies = st.fixed_dictionaries({"prompt": st.one_of(texts, st.lists(texts, max_size=2), json_values)},
                                          optional=fields)
# well-formed requests (most of them reach the model), then 0-2 fields set to anything
# encodable, non-empty text: what a well-formed request carries (hostile text is in the other tests)
fine_texts = short_texts.map(lambda t: "".join("?" if 0xD800 <= ord(c) <= 0xDFFF else c for c in t) + " add")
good = {"model": st.sampled_from(["alpha", "beta", "dlp-lora"]), "max_tokens": st.integers(1, 3),
        "n": st.integers(1, 3), "temperature": st.sampled_from([0.0, 0.7, 1e-9, 2.0]), "seed": st.integers(-9, 9),
        "stop": st.lists(short_texts, max_size=4), "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
user_turns = st.builds(lambda hist, last: hist + [{"role": "user", "content": last}],
                       st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                       "content": fine_texts}), max_size=3), fine_texts)
good_chat = st.fixed_dictionaries({"messages": user_turns}, optional=good | {
    "logprobs": st.just(True), "top_logprobs": st.integers(0, 3)})
good_completion = st.fixed_dictionaries({"prompt": fine_texts}, optional=good | {"logprobs": st.integers(0, 3)})
mutation = st.lists(st.tuples(st.sampled_from(sorted(fields) + ["messages", "prompt"]), json_values), max_size=1)


@FUZZ
@given(st.one_of(chat_bodies, completion_bodies, json_values), st.booleans())
def test_fuzz_generation_bodies(client, body, chat):
    _post(client, "/v1/chat/completions" if chat else "/v1/completions", json.dumps(body).encode())


def _mutated(body, changes):
    return body | dict(changes)


@FUZZ
@given(st.one_of(st.builds(_mutated, good_chat, mutation).map(lambda b: (b, True)),
                 st.builds(_mutated, good_completion, mutation).map(lambda b: (b, False))))
def test_fuzz_well_formed_requests(client, case):
    body, chat = case
    _post(client, "/v1/chat/completions" if chat else "/v1/completions", json.dumps(body).encode())


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.builds(deep, st.integers(1, 20_000), st.sampled_from(["[", "{"])),
                 st.integers(4300, 5000).map(lambda k: b'{"messages": [], "n": ' + b"1" * k + b"}"),
                 texts.map(lambda t: json.dumps({"messages": [{"role": "user", "content": t}]}).encode()),
                 texts.map(lambda t: json.dumps({"prompt": t, "model": "alpha"}).encode())),
       st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzz_raw_bytes(client, raw, path):
    _post(client, path, raw)


@FUZZ
@given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       st.sampled_from(["/", "/v1", "/v1/models", "/health", "/metrics", "/v1/chat/completions", "/v1/completions",
                        "/v1/load_lora_adapter", "/v1/models/alpha", "/%00", "/v1/../health",
                        "/playground/playground.js", "/playground/x"]),
       st.sampled_from([None, f"Bearer {KEY}", "Bearer nope", "Basic x", "Bearer", ""]))
def test_fuzz_routes_and_auth(client, method, path, auth):
    headers = {"content-type": "application/json"} | ({"authorization": auth} if auth is not None else {})
    r = client.request(method, path, content=b"{}", headers=headers)
    assert r.status_code < 500, r.text[:300]
    page = r.request.url.path in ("/", "/playground/playground.js") and method == "GET"
    if r.request.url.path == "/health":  # open to all; GET only
        assert r.status_code == (200 if method == "GET" else 405)
    elif page:  # the playground's static files: open to all (the page asks for the key); GET only
        assert r.status_code == 200
    elif r.request.url.path == "/playground/x" and method == "GET":
        assert r.status_code == 404  # open, and no such file
    elif auth != f"Bearer {KEY}":
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_known_bad_inputs_and_health_after_the_fuzz(client):
    chat = "/v1/chat/completions"
    for text in ("hi\u0000there", "a\u0000", "\u0000", "add plus\u0000sum", "x" * 150_000, "\x1e\n\x1e", "\u2028"):
        _post(client, chat, json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 2}).encode())
        _post(client, "/v1/completions", json.dumps({"prompt": text, "max_tokens": 2}).encode())
    r = _post(client, chat, json.dumps({"messages": [{"role": "user", "content": "hi\u0000there"}],
                                        "max_tokens": 2}).encode())
    assert r.status_code == 200 and r.json()["routing"]["source"] == "plugin"  # the NUL of issue 16 routes
    r = _post(client, chat, b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}')
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    ok = _post(client, chat, json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "add"}],
                                         "max_tokens": 2, "n": 2, "logprobs": True, "top_logprobs": 2}).encode())
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
