"""`dlp-lora serve`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse

from ..errors import DLPLoRAError
from .common import LIBRARY_MODEL_HELP, add_precision_arguments, add_routing_arguments, routing_from_args


def config_from_args(args):
    """The :class:`dlplora.serve.ServeConfig` of `dlp-lora serve`'s arguments (the API key: --api-key, else
    $DLP_LORA_API_KEY when set and non-empty), checked."""
    import os

    from ..serve import ServeConfig
    from ..serve.config import API_KEY_ENV

    key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    return ServeConfig(max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                       max_tokens_limit=args.max_tokens_limit, request_timeout=args.request_timeout,
                       max_body_bytes=args.max_body_bytes, model_name=args.served_model_name,
                       prefill_chunk=args.prefill_chunk, compile=args.compile, max_messages=args.max_messages,
                       max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n, api_key=key,
                       allow_runtime_adapters=args.allow_runtime_adapters, adapter_root=args.adapter_root,
                       retrain_max_prompts=args.retrain_max_prompts, playground=not args.no_playground,
                       engine_process=args.engine_process and not args.ray_address).check()


def serve_on_ray(args, config) -> None:
    """`dlp-lora serve --ray-address`: the same server as Ray Serve replicas (:mod:`dlplora.serve.ray_serve`)."""
    from ..serve.ray_serve import check_scaling, replica_spec, serve_on_ray

    autoscale = args.min_replicas is not None or args.max_replicas is not None
    check_scaling(args.replicas, args.min_replicas, args.max_replicas, args.placement)
    cpus = args.replica_cpus if args.replica_cpus is not None else float(args.threads or 1)
    if cpus <= 0:
        raise DLPLoRAError(f"--replica-cpus must be > 0, got {cpus}")
    threads = args.threads or max(1, int(cpus))
    spec = replica_spec(args.library, config, model=args.model, plugin=args.plugin, routing=routing_from_args(args),
                        dtype=args.dtype, device=args.device, quantize=args.quantize, threads=threads)
    scaling = (dict(replicas=None, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                    target_ongoing=args.target_ongoing_requests) if autoscale else dict(replicas=args.replicas or 1))
    print(f"deploying {args.app_name!r} on Ray Serve: "
          + (f"{args.min_replicas}..{args.max_replicas} replicas (autoscaling)" if autoscale
             else f"{args.replicas or 1} replicas")
          + f", each {cpus:g} CPUs and {threads} torch threads, placement {args.placement}; API key: "
          + ("required" if config.api_key else "none (open to anyone who can reach the port)"), flush=True)
    if config.allow_runtime_adapters:
        print("runtime adapters: a load or unload reaches every replica (through the library's actor); the library"
              + (f" and --adapter-root {config.adapter_root}" if config.adapter_root else "")
              + " must be at the same path on every node", flush=True)
    serve_on_ray(spec, args.ray_address, host=args.host, port=args.port, name=args.app_name, detach=args.detach,
                 placement=args.placement, cpus=cpus, gpus=args.replica_gpus, **scaling)


def cmd_serve(args) -> None:
    from ..engine import DLPLoRA
    from ..serve import serve

    if not 0 < args.port < 65536:
        raise DLPLoRAError(f"--port must be in 1..65535, got {args.port}")
    config = config_from_args(args)
    if args.ray_address:
        return serve_on_ray(args, config)
    ray_only = [f for f, v in (("--replicas", args.replicas), ("--min-replicas", args.min_replicas),
                               ("--max-replicas", args.max_replicas), ("--replica-cpus", args.replica_cpus),
                               ("--detach", args.detach or None)) if v is not None]
    if ray_only:
        raise DLPLoRAError(f"{', '.join(ray_only)} need --ray-address (serving on Ray Serve replicas)")
    from ..quantize import quantize_dtype, resolve_quantize

    quantize = resolve_quantize(args.quantize, args.device, args.dtype)  # auto: this CPU's fast path
    recipe = dict(lib_dir=args.library, model=args.model, plugin_dir=args.plugin, routing=routing_from_args(args),
                  dtype=args.dtype, device=args.device, quantize=quantize)
    spec = None
    if config.engine_process:  # the model computes in the engine process; this one's copy only tokenizes and routes
        spec = dict(recipe, threads=args.threads)
        recipe["quantize"] = None
        if quantize != "none" and args.dtype in (None, "auto"):
            recipe["dtype"] = quantize_dtype(quantize)
    engine = DLPLoRA.from_library(**recipe)
    if config.engine_process or args.threads:
        import torch

        torch.set_num_threads(1 if config.engine_process else args.threads)
    name = config.model_name or engine.info.name
    print(f"serving {name} with {len(engine.names)} adapters ({', '.join(engine.names)}); "
          f"plugin: {'yes' if engine.router is not None else 'no (pinned adapters only)'}; "
          f"{str(engine.model.dtype).replace('torch.', '')}"
          f"{' activations, ' + quantize + ' weights' if quantize != 'none' else ''} (--quantize {args.quantize}); "
          f"API key: {'required' if config.api_key else 'none (open to anyone who can reach the port)'}; "
          f"http://{args.host}:{args.port}/v1"
          + ("" if args.no_playground else f"; playground: http://{args.host}:{args.port}/"), flush=True)
    labels = set(getattr(engine.router, "labels", ()) or ())
    pinned = [n for n in engine.names if engine.router is not None and n not in labels]
    if pinned:
        print(f"the router does not know {', '.join(pinned)}: served when pinned or mixed only (retrain it: "
              f"dlp-lora train-plugin --library {args.library})", flush=True)
    if config.allow_runtime_adapters:
        print(f"runtime adapters: POST /v1/load_lora_adapter and /v1/unload_lora_adapter are on; lora_path "
              f"{'under ' + config.adapter_root if config.adapter_root else 'anywhere this process can read'}",
              flush=True)
    if config.engine_process:
        print("the engine (scheduler and forward passes) runs in its own process; --no-engine-process keeps it in "
              "this one", flush=True)
    serve(engine, config, host=args.host, port=args.port, log_level=args.log_level, engine_spec=spec)


def register(sub, model_help: str) -> None:
    s = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server with dynamic multi-LoRA batching",
        description="Serve the library over HTTP: POST /v1/chat/completions and /v1/completions (streaming or "
                    "not), GET /v1/models, /health, /metrics. 'model' = the base model (or 'dlp-lora') routes each "
                    "request with the plugin; 'model' = an adapter name pins that adapter; the extension field "
                    "'adapters': {name: weight} pins a weighted mix. With --allow-runtime-adapters, POST "
                    "/v1/load_lora_adapter {lora_name, lora_path, examples?} and /v1/unload_lora_adapter {lora_name} "
                    "change the library while serving. Concurrent requests share decode steps "
                    "(continuous batching by slot on a static KV cache, one adapter set per row). Greedy unless 'temperature' is given.")
    s.add_argument("--library", required=True, metavar="LIB", help="adapter library directory (with library.json)")
    s.add_argument("--model", help=LIBRARY_MODEL_HELP)
    s.add_argument("--plugin", metavar="DIR", help="router directory (default: LIB/plugin; none = pinned only)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="default 8000")
    add_routing_arguments(s)
    add_precision_arguments(s)
    s.add_argument("--route-window", type=int, default=0, metavar="N",
                   help="chat routing also reads the N previous user turns (default 0: the last user turn)")
    s.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                   help="prompt tokens prefilled between two decode steps of the running rows (default 256)")
    s.add_argument("--max-batch-size", type=int, default=16, metavar="N",
                   help="rows decoded together (default 16; 1 = no batching)")
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a batch slot before answering 503 (default 64)")
    s.add_argument("--max-tokens-limit", type=int, default=512, metavar="N",
                   help="the largest max_tokens a request may ask for (default 512)")
    s.add_argument("--request-timeout", type=float, default=120.0, metavar="S",
                   help="seconds from arrival to the last token before a request fails with 504 (default 120)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                   help="largest request body; above: 413 (default 1 MiB)")
    s.add_argument("--max-messages", type=int, default=256, metavar="N",
                   help="most chat messages in one request; above: 400 (default 256)")
    s.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="most prompt tokens in one request; above: 400 (default: the model's context window)")
    s.add_argument("--max-n", type=int, default=8, metavar="N",
                   help="most choices ('n') in one request; above: 400 (default 8)")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (else 401); default: "
                        "$DLP_LORA_API_KEY when set, else no key")
    s.add_argument("--allow-runtime-adapters", action="store_true",
                   help="turn on POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default)")
    s.add_argument("--adapter-root", metavar="DIR", default=None,
                   help="a runtime load's lora_path (and examples_path) must lie under DIR, symbolic links resolved "
                        "(else 403); give it whenever clients are not trusted with the server's file system")
    s.add_argument("--retrain-max-prompts", type=int, default=300, metavar="N",
                   help="routing prompts per adapter when the router retrains after a runtime load with examples "
                        "(a seeded sample; default 300: seconds on 2 cores for 26 adapters)")
    s.add_argument("--no-playground", action="store_true",
                   help="leave out the playground page at / (on by default: a static page that chats through the "
                        "API above and shows the adapters chosen for each turn)")
    s.add_argument("--served-model-name", metavar="NAME",
                   help="the id of the base model in /v1/models (default: the backbone's name)")
    s.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the scheduler and the model's forward passes in a child process, away from the HTTP "
                        "side's interpreter (default on; a crashed engine is answered with 500 and restarted; "
                        "--no-engine-process runs it in a thread of the server's process, as Ray Serve replicas do)")
    s.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice; with --ray-address: per replica, default "
                        "--replica-cpus)")
    r = s.add_argument_group("scale out on Ray Serve (the same API from replicas of the whole engine)")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="deploy on this Ray cluster ('auto' or HOST:PORT) as Ray Serve replicas; its HTTP proxy "
                        "listens on --host / --port")
    r.add_argument("--replicas", type=int, default=None, metavar="N", help="a fixed number of replicas (default 1)")
    r.add_argument("--min-replicas", type=int, default=None, metavar="N", help="autoscaling: at least N replicas")
    r.add_argument("--max-replicas", type=int, default=None, metavar="N", help="autoscaling: at most N replicas")
    r.add_argument("--target-ongoing-requests", type=int, default=None, metavar="N",
                   help="autoscaling: requests in flight per replica to aim at (default --max-batch-size)")
    r.add_argument("--placement", choices=("serve", "by-set", "ingress"), default="serve",
                   help="which replica gets a request: serve = Serve's default request router (default); by-set = "
                        "routed once at an ingress, the same adapter set to the same replica; ingress = the same "
                        "ingress, Serve's default router (by-set's baseline)")
    r.add_argument("--replica-cpus", type=float, default=None, metavar="N",
                   help="CPUs Ray reserves for each replica (default --threads, else 1)")
    r.add_argument("--replica-gpus", type=float, default=0.0, metavar="N", help="GPUs per replica (default 0)")
    r.add_argument("--app-name", default="dlp-lora", help="the Serve application's name (default dlp-lora)")
    r.add_argument("--detach", action="store_true",
                   help="deploy and exit, leaving the application running (default: run until Ctrl-C, then "
                        "delete it)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="the server's log (default info: it shows unknown request fields, which are ignored, and "
                        "adapter loads and retraining)")
    s.set_defaults(func=cmd_serve)
