"""--dtype / --device: resolution rules, bf16 agreement with fp32 (a stated tolerance), clear errors."""

import pytest
import torch

from dlplora import device as dev
from dlplora.errors import DLPLoRAError
from dlplora.testing import random_peft_library

SPECS = {"alpha": (4, 8, ["q_proj", "v_proj"]), "beta": (8, 8, ["q_proj", "v_proj"])}
# bf16 keeps 8 bits of mantissa: on the tiny model the log-probabilities of a fused forward stay within this of fp32
BF16_LOGPROB_TOLERANCE = 0.15


def test_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    assert dev.auto_dtype_name("cpu", ["avx2"]) == "float32"
    assert dev.auto_dtype_name("cpu", ["avx2", "avx512_bf16"]) == "bfloat16"
    assert dev.auto_dtype_name("cpu", ["amx_bf16"]) == "bfloat16"
    assert dev.auto_dtype_name("cuda") == "bfloat16"
    monkeypatch.setattr(dev, "cpu_flags", lambda: ["avx2"])
    assert dev.resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(dev, "cpu_flags", lambda: ["avx2", "avx512_bf16"])
    assert dev.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert dev.resolve_dtype(None) == torch.float32 and dev.resolve_dtype(torch.float16) == torch.float16
    assert dev.resolve_dtype("float16") == torch.float16
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_names_and_missing_gpu_are_clear_errors():
    with pytest.raises(DLPLoRAError, match="unknown dtype 'int3'"):
        dev.resolve_dtype("int3")
    with pytest.raises(DLPLoRAError, match="unknown device 'tpu'"):
        dev.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DLPLoRAError, match="sees no CUDA GPU"):
            dev.resolve_device("cuda")


def test_bf16_engine_agrees_with_fp32(tiny_model, tmp_path, one_thread):
    from dlplora.engine import DLPLoRA

    lib = random_peft_library(tmp_path / "lib", tiny_model, SPECS, std=0.5, seed=3)
    e32 = DLPLoRA.from_library(lib, dtype="float32")
    e16 = DLPLoRA.from_library(lib, dtype="bfloat16", device="cpu")
    assert e16.model.dtype == torch.bfloat16 and e32.model.dtype == torch.float32
    ids = e32.tokenizer("the quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    mix = {"alpha": 0.6, "beta": 0.4}
    with torch.inference_mode():
        with e32.apply([mix]):
            l32 = torch.log_softmax(e32.model(ids).logits.float(), -1)
        with e16.apply([mix]):
            l16 = torch.log_softmax(e16.model(ids).logits.float(), -1)
        with e32.apply([{}]):
            base = torch.log_softmax(e32.model(ids).logits.float(), -1)
    assert (l32 - l16).abs().max() < BF16_LOGPROB_TOLERANCE
    assert (l32 - base).abs().max() > 4 * (l32 - l16).abs().max()  # the adapters' effect is far above bf16 noise
    out = e16.generate(["hello there"], adapters=mix, max_new_tokens=4)[0]
    assert out["tokens"] >= 1 and out["routing"]["adapters"][0]["name"] == "alpha"


def test_cli_dtype_and_device_flags(tiny_model, tmp_path, capsys, one_thread):
    from dlplora.cli import main

    lib = random_peft_library(tmp_path / "lib", tiny_model, SPECS, std=0.5, seed=3)
    assert main(["generate", "--library", str(lib), "--adapters", "alpha=1", "--max-new-tokens", "3", "--dtype",
                 "bfloat16", "--device", "cpu", "--json", "hi"]) == 0
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main(["generate", "--library", str(lib), "--adapters", "alpha=1", "--device", "cuda", "hi"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err

# int8 weights (per-channel scales, per-token activations) on the tiny random model: log-probabilities stay within this
# of fp32
INT8_LOGPROB_TOLERANCE = 0.3


def test_int8_base_with_float_adapters_agrees_with_fp32(tiny_model, tmp_path, one_thread):
    from dlplora.engine import DLPLoRA

    lib = random_peft_library(tmp_path / "lib", tiny_model, SPECS, std=0.5, seed=3)
    e32 = DLPLoRA.from_library(lib, dtype="float32")
    e8 = DLPLoRA.from_library(lib, quantize="int8")  # dtype auto -> float32 activations
    assert e8.fusion.quantized and not e32.fusion.quantized
    assert all(not isinstance(layer.base, torch.nn.Linear) for layer in e8.fusion.layers.values())
    assert e8.fusion.layers[next(iter(e8.fusion.layers))].A.dtype == torch.float32  # adapters stay in float
    ids = e32.tokenizer("the quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    mix = {"alpha": 0.6, "beta": 0.4}
    with torch.inference_mode():
        with e32.apply([mix]):
            l32 = torch.log_softmax(e32.model(ids).logits, -1)
        with e8.apply([mix]) as mode:
            assert mode == "shared"  # auto never merges into int8 weights
            l8 = torch.log_softmax(e8.model(ids).logits, -1)
        with e32.apply([{}]):
            base = torch.log_softmax(e32.model(ids).logits, -1)
    assert (l32 - l8).abs().max() < INT8_LOGPROB_TOLERANCE
    assert (l32 - base).abs().max() > 4 * (l32 - l8).abs().max()
    with pytest.raises(DLPLoRAError, match="merged.*int8/int4"):
        e8.fusion.set_routing([[0]], [[1.0]], mode="merged")
    with pytest.raises(DLPLoRAError, match="needs float32 activations"):
        DLPLoRA.from_library(lib, dtype="bfloat16", quantize="int8")
    out = e8.generate(["hello there", "a second row"], adapters=[mix, {"beta": 1.0}], max_new_tokens=3)
    assert all(o["tokens"] >= 1 for o in out) and out[0]["mode"] == "slots"


def test_int8_rows_do_not_depend_on_their_batch():
    """Per-token activation scales: a row's int8 product is the same alone and beside a row with a large outlier (the
    dynamic per-tensor quantisation it replaced coarsened every row of the batch to the outlier's scale)."""
    from dlplora.quantize import Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin)
    x = torch.randn(5, 64)
    x[0, 3] = 500.0
    alone = torch.cat([q(x[i:i + 1]) for i in range(5)])
    assert torch.equal(q(x), alone)  # exactly: the int32 product does not depend on the batch
    ref = lin(x)
    rel = (q(x) - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel[1:].max() < 0.03, rel  # the outlier row does not spoil the others
    assert torch.allclose(q.weight(), lin.weight, atol=lin.weight.abs().max().item() / 127)
    with torch.inference_mode():
        assert torch.equal(q(x.reshape(5, 1, 64)).reshape(5, -1), alone)


# int4 weights (groups of 32 with scale and offset) and bf16 activations: log-probabilities within this of fp32
INT4_LOGPROB_TOLERANCE = 0.5


def test_int4_base_with_float_adapters_agrees_with_fp32(tiny_model, tmp_path, one_thread):
    from dlplora.engine import DLPLoRA
    from dlplora.quantize import Int4Linear

    lib = random_peft_library(tmp_path / "lib", tiny_model, SPECS, std=0.5, seed=3)
    e32 = DLPLoRA.from_library(lib, dtype="float32")
    e4 = DLPLoRA.from_library(lib, quantize="int4")  # dtype auto -> bfloat16 activations
    assert e4.fusion.quantized and isinstance(e4.model.lm_head, Int4Linear)
    layer = next(iter(e4.fusion.layers.values()))
    ref = next(iter(e32.fusion.layers.values())).weight
    # the dequantised weight is within half a quantisation step of the original (16 levels per group of 32)
    step = (ref.reshape(-1, 32).amax(1) - ref.reshape(-1, 32).amin(1)) / 15
    assert ((layer.weight - ref).abs().reshape(-1, 32).amax(1) <= step * 0.5 + 0.02).all()
    # many rows (a prefill) take the dequantised bf16 GEMM; a few rows the int4 kernel: the same product
    q = layer.base
    x = torch.randn(70, q.in_features).bfloat16()
    kernel = torch._weight_int4pack_mm_for_cpu(x, q.packed, q.group, q.scales_zeros)[:, :q.out_features]
    torch.testing.assert_close(q(x).float(), kernel.float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(q(x[:3]).float(), kernel[:3].float(), atol=1e-6, rtol=0)
    ids = e32.tokenizer("the quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    mix = {"alpha": 0.6, "beta": 0.4}
    with torch.inference_mode():
        with e32.apply([mix]):
            l32 = torch.log_softmax(e32.model(ids).logits.float(), -1)
        with e4.apply([mix]) as mode:
            assert mode == "shared"
            l4 = torch.log_softmax(e4.model(ids).logits.float(), -1)
        with e32.apply([{}]):
            base = torch.log_softmax(e32.model(ids).logits, -1)
    assert (l32 - l4).abs().max() < INT4_LOGPROB_TOLERANCE
    assert (l32 - base).abs().max() > 4 * (l32 - l4).abs().max()
    with pytest.raises(DLPLoRAError, match="bfloat16 activations"):
        DLPLoRA.from_library(lib, dtype="float32", quantize="int4")
    out = e4.generate(["hello there", "a second row"], adapters=[mix, {"beta": 1.0}], max_new_tokens=3)
    assert all(o["tokens"] >= 1 for o in out) and out[0]["mode"] == "slots"


def test_quantize_auto_follows_the_cpu_flags_table():
    from dlplora.device import auto_quantize_name

    assert auto_quantize_name("cpu", ["avx2"]) == "int8"  # AVX2 only: fp32 activations, int8 weights
    assert auto_quantize_name("cpu", ["avx2", "avx512_bf16"]) == "int8"
    assert auto_quantize_name("cpu", ["avx2", "amx_bf16", "avx512_bf16"]) == "int8"
    assert auto_quantize_name("cpu", []) == "none"  # no fbgemm kernels to count on (not x86 / no AVX2)
    assert auto_quantize_name("cuda", ["avx2"]) == "none"
    assert auto_quantize_name("cuda:0", ["avx2"]) == "none"
    assert auto_quantize_name("cpu", ["avx2"], dtype="bfloat16") == "none"  # a named precision is kept
    assert auto_quantize_name("cpu", ["avx2"], dtype="auto") == "int8"


def test_resolve_quantize_checks_names_and_the_python_api_default_is_none():
    import pytest as _pytest

    from dlplora.errors import DLPLoRAError
    from dlplora.quantize import resolve_quantize

    assert resolve_quantize(None) == "none" and resolve_quantize("int4") == "int4"
    assert resolve_quantize("auto", "cpu") in ("int8", "none")
    with _pytest.raises(DLPLoRAError, match="unknown quantisation 'int3'"):
        resolve_quantize("int3")


def test_the_cli_default_is_auto_and_resolves_on_this_machine(tiny_model, tmp_path):
    from dlplora.device import cpu_flags
    from dlplora.engine import DLPLoRA
    from dlplora.testing import random_peft_library

    lib = random_peft_library(tmp_path / "lib", tiny_model, 1)
    eng = DLPLoRA.from_library(lib, quantize="auto")
    expect = "int8" if "avx2" in cpu_flags() else "none"
    assert eng.quantize == expect
    assert str(eng.model.dtype) == "torch.float32"
    assert isinstance(eng.generate(["hello"], max_new_tokens=3, adapters=[{"rand0": 1.0}])[0]["text"], str)
