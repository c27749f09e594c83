"""The DLP plugin: selection semantics, training on synthetic prompts, persistence, errors, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dlplora.errors import DLPLoRAError
from dlplora.plugin import HashedNgramTokenizer, Plugin, Routing, bench_routing, select, train_plugin_from_data

# ---------------------------------------------------------------- synthetic data

_VOCAB = {
    "maths": ("add", "sum", "plus", "number", "total", "seven", "twelve", "minus"),
    "french": ("bonjour", "maison", "voiture", "chat", "pomme", "rouge", "avec", "nous"),
    "colours": ("red", "green", "blue", "yellow", "violet", "ball", "shelf", "table"),
}


def _texts(task: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = _VOCAB[task]
    return [" ".join(rng.choice(words, size=8)) + f" case {i}" for i in range(n)]


@pytest.fixture(scope="module")
def small_plugin() -> Plugin:
    texts, labels = [], []
    for t in _VOCAB:
        xs = _texts(t, 40, seed=len(t))
        texts += xs
        labels += [t] * len(xs)
    return Plugin.train(texts, labels, list(_VOCAB), epochs=8, batch_size=32, bits=12, dim=8, hidden=(32, 32, 16),
                        seed=0)


# ---------------------------------------------------------------- selection (eq. 4-5)

PROBS = [0.1, 0.5, 0.3, 0.1]  # sorted: idx 1 (0.5), 2 (0.3), then 0 and 3 (0.1 each, stable order)


def test_top_p_keeps_until_cumulative_reaches_p():
    assert select(PROBS, p=0.5)[0] == [1]  # 0.5 >= 0.5: one is enough
    assert select(PROBS, p=0.51)[0] == [1, 2]
    assert select(PROBS, p=0.8)[0] == [1, 2]  # 0.5 + 0.3 = 0.8 (float rounding tolerated)
    assert select(PROBS, p=0.81)[0] == [1, 2, 0]
    assert select(PROBS, p=0.9)[0] == [1, 2, 0]
    assert select(PROBS, p=0.95)[0] == [1, 2, 0, 3]
    assert select(PROBS, p=1.0)[0] == [1, 2, 0, 3]  # p = 1 keeps all
    assert select(PROBS, p=1e-6)[0] == [1]  # at least one
    # float rounding: 0.7 + 0.1 = 0.7999999999999999 must still count as reaching 0.8
    assert select([0.7, 0.1, 0.2], p=0.9)[0] == [0, 2]
    assert select([0.7, 0.2, 0.1], p=0.8)[0] == [0, 1]


def test_p_one_keeps_zero_probability_adapters_too():
    idx, w, kp = select([1.0, 0.0, 0.0], p=1.0)
    assert idx == [0, 1, 2] and kp == [1.0, 0.0, 0.0]


def test_softmax_weighting_is_softmax_over_kept_probabilities():
    idx, w, kp = select(PROBS, p=0.8, weighting="softmax")
    e5, e3 = math.exp(0.5), math.exp(0.3)
    assert kp == [0.5, 0.3]
    assert w == pytest.approx([e5 / (e5 + e3), e3 / (e5 + e3)], abs=1e-12)
    assert w[0] == pytest.approx(0.549834, abs=1e-6)  # flatter than the probabilities' 0.625


def test_renorm_weighting_divides_by_kept_mass():
    idx, w, kp = select(PROBS, p=0.8, weighting="renorm")
    assert w == pytest.approx([0.625, 0.375], abs=1e-12)
    idx, w, kp = select(PROBS, p=1.0, weighting="renorm")
    assert w == pytest.approx([0.5, 0.3, 0.1, 0.1])
    assert sum(w) == pytest.approx(1.0)


def test_single_kept_adapter_gets_weight_one():
    for weighting in ("softmax", "renorm"):
        idx, w, _ = select([0.9, 0.05, 0.05], p=0.6, weighting=weighting)
        assert idx == [0] and w == [1.0]


def test_top_k_replaces_p():
    assert select(PROBS, top_k=1)[0] == [1]
    assert select(PROBS, top_k=3)[0] == [1, 2, 0]
    assert select(PROBS, top_k=10)[0] == [1, 2, 0, 3]  # k > N: all
    _, w, _ = select(PROBS, top_k=2, weighting="renorm")
    assert w == pytest.approx([0.625, 0.375])


def test_floor_routes_to_base_model():
    assert select([0.4, 0.35, 0.25], p=0.6, floor=0.5) == ([], [], [])
    assert select([0.4, 0.35, 0.25], p=0.6, floor=0.4)[0] == [0, 1]  # at the floor: kept
    assert select([0.4, 0.35, 0.25], top_k=1, floor=0.0)[0] == [0]


@pytest.mark.parametrize("kw, msg", [
    ({"p": 0.0}, "top-p threshold"), ({"p": 1.5}, "top-p threshold"), ({"p": -0.1}, "top-p threshold"),
    ({"p": None}, "top-p threshold"), ({"top_k": 0}, "top-k"), ({"top_k": -2}, "top-k"), ({"top_k": 1.5}, "top-k"),
    ({"weighting": "mean"}, "unknown weighting"), ({"floor": 1.2}, "floor"), ({"floor": -0.5}, "floor"),
])
def test_bad_selection_arguments(kw, msg):
    with pytest.raises(DLPLoRAError, match=msg):
        select(PROBS, **kw)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_is_deterministic_and_batch_independent():
    tok = HashedNgramTokenizer(bits=16)
    a = tok.encode(["The quick brown fox.", "Übersetzen Sie den folgenden Text " * 30])
    b = tok.encode(["Übersetzen Sie den folgenden Text " * 30])
    seg = lambda f, s: f.ids[f.offsets[s]: f.offsets[s] + f.counts[s]].tolist()  # noqa: E731
    assert seg(a, a.head[1]) == seg(b, b.head[0]) and seg(a, a.tail[1]) == seg(b, b.tail[0])
    assert a.head[0] == a.tail[0]  # short text: one segment
    assert a.head[1] != a.tail[1]  # long text: head and tail segments
    assert a.ids.min() >= 0 and a.ids.max() < 2 ** 16
    # fixed hashes (no Python hash()): this value must not change between runs or machines
    # " ab" 3-gram, "ab " 3-gram, " ab " 4-gram, word "ab"; a change here invalidates every saved plugin
    assert tok.encode(["AB"]).ids.tolist() == [17976, 62980, 30045, 4145]
    assert tok.encode(["Hello   World"]).ids.tolist() == tok.encode(["hello world"]).ids.tolist()
    assert tok.encode(["hello world"]).ids.tolist() != tok.encode(["hello there"]).ids.tolist()


def test_tokenizer_chunks_agree_with_one_batch():
    tok = HashedNgramTokenizer(bits=14)
    texts = [f"prompt number {i} " * (i % 40 + 1) for i in range(50)]
    whole, chunked = tok.encode(texts), tok.encode(texts, chunk=7)
    assert np.array_equal(whole.ids, chunked.ids) and np.array_equal(whole.head, chunked.head)
    assert np.array_equal(whole.tail, chunked.tail) and np.array_equal(whole.offsets, chunked.offsets)


# ---------------------------------------------------------------- the trained plugin

def test_plugin_learns_and_routes(small_plugin):
    assert small_plugin.labels == list(_VOCAB)
    for t in _VOCAB:
        held_out = _texts(t, 20, seed=100 + len(t))
        assert small_plugin.predict(held_out) == [t] * 20
    pr = small_plugin.probs(["bonjour maison avec nous", "red green ball"])
    assert pr.shape == (2, 3) and np.allclose(pr.sum(1), 1.0, atol=1e-5)
    routes = small_plugin.route(["bonjour maison avec nous", "red green ball"], p=0.6)
    assert all(isinstance(r, Routing) for r in routes)
    assert routes[0].names[0] == "french" and routes[1].names[0] == "colours"
    for r in routes:
        assert sum(r.weights) == pytest.approx(1.0) and r.indices[0] == small_plugin.labels.index(r.names[0])
    everything = small_plugin.route(["add seven plus twelve"], p=1.0)[0]
    assert sorted(everything.names) == sorted(_VOCAB)
    assert small_plugin.route(["add seven plus twelve"], top_k=2)[0].names[0] == "maths"
    assert small_plugin.route(["add seven plus twelve"], floor=1.0)[0].names == []  # best prob < 1: base model


def test_route_matches_select_on_probs(small_plugin):
    texts = ["plus number chat", "violet pomme"]
    pr = small_plugin.probs(texts)
    for row, r in zip(pr, small_plugin.route(texts, p=0.9, weighting="renorm")):
        idx, w, _ = select(row, p=0.9, weighting="renorm")
        assert r.indices == idx and r.weights == pytest.approx(w)


def test_save_load_round_trip(small_plugin, tmp_path):
    small_plugin.save(tmp_path / "plugin")
    cfg = json.loads((tmp_path / "plugin" / "plugin.json").read_text())
    assert cfg["labels"] == list(_VOCAB) and cfg["params"] == small_plugin.params
    assert cfg["tokenizer"]["bits"] == 12 and cfg["default_p"] == 0.6
    loaded = Plugin.load(tmp_path / "plugin", expected_labels=list(_VOCAB))
    texts = ["bonjour rouge", "sum total minus", "shelf table blue"]
    assert np.allclose(loaded.probs(texts), small_plugin.probs(texts), atol=1e-6)
    assert loaded.params == small_plugin.params


def test_load_refuses_other_labels(small_plugin, tmp_path):
    small_plugin.save(tmp_path / "p")
    with pytest.raises(DLPLoRAError, match="retrain with `dlp-lora train-plugin --library LIB`"):
        Plugin.load(tmp_path / "p", expected_labels=["maths", "french"])
    with pytest.raises(DLPLoRAError, match="different order"):
        Plugin.load(tmp_path / "p", expected_labels=["french", "maths", "colours"])
    with pytest.raises(DLPLoRAError, match="no plugin at"):
        Plugin.load(tmp_path / "missing")
    (tmp_path / "p" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(DLPLoRAError, match="weights"):
        Plugin.load(tmp_path / "p")


def test_bad_inputs(small_plugin):
    with pytest.raises(DLPLoRAError, match="empty"):
        small_plugin.route(["fine", "   "])
    with pytest.raises(DLPLoRAError, match="empty"):
        small_plugin.probs([""])
    with pytest.raises(DLPLoRAError, match="top-p"):
        small_plugin.route(["x y"], p=0)
    with pytest.raises(DLPLoRAError, match="top-k"):
        small_plugin.route(["x y"], top_k=0)
    with pytest.raises(DLPLoRAError, match="unknown weighting"):
        small_plugin.route(["x y"], weighting="max")
    with pytest.raises(DLPLoRAError, match="none"):
        Plugin.train(["a b"], ["a"], [])
    with pytest.raises(DLPLoRAError, match="at least 2"):
        Plugin.train(["a b", "c d"], ["a", "a"], ["a"])
    with pytest.raises(DLPLoRAError, match="duplicate adapter names: a"):
        Plugin.train(["a b", "c d"], ["a", "b"], ["a", "b", "a"])
    with pytest.raises(DLPLoRAError, match="no training prompts for adapter"):
        Plugin.train(["a b", "c d"], ["a", "a"], ["a", "b"])
    with pytest.raises(DLPLoRAError, match="not one of the adapter names"):
        Plugin.train(["a b", "c d"], ["a", "z"], ["a", "b"])


def test_bench_routing_reports_ms(small_plugin):
    res = bench_routing(small_plugin, _texts("maths", 64, seed=3), batch_size=32, repeats=2)
    assert 0 < res["ms_per_prompt"] < 1000 and res["prompts"] == 64  # a sanity bound, not a speed claim


# ---------------------------------------------------------------- from prepared data + CLI

def _prepared(tmp_path):
    from dlplora.testing import write_prepared

    data = tmp_path / "data"
    # tasks with different wording (the tiny_examples of two tasks differ only by their prefix)
    from dlplora.testing import tiny_examples

    a = tiny_examples("winowhy", 60, kind="mcq", seed=1)
    b = tiny_examples("gsm8k", 60, kind="qa", seed=2)
    c = tiny_examples("alpaca", 60, kind="qa", seed=3)
    for r in c:
        r["input"] = "Write a short poem about " + r["input"].lower()
        r["task_prefix"] = ""
    for name, rows in (("winowhy", a), ("gsm8k", b), ("alpaca", c)):
        write_prepared(data, name, rows[:50], rows[50:])
    return data


def test_train_plugin_from_data_report(tmp_path):
    data = _prepared(tmp_path)
    plugin, rep = train_plugin_from_data(data, ["winowhy", "gsm8k", "alpaca"], epochs=6, bits=12, dim=8,
                                         hidden=(32, 32, 16), batch_size=32)
    assert rep["tasks"] == 3 and rep["params"] == plugin.params
    assert set(rep["per_task"]) == {"winowhy", "gsm8k", "alpaca"}
    assert rep["accuracy"] == pytest.approx(sum(rep["per_task"].values()) / 3)
    assert rep["accuracy"] >= 0.9
    assert 0 <= rep["no_prefix_accuracy"] <= 1 and 0 <= rep["history_accuracy"] <= 1
    assert rep["train_examples"] > 150  # augmented copies were added
    with pytest.raises(DLPLoRAError, match="unknown task"):
        train_plugin_from_data(data, ["winowhy", "not_a_task"])


def test_cli_train_plugin_and_route_json(tmp_path, capsys, monkeypatch):
    from dlplora import cli, plugin as plugin_mod
    from dlplora.library import Library

    data = _prepared(tmp_path)
    real_train = plugin_mod.Plugin.train.__func__

    def small_train(cls, *a, **kw):  # keep the CLI test fast: a small table
        kw.update(bits=12, dim=8, hidden=(32, 32, 16), batch_size=32)
        return real_train(cls, *a, **kw)

    monkeypatch.setattr(plugin_mod.Plugin, "train", classmethod(small_train))
    lib_dir = tmp_path / "lib"
    lib = Library(lib_dir, {"format": 1, "base_model": {}, "data_dir": str(data),
                            "adapters": {"winowhy": {"path": "adapters/winowhy"}, "gsm8k": {"path": "adapters/gsm8k"},
                                         "alpaca": {"path": "adapters/alpaca"}}})
    lib.save()
    assert cli.main(["train-plugin", "--library", str(lib_dir), "--epochs", "6", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["tasks"] == 3 and 0.9 <= last["accuracy"] <= 1.0 and last["params"] > 0 and last["train_seconds"] > 0
    assert (lib_dir / "plugin" / "plugin.json").is_file()

    assert cli.main(["route", "--library", str(lib_dir), "--json", "--p", "0.6",
                     "Write a short poem about add 3 and 4.", "gsm8k sums.\nAdd 1 and 2."]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["adapters"][0] for r in last["routings"]] == ["alpaca", "gsm8k"]
    assert all(abs(sum(r["weights"]) - 1) < 1e-6 for r in last["routings"])

    assert cli.main(["route", "--library", str(lib_dir), "--top-k", "0", "hi"]) == 2
    assert "top-k" in capsys.readouterr().err
    assert cli.main(["route", "--library", str(lib_dir), "   "]) == 2
    assert "empty" in capsys.readouterr().err
    # the library changed: the plugin must be refused
    lib.manifest["adapters"]["winowhy_v2"] = {"path": "adapters/winowhy_v2"}
    lib.save()
    assert cli.main(["route", "--library", str(lib_dir), "hi there"]) == 2
    assert "retrain with `dlp-lora train-plugin --library LIB`" in capsys.readouterr().err


def test_cli_train_plugin_needs_labels(tmp_path, capsys):
    from dlplora import cli
    from dlplora.library import Library

    Library(tmp_path / "empty", {"format": 1, "adapters": {}}).save()
    assert cli.main(["train-plugin", "--library", str(tmp_path / "empty"), "--data", str(tmp_path)]) == 2
    assert "no adapters" in capsys.readouterr().err
    assert cli.main(["train-plugin", "--data", str(tmp_path)]) == 2
    assert "--tasks" in capsys.readouterr().err
