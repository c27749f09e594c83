"""`dlp-lora bench decode` on the tiny model, with a stand-in llama-bench (a script printing its JSON)."""

import argparse
import json
import stat

import pytest

from dlplora.bench.decode import add_arguments, llama_bench, run
from dlplora.errors import DLPLoRAError

pytestmark = pytest.mark.usefixtures("one_thread")

FAKE = """#!/bin/sh
cat <<'JSON'
[{"build_commit": "abc", "model_type": "llama 135M Q4_1", "n_prompt": 128, "n_gen": 0, "avg_ts": 300.5},
 {"build_commit": "abc", "model_type": "llama 135M Q4_1", "n_prompt": 0, "n_gen": 64, "avg_ts": 100.0}]
JSON
"""


def test_bench_decode_reports_rates_and_llamacpp_ratios(tiny_model, tmp_path, capsys):
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", str(tiny_model), "--quick", "--dtype", "float32", "--threads", "1",
                         "--llama-bench", str(fake), "--gguf", str(tmp_path / "m.gguf"), "--json"])
    res = run(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res
    assert res["dtype"] == "float32" and res["new_tokens"] == 8 and res["prompt_tokens"] > 0
    for k in ("batch1_tok_s", "prefill_tok_s", "hf_batch1_tok_s", "mixed8_tok_s"):
        assert res[k] > 0, k
    assert res["llamacpp_tg_tok_s"] == 100.0 and res["llamacpp_pp_tok_s"] == 300.5
    assert res["batch1_vs_llamacpp"] == pytest.approx(res["batch1_tok_s"] / 100.0, abs=1e-3)
    assert res["mixed8_vs_llamacpp"] == pytest.approx(res["mixed8_tok_s"] / 100.0, abs=1e-3)
    assert res["base_batch1_tok_s"] > 0 and res["llamacpp_tg_runs"] == [100.0, 100.0]  # before and after ours
    assert res["compiled"] is False and res["quantize"] == "none"


def test_bench_gpu_runs_its_contenders_on_a_tiny_config(capsys):
    """The GPU benchmark's code path, on the CPU with the tiny config: ratios present and positive."""
    from dlplora.bench import gpu

    p = argparse.ArgumentParser()
    gpu.add_arguments(p)
    args = p.parse_args(["--config", "tiny", "--device", "cpu", "--adapters", "3,9", "--batch", "4",
                         "--prompt-tokens", "8", "--new-tokens", "3", "--repeats", "1", "--json"])
    res = gpu.run(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res
    for n in ("3", "9"):
        r = res["models"]["tiny"]["adapters"][n]
        for k in ("dlp_vs_single_lora_batch1", "dlp_slots_vs_single_lora_batch1", "mixed_throughput_vs_single_lora",
                  "mixed_throughput_vs_peft_mixed"):
            assert r[k] > 0, k
        assert set(r["mixed_tok_s"]) == {"single_lora", "dlp_mixed", "peft_mixed"}


def test_llama_bench_errors_are_clear(tmp_path):
    with pytest.raises(DLPLoRAError, match="could not run llama-bench"):
        llama_bench(str(tmp_path / "missing"), "m.gguf", 1, 8, 8)
    bad = tmp_path / "bad"
    bad.write_text("#!/bin/sh\necho 'no such model' >&2\nexit 3\n")
    bad.chmod(bad.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(DLPLoRAError, match="llama-bench failed.*no such model"):
        llama_bench(str(bad), "m.gguf", 1, 8, 8)
