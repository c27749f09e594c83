"""Hypothesis strategies shared by the fuzz tests (test_fuzz.py, test_fuzz_serve.py): hostile text and odd JSON."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st

from dlplora.config import TURN_SEPARATOR

# small budgets: each fuzz file runs in well under a minute on one thread
FUZZ = settings(max_examples=80, deadline=None, derandomize=True)

SPECIAL = ["\x00", "\ud800", "\udfff", "\udc00x", TURN_SEPARATOR, "\x1e", "\n", "\r\n", "\t", " ", "\x0b", "\x85",
           "\u2028", "\ufeff", "\u200b", "\u0130", "\u00df", "\u00e9", "\U0001f642", "<|im_start|>", "<|im_end|>",
           "<|endoftext|>", "\\", '"', "{{ x }}", "{% if %}", "hi\x00there", "a\x00"]

# any code point, lone surrogates and controls included (JSON can carry "\ud800")
weird_char = st.one_of(st.characters(codec=None, categories=["Cs", "Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn"]),
                       st.characters())
short_texts = st.one_of(
    st.text(weird_char, max_size=60),
    st.lists(st.one_of(st.sampled_from(SPECIAL), st.text(max_size=4)), max_size=16).map("".join),
)
texts = st.one_of(  # empty to huge
    short_texts,
    st.builds(lambda s, k: s * k, st.sampled_from(["a", "\x00", " ", "hi\x00there ", "\ud800", "\u00e9", "x y\n"]),
              st.integers(0, 40_000)),
)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(weird_char, max_size=12))
json_values = st.recursive(
    json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12)


def deep(depth: int, kind: str = "[") -> bytes:
    """A JSON text nested `depth` deep (arrays or objects)."""
    if kind == "[":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth
