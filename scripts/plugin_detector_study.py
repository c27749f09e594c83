"""Study behind the base-model detector's defaults (docs/plugin.md, "Prompts that belong to no adapter").

For the full 26-task router (`full`) or three leave-3-tasks-out draws (`draws`), it trains the default
router once without a detector, then fits the Mahalanobis detector in four variants (class statistics
from the prompts as rendered or from several views; one pooled covariance or one per class) and
calibrates each at 1%, 1.5% and 2% of the held-back in-library prompts. It prints, per variant, the
share of test prompts sent to the base model: per view for `full`, as rendered plus the held-out
tasks' prompts (`ood`) for `draws`.

    python scripts/plugin_detector_study.py full  DATA
    python scripts/plugin_detector_study.py draws DATA
"""
import json, sys, random
import numpy as np, torch
from dlplora.plugin import fit, load_task_rows, resolve_background, VIEWS, split_calibration
from dlplora.plugin.views import view_texts
from dlplora.tasks import TASKS
names = list(TASKS)
mode, DATA = sys.argv[1], sys.argv[2]
tr = load_task_rows(DATA, names, 'train'); te = load_task_rows(DATA, names, 'test')
bg = resolve_background('auto', names)
def H(pl, texts):
    with torch.inference_mode():
        return torch.cat([pl.net.features(pl.encoder.encode(texts[b:b+1024]))[1] for b in range(0, len(texts), 1024)]).double()
def stats(h, y, n, per_class):
    mu = torch.stack([h[y == c].mean(0) for c in range(n)])
    if not per_class:
        c = h - mu[y]; cov = c.T @ c / len(h); cov += torch.eye(cov.shape[0], dtype=cov.dtype) * 1e-3 * cov.diagonal().mean()
        P = torch.linalg.inv(cov); return mu, [P] * n
    Ps = []
    for k in range(n):
        c = h[y == k] - mu[k]; cov = c.T @ c / len(c)
        cov = 0.5 * cov + 0.5 * torch.eye(cov.shape[0], dtype=cov.dtype) * cov.diagonal().mean()
        Ps.append(torch.linalg.inv(cov))
    return mu, Ps
def dist(h, mu, Ps):
    return torch.stack([torch.einsum('nd,de,ne->n', h - mu[k], Ps[k], h - mu[k]) for k in range(len(mu))], 1).min(1).values.numpy()
def run(keep, held):
    trk = {n: tr[n] for n in keep}
    pl = fit(trk, background=bg, detector=False)
    fit_rows, cal_rows = split_calibration(trk, 0)
    cal = [x for v in VIEWS for x in view_texts(cal_rows, v)[0]]
    out = {}
    hc = H(pl, cal)
    hv = {v: (H(pl, view_texts({n: te[n] for n in keep}, v)[0]), view_texts({n: te[n] for n in keep}, v)[1]) for v in (VIEWS if not held else ['rendered'])}
    ho = H(pl, view_texts({n: te[n] for n in held}, 'rendered')[0]) if held else None
    for fitview in ('rendered', 'views'):
        if fitview == 'rendered':
            ft, fl = view_texts(fit_rows, 'rendered')
        else:
            ft, fl = [], []
            for v in ('rendered', 'no_task_prefix', 'no_io_prefixes', 'input_only', 'no_choices'):
                a, b = view_texts(fit_rows, v); ft += a; fl += b
        hf = H(pl, ft); y = torch.tensor([keep.index(l) for l in fl])
        for pc in (False, True):
            mu, Ps = stats(hf, y, len(keep), pc)
            dc = dist(hc, mu, Ps)
            for rate in (0.01, 0.015, 0.02):
                thr = np.quantile(dc, 1 - rate)
                key = f"{fitview}/{'perclass' if pc else 'pooled'}@{rate}"
                res = {v: float((dist(h, mu, Ps) > thr).mean()) for v, (h, g) in hv.items()}
                if held: res['ood'] = float((dist(ho, mu, Ps) > thr).mean())
                out[key] = {k: round(x, 4) for k, x in res.items()}
    return out
if mode == 'full':
    r = run(names, [])
    for k, v in r.items(): print('FULL', k, json.dumps(v), flush=True)
else:
    rng = random.Random(0)
    for d in range(3):
        held = sorted(rng.sample(names, 3)); keep = [n for n in names if n not in held]
        r = run(keep, held)
        for k, v in r.items(): print('DRAW', d, k, json.dumps(v), flush=True)
