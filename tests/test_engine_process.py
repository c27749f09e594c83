"""The engine in its own process (serve.engine_proc): the same answers as the in-thread scheduler (greedy, mixes,
streams, logprobs, n > 1), runtime loads and unloads, cancellation, the queue limit, and a crash of the engine
process answered with 500 and recovered from. A tiny random model and library; uvicorn on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import httpx
import pytest

from dlplora.adapters import load_peft_adapter
from dlplora.engine import DLPLoRA
from dlplora.serve import ServeConfig, ServerThread, create_app
from dlplora.serve.engine_proc import WIRE_FIELDS
from dlplora.serve.scheduler import GenRequest
from dlplora.testing import random_peft_adapter, random_peft_library

pytestmark = pytest.mark.usefixtures("one_thread")
SPECS = {"alpha": (4, 8, ["q_proj", "v_proj"]), "beta": (8, 8, ["q_proj", "v_proj"]), "gamma": (2, 4, ["q_proj"])}


@pytest.fixture(scope="module")
def lib(tmp_path_factory, tiny_model):
    return random_peft_library(tmp_path_factory.mktemp("eproc") / "lib", tiny_model, SPECS, std=0.5, seed=3)


def _server(lib, process: bool, **cfg):
    engine = DLPLoRA.from_library(lib)
    config = ServeConfig(**{"max_batch_size": 8, "max_tokens_limit": 64, "request_timeout": 60, **cfg},
                         engine_process=process)
    app = create_app(engine, config, engine_spec=dict(lib_dir=str(lib), threads=1) if process else None)
    return ServerThread(app), app.state.dlp


@pytest.fixture(scope="module")
def proc_server(lib):
    srv, state = _server(lib, True)
    with srv:
        srv.state = state
        yield srv


BODIES = [
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "hello there"}]}),
    ("/v1/chat/completions", {"adapters": {"alpha": 0.3, "beta": 0.7}, "messages": [{"role": "user", "content": "a b c"}]}),
    ("/v1/completions", {"adapters": {"gamma": 1.0}, "prompt": "one two three four"}),
    ("/v1/completions", {"adapters": {}, "prompt": "the base model"}),
    ("/v1/chat/completions", {"adapters": {"beta": 0.5, "gamma": 0.5}, "messages": [{"role": "user", "content": "x"}],
                              "logprobs": True, "top_logprobs": 2}),
    ("/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "yz"}], "n": 2,
                              "stop": ["\n"]}),
]


def _answers(url):
    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for path, body in BODIES:
            r = c.post(path, json=body | {"max_tokens": 12})
            assert r.status_code == 200, r.text
            d = r.json()
            out.append([(ch.get("message", {}).get("content") or ch.get("text"), ch.get("logprobs"))
                        for ch in d["choices"]])
    return out


def test_the_wire_carries_only_request_fields():
    names = {f.name for f in dataclasses.fields(GenRequest)}
    assert set(WIRE_FIELDS) <= names and "emit" not in WIRE_FIELDS


def test_answers_equal_the_in_thread_scheduler(lib, proc_server):
    srv, _ = _server(lib, False)
    with srv:
        expected = _answers(srv.url)
    got = _answers(proc_server.url)
    assert got == expected
    assert any(lp for ans in got for _, lp in ans)  # logprobs came back through the pipe


def test_streams_and_concurrent_requests_match_one_at_a_time(proc_server):
    url = proc_server.url
    body = {"adapters": {"alpha": 0.5, "beta": 0.5}, "messages": [{"role": "user", "content": "stream me"}],
            "max_tokens": 16}
    with httpx.Client(base_url=url, timeout=60) as c:
        alone = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        text = ""
        with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ch = json.loads(line[6:])["choices"][0]
                    text += ch["delta"].get("content") or ""
        assert text == alone
    import concurrent.futures as cf

    with httpx.Client(base_url=url, timeout=60) as c, cf.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda _: c.post("/v1/chat/completions", json=body).json(), range(6)))
    assert all(o["choices"][0]["message"]["content"] == alone for o in outs)


def test_a_runtime_load_and_unload_reach_the_engine_process(lib, tiny_model, tmp_path):
    served = tmp_path / "lib"
    shutil.copytree(lib, served)
    random_peft_adapter(tiny_model, tmp_path / "delta", rank=4, seed=77, std=0.5)
    srv, state = _server(served, True, allow_runtime_adapters=True)
    with srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": str(tmp_path / "delta")})
        assert r.status_code == 200, r.text
        r = c.post("/v1/completions", json={"model": "delta", "prompt": "p q r", "max_tokens": 6})
        assert r.status_code == 200, r.text
        assert state.scheduler.has_adapter("delta")
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "delta"})
        assert r.status_code == 200, r.text
        assert not state.scheduler.has_adapter("delta")
        r = c.post("/v1/completions", json={"model": "delta", "prompt": "p q r", "max_tokens": 6})
        assert r.status_code == 404


def test_an_unload_that_times_out_still_lands_and_frees_the_name(lib, tiny_model, tmp_path):
    """An unload waiting for a request times out; when the request ends the engine drops the adapter, and the API side
    hears of it, so the name can be loaded again (has_adapter used to stay true: 409 on every load until a restart)."""
    served = tmp_path / "lib"
    shutil.copytree(lib, served)
    random_peft_adapter(tiny_model, tmp_path / "delta", rank=4, seed=77, std=0.5)
    srv, state = _server(served, True, allow_runtime_adapters=True, max_tokens_limit=512)
    sch = state.scheduler
    with srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        body = {"lora_name": "delta", "lora_path": str(tmp_path / "delta")}
        assert c.post("/v1/load_lora_adapter", json=body).status_code == 200
        with c.stream("POST", "/v1/completions", json={"model": "delta", "prompt": "p q r", "max_tokens": 400,
                                                        "stream": True, "stop": ["never-ever"]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    with pytest.raises(TimeoutError):
                        sch.remove_adapter("delta", wait=True, timeout=0.01)
                    break
        t0 = time.monotonic()
        while sch.has_adapter("delta"):
            assert time.monotonic() - t0 < 30, "the late unload never reached the API side"
            time.sleep(0.05)
        assert "delta" not in state.engine.fusion  # the API side's copy follows
        # the engine's stacks take the name again (the live library refused a load while has_adapter held)
        sch.add_adapter("delta", served / "adapters" / "delta", load_peft_adapter(served / "adapters" / "delta", "delta"))
        assert sch.has_adapter("delta") and "delta" in state.engine.fusion


def test_a_crashed_engine_fails_requests_in_flight_then_comes_back(lib):
    srv, state = _server(lib, True)
    with srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        sch = state.scheduler
        old_pid = sch.proc.pid
        events = []
        with c.stream("POST", "/v1/completions", json={"model": "alpha", "prompt": "long", "max_tokens": 64,
                                                        "stream": True, "stop": ["never-ever"]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        sch.crash()  # the engine dies with this request in flight
        errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
        finished = [e for e in events if e != "[DONE]" and "error" not in json.loads(e)
                    and json.loads(e)["choices"][0]["finish_reason"]]
        if finished:  # the tiny model can finish 64 tokens before the crash lands
            assert not errors
        else:
            assert errors and errors[0]["code"] == "engine_crashed", events
        t0 = time.monotonic()
        while sch.restarts < 1 or c.get("/health").status_code != 200:
            assert time.monotonic() - t0 < 60, "the engine did not come back"
            r = c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
            assert r.status_code in (200, 503), r.text  # 503 while the new engine loads, never a hang
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "engine_unavailable"
            time.sleep(0.1)
        assert sch.proc.pid != old_pid and sch.restarts == 1
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert "dlp_lora_engine_restarts_total 1" in c.get("/metrics").text
        assert not sch.reqs


def test_requests_in_flight_at_a_crash_get_500_not_a_hang(lib):
    """64 rows for 8 slots: a crash finds requests in flight whatever the model's speed."""
    import concurrent.futures as cf

    srv, state = _server(lib, True)
    with srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        body = {"model": "alpha", "prompt": "go on", "max_tokens": 64, "stop": ["never-ever"], "n": 8,
                "temperature": 1.0, "seed": 1}
        with cf.ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(c.post, "/v1/completions", json=body) for _ in range(8)]
            time.sleep(0.2)
            state.scheduler.crash()
            codes = [f.result(timeout=60).status_code for f in futs]
        assert set(codes) <= {200, 500, 503} and 500 in codes, codes
        assert not state.scheduler.reqs


def test_a_crash_with_nothing_in_flight_restarts_and_counts_stay_monotonic(lib):
    srv, state = _server(lib, True)
    with srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 3})
        time.sleep(0.6)
        before = state.metrics.generated_tokens
        assert before >= 1
        state.scheduler.crash()
        t0 = time.monotonic()
        while state.scheduler.restarts < 1 or c.get("/health").status_code != 200:
            assert time.monotonic() - t0 < 60
            time.sleep(0.2)
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200, r.text
        time.sleep(0.6)
        assert state.metrics.generated_tokens >= before + 1


def test_a_client_that_goes_away_is_cancelled_in_the_engine(proc_server):
    with httpx.Client(base_url=proc_server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"model": "alpha", "prompt": "go", "max_tokens": 64,
                                                        "stream": True, "stop": ["never-ever"]}) as r:
            for _ in r.iter_lines():
                break  # hang up after the first event
        t0 = time.monotonic()
        while proc_server.state.scheduler.reqs:
            assert time.monotonic() - t0 < 30, "the cancelled request never left the engine"
            time.sleep(0.1)


def test_engine_process_needs_a_recipe(lib):
    from dlplora.errors import DLPLoRAError

    engine = DLPLoRA.from_library(lib)
    with pytest.raises(DLPLoRAError, match="engine_spec"):
        create_app(engine, ServeConfig(engine_process=True))


def test_a_broken_pipe_answers_503_and_leaks_no_call(proc_server, monkeypatch):
    """A pipe that breaks (the engine just died) turns a submit or a stack change into 503 engine_unavailable, with
    nothing left waiting in the client's tables (a load used to surface a raw 500 and leave its call behind)."""
    from dlplora.serve.config import APIError

    sch = proc_server.state.scheduler

    def broken(msg):
        raise BrokenPipeError("engine gone")

    monkeypatch.setattr(sch, "_send", broken)
    with pytest.raises(APIError) as err:
        sch.remove_adapter("alpha")
    assert err.value.status == 503 and err.value.code == "engine_unavailable" and not sch.calls
    req = GenRequest(ids=[1, 2], adapters={}, max_new=2, emit=lambda *a: None)
    with pytest.raises(APIError) as err:
        sch.submit(req)
    assert err.value.status == 503 and req.id not in sch.reqs
