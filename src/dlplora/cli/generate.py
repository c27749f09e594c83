"""`dlp-lora generate` and `dlp-lora chat`: the fused multi-LoRA engine from the command line."""

from __future__ import annotations

import json
import sys

from ..errors import DLPLoRAError
from .common import LIBRARY_MODEL_HELP, add_precision_arguments, add_routing_arguments, routing_from_args


def _engine(args):
    from ..engine import DLPLoRA

    engine = DLPLoRA.from_library(args.library, model=args.model, plugin_dir=args.plugin,
                                  routing=routing_from_args(args), dtype=args.dtype, device=args.device,
                                  quantize=args.quantize)
    if args.compile:
        engine.compile()
    return engine


def _fmt_routing(routing: dict) -> str:
    ads = routing.get("adapters") or []
    if not ads:
        why = routing.get("base_reason")
        return f"[adapters: none (base model{': ' + why if why else ''})]"
    return "[adapters: " + ", ".join(f"{a['name']}={a['weight']:.3g}" for a in ads) + f"; {routing.get('source')}]"


def _public(result: dict) -> dict:
    if "error" in result:
        return result
    return {"text": result["text"], "routing": result["routing"], "tokens": result["tokens"],
            "finish_reason": result["finish_reason"]}


def cmd_generate(args) -> None:
    from ..engine import adapter_set, parse_adapters

    if not args.prompts:
        raise DLPLoRAError("give at least one prompt, e.g. dlp-lora generate --library LIB \"What is 2+2?\"")
    for i, prompt in enumerate(args.prompts, 1):  # before the model loads
        if not prompt.strip():
            raise DLPLoRAError(f"prompt {i} is empty; give the model some text")
    adapters = adapter_set(parse_adapters(args.adapters), "--adapters") if args.adapters is not None else None
    engine = _engine(args)
    results = engine.generate(args.prompts, max_new_tokens=args.max_new_tokens, adapters=adapters, raw=args.raw,
                              temperature=args.temperature, top_p=args.top_p, stop=args.stop or None,
                              seed=args.seed)
    for prompt, res in zip(args.prompts, results):
        if len(args.prompts) > 1 or not args.json:
            print(f">>> {prompt}")
            print(_fmt_routing(res["routing"]))
        print(res["text"])
        if len(args.prompts) > 1:
            print()
    if args.json:
        objs = [_public(r) for r in results]
        print(json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False))


def cmd_chat(args) -> None:
    from ..engine import adapter_set, parse_adapters

    adapters = adapter_set(parse_adapters(args.adapters), "--adapters") if args.adapters is not None else None
    engine = _engine(args)
    if adapters is None and engine.router is None:
        engine.route([])  # raises the "train a plugin" error before the first turn
    session = engine.chat(system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, adapters=adapters, seed=args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {len(engine.names)} adapters; /reset clears the history, /exit or Ctrl-D quits")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("(history cleared)")
            continue
        try:
            result = session.send(text, on_token=lambda t: print(t, end="", flush=True))
        except DLPLoRAError as exc:
            print(f"error: {exc}", flush=True)
            continue
        print()
        print(_fmt_routing(result["routing"]), flush=True)


def _common(p, model_help: str) -> None:
    p.add_argument("--library", required=True, metavar="LIB", help="adapter library directory (with library.json)")
    p.add_argument("--model", help=LIBRARY_MODEL_HELP)
    p.add_argument("--plugin", metavar="DIR", help="router directory (default: LIB/plugin)")
    add_routing_arguments(p)
    add_precision_arguments(p)
    p.add_argument("--adapters", metavar="NAME=W,...",
                   help="skip the router: use these adapters with these weights, as given, each in [0, 1] (e.g. "
                        "a=0.5,b=0.3)")
    p.add_argument("--mode", choices=("auto", "unmerged", "shared", "merged"), default="auto",
                   help="fusion mode (default auto: merged when every prompt uses the same set, else unmerged)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default 128")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when temperature > 0")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def register(sub, model_help: str) -> None:
    g = sub.add_parser("generate", help="generate completions, routed and fused per prompt",
                       description="Route each prompt to a weighted set of the library's adapters (or use "
                                   "--adapters) and generate with the fused adapters; greedy by default.")
    _common(g, model_help)
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--json", action="store_true",
                   help="print as the last line a JSON object {text, routing} (a list for several prompts)")
    g.add_argument("prompts", nargs="*", metavar="PROMPT")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat; every turn is routed anew",
                       description="Read user turns from stdin (one per line), stream the reply and print the "
                                   "adapters chosen for the turn. /reset clears the history; /exit or EOF quits.")
    _common(c, model_help)
    c.add_argument("--system", help="system message")
    c.add_argument("--route-window", type=int, default=0, metavar="N",
                   help="the router also reads the N previous user turns (default 0)")
    c.set_defaults(func=cmd_chat)
