"""`dlp-lora bench train|fusion|serve|live-library|replicas|routing|decode|gpu` (speed ratios measured side by side in
one run), and `dlp-lora bench-serve`, the older name of `bench serve`."""

from __future__ import annotations

import json

from .common import add_base_arguments, add_precision_arguments


def cmd_bench_train(args) -> None:
    from ..bench.train import bench_batching, bench_train

    bf16 = {"auto": None, "on": True, "off": False}[args.bf16]
    if args.epoch:
        result = bench_batching(args.model, task=args.task, n_examples=args.epoch, batch_size=args.batch_size,
                                max_len=args.max_len, repeats=args.repeats, bf16=bf16)
        if args.json:
            print(json.dumps(result))
        return
    result = bench_train(args.model, task=args.task, batch_size=args.batch_size, repeats=args.repeats,
                         max_len=args.max_len, bf16=bf16)
    if args.json:
        print(json.dumps(result))


def register(sub, model_help: str) -> None:
    b = sub.add_parser("bench", help="speed benchmarks (ratios measured side by side)").add_subparsers(
        dest="subcommand", metavar="SUBCOMMAND")
    t = b.add_parser("train", help="our LoRA training step vs a naive PEFT fp32 loop, same batch",
                     description="Tokens/s of our training step (bf16 autocast, logits on answer tokens only) vs the "
                                 "naive PEFT loop (fp32, full logits, labels=), interleaved on the same batch.")
    t.add_argument("--model", help=model_help)
    t.add_argument("--task", default="winowhy", help="task whose first examples form the batch")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--max-len", type=int, default=192)
    t.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for our step (auto: only where the CPU has native bf16)")
    t.add_argument("--epoch", type=int, default=0, metavar="N",
                   help="instead: one epoch over the task's first N examples batched three ways (random order, "
                        "length-bucketed, packed rows), padding share and tokens/s side by side")
    t.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    t.set_defaults(func=cmd_bench_train)
    from ..bench import decode, evalspeed, fusion, gpu, live, replicas, routing, serve

    ev = b.add_parser("eval", help="where an evaluation's time goes: choice ranking and generation per prompt",
                      description=evalspeed.__doc__.strip().splitlines()[0])
    evalspeed.add_arguments(ev)
    ev.set_defaults(func=evalspeed.run)

    d = b.add_parser("decode", help="decode speed: ours vs HF generate (and llama.cpp's llama-bench), side by side",
                     description=decode.__doc__.strip().splitlines()[0])
    decode.add_arguments(d)
    d.set_defaults(func=decode.run)

    g = b.add_parser("gpu", help="DLP-LoRA vs single LoRA and PEFT's mixed batch on real-size random-weight models "
                                 "(Qwen2-1.5B, Llama-3-8B; for a GPU)", description=gpu.__doc__.strip().splitlines()[0])
    gpu.add_arguments(g)
    g.set_defaults(func=gpu.run)

    r = b.add_parser("routing", help="the plugin's accuracy per view of the test prompts, and its routing latency",
                     description=routing.__doc__.strip())
    routing.add_arguments(r)
    add_base_arguments(r)
    r.set_defaults(func=routing.run)

    f = b.add_parser("fusion", help="fused multi-LoRA inference vs single PEFT LoRA, side by side")
    fusion.add_arguments(f)
    f.set_defaults(func=fusion.run)
    description = serve.__doc__.strip().split("\n\n")[0]
    help_ = ("load generator (as `vllm bench serve`): our server in its own process against the offline engine "
             "and llama-server, TTFT / TPOT / ITL / E2EL (same as `bench-serve`)")
    s = b.add_parser("serve", help=help_, description=description)
    serve.add_arguments(s)
    add_precision_arguments(s)  # the server's own precision options and defaults
    s.set_defaults(func=serve.run)
    lv = b.add_parser("live-library", help="runtime adapters: load-to-routable time, and a closed-loop load test "
                                           "during loads and unloads (failed and changed responses)",
                      description=live.__doc__.strip().split("\n\n")[0])
    live.add_arguments(lv)
    lv.set_defaults(func=live.run)
    rp = b.add_parser("replicas", help="Ray Serve: N replicas vs 1 replica side by side (throughput, identical texts, "
                                       "placement by adapter set), and a replica killed under load",
                      description=replicas.__doc__.strip().split("\n\n")[0])
    replicas.add_arguments(rp)
    rp.set_defaults(func=replicas.run)
    # the same command under its first name, kept as an alias
    alias = sub.add_parser("bench-serve", help="= `bench serve`", description=description)
    serve.add_arguments(alias)
    add_precision_arguments(alias)
    alias.set_defaults(func=serve.run)
