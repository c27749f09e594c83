"""`dlp-lora train-plugin` and `dlp-lora route`: train the DLP router and ask it where prompts go."""

from __future__ import annotations

import json
import os
import sys
import time

from ..config import parse_base_cost
from ..errors import DLPLoRAError
from .common import add_routing_arguments, base_threshold_from_args


def _print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def cmd_train_plugin(args) -> None:
    from ..plugin import train_plugin_from_data
    from ..plugin.evaluate import format_leave_out, format_own_words, format_sources, format_view_table

    lib = None
    if args.library:
        from ..library import Library

        lib = Library.open(args.library)
        names = lib.names
        if not names:
            raise DLPLoRAError(f"the library {args.library} has no adapters; add some with `dlp-lora train-loras` first")
        if args.tasks:
            raise DLPLoRAError("give either --library (route to its adapters) or --tasks, not both")
        data = args.data or lib.manifest.get("data_dir")
        if not args.data and not (data and all(os.path.isfile(os.path.join(data, n, "train.jsonl")) for n in names)):
            return _train_from_library(args, lib)  # the routing prompts the library keeps (LIB/routing)
        if not os.path.isdir(data):
            raise DLPLoRAError(f"prepared data directory {data} does not exist; run `dlp-lora data prepare --out {data}`")
        sources, extra = lib.prompt_sources(data)
        if not any(v.startswith("prepared") for v in sources.values()):
            print(f"no adapter of the library is a task prepared in {data}: training on the library's routing prompts")
            return _train_from_library(args, lib)
        out = args.out or str(lib.plugin_dir())
    else:
        extra, sources = None, None
        if not args.data or not args.tasks:
            raise DLPLoRAError("give --library LIB (its adapter names are the labels), or --data DIR with --tasks "
                               "(e.g. --tasks all)")
        from ..tasks import parse_tasks

        names = parse_tasks(args.tasks)
        data = args.data
        out = args.out or os.path.join(data, "plugin")
        if not os.path.isdir(data):
            raise DLPLoRAError(f"prepared data directory {data} does not exist; run `dlp-lora data prepare --out {data}`")
    log = None if args.json else print
    background = None if args.background == "none" else args.background
    plugin, report = train_plugin_from_data(data, names, epochs=args.epochs, seed=args.seed, log=log,
                                            augment=not args.no_augment, n_views=args.views, background=background,
                                            encoder=args.encoder, ood_draws=args.ood_draws, extra_rows=extra,
                                            base_cost=parse_base_cost(args.base_cost))
    if sources:
        report["sources"] = sources
        print(format_sources(sources))
    path = plugin.save(out)
    if lib is not None:
        lib.keep_routing_prompts(data)  # what it learnt, so that a server can retrain it without the data
    t0 = time.perf_counter()
    from ..plugin import Plugin

    Plugin.load(out, expected_labels=names)
    report["load_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    report["out"] = str(path)
    print(format_view_table(report, report["measured"]))
    if extra:
        print(f"not measured (no test split): {', '.join(extra)}")
    print(format_own_words(report["own_words_detail"]))
    if report.get("leave_out"):
        print(format_leave_out(report["leave_out"]))
    elif report.get("leave_out_note"):
        print(report["leave_out_note"])
    print(f"{report['params']:,} parameters ({report['encoder']} encoder"
          f"{', none-of-these class on %d background prompts' % report['background_prompts'] if report['none_class'] else ''}"
          f"), trained on {report['train_examples']} prompts in {report['train_seconds']:.1f}s; saved to {path} "
          f"(loads in {report['load_ms']} ms)")
    if args.json:  # accuracy, views {name: accuracy}, ood_to_base (with --ood-draws), train_seconds, details
        _print_json(report)


def _train_from_library(args, lib) -> None:
    """`train-plugin --library LIB` without prepared data for every adapter: train on the routing prompts the library
    keeps (LIB/routing/<name>.jsonl, else its data_dir's train split); there is no test split to report on."""
    from ..plugin import train_plugin_from_library
    from ..plugin.evaluate import format_sources

    plugin, report = train_plugin_from_library(lib, epochs=args.epochs, seed=args.seed, encoder=args.encoder,
                                               n_views=0 if args.no_augment else args.views,
                                               background=args.background, log=None if args.json else print,
                                               base_cost=parse_base_cost(args.base_cost))
    report["sources"] = {n: f"routing prompts {lib.routing_source(n)}" for n in lib.names}
    print(format_sources(report["sources"]))
    path = plugin.save(args.out or lib.plugin_dir())
    print(f"{report['params']:,} parameters, trained on {report['train_examples']} prompts of the library's routing "
          f"prompts ({report['tasks']} adapters, {report['background_prompts']} background prompts) in "
          f"{report['train_seconds']:.1f}s; saved to {path} (no test split: pass --data for the accuracy table)")
    if args.json:
        _print_json(report | {"out": str(path)})


def cmd_route(args) -> None:
    from ..plugin import Plugin
    from ..plugin.model import check_texts
    from ..plugin.router import without

    thr = base_threshold_from_args(args)
    expected = None
    if args.library:
        from ..library import Library

        lib = Library.open(args.library)
        expected = lib.names
        plugin_dir = args.plugin or str(lib.plugin_dir())
    elif args.plugin:
        plugin_dir = args.plugin
    else:
        raise DLPLoRAError("give --library LIB (uses LIB/plugin) or --plugin DIR")
    prompts = list(args.prompts)
    if args.stdin:
        prompts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise DLPLoRAError("no prompts to route: give them as arguments (or with --stdin, one per line)")
    check_texts(prompts)  # before anything loads
    plugin = Plugin.load(plugin_dir, expected_labels=expected, partial=True)  # a stale router: warns once
    hidden = set(plugin.labels) - set(expected or plugin.labels)  # adapters the library no longer holds
    t0 = time.perf_counter()
    routings = plugin.route(prompts, p=args.p, top_k=args.top_k, weighting=args.weighting, floor=args.floor,
                            base_threshold=thr)
    routings = [without(r, hidden) for r in routings]
    ms = (time.perf_counter() - t0) * 1000
    out = []
    for prompt, r in zip(prompts, routings):
        short = " ".join(prompt.split())
        short = short if len(short) <= 70 else short[:67] + "..."
        if r.names:
            sel = ", ".join(f"{n} {w:.3f} (p={q:.3f})" for n, w, q in zip(r.names, r.weights, r.probs))
        else:
            sel = f"(base model: {r.base_reason})"
        print(f"{short!r} -> {sel}")
        out.append({"prompt": prompt, "adapters": r.names, "weights": r.weights, "probs": r.probs,
                    "base_reason": r.base_reason, "p_none": r.p_none})
    if args.json:
        _print_json({"routings": out, "p": args.p if args.top_k is None else None, "top_k": args.top_k,
                     "weighting": args.weighting, "floor": args.floor, "plugin": str(plugin_dir),
                     "base_threshold": plugin.threshold_in_use(thr), "calibrated_base_threshold": plugin.base_threshold,
                     "route_ms": round(ms, 3)})


def register(sub, model_help: str) -> None:
    tp = sub.add_parser("train-plugin", help="train the DLP router (hashed n-grams + 4-layer MLP, ~5M params)",
                        description="Train the router on prepared training prompts labelled by task and save it "
                                    "(plugin.json + model.safetensors). Labels are the library's adapter names "
                                    "(--library) or the given --tasks. Prints per-task held-out accuracy on the test "
                                    "prompts under each view (as rendered, without task prefix, choices or "
                                    "input/output prefixes, input only, first half, after another task's turn, with "
                                    "noise), leave-3-tasks-out figures, and the top confusions.")
    tp.add_argument("--library", help="adapter library: labels = its adapter names, default --out LIB/plugin")
    tp.add_argument("--data", help="prepared data directory (from `dlp-lora data prepare`; with --library the "
                                   "default is the library's data_dir)")
    tp.add_argument("--tasks", help="without --library: 'all', 'mcq', 'qa' or comma-separated task names")
    tp.add_argument("--out", help="output directory (default: LIB/plugin, or DATA/plugin without --library)")
    tp.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2)")
    tp.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    tp.add_argument("--no-augment", action="store_true",
                    help="train on the prompts as rendered only (no augmented views)")
    tp.add_argument("--views", type=int, default=2,
                    help="augmented views per training prompt: scaffolding dropped, cut short, another turn "
                         "before it, noise (default: 2)")
    tp.add_argument("--encoder", choices=("hashed", "backbone", "hybrid"), default="hashed",
                    help="hashed: trained hashed word/byte n-gram embeddings (default); backbone: the backbone's "
                         "frozen input embeddings, mean-pooled; hybrid: both side by side (slower to train)")
    tp.add_argument("--background", default="auto",
                    help="prompts of other tasks for the 'none of these' class (routed to the base model): auto = "
                         "BIG-bench tasks outside the suite (cached on first use), none = no such class, or a "
                         "JSONL file of {\"text\": ...} lines (default: auto)")
    tp.add_argument("--base-cost", metavar="MISS,FOREIGN[,SHARE]",
                    help="calibrate the base-model threshold by expected loss instead of the 1.5%% rule: the points "
                         "an in-library prompt loses when sent to base, those a foreign prompt loses on an adapter, "
                         "and the share of foreign prompts in the traffic (default 0.5); measured on the held-back "
                         "views and the held-out background tasks (docs/plugin.md, issue 29)")
    tp.add_argument("--ood-draws", type=int, default=3,
                    help="leave-3-tasks-out draws measuring out-of-library prompts routed to base (each trains "
                         "one more router; fewer tasks held out from 3 or 4 adapters, skipped with a note "
                         "below 3; 0 skips; default: 3)")
    tp.add_argument("--json", action="store_true", help="print the report as JSON on the last line")
    tp.set_defaults(func=cmd_train_plugin)

    rp = sub.add_parser("route", help="show which adapters the plugin picks for prompts",
                        description="Route prompts with a trained plugin: top-p (default) or top-k selection and "
                                    "the fusion weights of the chosen adapters.")
    rp.add_argument("prompts", nargs="*", help="prompts to route")
    rp.add_argument("--library", help="adapter library (plugin from LIB/plugin, labels checked against it)")
    rp.add_argument("--plugin", help="plugin directory (default: LIB/plugin)")
    add_routing_arguments(rp)
    rp.add_argument("--stdin", action="store_true", help="also read prompts from stdin, one per line")
    rp.add_argument("--json", action="store_true", help="print the routings as JSON on the last line")
    rp.set_defaults(func=cmd_route)
