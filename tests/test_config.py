"""The shared configuration (dlplora.config) and the one PEFT adapter reader (dlplora.adapters)."""

from __future__ import annotations

import pytest

from dlplora.adapters import pattern_value
from dlplora.config import RoutingConfig, check_p, check_selection_args
from dlplora.errors import DLPLoRAError


def test_check_p_and_selection_args():
    assert check_p(1) == 1.0 and check_p(0.6) == 0.6
    for bad in (0, 1.5, -0.1, None, True, "0.5"):
        with pytest.raises(DLPLoRAError, match=r"must be a number in \(0, 1\]"):
            check_p(bad)
    with pytest.raises(DLPLoRAError, match="--p-sweep values must"):
        check_p(2, "--p-sweep values")
    check_selection_args(None, 3, "renorm", 0.5)  # top-k replaces p
    with pytest.raises(DLPLoRAError, match="top-k"):
        check_selection_args(0.6, 0, "softmax", 0.0)
    with pytest.raises(DLPLoRAError, match="unknown weighting"):
        check_selection_args(0.6, None, "max", 0.0)
    with pytest.raises(DLPLoRAError, match="floor"):
        check_selection_args(0.6, None, "softmax", 1.5)


def test_routing_config_checks_and_replaces():
    r = RoutingConfig()
    assert r.selection() == {"p": 0.6, "top_k": None, "weighting": "softmax", "floor": 0.0}
    r2 = r.replace(p=0.9, window=2)
    assert (r2.p, r2.window, r.p) == (0.9, 2, 0.6)
    with pytest.raises(DLPLoRAError, match="fusion mode"):
        RoutingConfig(mode="fast")
    with pytest.raises(DLPLoRAError, match="window"):
        RoutingConfig(window=-1)
    with pytest.raises(TypeError, match="route_windw"):
        r.replace(route_windw=1)


def test_engine_routing_keywords_map_to_the_config(tiny_model, tmp_path):
    from dlplora.engine import routing_config

    assert routing_config(None, p=0.8, route_window=3) == RoutingConfig(p=0.8, window=3)
    with pytest.raises(DLPLoRAError):
        routing_config(None, p=0)


def test_pattern_value_is_peft_s_regex_rule():
    pats = {"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 16}
    assert pattern_value(pats, "model.layers.0.self_attn.q_proj", 8) == 4
    assert pattern_value(pats, "model.layers.1.self_attn.v_proj", 8) == 16
    assert pattern_value(pats, "model.layers.0.self_attn.v_proj", 8) == 8
    assert pattern_value(pats, "model.layers.0.self_attn.xq_proj", 8) == 8  # whole name segments, not a suffix
