"""`dlp-lora bench decode`: how fast we decode, against HF `generate` and llama.cpp, side by side in one run.

Contenders, all on the same backbone (the embedded SmolLM2-135M-Instruct unless `--model`), the same
128-token prompt and `--threads` threads, EOS ignored so every contender generates the same tokens:

- **ours**: ``DLPLoRA.generate`` with a 2-adapter mix (26 random rank-8 adapters loaded), end to end, on the
  decoding core (static slot KV cache); also with no adapter (the base model: what llama-bench runs).
- **HF generate**: ``model.generate`` of a PEFT model holding one of the adapters (greedy, KV cache).
- **llama.cpp** (with ``--llama-bench PATH``): ``llama-bench -m GGUF -t THREADS -p 128 -n 64 -o json`` on the
  GGUF the backbone was converted from (the embedded Q4_1 file by default). It runs before and after ours,
  and the faster of the two runs is the one compared (the ratio never flatters us).

Measured: batch-1 decode tokens/s (time of 1 + N new tokens minus the time of 1 new token: the prefill
and the first token), prefill tokens/s (prompt tokens / the time of one new token), and the throughput of
8 and 32 concurrent requests, each with its own 2-adapter mix, as one batch of ``DLPLoRA.generate``: end to end
(``mixedC_tok_s``, prefill included) and decoding only (``mixedC_decode_tok_s``, the 1-token time subtracted).
Against llama.cpp both are given: over its batch-1 decode rate, and over what it serves end to end when the
distinct mixes run one after another (``llamacpp_sequential_tok_s``: a 128-token prefill, then the decode)
(llama.cpp batches only requests with the same LoRA configuration, so its batch-1 decode rate is what
distinct mixes get from it). The batch-1 contenders are timed round robin (``bench.fusion.interleaved``),
and every figure uses the minimum time over the repeats.

The last line of ``--json``: ``{"batch1_tok_s", "mixed8_tok_s", "mixed32_tok_s", "prefill_tok_s",
"hf_batch1_tok_s", "llamacpp_tg_tok_s"?, "llamacpp_pp_tok_s"?, "batch1_vs_llamacpp"?, "mixed32_vs_llamacpp"?,
"dtype", "threads", "cpu_flags", ...}``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time

from ..device import auto_dtype_name, cpu_flags
from ..errors import DLPLoRAError

PROMPT_TOKENS = 128
NEW_TOKENS = 64
CONCURRENCY = (8, 32)


def add_arguments(p) -> None:
    p.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights and activations of our engine and HF generate (auto: bf16 where the CPU has "
                        "avx512_bf16 or amx_bf16, else fp32)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="our engine with quantised base linears, adapters in float: int8 (per-channel weights, "
                        "per-token fp32 activations) or int4 (weight-only, groups of 32, bf16 activations)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile our decode step; the compile time is reported (compile_seconds)")
    p.add_argument("--threads", type=int, default=2, help="threads for every contender (default 2)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help=f"new tokens per request (default {NEW_TOKENS})")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per contender (default 2)")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)),
                   help="batch sizes of distinct-mix requests (default 8,32)")
    p.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench binary, run on the same GGUF")
    p.add_argument("--gguf", help="the GGUF for llama-bench (default: the embedded one)")
    p.add_argument("--quick", action="store_true", help="a short run: 8 new tokens, 1 repeat, batch 8 only")
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")


def llama_bench(path: str, gguf: str, threads: int, prompt: int, new: int) -> dict:
    """Run llama-bench once (its own repeats) -> {"pp_tok_s", "tg_tok_s", "model_type", "build"}."""
    cmd = [path, "-m", gguf, "-t", str(threads), "-p", str(prompt), "-n", str(new), "-o", "json"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DLPLoRAError(f"could not run llama-bench ({' '.join(cmd)}): {exc}") from None
    if res.returncode != 0:
        raise DLPLoRAError(f"llama-bench failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-400:]}")
    try:
        rows = json.loads(res.stdout)
    except ValueError:
        raise DLPLoRAError(f"llama-bench did not print JSON: {res.stdout.strip()[-300:]}") from None
    out = {}
    for r in rows:
        key = "pp_tok_s" if r.get("n_prompt") and not r.get("n_gen") else "tg_tok_s"
        out[key] = round(float(r["avg_ts"]), 2)
        out["model_type"] = r.get("model_type")
        out["build"] = r.get("build_commit")
    return out


def run(args) -> dict:
    import torch

    from ..backbone import default_gguf_path, load_backbone
    from ..engine import DLPLoRA
    from ..fusion import LoRAFusion
    from ..testing import random_adapter
    from ..quantize import apply_quantize, quantize_dtype
    from .fusion import FILLER_TEXT, interleaved, peft_model_with

    quick = bool(args.quick)
    new = 8 if quick else args.new_tokens
    repeats = 1 if quick else args.repeats
    levels = [8] if quick else [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    flags = cpu_flags()
    quantize = getattr(args, "quantize", "none")
    dtype_name = quantize_dtype(quantize) or (auto_dtype_name("cpu", flags) if args.dtype == "auto" else args.dtype)
    dtype = getattr(torch, dtype_name)
    torch.set_num_threads(args.threads)
    log = (lambda *a: print(*a, flush=True))
    t_start = time.time()

    base, tok, info = load_backbone(args.model, dtype=dtype)
    adapters = [random_adapter(base, f"rand{i:03d}", rank=8, seed=i) for i in range(26)]  # stacked in `dtype`
    net = copy.deepcopy(base)
    engine = DLPLoRA(net, tok, LoRAFusion(net, adapters))
    apply_quantize(net, quantize)
    engine.eos_ids = []  # every contender generates exactly the requested tokens
    stream = tok(FILLER_TEXT * 40, add_special_tokens=False)["input_ids"]
    text = tok.decode(stream[:PROMPT_TOKENS])
    ids = tok(text, return_tensors="pt")
    n_prompt = ids.input_ids.shape[1]
    names = [a.name for a in adapters]
    mix = {names[0]: 0.6, names[1]: 0.4}
    lb_runs = []
    gguf = args.gguf or str(default_gguf_path())
    if args.llama_bench:
        lb_runs.append(llama_bench(args.llama_bench, gguf, args.threads, n_prompt, new))
        log(f"llama.cpp (before ours): {lb_runs[-1].get('tg_tok_s')} tok/s decode")
    qname = f" + {quantize} weights" if quantize != "none" else ""
    log(f"decode benchmark: {info.name}, {dtype_name}{qname}{', compiled' if args.compile else ''}, "
        f"{args.threads} threads, CPU flags {' '.join(flags) or '-'}; "
        f"{n_prompt}-token prompt, {new} new tokens, 26 adapters loaded, 2-adapter mixes")

    def ours(batch_texts, sets, n):
        return lambda warm=False: engine.generate(batch_texts, adapters=sets, max_new_tokens=1 if warm else n, raw=True)

    peft = peft_model_with(base, adapters[:1])

    def hf(n):
        return lambda warm=False: peft.generate(**ids, max_new_tokens=1 if warm else n, min_new_tokens=1 if warm else n,
                                          do_sample=False, pad_token_id=tok.pad_token_id)

    res: dict = {"backbone": info.name, "dtype": dtype_name, "quantize": quantize, "threads": args.threads,
                 "cpu_flags": flags, "compiled": bool(args.compile),
                 "prompt_tokens": n_prompt, "new_tokens": new, "repeats": repeats}
    if args.compile:
        engine.compile()
        t0 = time.time()
        for c in [1] + levels:  # the first steps of each batch size compile
            engine.generate([text] * c, adapters=[mix] * (c - 1) + [{names[2]: 1.0}], max_new_tokens=3, raw=True)
        engine.generate([text], adapters={}, max_new_tokens=3, raw=True)
        res["compile_seconds"] = round(time.time() - t0, 1)
        log(f"compiled the decode step in {res['compile_seconds']} s")
    with torch.inference_mode():
        sec = interleaved({"ours_1": ours([text], mix, 1), "ours_n": ours([text], mix, 1 + new), "hf_1": hf(1),
                           "hf_n": hf(1 + new), "base_1": ours([text], {}, 1), "base_n": ours([text], {}, 1 + new)},
                          repeats, log)
        t1, tn, h1, hn = sec["ours_1"], sec["ours_n"], sec["hf_1"], sec["hf_n"]
        res["base_batch1_tok_s"] = round(new / max(sec["base_n"] - sec["base_1"], 1e-9), 2)
        res["prefill_tok_s"] = round(n_prompt / t1, 2)
        res["batch1_tok_s"] = round(new / max(tn - t1, 1e-9), 2)
        res["hf_prefill_tok_s"] = round(n_prompt / h1, 2)
        res["hf_batch1_tok_s"] = round(new / max(hn - h1, 1e-9), 2)
        log(f"batch 1: ours {res['batch1_tok_s']} tok/s decode (base model {res['base_batch1_tok_s']}), "
            f"{res['prefill_tok_s']} tok/s prefill; "
            f"HF generate (one PEFT LoRA) {res['hf_batch1_tok_s']} / {res['hf_prefill_tok_s']}")
        for c in levels:
            texts = [tok.decode(stream[37 * i: 37 * i + PROMPT_TOKENS]) for i in range(c)]
            sets = [{names[(2 * i) % 26]: 0.6, names[(2 * i + 1) % 26]: 0.4} for i in range(c)]
            tm = interleaved({f"mixed{c}": ours(texts, sets, new), f"mixed{c}_1": ours(texts, sets, 1)}, repeats, log)
            t, t_1 = tm[f"mixed{c}"], tm[f"mixed{c}_1"]
            res[f"mixed{c}_tok_s"] = round(c * new / t, 2)
            res[f"mixed{c}_decode_tok_s"] = round(c * new / max(t - t_1, 1e-9), 2)
            log(f"{c} concurrent requests, distinct 2-adapter mixes: {res[f'mixed{c}_tok_s']} tok/s end to end "
                f"(prefill included), {res[f'mixed{c}_decode_tok_s']} tok/s decoding")
    if args.llama_bench:
        lb_runs.append(llama_bench(args.llama_bench, gguf, args.threads, n_prompt, new))
        lb = max(lb_runs, key=lambda r: r.get("tg_tok_s") or 0)
        res["llamacpp_tg_runs"] = [r.get("tg_tok_s") for r in lb_runs]
        res.update({"llamacpp_tg_tok_s": lb.get("tg_tok_s"), "llamacpp_pp_tok_s": lb.get("pp_tok_s"),
                    "llamacpp_model": lb.get("model_type"), "llamacpp_build": lb.get("build"), "gguf": gguf})
        if lb.get("tg_tok_s"):
            res["batch1_vs_llamacpp"] = round(res["batch1_tok_s"] / lb["tg_tok_s"], 3)
            res["base_batch1_vs_llamacpp"] = round(res["base_batch1_tok_s"] / lb["tg_tok_s"], 3)
            top = max(levels)
            res[f"mixed{top}_vs_llamacpp"] = round(res[f"mixed{top}_tok_s"] / lb["tg_tok_s"], 3)
            res[f"mixed{top}_decode_vs_llamacpp"] = round(res[f"mixed{top}_decode_tok_s"] / lb["tg_tok_s"], 3)
            if lb.get("pp_tok_s"):  # llama.cpp serving distinct mixes one after another: prefill, then decode
                seq = new / (n_prompt / lb["pp_tok_s"] + new / lb["tg_tok_s"])
                res["llamacpp_sequential_tok_s"] = round(seq, 2)
                res[f"mixed{top}_vs_llamacpp_sequential"] = round(res[f"mixed{top}_tok_s"] / seq, 3)
        log(f"llama.cpp ({lb.get('model_type')}): {lb.get('tg_tok_s')} tok/s decode, {lb.get('pp_tok_s')} tok/s "
            f"prefill; ours / llama.cpp: batch 1 {res.get('batch1_vs_llamacpp')}, "
            f"{max(levels)} mixed {res.get(f'mixed{max(levels)}_vs_llamacpp')}")
    res["total_seconds"] = round(time.time() - t_start, 1)
    if args.json:
        print(json.dumps(res))
    return res
