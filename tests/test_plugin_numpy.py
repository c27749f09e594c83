"""The router's NumPy forward pass (plugin/numpy_net.py): what a loaded hashed plugin routes with, without torch."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from dlplora.errors import DLPLoRAError
from dlplora.plugin import Plugin
from dlplora.plugin.numpy_net import erf

WORDS = {"maths": "add sum plus number total seven twelve minus", "french": "bonjour maison voiture chat pomme rouge",
         "colours": "red green blue yellow violet ball shelf table"}
FOREIGN = "rain song river cloud poem music".split()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A hashed plugin with a 'none of these' class and the logistic base detector, saved; and its training texts."""
    from dlplora.plugin import fit

    rows = {t: [{"input": " ".join(np.random.default_rng(i + 7 * len(t)).choice(w.split(), size=8)) + f" case {i}"}
                for i in range(40)] for t, w in WORDS.items()}
    background = [" ".join(np.random.default_rng(900 + i).choice(FOREIGN, size=6)) for i in range(60)]
    plugin = fit(rows, background=background, n_views=1, seed=0, epochs=6, bits=12, dim=8, hidden=(32, 32, 16))
    d = tmp_path_factory.mktemp("plugin")
    plugin.save(d)
    return d, [r["input"] for rs in rows.values() for r in rs] + background


def test_erf_matches_math_erf():
    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    assert np.abs(erf(x) - np.array([math.erf(float(v)) for v in x])).max() < 3e-7


def test_numpy_forward_equals_torch_forward(saved):
    d, texts = saved
    fast, slow = Plugin.load(d), Plugin.load(d)
    fast.backend = "numpy"  # this process holds torch, where "auto" routes with the torch network
    assert fast._net is None and slow.net is not None and slow._net is not None  # `.net` builds the torch network
    assert fast.params == slow.params > 0
    assert fast.has_detector and fast.config["base_detector"] == "mahalanobis+logistic"
    texts = texts + ["add seven plus twelve", "bonjour, la maison rouge", "a poem about a river", "x"]
    fp, fd = fast.scores(texts, raw=True)
    sp, sd = slow.scores(texts, raw=True)
    assert np.allclose(fp, sp, atol=2e-6) and np.allclose(fd, sd, rtol=1e-4, atol=1e-3)
    for a, b in zip(fast.route(texts), slow.route(texts), strict=True):
        assert (a.names, a.indices, bool(a.base_reason)) == (b.names, b.indices, bool(b.base_reason))
        assert np.allclose(a.weights, b.weights, atol=1e-5) and np.allclose(a.probs, b.probs, atol=2e-6)
    assert fast._net is None  # routing never built it
    auto = Plugin.load(d)
    assert not auto._use_numpy() and auto.route(texts[:2])[0].names == slow.route(texts[:2])[0].names  # torch here


def test_materialised_net_is_what_routing_reads_from_then_on(saved):
    d, texts = saved
    p = Plugin.load(d)
    p.backend = "numpy"
    before = p.full_probs(texts[:3])
    import torch

    with torch.no_grad():
        p.net.mlp[-1].bias[0] += 50.0  # a change to the torch network is seen by routing
    after = p.full_probs(texts[:3])
    assert not np.allclose(before, after) and (after[:, 0] > 0.99).all()


def test_route_answers_without_importing_torch(saved):
    d, _ = saved
    code = ("import sys; from dlplora import cli; rc = cli.main(['route', '--plugin', sys.argv[1], '--json', "
            "'add seven plus twelve']); assert rc == 0; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False" and '"adapters": ["maths"]' in r.stdout


def test_weights_of_another_shape_are_refused_by_name(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    d, _ = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "plugin.json").write_text((d / "plugin.json").read_text())
    state = load_file(str(d / "model.safetensors"))
    state["mlp.0.weight"] = state["mlp.0.weight"][:, :-1].copy()
    del state["norm.bias"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(DLPLoRAError, match=r"does not hold this plugin's weights \(missing norm.bias; shapes mlp.0"):
        Plugin.load(bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(DLPLoRAError, match="does not hold this plugin's weights"):
        Plugin.load(bad)
