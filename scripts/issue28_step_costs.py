"""Per-step costs of the issue-28 recipes on the real backbone, side by side on the same batches (one process):
PYTHONPATH=src python scripts/issue28_step_costs.py TASK[,TASK...] [STEPS] (prepared data in /work/data)."""
import dataclasses, json, random, sys, time
import torch
torch.set_num_threads(2)
from dlplora.backbone import load_backbone
from dlplora.tasks import load_split
from dlplora.train.lora import TrainConfig, make_peft_model, bottom_cache, encode_example, bucketed_batches, train_step, cosine_schedule
from dlplora.train.select import answer_loss, validation_split
from dlplora.eval.scoring import score_task
data = '/work/data'
tasks = sys.argv[1].split(',')
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
net, tok, info = load_backbone(None)
out = {}
for task in tasks:
    ex = load_split(data, task, 'train')
    train, val = validation_split(ex, 100)
    rng = random.Random(0)
    sample = rng.sample(train, 8 * (STEPS + 1))
    res = {}
    for label, cfg, full in [('top10_r8', TrainConfig(), False), ('all_r8', TrainConfig(top_layers=None), False),
                             ('all_r32', TrainConfig(top_layers=None, rank=32, alpha=64), False),
                             ('full', TrainConfig(top_layers=None, cache_bottom=False, lr=1e-5), True)]:
        if full:
            model = load_backbone(None)[0]
            for p in model.parameters(): p.requires_grad_(True)
            prefix = None
        else:
            model = make_peft_model(net, cfg)
            prefix = bottom_cache(model, cfg)
        enc = [encode_example(tok, e, cfg.max_len, cfg.max_answer_tokens) for e in sample]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr); sched = cosine_schedule(opt, 100)
        model.train()
        times = []
        for s in range(STEPS + 1):
            idx = list(range(8 * s, 8 * s + 8))
            t = time.perf_counter()
            train_step(model, [enc[i] for i in idx], tok.pad_token_id, cfg, params, opt, sched, label, prefix, idx)
            times.append(time.perf_counter() - t)
        # steady state: the bottom-layer cache is filled on first sight of an example, which happens once per example in
        # one epoch too, so the first-pass step (every example new) is the one-epoch cost
        res[label] = round(sum(times[1:]) / STEPS, 3); print(task, label, res[label], [round(x, 2) for x in times], flush=True)
        if not full:
            model.unload()
        del model, opt
    # validation costs on 100 held-out examples (all-layer adapter just initialised: B = 0, same cost)
    t = time.perf_counter()
    enc_val = [encode_example(tok, e, 512, 128) for e in val]
    answer_loss(net, enc_val, tok.pad_token_id, True)
    res['val_loss_100'] = round(time.perf_counter() - t, 1)
    if val[0].get('choices'):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16): score_task(net, tok, task, val); res['val_accuracy_100'] = round(time.perf_counter() - t, 1)
    out[task] = res
    print(task, res, flush=True)
print(json.dumps(out))
