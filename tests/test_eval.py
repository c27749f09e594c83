"""The evaluation harness: metric functions, label hiding in the composite stream, the settings x methods
grid end to end on a tiny random model, and resuming from the prediction cache."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dlplora.backbone import decoder_and_head
from dlplora.eval import cache, harness, metrics, report, runners, scoring, settings
from dlplora.errors import DLPLoRAError
from dlplora.tasks import user_message


def run_evaluation(library, *, engine=None, arrow=None, log=print, **fields):
    """The harness on an EvalConfig of `library` and the keyword fields."""
    return harness.run_evaluation(settings.EvalConfig(library, **fields), engine=engine, arrow=arrow, log=log)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- metric functions

def single_paired(res):
    return res["settings"]["single"]["paired"]


def test_exact_match_normalisation():
    assert metrics.normalize_answer("  The Answer: 42!\nmore text") == "answer 42"
    assert metrics.exact_match("An apple.", ["apple"]) == 1.0
    assert metrics.exact_match("three", ["3", "three"]) == 1.0
    assert metrics.exact_match("four", ["3", "three"]) == 0.0
    assert metrics.exact_match("yes", [None, "Yes"]) == 1.0


def test_rouge_on_a_tiny_pair():
    # prediction "the cat sat" vs reference "the cat sat down": unigram P = 3/3, R = 3/4 -> F1 = 6/7;
    # the LCS is 3 tokens, so ROUGE-L F1 is also 6/7
    r = metrics.rouge_scores(["the cat sat"], ["the cat sat down"])
    assert r["rouge1"] == pytest.approx(100 * 6 / 7)
    assert r["rougeL"] == pytest.approx(100 * 6 / 7)
    # reordered words: ROUGE-1 = 100, ROUGE-L < 100 (LCS 2 of 3: F1 = 2/3)
    r = metrics.rouge_scores(["cat the sat"], ["the cat sat"])
    assert r["rouge1"] == pytest.approx(100.0)
    assert r["rougeL"] == pytest.approx(100 * 2 / 3)


def test_bleu_identical_and_disjoint():
    s = "the quick brown fox jumps over the lazy dog"
    assert metrics.bleu_score([s], [s]) == pytest.approx(100.0)
    assert metrics.bleu_score(["alpha beta gamma delta"], [s]) == pytest.approx(0.0)


def test_gsm8k_answer_extraction():
    assert metrics.gsm8k_answer("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert metrics.gsm8k_answer("so the total is 1,234.") == "1234"
    assert metrics.gsm8k_answer("first 12 then 15") == "15"
    assert metrics.gsm8k_answer("#### -3.5") == "-3.5"
    assert metrics.gsm8k_answer("no number here") is None
    assert metrics.gsm8k_accuracy(["The answer is 7.", "#### 8", "none"], ["#### 7", "#### 9", "#### 1"]) == pytest.approx(1 / 3)


# ---------------------------------------------------------------- streams and conversations

def test_stream_and_conversations_are_mixed_and_deterministic():
    from dlplora.testing import tiny_examples

    exs = {"a": tiny_examples("a", 10, "mcq"), "b": tiny_examples("b", 10, "qa"), "c": tiny_examples("c", 10, "qa")}
    s1 = settings.build_stream(exs, ["a", "b", "c"], seed=3)
    assert [x["uid"] for x in s1] == [x["uid"] for x in settings.build_stream(exs, ["a", "b", "c"], seed=3)]
    assert len(s1) == 30 and len({x["uid"] for x in s1}) == 30
    assert [x["task"] for x in s1[:10]] != ["a"] * 10  # shuffled, not grouped by task
    convs = settings.build_conversations(exs, ["a", "b", "c"], turns=3, seed=0)
    assert len(convs) == 10
    for conv in convs:
        assert len({t["task"] for t in conv}) == 3  # three different tasks per conversation
    used = [t["uid"] for c in convs for t in c]
    assert len(used) == len(set(used))  # each example at most once
    assert settings.setting_tasks("composite-9", exs) == ["b", "c"] and settings.setting_tasks("composite-17", exs) == ["a"]


# ---------------------------------------------------------------- end to end on a tiny model

class RecordingRouter:
    """Wraps the real plugin; records every call so tests can check what a routing method sees."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def route(self, texts, **kw):
        self.calls.append(texts)
        return self.inner.route(texts, **kw)


@pytest.fixture(scope="module")
def tiny_library(tiny_model, tiny_data, tmp_path_factory):
    from dlplora.library import Library
    from dlplora.plugin import train_plugin_from_data
    from dlplora.train import TrainConfig, train_library

    lib = tmp_path_factory.mktemp("evlib") / "lib"
    train_library(["quiz", "sums"], tiny_data, lib, model=str(tiny_model),
                  cfg=TrainConfig(steps=2, batch_size=4, max_len=64), eval_limit=0, log=lambda *a: None)
    plugin, _ = train_plugin_from_data(tiny_data, ["quiz", "sums"], robustness=False)
    plugin.save(Library.open(lib).plugin_dir())
    from dlplora.train.multitask import train_multitask  # the multi-task baseline: a special adapter (issue 28)

    train_multitask(lib, tiny_data, cfg=TrainConfig(batch_size=4, max_len=64), examples=8, val_size=6,
                    model=str(tiny_model), log=lambda *a: None)
    return lib


@pytest.fixture(scope="module")
def models(tiny_library, tiny_model):
    from dlplora.engine import DLPLoRA
    from dlplora.library import Library

    engine = DLPLoRA.from_library(tiny_library, model=str(tiny_model))
    engine.router = RecordingRouter(engine.router)
    arrow = runners.build_arrow_model(Library.open(tiny_library), model=str(tiny_model))
    return engine, arrow


def test_harness_end_to_end_all_settings_and_methods(tiny_library, tiny_data, tiny_model, models, tmp_path):
    from dlplora.tasks import load_split

    engine, arrow = models
    engine.router.calls.clear()
    out = tmp_path / "out"
    logs = []
    res = run_evaluation(tiny_library, data=tiny_data, out=out, settings=list(settings.SETTINGS), methods=list(settings.METHODS),
                            teacher_forced=True, mcq_exact_match=True, model=str(tiny_model), progress=False,
                            engine=engine, arrow=arrow, log=logs.append)
    assert res["skipped"] == {}
    all_methods = {"base", "lora", "dlp", "dlp-renorm", "arrow", "merge-all", "ties", "multitask"}
    assert set(res["settings"]["single"]["methods"]) == {"base", "lora", "multitask"}
    for s in ("composite-26", "multiturn"):
        assert set(res["settings"][s]["methods"]) == all_methods
    for s in settings.SETTINGS:  # DLP-LoRA and the oracle against the multi-task adapter, paired, in every setting
        vs = res["settings"][s]["versus_multitask"]["multitask"]
        assert set(vs) == ({"lora"} if s == "single" else {"dlp", "lora"})
        for v in vs.values():
            assert v["ci"][0] <= v["diff"] + 1e-6 and v["diff"] - 1e-6 <= v["ci"][1]
    assert res["settings"]["composite-17"]["tasks"] == ["quiz"]
    assert res["settings"]["composite-9"]["tasks"] == ["sums"]
    c26 = res["settings"]["composite-26"]["methods"]
    for name, entry in c26.items():
        assert set(entry["tasks"]) == {"quiz", "sums"}
        q, s = entry["tasks"]["quiz"], entry["tasks"]["sums"]
        assert q["metric"] == "accuracy" and "exact_match" in q and q["n"] == 6
        correct = q["accuracy"] * q["n"] / 100  # a share of the 6 quiz prompts
        assert correct == pytest.approx(round(correct)) and 0 <= round(correct) <= 6
        assert s["metric"] == "rougeL" and {"bleu", "rouge1", "rougeL"} <= set(s)
        # the teacher-forced variant is scored for the paper's methods only
        assert ("teacher_forced" in s) == (name in ("base", "lora", "dlp", "dlp-renorm"))
        assert entry["mean"] == pytest.approx((q["main"] + s["main"]) / 2)
        assert entry["seconds"] > 0 and entry["items"] == 12
    for name in ("dlp", "dlp-renorm"):
        # the plugin tells the two tiny tasks apart: every prompt's most weighted adapter is its own task's
        assert c26[name]["router_accuracy"] == 100 and c26[name]["mean_adapters"] >= 1
    assert c26["dlp"]["weighting"] == "softmax" and c26["dlp-renorm"]["weighting"] == "renorm"
    mt = res["settings"]["multiturn"]
    assert mt["conversations"] >= 3 and len(mt["methods"]["dlp"]["per_turn"]) == 3
    assert mt["methods"]["lora"]["items"] == 3 * mt["conversations"]

    # the routing method only ever saw prompt text: strings equal to user messages of test examples,
    # in shuffled (mixed-task) order, never an example dict or a task name on its own
    tests = {t: load_split(tiny_data, t, "test") for t in ("quiz", "sums")}
    messages = {user_message(ex): t for t, exs in tests.items() for ex in exs}
    single_turn_calls = [c for c in engine.router.calls if all(x in messages for x in c)]
    assert single_turn_calls, "dlp routed no composite stream"
    for call in engine.router.calls:
        assert all(isinstance(x, str) for x in call)
        assert not any(x.strip() in ("quiz", "sums") for x in call)
    full = [c for c in single_turn_calls if len(c) == 12]  # the composite-26 stream
    assert full and {messages[x] for x in full[0]} == {"quiz", "sums"}
    assert [messages[x] for x in full[0]] != sorted(messages[x] for x in full[0])  # mixed, not grouped
    # multiturn routing texts carry the previous user turn (route window 1) and end with the current turn
    mt_calls = [c for c in engine.router.calls if not all(x in messages for x in c)]
    assert mt_calls and all(any(x.endswith(m) for m in messages) for c in mt_calls for x in c)

    # outputs
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["composite-26"]["methods"]["dlp"]["mean"] == pytest.approx(c26["dlp"]["mean"])
    md = (out / "RESULTS.md").read_text()
    assert "Table 1 style" in md and "Table 2 style" in md and "Teacher-forced" in md and "Arrow (PEFT)" in md
    assert "| `composite-26` | DLP-LoRA − multitask |" in md and "minus multitask (one LoRA on every task) mean" in md
    # per-example scores and intervals in every task result and mean; the single setting's paired LoRA vs base tests
    single = res["settings"]["single"]
    for m, e in single["methods"].items():
        q = e["tasks"]["quiz"]
        assert len(q["per_example"]["accuracy"]) == q["n"]
        assert sum(q["per_example"]["accuracy"]) / q["n"] == q["accuracy"]
        assert len(e["tasks"]["sums"]["per_example"]["rougeL"]) == 6 and "bleu" in e["tasks"]["sums"]["ci"]
        assert e["mean_ci"][0] <= e["mean"] + 1e-6 and e["mean"] - 1e-6 <= e["mean_ci"][1]
    assert set(single["paired"]) == {"quiz", "sums"} and all(0 < r["p"] <= 1 for r in single["paired"].values())
    assert "mean_ci" in mt["methods"]["dlp"]["per_turn"][0] and "LoRA vs base |" in md
    for s in settings.SETTINGS:
        assert (out / "figures" / f"{s}.png").stat().st_size > 1000

    # the single setting's base / LoRA scores are written back to the manifest (and do not invalidate the cache)
    from dlplora.library import Library

    man = Library.open(tiny_library).manifest["adapters"]
    single = res["settings"]["single"]["methods"]
    for t in ("quiz", "sums"):
        e = man[t]
        assert e["score"] == pytest.approx(single["lora"]["tasks"][t]["main"], abs=0.01)
        assert e["base_score"] == pytest.approx(single["base"]["tasks"][t]["main"], abs=0.01)
        assert e["n_test"] == single["lora"]["tasks"][t]["n"]
        assert e["interval"][0] <= e["score"] <= e["interval"][1]
        assert e["base_interval"][0] <= e["base_score"] <= e["base_interval"][1]
        assert 0 < e["p_value"] <= 1 and e["significant"] == single_paired(res)[t]["better"]
        assert e["beats_base"] == (e["score"] > e["base_score"]) and "eval --setting single" in e["score_detail"]["source"]

    # a second run resumes from the cache: no new prediction, same numbers
    engine.router.calls.clear()
    res2 = run_evaluation(tiny_library, data=tiny_data, out=out, settings=list(settings.SETTINGS), methods=list(settings.METHODS),
                             teacher_forced=True, mcq_exact_match=True, model=str(tiny_model), progress=False,
                             engine=engine, arrow=arrow, log=logs.append)
    assert res2["cache"]["new_predictions"] == 0 and res2["cache"]["hits"] > 0
    for s in settings.SETTINGS:
        for m, e in res["settings"][s]["methods"].items():
            assert res2["settings"][s]["methods"][m]["mean"] == pytest.approx(e["mean"])


def test_cache_survives_a_truncated_line_and_limit(tiny_library, tiny_data, tiny_model, models, tmp_path):
    engine, arrow = models
    out = tmp_path / "o"
    r1 = run_evaluation(tiny_library, data=tiny_data, out=out, settings=["composite-17"], methods=["base", "dlp"],
                           weightings=["softmax"], limit=2, model=str(tiny_model), progress=False, engine=engine,
                           log=lambda *a: None)
    assert r1["settings"]["composite-17"]["methods"]["base"]["tasks"]["quiz"]["n"] == 2
    assert set(r1["settings"]["composite-17"]["methods"]) == {"base", "dlp"}
    # by default a multiple-choice prompt is only ranked (no generated answer, no exact match)
    assert "exact_match" not in r1["settings"]["composite-17"]["methods"]["base"]["tasks"]["quiz"]
    assert r1["cache"]["new_predictions"] == 2 * 2  # 2 examples x 2 methods, ranking only
    with open(out / "cache" / "base.jsonl", "a") as fh:
        fh.write('{"k": "trunc')  # a crash mid-write
    r2 = run_evaluation(tiny_library, data=tiny_data, out=out, settings=["composite-17"], methods=["base", "dlp"],
                           weightings=["softmax"], limit=3, model=str(tiny_model), progress=False, engine=engine,
                           log=lambda *a: None)
    # two examples per method came from the cache; only the third example's predictions are new
    assert r2["cache"]["new_predictions"] == 2  # the third example's ranking x 2 methods


def test_a_retrained_plugin_keeps_the_predictions_it_routes_the_same(tiny_library, tiny_data, tiny_model, models,
                                                                     tmp_path):
    """The plugin is not in the cache key (the adapter set it picks is): a plugin saved again costs no prediction,
    of base or of DLP, where it routes as before."""
    import os

    from dlplora.library import Library

    engine, _ = models
    kw = dict(data=tiny_data, out=tmp_path / "o", settings=["composite-17"], methods=["base", "dlp"],
              weightings=["softmax"], limit=2, model=str(tiny_model), progress=False, engine=engine,
              log=lambda *a: None)
    r1 = run_evaluation(tiny_library, **kw)
    f = Library.open(tiny_library).plugin_dir() / "model.safetensors"
    st = f.stat()
    os.utime(f, (st.st_atime, st.st_mtime + 100))  # as if trained and saved again
    try:
        r2 = run_evaluation(tiny_library, **kw)
    finally:
        os.utime(f, (st.st_atime, st.st_mtime))
    assert r1["cache"]["new_predictions"] == 4 and r2["cache"]["new_predictions"] == 0


def test_label_hiding_with_a_fake_router(tiny_library, tiny_data, tiny_model, models, tmp_path):
    """A router that sees a task label would be cheating: the fake one fails the test if it gets anything
    but prompt text, and always picks 'quiz' so we can check the harness scores its choice."""
    engine, _ = models

    class Spy:
        seen = []

        def route(self, texts, **kw):
            from dlplora.plugin import Routing

            for t in texts:
                assert isinstance(t, str) and "'task'" not in t and '"task"' not in t
            self.seen += list(texts)
            return [Routing(["quiz"], [0], [1.0], [1.0]) for _ in texts]

    real = engine.router
    engine.router = Spy()
    try:
        r = run_evaluation(tiny_library, data=tiny_data, out=tmp_path / "o", settings=["composite-26"],
                              methods=["dlp"], weightings=["softmax"], model=str(tiny_model), progress=False,
                              engine=engine, log=lambda *a: None)
    finally:
        engine.router = real
    d = r["settings"]["composite-26"]["methods"]["dlp"]
    assert d["router_accuracy"] == pytest.approx(50.0)  # right for the 6 quiz prompts, wrong for the 6 sums
    assert d["mean_adapters"] == 1.0 and len(Spy.seen) == 12


def test_cli_eval_errors_and_json(tiny_library, tiny_data, tiny_model, tmp_path, capsys):
    from dlplora.cli import main

    assert main(["eval", "--library", str(tiny_library), "--data", str(tiny_data), "--setting", "bogus"]) == 2
    assert "unknown setting" in capsys.readouterr().err
    assert main(["eval", "--library", str(tiny_library), "--data", str(tiny_data), "--methods", "base,magic"]) == 2
    assert "unknown method" in capsys.readouterr().err
    rc = main(["eval", "--library", str(tiny_library), "--data", str(tiny_data), "--model", str(tiny_model),
               "--setting", "single", "--methods", "base,lora", "--limit", "2", "--out", str(tmp_path / "c"),
               "--json", "--no-progress"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["settings"]["single"]["methods"]) == {"base", "lora"}
    assert (tmp_path / "c" / "RESULTS.md").is_file()


def test_reproduce_cli_is_registered_and_command_line_hides_the_note():
    from dlplora.cli import build_parser
    from dlplora.cli.common import command_line

    args = build_parser().parse_args(["reproduce", "--extra-data", "x", "--limit", "3", "--steps", "2", "--tasks", "qa"])
    assert args.limit == 3 and args.steps == 2 and args.tasks == "qa" and args.out == os.path.join("runs", "reproduce") and args.setting == "all"
    assert command_line(["eval", "--library", "a b", "--note", "long\ntext", "--limit", "5"]) == \
        "dlp-lora eval --library 'a b' --note '...' --limit 5"


def test_p_sweep_reports_each_p_and_reuses_the_main_run(tiny_library, tiny_data, tiny_model, models, tmp_path):
    engine, _ = models
    out = tmp_path / "o"
    r = run_evaluation(tiny_library, data=tiny_data, out=out, settings=["composite-26"], methods=["lora", "dlp"],
                          weightings=["softmax", "renorm"], limit=2, p=0.6, p_sweep=[1.0, 0.2], model=str(tiny_model),
                          progress=False, engine=engine, log=lambda *a: None)
    sw = r["p_sweep"]
    assert sw["setting"] == "composite-26" and r["config"]["p_sweep"] == [0.2, 0.6, 1.0]
    assert [(x["weighting"], x["p"]) for x in sw["rows"]] == [(w, p) for w in ("softmax", "renorm") for p in (0.2, 0.6, 1.0)]
    main = r["settings"]["composite-26"]["methods"]
    by = {(x["method"], x["p"]): x for x in sw["rows"]}
    for name in ("dlp", "dlp-renorm"):  # the sweep's p=0.6 is the main run, from the cache
        assert by[(name, 0.6)]["mean"] == pytest.approx(main[name]["mean"])
        assert by[(name, 0.2)]["mean_adapters"] <= by[(name, 0.6)]["mean_adapters"] <= by[(name, 1.0)]["mean_adapters"]
    # p = 1 keeps every adapter; the paper's softmax of probabilities then flattens the weights towards uniform
    assert by[("dlp", 1.0)]["max_adapters"] == 2
    assert by[("dlp", 1.0)]["mean_top_weight"] <= by[("dlp-renorm", 1.0)]["mean_top_weight"] + 1e-9
    assert sw["lora_mean"] == pytest.approx(main["lora"]["mean"])
    assert "Effect of top-p" in (out / "RESULTS.md").read_text()
    with pytest.raises(DLPLoRAError, match="p-sweep"):
        settings.parse_p_values("0.5,1.5")
    with pytest.raises(DLPLoRAError, match="not a number"):
        settings.parse_p_values("0.5,x")


def test_claims_table_and_discussion_survive_a_rewrite(tmp_path):
    from dlplora.cli import main

    def entry(mean, seconds, **kw):
        return {"mean": mean, "seconds": seconds, "items": 4, "tasks": {"quiz": {"n": 4, "main": mean, "metric": "accuracy"}},
                **kw}

    res = {"config": {"plugin": {"report": {"accuracy": 0.99}}}, "settings": {"composite-26": {
        "tasks": ["quiz"], "methods": {"base": entry(40.0, 10.0), "lora": entry(60.0, 10.0),
                                       "dlp": entry(59.5, 13.0, router_accuracy=97.0, mean_adapters=1.2)}}}}
    md = report.format_results_md(res)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert rows["plugin routing accuracy, held-out training prompts of every task (%)"].endswith("| 99.00 | yes |")
    assert rows["router picks the true task, `composite-26` test stream (%)"].endswith("| 97.00 | no |")
    assert rows["DLP-LoRA mean minus oracle LoRA mean, `composite-26` (points)"].endswith("| -0.50 | no |")
    assert rows["DLP-LoRA time / oracle LoRA time, `composite-26`"].endswith("| 1.30x | yes |")
    assert rows["DLP-LoRA mean minus base mean, `composite-26` (points)"].endswith("| +19.50 | yes |")
    out = tmp_path / "docs"
    report.write_outputs(res, out, preamble="Made by a test.")
    (out / "discussion.md").write_text("Our words.")
    assert main(["report", str(out / "results.json")]) == 0
    text = (out / "RESULTS.md").read_text()
    assert text.index("Made by a test.") < text.index("## Discussion") < text.index("Our words.")
    (out / "bad.json").write_text("{")
    assert main(["report", str(out / "bad.json")]) == 2


def test_dlp_weightings_share_predictions_but_not_with_lora():
    assert cache.cache_namespace("dlp-renorm") == cache.cache_namespace("dlp") == "dlp"
    assert cache.cache_namespace("lora") == "lora" and cache.cache_namespace("base") == "base"


def test_a_methods_time_leaves_out_the_teacher_forced_scoring(tmp_path):
    """A method's "seconds" is the time of answering (ranking and generation); the teacher-forced scoring's time is
    kept apart, so a method timed with it compares with one timed without it."""

    class NoModel:  # every prediction comes from the cache: nothing may run
        tokenizer = None

    items = [{"uid": f"t/{i}", "task": "notes", "ex": {"input": f"note {i}", "target": "x"}, "history": []}
             for i in range(2)]
    pc = cache.PredictionCache(tmp_path)
    keys = [f"sig|base|{it['uid']}#{cache.content_tag(it)}" for it in items]
    pc.put_many("base", [{"k": f"{k}|gen|-", "v": "y", "s": 1.5} for k in keys]
                + [{"k": f"{k}|tf|-", "v": "x", "s": 4.0} for k in keys])
    with_tf = harness.run_method_items(NoModel(), "base", items, [{}, {}], pc, "sig", teacher_forced=True,
                                       progress=False)
    without = harness.run_method_items(NoModel(), "base", items, [{}, {}], pc, "sig", teacher_forced=False,
                                       progress=False)
    assert [p["seconds"] for p in with_tf] == [p["seconds"] for p in without] == [1.5, 1.5]
    assert [p["tf_seconds"] for p in with_tf] == [4.0, 4.0] and all("tf" not in p for p in without)
    assert pc.new == 4  # the records above; nothing computed


def _sequence_logprob_sums(model, encoded, pad_id):
    """Reference: each (token ids, start) scored as a whole sequence, no KV cache."""
    from dlplora.train.lora import collate

    ids, mask, rows, pos, tgt = collate(encoded, pad_id)
    body, head = decoder_and_head(model)
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    logp = torch.log_softmax(head(hidden[rows, pos]).float(), -1).gather(1, tgt[:, None])[:, 0]
    return torch.zeros(len(encoded)).index_add_(0, rows, logp)


def test_choice_scores_with_a_shared_prompt_equal_full_sequences(tiny_library, tiny_data, models):
    """The prompt runs once and each choice continues from its KV cache: the log-likelihoods must equal scoring
    every prompt + choice as its own sequence, row by row with each row's adapter set."""
    from dlplora.tasks import candidates, load_split

    engine, _ = models
    runner = runners.FusedRunner(engine)
    tok = runner.tokenizer
    exs = load_split(tiny_data, "quiz", "test")[:5]
    sets = [{}, {"quiz": 1.0}, {"sums": 1.0}, {"quiz": 0.7, "sums": 0.3}, {"quiz": 1.0}]
    hists = [[], [], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], [], []]
    got = scoring.choice_scores(runner, exs, sets, hists, batch_size=4)  # several chunks
    pad = tok.pad_token_id
    for ex, s, h, row in zip(exs, sets, hists, got):
        p_ids = scoring.prompt_ids(tok, ex, h)
        want = []
        for c in candidates(ex):
            c_ids = tok(c, add_special_tokens=False).input_ids
            with runner.context([s]):
                with torch.inference_mode():
                    seqs = [(p_ids + c_ids, len(p_ids))]
                    want.append(float(_sequence_logprob_sums(runner.model, seqs, pad)[0]))
        assert row == pytest.approx(want, abs=2e-3)
    assert scoring.choice_predictions(runner, exs, sets, hists) == [max(range(len(r)), key=r.__getitem__) for r in got]


def test_reproduce_end_to_end_on_custom_tasks(tiny_data, tiny_model, tmp_path):
    """The whole pipeline on two prepared tiny tasks: adapters, plugin, evaluation with a p sweep; a rerun trains
    nothing and computes no new prediction."""
    import shutil

    from dlplora.pipelines.reproduce import run_reproduce

    work, out = tmp_path / "work", tmp_path / "docs"
    shutil.copytree(tiny_data, work / "data")
    kw = dict(out=out, work=work, tasks="quiz,sums", limit=2, steps=2, model=str(tiny_model), settings="composite-26,single",
              methods="base,lora,dlp", weightings="softmax", p_sweep="1.0", progress=False, log=lambda *a: None)
    r1 = run_reproduce(**kw)
    assert set(r1["settings"]) == {"composite-26", "single"} and r1["p_sweep"]["rows"]
    assert r1["reproduce"]["recorded_seconds"]["adapters_training_seconds"] > 0
    md = (out / "RESULTS.md").read_text()
    assert "the library records" in md and "Effect of top-p" in md and (out / "results.json").is_file()
    r2 = run_reproduce(**kw)
    assert r2["cache"]["new_predictions"] == 0
    # the grid's compute time is counted from the cache, so a resumed run reports the whole grid's cost, not its own
    g1, g2 = r1["cache"]["grid"], r2["cache"]["grid"]
    assert g1["compute_seconds"] > 0 and g2 == g1
    assert r2["reproduce"]["recorded_seconds"]["evaluation_compute_seconds"] == g1["compute_seconds"]
    md = (out / "RESULTS.md").read_text()
    assert "min of compute in all" in md and "## Adapter training" in md and "| quiz | 16 |" in md
    assert set(r2["reproduce"]["adapters"]) == {"quiz", "sums"}
    assert r2["settings"]["composite-26"]["methods"]["dlp"]["mean"] == pytest.approx(
        r1["settings"]["composite-26"]["methods"]["dlp"]["mean"])


def test_arrow_wiring_matches_peft_create_arrow_model(tiny_library, tiny_model, models):
    """Where PEFT's own builder works (the tiny library's adapters cover every layer), our Arrow model is the same
    model: same router targets, same adapters as task_i, same logits. Ours exists only for top-layer adapters."""
    from peft import ArrowConfig, create_arrow_model

    from dlplora.backbone import load_backbone
    from dlplora.eval.arrow_check import arrow_layers
    from dlplora.library import Library

    lib = Library.open(tiny_library)
    _, (ours, tok) = models
    net, _, _ = load_backbone(str(tiny_model))
    theirs = create_arrow_model(net, [str(lib.adapter_dir(n)) for n in lib.names],
                                ArrowConfig(top_k=min(3, len(lib.names)), router_temperature=1.0, rng_seed=0))
    theirs.eval()
    routed = [n for n, _, _ in arrow_layers(ours)]
    assert routed and routed == [n for n, _, _ in arrow_layers(theirs)]  # the same layers carry the router
    ids = tok(["a quiz about sums", "what is 2 + 3"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        a = ours(**ids).logits
        b = theirs(**ids).logits
        with ours.disable_adapter():
            plain = ours(**ids).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert not torch.allclose(a, plain, atol=1e-6)  # the adapters do act: the comparison is not base vs base
    # ours mixes the experts with runners._arrow_mix (no tokens x experts x out intermediate), PEFT with its own
    # forward: equal also when the top-k picks 1 of the 2 adapters per token
    arrows = [m.lora_arrow["arrow_router"] for m in ours.modules() if hasattr(m, "lora_arrow")]
    assert arrows and all(x.forward.__func__ is runners._arrow_mix for x in arrows)
    ours1, _ = runners.build_arrow_model(lib, model=str(tiny_model), top_k=1)
    net, _, _ = load_backbone(str(tiny_model))
    theirs1 = create_arrow_model(net, [str(lib.adapter_dir(n)) for n in lib.names],
                                 ArrowConfig(top_k=1, router_temperature=1.0, rng_seed=0))
    theirs1.eval()
    with torch.inference_mode():
        a1, b1 = ours1(**ids).logits, theirs1(**ids).logits
    assert torch.allclose(a1, b1, atol=1e-5), float((a1 - b1).abs().max())
    assert not torch.allclose(a1, a, atol=1e-6)  # top-1 routing is not the top-2 mix


def test_arrow_check_records_arrows_own_top1(tiny_library, tiny_data, models):
    """The Arrow diagnostic sees every Arrow layer and every prompt token, and its top-1 is Arrow's: with one
    prototype made to match every token (a huge weight on a constant direction), that adapter wins everywhere."""
    from dlplora.eval.arrow_check import arrow_layers, arrow_agreement
    from dlplora.library import Library
    from dlplora.tasks import load_split, user_message

    _, (model, tok) = models
    names = Library.open(tiny_library).names
    prompts = {t: [user_message(ex) for ex in load_split(tiny_data, t, "test")[:2]] for t in names}
    rep = arrow_agreement(model, tok, names, prompts)
    layers = arrow_layers(model)
    assert rep["layers"] == len(layers) > 0 and rep["chance"] == pytest.approx(100 / len(names))
    assert set(rep["own_top1_by_task"]) == set(names) and len(rep["own_top1_by_layer"]) == len(layers)
    assert all(0 <= v <= 100 for v in rep["own_top1_by_task"].values())
    saved = [a.prototypes.clone() for _, _, a in layers]
    try:
        with torch.inference_mode():  # Arrow built its prototypes under inference mode
            for (_, _, a), p in zip(layers, saved):
                a.prototypes[a.task_adapter_names.index("task_0")] = 1e6  # |x . p| largest for task_0 on every token
        rep0 = arrow_agreement(model, tok, names, prompts)
        assert rep0["own_top1_by_task"][names[0]] > 99 and rep0["own_top1_by_task"][names[1]] < 1
    finally:
        with torch.inference_mode():
            for (_, _, a), p in zip(layers, saved):
                a.prototypes.copy_(p)


def test_bench_eval_times_ranking_and_generation_per_prompt(tiny_library, tiny_data):
    from dlplora.bench.evalspeed import bench_eval

    res = bench_eval(tiny_library, tiny_data, per_task=2, dtypes=("float32",), mcq_tasks=("quiz",), qa_tasks=("sums",),
                     log=lambda *_: None)
    row = res["runs"]["float32"]
    assert res["mcq_prompts"] == 2 and res["qa_prompts"] == 2
    assert all(row[f"choice_batch{b}_s_per_prompt"] > 0 for b in (16, 32))
    assert all(row[f"gen_batch{b}_s_per_prompt"] > 0 and row[f"gen_batch{b}_tokens_per_s"] >= 0 for b in (8, 16, 32))


def test_multiturn_history_holds_the_ranked_choice_or_a_generated_answer(tiny_library, tiny_data, tiny_model, models,
                                                                           tmp_path, monkeypatch):
    """--mt-mcq-reply choice: a multiple-choice turn leaves the choice it ranked first in the history and generates
    nothing; generated: it generates its reply (except on the last turn, whose reply no history needs)."""
    from dlplora.tasks import candidates

    engine, _ = models
    seen = []
    real = harness.run_method_items

    def spy(runner, method, items, sets, *a, **k):
        preds = real(runner, method, items, sets, *a, **k)
        seen.append((k.get("choice_gen"), [dict(it) for it in items], preds))
        return preds

    monkeypatch.setattr(harness, "run_method_items", spy)
    res = {}
    for mode in ("choice", "generated"):
        seen.clear()
        res[mode] = run_evaluation(tiny_library, data=tiny_data, out=tmp_path / mode, settings=["multiturn"],
                                   methods=["base"], model=str(tiny_model), progress=False, engine=engine,
                                   conversations=4, mt_mcq_reply=mode, log=lambda *a: None)
        assert res[mode]["config"]["mt_mcq_reply"] == mode
        assert [g for g, _, _ in seen] == ([False] * 3 if mode == "choice" else [True, True, False])
        for t in range(1, 3):  # every later turn's history holds the reply its earlier turn left
            for it, (prev_it, prev_pred) in zip(seen[t][1], zip(seen[t - 1][1], seen[t - 1][2])):
                reply = it["history"][-1]["content"]
                if candidates(prev_it["ex"]):
                    expected = (candidates(prev_it["ex"])[prev_pred["choice"]] if mode == "choice"
                                else prev_pred["gen"])
                    assert "gen" in prev_pred if mode == "generated" else "gen" not in prev_pred
                else:
                    expected = prev_pred["gen"]
                assert reply == expected
        n_mcq = sum(bool(candidates(it["ex"])) for _, items, _ in seen[:2] for it in items)
        assert n_mcq > 0
    # the generated replies cost one generation per multiple-choice turn of turns 1 and 2
    assert res["generated"]["cache"]["new_predictions"] - res["choice"]["cache"]["new_predictions"] == n_mcq
    with pytest.raises(DLPLoRAError, match="mt-mcq-reply"):
        run_evaluation(tiny_library, data=tiny_data, out=tmp_path / "bad", settings=["multiturn"], methods=["base"],
                       model=str(tiny_model), progress=False, engine=engine, mt_mcq_reply="letter", log=lambda *a: None)


def test_cache_keys_name_the_precision_and_the_quantisation_scheme():
    """Predictions cached in one precision are not reused in another: fp32 on the CPU keeps the old keys, other dtypes
    and devices add theirs, and a quantised model adds its scheme (not a bare flag: per-token int8 replaced dynamic
    int8 under the same name)."""
    from types import SimpleNamespace as NS

    from dlplora.config import QUANTIZE_SCHEMES
    from dlplora.eval.cache import precision_tag
    from dlplora.quantize import INT4_GROUP

    def eng(dtype, quantize="none", dev="cpu"):
        return NS(model=NS(dtype=dtype, device=torch.device(dev)), quantize=quantize)

    assert precision_tag(eng(torch.float32)) == ""
    assert precision_tag(eng(torch.bfloat16)) == "-bfloat16-cpu"
    assert precision_tag(eng(torch.float32, "int8")) == "-int8-per-channel-per-token"
    assert precision_tag(eng(torch.bfloat16, "int4")) == f"-bfloat16-cpu-int4-g{INT4_GROUP}"
    assert QUANTIZE_SCHEMES["int4"] == f"int4-g{INT4_GROUP}"
