"""Serving benchmark in the manner of `vllm bench serve`: our server over HTTP from a separate client process, against
the offline engine on the same prompts, and (with ``--llama-server PATH``) llama.cpp's llama-server.

The server under test runs in its own process: ``dlp-lora serve`` started here as a subprocess with the given
``--dtype / --quantize / --compile / --threads / --max-batch-size`` (stopped at the end, also on an error or
Ctrl-C), or any OpenAI-compatible server at ``--base-url`` (ours, a Ray Serve deployment of it, or llama-server
with ``--backend llama-server``). The client (:mod:`dlplora.bench.loadgen`, asyncio + httpx) runs in this process.

Workload: ``--num-prompts`` test prompts of the tasks in ``--data`` (a prepared data directory, at their real
lengths; without it, short synthetic prompts, for tests), round robin over the tasks: 40% routed by the server's
plugin (``"model": "dlp-lora"``), 30% pinned to the task's adapter, 30% a random weighted mix of 2-3 adapters; 3/4
chat, 1/4 completions; half streamed; greedy, ``--max-tokens`` each. Adapters: ``--library LIB``, else a temporary
library of random adapters of the trained adapters' shape (rank 8 on every linear layer of the top 10 layers, as
``train-loras`` makes them), named after the tasks, with a plugin trained on the tasks' training prompts.

At each ``--max-concurrency`` level (arrivals all at once, or ``--request-rate`` Poisson with ``--burstiness``):
vLLM's metrics (TTFT, TPOT, ITL, E2EL: mean / p50 / p90 / p99 ms; TTFT, ITL and TPOT from the streamed requests),
output tokens/s, requests/s, failed requests. Each level runs its contenders one after another, each alone on the
machine (our server is started for the level and stopped after it): first the server, then the same requests offline
in this process (:mod:`dlplora.bench.offline`), statically (``DLPLoRA.generate`` in batches of the level's
concurrency; its texts are the reference: ``mismatches``, with examples) and continuously (the server's scheduler with
the level's concurrency in slots, driven directly, no HTTP): ``server_vs_offline`` = served output tok/s / continuous
offline output tok/s (``server_vs_offline_static``: over the static batches).
Then llama-server gets the same requests, a set as per-request LoRA scales and a routed request the set our router
chose (:mod:`dlplora.bench.llama_server`).

The last line of ``--json``: ``{"server_vs_offline", "server_vs_offline_static", "vs_llama_server", "ttft_p99_vs_llama_server",
"tpot_1client_vs_llama_server", "requests", "failed", "mismatches", "dtype", "quantize", "cpu_flags", "levels":
[...], ...}`` (ratios at the highest level; TPOT at concurrency 1; ours / theirs).

    dlp-lora bench serve --data /work/data --max-concurrency 1,8,32 --threads 2 --json
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from ..errors import DLPLoRAError
from . import loadgen
from .offline import Offline

PLUGIN_SEED = 0


def add_arguments(p) -> None:
    """The options but --dtype / --device / --quantize / --compile, which are `dlp-lora serve`'s own
    (``cli.common.add_precision_arguments``, added by ``cli.bench``), so both have the same defaults."""
    p.add_argument("--base-url", metavar="URL", help="an OpenAI-compatible server already running (its root, e.g. "
                                                     "http://127.0.0.1:8000); default: start `dlp-lora serve` here")
    p.add_argument("--backend", choices=("dlp-lora", "llama-server"), default="dlp-lora",
                   help="the API of --base-url: ours, or llama-server (its --lora files in the library's order; "
                        "routed requests get no adapter there)")
    p.add_argument("--api-key", metavar="KEY", help="the API key of --base-url")
    p.add_argument("--library", metavar="LIB", help="the adapter library (with its plugin); default: a temporary "
                                                    "library of random adapters named after the tasks")
    p.add_argument("--data", metavar="DIR", help="prepared data (`dlp-lora data prepare`): the tasks' test prompts "
                                                 "(and, for the temporary library, training prompts of its plugin)")
    p.add_argument("--model", help="base model (default: the library's, else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapters", type=int, default=26, metavar="N",
                   help="adapters of the temporary library (default 26; the tasks of --data first)")
    p.add_argument("--num-prompts", type=int, default=200, metavar="N", help="requests per level (default 200)")
    p.add_argument("--max-concurrency", default="1,8,32", metavar="C[,C...]",
                   help="requests in flight at most: one level or a comma-separated list (default 1,8,32)")
    p.add_argument("--request-rate", type=float, default=math.inf, metavar="R",
                   help="requests per second (Poisson arrivals); inf = all at once (default inf)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival intervals (1 = Poisson, < 1 burstier; default 1)")
    p.add_argument("--seed", type=int, default=0, help="the workload's and the arrivals' seed (default 0)")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="max_tokens of every request (default 64)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of our server and the offline engine, "
                                                          "llama-server's -t (default 2)")
    p.add_argument("--max-batch-size", type=int, default=0, metavar="N",
                   help="our server's batch (default: the highest concurrency level)")
    p.add_argument("--no-offline", action="store_true",
                   help="skip the offline run (no server_vs_offline, no comparison of texts)")
    p.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary: run it on the same "
                                                          "workload after ours (converted adapters, Q4_1 GGUF)")
    p.add_argument("--llama-src", metavar="DIR", help="llama.cpp's source directory, for convert_lora_to_gguf.py "
                                                      "(default: the tree above PATH's build/bin)")
    p.add_argument("--gguf", help="the GGUF llama-server serves (default: the embedded Q4_1 one)")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="per-request timeout (default 3600)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")


# ---------------------------------------------------------------- the library and the prompts

def _prompt_tasks(data: str | None, n: int):
    from .live import make_tasks

    if data and not Path(data).is_dir():
        raise DLPLoRAError(f"--data {data}: no such directory")
    return make_tasks(data, n)


def _data_task_count(data: str | None) -> int:
    if not data:
        return 0
    return sum((p / "train.jsonl").is_file() and (p / "test.jsonl").is_file() for p in Path(data).iterdir())


def temporary_library(root: Path, model, data: str | None, n: int, log) -> tuple[Path, dict[str, list[str]]]:
    """A library of `n` random adapters of the trained adapters' shape (TrainConfig's rank, alpha, targets, top
    layers), named after the tasks of `data` (then synthetic ones), each with its task's training prompts, and a
    plugin trained on them. Returns (its directory, the tasks' test prompts)."""
    from ..backbone import load_backbone
    from ..testing import random_adapter
    from ..library import Library, add_adapter
    from ..plugin import train_plugin_from_library
    from ..testing import save_peft_adapter
    from ..train.lora import TrainConfig

    t0 = time.time()
    tasks = _prompt_tasks(data, n)
    net, _, info = load_backbone(model, dtype="float32")
    cfg = TrainConfig()
    layers = net.config.num_hidden_layers
    lowest = layers - cfg.top_layers if cfg.top_layers else 0
    for i, t in enumerate(tasks):
        ad = random_adapter(net, t.name, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, seed=100 + i, std=0.02)
        ad.layers = {k: v for k, v in ad.layers.items() if int(k.split(".layers.")[1].split(".")[0]) >= lowest}
        src = save_peft_adapter(ad, root / "adapters" / t.name, info.path)
        add_adapter(root / "lib", t.name, src, model=info.path, examples=t.rows)
    del net
    lib = Library.open(root / "lib")
    plugin, report = train_plugin_from_library(lib, seed=PLUGIN_SEED)
    plugin.save(lib.plugin_dir())
    log(f"temporary library: {len(tasks)} random rank-{cfg.rank} adapters on {'/'.join(cfg.targets)} of the top "
        f"{layers - lowest} layers of {info.name} ({sum(t.name.startswith('synth') for t in tasks)} synthetic tasks); "
        f"plugin trained on {report['train_examples']} prompts; {time.time() - t0:.0f}s")
    return lib.root, {t.name: t.tests for t in tasks}


def library_and_prompts(args, tmp: Path, log) -> tuple[Path, list[str], bool, dict[str, list[str]]]:
    """(library directory, adapter names, whether it has a plugin, test prompts by task)."""
    from ..library import Library

    if not args.library:
        lib_dir, prompts = temporary_library(tmp, args.model, args.data, args.adapters, log)
        return lib_dir, Library.open(lib_dir).names, True, prompts
    lib = Library.open(args.library)
    if not lib.names:
        raise DLPLoRAError(f"--library {args.library} holds no adapters")
    pdir = lib.plugin_dir()
    has_plugin = pdir.is_dir() and any(pdir.iterdir())
    if not args.data:
        log("no --data: short synthetic prompts instead of the tasks' test prompts")
    tasks = _prompt_tasks(args.data, _data_task_count(args.data) or len(lib.names))
    return lib.root, lib.names, has_plugin, {t.name: t.tests for t in tasks}


# ---------------------------------------------------------------- the contenders

def _our_server_command(args, lib: Path, port: int, max_queue: int) -> list[str]:
    cmd = [sys.executable, "-m", "dlplora.cli", "serve", "--library", str(lib), "--port", str(port),
           "--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size), "--max-queue", str(max_queue),
           "--max-tokens-limit", str(max(512, args.max_tokens)), "--request-timeout", str(args.timeout),
           "--dtype", args.dtype, "--quantize", args.quantize, "--device", args.device, "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    if args.compile:
        cmd.append("--compile")
    return cmd


def _package_env() -> dict:
    """This process's environment with the dlplora package importable (a source checkout run with PYTHONPATH)."""
    root = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def _levels_over(url: str, requests, levels, args, log, label: str, api_key=None, at_level=None) -> dict[int, tuple]:
    """Drive `url` at every level (one unmeasured warm-up request first): {level: (summary, outcomes)}.
    `at_level(c)`: a context manager entered around each level (llama-server: a server with c slots)."""
    out = {}
    for c in levels:
        with (at_level(c) if at_level else contextlib.nullcontext(url)) as u:
            warm, _ = loadgen.drive(u, requests[:1], 1, api_key=api_key, timeout=args.timeout)
            if not warm[0].ok:
                raise DLPLoRAError(f"{label}: the warm-up request failed: {warm[0].error}")
            outcomes, dt = loadgen.drive(u, requests, c, args.request_rate, args.burstiness, args.seed,
                                         api_key=api_key, timeout=args.timeout)
        s = loadgen.summarize(outcomes, dt)
        out[c] = (s, outcomes)
        log(f"  {label:<12} concurrency {c:>3}: {s['output_tok_s']:8.1f} tok/s  {s['requests_per_s']:6.2f} req/s  "
            f"TTFT p50/p99 {_ms(s['ttft_ms'], 'p50')}/{_ms(s['ttft_ms'], 'p99')}  TPOT p50 {_ms(s['tpot_ms'], 'p50')}"
            f"  failed {s['failed']}")
    return out


def _ms(stats: dict | None, key: str) -> str:
    return "-" if not stats else f"{stats[key]:.0f}ms"


def compare(items: list, outcomes: list, offline: list[dict]) -> dict:
    """Every served greedy response against the offline text of the same prompt and set: mismatches (with up to 3
    examples), and routed requests whose set differs from the offline routing."""
    diffs, compared, routing_diffs = [], 0, 0
    for it, o in zip(items, outcomes):
        off = offline[it.index]
        if not o.ok or "error" in off:
            continue
        compared += 1
        if o.routing is not None:
            served = {a["name"]: a["weight"] for a in o.routing.get("adapters", [])}
            routing_diffs += served != {a["name"]: a["weight"] for a in off["routing"]["adapters"]}
        if o.text != off["text"]:
            at = next((i for i, (a, b) in enumerate(zip(o.text, off["text"])) if a != b),
                      min(len(o.text), len(off["text"])))
            diffs.append({"index": it.index, "task": it.task, "kind": it.kind, "chat": it.chat, "stream": it.stream,
                          "adapters": it.adapters, "at_char": at, "served": o.text[max(0, at - 20):at + 40],
                          "offline": off["text"][max(0, at - 20):at + 40]})
    return {"compared": compared, "mismatches": len(diffs), "routing_mismatches": routing_diffs,
            "mismatch_examples": diffs[:3]}


def llama_server_levels(args, lib: Path, names: list[str], items: list, routes: list[dict], need: int, tmp: Path,
                        log):
    """(the requests for llama-server, a context manager factory: a llama-server with `c` slots on the converted
    adapters, yielding its URL). `routes`: every item's set (a routed item: the set our router chose); `need`: the
    tokens a slot must hold."""
    from ..backbone import default_gguf_path, resolve_model
    from ..library import Library
    from .llama_server import convert_adapters, llama_source, server_command

    lib_obj = Library.open(lib)
    src = llama_source(args.llama_server, args.llama_src)
    base = lib_obj.base_model_dir(args.model)
    ggufs = convert_adapters(src, resolve_model(base), {n: lib_obj.adapter_dir(n) for n in names}, tmp / "gguf", log)
    ids = {n: i for i, n in enumerate(names)}
    requests = [loadgen.llama_body(it, args.max_tokens, routes[it.index], ids) for it in items]
    gguf = args.gguf or str(default_gguf_path())

    @contextlib.contextmanager
    def server(c):
        port = loadgen.free_port()
        ctx = -(-c * need // 256) * 256
        cmd = server_command(args.llama_server, gguf, [ggufs[n] for n in names], args.threads, c, ctx, port)
        with loadgen.ServerProcess(cmd, f"http://127.0.0.1:{port}", tmp / f"llama-server-{c}.log", "llama-server"):
            yield f"http://127.0.0.1:{port}"

    return requests, server


# ---------------------------------------------------------------- the benchmark

def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _pick(summary: dict | None, metric: str, key: str):
    stats = (summary or {}).get(metric)
    return stats[key] if stats else None


def bench(args, log=print) -> dict:
    from ..device import auto_dtype_name, cpu_flags
    from ..quantize import quantize_dtype, resolve_quantize

    levels = args.levels
    flags = cpu_flags()
    args.quantize = resolve_quantize(args.quantize, args.device, args.dtype)  # auto: what this CPU gets (stated)
    dtype = quantize_dtype(args.quantize) or (auto_dtype_name(args.device if args.device != "auto" else "cpu", flags)
                                              if args.dtype == "auto" else args.dtype)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="dlp-bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        lib, names, has_plugin, prompts = library_and_prompts(args, tmp, log)
        items = loadgen.build_workload(prompts, names, args.num_prompts, args.seed, routed=has_plugin)
        log(f"{len(items)} requests per level ({sum(it.kind == loadgen.ROUTED for it in items)} routed, "
            f"{sum(it.kind == loadgen.MIX for it in items)} mixes, {sum(it.chat for it in items)} chat, "
            f"{sum(it.stream for it in items)} streamed), max_tokens {args.max_tokens}, {len(names)} adapters, "
            f"{dtype}{' + ' + args.quantize if args.quantize != 'none' else ''}, {args.threads} threads, CPU flags "
            f"{' '.join(flags) or '-'}")
        offline_run = None if args.no_offline else Offline(args, lib, items)  # loaded now, idle while others run
        llama_requests = llama_at = None
        if args.llama_server:
            need = len(offline_run.engine.tokenizer(offline_run.order[-1].prompt)["input_ids"]) + args.max_tokens + 64
            llama_requests, llama_at = llama_server_levels(args, lib, names, items, offline_run.routes(), need, tmp,
                                                           log)
        ready: list[float] = []
        our_at, url = None, (args.base_url or "").rstrip("/")
        if args.base_url and args.backend == "llama-server":
            ids = {n: i for i, n in enumerate(names)}
            requests = [loadgen.llama_body(it, args.max_tokens, it.adapters or {}, ids) for it in items]
        else:
            requests = [loadgen.request_body(it, args.max_tokens) for it in items]
        if not args.base_url:
            @contextlib.contextmanager
            def our_at(c):
                port = loadgen.free_port()
                cmd = _our_server_command(args, lib, port, max(64, 2 * c))
                with loadgen.ServerProcess(cmd, f"http://127.0.0.1:{port}", tmp / f"server-{c}.log", "dlp-lora serve",
                                           env=_package_env()) as srv:
                    ready.append(round(srv.ready_s, 1))
                    log(f"dlp-lora serve ready in {srv.ready_s:.1f}s (pid {srv.proc.pid})")
                    yield srv.url

        ours, offline, continuous, llama = {}, {}, {}, {}
        for c in levels:  # a level's contenders one after another, each alone on the machine
            ours.update(_levels_over(url, requests, [c], args, log, "server", args.api_key, at_level=our_at))
            if offline_run is not None:
                offline[c] = offline_run.level(c, log)
                continuous[c] = offline_run.continuous(c, log)
            if llama_at is not None:
                llama.update(_levels_over("", llama_requests, [c], args, log, "llama-server", at_level=llama_at))

    rows = []
    for c in levels:
        s, outcomes = ours[c]
        row = {"concurrency": c, "server": s}
        if c in offline:  # the ratio against the server's scheduler driven offline; texts against DLPLoRA.generate
            row["offline"] = offline[c][0]
            row["offline_continuous"] = continuous[c][0]
            row["server_vs_offline"] = _ratio(s["output_tok_s"], continuous[c][0]["output_tok_s"])
            row["server_vs_offline_static"] = _ratio(s["output_tok_s"], offline[c][0]["output_tok_s"])
            row.update(compare(items, outcomes, offline[c][1]))
            row["continuous_mismatches"] = compare(items, outcomes, continuous[c][1])["mismatches"]
        if c in llama:
            t = llama[c][0]
            row["llama_server"] = t
            row["vs_llama_server"] = _ratio(s["output_tok_s"], t["output_tok_s"])
            row["ttft_p99_vs_llama_server"] = _ratio(_pick(s, "ttft_ms", "p99"), _pick(t, "ttft_ms", "p99"))
            row["tpot_vs_llama_server"] = _ratio(_pick(s, "tpot_ms", "mean"), _pick(t, "tpot_ms", "mean"))
        rows.append(row)
    top, one = rows[-1], next((r for r in rows if r["concurrency"] == 1), {})
    return {"server_vs_offline": top.get("server_vs_offline"),
            "server_vs_offline_static": top.get("server_vs_offline_static"), "vs_llama_server": top.get("vs_llama_server"),
            "ttft_p99_vs_llama_server": top.get("ttft_p99_vs_llama_server"),
            "tpot_1client_vs_llama_server": one.get("tpot_vs_llama_server"), "at_concurrency": top["concurrency"],
            "requests": sum(r["server"]["requests"] for r in rows), "failed": sum(r["server"]["failed"] for r in rows),
            "mismatches": sum(r.get("mismatches", 0) for r in rows) if offline else None,
            "compared": sum(r.get("compared", 0) for r in rows),
            "llama_server_failed": sum(r["llama_server"]["failed"] for r in rows) if llama else None,
            "dtype": dtype, "quantize": args.quantize, "compile": bool(args.compile), "threads": args.threads,
            "cpu_flags": flags, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
            "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
            "burstiness": args.burstiness, "seed": args.seed, "max_batch_size": args.max_batch_size,
            "base_url": args.base_url, "backend": args.backend, "library": args.library or "temporary",
            "data": args.data, "adapters": len(names), "server_ready_s": ready,
            "llama_server": args.llama_server, "total_seconds": round(time.time() - t_start, 1), "levels": rows}


def print_table(res: dict) -> None:
    print(f"{'contender':<13}{'C':>4}{'tok/s':>9}{'req/s':>7}{'failed':>7}  {'TTFT p50/p99 ms':>16}  "
          f"{'TPOT p50/p99 ms':>16}  {'ITL p50/p99 ms':>15}  {'E2EL p50/p99 ms':>16}")
    for row in res["levels"]:
        for label, key in (("server", "server"), ("llama-server", "llama_server"), ("offline", "offline"),
                           ("offline-cont", "offline_continuous")):
            s = row.get(key)
            if s is None:
                continue
            cols = "".join(f"  {_pair(s.get(m)):>{w}}" for m, w in (("ttft_ms", 16), ("tpot_ms", 16), ("itl_ms", 15),
                                                                     ("e2el_ms", 16)))
            print(f"{label:<13}{row['concurrency']:>4}{s['output_tok_s']:>9.1f}{s.get('requests_per_s', 0):>7.2f}"
                  f"{s['failed']:>7}{cols}")
        extra = [f"{k} {row[k]}" for k in ("server_vs_offline", "server_vs_offline_static", "vs_llama_server",
                                            "ttft_p99_vs_llama_server", "mismatches", "continuous_mismatches",
                                            "routing_mismatches") if row.get(k) is not None]
        if extra:
            print(f"{'':<17}" + ", ".join(extra))
        for ex in row.get("mismatch_examples", []):
            print(f"{'':<17}mismatch #{ex['index']} ({ex['task']}, {ex['kind']}, at char {ex['at_char']}): "
                  f"served {ex['served']!r} / offline {ex['offline']!r}")


def _pair(stats: dict | None) -> str:
    return "-" if not stats else f"{stats['p50']:.0f} / {stats['p99']:.0f}"


def run(args) -> dict:
    try:
        levels = [int(x) for x in str(args.max_concurrency).split(",") if x.strip()]
    except ValueError:
        raise DLPLoRAError(f"--max-concurrency {args.max_concurrency!r}: expected an integer or comma-separated "
                           f"integers, e.g. 1,8,32") from None
    if not levels or min(levels) < 1:
        raise DLPLoRAError(f"--max-concurrency {args.max_concurrency!r}: every level must be >= 1")
    args.levels = sorted(set(levels))
    for name in ("num_prompts", "max_tokens", "threads", "adapters"):
        if getattr(args, name) < 1:
            raise DLPLoRAError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.request_rate > 0:
        raise DLPLoRAError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    if not (args.burstiness > 0 and math.isfinite(args.burstiness)):
        raise DLPLoRAError(f"--burstiness must be a positive number, got {args.burstiness}")
    if args.max_batch_size < 0:
        raise DLPLoRAError("--max-batch-size must be >= 1 (or 0: the highest concurrency level)")
    args.max_batch_size = args.max_batch_size or max(args.levels)
    if args.base_url and not args.library:
        raise DLPLoRAError("--base-url needs --library: the library the server serves (its adapters' names, and "
                           "the offline run)")
    if args.backend == "llama-server" and not (args.base_url and args.no_offline):
        raise DLPLoRAError("--backend llama-server is for a llama-server at --base-url, with --no-offline (its texts "
                           "are not ours); or give --llama-server PATH to run it beside ours")
    if args.llama_server and args.no_offline:
        raise DLPLoRAError("--llama-server needs the offline engine (the sets our router chooses); drop --no-offline")
    if args.llama_server and not Path(args.llama_server).is_file():
        raise DLPLoRAError(f"--llama-server {args.llama_server}: no such file (build_llama_cpp.sh prints its path)")
    res = bench(args, log=lambda *a: print(*a, flush=True))
    print_table(res)
    if args.json:
        print(json.dumps(res))
    return res
