"""The DLP plugin: selection semantics, training on synthetic prompts, persistence, errors, CLI."""

from __future__ import annotations

import json
import math
import tempfile

import numpy as np
import pytest

from dlplora.errors import DLPLoRAError
from dlplora.plugin import (VIEWS, HashedNgramTokenizer, Plugin, Routing, bench_routing, render_view, select,
                            train_plugin_from_data)

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
    head, tail = 0, 1
    assert seg(a, a.slots[1, head]) == seg(b, b.slots[0, head]) and seg(a, a.slots[1, tail]) == seg(b, b.slots[0, tail])
    assert a.slots[0, head] == a.slots[0, tail]  # short text: one segment
    assert a.slots[1, head] != a.slots[1, tail]  # long text: head and tail segments
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
    assert np.array_equal(whole.ids, chunked.ids) and np.array_equal(whole.slots, chunked.slots)
    assert np.array_equal(whole.offsets, chunked.offsets)


def test_tokenizer_turns_and_nul_bytes():
    from dlplora.config import TURN_SEPARATOR

    tok = HashedNgramTokenizer(bits=14, history_bytes=64)
    assert tok.slots == ("head", "tail", "history")
    f = tok.encode(["what is two plus two", "a previous turn" + TURN_SEPARATOR + "what is two plus two"])
    seg = lambda s: f.ids[f.offsets[s]: f.offsets[s] + f.counts[s]].tolist()  # noqa: E731
    # the current turn is cut from the text after the last separator; history has its own slot
    assert seg(f.slots[0, 0]) == seg(f.slots[1, 0]) and f.counts[f.slots[0, 2]] == 0
    assert f.counts[f.slots[1, 2]] > 0 and seg(f.slots[1, 2]) != seg(f.slots[1, 0])
    # a NUL inside a prompt is text, not a segment break (it used to crash the featuriser)
    g = tok.encode(["hi\u0000there", "a\u0000", "\u0000\u0000x"])
    assert len(g) == 3 and g.slots.shape == (3, 3)


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
    assert cfg["encoder"]["tokenizer"]["bits"] == 12 and cfg["default_p"] == 0.6 and cfg["format"] == 2
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
                                         hidden=(32, 32, 16), batch_size=32, background=None)
    assert rep["tasks"] == 3 and rep["params"] == plugin.params
    assert set(rep["per_task"]) == {"winowhy", "gsm8k", "alpaca"}
    assert rep["accuracy"] == pytest.approx(sum(rep["per_task"].values()) / 3)
    assert rep["accuracy"] >= 0.9
    assert set(rep["views"]) == set(VIEWS) and rep["views"]["rendered"] == rep["accuracy"]
    assert rep["views"]["input_only"] >= 0.8 and rep["none_class"] is False
    assert rep["train_examples"] > 250  # every prompt plus two augmented views
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
    assert cli.main(["train-plugin", "--library", str(lib_dir), "--epochs", "6", "--json", "--background", "none",
                     "--ood-draws", "0"]) == 0
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
    # the library changed: the stale router routes among the adapters it knows (tests/test_mixed_library.py)
    lib.manifest["adapters"]["winowhy_v2"] = {"path": "adapters/winowhy_v2"}
    lib.save()
    assert cli.main(["route", "--library", str(lib_dir), "hi there"]) == 0


def test_cli_train_plugin_needs_labels(tmp_path, capsys):
    from dlplora import cli
    from dlplora.library import Library

    Library(tmp_path / "empty", {"format": 1, "adapters": {}}).save()
    assert cli.main(["train-plugin", "--library", str(tmp_path / "empty"), "--data", str(tmp_path)]) == 2
    assert "no adapters" in capsys.readouterr().err
    assert cli.main(["train-plugin", "--data", str(tmp_path)]) == 2
    assert "--tasks" in capsys.readouterr().err


# ---------------------------------------------------------------- views

MCQ_ROW = {"input": "Nalo enoni paimbo.", "task_prefix": "Given a sentence, select the correct language.\n",
           "input_prefix": "\nSentence: ", "output_prefix": "\nLanguage: ", "choices": ["Tol", "Basque"],
           "target": "Tol"}


def test_views_drop_the_scaffolding_they_name():
    import random

    from dlplora.config import TURN_SEPARATOR
    from dlplora.plugin.views import augment, compose
    from dlplora.tasks import user_message

    rng = random.Random(0)
    v = {name: render_view(MCQ_ROW, name, rng, other_turn="Translate this.") for name in VIEWS}
    assert v["rendered"] == user_message(MCQ_ROW) == compose(MCQ_ROW)
    assert "Given a sentence" not in v["no_task_prefix"] and "choice: Tol" in v["no_task_prefix"]
    assert "choice:" not in v["no_choices"] and "Language:" in v["no_choices"]
    assert "Sentence:" not in v["no_io_prefixes"] and "Language:" not in v["no_io_prefixes"]
    assert "choice: Basque" in v["no_io_prefixes"]
    assert v["input_only"] == "Nalo enoni paimbo."
    assert v["rendered"].startswith(v["first_half"]) and len(v["first_half"]) < len(v["rendered"])
    assert v["history"] == "Translate this." + TURN_SEPARATOR + v["rendered"]
    assert v["noise"] != v["rendered"] or render_view(MCQ_ROW, "noise", random.Random(1)) != v["rendered"]
    with pytest.raises(ValueError, match="unknown view"):
        render_view(MCQ_ROW, "sideways", rng)
    # augmentation is deterministic for a seed and never empty
    a = [augment(MCQ_ROW, random.Random(3), "x") for _ in range(2)]
    assert a[0] == a[1] and all(t.strip() for t in (augment(MCQ_ROW, random.Random(i)) for i in range(50)))


# ---------------------------------------------------------------- "none of these": the base model

def _vocab_rows(words, n, seed, prefix=""):
    rng = np.random.default_rng(seed)
    return [{"input": " ".join(rng.choice(words, size=8)) + f" case {i}", "task_prefix": prefix, "input_prefix": "",
             "output_prefix": "", "choices": None, "target": "x"} for i in range(n)]


BACKGROUND = ("weather", "rain", "football", "goal", "guitar", "song", "forest", "river", "train", "ticket")


def test_none_class_and_detector_send_unrelated_prompts_to_base():
    from dlplora.plugin import calibrate_base_threshold
    from dlplora.plugin.train import build_training_set

    rows = {t: _vocab_rows(w, 40, len(t)) for t, w in _VOCAB.items()}
    background = [" ".join(np.random.default_rng(i).choice(BACKGROUND, size=8)) for i in range(80)]
    texts, labels = build_training_set(rows, n_views=1, background=background)
    assert labels.count(None) == 2 * len(background)
    pl = Plugin.train(texts, labels, list(_VOCAB), epochs=8, batch_size=32, bits=12, dim=8, hidden=(32, 32, 16))
    assert pl.none_class and pl.probs(["add seven"]).shape == (1, 3) and pl.full_probs(["add seven"]).shape == (1, 4)
    assert np.allclose(pl.probs(["add seven", "rain song"]).sum(1), 1.0, atol=1e-5)
    assert pl.base_threshold is None and all(pl.route(background[:5], top_k=1))  # no detector yet
    held_in = [r["input"] for t in _VOCAB for r in _vocab_rows(_VOCAB[t], 10, 99 + len(t))]
    fit_texts = [r["input"] for t in _VOCAB for r in rows[t]]
    fit_labels = [t for t in _VOCAB for _ in rows[t]]
    thr = calibrate_base_threshold(pl, fit_texts, fit_labels, held_in, false_rate=0.0)
    assert thr > 0 and pl.config["base_threshold"] == thr and pl.config["base_detector"] == "mahalanobis"
    _, dist = pl.scores(held_in)
    assert dist.max() == pytest.approx(thr)  # false rate 0: the farthest held-back prompt sets the threshold
    unrelated = [" ".join(np.random.default_rng(500 + i).choice(BACKGROUND, size=8)) for i in range(20)]
    routed = pl.route(unrelated)
    assert sum(not r for r in routed) >= 18
    r = next(r for r in routed if not r)
    assert r.names == [] and "none of the adapters' tasks" in r.base_reason and r.p_none > 0.5
    assert all(pl.route(held_in))  # every in-library prompt keeps an adapter
    assert pl.predict(unrelated[:1], base="<base>") == ["<base>"] and pl.predict(held_in[:1], base="<base>") != ["<base>"]
    assert pl.route(unrelated[:1], base_threshold=math.inf)[0].names  # the check can be turned off
    with pytest.raises(DLPLoRAError, match="base threshold"):
        pl.route(["rain"], base_threshold=-1)
    floor = pl.route(["add seven plus twelve"], floor=1.0)[0]
    assert floor.names == [] and "below the floor" in floor.base_reason
    # the detector's statistics travel with the plugin
    with tempfile.TemporaryDirectory() as d:
        pl.save(d)
        loaded = Plugin.load(d)
        assert loaded.base_threshold == thr and [bool(x) for x in loaded.route(unrelated)] == [bool(x) for x in routed]


def test_leave_out_measures_prompts_of_held_out_tasks(tmp_path):
    from dlplora.plugin import leave_out
    from dlplora.plugin import fit

    vocab = dict(_VOCAB, music=("guitar", "song", "drum", "melody", "chord", "piano", "violin", "choir"),
                 sport=("football", "goal", "match", "referee", "score", "team", "league", "coach"))
    train = {t: _vocab_rows(w, 30, len(t)) for t, w in vocab.items()}
    test = {t: _vocab_rows(w, 10, 50 + len(t)) for t, w in vocab.items()}
    background = [" ".join(np.random.default_rng(i).choice(BACKGROUND + ("cloud", "snow"), size=8))
                  for i in range(60)]

    def train_fn(tr, _te):
        return fit(tr, background=background, n_views=1, epochs=8, batch_size=32, bits=12, dim=8,
                   hidden=(32, 32, 16))

    res = leave_out(train, test, draws=2, k=1, seed=0, train_fn=train_fn)
    assert len(res["draws"]) == 2 and all(len(d["held_out"]) == 1 for d in res["draws"])
    for d in res["draws"]:
        assert d["in_library"] <= d["in_library_argmax"]
        assert d["in_library_loss_points"] == pytest.approx(100 * (d["in_library_argmax"] - d["in_library"]), abs=1e-3)
    assert res["in_library"] >= 0.9
    with pytest.raises(DLPLoRAError, match="needs at least"):
        leave_out(train, test, k=4, train_fn=train_fn)


def test_format_1_plugins_still_load(small_plugin, tmp_path):
    """Plugins saved before the views/none-class change (format 1: head/tail hashed features)."""
    texts, labels = [], []
    for t in _VOCAB:
        xs = _texts(t, 20, seed=len(t))
        texts += xs
        labels += [t] * len(xs)
    old = Plugin.train(texts, labels, list(_VOCAB), epochs=4, batch_size=32, bits=12, dim=8, hidden=(32, 32, 16),
                       history_bytes=0)
    old.save(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "plugin.json").read_text())
    enc = cfg.pop("encoder")
    tok = enc["tokenizer"]
    for k in ("body_bytes", "history_bytes", "turns"):
        tok.pop(k)
    cfg.update(format=1, tokenizer=tok, model={"kind": "hashed-bag-mlp", "dim": 8, "hidden": [32, 32, 16],
                                               "dropout": 0.1})
    cfg.pop("none_class")
    (tmp_path / "old" / "plugin.json").write_text(json.dumps(cfg))
    loaded = Plugin.load(tmp_path / "old", expected_labels=list(_VOCAB))
    assert np.allclose(loaded.probs(texts[:5]), old.probs(texts[:5]), atol=1e-6) and not loaded.none_class


def test_background_file_is_read_and_checked(tmp_path):
    from dlplora.background import render_example, read_background

    p = tmp_path / "bg.jsonl"
    p.write_text('{"text": "line one\u2028still one", "task": "other/sub"}\n{"input": "two", "task": "mine"}\n')
    rows = read_background(p, exclude_tasks=["mine"])
    assert [r["text"] for r in rows] == ["line one\u2028still one"]
    p.write_text('{"text": ""}\n')
    with pytest.raises(DLPLoRAError, match="non-empty"):
        read_background(p)
    p.write_text('{"text": "a"\n')
    with pytest.raises(DLPLoRAError, match="not valid JSON"):
        read_background(p)
    with pytest.raises(DLPLoRAError, match="does not exist"):
        read_background(tmp_path / "nope.jsonl")
    text = render_example({"task_prefix": "Pick one.\n"}, {"input": "2+2", "target_scores": {"4": 1, "5": 0}})
    assert text == "Pick one.\n\nQ: 2+2\n  choice: 4\n  choice: 5\nA:"


def test_train_plugin_from_data_with_background_and_leave_out(tmp_path, capsys):
    """Five tasks, a background file: the report has every view, the leave-3-out figures, and the
    CLI's `bench routing` reproduces the saved plugin's table."""
    from dlplora import cli
    from dlplora.testing import write_prepared

    vocab = dict(_VOCAB, music=("guitar", "song", "drum", "melody", "chord", "piano", "violin", "choir"),
                 sport=("football", "goal", "match", "referee", "score", "team", "league", "coach"))
    data = tmp_path / "data"
    for i, (t, w) in enumerate(vocab.items()):
        rows = _vocab_rows(w, 40, i, prefix=f"Task {t}: ")
        write_prepared(data, t, rows[:30], rows[30:])
    bg = tmp_path / "bg.jsonl"
    bg.write_text("".join(json.dumps({"text": " ".join(np.random.default_rng(i).choice(BACKGROUND, size=8))}) + "\n"
                          for i in range(60)))
    small = dict(epochs=8, bits=12, dim=8, hidden=(32, 32, 16), batch_size=32)
    plugin, rep = train_plugin_from_data(data, list(vocab), background=str(bg), ood_draws=1, **small)
    assert plugin.none_class and rep["background_prompts"] == 60 and set(rep["views"]) == set(VIEWS)
    assert rep["accuracy"] >= 0.9 and 0.0 <= rep["ood_to_base"] <= 1.0
    assert len(rep["leave_out"]["draws"]) == 1 and len(rep["leave_out"]["draws"][0]["held_out"]) == 3
    plugin.save(tmp_path / "plugin")
    assert cli.main(["bench", "routing", "--plugin", str(tmp_path / "plugin"), "--data", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["views"] == pytest.approx(rep["views"]) and out["routing_ms_per_prompt"] > 0
    assert cli.main(["bench", "routing", "--plugin", str(tmp_path / "plugin")]) == 2
    assert "--data" in capsys.readouterr().err


def test_backbone_encoder_trains_and_round_trips(tiny_model, tmp_path):
    """The frozen-backbone-embedding encoder (the comparison option): shapes, turns, training, load."""
    from dlplora.config import TURN_SEPARATOR
    from dlplora.plugin.encoders import BackboneEncoder

    enc = BackboneEncoder(str(tiny_model))
    x = enc.encode(["add seven", "earlier turn" + TURN_SEPARATOR + "add seven"])
    d = enc.table.shape[1]
    assert x.shape == (2, enc.out_dim) and enc.out_dim == 4 * d
    assert torch_allclose(x[0, :3 * d], x[1, :3 * d]) and float(x[0, 3 * d:].abs().sum()) == 0.0
    assert float(x[1, 3 * d:].abs().sum()) > 0  # the history window
    texts, labels = [], []
    for t in _VOCAB:
        xs = _texts(t, 30, seed=len(t))
        texts += xs
        labels += [t] * len(xs)
    pl = Plugin.train(texts, labels, list(_VOCAB), epochs=20, batch_size=16, hidden=(32, 32, 16), encoder="backbone",
                      model=str(tiny_model))
    held = {t: _texts(t, 10, seed=100 + len(t)) for t in _VOCAB}
    acc = np.mean([p == t for t, xs in held.items() for p in pl.predict(xs)])
    assert acc >= 0.9 and pl.config["encoder"]["kind"] == "backbone" and "emb.weight" not in pl.net.state_dict()
    pl.save(tmp_path / "bb")
    loaded = Plugin.load(tmp_path / "bb", expected_labels=list(_VOCAB))
    assert np.allclose(loaded.probs(texts[:4]), pl.probs(texts[:4]), atol=1e-6)


def torch_allclose(a, b):
    import torch

    return bool(torch.allclose(a, b, atol=1e-6))
