"""Serving benchmark: throughput and p50/p95 latency of the HTTP server, continuous batching on vs off.

Builds a temporary library of random adapters of real shapes (PEFT LoRA, rank 8 on q_proj/v_proj,
random lora_B) for the backbone (default: the embedded SmolLM2-135M), starts the server in this
process (uvicorn on 127.0.0.1, a random port) and drives it with `concurrency` closed-loop clients
(httpx, async) at each concurrency level, once with batching (``--max-batch-size``) and once without
(max batch size 1), on the same requests: a mix of pinned adapters and weighted mixes, chat and
completions, greedy, ``--max-new-tokens`` each. Throughput = completion tokens / wall time; latency
= request sent -> full response received.

    dlp-lora bench-serve --quick --json
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from ..errors import DLPLoRAError

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
    p.add_argument("--adapters", type=int, default=3, metavar="N", help="random adapters in the library (default 3)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the random adapters (default 8)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    p.add_argument("--requests", type=int, default=0, metavar="N",
                   help="requests per level (default: the concurrency, at least 8; --quick: at least 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens per request (default 32; --quick: 16)")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N",
                   help="max batch size with batching on (default 32; off is always 1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="float32",
                   help="the engine's precision (default float32, the figures recorded so far)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="quantised base linears, adapters in float: int8 (fp32 activations) or int4 (bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the server's decode step")
    p.add_argument("--quick", action="store_true", help="fewer requests per level and 16 tokens per request")
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")


def request_sets(names: list[str]) -> list[dict]:
    """The adapter choices of the serving benchmarks' requests: each adapter pinned, then weighted mixes."""
    choices: list[dict] = [{"model": a} for a in names]
    if len(names) >= 2:
        choices.append({"adapters": {names[0]: 0.5, names[1]: 0.5}})
    if len(names) >= 3:
        choices.append({"adapters": {names[0]: 0.2, names[1]: 0.3, names[2]: 0.5}})
    return choices


def as_request(body: dict, prompt: str, completion: bool) -> tuple[str, dict]:
    """(path, body) of one benchmark request: a completion of `prompt`, or a chat turn with it as the user message."""
    if completion:
        return "/v1/completions", body | {"prompt": prompt}
    return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt}]}


def _workload(names: list[str], n: int, max_new: int) -> list[tuple[str, dict]]:
    choices = request_sets(names)
    return [as_request(dict(choices[i % len(choices)], max_tokens=max_new, temperature=0), PROMPTS[i % len(PROMPTS)],
                       completion=i % 4 == 3) for i in range(n)]


async def _drive(url: str, work: list[tuple[str, dict]], concurrency: int) -> dict:
    import httpx

    queue = list(reversed(work))
    lat, tokens, errors = [], 0, 0

    async def worker(client):
        nonlocal tokens, errors
        while queue:
            path, body = queue.pop()
            t0 = time.perf_counter()
            r = await client.post(path, json=body)
            lat.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors += 1
                continue
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat.sort()

    def pct(q):
        return lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))]

    return {"requests": len(work), "errors": errors, "wall_s": round(wall, 3), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(len(work) / wall, 3),
            "p50_latency_s": round(pct(0.5), 3), "p95_latency_s": round(pct(0.95), 3),
            "mean_latency_s": round(statistics.fmean(lat), 3)}


def bench(model=None, adapters: int = 3, rank: int = 8, levels=(1, 8, 32), requests: int = 0,
          max_new_tokens: int = 32, max_batch_size: int = 32, quick: bool = False, threads: int = 0,
          dtype: str = "float32", quantize: str = "none", compile: bool = False, log=print) -> dict:
    import httpx
    import torch

    from ..backbone import load_backbone
    from ..engine import DLPLoRA
    from ..fusion import LoRAFusion, load_peft_adapter
    from ..library import Library
    from ..quantize import apply_quantize, quantize_dtype
    from ..serve import ServeConfig, ServerThread, create_app
    from ..testing import random_peft_library

    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    net, tok, info = load_backbone(model, dtype=quantize_dtype(quantize) or dtype)
    with tempfile.TemporaryDirectory(prefix="dlp-bench-serve-") as tmp:
        root = Path(tmp)
        # n PEFT LoRA adapters (q_proj, v_proj) with random lora_B
        specs = {f"rand{i}": (rank, 2 * rank, ("q_proj", "v_proj")) for i in range(adapters)}
        random_peft_library(root / "lib", info.path, specs, std=0.02, seed=100, model=net)
        lib = Library.open(root / "lib")
        names = lib.names
        fusion = LoRAFusion(net, [load_peft_adapter(lib.adapter_dir(n), n) for n in names])
        engine = DLPLoRA(net, tok, fusion, router=None, info=info, library=lib)
        apply_quantize(net, quantize)
        precision = str(next(net.parameters()).dtype).replace("torch.", "") + (f" + {quantize} weights"
                                                                                 if fusion.quantized else "")
        log(f"backbone {info.name} ({info.params / 1e6:.0f}M params, {precision}), {len(names)} random rank-{rank} adapters "
            f"on q_proj/v_proj, {max_new_tokens} new tokens per request, torch threads {torch.get_num_threads()}; "
            f"set up in {time.time() - t0:.1f}s")
        results = []
        for c in levels:
            n = requests or max(c, 4 if quick else 8)
            work = _workload(names, n, max_new_tokens)
            row = {"concurrency": c, "requests": n}
            for label, bs in (("on", max_batch_size), ("off", 1)):
                cfg = ServeConfig(max_batch_size=bs, max_queue=max(256, n), max_tokens_limit=max_new_tokens,
                                  request_timeout=3600, compile=compile)
                with ServerThread(create_app(engine, cfg)) as srv:
                    with httpx.Client(base_url=srv.url, timeout=600) as warm:  # warm-up: one request
                        r = warm.post(work[0][0], json=work[0][1])
                        if r.status_code != 200:
                            raise DLPLoRAError(f"warm-up request failed: {r.status_code} {r.text}")
                        before = warm.get("/metrics").text
                    res = asyncio.run(_drive(srv.url, work, c))
                    with httpx.Client(base_url=srv.url, timeout=60) as m:
                        after = m.get("/metrics").text
                # mean rows per decode step during the measured part
                b_sum = b_n = 0.0
                for text, sign in ((after, 1), (before, -1)):
                    for line in text.splitlines():
                        if line.startswith("dlp_lora_batch_size_sum "):
                            b_sum += sign * float(line.split()[1])
                        elif line.startswith("dlp_lora_batch_size_count "):
                            b_n += sign * float(line.split()[1])
                res["mean_batch_rows"] = round(b_sum / b_n, 2) if b_n else 0.0
                res["max_batch_size"] = bs
                row[label] = res
                log(f"  concurrency {c:>3} batching {label:>3}: {res['tokens_per_s']:8.1f} tok/s  "
                    f"{res['requests_per_s']:6.2f} req/s  p50 {res['p50_latency_s']:6.2f}s  "
                    f"p95 {res['p95_latency_s']:6.2f}s  mean rows/step {res['mean_batch_rows']:5.2f}  "
                    f"errors {res['errors']}")
            on, off = row["on"], row["off"]
            row["throughput_ratio_on_vs_off"] = round(on["tokens_per_s"] / max(off["tokens_per_s"], 1e-9), 2)
            row["p95_ratio_on_vs_off"] = round(row["on"]["p95_latency_s"] / max(row["off"]["p95_latency_s"], 1e-9), 2)
            results.append(row)
    return {"model": info.name, "params": info.params, "precision": precision, "adapters": len(names), "rank": rank,
            "max_new_tokens": max_new_tokens, "torch_threads": torch.get_num_threads(), "quick": quick,
            "levels": results}


def run(args) -> None:
    try:
        levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    except ValueError:
        raise DLPLoRAError(f"--concurrency {args.concurrency!r}: expected comma-separated integers, "
                           f"e.g. 1,8,32") from None
    if not levels or min(levels) < 1:
        raise DLPLoRAError(f"--concurrency {args.concurrency!r}: every level must be >= 1")
    if args.max_new_tokens is None:
        args.max_new_tokens = 16 if args.quick else 32
    for name in ("adapters", "rank", "max_new_tokens", "max_batch_size"):
        if getattr(args, name) < 1:
            raise DLPLoRAError(f"--{name.replace('_', '-')} must be >= 1")
    if args.requests < 0:
        raise DLPLoRAError("--requests must be >= 0")
    out = bench(args.model, adapters=args.adapters, rank=args.rank, levels=levels, requests=args.requests,
                max_new_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size, quick=args.quick,
                threads=args.threads, dtype=args.dtype, quantize=args.quantize,
                compile=getattr(args, "compile", False))
    print("concurrency  throughput on/off  p95 on/off")
    for row in out["levels"]:
        print(f"{row['concurrency']:>11}  {row['throughput_ratio_on_vs_off']:>16.2f}x  "
              f"{row['on']['p95_latency_s']:.2f}s / {row['off']['p95_latency_s']:.2f}s")
    if args.json:
        print(json.dumps(out))
