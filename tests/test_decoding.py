"""The decoding primitives (dlplora.decoding) the engine, the server and the evaluation share."""

from __future__ import annotations

import pytest
import torch

from dlplora.decoding import StopStreamer, decode_loop, decode_step, left_pad, prefill

pytestmark = pytest.mark.usefixtures("one_thread")


def test_left_pad_positions_count_each_rows_own_tokens():
    ids, mask, pos = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@torch.inference_mode()
def test_prefill_and_decode_step_of_a_padded_batch_equal_each_row_alone(model):
    rows = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33]]
    cache, mask, pos, logits = prefill(model, rows, pad_id=0)
    nxt = logits.argmax(-1)
    mask = torch.cat([mask, torch.ones((3, 1), dtype=mask.dtype)], 1)
    step = decode_step(model, nxt, mask, pos[:, -1:] + 1, cache)
    for i, r in enumerate(rows):
        _, m1, p1, alone = prefill(model, [r], pad_id=0)
        torch.testing.assert_close(logits[i], alone[0], atol=1e-4, rtol=1e-4)
        full = model(input_ids=torch.tensor([r + [int(nxt[i])]])).logits[0, -1]
        torch.testing.assert_close(step[i], full, atol=1e-4, rtol=1e-4)


def test_decode_loop_limits_and_eos(model):
    rows = [[11, 12, 13], [21, 22]]
    gen, why = decode_loop(model, rows, [4, 2], eos_ids=[], pad_id=0)
    assert [len(g) for g in gen] == [4, 2] and why == ["length", "length"]
    first = gen[0][0]
    gen, why = decode_loop(model, rows[:1], 4, eos_ids=[first], pad_id=0)
    assert gen == [[]] and why == ["stop"]  # the EOS token is not part of the output


def test_stop_streamer_holds_back_what_a_stop_string_may_still_claim():
    s = StopStreamer(["END"])
    assert s.update("Hel") == ("H", False)  # the last len("END") - 1 characters wait
    assert s.update("Hello E") == ("ello", False)
    assert s.update("Hello EN") == (" ", False)
    assert s.update("Hello ENDing") == ("", True) and s.text == "Hello "  # "EN" was never streamed
    s = StopStreamer(["END"])
    assert s.update("abc") == ("a", False) and s.update("abcd", final=True) == ("bcd", False)
    s = StopStreamer()
    assert s.update("ab\ufffd") == ("ab", False)  # half of a multi-byte character waits
    assert s.update("ab\u00e9") == ("\u00e9", False)
    s = StopStreamer(["x", "yz"])
    assert s.update("a yz b x") == ("a ", True) and s.text == "a "  # the first stop string in the text wins
