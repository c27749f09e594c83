"""Live-library benchmark: load-to-routable time of a new adapter, and a closed-loop load test during loads and unloads.

Builds a library of ``--adapters`` random-weight PEFT LoRAs (rank ``--rank`` on q_proj/v_proj, the backbone's real
shapes; default backbone: the embedded SmolLM2-135M), each with the routing prompts of one task: the train split of
a task of ``--data`` (a prepared data directory) or, past its tasks or without it, a synthetic task (prompts of
pseudo-words); trains the router on them, starts the server in this process with runtime adapters on, and measures:

1. **load-to-routable**: ``POST /v1/load_lora_adapter`` of a new adapter with ``--examples`` prompts of a new task;
   the seconds from the call's return until ``/v1/models`` says ``routable``, then ``--probe`` test prompts of the new
   task routed once: the seconds until the first of them routed to it (top adapter; never, with too few examples),
   and the share routed to it;
2. **a closed loop** of ``--clients`` clients (chat requests of every task, routed by the server, a fifth of them a
   fixed mix of two adapters that stay; greedy, ``--max-new-tokens``) while the library changes ``--loads`` times
   (new adapters with examples) and ``--unloads`` times (one adapter of the start, then the newest), ``--gap``
   seconds apart, and until no adapter is training any more plus ``--settle`` seconds. Then every distinct (prompt,
   routed set) is replayed alone (batch size 1) on a second server that holds every adapter the test saw, with the
   set given explicitly; a response whose tokens differ from that solo output is *changed*; any non-200 is *failed*.

    dlp-lora bench live-library --data /work/data --json
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import threading
import time
from pathlib import Path

from ..errors import DLPLoRAError

SYLLABLES = ("ka", "lo", "mi", "zu", "re", "tan", "vor", "pel", "shi", "gra", "nu", "bex", "dol", "fim", "qua", "sor",
             "wex", "jun", "pra", "teo")


def add_arguments(p) -> None:
    p.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", metavar="DIR", help="prepared data (`dlp-lora data prepare`): a task's train split is an "
                                                 "adapter's routing prompts, its test split the probe prompts "
                                                 "(default: synthetic tasks only)")
    p.add_argument("--adapters", type=int, default=26, help="adapters in the library at the start (default 26)")
    p.add_argument("--examples", type=int, default=50, help="example prompts given with each load (default 50)")
    p.add_argument("--loads", type=int, default=3, help="loads during the load test (default 3)")
    p.add_argument("--unloads", type=int, default=2, help="unloads during the load test (default 2)")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients of the load test (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens per request (default 16)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the random adapters (default 8)")
    p.add_argument("--gap", type=float, default=5.0, metavar="S", help="seconds between two library changes (5)")
    p.add_argument("--settle", type=float, default=5.0, metavar="S",
                   help="seconds the clients go on after the last adapter became routable (default 5)")
    p.add_argument("--probe", type=int, default=10, help="test prompts of the new task routed once routable (10)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="give up waiting for routable after S")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N", help="the server's batch (default 32)")
    p.add_argument("--retrain-max-prompts", type=int, default=300, metavar="N",
                   help="routing prompts per adapter when the router retrains (the server's default, 300)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")


# ---------------------------------------------------------------- tasks

class Task:
    """An adapter's task: routing prompts (rows) and test prompts (texts)."""

    def __init__(self, name: str, rows: list[dict], tests: list[str]):
        self.name, self.rows, self.tests = name, rows, tests


def synthetic_task(k: int, n_rows: int = 300, n_tests: int = 20) -> Task:
    """Task k of pseudo-words: "<Verb> the <noun> of w1 ... w6." over its own vocabulary."""
    rng = random.Random(1000 + k)
    vocab = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(14)]

    def prompts(n, seed):
        r = random.Random(f"{k}-{seed}")
        return [f"{vocab[0].capitalize()} the {vocab[1]} of {' '.join(r.choice(vocab[2:]) for _ in range(6))}."
                for _ in range(n)]

    return Task(f"synth{k:02d}", [{"input": t} for t in prompts(n_rows, "train")], prompts(n_tests, "test"))


def make_tasks(data: str | None, n: int) -> list[Task]:
    """`n` tasks: those of the prepared data directory first (sorted), then synthetic ones."""
    from ..plugin.views import compose
    from ..tasks import load_split

    tasks: list[Task] = []
    if data:
        root = Path(data)
        if not root.is_dir():
            raise DLPLoRAError(f"--data {data}: no such directory")
        names = sorted(p.name for p in root.iterdir() if (p / "train.jsonl").is_file() and (p / "test.jsonl").is_file())
        for name in names[:n]:
            tasks.append(Task(name, load_split(root, name, "train"), [compose(r) for r in load_split(root, name, "test")]))
    k = 0
    while len(tasks) < n:
        tasks.append(synthetic_task(k))
        k += 1
    return tasks


# ---------------------------------------------------------------- the clients

async def _closed_loop(url, key, prompts, mix, clients, max_new, stop: threading.Event, log_every=30.0):
    """Clients send chat requests until `stop`; returns [(prompt index, body sent, status, response json or None)]."""
    import httpx

    out = []
    rng = random.Random(0)

    async def client(c):
        while not stop.is_set():
            i = rng.randrange(len(prompts))
            body = {"model": "dlp-lora", "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": max_new,
                    "temperature": 0, "return_token_ids": True}
            if mix and rng.random() < 0.2:
                body["adapters"] = mix
            try:
                r = await c.post("/v1/chat/completions", json=body)
                out.append((i, body, r.status_code, r.json() if r.status_code == 200 else r.text[:300]))
            except Exception as exc:  # a dropped connection is a failed response too
                out.append((i, body, 0, f"{type(exc).__name__}: {exc}"))

    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    return out


def wait_routable(http, name: str, probes: list[str], timeout: float) -> dict:
    """Poll until /v1/models says `name` is routable, then route every probe prompt once: the router that made it
    routable is the one every later request meets (no retraining is pending), so a router that sends no probe to it
    (too few examples) is a result, not a reason to wait (it made the benchmark poll until --timeout)."""
    t0 = time.perf_counter()
    state_at = routed_at = None
    while state_at is None:
        states = {m["id"]: m["routing"] for m in http.get("/v1/models").json()["data"] if "routing" in m}
        if states.get(name) == "routable":
            state_at = time.perf_counter() - t0
        elif states.get(name) != "training":
            raise DLPLoRAError(f"{name} is {states.get(name)} instead of training / routable")
        elif time.perf_counter() - t0 > timeout:
            raise DLPLoRAError(f"{name} was not routable after --timeout {timeout:g} s")
        else:
            time.sleep(0.2)
    hits = 0
    for p in probes:
        r = http.post("/v1/chat/completions", json={"model": "dlp-lora", "max_tokens": 1,
                                                   "messages": [{"role": "user", "content": p}]}).json()
        hit = bool(r["routing"]["adapters"]) and r["routing"]["adapters"][0]["name"] == name
        hits += hit
        if hit and routed_at is None:
            routed_at = time.perf_counter() - t0
    return {"routable_after_s": round(state_at, 2),
            "routed_after_s": None if routed_at is None else round(routed_at, 2),
            "probe_routed_share": round(hits / max(1, len(probes)), 3)}


# ---------------------------------------------------------------- the benchmark

def bench(model=None, data: str | None = None, adapters: int = 26, examples: int = 50, loads: int = 3,
          unloads: int = 2, clients: int = 32, max_new_tokens: int = 16, rank: int = 8, gap: float = 5.0,
          settle: float = 5.0, probe: int = 10, timeout: float = 600.0, max_batch_size: int = 32,
          retrain_max_prompts: int = 300, threads: int = 0, log=print) -> dict:
    import httpx
    import torch

    from ..adapters import load_peft_adapter
    from ..backbone import load_backbone
    from ..engine import DLPLoRA
    from ..fusion import LoRAFusion
    from ..testing import random_adapter
    from ..library import Library, add_adapter
    from ..plugin import train_plugin_from_library
    from ..serve import ServeConfig, ServerThread, create_app
    from ..testing import save_peft_adapter

    if unloads > adapters + loads - 1:
        raise DLPLoRAError("--unloads must leave at least one adapter")
    if threads:
        torch.set_num_threads(threads)
    t_start = time.time()
    tasks = make_tasks(data, adapters + 1 + loads)
    first, fresh = tasks[:adapters], tasks[adapters:]
    net, tok, info = load_backbone(model, dtype="float32")
    key = "sk-bench-live"
    with tempfile.TemporaryDirectory(prefix="dlp-bench-live-") as tmp:
        root, lib_dir = Path(tmp) / "adapters", Path(tmp) / "lib"
        for i, t in enumerate(tasks):  # every adapter's directory, under the adapter root
            save_peft_adapter(random_adapter(net, t.name, rank=rank, alpha=2 * rank, seed=100 + i, std=0.05),
                              root / t.name, info.path)
        for t in first:
            add_adapter(lib_dir, t.name, root / t.name, model=info.path, examples=t.rows)
        lib = Library.open(lib_dir)
        plugin, report = train_plugin_from_library(lib)
        plugin.save(lib.plugin_dir())
        engine = DLPLoRA(net, tok, LoRAFusion(net, [load_peft_adapter(lib.adapter_dir(n), n) for n in lib.names]),
                         router=plugin, info=info, library=lib)
        log(f"backbone {info.name}; {adapters} random rank-{rank} adapters ({sum(t.name.startswith('synth') for t in first)}"
            f" synthetic tasks); router trained on {report['train_examples']} prompts in {report['train_seconds']}s; "
            f"set up in {time.time() - t_start:.1f}s")
        cfg = ServeConfig(max_batch_size=max_batch_size, max_queue=max(256, 4 * clients), request_timeout=3600,
                          max_tokens_limit=max(16, max_new_tokens), api_key=key, allow_runtime_adapters=True,
                          adapter_root=str(root), retrain_max_prompts=retrain_max_prompts)
        app = create_app(engine, cfg)
        live = app.state.dlp.live
        result = {"model": info.name, "adapters": adapters, "examples": examples, "rank": rank, "data": data,
                  "torch_threads": torch.get_num_threads()}
        stop, box, loop_thread = threading.Event(), {}, None
        with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=600,
                                                    headers={"Authorization": f"Bearer {key}"}) as http:
            try:
                # 1. load-to-routable
                new = fresh[0]
                body = {"lora_name": new.name, "lora_path": new.name, "examples": [r["input"] for r in new.rows[:examples]]}
                t0 = time.perf_counter()
                r = http.post("/v1/load_lora_adapter", json=body)
                if r.status_code != 200:
                    raise DLPLoRAError(f"the load failed: {r.status_code} {r.text}")
                call_s = time.perf_counter() - t0
                a = wait_routable(http, new.name, new.tests[:max(1, probe)], timeout)
                retrain = next((c for c in reversed(live.changes) if c["op"] == "retrain"), {})
                a.update(load_call_s=round(call_s, 3), retrain_s=retrain.get("seconds"),
                         retrain_train_s=retrain.get("train_seconds"), retrain_examples=retrain.get("examples"))
                result["load_to_routable"] = a
                routed = "never" if a["routed_after_s"] is None else f"{a['routed_after_s']}s"
                log(f"load-to-routable: the call took {a['load_call_s']}s; routable {a['routable_after_s']}s and "
                    f"routed to {routed} after it returned; {100 * a['probe_routed_share']:.0f}% of "
                    f"{probe} test prompts of the new task routed to it")

                # 2. the closed loop during loads and unloads
                served = [t.name for t in first] + [new.name]
                prompts = [p for t in first + fresh for p in t.tests[:4]]
                mix = {first[1].name: 0.5, first[2].name: 0.5} if adapters >= 3 else None
                ops = []
                for k in range(max(loads, unloads)):
                    if k < loads:
                        ops.append(("load", fresh[1 + k]))
                    if k < unloads:
                        ops.append(("unload", first[0] if k == 0 else None))  # then the newest adapter
                loop_thread = threading.Thread(target=lambda: box.update(out=asyncio.run(_closed_loop(
                    srv.url, key, prompts, mix, clients, max_new_tokens, stop))), daemon=True)
                t0 = time.perf_counter()
                loop_thread.start()
                done_ops = []
                for kind, t in ops:
                    time.sleep(gap)
                    if kind == "load":
                        rows = [r["input"] for r in t.rows[:examples]]
                        r = http.post("/v1/load_lora_adapter", json={"lora_name": t.name, "lora_path": t.name,
                                                                     "examples": rows})
                        served.append(t.name)
                        name = t.name
                    else:
                        name = t.name if t is not None else served[-1]
                        r = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
                        served.remove(name)
                    done_ops.append({"op": kind, "name": name, "status": r.status_code,
                                     "at_s": round(time.perf_counter() - t0, 2)})
                    log(f"  {kind} {name}: {r.status_code} at {done_ops[-1]['at_s']}s")
                live.wait_trained(timeout)
                time.sleep(settle)
                stop.set()
                loop_thread.join()
                wall = time.perf_counter() - t0
                out = box.get("out", [])
            except KeyboardInterrupt:
                log("interrupted: stopping the clients, waiting for the router's retraining round to end...")
                raise
            finally:  # also on Ctrl-C: the clients, then the background retraining, end before the process does
                stop.set()
                if loop_thread is not None:
                    loop_thread.join(60)
                live.close()
                live.wait_trained(60)  # a round in progress finishes (its router is dropped): no torch thread left
        ok = [o for o in out if o[2] == 200]
        failed = [o for o in out if o[2] != 200]
        log(f"closed loop: {len(out)} responses in {wall:.1f}s, {len(failed)} failed; replaying the distinct "
            f"(prompt, set) pairs alone...")
        changed, compared = _replay(info, tok, [t.name for t in tasks], root, ok, key, max_new_tokens)
        result["load_test"] = {
            "clients": clients, "responses": len(out), "failed": len(failed), "changed": len(changed),
            "compared": compared, "wall_s": round(wall, 1), "ops": done_ops,
            "completion_tokens_per_s": round(sum(o[3]["usage"]["completion_tokens"] for o in ok) / wall, 1),
            "failed_examples": [{"status": o[2], "detail": o[3]} for o in failed[:5]],
            "changed_examples": changed[:5], "changes": live.changes}
        log(f"closed loop: {len(failed)} failed, {len(changed)} of {compared} routed sets differ from their solo "
            f"output; total {time.time() - t_start:.0f}s")
    return result


def _replay(info, tok, names, root, ok, key, max_new) -> tuple[list[dict], int]:
    """Replay each distinct (prompt, routed set) alone on a second model holding every adapter; the responses whose
    tokens differ from that solo output."""
    import httpx

    from ..adapters import load_peft_adapter
    from ..backbone import load_backbone
    from ..engine import DLPLoRA
    from ..fusion import LoRAFusion
    from ..serve import ServeConfig, ServerThread, create_app

    net, tok2, _ = load_backbone(info.path, dtype="float32")
    fusion = LoRAFusion(net, [load_peft_adapter(root / n, n) for n in names])
    engine = DLPLoRA(net, tok2, fusion, router=None, info=info)
    solo: dict[tuple, list] = {}
    changed = []
    cfg = ServeConfig(max_batch_size=1, request_timeout=3600, max_tokens_limit=max(16, max_new), api_key=key)
    with ServerThread(create_app(engine, cfg)) as srv, httpx.Client(base_url=srv.url, timeout=600,
                                                                     headers={"Authorization": f"Bearer {key}"}) as h:
        for i, body, _, resp in ok:
            mix = {a["name"]: a["weight"] for a in resp["routing"]["adapters"]}
            k = (i, json.dumps(sorted(mix.items())))
            if k not in solo:
                r = h.post("/v1/chat/completions", json={**body, "model": "dlp-lora", "adapters": mix})
                if r.status_code != 200:
                    raise DLPLoRAError(f"the solo replay failed: {r.status_code} {r.text}")
                solo[k] = r.json()["choices"][0]["token_ids"]
            if resp["choices"][0]["token_ids"] != solo[k]:
                changed.append({"prompt": i, "adapters": mix, "got": resp["choices"][0]["token_ids"], "solo": solo[k]})
    return changed, len(solo)


def run(args) -> None:
    for name in ("adapters", "examples", "clients", "max_new_tokens", "rank", "max_batch_size", "probe",
                 "retrain_max_prompts"):
        if getattr(args, name) < 1:
            raise DLPLoRAError(f"--{name.replace('_', '-')} must be >= 1")
    if args.loads < 1 or args.unloads < 0:
        raise DLPLoRAError("--loads must be >= 1 and --unloads >= 0")
    out = bench(args.model, data=args.data, adapters=args.adapters, examples=args.examples, loads=args.loads,
                unloads=args.unloads, clients=args.clients, max_new_tokens=args.max_new_tokens, rank=args.rank,
                gap=args.gap, settle=args.settle, probe=args.probe, timeout=args.timeout,
                max_batch_size=args.max_batch_size, retrain_max_prompts=args.retrain_max_prompts, threads=args.threads)
    a, b = out["load_to_routable"], out["load_test"]
    print(f"load-to-routable: {'never' if a['routed_after_s'] is None else str(a['routed_after_s']) + 's'} (routable in /v1/models after {a['routable_after_s']}s); "
          f"closed loop: {b['responses']} responses, {b['failed']} failed, {b['changed']} changed")
    if args.json:
        print(json.dumps(out))
