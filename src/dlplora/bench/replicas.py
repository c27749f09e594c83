"""Replica scaling on Ray Serve: N replicas against 1 replica, side by side in one run, and a replica killed under load.

Builds a library of ``--adapters`` random-weight PEFT LoRAs (rank ``--rank`` on q_proj/v_proj, the backbone's real
shapes; default backbone: the embedded SmolLM2-135M), then

1. serves it in this process (the single-process server, ``--threads`` torch threads) and drives it with
   ``--clients`` closed-loop clients over ``--requests`` requests: pinned adapters and weighted mixes, chat and
   completions, a quarter of them streamed, greedy, ``--max-new-tokens`` each. Its texts are the reference;
2. deploys on Ray Serve (a local cluster started here with the logical CPUs every application reserves, or
   ``--ray-address``) one application of 1 replica and one of ``--replicas`` replicas per ``--placements``
   (``serve``: Serve's default router; ``by-set``: routed once at an ingress, the same adapter set to the same
   replica; ``ingress``: that ingress with Serve's default router), every replica ``--threads`` torch threads on as
   many reserved CPUs; idle applications hold memory, not CPU. Then ``--rounds`` rounds drive each in turn (the
   order reversed every other round) with the same requests: throughput = completion tokens / wall time over the
   rounds, p50 / p95 latency, requests per replica (the ``x-dlp-lora-replica`` header), and how many texts are
   identical to the single-process server's;
3. (unless ``--no-kill``) drives the ``serve`` application of ``--replicas`` replicas with ``--kill-requests``
   requests and kills one replica's actor (``ray.kill``) once a quarter of them are answered: failed requests
   (after the client's retries where they are safe: a non-streamed request on a dropped connection or a 500 / 502 /
   503, a streamed one that had received no text yet; up to ``--retries`` times), streams broken after text
   arrived, and the seconds until Serve has ``--replicas`` replicas running again, the killed one replaced.

    dlp-lora bench replicas --threads 1 --clients 16 --json
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from ..errors import DLPLoRAError

RETRY_STATUS = (500, 502, 503)
PROMPTS = [
    "Translate to English: Guten Morgen, wie geht es dir heute?",
    "What is 12 plus 7? Explain step by step.",
    "Write a short poem about the sea.",
    "Summarise: The city council met on Monday to discuss the new park and agreed to fund it next year.",
    "Is the following statement true or false? The sun rises in the west.",
    "Name three primary colours and one thing of each colour.",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?",
    "Give a one-sentence definition of photosynthesis.",
]


def add_arguments(p) -> None:
    p.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapters", type=int, default=4, metavar="N", help="random adapters in the library (default 4)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the random adapters (default 8)")
    p.add_argument("--replicas", type=int, default=2, metavar="N", help="replicas compared with 1 (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each replica and of the single-process "
                                                          "server; Ray reserves as many CPUs per replica (default 1)")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients (default 16)")
    p.add_argument("--requests", type=int, default=64, metavar="N", help="requests per measured run (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens per request (default 32)")
    p.add_argument("--max-batch-size", type=int, default=16, metavar="N", help="each server's batch (default 16)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the applications (default 2)")
    p.add_argument("--placements", default="serve,by-set",
                   help="placements of the N-replica applications, comma-separated, of serve, by-set, ingress "
                        "(default serve,by-set)")
    p.add_argument("--ray-address", metavar="ADDR", help="an existing cluster (default: a local one started here); "
                                                         "then give --work on a file system every node reads")
    p.add_argument("--work", metavar="DIR", help="where the library is written (default: a temporary directory)")
    p.add_argument("--no-kill", action="store_true", help="skip the replica-kill test")
    p.add_argument("--kill-requests", type=int, default=0, metavar="N",
                   help="requests of the kill test (default 2 x --requests)")
    p.add_argument("--retries", type=int, default=2, help="client retries where safe, in the kill test (default 2)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")


def request_sets(names: list[str]) -> list[dict]:
    """The adapter choices of the requests: each adapter pinned, then weighted mixes."""
    choices: list[dict] = [{"model": a} for a in names]
    if len(names) >= 2:
        choices.append({"adapters": {names[0]: 0.5, names[1]: 0.5}})
    if len(names) >= 3:
        choices.append({"adapters": {names[0]: 0.2, names[1]: 0.3, names[2]: 0.5}})
    return choices


def as_request(body: dict, prompt: str, completion: bool) -> tuple[str, dict]:
    """(path, body) of one request: a completion of `prompt`, or a chat turn with it as the user message."""
    if completion:
        return "/v1/completions", body | {"prompt": prompt}
    return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt}]}


def workload(names: list[str], n: int, max_new: int) -> list[tuple[str, dict]]:
    """`n` requests: each adapter pinned and weighted mixes, chat and completions, every fourth one streamed."""
    sets = request_sets(names)
    out = []
    for i in range(n):
        body = dict(sets[i % len(sets)], max_tokens=max_new, temperature=0)
        if i % 4 == 1:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        out.append(as_request(body, PROMPTS[(i // len(sets)) % len(PROMPTS)], completion=i % 3 == 2))
    return out


async def _one(client, path: str, body: dict, retries: int) -> dict:
    """Send one request (retrying where it is safe); its outcome: ok, text, tokens, replica, latency, attempts,
    error, broken (a stream cut after text arrived)."""
    import httpx

    chat = path.endswith("chat/completions")
    t0 = time.perf_counter()
    res = {"ok": False, "text": None, "tokens": 0, "replica": None, "attempts": 0, "error": None, "broken": False}
    for attempt in range(retries + 1):
        res["attempts"] = attempt + 1
        got_text, retry = False, False
        try:
            if not body.get("stream"):
                r = await client.post(path, json=body)
                res["replica"] = r.headers.get("x-dlp-lora-replica")
                if r.status_code == 200:
                    out = r.json()
                    c = out["choices"][0]
                    res.update(ok=True, text=c["message"]["content"] if chat else c["text"],
                               tokens=out["usage"]["completion_tokens"], error=None)
                else:
                    res["error"], retry = f"HTTP {r.status_code}: {r.text[:200]}", r.status_code in RETRY_STATUS
            else:
                async with client.stream("POST", path, json=body) as r:
                    res["replica"] = r.headers.get("x-dlp-lora-replica")
                    if r.status_code != 200:
                        await r.aread()
                        res["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                        retry = r.status_code in RETRY_STATUS
                    else:
                        parts, done, tokens = [], False, 0
                        async for line in r.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            if line == "data: [DONE]":
                                done = True
                                break
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(chunk["error"].get("message"))
                            if chunk.get("usage"):
                                tokens = chunk["usage"]["completion_tokens"]
                            for c in chunk.get("choices", []):
                                piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                                if piece:
                                    parts.append(piece)
                                    got_text = True
                        if not done:
                            raise RuntimeError("the stream ended without [DONE]")
                        res.update(ok=True, text="".join(parts), tokens=tokens, error=None)
        except (httpx.TransportError, RuntimeError, ValueError) as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"
            retry = not got_text  # a stream that sent text is not replayed: the client has shown it
            res["broken"] = got_text
        if res["ok"] or not retry or attempt == retries:
            break
        await asyncio.sleep(0.5 * (attempt + 1))
    res["latency"] = time.perf_counter() - t0
    return res


async def drive(url: str, work: list[tuple[str, dict]], clients: int, retries: int = 0, on_done=None) -> dict:
    """`clients` closed-loop clients over `work`; the outcomes in order, tokens per second and latencies."""
    import httpx

    todo = list(enumerate(work))[::-1]
    results: list = [None] * len(work)

    async def worker(client):
        while todo:
            i, (path, body) = todo.pop()
            results[i] = await _one(client, path, body, retries)
            if on_done is not None:
                on_done(sum(r is not None for r in results))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    tokens = sum(r["tokens"] for r in results if r["ok"])
    return {"results": results, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_s": lat[len(lat) // 2], "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "errors": sum(not r["ok"] for r in results)}


def _summary(runs: list[dict], reference: list[str | None]) -> dict:
    tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall_s"] for r in runs)
    per_replica = collections.Counter(x["replica"] for r in runs for x in r["results"] if x["ok"])
    texts = [x["text"] for r in runs for x in r["results"]]
    refs = reference * len(runs)
    same = sum(t is not None and t == ref for t, ref in zip(texts, refs))
    return {"tokens_per_s": round(tokens / wall, 2), "wall_s": round(wall, 2), "completion_tokens": tokens,
            "p50_latency_s": round(statistics.median(r["p50_s"] for r in runs), 3),
            "p95_latency_s": round(statistics.median(r["p95_s"] for r in runs), 3),
            "errors": sum(r["errors"] for r in runs), "identical_texts": same, "texts": len(texts),
            "requests_per_replica": sorted(per_replica.values(), reverse=True)}


def kill_test(url: str, app: str, work: list, clients: int, replicas: int, retries: int, log=print) -> dict:
    """Drive `app` with `work`, kill one engine replica's actor once a quarter of it is answered, and wait until Serve
    runs `replicas` replicas again with the killed one replaced."""
    import ray

    from ..serve.ray_serve import replica_actors

    before = set(replica_actors(app))
    state = {"killed_at": None, "victim": None}
    after_n = max(1, len(work) // 4)

    def on_done(n):
        if n >= after_n and state["killed_at"] is None:
            state["killed_at"] = time.perf_counter()
            state["victim"], victim = sorted(replica_actors(app).items())[0]
            ray.kill(victim, no_restart=True)
            log(f"  killed replica {state['victim'].rsplit('#', 1)[-1]} after {n} answered requests")

    res = asyncio.run(drive(url, work, clients, retries=retries, on_done=on_done))
    restart_s = None
    end = time.perf_counter() + 300
    while time.perf_counter() < end and state["killed_at"] is not None:
        now = set(replica_actors(app))
        if len(now) >= replicas and state["victim"] not in now and now - before:
            restart_s = round(time.perf_counter() - state["killed_at"], 1)
            break
        time.sleep(0.5)
    out = res["results"]
    return {"requests": len(work), "ok": sum(r["ok"] for r in out), "failed": sum(not r["ok"] for r in out),
            "retried": sum(r["attempts"] > 1 for r in out),
            "retried_ok": sum(r["attempts"] > 1 and r["ok"] for r in out),
            "streams_broken": sum(r["broken"] and not r["ok"] for r in out),
            "errors": sorted({r["error"][:120] for r in out if not r["ok"] and r["error"]})[:5],
            "killed": state["killed_at"] is not None, "restarted": restart_s is not None, "restart_s": restart_s,
            "tokens_per_s": round(res["tokens_per_s"], 2)}


def bench(model=None, adapters: int = 4, rank: int = 8, replicas: int = 2, threads: int = 1, clients: int = 16,
          requests: int = 64, max_new_tokens: int = 32, max_batch_size: int = 16, rounds: int = 2,
          placements=("serve", "by-set"), ray_address: str | None = None, work: str | None = None, kill: bool = True,
          kill_requests: int = 0, retries: int = 2, log=print) -> dict:
    import socket

    import ray
    import torch
    from ray import serve

    from ..backbone import load_backbone
    from ..engine import DLPLoRA
    from ..fusion import LoRAFusion, load_peft_adapter
    from ..library import Library
    from ..serve import ServeConfig, ServerThread, create_app
    from ..serve.ray_serve import PLACEMENTS, connect, deploy, replica_spec
    from ..testing import random_peft_library

    bad = [p for p in placements if p not in PLACEMENTS]
    if bad or not placements:
        raise DLPLoRAError(f"--placements: each must be one of {', '.join(PLACEMENTS)}, got {','.join(placements)}")
    if ray_address:  # the cluster first: none there, or too few CPUs for every application, fails before any work
        from ..cluster import check_cpus, join_ray

        join_ray(ray_address)
        check_cpus(threads * (1 + replicas * len(placements)), f"this benchmark (1 + {len(placements)} x {replicas} "
                   f"replicas of {threads} CPU{'s' if threads > 1 else ''} each, deployed together)", ray_address)
    torch.set_num_threads(threads)
    t0 = time.time()
    net, tok, info = load_backbone(model, dtype="float32")
    tmp = tempfile.TemporaryDirectory(prefix="dlp-bench-replicas-") if work is None else None
    root = Path(work or tmp.name)
    try:
        specs = {f"rand{i}": (rank, 2 * rank, ("q_proj", "v_proj")) for i in range(adapters)}
        random_peft_library(root / "lib", info.path, specs, std=0.02, seed=100, model=net)
        lib = Library.open(root / "lib")
        names = lib.names
        cfg = ServeConfig(max_batch_size=max_batch_size, max_queue=max(256, requests), max_tokens_limit=max_new_tokens,
                          request_timeout=3600)
        jobs = workload(names, requests, max_new_tokens)
        log(f"backbone {info.name} ({info.params / 1e6:.0f}M params), {len(names)} random rank-{rank} adapters, "
            f"{requests} requests of {max_new_tokens} tokens at {clients} clients, {threads} torch threads per "
            f"server; set up in {time.time() - t0:.1f} s")
        # 1. the single-process server: the reference texts
        engine = DLPLoRA(net, tok, LoRAFusion(net, [load_peft_adapter(lib.adapter_dir(n), n) for n in names]),
                         router=None, info=info, library=lib)
        with ServerThread(create_app(engine, cfg)) as srv:
            asyncio.run(drive(srv.url, jobs[:clients], clients))  # warm-up
            single = asyncio.run(drive(srv.url, jobs, clients))
        reference = [r["text"] for r in single["results"]]
        results = {"single process": _summary([single], reference)}
        log(f"  single process: {results['single process']['tokens_per_s']:.1f} tok/s, errors {single['errors']}")
        del engine
        # 2. Ray Serve: every application deployed at once, driven in turn
        apps = [("1 replica", "serve", 1)] + [(f"{replicas} replicas, {p}", p, replicas) for p in placements]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        saved_env = dict(os.environ)
        if ray_address:
            connect(ray_address, port=port)
        else:
            if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
                # Ray's token authentication, with a token of this run only: a new local cluster would otherwise
                # write ~/.ray/auth_token, which then turns token authentication on for every later `ray start`
                os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
            ray.init(address="local", num_cpus=threads * sum(n for _, _, n in apps), include_dashboard=False,
                     log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            spec = replica_spec(root / "lib", cfg, model=info.path, dtype="float32", threads=threads)
            prefix = {}
            for k, (label, placement, n) in enumerate(apps):
                t1 = time.time()
                name = f"bench-{k}"
                deploy(spec, name=name, route_prefix=f"/{name}", replicas=n, placement=placement, cpus=float(threads))
                prefix[label] = (name, f"http://127.0.0.1:{port}/{name}")
                asyncio.run(drive(prefix[label][1], jobs[:2 * clients], clients))  # warm-up, every replica
                log(f"  deployed {label} in {time.time() - t1:.1f} s")
            runs: dict[str, list] = {label: [] for label, _, _ in apps}
            for r in range(rounds):
                for label, _, _ in (apps if r % 2 == 0 else apps[::-1]):
                    res = asyncio.run(drive(prefix[label][1], jobs, clients))
                    runs[label].append(res)
                    log(f"  round {r + 1} {label}: {res['tokens_per_s']:.1f} tok/s, p95 {res['p95_s']:.2f} s, "
                        f"errors {res['errors']}")
            for label, _, _ in apps:
                results[label] = _summary(runs[label], reference)
            one = results["1 replica"]["tokens_per_s"]
            ratios = {f"{label} / 1 replica": round(results[label]["tokens_per_s"] / max(one, 1e-9), 2)
                      for label, _, _ in apps[1:]}
            ratios["1 replica / single process"] = round(one / max(results["single process"]["tokens_per_s"], 1e-9), 2)
            killed = None
            if kill and "serve" in placements:
                name, url = prefix[f"{replicas} replicas, serve"]
                kjobs = workload(names, kill_requests or 2 * requests, max_new_tokens)
                killed = kill_test(url, name, kjobs, clients, replicas, retries, log=log)
                log(f"  kill test: {killed['failed']} of {killed['requests']} requests failed ({killed['retried_ok']} "
                    f"saved by a retry, {killed['streams_broken']} streams cut); replica restarted: "
                    f"{killed['restarted']} ({killed['restart_s']} s)")
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                os.environ.clear()
                os.environ.update(saved_env)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"model": info.name, "params": info.params, "adapters": len(names), "rank": rank, "threads": threads,
            "clients": clients, "requests": requests, "max_new_tokens": max_new_tokens, "rounds": rounds,
            "replicas": replicas, "results": results, "ratios": ratios, "kill_test": killed}


def run(args) -> None:
    for name in ("adapters", "rank", "replicas", "threads", "clients", "requests", "max_new_tokens", "max_batch_size",
                 "rounds"):
        if getattr(args, name) < 1:
            raise DLPLoRAError(f"--{name.replace('_', '-')} must be >= 1")
    if args.kill_requests < 0 or args.retries < 0:
        raise DLPLoRAError("--kill-requests and --retries must be >= 0")
    placements = tuple(p.strip() for p in str(args.placements).split(",") if p.strip())
    out = bench(args.model, adapters=args.adapters, rank=args.rank, replicas=args.replicas, threads=args.threads,
                clients=args.clients, requests=args.requests, max_new_tokens=args.max_new_tokens,
                max_batch_size=args.max_batch_size, rounds=args.rounds, placements=placements,
                ray_address=args.ray_address, work=args.work, kill=not args.no_kill,
                kill_requests=args.kill_requests, retries=args.retries)
    print(f"{'server':<28} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'errors':>6} {'identical':>10}  per replica")
    for label, r in out["results"].items():
        print(f"{label:<28} {r['tokens_per_s']:>8.1f} {r['p50_latency_s']:>7.2f} {r['p95_latency_s']:>7.2f} "
              f"{r['errors']:>6} {r['identical_texts']:>4}/{r['texts']:<5}  {r['requests_per_replica']}")
    for k, v in out["ratios"].items():
        print(f"throughput {k}: {v:.2f}x")
    if out["kill_test"]:
        k = out["kill_test"]
        print(f"kill test: {k['failed']}/{k['requests']} failed, {k['retried_ok']} saved by a retry, "
              f"{k['streams_broken']} streams cut; restarted: {k['restarted']} in {k['restart_s']} s")
    if args.json:
        print(json.dumps(out))
