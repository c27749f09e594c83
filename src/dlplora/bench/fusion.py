"""`dlp-lora bench fusion`: the fused engine's speed against plain PEFT LoRA, side by side.

Every number is a ratio of contenders measured in the same run, on the same prompts and token ids,
with the repeats interleaved (round robin, order rotated each repeat) and the minimum taken (all
times are kept in the JSON as ``all_seconds``). All
contenders run in fp32 under ``torch.inference_mode`` through the same greedy decode loop
(:func:`dlplora.decoding.decode_loop`) on the decoding core (static slot KV cache; PEFT models run there with
their own LoRA layers), except PEFT's mixed batch: its ``adapter_names`` reach the LoRA layers only through
``PeftModel.forward``, so it runs on the HF forward pass. EOS is ignored so every contender generates exactly
the same number of tokens. The DLP-LoRA contender is measured end to end: ``DLPLoRA.generate`` on the
prompt text, i.e. tokenising, routing, setting the fused routing, generating and decoding.

Scenarios
  1. batch 1 (128-token prompt, 64 new tokens): DLP-LoRA (auto mode: merged) vs one PEFT LoRA,
     plus the base model and DLP-LoRA forced to unmerged mode.            target: DLP <= 1.05x single LoRA
  2. mixed batch of 16 prompts, each with its own top-p set of 2-3 adapters: throughput vs the same
     batch all on one PEFT LoRA, and vs PEFT's own mixed batch (adapter_names=, one adapter a row).
                                                                            target: >= 0.9x single LoRA
  3. scaling: 26, 50 and 100 adapters loaded, batch 1 as in 1.             target: <= 1.10x single LoRA
"""

from __future__ import annotations

import copy
import json
import statistics
import time
import zlib

from ..errors import DLPLoRAError

FILLER_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how books were "
    "made and shared. Before that time, scribes copied every page by hand, and a single volume could take months. "
    "Merchants, scholars and priests soon learned to read the new pamphlets, and ideas travelled faster than ever. "
    "A farmer counts seven apples, three pears and two plums in his basket, then gives half of the apples away. "
    "Translate the following sentence into German: the weather is lovely today and we will walk by the river. "
    "Which of the following statements is a valid logical conclusion from the premises given above? "
    "Summarise the news article in two sentences, keeping the names of the people and the places involved. "
)


class StandInRouter:
    """A stand-in for the plugin: peaked random probabilities per text (seeded by the text), then the
    plugin's top-p selection (at least `min_k`, at most `top_k` adapters) and softmax weights."""

    def __init__(self, names, min_k: int = 2, sharpness: float = 3.0):
        self.names = list(names)
        self.min_k = min_k
        self.sharpness = sharpness

    def route(self, texts, p=0.6, top_k=None, weighting="softmax", floor=0.0):
        import torch
        from ..plugin.router import Routing  # lazily: `dlp-lora --help` registers this module without numpy

        out = []
        for t in texts:
            g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
            probs = torch.softmax(torch.randn(len(self.names), generator=g) * self.sharpness, -1)
            sp, order = probs.sort(descending=True)
            k = int((sp.cumsum(0) < p).sum()) + 1
            k = max(k, self.min_k)
            if top_k:
                k = min(k, top_k)
            chosen = sp[:k]
            w = torch.softmax(chosen, 0) if weighting == "softmax" else chosen / chosen.sum()
            idx = order[:k].tolist()
            out.append(Routing([self.names[i] for i in idx], idx, w.tolist(), chosen.tolist()))
        return out


def add_arguments(parser) -> None:
    parser.add_argument("--library", metavar="LIB", help="use this library's adapters (and plugin, if trained); "
                                                         "default: random rank-8 q_proj+v_proj adapters")
    parser.add_argument("--model", help="base model (default: embedded SmolLM2-135M-Instruct, or the library's)")
    parser.add_argument("--adapters", type=int, default=26, metavar="N", help="random adapters to load (default 26)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (default 3, quick 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens in scenario 1 and 3 (default 64)")
    parser.add_argument("--batch", type=int, default=None, help="batch size of scenario 2 (default 16, quick 8)")
    parser.add_argument("--scaling", default="26,50,100", help="adapter counts for scenario 3 (default 26,50,100)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier timings on a shared machine; 0 = torch's default)")
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute): few tokens, one repeat")
    parser.add_argument("--json", action="store_true", help="print the results as a JSON object on the last line")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(contenders: dict, repeats: int, log, raw: dict | None = None) -> dict[str, float]:
    """Seconds per contender: one warm-up each, then `repeats` rounds, round robin with the order rotated.

    Returns the minimum over the repeats (the least disturbed run: on a shared machine other processes
    only ever add time); every time is also stored in `raw`."""
    names = list(contenders)
    for n in names:
        contenders[n](warm=True)
    times = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            times[n].append(_timed(contenders[n]))
    best = {n: min(v) for n, v in times.items()}
    med = {n: statistics.median(v) for n, v in times.items()}
    log("    min:    " + "  ".join(f"{n}={best[n]:.3f}s" for n in names))
    if repeats > 1:
        log("    median: " + "  ".join(f"{n}={med[n]:.3f}s" for n in names))
    if raw is not None:
        raw.update({n: [round(t, 4) for t in v] for n, v in times.items()})
    return best


def peft_model_with(model, adapters, ):
    """A PeftModel (on a copy of `model`) holding `adapters` (AdapterWeights), named as they are."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from ..adapters import peft_wrapping

    net = copy.deepcopy(model)
    pm = None
    for ad in adapters:
        if ad.path:
            if pm is None:
                with peft_wrapping():
                    pm = PeftModel.from_pretrained(net, ad.path, adapter_name=ad.name)
            else:
                pm.load_adapter(ad.path, adapter_name=ad.name)
            continue
        cfg = LoraConfig(r=ad.rank, lora_alpha=ad.alpha, target_modules=ad.targets, lora_dropout=0.0,
                         use_rslora=ad.use_rslora)
        if pm is None:
            with peft_wrapping():
                pm = get_peft_model(net, cfg, adapter_name=ad.name)
        else:
            pm.add_adapter(ad.name, cfg)
        inner = pm.base_model.model
        with torch.no_grad():
            for mod_name, (a, b, _) in ad.layers.items():
                mod = inner.get_submodule(mod_name)
                mod.lora_A[ad.name].weight.copy_(a)
                mod.lora_B[ad.name].weight.copy_(b)
    pm.eval()
    return pm


def run(args) -> dict:
    import torch

    from ..backbone import load_backbone
    from ..decoding import decode_loop
    from ..engine import DLPLoRA
    from ..fusion import LoRAFusion, load_peft_adapter
    from ..testing import random_adapter

    quick = bool(getattr(args, "quick", False))
    repeats = args.repeats or (1 if quick else 3)
    new1 = args.new_tokens or (4 if quick else 64)
    prompt1 = 32 if quick else 128
    batch = args.batch or (8 if quick else 16)
    new2, prompt2 = (4, 12) if quick else (32, 64)
    if getattr(args, "threads", 1):
        torch.set_num_threads(args.threads)
    counts = [int(x) for x in str(args.scaling).split(",") if x.strip()]
    log = (lambda *a: print(*a, flush=True))
    torch.manual_seed(0)
    t_start = time.time()

    lib = None
    model_arg = args.model
    if args.library:
        from ..library import Library

        lib = Library.open(args.library)
        model_arg = lib.base_model_dir(model_arg)
    base, tok, info = load_backbone(model_arg)
    if lib is not None:
        lib.check_base(info.to_dict())
        adapters = [load_peft_adapter(lib.adapter_dir(n), n) for n in lib.names]
        source = f"library {lib.root} ({len(adapters)} adapters)"
    else:
        adapters = [random_adapter(base, f"rand{i:03d}", rank=8, seed=i) for i in range(args.adapters)]
        source = f"{len(adapters)} random rank-8 q_proj+v_proj adapters"
    if not adapters:
        raise DLPLoRAError("no adapters to benchmark")
    router, router_kind = None, "stand-in (top-p over random probabilities)"
    if lib is not None and lib.plugin_dir().is_dir() and any(lib.plugin_dir().iterdir()):
        try:
            from ..plugin import Plugin

            router = Plugin.load(lib.plugin_dir(), expected_labels=lib.names)
            router_kind = f"plugin {lib.plugin_dir()}"
        except Exception as exc:  # keep benchmarking with the stand-in, and say so
            log(f"note: could not load the plugin ({exc}); using the stand-in router")
    if router is None:
        router = StandInRouter([a.name for a in adapters])
    log(f"fusion benchmark: backbone {info.name}, {source}; router: {router_kind}; fp32, "
        f"{torch.get_num_threads()} threads; repeats {repeats}{' (quick)' if quick else ''}")

    # prompts: token ids of exact length, and the text that tokenises to them
    stream = tok(FILLER_TEXT * 40, add_special_tokens=False)["input_ids"]

    def prompt_text(length, offset):
        ids = stream[offset: offset + length]
        return tok.decode(ids)

    text1 = prompt_text(prompt1, 0)
    ids1 = tok(text1)["input_ids"]
    texts2 = [prompt_text(prompt2 + 4 * (i % 5), 37 * i + 11) for i in range(batch)]
    rows2 = [tok(t)["input_ids"] for t in texts2]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    single = adapters[0]
    peft_single = peft_model_with(base, [single])
    fused_net = copy.deepcopy(base)
    engine = DLPLoRA(fused_net, tok, LoRAFusion(fused_net, adapters), router=router, p=0.6, top_k=3)
    engine.eos_ids = []  # every contender generates exactly the requested number of tokens
    routed2 = engine.route(texts2)
    ks = [len(s) for s in routed2]
    first = [max(s, key=s.get) if s else single.name for s in routed2]
    peft_multi = peft_model_with(base, [a for a in adapters if a.name in set(first)])
    log(f"  prompts: scenario 1 {len(ids1)} tokens + {new1} new; scenario 2 {batch} prompts of "
        f"{min(map(len, rows2))}-{max(map(len, rows2))} tokens + {new2} new, {min(ks)}-{max(ks)} adapters a row")

    def loop(model, rows, n, **kw):
        return lambda warm=False: decode_loop(model, rows, 1 if warm else n, [], pad, **kw)

    modes_seen: dict = {}

    def dlp(eng, texts, n, mode=None, key=None):
        def go(warm=False):
            out = eng.generate(texts, max_new_tokens=1 if warm else n, raw=True, mode=mode)
            if key and not warm:
                modes_seen[key] = out[0]["mode"]
        return go

    results: dict = {"backbone": info.name, "adapters": source, "router": router_kind, "quick": quick,
                     "repeats": repeats, "statistic": "min over repeats", "seconds": {}, "all_seconds": {}}

    # 1. batch 1
    log(f"[1] batch 1, {len(ids1)}-token prompt, {new1} new tokens")
    with torch.inference_mode():
        s1 = interleaved({"single_lora": loop(peft_single, [ids1], new1), "dlp": dlp(engine, [text1], new1, key="b1"),
                           "dlp_unmerged": dlp(engine, [text1], new1, "unmerged"), "base": loop(base, [ids1], new1)},
                          repeats, log, raw=results["all_seconds"].setdefault("batch1", {}))
    results["seconds"]["batch1"] = s1
    results["dlp_vs_single_lora"] = round(s1["dlp"] / s1["single_lora"], 3)
    results["dlp_unmerged_vs_single_lora"] = round(s1["dlp_unmerged"] / s1["single_lora"], 3)
    results["base_vs_single_lora"] = round(s1["base"] / s1["single_lora"], 3)
    results["batch1_mode"] = modes_seen.get("b1")

    # 2. mixed batch
    log(f"[2] mixed batch of {batch}, {new2} new tokens each")
    with torch.inference_mode():
        cont2 = {"single_lora": loop(peft_single, rows2, new2), "dlp_mixed": dlp(engine, texts2, new2, key="b2"),
                 "peft_mixed": loop(peft_multi, rows2, new2, forward_kwargs={"adapter_names": first})}
        if not quick:
            cont2["base"] = loop(base, rows2, new2)
        s2 = interleaved(cont2, repeats, log, raw=results["all_seconds"].setdefault("mixed_batch", {}))
    results["seconds"]["mixed_batch"] = s2
    tokens2 = batch * new2
    results["tokens_per_second"] = {k: round(tokens2 / v, 2) for k, v in s2.items()}
    results["mixed_batch_throughput_vs_single"] = round(s2["single_lora"] / s2["dlp_mixed"], 3)
    results["mixed_batch_throughput_vs_peft_mixed"] = round(s2["peft_mixed"] / s2["dlp_mixed"], 3)
    results["mixed_batch_adapters_per_row"] = [min(ks), max(ks)]
    results["mixed_batch_mode"] = modes_seen.get("b2")
    del peft_multi

    # 3. scaling
    log(f"[3] scaling: {', '.join(map(str, counts))} adapters loaded, batch 1, {new1} new tokens")
    engines = {}
    for n in counts:
        ads = list(adapters[:n]) + [random_adapter(base, f"extra{i:03d}", rank=8, seed=1000 + i)
                                     for i in range(max(0, n - len(adapters)))]
        if n == len(adapters):
            engines[n] = engine
            continue
        net = copy.deepcopy(base)
        rt = StandInRouter([a.name for a in ads])
        e = DLPLoRA(net, tok, LoRAFusion(net, ads), router=rt, p=0.6, top_k=3)
        e.eos_ids = []
        engines[n] = e
    with torch.inference_mode():
        cont = {"single_lora": loop(peft_single, [ids1], new1)}
        cont.update({f"dlp_{n}": dlp(e, [text1], new1) for n, e in engines.items()})
        s3 = interleaved(cont, repeats, log, raw=results["all_seconds"].setdefault("scaling", {}))
    results["seconds"]["scaling"] = s3
    results["scaling"] = {str(n): round(s3[f"dlp_{n}"] / s3["single_lora"], 3) for n in counts}

    results["targets"] = {
        "dlp_vs_single_lora <= 1.05": results["dlp_vs_single_lora"] <= 1.05,
        "mixed_batch_throughput_vs_single >= 0.9": results["mixed_batch_throughput_vs_single"] >= 0.9,
        "scaling <= 1.10": all(v <= 1.10 for v in results["scaling"].values()),
    }
    results["total_seconds"] = round(time.time() - t_start, 1)
    log("")
    log(f"DLP-LoRA vs single PEFT LoRA, batch 1 (time ratio, lower is better): {results['dlp_vs_single_lora']}  "
        f"(unmerged {results['dlp_unmerged_vs_single_lora']}, base model {results['base_vs_single_lora']})")
    log(f"mixed batch of {batch}, throughput vs one PEFT LoRA (higher is better): "
        f"{results['mixed_batch_throughput_vs_single']}; vs PEFT's mixed batch: "
        f"{results['mixed_batch_throughput_vs_peft_mixed']}")
    log("scaling (time ratio vs single LoRA): " + ", ".join(f"{k}: {v}" for k, v in results["scaling"].items()))
    for k, ok in results["targets"].items():
        log(f"  target {k}: {'met' if ok else 'MISSED'}")
    if getattr(args, "json", False):
        print(json.dumps(results))
    return results
