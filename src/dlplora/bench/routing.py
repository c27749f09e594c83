"""`dlp-lora bench routing`: a trained plugin's robustness table (held-out accuracy per view of the test
prompts, share sent to the base model) and its routing latency; with `--train-speed`, the router's
training step with our lazy-Adam embedding update against PyTorch's sparse path, side by side."""

from __future__ import annotations

import math
import time

from ..config import base_threshold_of
from ..errors import DLPLoRAError


def add_arguments(p) -> None:
    p.add_argument("--library", help="adapter library (plugin from LIB/plugin, data from its data_dir)")
    p.add_argument("--plugin", help="plugin directory (default: LIB/plugin)")
    p.add_argument("--data", help="prepared data directory with the test splits (default: the library's data_dir)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per routing call for the latency (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the latency (default 1)")
    p.add_argument("--train-speed", action="store_true",
                   help="also time 2 training epochs on the prepared train splits (rendered + 1 view each): our "
                        "lazy-Adam embedding update vs nn.EmbeddingBag(sparse=True) + torch.optim.SparseAdam")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")


def _sparse_torch_epochs(texts, y, n_out, epochs=2, batch_size=512, lr=4e-3, emb_lr=3e-2, seed=0) -> float:
    """The reference: the same network and schedule-free Adam, trained with PyTorch's sparse embedding path."""
    import numpy as np
    import torch
    from torch import nn

    from ..plugin.encoders import make_encoder
    from ..plugin.model import build_net

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    enc = make_encoder("hashed")
    feats = enc.encode(texts)
    net = build_net(enc, (512, 256, 128), n_out, 0.1)
    net.emb = nn.EmbeddingBag(enc.tokenizer.buckets, enc.dim, mode="mean", sparse=True)
    opt_e = torch.optim.SparseAdam(list(net.emb.parameters()), lr=emb_lr)
    opt_d = torch.optim.AdamW([p for n, p in net.named_parameters() if not n.startswith("emb.")], lr=lr)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    yt = torch.from_numpy(y)
    for _ in range(epochs):
        perm = rng.permutation(len(texts))
        for b in range(0, len(perm), batch_size):
            rows = perm[b: b + batch_size]
            loss = loss_fn(net(feats.take(rows)), yt[torch.from_numpy(rows)])
            opt_e.zero_grad()
            opt_d.zero_grad()
            loss.backward()
            opt_e.step()
            opt_d.step()
    return time.perf_counter() - t0


def train_speed(data_dir, names, repeats: int = 2) -> dict:
    """Wall time of 2 epochs (featurisation included, 1 thread) of each embedding update, interleaved."""
    import numpy as np
    import torch

    from ..plugin import Plugin, build_training_set, load_task_rows

    texts, labels = build_training_set(load_task_rows(data_dir, names, "train"), n_views=1)
    y = np.array([names.index(lab) for lab in labels])
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    ours, ref = [], []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            Plugin.train(texts, labels, names, epochs=2, threads=1)
            ours.append(time.perf_counter() - t0)
            ref.append(_sparse_torch_epochs(texts, y, len(names)))
    finally:
        torch.set_num_threads(old)
    return {"train_prompts": len(texts), "lazy_adam_s": round(min(ours), 2), "torch_sparse_adam_s": round(min(ref), 2),
            "torch_sparse_over_lazy": round(min(ref) / min(ours), 2) if min(ours) > 0 else math.nan}


def run(args) -> None:
    from ..plugin import Plugin, load_task_rows
    from ..plugin.evaluate import format_own_words, format_sources, format_view_table, routing_benchmark

    lib, data = None, args.data
    if args.library:
        from ..library import Library

        lib = Library.open(args.library)
        plugin_dir = args.plugin or str(lib.plugin_dir())
        data = data or lib.manifest.get("data_dir")
    elif args.plugin:
        plugin_dir = args.plugin
    else:
        raise DLPLoRAError("give --library LIB (uses LIB/plugin) or --plugin DIR")
    if not data and lib is None:
        raise DLPLoRAError("give --data PREPARED_DIR (the prepared test splits of the plugin's tasks)")
    thr = base_threshold_of(args.base_threshold, args.no_base_fallback)  # flags from cli.common.add_base_arguments
    plugin = Plugin.load(plugin_dir, expected_labels=lib.names if lib else None, partial=True)
    decision = plugin.base_decision(thr) if plugin.has_detector else None
    if thr is not None and plugin.has_detector:  # the table under the operator's threshold
        plugin.config["base_threshold"] = thr
    names = [n for n in plugin.labels if lib is None or n in lib.names]
    sources = None
    if lib is not None:  # the test split of the adapters that are tasks in DATA, the routing prompts of the others
        sources, own = lib.prompt_sources(data, "test", names)
        rows = {n: own[n] if n in own else load_task_rows(data, [n], "test")[n] for n in names}
        print(format_sources(sources))
        if own:
            print(f"note: {', '.join(own)} are measured on their routing prompts, which the router was trained on "
                  f"(in-sample)")
    else:
        rows = load_task_rows(data, names, "test")
    rep = routing_benchmark(plugin, rows, batch_size=args.batch_size, threads=args.threads)
    if sources:
        rep["sources"] = sources
    print(format_view_table(rep, names))
    print(format_own_words(rep["own_words_detail"]))
    print(f"routing: {rep['routing_ms_per_prompt']:.3f} ms per prompt in batches of {rep['routing_batch_size']} "
          f"({rep['routing_threads']} thread), {rep['routing_single_prompt_ms']:.2f} ms for one prompt alone")
    if args.train_speed:
        rep["train_speed"] = train_speed(data, names)
        ts = rep["train_speed"]
        print(f"training, 2 epochs on {ts['train_prompts']} prompts, 1 thread: lazy Adam {ts['lazy_adam_s']} s, "
              f"torch sparse Adam {ts['torch_sparse_adam_s']} s ({ts['torch_sparse_over_lazy']}x)")
    rep["plugin"] = str(plugin_dir)
    rep["base_decision"] = decision
    if args.json:
        import json

        print(json.dumps(rep, ensure_ascii=False))
