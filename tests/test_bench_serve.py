"""`dlp-lora bench serve`: the load generator (workload, request bodies, vLLM's metrics, the server subprocess) and a
whole run against `dlp-lora serve` in a subprocess, on a tiny model."""

from __future__ import annotations

import json
import sys

import pytest

from dlplora.bench import loadgen
from dlplora.bench.loadgen import MIX, PINNED, ROUTED, Item, Outcome
from dlplora.cli import build_parser
from dlplora.errors import DLPLoRAError

NAMES = ["alpha", "beta", "gamma", "delta"]
PROMPTS = {t: [f"{t} prompt {i}" for i in range(5)] for t in ("alpha", "beta", "other")}


def test_workload_mixes_routed_pinned_and_mixes_deterministically():
    items = loadgen.build_workload(PROMPTS, NAMES, 60, seed=3)
    again = loadgen.build_workload(PROMPTS, NAMES, 60, seed=3)
    assert [vars(a) for a in items] == [vars(b) for b in again]
    assert [it.index for it in items] == list(range(60))
    assert {it.task for it in items} == set(PROMPTS) and {it.kind for it in items} == {ROUTED, PINNED, MIX}
    assert {it.chat for it in items} == {True, False} and {it.stream for it in items} == {True, False}
    for it in items:
        assert it.prompt in PROMPTS[it.task]
        if it.kind == ROUTED:
            assert it.adapters is None
        elif it.kind == PINNED:  # the task's own adapter where the library has one
            (name, w), = it.adapters.items()
            assert w == 1.0 and (name == it.task or it.task == "other")
        else:
            assert 2 <= len(it.adapters) <= 3 and set(it.adapters) <= set(NAMES)
            assert sum(it.adapters.values()) == pytest.approx(1, abs=0.01)
    # each task's prompts drawn without replacement while they last: 20 requests of a task, 5 prompts, 4 each
    assert all(sum(it.prompt == p for it in items) == 4 for ps in PROMPTS.values() for p in ps)
    assert ROUTED not in {it.kind for it in loadgen.build_workload(PROMPTS, NAMES, 30, routed=False)}


def test_request_bodies_ours_and_llama_servers_lora_scales():
    chat = Item(0, "alpha", "hi there", MIX, {"beta": 0.3, "alpha": 0.7}, chat=True, stream=True)
    path, body = loadgen.request_body(chat, 8)
    assert path == "/v1/chat/completions" and body["model"] == "dlp-lora" and body["adapters"] == chat.adapters
    assert body["messages"] == [{"role": "user", "content": "hi there"}] and body["max_tokens"] == 8
    assert body["temperature"] == 0 and body["stream"] and body["stream_options"] == {"include_usage": True}
    pinned = Item(1, "alpha", "x", PINNED, {"gamma": 1.0}, chat=False, stream=False)
    path, body = loadgen.request_body(pinned, 4)
    assert path == "/v1/completions" and body["prompt"] == "x" and body["model"] == "gamma"
    assert "adapters" not in body and "stream_options" not in body
    routed = Item(2, "alpha", "x", ROUTED, None, chat=True, stream=False)
    assert loadgen.request_body(routed, 4)[1]["model"] == "dlp-lora" and "adapters" not in loadgen.request_body(
        routed, 4)[1]

    ids = {n: i for i, n in enumerate(NAMES)}
    assert loadgen.lora_scales({"beta": 0.3, "alpha": 0.7}, ids) == [{"id": 0, "scale": 0.7}, {"id": 1, "scale": 0.3}]
    assert loadgen.lora_scales({}, ids) == []  # the base model: every adapter at scale 0
    path, body = loadgen.llama_body(routed, 4, {"delta": 1.0}, ids)  # a routed request gets our router's set
    assert body["lora"] == [{"id": 3, "scale": 1.0}] and "adapters" not in body and path == "/v1/chat/completions"
    with pytest.raises(DLPLoRAError, match="no LoRA for zeta"):
        loadgen.lora_scales({"zeta": 1.0}, ids)


def test_metrics_follow_vllms_definitions():
    a = Outcome(0, ok=True, output_tokens=5, prompt_tokens=7, latency=1.0, ttft=0.2, itl=[0.2, 0.2, 0.2, 0.2])
    b = Outcome(1, ok=True, output_tokens=3, prompt_tokens=3, latency=0.5)  # not streamed: E2EL only
    c = Outcome(2, ok=True, output_tokens=1, latency=0.3, ttft=0.3)  # one token: no TPOT
    d = Outcome(3, error="HTTP 500: boom", latency=0.1)
    s = loadgen.summarize([a, b, c, d], 2.0)
    assert (s["requests"], s["completed"], s["failed"], s["streamed"]) == (4, 3, 1, 2)
    assert s["output_tokens"] == 9 and s["input_tokens"] == 10
    assert s["output_tok_s"] == 4.5 and s["requests_per_s"] == 1.5
    assert s["ttft_ms"]["mean"] == 250.0 and s["ttft_ms"]["p50"] == 250.0
    assert s["tpot_ms"] == {"mean": 200.0, "p50": 200.0, "p90": 200.0, "p99": 200.0}  # (1.0 - 0.2) / (5 - 1)
    assert s["itl_ms"]["p99"] == 200.0 and s["e2el_ms"]["mean"] == 600.0
    assert s["failed_examples"] == [{"index": 3, "error": "HTTP 500: boom"}]
    assert loadgen.summarize([d], 1.0)["ttft_ms"] is None


def test_compare_counts_mismatches_and_routing_differences():
    from dlplora.bench.serve import compare

    items = [Item(i, "t", "p", ROUTED, None, chat=True, stream=False) for i in range(3)]
    routing = {"adapters": [{"name": "alpha", "weight": 1.0}]}
    served = [Outcome(0, ok=True, text="same", routing=routing), Outcome(1, ok=True, text="abXd", routing=routing),
              Outcome(2, error="HTTP 503")]
    offline = [{"text": "same", "routing": routing}, {"text": "abcd", "routing": {"adapters": []}},
               {"text": "z", "routing": routing}]
    r = compare(items, served, offline)
    assert (r["compared"], r["mismatches"], r["routing_mismatches"]) == (2, 1, 1)
    assert r["mismatch_examples"][0]["index"] == 1 and r["mismatch_examples"][0]["at_char"] == 2


HEALTHY = ("import http.server, sys\n"
           "class H(http.server.BaseHTTPRequestHandler):\n"
           "    def do_GET(self):\n"
           "        self.send_response(200); self.end_headers()\n"
           "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")


def test_server_process_waits_for_health_and_always_stops(tmp_path):
    port = loadgen.free_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(KeyboardInterrupt):
        with loadgen.ServerProcess([sys.executable, "-c", HEALTHY, str(port)], url, tmp_path / "a.log", "test") as s:
            assert s.proc.poll() is None and s.ready_s > 0
            raise KeyboardInterrupt  # Ctrl-C during the run
    assert s.proc.poll() is not None  # stopped
    with pytest.raises(DLPLoRAError, match=r"exited with code 3 before it was ready(.|\n)*booting"):
        with loadgen.ServerProcess([sys.executable, "-c", "print('booting'); raise SystemExit(3)"], url,
                                   tmp_path / "b.log", "test"):
            pass
    hung = loadgen.ServerProcess([sys.executable, "-c", "import time; time.sleep(60)"], url, tmp_path / "c.log", "test",
                                 timeout=1)
    with pytest.raises(DLPLoRAError, match="not ready after 1s"):
        with hung:
            pass
    assert hung.proc.poll() is not None


@pytest.mark.parametrize("argv, message", [
    (["--max-concurrency", "1,x"], "expected an integer"),
    (["--max-concurrency", "0"], "must be >= 1"),
    (["--request-rate", "0"], "--request-rate must be > 0"),
    (["--burstiness", "0"], "--burstiness must be a positive number"),
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--base-url", "http://127.0.0.1:9"], "--base-url needs --library"),
    (["--llama-server", "/nonexistent/llama-server"], "no such file"),
    (["--backend", "llama-server"], "--backend llama-server is for a llama-server at --base-url"),
    (["--llama-server", "/x/llama-server", "--no-offline"], "needs the offline engine"),
])
def test_bad_arguments_are_named(argv, message):
    args = build_parser().parse_args(["bench", "serve"] + argv)
    with pytest.raises(DLPLoRAError, match=message):
        args.func(args)


def test_bench_serve_against_a_subprocess_server_on_a_tiny_model(tiny_model, capsys):
    argv = ["--model", str(tiny_model), "--adapters", "3", "--num-prompts", "10", "--max-concurrency", "1,3",
            "--max-tokens", "4", "--threads", "1", "--dtype", "float32", "--json"]
    args = build_parser().parse_args(["bench", "serve"] + argv)
    alias = build_parser().parse_args(["bench-serve"] + argv)
    assert args.func is alias.func and {k: v for k, v in vars(args).items() if k not in ("command", "subcommand")} == \
        {k: v for k, v in vars(alias).items() if k not in ("command", "subcommand")}
    args.func(args)
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert "server_vs_offline" in out[-2] or "mismatches" in out[-2]  # the table before the JSON line
    assert res["requests"] == 20 and res["failed"] == 0 and res["compared"] == 20
    assert res["mismatches"] == 0  # fp32: every greedy served text equals the offline engine's
    assert res["dtype"] == "float32" and res["quantize"] == "none" and isinstance(res["cpu_flags"], list)
    assert res["at_concurrency"] == 3 and res["max_batch_size"] == 3
    for key in ("vs_llama_server", "ttft_p99_vs_llama_server", "tpot_1client_vs_llama_server", "llama_server_failed"):
        assert res[key] is None  # no --llama-server
    levels = {row["concurrency"]: row for row in res["levels"]}
    assert set(levels) == {1, 3}
    for c, row in levels.items():
        s, off, cont = row["server"], row["offline"], row["offline_continuous"]
        assert s["completed"] == 10 and 0 < s["streamed"] < 10 and row["routing_mismatches"] == 0
        assert 0 < s["output_tokens"] <= 10 * 4 and s["output_tokens"] == off["output_tokens"] == cont["output_tokens"]
        assert row["continuous_mismatches"] == 0 and cont["failed"] == 0  # the scheduler offline: the same texts
        assert s["output_tok_s"] == pytest.approx(s["output_tokens"] / s["duration_s"], rel=0.01)
        for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            st = s[m]
            assert 0 <= st["p50"] <= st["p90"] <= st["p99"] and st["mean"] > 0, (m, st)
        assert s["e2el_ms"]["p99"] >= s["ttft_ms"]["p50"]
        assert row["server_vs_offline"] == pytest.approx(s["output_tok_s"] / cont["output_tok_s"], abs=0.002)
        assert row["server_vs_offline_static"] == pytest.approx(s["output_tok_s"] / off["output_tok_s"], abs=0.002)
    assert res["server_vs_offline"] == levels[3]["server_vs_offline"]
    assert res["server_vs_offline_static"] == levels[3]["server_vs_offline_static"]


FAKE_CONVERTER = ("import argparse, sys\n"
                  "p = argparse.ArgumentParser(); p.add_argument('--base'); p.add_argument('--outtype')\n"
                  "p.add_argument('--outfile'); p.add_argument('src'); a = p.parse_args()\n"
                  "if a.src.endswith('bad'): sys.exit(1)\n"
                  "open(a.outfile, 'w').write(a.base + ' ' + a.outtype + ' ' + a.src)\n")


def test_adapters_go_through_llamas_converter_and_into_llama_servers_command(tmp_path):
    """A stand-in converter (llama.cpp is not built in CI): one call per adapter, the converter's argv as the issue
    gives it, its failure named; and the llama-server command line of a level."""
    from dlplora.bench.llama_server import convert_adapters, llama_source, server_command

    src = tmp_path / "llama.cpp"
    (src / "build" / "bin").mkdir(parents=True)
    (src / "build" / "bin" / "llama-server").write_text("")
    (src / "convert_lora_to_gguf.py").write_text(FAKE_CONVERTER)
    assert llama_source(str(src / "build" / "bin" / "llama-server")) == src.resolve()
    with pytest.raises(DLPLoRAError, match="--llama-src"):
        llama_source(str(tmp_path / "elsewhere" / "llama-server"))
    out = convert_adapters(src, "BASE", {"a": tmp_path / "ad_a", "b": tmp_path / "ad_b"}, tmp_path / "gguf",
                           log=lambda *a: None)
    assert {n: p.read_text() for n, p in out.items()} == {"a": f"BASE f32 {tmp_path / 'ad_a'}",
                                                          "b": f"BASE f32 {tmp_path / 'ad_b'}"}
    with pytest.raises(DLPLoRAError, match="converting the adapters to GGUF failed"):
        convert_adapters(src, "BASE", {"x": tmp_path / "ad_bad"}, tmp_path / "gguf2", log=lambda *a: None)
    cmd = server_command("llama-server", "m.gguf", [out["a"], out["b"]], threads=2, slots=8, ctx=4096, port=1234)
    assert cmd[:3] == ["llama-server", "-m", "m.gguf"]
    assert cmd[3:7] == ["--lora", str(out["a"]), "--lora", str(out["b"])]
    flags = " ".join(cmd[7:])
    assert "--lora-init-without-apply" in flags and "-t 2" in flags and "-np 8" in flags and "-c 4096" in flags


FAKE_LLAMA_SERVER = '''
import argparse, json, http.server
p = argparse.ArgumentParser()
p.add_argument("-m"); p.add_argument("--lora", action="append"); p.add_argument("-t"); p.add_argument("-np")
p.add_argument("-c"); p.add_argument("--port", type=int); p.add_argument("--host")
a, _ = p.parse_known_args()
seen = open(a.m + ".requests", "a")

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        seen.write(json.dumps({"slots": a.np, "lora": body["lora"], "n_loras": len(a.lora)}) + "\\n"); seen.flush()
        chat = self.path.endswith("chat/completions")
        self.send_response(200); self.end_headers()
        if not body.get("stream"):
            c = {"message": {"content": "ok ok"}} if chat else {"text": "ok ok"}
            usage = {"completion_tokens": 2, "prompt_tokens": 5}
            self.wfile.write(json.dumps({"choices": [c], "usage": usage}).encode())
            return
        for t in ("ok", " ok"):
            c = {"delta": {"content": t}} if chat else {"text": t}
            self.wfile.write(("data: " + json.dumps({"choices": [c]}) + "\\n\\n").encode())
        self.wfile.write(b"data: [DONE]\\n\\n")

http.server.ThreadingHTTPServer((a.host, a.port), H).serve_forever()
'''


def test_llama_server_path_with_stand_ins(tiny_model, tmp_path, capsys):
    """--llama-server end to end with a stand-in converter and llama-server (no llama.cpp in CI): every level gets
    its own server with as many slots, every request a lora list over the converted adapters, and the ratios."""
    src = tmp_path / "llama.cpp"
    (src / "build" / "bin").mkdir(parents=True)
    (src / "convert_lora_to_gguf.py").write_text(FAKE_CONVERTER)
    server = src / "build" / "bin" / "llama-server"
    server.write_text(f"#!{sys.executable}\n" + FAKE_LLAMA_SERVER)
    server.chmod(0o755)
    gguf = tmp_path / "model.gguf"
    argv = ["bench", "serve", "--model", str(tiny_model), "--adapters", "3", "--num-prompts", "6", "--max-concurrency",
            "1,2", "--max-tokens", "3", "--threads", "1", "--dtype", "float32", "--llama-server", str(server),
            "--gguf", str(gguf), "--json"]
    args = build_parser().parse_args(argv)
    args.func(args)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["failed"] == 0 and res["llama_server_failed"] == 0 and res["mismatches"] == 0
    for key in ("vs_llama_server", "ttft_p99_vs_llama_server", "tpot_1client_vs_llama_server"):
        assert res[key] > 0
    top = res["levels"][-1]
    assert res["vs_llama_server"] == pytest.approx(top["server"]["output_tok_s"] / top["llama_server"]["output_tok_s"],
                                                   abs=0.002)
    seen = [json.loads(line) for line in (tmp_path / "model.gguf.requests").read_text().splitlines()]
    assert len(seen) == 2 * (1 + 6)  # a warm-up and the requests, at each level
    assert {s["slots"] for s in seen} == {"1", "2"} and {s["n_loras"] for s in seen} == {3}
    assert all(0 <= x["id"] < 3 and x["scale"] > 0 for s in seen for x in s["lora"])
