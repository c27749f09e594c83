"""The router's own-words evaluation set (src/dlplora/plugin/own_words.jsonl) and the operator's control of the
base-model decision (--base-threshold / --no-base-fallback, /v1/models)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from dlplora.errors import DLPLoRAError
from dlplora.plugin.evaluate import OWN_WORDS, evaluate_own_words, load_own_words
from dlplora.tasks import SAMPLE_SIZE, SPLIT_SEED, TASKS

ROWS = load_own_words()


def _sampled(n_source: int) -> list[int]:
    """The indices `dlplora.tasks.split_examples` samples from a task of n_source examples (test split first)."""
    return random.Random(SPLIT_SEED).sample(range(n_source), min(SAMPLE_SIZE, n_source))


def test_own_words_set_covers_every_task_and_says_where_each_prompt_comes_from():
    assert OWN_WORDS.is_file() and len(ROWS) >= 500
    count = Counter(r["task"] for r in ROWS)
    assert set(count) == set(TASKS) and min(count.values()) >= 10
    kinds = Counter(r["source"].split(":", 1)[0] for r in ROWS)
    assert set(kinds) == {"bigbench-unsampled", "gsm8k-train", "test-split"}
    assert all(r["text"].strip() and len(r["input_sha1"]) == 16 for r in ROWS)
    assert len({r["text"] for r in ROWS}) == len(ROWS)


def test_own_words_prompts_are_outside_the_training_split():
    """BIG-bench rows are examples the split never samples; test-split rows are in the sampled test split; the
    GSM8K rows come from GSM8K's train file, while the gsm8k task samples its test file."""
    for r in ROWS:
        kind, where = r["source"].split(":", 1)
        if kind == "bigbench-unsampled":
            task, idx = where.rsplit("#", 1)
            assert TASKS[task].source == "bigbench" and r["n_source"] > SAMPLE_SIZE
            assert int(idx) not in set(_sampled(r["n_source"])), r["source"]
        elif kind == "test-split":
            task, idx = where.rsplit("-", 1)
            sample = _sampled(r["n_source"])
            n_test = max(1, round(len(sample) / 10))
            assert int(idx) in sample[:n_test] and int(idx) not in sample[n_test:], r["source"]
        else:
            assert r["task"] == "gsm8k" and "grade_school_math/data/train.jsonl" in where


def _prepared_dir() -> Path | None:
    d = Path(os.environ.get("DLP_LORA_TEST_DATA", "/work/data"))
    return d if (d / "gsm8k" / "train.jsonl").is_file() else None


@pytest.mark.skipif(_prepared_dir() is None, reason="no prepared 26-task data (set DLP_LORA_TEST_DATA)")
def test_own_words_inputs_match_no_training_prompt():
    """Against the prepared data itself: no own-words input is any task's training input, and no own-words prompt
    is a training prompt as rendered."""
    from dlplora.plugin.views import compose
    from dlplora.tasks import load_split

    data = _prepared_dir()
    digests, rendered = set(), set()
    for t in TASKS:
        for ex in load_split(data, t, "train"):
            digests.add(hashlib.sha1(" ".join(ex["input"].split()).lower().encode()).hexdigest()[:16])
            rendered.add(compose(ex))
    assert not [r["source"] for r in ROWS if r["input_sha1"] in digests]
    assert not [r["source"] for r in ROWS if r["text"].strip() in rendered]


def test_evaluate_own_words_scores_the_plugin_s_tasks_only():
    class Fixed:  # routes everything to winowhy; sends prompts mentioning "Italian" to base
        labels = ["winowhy", "gsm8k"]

        def decide(self, texts):
            import numpy as np

            return ["winowhy"] * len(texts), np.array(["Ital" in t for t in texts])

    rows = [{"task": "winowhy", "text": "a", "source": "x:1"}, {"task": "winowhy", "text": "Italian b", "source": "x:2"},
            {"task": "gsm8k", "text": "c", "source": "y:3"}, {"task": "alpaca", "text": "d", "source": "y:4"}]
    res = evaluate_own_words(Fixed(), rows)
    assert res["n"] == 3 and res["tasks"] == 2
    assert res["per_task"] == {"winowhy": 0.5, "gsm8k": 0.0} and res["accuracy"] == 0.25
    assert res["adapters_only"] == 0.5 and res["to_base"] == pytest.approx(1 / 3)
    assert res["sources"] == {"x": 2, "y": 1}
    Fixed.labels = ["alpaca_x", "other"]
    assert evaluate_own_words(Fixed(), rows) is None
    assert not math.isnan(res["accuracy"])


# ---------------------------------------------------------------- the operator's control of the base decision

WORDS = {"alpha": ("add", "sum", "plus", "number", "total", "seven"),
         "beta": ("bonjour", "maison", "voiture", "chat", "pomme", "rouge")}
OTHER = ("weather", "rain", "football", "goal", "guitar", "song", "forest", "river")
FOREIGN = "weather rain football goal song river"


@pytest.fixture(scope="module")
def word_lib(tmp_path_factory, tiny_model):
    from dlplora.testing import random_peft_library
    from wordplugin import train_word_plugin

    root = tmp_path_factory.mktemp("basectl")
    lib = random_peft_library(root / "lib", tiny_model, {"alpha": (4, 8, ["q_proj"]), "beta": (4, 8, ["q_proj"])},
                              std=0.5, seed=3)
    train_word_plugin(lib, WORDS, OTHER)
    return lib


def test_routing_config_and_flags_check_the_base_threshold(capsys):
    from dlplora.cli import main
    from dlplora.config import RoutingConfig
    from dlplora.errors import DLPLoRAError

    assert "base_threshold" not in RoutingConfig().selection()
    assert RoutingConfig(base_threshold=math.inf).selection()["base_threshold"] == math.inf
    for bad in (-1.0, "x", True, math.nan):
        with pytest.raises(DLPLoRAError, match="base threshold"):
            RoutingConfig(base_threshold=bad)
    assert main(["route", "--plugin", "/nonexistent", "--base-threshold", "2", "--no-base-fallback", "hi"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["route", "--plugin", "/nonexistent", "--base-threshold", "-3", "hi"]) == 2
    assert "base threshold must be a number >= 0" in capsys.readouterr().err
    for cmd in (["generate", "x"], ["chat"], ["serve"], ["eval", "--library", "L"], ["bench", "routing"]):
        with pytest.raises(SystemExit):
            main(cmd + ["--help"])
        out = capsys.readouterr().out
        assert "--base-threshold" in out and "--no-base-fallback" in out, cmd


def test_route_cli_base_threshold_and_no_fallback(word_lib, capsys):
    from dlplora.cli import main

    assert main(["route", "--library", str(word_lib), "--json", FOREIGN, "add sum plus number"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    calibrated = out["calibrated_base_threshold"]
    assert out["base_threshold"] == calibrated and calibrated > 0
    assert out["routings"][0]["adapters"] == [] and "over the calibrated" in out["routings"][0]["base_reason"]
    assert out["routings"][1]["adapters"][0] == "alpha"
    # off: the foreign prompt gets an adapter; no reason
    assert main(["route", "--library", str(word_lib), "--json", "--no-base-fallback", FOREIGN]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["base_threshold"] is None and out["routings"][0]["adapters"] and out["routings"][0]["base_reason"] is None
    # 0: every prompt to base, and the reason names the operator's threshold
    assert main(["route", "--library", str(word_lib), "--json", "--base-threshold", "0", "add sum plus number"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["base_threshold"] == 0 and out["routings"][0]["adapters"] == []
    assert "over the operator's threshold 0.0" in out["routings"][0]["base_reason"]


def test_server_shows_the_threshold_in_use_and_keeps_the_reason(word_lib):
    import httpx

    from dlplora.config import RoutingConfig
    from dlplora.engine import DLPLoRA
    from dlplora.serve import ServeConfig, ServerThread, create_app

    def served(routing):
        engine = DLPLoRA.from_library(word_lib, routing=routing)
        return ServerThread(create_app(engine, ServeConfig(max_batch_size=4, max_tokens_limit=8)))

    chat = {"model": "dlp-lora", "messages": [{"role": "user", "content": FOREIGN}], "max_tokens": 2}
    with served(None) as srv:
        http = httpx.Client(base_url=srv.url, timeout=60)
        router = http.get("/v1/models").json()["router"]
        assert router["set_by"] == "plugin" and router["base_fallback"] is True
        assert router["base_threshold"] == router["calibrated"] > 0
        r = http.post("/v1/chat/completions", json=chat).json()["routing"]
        assert r["base_model"] is True and "over the calibrated" in r["base_reason"]
    with served(RoutingConfig(base_threshold=math.inf)) as srv:
        http = httpx.Client(base_url=srv.url, timeout=60)
        router = http.get("/v1/models").json()["router"]
        assert router == {"base_threshold": None, "calibrated": router["calibrated"], "base_fallback": False,
                          "set_by": "operator", "detector": "mahalanobis"}
        r = http.post("/v1/chat/completions", json=chat).json()["routing"]
        assert r["adapters"] and "base_model" not in r
    with served(RoutingConfig(base_threshold=0.0)) as srv:
        http = httpx.Client(base_url=srv.url, timeout=60)
        assert http.get("/v1/models").json()["router"]["base_threshold"] == 0.0
        chat["messages"][0]["content"] = "add sum plus number total"
        r = http.post("/v1/chat/completions", json=chat).json()["routing"]
        assert r["base_model"] is True and "operator's threshold 0.0" in r["base_reason"]


# ---------------------------------------------------------------- the hybrid encoder (an option, docs/plugin.md)

def test_hybrid_encoder_trains_retrains_and_round_trips(tiny_model, tmp_path):
    import numpy as np

    from dlplora.plugin import Plugin, retrain_settings

    texts, labels = [], []
    rng = random.Random(0)
    for name, bag in WORDS.items():
        for i in range(30):
            texts.append(" ".join(rng.choice(bag) for _ in range(6)) + f" case {i}")
            labels.append(name)
    pl = Plugin.train(texts, labels, list(WORDS), epochs=15, batch_size=16, bits=12, dim=8, hidden=(32, 16),
                      encoder="hybrid", model=str(tiny_model))
    assert pl.config["encoder"]["kind"] == "hybrid" and "emb.weight" in pl.net.state_dict()
    assert pl.encoder.out_dim == pl.encoder.hashed.out_dim + pl.encoder.backbone.out_dim
    assert pl.predict(["add sum plus seven", "bonjour maison rouge"]) == ["alpha", "beta"]
    pl.save(tmp_path / "hy")
    loaded = Plugin.load(tmp_path / "hy", expected_labels=list(WORDS))
    assert np.allclose(loaded.probs(texts[:4]), pl.probs(texts[:4]), atol=1e-6)
    settings = retrain_settings(loaded)
    assert settings["encoder"] == "hybrid" and settings["model"] == str(tiny_model) and settings["dim"] == 8


# ---------------------------------------------------------------- the logistic base score

BG_TOPICS = {f"topic{k}": words for k, words in enumerate(
    [("weather", "rain", "cloud"), ("football", "goal", "match"), ("guitar", "song", "chord"), ("forest", "river", "tree"),
     ("train", "ticket", "station"), ("doctor", "fever", "pill"), ("poem", "rhyme", "verse"), ("stock", "market", "bond"),
     ("moon", "star", "orbit"), ("bread", "oven", "flour"), ("chess", "pawn", "rook"), ("paint", "brush", "canvas")])}


def _rows(bag, n, seed):
    r = random.Random(seed)
    return [{"input": " ".join(r.choice(bag) for _ in range(7)) + f" case {i}", "task_prefix": "", "input_prefix": "",
             "output_prefix": "", "choices": None, "target": "x"} for i in range(n)]


def test_fit_holds_out_background_tasks_and_fits_the_logistic_score(tmp_path):
    import numpy as np

    from dlplora.plugin import Plugin, fit, split_background

    bg = [{"task": f"{t}/sub", "text": " ".join(random.Random(i).choice(w) for _ in range(7))}
          for t, w in BG_TOPICS.items() for i in range(12)]
    train_texts, foreign = split_background(bg, seed=0)
    assert len(foreign) == 2 * 12 and len(train_texts) == 10 * 12  # 2 of the 12 tasks, whole
    held_tasks = {r["task"] for r in bg if r["text"] in set(foreign)}
    assert not {r["text"] for r in bg if r["task"] in held_tasks} & set(train_texts)
    assert split_background(bg[:50], seed=0)[1] == []  # under 10 tasks: nothing held out

    rows = {name: _rows(bag, 60, k) for k, (name, bag) in enumerate(WORDS.items())}
    pl = fit(rows, background=bg, n_views=1, epochs=8, batch_size=32, bits=12, dim=8, hidden=(32, 16))
    cfg = pl.config
    assert cfg["base_detector"] == "mahalanobis+logistic" and 0 < cfg["base_threshold"] < 1
    assert cfg["training"]["background_held_out"] == 24 and cfg["base_score"]["foreign_prompts"] == 24
    assert cfg["base_score"]["weights"][0] > 0  # farther from the adapters' prompts: more foreign
    _, score = pl.scores(["add sum plus seven", "weather rain cloud goal"])
    assert ((score >= 0) & (score <= 1)).all() and score[1] > score[0]
    r = pl.route(["rain cloud weather rain cloud"])[0]
    assert r.names == [] and "out-of-library score" in r.base_reason and "over the calibrated" in r.base_reason
    pl.save(tmp_path / "p")
    loaded = Plugin.load(tmp_path / "p")
    assert np.allclose(loaded.scores(["add sum", "rain"])[1], pl.scores(["add sum", "rain"])[1])


def test_the_cost_threshold_minimises_the_expected_loss_and_ties_go_to_fewer_base_answers():
    import numpy as np

    from dlplora.plugin.train import cost_threshold

    inside = np.array([0.1] * 90 + [0.9] * 10)
    foreign = np.array([0.2] * 50 + [0.95] * 50)
    t, got = cost_threshold(inside, foreign, (1.0, 1.0, 0.5))
    assert t == 0.1 and abs(got["in_library_to_base"] - 0.1) < 1e-12 and got["foreign_to_base"] == 1.0
    assert abs(got["expected_loss"] - 0.05) < 1e-12
    t, got = cost_threshold(inside, foreign, (10.0, 0.0, 0.5))  # a foreign prompt on an adapter costs nothing
    assert t == float("inf") and got["in_library_to_base"] == 0.0 and got["foreign_to_base"] == 0.0
    t, got = cost_threshold(inside, foreign, (1.0, 3.0, 0.5))  # foreign prompts cost more: the 0.9s go to base too
    assert t == 0.1
    t, got = cost_threshold(inside, foreign, (1.0, 0.1, 0.5))  # only the clearly foreign 0.95s go to base
    assert t == 0.9 and got["foreign_to_base"] == 0.5


@pytest.mark.parametrize("value, message", [("8.9", "MISS,FOREIGN"), ("a,b", "MISS,FOREIGN"), ("1,-2", "MISS,FOREIGN"),
                                            ("1,2,1", "share"), ("1,2,0", "share"), ("0,0", "both costs are 0"),
                                            ("1,inf", "MISS,FOREIGN")])
def test_base_cost_values_are_checked(value, message):
    from dlplora.config import parse_base_cost

    with pytest.raises(DLPLoRAError, match=message):
        parse_base_cost(value)
    assert parse_base_cost("8.9,1") == (8.9, 1.0, 0.5) and parse_base_cost(" 8.9, 1, 0.3") == (8.9, 1.0, 0.3)


def test_a_cost_threshold_without_foreign_prompts_is_refused(tiny_data):
    from dlplora.plugin import train_plugin_from_data

    with pytest.raises(DLPLoRAError, match="cost-based base threshold needs held-back prompts and foreign prompts"):
        train_plugin_from_data(tiny_data, ["quiz", "sums"], background="none", robustness=False,
                               base_cost=(8.9, 1.0, 0.5))
