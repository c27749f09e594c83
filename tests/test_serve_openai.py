"""The server's OpenAI surface beyond plain generation: logprobs, n > 1, refused parameters, the API key and the
request limits; a real uvicorn server on 127.0.0.1 with a tiny random model, talked to with the official `openai`
client and with raw HTTP (httpx)."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from dlplora.engine import DLPLoRA
from dlplora.errors import DLPLoRAError
from dlplora.serve import ServeConfig, ServerThread, create_app
from dlplora.testing import random_peft_library

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "sk-test-0123456789"
SPECS = {"alpha": (4, 8, ["q_proj", "v_proj"]), "beta": (8, 8, ["q_proj", "v_proj"])}
PROMPT = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    lib = random_peft_library(tmp_path_factory.mktemp("openai") / "lib", tiny_model, SPECS, std=0.5, seed=10)
    engine = DLPLoRA.from_library(lib)
    cfg = ServeConfig(max_batch_size=8, max_tokens_limit=32, request_timeout=60, api_key=KEY, max_messages=4,
                      max_prompt_tokens=40, max_body_bytes=4000, max_n=4)
    with ServerThread(create_app(engine, cfg)) as srv:
        srv.engine = engine
        srv.model_dir = tiny_model
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _err(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ---------------------------------------------------------------- auth

def test_api_key_is_required_everywhere_but_health(server, client):
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        assert anon.get("/health").json()["status"] == "ok"  # open: load balancers probe it
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/completions"), ("GET", "/v1/nothing"), ("POST", "/v1/load_lora_adapter")):
            r = anon.request(method, path, json={"prompt": "hi"})
            err = _err(r, 401, code="invalid_api_key")
            assert "missing API key" in err["message"] and r.headers["www-authenticate"] == "Bearer"
        for bad in (f"Bearer {KEY}x", "Bearer", f"Basic {KEY}", KEY, f"Bearer {KEY[:-1]}", f"Bearer  {KEY}x"):
            _err(anon.get("/v1/models", headers={"Authorization": bad}), 401, code="invalid_api_key")
        assert anon.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as exc:
        wrong.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=2)
    assert exc.value.code == "invalid_api_key"
    r = client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list().data][1:] == ["dlp-lora", "alpha", "beta"]


def test_config_checks_and_cli_flags(tmp_path, monkeypatch):
    from dlplora.cli import build_parser
    from dlplora.cli.serve import config_from_args

    for bad in ("", "has space", "tab\tkey", "ключ", 123):
        with pytest.raises(DLPLoRAError, match="api-key"):
            ServeConfig(api_key=bad).check()
    with pytest.raises(DLPLoRAError, match="no such directory"):
        ServeConfig(adapter_root=str(tmp_path / "missing")).check()
    for name in ("max_messages", "max_n", "max_prompt_tokens"):
        with pytest.raises(DLPLoRAError, match=name.replace("_", "-")):
            ServeConfig(**{name: 0}).check()
    assert "sk-" not in repr(ServeConfig(api_key="sk-secret"))  # the key never shows in logs of the config
    parse = build_parser().parse_args
    args = parse(["serve", "--library", "lib"])
    monkeypatch.delenv("DLP_LORA_API_KEY", raising=False)
    cfg = config_from_args(args)
    assert cfg.api_key is None and cfg.allow_runtime_adapters is False and cfg.adapter_root is None
    monkeypatch.setenv("DLP_LORA_API_KEY", "from-env")
    assert config_from_args(args).api_key == "from-env"
    args = parse(["serve", "--library", "lib", "--api-key", "from-flag", "--allow-runtime-adapters",
                  "--adapter-root", str(tmp_path), "--max-messages", "9", "--max-prompt-tokens", "100", "--max-n", "2"])
    cfg = config_from_args(args)
    assert (cfg.api_key, cfg.allow_runtime_adapters, cfg.adapter_root) == ("from-flag", True, str(tmp_path.resolve()))
    assert (cfg.max_messages, cfg.max_prompt_tokens, cfg.max_n) == (9, 100, 2)
    monkeypatch.setenv("DLP_LORA_API_KEY", "")  # empty: no key
    assert config_from_args(parse(["serve", "--library", "lib"])).api_key is None


# ---------------------------------------------------------------- logprobs

def _reference_logprobs(model_dir, prompt_ids, token_ids):
    """log-softmax of the base model's logits before each generated token (plain HF forward pass)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(prompt_ids)
    return [lp[n - 1 + j] for j in range(len(token_ids))]


def test_chat_logprobs_match_the_model(client, server):
    r = client.chat.completions.create(model="dlp-lora", messages=PROMPT, max_tokens=8, logprobs=True,
                                       top_logprobs=3, extra_body={"adapters": {}, "return_token_ids": True})
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == len(choice.token_ids) == r.usage.completion_tokens > 0
    ref = _reference_logprobs(server.model_dir, choice.prompt_token_ids, choice.token_ids)
    tok = server.engine.tokenizer
    for item, tid, lp in zip(content, choice.token_ids, ref):
        assert item.token == tok.decode([tid])
        assert math.isclose(item.logprob, float(lp[tid]), abs_tol=1e-3)
        assert len(item.top_logprobs) == 3
        values = [a.logprob for a in item.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        top3 = lp.topk(3).values.tolist()
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(values, top3))
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen token is the most likely
        assert isinstance(item.bytes, list) and all(0 <= b < 256 for b in item.bytes)
    # byte-level BPE: the tokens' bytes are exactly the completion's bytes
    raw = bytes(b for item in content for b in item.bytes)
    assert raw.decode("utf-8", "replace").replace("\ufffd", "") == choice.message.content.replace("\ufffd", "")
    # no logprobs unless asked; top_logprobs alone is refused
    plain = client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=2)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=2, top_logprobs=2)
    assert exc.value.param == "top_logprobs"
    zero = client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=3, logprobs=True)
    assert all(item.top_logprobs == [] for item in zero.choices[0].logprobs.content)


def test_completion_logprobs_shape_and_stop_strings(client, http):
    body = {"model": "alpha", "prompt": "The quick brown fox", "max_tokens": 12, "logprobs": 2,
            "return_token_ids": True}
    full = http.post("/v1/completions", json=body).json()["choices"][0]
    lp = full["logprobs"]
    n = len(full["token_ids"])
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert tok in top and top[tok] == v and 1 <= len(top) <= 3 and v <= 0
    # the openai client parses it
    r = client.completions.create(model="alpha", prompt="The quick brown fox", max_tokens=12, logprobs=2)
    assert r.choices[0].logprobs.token_logprobs == lp["token_logprobs"]
    # a stop string cuts the text: only the tokens that start before the cut are reported. The stop: the first
    # character that occurs first after some token's start and before another's, so the cut drops tokens.
    text, offs = full["text"], lp["text_offset"]
    i = next(i for i in range(1, len(text)) if text.find(text[i]) == i and any(o > i for o in offs))
    stop = text[i]
    cut = http.post("/v1/completions", json=body | {"stop": [stop]}).json()["choices"][0]
    assert cut["text"] == text[:i]
    k = len(cut["logprobs"]["tokens"])
    assert cut["logprobs"]["tokens"] == lp["tokens"][:k] and 0 < k < n
    assert all(o < len(cut["text"]) for o in cut["logprobs"]["text_offset"])
    # streamed: the chunks' logprobs add up to the same tokens
    with http.stream("POST", "/v1/completions", json=body | {"stop": [stop], "stream": True}) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    toks = [t for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    offs = [t for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["text_offset"]]
    assert toks == cut["logprobs"]["tokens"] and offs == cut["logprobs"]["text_offset"]
    for bad in (-1, 21, True, "2"):
        _err(http.post("/v1/completions", json=body | {"logprobs": bad}), 400, "logprobs")


def test_streamed_chat_logprobs_equal_the_whole_response(client):
    kw = dict(model="beta", messages=PROMPT, max_tokens=10, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    parts = [item for c in chunks for ch in c.choices if ch.logprobs for item in ch.logprobs.content]
    assert [(p.token, p.logprob) for p in parts] == [(w.token, w.logprob) for w in whole]


# ---------------------------------------------------------------- n > 1

def test_n_choices_greedy_and_seeded(client, http):
    one = client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=6)
    three = client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=6, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}  # greedy: all equal
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    # sampled: choice i uses seed + i, so a request is reproducible and its choices differ
    kw = dict(model="alpha", prompt="The quick brown fox", max_tokens=8, temperature=1.0, seed=7,
              extra_body={"return_token_ids": True})
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    ids = [tuple(c.token_ids) for c in a.choices]
    assert ids == [tuple(c.token_ids) for c in b.choices] and len(set(ids)) > 1
    for i in range(3):
        solo = client.completions.create(n=1, **(kw | {"seed": 7 + i}))
        assert tuple(solo.choices[0].token_ids) == ids[i]
    # streamed: chunks carry their choice's index and add up to the same texts
    body = {"model": "alpha", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 1.0, "seed": 7,
            "n": 3, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    texts, finals = ["", "", ""], [0, 0, 0]
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
            finals[c["index"]] += c["finish_reason"] is not None
    assert texts == [c.text for c in a.choices] and finals == [1, 1, 1]
    assert events[-1]["usage"]["completion_tokens"] == a.usage.completion_tokens
    # chat streams open every choice with the assistant role
    chunks = list(client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=4, n=2, stream=True))
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role) == [0, 1]
    with pytest.raises(openai.BadRequestError) as exc:  # over the server's max_n (4)
        client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=2, n=5)
    assert exc.value.param == "n"


# ---------------------------------------------------------------- refused parameters

@pytest.mark.parametrize("kw", [
    {"presence_penalty": 0.5}, {"frequency_penalty": -1}, {"logit_bias": {"17": 5}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
    {"tool_choice": "auto"}, {"response_format": {"type": "json_object"}},
    {"functions": [{"name": "f"}]}, {"function_call": "auto"}, {"reasoning_effort": "low"}, {"store": True},
])
def test_unimplemented_chat_parameters_are_refused_by_name(client, kw):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=2, **kw)
    name = next(iter(kw))
    assert exc.value.param == name and exc.value.code == "unsupported_parameter"
    assert name in str(exc.value)


def test_refused_completion_parameters_defaults_and_unknown_fields(client, http):
    for kw in ({"echo": True}, {"suffix": "end"}, {"best_of": 3}, {"logit_bias": {"3": -100}}):
        with pytest.raises(openai.BadRequestError) as exc:
            client.completions.create(model="alpha", prompt="hi there", max_tokens=2, **kw)
        assert exc.value.param == next(iter(kw))
    # vLLM's sampling extensions are refused too
    for extra in ({"top_k": 5}, {"repetition_penalty": 1.2}, {"min_tokens": 3}, {"guided_json": {}}):
        _err(http.post("/v1/completions", json={"model": "alpha", "prompt": "hi", **extra}), 400, next(iter(extra)),
             "unsupported_parameter")
    # their defaults, harmless metadata and unknown fields are accepted
    ok = {"model": "alpha", "prompt": "hi there", "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0,
          "logit_bias": {}, "echo": False, "suffix": None, "best_of": 1, "top_k": -1, "user": "u1",
          "some_future_field": {"x": 1}}
    assert http.post("/v1/completions", json=ok).status_code == 200
    chat = {"model": "alpha", "messages": PROMPT, "max_tokens": 2, "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "parallel_tool_calls": True, "metadata": {"a": "b"},
            "service_tier": "auto", "store": False, "stream": None}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    r = client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=2, presence_penalty=0,
                                       extra_body={"frobnicate": True})
    assert r.choices[0].message.role == "assistant"


# ---------------------------------------------------------------- limits

def test_request_limits_answer_clear_4xx(http, server):
    url = "/v1/chat/completions"
    five = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 2 + \
        [{"role": "user", "content": "hi"}]
    err = _err(http.post(url, json={"model": "alpha", "messages": five}), 400, "messages", "too_many_messages")
    assert "limit of 4" in err["message"]
    long = " ".join(["fox"] * 60)  # over the 40 prompt tokens, under the context window and the body limit
    err = _err(http.post(url, json={"model": "alpha", "messages": [{"role": "user", "content": long}],
                                    "max_tokens": 2}), 400, "messages", "prompt_too_long")
    assert "limit of 40 prompt tokens" in err["message"]
    _err(http.post("/v1/completions", json={"model": "alpha", "prompt": long, "max_tokens": 2}), 400, "prompt",
         "prompt_too_long")
    _err(http.post(url, json={"model": "alpha", "messages": PROMPT, "max_tokens": 33}), 400, "max_tokens")
    big = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    _err(http.post(url, content=big, headers={"content-type": "application/json"}), 413, code="request_too_large")
    err = _err(http.post(url, content=b"[" * 1900 + b"]" * 1900, headers={"content-type": "application/json"}), 400,
               code="invalid_json")
    assert "nested too deeply" in err["message"]
    lone = b'{"model": "alpha", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    err = _err(http.post(url, content=lone, headers={"content-type": "application/json"}), 400, "messages")
    assert "lone surrogate" in err["message"]
    for bad in (2 ** 64, -(2 ** 63) - 1, 1.5):
        _err(http.post(url, json={"model": "alpha", "messages": PROMPT, "seed": bad}), 400, "seed")
    # a tiny temperature is greedy (no overflow in the softmax), a huge seed wraps per choice
    r = http.post(url, json={"model": "alpha", "messages": PROMPT, "max_tokens": 3, "temperature": 1e-300,
                             "n": 2, "seed": 2 ** 63 - 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    r = http.post(url, json={"model": "alpha", "messages": PROMPT, "max_tokens": 3, "temperature": 0.5, "n": 2,
                             "seed": 2 ** 63 - 1})
    assert r.status_code == 200
    assert http.get("/health").json()["status"] == "ok"
