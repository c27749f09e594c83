"""`dlp-lora bench gpu`: DLP-LoRA against a single LoRA and PEFT's mixed batch on real-size models, random weights.

No weights travel: each model is built from its config (Qwen2-1.5B, Llama-3-8B) with random weights, in bf16
on the GPU (``--device auto``), and gets 26 and 100 random rank-8 adapters on q_proj and v_proj. Timing
ratios do not depend on the weights' values. Prompts are random token ids (128 tokens), 64 new tokens, EOS
ignored; every contender runs the same greedy decode loop (:func:`dlplora.decoding.decode_loop`) on the
decoding core, except PEFT's mixed batch (its ``adapter_names`` need ``PeftModel.forward``: the HF path).

Contenders, timed round robin (``bench.fusion.interleaved``, minimum of the repeats):

- batch 1: one PEFT LoRA; DLP-LoRA with a 2-adapter mix (auto mode: merged into the weights for the
  generation); DLP-LoRA forced into its slot table (the server's per-row path);
- batch 32: one PEFT LoRA for every row; DLP-LoRA with a distinct 2-adapter mix per row (slot table);
  PEFT's mixed batch (one adapter a row, over 8 adapters: PEFT adds each adapter as new modules, slowly).

``--config tiny`` runs the same code on a tiny model (the test suite does, on the CPU). Last line of
``--json``: ``{"models": {name: {"adapters": {N: {...ratios...}}}}, "device", ...}``.
"""

from __future__ import annotations

import json
import time

CONFIGS = {
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=True),
}


def add_arguments(p) -> None:
    p.add_argument("--config", default="qwen2-1.5b,llama3-8b",
                   help=f"comma-separated model configs: {', '.join(CONFIGS)} (default qwen2-1.5b,llama3-8b)")
    p.add_argument("--adapters", default="26,100", help="adapter counts (default 26,100)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=int, default=32, help="rows of the mixed batch (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")


def build_model(name: str, device, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CONFIGS[name])
    kind = cfg.pop("model_type")
    config = AutoConfig.for_model(kind, **cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def run(args) -> dict:
    import torch

    from ..decoding import decode_loop
    from ..device import resolve_device
    from ..fusion import LoRAFusion
    from ..testing import random_adapter
    from .fusion import interleaved, peft_model_with

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log = (lambda *a: print(*a, flush=True))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    counts = [int(x) for x in str(args.adapters).split(",") if x.strip()]
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "prompt_tokens": args.prompt_tokens,
                 "new_tokens": args.new_tokens, "repeats": args.repeats, "models": {}}
    t_all = time.time()
    for name in [c.strip() for c in args.config.split(",") if c.strip()]:
        t0 = time.time()
        base = build_model(name, device, dtype)
        n_params = sum(p.numel() for p in base.parameters())
        vocab = base.config.vocab_size
        g = torch.Generator().manual_seed(1)
        row1 = torch.randint(10, vocab, (args.prompt_tokens,), generator=g).tolist()
        rows = [torch.randint(10, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.batch)]
        adapters = [random_adapter(base, f"r{i:03d}", rank=8, seed=i, std=0.01) for i in range(max(counts))]
        k_peft = min(8, len(adapters))
        peft = peft_model_with(base, adapters[:k_peft])  # a copy of the model with (up to) 8 PEFT adapters
        peft.set_adapter(adapters[0].name)
        log(f"{name}: {n_params / 1e9:.2f} B parameters, {dtype}, {device}; built in {time.time() - t0:.0f} s")
        out = res["models"][name] = {"parameters": n_params, "adapters": {}}
        names = [a.name for a in adapters]

        def loop(model, rs, **kw):
            def go(warm=False):
                decode_loop(model, rs, 1 if warm else args.new_tokens, [], 0, **kw)
                sync()
            return go

        for n in counts:
            fusion = LoRAFusion(base, adapters[:n])
            mix = {names[0]: 0.6, names[n - 1]: 0.4}
            sets = [{names[(2 * i) % n]: 0.6, names[(2 * i + 1) % n]: 0.4} for i in range(args.batch)]

            def dlp(rs, sets_, mode):
                def go(warm=False):
                    if mode == "slots":
                        if fusion.slot_tables.get("bench", 0) < len(sets_):
                            fusion.init_slots(len(sets_), table="bench")
                        for i, s in enumerate(sets_):
                            fusion.set_slot(i, s, table="bench")
                        fusion.use_slots(0, len(sets_), table="bench")
                    else:
                        fusion.set_routing(sets_, mode="auto", expected_tokens=args.new_tokens)
                    try:
                        loop(base, rs)(warm)
                    finally:
                        fusion.clear()
                return go

            t1 = time.time()
            with torch.inference_mode():
                s1 = interleaved({"single_lora": loop(peft, [row1]), "dlp": dlp([row1], [mix], "auto"),
                                  "dlp_slots": dlp([row1], [mix], "slots")}, args.repeats, log)
                s2 = interleaved({"single_lora": loop(peft, rows), "dlp_mixed": dlp(rows, sets, "slots"),
                                  "peft_mixed": loop(peft, rows, forward_kwargs={
                                      "adapter_names": [names[i % k_peft] for i in range(args.batch)]})},
                                 args.repeats, log)
            tok2 = args.batch * args.new_tokens
            r = {"batch1_tok_s": {k: round(args.new_tokens / v, 2) for k, v in s1.items()},
                 "mixed_tok_s": {k: round(tok2 / v, 2) for k, v in s2.items()},
                 "dlp_vs_single_lora_batch1": round(s1["dlp"] / s1["single_lora"], 3),
                 "dlp_slots_vs_single_lora_batch1": round(s1["dlp_slots"] / s1["single_lora"], 3),
                 "mixed_throughput_vs_single_lora": round(s2["single_lora"] / s2["dlp_mixed"], 3),
                 "mixed_throughput_vs_peft_mixed": round(s2["peft_mixed"] / s2["dlp_mixed"], 3),
                 "seconds": round(time.time() - t1, 1)}
            out["adapters"][str(n)] = r
            log(f"  {n} adapters: batch 1 DLP / single LoRA time {r['dlp_vs_single_lora_batch1']} (slot table "
                f"{r['dlp_slots_vs_single_lora_batch1']}); batch {args.batch} distinct mixes: throughput "
                f"{r['mixed_throughput_vs_single_lora']}x one LoRA, {r['mixed_throughput_vs_peft_mixed']}x PEFT's "
                f"mixed batch; {r['mixed_tok_s']['dlp_mixed']} tok/s")
            fusion.unfuse()
        del base, peft, adapters
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["total_seconds"] = round(time.time() - t_all, 1)
    if args.json:
        print(json.dumps(res))
    return res
