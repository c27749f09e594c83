import json

import pytest

from dlplora import tasks
from dlplora.errors import DLPLoRAError
from dlplora.testing import tiny_tokenizer


def test_registry_has_the_papers_26_tasks():
    assert len(tasks.TASKS) == 26
    assert len(tasks.MCQ_TASKS) == 17 and len(tasks.QA_TASKS) == 9
    shorts = {t.short for t in tasks.TASKS.values()}
    assert {"AbsNarr", "WinoWhy", "GSM8K", "NewsIT", "ALPACA", "TopChat"} <= shorts
    assert tasks.get_task("WinoWhy").name == "winowhy"
    assert tasks.get_task("newsde").name == "news_commentary_de"


def test_parse_tasks_groups_and_errors():
    assert tasks.parse_tasks("all") == list(tasks.TASKS)
    assert tasks.parse_tasks("mcq,gsm8k")[-1] == "gsm8k"
    assert tasks.parse_tasks("winowhy,WinoWhy") == ["winowhy"]
    with pytest.raises(DLPLoRAError, match="unknown task 'nope'"):
        tasks.parse_tasks("winowhy,nope")
    with pytest.raises(DLPLoRAError, match="no tasks"):
        tasks.parse_tasks(" , ")


def _rows(n, task="gsm8k"):
    return [{"input": f"q{i}", "target": f"a{i}", "task": task} for i in range(n)]


def test_split_is_deterministic_900_100_and_9_to_1_for_small_sources():
    train, test = tasks.split_examples(_rows(5000))
    assert (len(train), len(test)) == (900, 100)
    again = tasks.split_examples(_rows(5000))
    assert [r["id"] for r in train] == [r["id"] for r in again[0]]
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert tuple(map(len, tasks.split_examples(_rows(348)))) == (313, 35)
    assert tuple(map(len, tasks.split_examples(_rows(142)))) == (128, 14)


def test_missing_extra_data_names_tasks_and_fix(tmp_path):
    with pytest.raises(DLPLoRAError) as err:
        tasks.prepare("gsm8k,alpaca", tmp_path / "out", extra_data=tmp_path / "nothing")
    msg = str(err.value)
    assert "gsm8k, alpaca" in msg and "--extra-data" in msg and "gsm8k.jsonl" in msg
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_malformed_jsonl_reports_file_and_line(tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "alpaca.jsonl").write_text('{"input": "a", "target": "b"}\n{"input": "broken\n')
    with pytest.raises(DLPLoRAError, match=r"alpaca.jsonl:2: malformed JSON"):
        tasks.prepare("alpaca", tmp_path / "out", extra_data=extra)
    (extra / "alpaca.jsonl").write_text('{"input": "a", "target": ""}\n')
    with pytest.raises(DLPLoRAError, match=r"alpaca.jsonl:1: field 'target'"):
        tasks.prepare("alpaca", tmp_path / "out", extra_data=extra)


def test_prepare_extra_task_writes_splits_and_stats(tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "news_commentary_it.jsonl").write_text(
        "".join(json.dumps({"input": f"Ciao numero {i}", "target": f"Hello number {i}"}) + "\n" for i in range(50)))
    summary = tasks.prepare("news_commentary_it", tmp_path / "out", extra_data=extra, tokenizer=tiny_tokenizer())
    assert summary[0]["n_train"] == 45 and summary[0]["n_test"] == 5
    assert summary[0]["mean_prompt_tokens"] > 5
    train = tasks.load_split(tmp_path / "out", "news_commentary_it", "train")
    assert len(train) == 45 and train[0]["task_prefix"].startswith("Translate the following Italian")
    assert "Translate the following Italian" in tasks.format_summary(summary) or "NewsIT" in tasks.format_summary(summary)
    assert "only 50 source examples" in tasks.format_summary(summary)


def test_renderer_mcq_choices_prefix_and_chat_template():
    ex = {"input": "Is 2 even?", "choices": ["yes", "no"], "answer_index": 0, "target": "yes",
          "task_prefix": "Quiz.\n", "input_prefix": "\nQ: ", "output_prefix": "\nA: "}
    msg = tasks.user_message(ex)
    assert msg.startswith("Quiz.") and "choice: yes" in msg and "choice: no" in msg and msg.endswith("A:")
    assert not tasks.user_message(ex, with_prefix=False).startswith("Quiz.")
    tok = tiny_tokenizer()
    prompt = tasks.example_prompt(tok, ex)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tasks.candidates(ex) == ["yes", "no"] and tasks.answer_text(ex) == "yes"
    hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tasks.chat_prompt(tok, "next", hist).count("<|im_start|>user") == 2


def test_corrupt_bigbench_archive_is_reported(tmp_path, monkeypatch):
    bad = tmp_path / "bigbench-1.0.0.tar.gz"
    bad.write_bytes(b"not a tarball")
    monkeypatch.setenv("DLP_LORA_BIGBENCH_SDIST", str(bad))
    with pytest.raises(DLPLoRAError, match="unreadable or corrupt"):
        tasks.ensure_bigbench(log=lambda *_: None)


def test_choices_are_shuffled_per_example_deterministically_and_independent_of_the_answer():
    # a task file that lists the answer first in every example (as ConParaKC and QuesSel do)
    firsts = 0
    for k in range(400):
        scores = {f"right {k}": 1, f"wrong a {k}": 0, f"wrong b {k}": 0, f"wrong c {k}": 0}
        order = tasks.shuffled_choices(scores, f"task/sub/{k}")
        assert sorted(order) == sorted(scores) and order == tasks.shuffled_choices(dict(scores), f"task/sub/{k}")
        firsts += order[0] == f"right {k}"
    assert 60 <= firsts <= 140  # about 1 in 4, not every time


def test_stale_prepared_mcq_data_is_refused_and_not_reused(tmp_path):
    from dlplora.testing import write_prepared

    ex = {"id": "winowhy-1", "task": "winowhy", "input": "x", "target": "correct", "choices": ["correct", "incorrect"],
          "answer_index": 0, "aliases": [], "task_prefix": "", "input_prefix": "", "output_prefix": "", "subtask": "winowhy"}
    write_prepared(tmp_path, "winowhy", [ex], [ex], data_format=1)  # no format record: data of an older dlp-lora
    assert tasks.prepared_format(tmp_path, "winowhy") == 1 and not tasks.is_prepared(tmp_path, "winowhy")
    with pytest.raises(DLPLoRAError, match="older dlp-lora .*prepare it again"):
        tasks.load_split(tmp_path, "winowhy", "train")
    (tmp_path / "winowhy" / "format.json").write_text(json.dumps({"format": tasks.DATA_FORMAT}))
    assert tasks.is_prepared(tmp_path, "winowhy") and tasks.load_split(tmp_path, "winowhy", "test") == [ex]
    gen = dict(ex, id="gsm8k-1", task="gsm8k", choices=None, answer_index=None)
    write_prepared(tmp_path, "gsm8k", [gen], [gen], data_format=1)  # no options: an older preparation is still good
    assert tasks.is_prepared(tmp_path, "gsm8k") and tasks.load_split(tmp_path, "gsm8k", "test") == [gen]


def test_stale_options_only_for_registry_multiple_choice_tasks_of_an_older_format():
    assert tasks.stale_options(1, "winowhy")
    assert not tasks.stale_options(tasks.DATA_FORMAT, "winowhy")
    assert not tasks.stale_options(1, "gsm8k") and not tasks.stale_options(1, "my_own_task")  # no options: nothing changed


def test_prediction_cache_key_changes_with_the_prompt():
    from dlplora.eval.cache import content_tag

    ex = {"input": "Is 2 even?", "choices": ["yes", "no"], "target": "yes", "task_prefix": "Quiz.\n"}
    tag = content_tag({"ex": ex})
    assert tag == content_tag({"ex": dict(ex)}) and tag == content_tag({"ex": ex, "history": []})
    assert content_tag({"ex": dict(ex, choices=["no", "yes"])}) != tag
    assert content_tag({"ex": dict(ex, input="Is 3 even?")}) != tag
    assert content_tag({"ex": ex, "history": [{"role": "user", "content": "hi"}]}) != tag


def test_a_plugin_that_learnt_stale_multiple_choice_prompts_is_not_reused(tmp_path):
    from types import SimpleNamespace

    from dlplora.pipelines import plugin_ready

    d = tmp_path / "plugin"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x")
    lib = SimpleNamespace(names=["winowhy", "gsm8k"], plugin_dir=lambda: d)
    conf = {"labels": ["winowhy", "gsm8k"], "training": {}}
    (d / "plugin.json").write_text(json.dumps(conf))
    assert not plugin_ready(lib)  # trained before the data format was recorded
    conf["training"]["data_format"] = tasks.DATA_FORMAT
    (d / "plugin.json").write_text(json.dumps(conf))
    assert plugin_ready(lib)
    lib.names = ["gsm8k", "winowhy"]
    assert not plugin_ready(lib)  # other adapters, or another order
    lib.names, conf["labels"], conf["training"] = ["gsm8k"], ["gsm8k"], {}
    (d / "plugin.json").write_text(json.dumps(conf))
    assert plugin_ready(lib)  # no multiple-choice task: its prompts did not change
    # each task's own format: gsm8k's data predates the format record (1) and is not stale; winowhy's is current
    lib.names = conf["labels"] = ["winowhy", "gsm8k"]
    conf["training"] = {"data_formats": {"winowhy": tasks.DATA_FORMAT, "gsm8k": 1}}
    (d / "plugin.json").write_text(json.dumps(conf))
    assert plugin_ready(lib)
    conf["training"]["data_formats"]["winowhy"] = 1
    (d / "plugin.json").write_text(json.dumps(conf))
    assert not plugin_ready(lib)
