"""Attention sinks: the rule, shares against direct computations, the record summary, exclusion in maps."""
import importlib.util
import pathlib

import numpy as np
import pytest
import torch

from minicpmv_attn.analysis.attention_map import (
    SINK_FACTOR, find_sinks, format_record_summary, image_heatmap, llm_rollout, record_summary, sink_shares,
)
from minicpmv_attn.capture import hook_name

_spec = importlib.util.spec_from_file_location(
    "_attention_map_builders_sinks", pathlib.Path(__file__).with_name("test_attention_map.py"))
_b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_b)


def planted(padding=1, sink=3, mass=0.6):
    """A random record where every row that sees ``sink`` puts ``mass`` on it (rest rescaled)."""
    layout = _b.build_layout([((300, 200), (3, 2), (4, 6), (5, 5))], padding=padding)
    rec = _b.build_record(layout, seed=8)
    L = len(layout.tokens)
    for l in (0, 1):
        t = rec.tensors[hook_name("llm", l)]
        t[:, :, :padding] = 0
        t /= t.sum(-1, keepdim=True).clamp_min(1e-30)
        rows = torch.arange(L) > sink
        t[:, rows] *= 1 - mass
        t[:, rows, sink] += mass
        t[:, :padding] = 0  # padding query rows are zero in captured maps
    return rec


def direct_shares(rec, sinks, rows):
    return np.stack([rec.tensors[hook_name("llm", l)][:, rows][..., sinks].sum(-1).mean(-1).numpy()
                     for l in rec.layers("llm")])  # [n_layers, H]


def test_rule_finds_planted_sink_and_first_token():
    rec = planted(padding=1, sink=3)
    assert find_sinks(rec) == [1, 3]  # first non-padding token, then the planted one
    assert find_sinks(rec, factor=1e9) == [1]
    rec0 = planted(padding=0, sink=9, mass=0.02)  # too little to pass 5x uniform
    assert find_sinks(rec0) == [0]


def test_sink_shares_equal_direct_computation():
    rec = planted(padding=1, sink=3)
    L = len(rec.layout.tokens)
    ss = sink_shares(rec)
    rows = list(range(1, L))  # every captured row past the padding
    assert ss.sinks == [1, 3] and ss.rows == rows and ss.shares.shape == (2, 3) and ss.heads == [0, 1, 2]
    np.testing.assert_allclose(ss.shares, direct_shares(rec, [1, 3], rows), atol=1e-12)
    np.testing.assert_allclose(ss.per_sink[1], direct_shares(rec, [3], rows), atol=1e-12)
    assert [s.position for s in ss] == [1, 3] and ss.factor == SINK_FACTOR
    mean = sink_shares(rec, rows="generated", per_head=False, sinks=[2, 3])
    gen = list(range(rec.layout.n_prompt - 1, L - 1))
    assert mean.factor is None and mean.shares.shape == (2,)
    np.testing.assert_allclose(mean.shares, direct_shares(rec, [2, 3], gen).mean(1), atol=1e-12)


def test_sink_shares_on_chat_record():
    rec = _b.chat_record()
    P = rec.layout.n_prompt
    ss = sink_shares(rec, rows="last", sinks=[0, 5])
    want = np.stack([rec.tensors[hook_name("llm", l)][:, P - 1, [0, 5]].double().sum(-1).numpy()
                     for l in rec.layers("llm")])
    np.testing.assert_allclose(ss.shares, want, atol=1e-9)
    auto = sink_shares(rec)
    assert auto.sinks[0] == 0 and auto.rows == list(range(len(rec.layout.tokens) - 1))
    cols = rec.tensors["llm.layers.0.attn"]
    part = type(rec)(tensors=dict(rec.tensors), index={k: dict(v) for k, v in rec.index.items()}, layout=rec.layout)
    img = rec.layout.positions("image")
    part.tensors["llm.layers.0.attn"] = cols[:, :, img]
    part.index["llm.layers.0.attn"]["cols"] = img
    with pytest.raises(ValueError, match=r"lacks the key columns of sink position\(s\) \[0\]"):
        sink_shares(part, sinks=[0], layers=[0])


def test_record_summary_lists_sink_shares_per_layer():
    rec = planted(padding=1, sink=3)
    s = record_summary(rec)
    assert s["tokens"]["padding"] == 1 and s["sinks"]["positions"] == [1, 3]
    np.testing.assert_allclose(s["sinks"]["share"], sink_shares(rec, per_head=False).shares, atol=1e-4)
    assert len(s["role_shares"]["image"]) == 2
    text = format_record_summary(s)
    assert "sinks: 1 '<s>', 3 't1'" in text and "role shares per layer [0, 1]" in text
    chat = record_summary(_b.chat_record("last"))
    assert chat["tokens"]["generated"] == 4 and chat["captured"]["llm"]["rows"] == str(chat["tokens"]["prompt"] - 1)
    assert "unavailable" not in chat["sinks"]


def test_image_heatmap_exclude_sinks():
    rec = planted(padding=1, sink=3)
    P = rec.layout.n_prompt
    base = image_heatmap(rec, "last")
    ex = image_heatmap(rec, "last", exclude_sinks=True)
    A = torch.stack([rec.tensors[hook_name("llm", l)] for l in (0, 1)]).mean((0, 1))[P - 1].numpy()
    sink = A[[1, 3]].sum()
    assert ex.extra["sinks"] == [1, 3] and ex.extra["sink_share"] == pytest.approx(sink)
    np.testing.assert_allclose(ex.map, base.map / (1 - sink), rtol=1e-5, atol=1e-12)
    assert sum(ex.shares.values()) == pytest.approx(1.0)
    # a sink on an image token drops that token out of the map
    tok = rec.layout.slices[0].token_span[0]
    mine = image_heatmap(rec, "last", exclude_sinks=True, sinks=[tok])
    assert mine.image_share == pytest.approx((A[rec.layout.positions("image")].sum() - A[tok]) / (1 - A[tok]))
    # rollout: the rolled-out row loses its sink columns
    R = llm_rollout(rec)
    ro = image_heatmap(rec, "last", layer_reduce="rollout", exclude_sinks=True)
    img = rec.layout.positions("image")
    assert ro.image_share == pytest.approx(R[P - 1, img].sum() / (R[P - 1].sum() - R[P - 1, [1, 3]].sum()))
