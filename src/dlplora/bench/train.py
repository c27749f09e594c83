"""`dlp-lora bench train`: our LoRA training step against a naive PEFT fp32 loop, side by side.

Contenders, on one batch, repeats interleaved: the naive loop (fp32, full logits, ``labels=``); ours with an
all-layer adapter; ours with the default top-10-layer adapter; and the same with the bottom layers' output
cached (:mod:`dlplora.train.prefix`): the step from the second epoch on. The cache's one-time cost (the bottom
layers' forward pass, once per example) is reported beside it (``prefix_fill_seconds``).
"""

from __future__ import annotations

import time

import torch

from ..train.lora import (TrainConfig, collate, cpu_has_native_bf16, encode_example, make_peft_model, naive_loss,
                          target_only_loss)
from ..train.prefix import PrefixCache, prefix_loss


def bench_train(model_path=None, task: str = "winowhy", batch_size: int = 8, repeats: int = 3, max_len: int = 192,
                bf16: bool | None = None, examples: list[dict] | None = None, log=print) -> dict:
    """Tokens/s of our training step vs a naive PEFT fp32 loop (full logits, `labels=`), side by side on the
    same batch, repeats interleaved. `bf16` None = our default (on only with native CPU bf16)."""
    from ..backbone import load_backbone
    from ..tasks import load_examples

    model, tok, info = load_backbone(model_path)
    examples = (examples or load_examples(task))[:batch_size]
    cfg = TrainConfig(max_len=max_len, batch_size=batch_size, bf16=bf16)  # our defaults (top 10 layers)
    encoded = [encode_example(tok, ex, cfg.max_len, cfg.max_answer_tokens) for ex in examples]
    batch = collate(encoded, tok.pad_token_id)
    n_tokens = int(batch[1].sum())
    # Two adapters on one PEFT model: "default" in every layer (the paper's setup), "top" = our default.
    from peft import LoraConfig

    pm = make_peft_model(model, TrainConfig(max_len=max_len, batch_size=batch_size, top_layers=None))
    n_layers = model.config.num_hidden_layers
    pm.add_adapter("top", LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets),
                                     lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                                     layers_to_transform=list(range(n_layers - cfg.top_layers, n_layers))))

    def run(adapter, fn):
        def step(m):
            m.set_adapter(adapter)
            return fn(m)
        return step

    prefix = PrefixCache(pm, max(0, n_layers - cfg.top_layers), cfg.bf16)
    keys, seqs = list(range(len(encoded))), [ids for ids, _ in encoded]
    pm.set_adapter("top")
    t0 = time.perf_counter()
    prefix.fill(keys, seqs, tok.pad_token_id)
    fill_s = time.perf_counter() - t0
    contenders = {
        "naive_fp32_full_logits": run("default", lambda m: naive_loss(m, *batch)),
        "ours_all_layers": run("default", lambda m: target_only_loss(m, *batch, bf16=cfg.bf16)),
        "ours_default_top_layers": run("top", lambda m: target_only_loss(m, *batch, bf16=cfg.bf16)),
        "ours_top_layers_cached_bottom": run("top", lambda m: prefix_loss(m, prefix, keys, seqs, tok.pad_token_id,
                                                                          *batch[2:], bf16=cfg.bf16)),
    }
    opt = torch.optim.AdamW([p for n, p in pm.named_parameters() if "lora_" in n], lr=1e-5)
    times = {k: [] for k in contenders}
    for rep in range(repeats + 1):  # the first round warms up and is not counted
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            loss = fn(pm)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rep:
                times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    tps = {k: n_tokens / v for k, v in med.items()}
    result = {"model": info.name, "task": task, "batch_size": batch_size, "tokens_per_batch": n_tokens,
              "target_tokens": int(len(batch[4])), "repeats": repeats,
              "tokens_per_second": {k: round(v, 1) for k, v in tps.items()},
              "speedup": round(tps["ours_default_top_layers"] / tps["naive_fp32_full_logits"], 2),
              "speedup_same_adapter": round(tps["ours_all_layers"] / tps["naive_fp32_full_logits"], 2),
              "cached_bottom_vs_default": round(tps["ours_top_layers_cached_bottom"] / tps["ours_default_top_layers"],
                                                2),
              "prefix_fill_seconds": round(fill_s, 3),
              "top_layers": cfg.top_layers,
              "ours_uses_bf16": cfg.bf16, "cpu_native_bf16": cpu_has_native_bf16(),
              "torch_threads": torch.get_num_threads()}
    for k, v in tps.items():
        log(f"{k:>26}: {v:8.1f} tok/s  (median step {med[k]:.2f}s)")
    log(f"speedup (ours, default config / naive): {result['speedup']:.2f}x; "
        f"same all-layer adapter, target-only logits alone: {result['speedup_same_adapter']:.2f}x; "
        f"bottom layers cached (epochs 2+) vs default: {result['cached_bottom_vs_default']:.2f}x "
        f"(one-time fill {fill_s:.2f}s for this batch)")
    return result


def bench_batching(model_path=None, task: str = "winowhy", n_examples: int = 48, batch_size: int = 8,
                   max_len: int = 512, repeats: int = 2, bf16: bool | None = None, examples: list[dict] | None = None,
                   seed: int = 0, log=print) -> dict:
    """One epoch over `n_examples` of `task` with our default step (top-layer LoRA, answer-only head), batched three
    ways, epochs interleaved: random order (rows padded to the batch's longest), length-bucketed batches (the
    trainer's default) and packed rows (:mod:`dlplora.train.pack`: examples share rows of `max_len` tokens, with a
    block-diagonal mask; as many rows a step as hold the same tokens as a bucketed batch on average). Reports the
    padded share of the computed tokens and the example tokens per second (median epoch)."""
    import random

    from ..backbone import load_backbone
    from ..tasks import load_examples
    from ..train.lora import bucketed_batches
    from ..train.pack import pack_rows, packed_collate, packed_loss

    model, tok, info = load_backbone(model_path)
    examples = (examples or load_examples(task))[:n_examples]
    cfg = TrainConfig(max_len=max_len, batch_size=batch_size, bf16=bf16)
    pm = make_peft_model(model, cfg)
    encoded = [encode_example(tok, ex, cfg.max_len, cfg.max_answer_tokens) for ex in examples]
    lengths = [len(s) for s, _ in encoded]
    real = sum(lengths)
    rng = random.Random(seed)
    shuffled = list(range(len(encoded)))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]
    bucketed = bucketed_batches(lengths, batch_size, random.Random(seed))
    rows = pack_rows(lengths, max_len)
    rows_per_step = max(1, round(batch_size * (real / len(lengths)) / max_len))
    rng.shuffle(rows)
    packed = [rows[i:i + rows_per_step] for i in range(0, len(rows), rows_per_step)]

    def padded(batches) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    def packed_padded() -> int:
        return sum(len(g) * max(sum(lengths[i] for i in r) for r in g) for g in packed)

    def epoch_rows(batches):
        return lambda: [target_only_loss(pm, *collate([encoded[i] for i in b], tok.pad_token_id), bf16=cfg.bf16)
                        for b in batches]

    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-5)
    steps = {"random_order": (random_batches, None), "length_bucketed": (bucketed, None), "packed": (None, packed)}
    computed = {"random_order": padded(random_batches), "length_bucketed": padded(bucketed),
                "packed": packed_padded()}
    times = {k: [] for k in steps}
    pm.train()
    for rep in range(repeats + 1):  # round 0 warms up
        for name, (batches, groups) in steps.items():
            t0 = time.perf_counter()
            for b in (batches if batches is not None else groups):
                if groups is not None:
                    loss = packed_loss(pm, *packed_collate(encoded, b, tok.pad_token_id), bf16=cfg.bf16)
                else:
                    loss = target_only_loss(pm, *collate([encoded[i] for i in b], tok.pad_token_id), bf16=cfg.bf16)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if rep:
                times[name].append(time.perf_counter() - t0)
    pm.unload()
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    result = {"model": info.name, "task": task, "examples": len(encoded), "example_tokens": real,
              "batch_size": batch_size, "max_len": max_len, "packed_rows_per_step": rows_per_step,
              "steps_per_epoch": {k: len(v[0] if v[0] is not None else v[1]) for k, v in steps.items()},
              "padding_share": {k: round(1 - real / v, 3) for k, v in computed.items()},
              "epoch_seconds": {k: round(v, 2) for k, v in med.items()},
              "tokens_per_second": {k: round(real / v, 1) for k, v in med.items()},
              "vs_length_bucketed": {k: round(med["length_bucketed"] / v, 2) for k, v in med.items()},
              "repeats": repeats, "top_layers": cfg.top_layers, "bf16": cfg.bf16,
              "cpu_native_bf16": cpu_has_native_bf16(), "torch_threads": torch.get_num_threads()}
    for k in steps:
        log(f"{k:>16}: {result['tokens_per_second'][k]:8.1f} example tok/s, padding {result['padding_share'][k]:.1%}, "
            f"{result['steps_per_epoch'][k]} steps, epoch {med[k]:.1f}s ({result['vs_length_bucketed'][k]:.2f}x "
            f"bucketed)")
    return result
