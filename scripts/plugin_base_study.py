"""Study behind the base decision of issue 29 (docs/plugin.md, "Familiar task, unfamiliar phrasing").

`dump` trains the full 26-task router and the three leave-3-tasks-out routers of `train-plugin --ood-draws 3`
(same draws), without a detector, on the background minus 20% of its tasks (held out as "foreign" prompts), and
saves per prompt set the network's probabilities and penultimate features: the fit rows (as rendered, and one
augmented view), the held-back calibration rows in every view, the test rows in every view, the own-words set,
the held-out background tasks and, per draw, the held-out library tasks. `rules` then scores the base decisions
compared in the docs on those dumps: the Mahalanobis distance (statistics of the rendered rows or of augmented
views; global, per-class or per-nearest-class thresholds), the "none of these" probability, both, k-nearest
neighbours, and the logistic score of issue 29 -- each calibrated on the held-back rows in every view, by a rate of
them sent to base or by expected loss (train-plugin --base-cost, at the COSTS below).

    PYTHONPATH=src python scripts/plugin_base_study.py dump  /work/data /tmp/study/a  [hashed|hybrid]
    PYTHONPATH=src python scripts/plugin_base_study.py rules /tmp/study/a
"""
import glob
import json
import random
import sys
import time

import numpy as np
import torch

from dlplora.background import read_background
from dlplora.plugin import VIEWS, fit, load_task_rows, split_calibration
from dlplora.plugin.evaluate import load_own_words
from dlplora.plugin.model import score_features
from dlplora.plugin.train import cost_threshold, fit_logistic
from dlplora.plugin.views import augment, compose, view_texts
from dlplora.tasks import TASKS, background_path

NAMES = list(TASKS)
# (miss, foreign, share) of --base-cost: a missed adapter costs 8.9 points (composite-17, docs/RESULTS.md); a foreign
# prompt on an adapter from nothing to as much, with a quarter or half of the traffic foreign; and the measured pair:
# 8.0 (the 26 tasks' mean gain: 8.9 accuracy on 17, 6.2 ROUGE-L on 9) against 2.85 (scripts/foreign_prompt_cost.py)
COSTS = [(8.9, f, s) for s in (0.5, 0.25) for f in (0.5, 2.0, 4.45, 8.9)] + [(8.0, 2.85, s) for s in (0.5, 0.25, 0.1)]


def dump(data, prefix, encoder="hashed"):
    tr, te = load_task_rows(data, NAMES, "train"), load_task_rows(data, NAMES, "test")
    bgrows = read_background(background_path(), exclude_tasks=NAMES)
    groups = sorted({r["task"].split("/")[0] for r in bgrows})
    held_bg = set(random.Random(5).sample(groups, int(len(groups) * 0.2)))
    bg_train = [r["text"] for r in bgrows if r["task"].split("/")[0] not in held_bg]
    bg_cal = [r["text"] for r in bgrows if r["task"].split("/")[0] in held_bg]
    own = load_own_words()

    def run(keep, held, key):
        trk = {n: tr[n] for n in keep}
        t0 = time.time()
        pl = fit(trk, background=bg_train, detector=False, encoder=encoder)
        print(key, "trained in", round(time.time() - t0, 1), "s", flush=True)
        fit_rows, cal_rows = split_calibration(trk, 0)
        out = {}

        def put(name, texts, gold):
            p, h = [], []
            with torch.inference_mode():
                for b in range(0, len(texts), 1024):
                    lo, hh = pl.net.features(pl.encoder.encode(texts[b:b + 1024]))
                    p.append(torch.softmax(lo.float(), -1).numpy())
                    h.append(hh.float().numpy())
            out[name + "_p"], out[name + "_h"] = np.concatenate(p), np.concatenate(h)
            out[name + "_y"] = np.array([keep.index(g) if g in keep else -1 for g in gold])

        put("fitr", *view_texts(fit_rows, "rendered"))
        r, ft, fl = random.Random(3), [], []
        for t, rows in fit_rows.items():
            others = [n for n in keep if n != t]
            for x in rows:
                ft.append(augment(x, r, compose(r.choice(fit_rows[r.choice(others)]))))
                fl.append(t)
        put("fitv", ft, fl)
        for v in VIEWS:
            put("cal_" + v, *view_texts(cal_rows, v))
            put("te_" + v, *view_texts({n: te[n] for n in keep}, v, 1))
        ow = [o for o in own if o["task"] in keep]
        put("own", [o["text"] for o in ow], [o["task"] for o in ow])
        put("bgcal", bg_cal, [""] * len(bg_cal))
        if held:
            put("ood", *view_texts({n: te[n] for n in held}, "rendered"))
        np.savez_compressed(f"{prefix}_{key}.npz", **out)

    run(NAMES, [], "full")
    rng = random.Random(0)  # the draws of leave_out(seed=0)
    for d in range(3):
        held = sorted(rng.sample(NAMES, 3))
        run([n for n in NAMES if n not in held], held, f"d{d}")


def acc(D, name, base):
    """Mean per-task top-1 (base counts as wrong)."""
    p, y = D[name + "_p"], D[name + "_y"]
    ok = (p[:, :-1].argmax(1) == y) & ~base
    return float(np.mean([ok[y == c].mean() for c in np.unique(y)]))


def maha(D, fit_set):
    h, y = torch.from_numpy(D[fit_set + "_h"]).double(), torch.from_numpy(D[fit_set + "_y"])
    n = int(y.max()) + 1
    mu = torch.stack([h[y == c].mean(0) for c in range(n)])
    c = h - mu[y]
    cov = c.T @ c / (len(h) - n)
    prec = torch.linalg.inv(cov + torch.eye(cov.shape[0], dtype=cov.dtype) * 1e-3 * cov.diagonal().mean())
    cache = {}

    def dist(name):
        if name not in cache:
            d = torch.from_numpy(D[name + "_h"]).double()[:, None, :] - mu[None]
            dd = torch.einsum("nkd,de,nke->nk", d, prec, d)
            cache[name] = (dd.min(1).values.numpy(), dd.argmin(1).numpy())
        return cache[name]
    return dist


def knn(D, bank, k):
    b = torch.nn.functional.normalize(torch.from_numpy(np.concatenate([D[x + "_h"] for x in bank])), dim=1)
    cache = {}

    def score(name):
        if name not in cache:
            x = torch.nn.functional.normalize(torch.from_numpy(D[name + "_h"]), dim=1)
            cache[name] = torch.cat([1 - (x[i:i + 2048] @ b.T).topk(k, dim=1).values[:, -1]
                                     for i in range(0, len(x), 2048)]).numpy()
        return cache[name]
    return score


def logistic(D, dist):
    """The logistic score of issue 29 (router.foreign_score), fitted on the held-back views vs held-out background."""
    def feats(name):
        return score_features(dist(name)[0], D[name + "_p"], True)

    xin = np.concatenate([feats("cal_" + v) for v in VIEWS])
    xout = feats("bgcal")
    params = fit_logistic(xin, xout)

    def score(name):
        x = (feats(name) - np.asarray(params["mean"])) / np.asarray(params["std"])
        return 1 / (1 + np.exp(-(x @ np.asarray(params["weights"]) + params["bias"])))
    return score


def rules_of(D):
    """{rule name: function(set name) -> bool array (to base)}, thresholds calibrated on the held-back views."""
    out = {"off": lambda s: np.zeros(len(D[s + "_y"]), bool)}
    pn = lambda s: D[s + "_p"][:, -1]  # noqa: E731
    cal = lambda f: np.concatenate([f("cal_" + v) for v in VIEWS])  # noqa: E731
    for fs in ("fitr", "fitv"):
        dist = maha(D, fs)
        d = lambda s, dist=dist: dist(s)[0]  # noqa: E731
        cd, ck = cal(d), cal(lambda s: dist(s)[1])
        cy = cal(lambda s: D[s + "_y"])
        n = int(cy.max()) + 1
        for rate in (0.005, 0.015, 0.03):
            g = np.quantile(cd, 1 - rate)
            out[f"mahalanobis ({fs}) @{rate}"] = lambda s, g=g, d=d: d(s) > g
            for mode, key in (("per gold class", cy), ("per nearest class", ck)):
                thr = np.array([np.quantile(cd[key == c], 1 - rate) if (key == c).sum() > 20 else g for c in range(n)])
                out[f"mahalanobis ({fs}) {mode} @{rate}"] = lambda s, thr=thr, dist=dist: (lambda a, k: a > thr[k])(*dist(s))
        g = np.quantile(cd, 1 - 0.015)
        out[f"mahalanobis ({fs}) @0.015 and p_none > 0.5"] = lambda s, g=g, d=d: (d(s) > g) & (pn(s) > 0.5)
        lg = logistic(D, dist)
        cl = cal(lg)
        for rate in (0.002, 0.005, 0.015, 0.03):
            t = np.quantile(cl, 1 - rate)
            out[f"logistic ({fs}) @{rate}"] = lambda s, t=t, lg=lg: lg(s) > t
        for cost in COSTS:  # train-plugin --base-cost: the threshold of least expected loss
            t, _ = cost_threshold(cl, lg("bgcal"), cost)
            out[f"logistic ({fs}) cost {cost[0]:g},{cost[1]:g},{cost[2]:g}"] = lambda s, t=t, lg=lg: lg(s) > t
    for q in (0.5, 0.9):
        out[f"p_none > {q}"] = lambda s, q=q: pn(s) > q
    for bank in (("fitr",), ("fitr", "fitv")):
        sc = knn(D, bank, 10)
        t = np.quantile(cal(sc), 1 - 0.015)
        out[f"10-NN cosine ({'+'.join(bank)}) @0.015"] = lambda s, t=t, sc=sc: sc(s) > t
    return out


def rules(prefix):
    sets = ["te_" + v for v in VIEWS] + ["own"]
    full = dict(np.load(f"{prefix}_full.npz"))
    draws = [dict(np.load(f)) for f in sorted(glob.glob(f"{prefix}_d*.npz"))]
    res = {}
    for k, rule in rules_of(full).items():
        res[k] = {s: acc(full, s, rule(s)) for s in sets} | {"held-out background": float(rule("bgcal").mean())}
    for D in draws:
        for k, rule in rules_of(D).items():
            res[k].setdefault("_ood", []).append(float(rule("ood").mean()))
            res[k].setdefault("_own_in", []).append(acc(D, "own", rule("own")))
    print("rule | " + " | ".join(s.replace("te_", "") for s in sets) + " | held-out background to base | "
          "leave-3-out: out-of-library to base | leave-3-out: own words (in-library)")
    for k, r in res.items():
        print(k, "|", " | ".join(f"{100 * r[s]:.2f}" for s in sets), f"| {100 * r['held-out background']:.1f}",
              f"| {100 * np.mean(r.get('_ood', [np.nan])):.1f} | {100 * np.mean(r.get('_own_in', [np.nan])):.2f}")


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump(sys.argv[2], sys.argv[3], *(sys.argv[4:5] or ["hashed"]))
    else:
        rules(sys.argv[2])
