"""Property-based tests (hypothesis) of what reads untrusted input: the router (Plugin.route), the server's request
parser (protocol.parse_generation, read_json), the chat template (tasks.chat_prompt) and `library add` on damaged
adapter files. Every input either works or is refused with the package's own error, never a crash."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzzing import FUZZ, SPECIAL, deep, json_values, texts
from hypothesis import given
from hypothesis import strategies as st

from dlplora.adapters import CONFIG_FILE, WEIGHTS_FILE, load_peft_adapter, validate_adapter
from dlplora.errors import DLPLoRAError
from dlplora.library import Library, add_adapter
from dlplora.plugin import Plugin
from dlplora.serve import APIError
from dlplora.serve.protocol import UNSUPPORTED, GenerationParams, parse_generation, read_json
from dlplora.tasks import chat_prompt
from dlplora.testing import random_peft_adapter, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = {"maths": ("add", "sum", "plus", "number"), "french": ("bonjour", "maison", "voiture", "chat"),
         "colours": ("red", "green", "blue", "yellow")}


# ---------------------------------------------------------------- the router

@pytest.fixture(scope="module")
def plugin() -> Plugin:
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for task, words in VOCAB.items():
        xs += [" ".join(rng.choice(words, size=6)) + f" case {i}" for i in range(30)]
        ys += [task] * 30
    return Plugin.train(xs, ys, list(VOCAB), epochs=4, batch_size=32, bits=12, dim=8, hidden=(16, 16, 8), seed=0,
                        body_bytes=512)


def test_nul_bytes_and_lone_surrogates_route(plugin):
    for text in ("hi\u0000there", "a\u0000", "\u0000\u0000add", "sum \ud800 plus", "\udfff" * 300, "x" * 100_000,
                 "earlier\n\x1e\nadd plus\u0000sum"):
        (r,) = plugin.route([text])
        assert r.names and math.isclose(sum(r.weights), 1.0, abs_tol=1e-6)


@FUZZ
@given(st.lists(texts, min_size=1, max_size=4))
def test_route_any_text(plugin, batch):
    try:
        routes = plugin.route(batch)
    except DLPLoRAError as exc:  # only an empty (all-whitespace) prompt is refused
        assert "empty" in str(exc) and any(not t.strip() for t in batch)
        return
    assert len(routes) == len(batch)
    for r in routes:
        assert all(n in VOCAB for n in r.names) and all(math.isfinite(w) and w >= 0 for w in r.weights)
        assert not r.names or math.isclose(sum(r.weights), 1.0, abs_tol=1e-6)


# ---------------------------------------------------------------- the request parser

def _check_error(exc: APIError):
    assert 400 <= exc.status < 500 and exc.message
    json.dumps(exc.body(), ensure_ascii=False).encode("utf-8")  # the server can send it (no lone surrogate)


messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                           "content": st.one_of(texts, st.lists(st.one_of(
                               st.fixed_dictionaries({"type": st.just("text"), "text": texts}), json_values),
                               max_size=3))}),
    json_values), max_size=5)
fields = {"model": st.one_of(st.sampled_from(["alpha", "dlp-lora", "", None]), json_values),
          "max_tokens": st.one_of(st.integers(-5, 10 ** 6), json_values), "temperature": json_values,
          "top_p": json_values, "seed": st.one_of(st.integers(-(2 ** 70), 2 ** 70), json_values),
          "stop": st.one_of(texts, st.lists(texts, max_size=5), json_values), "n": st.one_of(st.integers(-2, 12),
                                                                                             json_values),
          "stream": json_values, "stream_options": json_values, "logprobs": st.one_of(st.integers(-2, 30), json_values),
          "top_logprobs": st.one_of(st.integers(-2, 30), json_values), "adapters": json_values,
          "max_completion_tokens": json_values, "prompt": st.one_of(texts, st.lists(texts, max_size=2), json_values),
          **{name: json_values for name in list(UNSUPPORTED)[:12]}}
bodies = st.one_of(
    st.fixed_dictionaries({"messages": messages}, optional=fields),
    st.fixed_dictionaries({"prompt": texts}, optional={k: v for k, v in fields.items() if k != "prompt"}),
    st.dictionaries(st.one_of(st.sampled_from(sorted(fields)), st.text(max_size=6)), json_values, max_size=6),
)


@FUZZ
@given(bodies, st.booleans())
def test_parse_generation_any_body(body, chat):
    try:
        p = parse_generation(body, chat, max_tokens_limit=64, max_messages=4, max_n=4)
    except APIError as exc:
        _check_error(exc)
        return
    assert isinstance(p, GenerationParams) and 1 <= p.n <= 4
    p.prompt.encode("utf-8")  # what reaches the tokenizer is encodable text
    for m in p.history or []:
        m["content"].encode("utf-8")
    assert p.prompt.strip() and (p.max_tokens is None or 1 <= p.max_tokens <= 64)
    assert 0 <= p.temperature <= 2 and 0 < p.top_p <= 1 and (p.logprobs is None or 0 <= p.logprobs <= 20)
    assert all(-(2 ** 63) <= s < 2 ** 63 for s in p.choice_seeds() if s is not None)


class _Request:
    """What read_json needs of a Starlette request."""

    def __init__(self, raw: bytes, ctype: str = "application/json", length: str | None = None):
        self.raw = raw
        self.headers = {"content-type": ctype} | ({"content-length": length} if length is not None else {})

    async def stream(self):
        for i in range(0, len(self.raw), 4096):
            yield self.raw[i: i + 4096]


raw_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    bodies.map(lambda b: json.dumps(b).encode()),
    st.builds(deep, st.integers(1, 5000), st.sampled_from(["[", "{"])),
    st.integers(4000, 6000).map(lambda k: b'{"n": ' + b"7" * k + b"}"),
    st.sampled_from([b'{"a": NaN}', b'{"a": Infinity}', b'{"a": "\\ud800"}', b"\xef\xbb\xbf{}", b'{"a": 1} x',
                     "{}".encode("utf-16"), b"\x00", b"", b'"just a string"', b"[1, 2]", b"1e999"]),
)


@FUZZ
@given(raw_bodies, st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", ""]),
       st.sampled_from([None, "0", "12", "abc", "-1", "99999999999999999999"]))
def test_read_json_any_bytes(raw, ctype, length):
    try:
        body = asyncio.run(read_json(_Request(raw, ctype, length), limit=20_000))
    except APIError as exc:
        _check_error(exc)
        assert exc.status in (400, 413, 415)
        return
    assert isinstance(body, dict) and ctype.startswith("application/json")


# ---------------------------------------------------------------- the chat template

@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@FUZZ
@given(texts, st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                             "content": texts}), max_size=3))
def test_chat_prompt_any_text(tokenizer, user, history):
    prompt = chat_prompt(tokenizer, user, history)
    assert isinstance(prompt, str) and prompt.endswith("<|im_start|>assistant\n") and user in prompt
    assert all(m["content"] in prompt for m in history)
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in prompt):  # the server refuses lone surrogates before this
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < len(tokenizer) for i in ids)


# ---------------------------------------------------------------- damaged adapters for `library add`

@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, tiny_model):
    d = random_peft_adapter(tiny_model, tmp_path_factory.mktemp("fuzz-adapters") / "good", rank=4, std=0.1)
    return d


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / WEIGHTS_FILE))


def _copy(src: Path, dst: Path, config=None, tensors=None, weights_bytes=None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        (dst / CONFIG_FILE).write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        from safetensors.torch import save_file

        save_file(tensors, str(dst / WEIGHTS_FILE))
    if weights_bytes is not None:
        (dst / WEIGHTS_FILE).write_bytes(weights_bytes)
    return dst


def test_adapters_with_full_module_copies_nan_or_bad_config_are_refused(good_adapter, tiny_model, tmp_path):
    cfg = json.loads((good_adapter / CONFIG_FILE).read_text())
    ts = _tensors(good_adapter)
    a_key = next(k for k in ts if "lora_A" in k)
    cases = {
        "modules_to_save": (dict(cfg, modules_to_save=["lm_head"]), None, "modules_to_save=.*full copies"),
        "lm_head": (None, ts | {"base_model.model.lm_head.weight": torch.zeros(512, 64)},
                    "full copies of modules .*lm_head"),
        "embed": (None, ts | {"base_model.model.model.embed_tokens.modules_to_save.default.weight": torch.zeros(2, 2)},
                  "full copies of modules"),
        "bias_tensor": (None, ts | {"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
                        "not LoRA factors"),
        "bias_config": (dict(cfg, bias="all"), None, "bias='all'"),
        "nan": (None, ts | {a_key: torch.full_like(ts[a_key], float("nan"))}, "NaN or infinite"),
        "inf": (None, ts | {a_key: torch.full_like(ts[a_key], float("inf"))}, "NaN or infinite"),
        "int": (None, ts | {a_key: torch.zeros_like(ts[a_key], dtype=torch.int32)}, "not floating point"),
        "alpha_nan": (json.dumps(cfg).replace('"lora_alpha": 8', '"lora_alpha": NaN'), None, "lora_alpha"),
        "alpha_str": (dict(cfg, lora_alpha="big"), None, "lora_alpha"),
        "rank_pattern": (dict(cfg, rank_pattern={"q_proj": "eight"}), None, "rank_pattern"),
        "bad_regex": (dict(cfg, alpha_pattern={"(": 2}), None, "not a valid regex"),
        "pattern_list": (dict(cfg, rank_pattern=[1, 2]), None, "rank_pattern"),
        "two_adapters": (None, ts | {a_key.replace(".weight", ".other.weight"): ts[a_key].clone()}, "two lora_A"),
    }
    lib = tmp_path / "lib"
    for name, (config, tensors, msg) in cases.items():
        src = _copy(good_adapter, tmp_path / name, config=config, tensors=tensors)
        with pytest.raises(DLPLoRAError, match=msg):
            add_adapter(lib, name, src, model=str(tiny_model))
        if tensors is not None or name == "modules_to_save":
            with pytest.raises(DLPLoRAError, match=msg):
                load_peft_adapter(src)
    meta = _copy(good_adapter, tmp_path / "meta")
    (meta / "dlp_adapter.json").write_text("{broken")
    with pytest.raises(DLPLoRAError, match="dlp_adapter.json is corrupt"):
        validate_adapter(meta, str(tiny_model), base={"fingerprint": "x"})
    add_adapter(lib, "fine", good_adapter, model=str(tiny_model))
    assert Library.open(lib).names == ["fine"]  # nothing bad got in


def _mutations(good: Path):
    raw = (good / WEIGHTS_FILE).read_bytes()
    cfg = json.loads((good / CONFIG_FILE).read_text())
    keys = sorted(_tensors(good))
    config_keys = ["r", "lora_alpha", "modules_to_save", "bias", "rank_pattern", "alpha_pattern", "use_rslora",
                   "peft_type", "use_dora", "fan_in_fan_out", "target_modules", "trainable_token_indices"]
    return st.one_of(
        st.integers(0, len(raw) - 1).map(lambda k: ("truncate", k)),
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), min_size=1, max_size=8)
        .map(lambda flips: ("flip", flips)),
        st.binary(max_size=400).map(lambda b: ("garbage", b)),
        json_values.map(lambda v: ("config", v)),
        st.sampled_from(["{", "", "null", "[]", '{"r": NaN}', "\x00", '{"r": 1e999}'])
        .map(lambda t: ("config_text", t)),
        st.tuples(st.sampled_from(config_keys), st.one_of(json_values, st.floats())).map(lambda kv: ("field", kv)),
        st.tuples(st.sampled_from(keys), st.sampled_from(["drop", "nan", "transpose", "grow", "int", "scalar"]))
        .map(lambda kv: ("tensor", kv)),
        st.sampled_from(["lm_head.weight", "base_model.model.model.embed_tokens.weight", "foo", "x.lora_A.weight",
                         "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"])
        .map(lambda k: ("extra", k)),
        json_values.map(lambda v: ("meta", v)),
    ), cfg, raw


@pytest.fixture(scope="module")
def fuzz_lib(tmp_path_factory, tiny_model, good_adapter):
    root = tmp_path_factory.mktemp("fuzz-lib")
    add_adapter(root / "lib", "seed", good_adapter, model=str(tiny_model))
    return root


def test_library_add_on_damaged_adapter_files(good_adapter, tiny_model, fuzz_lib):
    from safetensors.torch import save_file

    mutations, cfg, raw = _mutations(good_adapter)
    lib = fuzz_lib / "lib"
    added = {"seed"}
    counter = iter(range(10 ** 6))

    @FUZZ
    @given(mutations)
    def run(mutation):
        kind, arg = mutation
        name = f"m{next(counter)}"
        with tempfile.TemporaryDirectory(dir=fuzz_lib) as tmp:
            src = shutil.copytree(good_adapter, Path(tmp) / name)
            if kind == "truncate":
                (src / WEIGHTS_FILE).write_bytes(raw[:arg])
            elif kind == "flip":
                b = bytearray(raw)
                for pos, val in arg:
                    b[pos] = val
                (src / WEIGHTS_FILE).write_bytes(bytes(b))
            elif kind == "garbage":
                (src / WEIGHTS_FILE).write_bytes(arg)
            elif kind == "config":
                (src / CONFIG_FILE).write_text(json.dumps(arg))
            elif kind == "config_text":
                (src / CONFIG_FILE).write_text(arg)
            elif kind == "field":
                (src / CONFIG_FILE).write_text(json.dumps(dict(cfg, **{arg[0]: arg[1]})))
            elif kind in ("tensor", "extra"):
                ts = _tensors(good_adapter)
                if kind == "extra":
                    ts[arg] = torch.zeros(4, 64)
                else:
                    key, how = arg
                    t = ts.pop(key)
                    if how != "drop":
                        ts[key] = {"nan": lambda: torch.full_like(t, float("nan")),
                                   "transpose": lambda: t.T.contiguous(),
                                   "grow": lambda: torch.zeros(t.shape[0] + 1, t.shape[1]),
                                   "int": lambda: t.to(torch.int64), "scalar": lambda: torch.tensor(1.0)}[how]()
                save_file(ts, str(src / WEIGHTS_FILE))
            elif kind == "meta":
                (src / "dlp_adapter.json").write_text(json.dumps(arg))
            try:
                add_adapter(lib, name, src, model=str(tiny_model))
            except DLPLoRAError as exc:
                assert str(exc)
            else:
                added.add(name)
                w = load_peft_adapter(lib / "adapters" / name)  # what got in loads, finite
                assert all(bool(torch.isfinite(a).all() and torch.isfinite(b).all()) for a, b, _ in w.layers.values())
        assert set(Library.open(lib).names) == added
        assert not [p for p in (lib / "adapters").iterdir() if p.name.startswith(".")]  # no half-copied adapter

    run()  # most mutations are refused; some (a flipped byte inside a weight, an ignored config field) are fine


def test_special_strings_are_text(plugin, tokenizer):
    for s in SPECIAL:
        chat_prompt(tokenizer, s + " x")
        plugin.route([s + " add"])
