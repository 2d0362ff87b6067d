"""Mapping tests on hand-built attention records (no model needed)."""
import numpy as np
import pytest
import torch

from minicpmv_attn.analysis.attention_map import (
    find_slice, image_heatmap, image_token_table, llm_rollout, lookup_image_token, patch_box,
    place_patch_map, query_patch_map, role_shares, rollout, vision_patch_map,
    vision_received_map, vision_rollout,
)
from minicpmv_attn.attention_record import AttentionRecord, ImageLayout, SliceLayout, TokenLayout
from minicpmv_attn.capture import hook_name

Q = 4


def build_layout(images, n_text=3, n_gen=2, padding=0):
    """images: list of (size (W, H), grid (cols, rows) or None, source tgt, slice tgt).

    Sequence: [pad]* <s> text* per image: <image> unk*Q </image> then per grid row
    (<slice> unk*Q </slice>)* "\\n"; text*; generated*.
    """
    tokens, roles = ["<pad>"] * padding, ["special"] * padding
    bounds, layouts = [], []

    def add(tok, role):
        tokens.append(tok)
        roles.append(role)
        return len(tokens) - 1

    add("<s>", "special")
    for k in range(n_text):
        add(f"t{k}", "text")
    for i, (size, grid, src_tgt, sl_tgt) in enumerate(images):
        W, H = size
        im = ImageLayout(index=i, size=(W, H), grid=grid)
        add("<image>", "special")
        start = len(tokens)
        for _ in range(Q):
            add("<unk>", "image")
        bounds.append((start, len(tokens)))
        im.slices.append(SliceLayout(image=i, index=0, kind="source", tgt_size=src_tgt,
                                     box=(0.0, 0.0, float(W), float(H)), token_span=(start, start + Q)))
        add("</image>", "special")
        if grid is not None:
            cols, rows = grid
            for r in range(rows):
                for c in range(cols):
                    add("<slice>", "special")
                    start = len(tokens)
                    for _ in range(Q):
                        add("<unk>", "image")
                    bounds.append((start, len(tokens)))
                    box = (c * W / cols, r * H / rows, (c + 1) * W / cols, (r + 1) * H / rows)
                    im.slices.append(SliceLayout(image=i, index=len(im.slices), kind="slice", tgt_size=sl_tgt, box=box,
                                                 token_span=(start, start + Q), grid_pos=(r, c)))
                    add("</slice>", "special")
                add("\n", "text")
        layouts.append(im)
    for k in range(n_text):
        add(f"u{k}", "text")
    n_prompt = len(tokens)
    for k in range(n_gen):
        add(f"g{k}", "text")
    return TokenLayout(input_ids=list(range(len(tokens))), tokens=tokens, roles=roles,
                       image_bound=bounds, images=layouts, n_prompt=n_prompt, padding=padding)


def causal_softmax(g, heads, L):
    x = torch.randn(heads, L, L, generator=g, dtype=torch.float64)
    x = x.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
    return x.softmax(-1)


def build_record(layout, n_layers=2, heads=3, res_heads=2, vis_heads=2, vis_layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = len(layout.tokens)
    tensors, index = {}, {}
    for l in range(n_layers):
        tensors[hook_name("llm", l)] = causal_softmax(g, heads, L)
        index[hook_name("llm", l)] = {"rows": None, "cols": None, "heads": None, "reduce": "none"}
    sl = layout.slices
    P = max(h * w for h, w in (s.tgt_size for s in sl))
    res = torch.zeros(len(sl), res_heads, Q, P, dtype=torch.float64)
    vis = [torch.zeros(len(sl), vis_heads, P, P, dtype=torch.float64) for _ in range(vis_layers)]
    for s, x in enumerate(sl):
        n = x.tgt_size[0] * x.tgt_size[1]
        res[s, :, :, :n] = torch.randn(res_heads, Q, n, generator=g, dtype=torch.float64).softmax(-1)
        for v in vis:
            v[s, :, :n, :n] = torch.randn(vis_heads, n, n, generator=g, dtype=torch.float64).softmax(-1)
    tensors["resampler.attn"] = res
    index["resampler.attn"] = {"heads": None, "reduce": "none"}
    for l, v in enumerate(vis):
        tensors[hook_name("vision", l)] = v
        index[hook_name("vision", l)] = {"heads": None, "reduce": "none"}
    return AttentionRecord(tensors=tensors, index=index, layout=layout)


CASES = {
    # name: (size, grid, source tgt (rows, cols), slice tgt)
    "300x200_grid3x2": ((300, 200), (3, 2), (4, 6), (5, 5)),
    "150x260_grid1x3": ((150, 260), (1, 3), (7, 4), (3, 6)),
    "90x90_unsliced": ((90, 90), None, (3, 3), None),
}


def one_hot_record(layout, row, col, slice_g, query, patch):
    """LLM row ``row`` attends only to position ``col``; resampler query ``query`` of
    slice ``slice_g`` only to ``patch`` (every layer, every head)."""
    rec = build_record(layout)
    for name, t in rec.tensors.items():
        if name.startswith("llm."):
            t[:, row, :] = 0
            t[:, row, col] = 1
    res = rec.tensors["resampler.attn"]
    res[slice_g, :, query, :] = 0
    res[slice_g, :, query, patch] = 1
    return rec


def expected_pixels(box, W, H):
    """Mask of pixels touched by box and the area each overlaps."""
    x0, y0, x1, y1 = box
    xs = np.clip(np.minimum(np.arange(1, W + 1), x1) - np.maximum(np.arange(W), x0), 0, None)
    ys = np.clip(np.minimum(np.arange(1, H + 1), y1) - np.maximum(np.arange(H), y0), 0, None)
    return np.outer(ys, xs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_hot_lights_exactly_the_patch_box(case):
    size, grid, src_tgt, sl_tgt = CASES[case]
    layout = build_layout([(size, grid, src_tgt, sl_tgt)])
    W, H = size
    row = len(layout.tokens) - 1  # last generated token
    rng = np.random.default_rng(1)
    for sl_index in range(len(layout.images[0].slices)):
        g = find_slice(layout, 0, sl_index)
        sl = layout.slices[g]
        h, w = sl.tgt_size
        query = int(rng.integers(Q))
        patch = int(rng.integers(h * w))
        col = sl.token_span[0] + query
        rec = one_hot_record(layout, row, col, g, query, patch)
        hm = image_heatmap(rec, row)
        box = patch_box(sl, patch)
        area = (box[2] - box[0]) * (box[3] - box[1])
        want = expected_pixels(box, W, H) / area  # mass per pixel
        assert hm.map.shape == (H, W)
        np.testing.assert_allclose(hm.map, want, atol=1e-6)
        # nothing outside the box's pixel footprint
        ys, xs = np.nonzero(hm.map > 1e-9)
        assert (xs.min(), ys.min()) == (int(np.floor(box[0])), int(np.floor(box[1])))
        assert (xs.max() + 1, ys.max() + 1) == (int(np.ceil(box[2] - 1e-9)), int(np.ceil(box[3] - 1e-9)))
        assert hm.map.sum() == pytest.approx(1.0, abs=1e-5)
        assert hm.image_share == pytest.approx(1.0)
        assert hm.shares["image"] == pytest.approx(1.0) and hm.shares["text"] == pytest.approx(0.0)
        # the light comes through the right part
        part, other = (hm.source_map, hm.slices_map) if sl.kind == "source" else (hm.slices_map, hm.source_map)
        np.testing.assert_allclose(part, want, atol=1e-6)
        if other is not None:
            assert np.abs(other).max() < 1e-12


def test_patch_boxes_of_grid_slices():
    layout = build_layout([((300, 200), (3, 2), (4, 6), (5, 5))])
    sl = layout.slices[find_slice(layout, 0, 5)]  # row 1, col 1 -> box (100, 100, 200, 200)
    assert sl.grid_pos == (1, 1) and sl.box == (100.0, 100.0, 200.0, 200.0)
    assert patch_box(sl, 0) == (100.0, 100.0, 120.0, 120.0)
    assert patch_box(sl, (4, 4)) == (180.0, 180.0, 200.0, 200.0)
    assert patch_box(sl, 7) == (140.0, 120.0, 160.0, 140.0)  # row 1, col 2
    with pytest.raises(ValueError, match="outside"):
        patch_box(sl, 25)


def test_token_lookup():
    layout = build_layout([((300, 200), (3, 2), (4, 6), (5, 5)), ((90, 90), None, (3, 3), None)])
    table = image_token_table(layout)
    assert len(table) == Q * (1 + 6 + 1)
    for g, sl in enumerate(layout.slices):
        for j in range(Q):
            t = table[sl.token_span[0] + j]
            assert (t.image, t.slice, t.slice_index, t.query) == (sl.image, g, sl.index, j)
            assert lookup_image_token(layout, sl.token_span[0] + j) == t
    assert all(layout.roles[p] == "image" for p in table)
    assert lookup_image_token(layout, 0) is None
    assert find_slice(layout, 1, 0) == 7
    with pytest.raises(ValueError, match="no slice 1 of image 1"):
        find_slice(layout, 1, 1)


def test_out_size_and_image_choice():
    layout = build_layout([((300, 200), (3, 2), (4, 6), (5, 5)), ((90, 90), None, (3, 3), None)])
    g = find_slice(layout, 0, 6)  # grid (row 1, col 2): box (200, 100, 300, 200)
    sl = layout.slices[g]
    row = len(layout.tokens) - 1
    rec = one_hot_record(layout, row, sl.token_span[0] + 1, g, 1, 24)  # last patch (4, 4)
    hm = image_heatmap(rec, row, out_size=(150, 100))
    assert hm.map.shape == (100, 150)
    ys, xs = np.nonzero(hm.map)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (140, 149, 90, 99)  # (280..300, 180..200) / 2
    np.testing.assert_allclose(hm.map[90:, 140:], 1 / 100)
    other = image_heatmap(rec, row, image=1)
    assert other.map.shape == (90, 90) and np.abs(other.map).max() == 0 and other.image_share == 0
    with pytest.raises(ValueError, match="no image 2"):
        image_heatmap(rec, row, image=2)


def test_shares_sum_and_combination_random_record():
    layout = build_layout([((300, 200), (3, 2), (4, 6), (5, 5)), ((150, 260), (1, 3), (7, 4), (3, 6))],
                          padding=2)
    rec = build_record(layout, seed=3)
    L = len(layout.tokens)
    row = L - 2
    A = torch.stack([rec.tensors[hook_name("llm", l)] for l in (0, 1)]).mean((0, 1))[row].numpy()
    roles = np.array(layout.roles)
    hm = image_heatmap(rec, row)
    for r in ("text", "image", "special"):
        assert hm.shares[r] == pytest.approx(A[roles == r].sum(), abs=1e-9)
    assert sum(hm.shares.values()) == pytest.approx(1.0)
    img0 = [p for s in layout.images[0].slices for p in range(*s.token_span)]
    assert hm.image_share == pytest.approx(A[img0].sum(), abs=1e-9)
    assert hm.image_share < hm.shares["image"]  # image 1 takes the rest
    np.testing.assert_allclose(hm.map.sum(), hm.image_share, rtol=1e-5)
    np.testing.assert_allclose(hm.map, hm.source_map + hm.slices_map, atol=1e-9)
    only_src = image_heatmap(rec, row, include_slices=False)
    src_tokens = range(*layout.images[0].slices[0].token_span)
    assert only_src.map.sum() == pytest.approx(A[list(src_tokens)].sum(), rel=1e-5)
    assert only_src.slices_map is None
    smooth = image_heatmap(rec, row, interpolation="bilinear")
    assert smooth.map.sum() == pytest.approx(hm.map.sum(), rel=1e-5)
    assert not np.allclose(smooth.map, hm.map)
    # per-layer and per-head maps
    per = image_heatmap(rec, row, layer_reduce=None, head_reduce=None, out_size=(30, 20))
    assert per.map.shape == (2, 3, 20, 30)
    np.testing.assert_allclose(per.map.mean((0, 1)), image_heatmap(rec, row, out_size=(30, 20)).map, atol=1e-7)
    one = image_heatmap(rec, row, layers=[1], heads=[2])
    A12 = rec.tensors["llm.layers.1.attn"][2, row].numpy()
    assert one.image_share == pytest.approx(A12[img0].sum())


def test_restricted_columns_and_missing_pieces():
    layout = build_layout([((300, 200), (3, 2), (4, 6), (5, 5))])
    rec = build_record(layout, seed=5)
    L, P = len(layout.tokens), layout.n_prompt
    img_cols = layout.positions("image")
    full = image_heatmap(rec, P - 1)
    # keep only the last prompt row (rows="last", as a capture spec means it) and the image columns
    for l in (0, 1):
        name = hook_name("llm", l)
        rec.tensors[name] = rec.tensors[name][:, [P - 1]][:, :, img_cols].clone()
        rec.index[name] = {"rows": [P - 1], "cols": img_cols, "heads": None, "reduce": "none"}
    part = image_heatmap(rec, -1)  # negative rows count from the end of the prompt
    assert part.position == P - 1 and image_heatmap(rec, "last").position == P - 1
    np.testing.assert_allclose(part.map, full.map, atol=1e-9)
    assert part.shares["image"] == pytest.approx(full.shares["image"])
    assert np.isnan(part.shares["text"]) and np.isnan(part.shares["special"])
    with pytest.raises(ValueError, match=r"no query row for position\(s\) \[3\]"):
        image_heatmap(rec, 3)
    with pytest.raises(ValueError, match=r"lacks query rows 0\.\.\d+, \d+; key columns 0\.\.4, 9"):
        image_heatmap(rec, P - 1, layer_reduce="rollout")
    with pytest.raises(ValueError, match=r"no llm.layers.7.attn; captured llm layers: \[0, 1\]"):
        image_heatmap(rec, P - 1, layers=[7])
    with pytest.raises(ValueError, match="no head"):
        image_heatmap(rec, P - 1, heads=[5])
    del rec.tensors["resampler.attn"]
    with pytest.raises(ValueError, match="record has no resampler.attn; capture stage 'resampler'"):
        image_heatmap(rec, P - 1)
    no_llm = AttentionRecord(tensors={}, index={}, layout=layout)
    with pytest.raises(ValueError, match="capture stage 'llm'"):
        image_heatmap(no_llm, P - 1)
    with pytest.raises(ValueError, match="layout"):
        image_heatmap(AttentionRecord(tensors=rec.tensors, index=rec.index), P - 1)
    # image columns missing -> cannot map
    rec2 = build_record(layout, seed=5)
    for l in (0, 1):
        name = hook_name("llm", l)
        rec2.tensors[name] = rec2.tensors[name][:, :, : img_cols[0]].clone()
        rec2.index[name] = {"rows": None, "cols": list(range(img_cols[0])), "heads": None, "reduce": "none"}
    with pytest.raises(ValueError, match="key columns of image 0"):
        image_heatmap(rec2, L - 1)


def test_reduced_heads_record():
    layout = build_layout([((90, 90), None, (3, 3), None)])
    rec = build_record(layout, seed=2)
    full = image_heatmap(rec, -1)
    for l in (0, 1):
        name = hook_name("llm", l)
        rec.tensors[name] = rec.tensors[name].mean(0, keepdim=True)
        rec.index[name]["reduce"] = "mean"
    rec.tensors["resampler.attn"] = rec.tensors["resampler.attn"].mean(1, keepdim=True)
    rec.index["resampler.attn"]["reduce"] = "mean"
    red = image_heatmap(rec, -1)
    np.testing.assert_allclose(red.map, full.map, atol=1e-7)
    with pytest.raises(ValueError, match="reduced by 'mean'"):
        image_heatmap(rec, -1, heads=[0])


def test_rollout_by_hand():
    a1 = [[1.0, 0.0], [0.5, 0.5]]
    a2 = [[1.0, 0.0], [0.2, 0.8]]
    # 0.5 A + 0.5 I: [[1, 0], [.25, .75]] and [[1, 0], [.1, .9]]; product (layer 2) @ (layer 1)
    want = np.array([[1.0, 0.0], [0.1 * 1 + 0.9 * 0.25, 0.9 * 0.75]])
    np.testing.assert_allclose(rollout([a1, a2]), want)
    # rows renormalised after adding I: 0.5 * 3 A + 0.5 I = [[2, 0], [.75, 1.25]] -> [[1, 0], [.375, .625]]
    np.testing.assert_allclose(rollout([np.array(a1) * 3]), [[1.0, 0.0], [0.375, 0.625]])
    # through a record: two heads whose mean is a1 / a2
    layout = TokenLayout(input_ids=[0, 1], tokens=["a", "b"], roles=["text", "text"], image_bound=[])
    t1 = torch.tensor([[[1.0, 0.0], [0.9, 0.1]], [[1.0, 0.0], [0.1, 0.9]]])
    t2 = torch.tensor([[[1.0, 0.0], [0.4, 0.6]], [[1.0, 0.0], [0.0, 1.0]]])
    rec = AttentionRecord(tensors={"llm.layers.0.attn": t1, "llm.layers.1.attn": t2},
                          index={"llm.layers.0.attn": {}, "llm.layers.1.attn": {}}, layout=layout)
    np.testing.assert_allclose(llm_rollout(rec), want, atol=1e-7)
    np.testing.assert_allclose(llm_rollout(rec, layers=[1]), [[1, 0], [0.1, 0.9]], atol=1e-7)
    # head 1 only: 0.5 [[1,0],[.1,.9]] + 0.5 I = [[1,0],[.05,.95]], then 0.5 I + 0.5 I = I
    np.testing.assert_allclose(llm_rollout(rec, heads=[1]), [[1, 0], [0.05, 0.95]], atol=1e-7)
    with pytest.raises(ValueError, match="head_reduce"):
        llm_rollout(rec, head_reduce=None)


def test_rollout_heatmap_uses_rollout_row():
    layout = build_layout([((90, 90), None, (3, 3), None)], n_gen=1)
    rec = build_record(layout, seed=4)
    L = len(layout.tokens)
    R = llm_rollout(rec)
    hm = image_heatmap(rec, L - 1, layer_reduce="rollout")
    img = layout.positions("image")
    assert hm.image_share == pytest.approx(R[L - 1, img].sum())
    assert hm.map.sum() == pytest.approx(R[L - 1, img].sum(), rel=1e-5)
    assert sum(hm.shares.values()) == pytest.approx(1.0)


def test_role_shares_per_layer_and_head():
    layout = build_layout([((300, 200), (3, 2), (4, 6), (5, 5))], padding=1)
    rec = build_record(layout, seed=6)
    roles = np.array(layout.roles)
    gen = list(range(layout.n_prompt - 1, len(roles) - 1))  # rows that produced the generated tokens
    rs = role_shares(rec, rows="generated")
    assert rs.layers == [0, 1] and rs.rows == gen
    for l in (0, 1):
        A = rec.tensors[hook_name("llm", l)].mean(0)[gen].numpy()
        for r in ("text", "image", "special"):
            assert rs[r][l] == pytest.approx(A[:, roles == r].sum(1).mean())
    ph = role_shares(rec, rows=[-1], per_head=True)  # -1 = the last prompt row
    assert ph["image"].shape == (2, 3) and ph.heads == [0, 1, 2] and ph.rows == [layout.n_prompt - 1]
    A = rec.tensors["llm.layers.1.attn"][2, layout.n_prompt - 1].numpy()
    assert ph["image"][1, 2] == pytest.approx(A[roles == "image"].sum())
    np.testing.assert_allclose(ph["text"] + ph["image"] + ph["special"], 1.0)
    # default rows skip left padding; chunked evaluation gives the same means
    every = role_shares(rec)
    assert every.rows[0] == 1
    small = role_shares(rec, chunk=3)
    for r in ("text", "image", "special"):
        np.testing.assert_allclose(small[r], every[r], atol=1e-12)
    with pytest.raises(ValueError, match="rows must be"):
        role_shares(rec, rows="bogus")


def test_place_patch_map_exact_and_fractional():
    m = np.zeros((2, 3))
    m[1, 2] = 1.0
    out = place_patch_map(m, (0, 0, 30, 20), (30, 20))
    assert out.shape == (20, 30)
    np.testing.assert_allclose(out[10:, 20:], 1 / 100)
    assert out[:10].sum() == 0 and out[:, :20].sum() == 0
    # a box with fractional edges: partial pixels hold their share
    out = place_patch_map(np.ones((1, 1)), (0.5, 0, 2.5, 1), (3, 1))
    np.testing.assert_allclose(out, [[0.25, 0.5, 0.25]])
    with pytest.raises(ValueError, match="interpolation"):
        place_patch_map(m, (0, 0, 30, 20), (30, 20), interpolation="cubic")


def test_query_patch_map():
    layout = build_layout([((150, 260), (1, 3), (7, 4), (3, 6))])
    rec = build_record(layout)
    g = find_slice(layout, 0, 2)
    res = rec.tensors["resampler.attn"]
    m = query_patch_map(rec, 3, image=0, slice=2)
    assert m.shape == (3, 6)
    np.testing.assert_allclose(m.ravel(), res[g, :, 3, :18].mean(0).numpy())
    assert m.sum() == pytest.approx(1.0)


def vision_record():
    layout = build_layout([((300, 200), (3, 2), (2, 3), (2, 2))])
    rec = build_record(layout, vis_heads=2, vis_layers=2)
    return layout, rec


def test_vision_patch_maps():
    layout, rec = vision_record()
    g = find_slice(layout, 0, 0)  # source, 2 x 3 patches
    v = rec.tensors["vision.layers.1.attn"]
    v[g, :, 4, :] = 0
    v[g, 0, 4, 2] = 1.0  # head 0: patch (1, 1) -> patch (0, 2)
    v[g, 1, 4, 5] = 1.0  # head 1: patch (1, 1) -> patch (1, 2)
    m = vision_patch_map(rec, (1, 1), layer=1)
    want = np.zeros((2, 3))
    want[0, 2] = want[1, 2] = 0.5
    np.testing.assert_allclose(m, want)
    np.testing.assert_allclose(vision_patch_map(rec, 4, layer=1, heads=[1], head_reduce=None)[0], np.eye(1, 6, 5).reshape(2, 3))
    np.testing.assert_allclose(vision_patch_map(rec, 4, layer=1, head_reduce="max"), want * 2)
    got = vision_received_map(rec, 0, image=0, slice=0)
    A = rec.tensors["vision.layers.0.attn"][g, :, :6, :6].mean(0)
    np.testing.assert_allclose(got.ravel(), A.mean(0).numpy())
    # a grid slice of 2 x 2 patches: padded patch columns are ignored
    m = vision_patch_map(rec, 3, layer=0, image=0, slice=4)
    assert m.shape == (2, 2) and m.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"no vision.layers.5.attn"):
        vision_patch_map(rec, 0, layer=5)


def test_vision_rollout():
    layout, rec = vision_record()
    g = find_slice(layout, 0, 3)
    A0 = rec.tensors["vision.layers.0.attn"][g, :, :4, :4].mean(0).numpy()
    A1 = rec.tensors["vision.layers.1.attn"][g, :, :4, :4].mean(0).numpy()
    r0 = 0.5 * A0 + 0.5 * np.eye(4)
    r1 = 0.5 * A1 + 0.5 * np.eye(4)
    R = vision_rollout(rec, image=0, slice=3)
    np.testing.assert_allclose(R, r1 @ r0, atol=1e-12)
    np.testing.assert_allclose(vision_patch_map(rec, 2, layer="rollout", slice=3), (r1 @ r0)[2].reshape(2, 2))
    np.testing.assert_allclose(vision_received_map(rec, "rollout", slice=3), (r1 @ r0).mean(0).reshape(2, 2))
    del rec.tensors["vision.layers.0.attn"], rec.tensors["vision.layers.1.attn"]
    with pytest.raises(ValueError, match="capture stage 'vision'"):
        vision_rollout(rec)


def test_through_vision_follows_a_relay_patch_back_to_its_source():
    """A register-like relay: the LLM row reads one query, the query reads only a background patch,
    and that patch's SigLIP attention (both layers) comes from one object patch. The plain map lights
    the relay; ``through_vision`` moves the peak to the object, and equals res @ rollout exactly."""
    layout = build_layout([((90, 90), None, (3, 3), None)])
    row = len(layout.tokens) - 1
    sl = layout.slices[0]
    rec = one_hot_record(layout, row, sl.token_span[0] + 1, 0, query=1, patch=0)  # relay = patch (0, 0)
    for l in range(2):
        v = rec.tensors[hook_name("vision", l)]
        v[0, :, 0, :] = 0
        v[0, :, 0, 8] = 1.0  # patch (0, 0) reads patch (2, 2) only
    plain = image_heatmap(rec, row).map
    thru = image_heatmap(rec, row, through_vision=True)
    assert np.unravel_index(plain.argmax(), plain.shape) == (0, 0)
    peak_y, peak_x = np.unravel_index(thru.map.argmax(), thru.map.shape)
    assert peak_y >= 60 and peak_x >= 60  # inside patch (2, 2)'s box (60..90)
    assert thru.extra["through_vision"] is True
    assert thru.map.sum() == pytest.approx(plain.sum())  # rollout rows sum to 1: mass is moved, not made
    # exactly the resampler map composed with the slice's SigLIP rollout, placed like any patch map
    R = vision_rollout(rec, image=0, slice=0)
    a = rec.tensors["resampler.attn"][0, :, 1, :9].mean(0).numpy() @ R
    want = place_patch_map(a.reshape(3, 3), sl.box, (90, 90), (90, 90), "nearest")
    np.testing.assert_allclose(thru.map, want, atol=1e-6)


def test_through_vision_on_sliced_image_and_missing_vision():
    layout, rec = vision_record()
    row = len(layout.tokens) - 1
    thru = image_heatmap(rec, row, through_vision=True)
    plain = image_heatmap(rec, row)
    assert thru.map.shape == plain.map.shape
    assert thru.map.sum() == pytest.approx(plain.map.sum(), rel=1e-5)
    assert not np.allclose(thru.map, plain.map)
    # a gap in the layers is refused (the rollout would silently skip the first layer)
    name0 = hook_name("vision", 0)
    keep = rec.tensors.pop(name0)
    with pytest.raises(ValueError, match=r"holds vision layers \[1\] \(missing \[0\]\)"):
        image_heatmap(rec, row, through_vision=True)
    rec.tensors[name0] = keep
    # vision captured for the overview only: the grid slice it lacks is named
    g = find_slice(layout, 0, 0)
    for l in range(2):
        name = hook_name("vision", l)
        rec.tensors[name] = rec.tensors[name][g:g + 1].clone()
        rec.index[name] = dict(rec.index[name], slices=[g])
    with pytest.raises(ValueError, match=r"through_vision needs the SigLIP attention of every slice of image 0.*slice 1"):
        image_heatmap(rec, row, through_vision=True)
    image_heatmap(rec, row, through_vision=False)  # the plain map does not need them
    del rec.tensors[hook_name("vision", 0)], rec.tensors[hook_name("vision", 1)]
    with pytest.raises(ValueError, match=r"capture stage 'vision'"):
        image_heatmap(rec, row, through_vision=True)


# ------------------------------------------------------------------------------------------ chat records
_CHAT = {}


def chat_record(rows="all"):
    """A real chat record of the tiny demo model (prompt + 4 generated tokens; the last one is never
    fed, so the LLM maps hold rows 0..L-2 over L columns), cached per row selection."""
    if rows not in _CHAT:
        from minicpmv_attn.analysis import pipeline
        from minicpmv_attn.demo import demo_image_path
        from minicpmv_attn.image_processing_minicpmv import load_image

        if "model" not in _CHAT:
            _CHAT["model"] = pipeline.load_model_and_processor(None)[:2]
        net, proc = _CHAT["model"]
        spec = {"stages": ["llm", "resampler"], "rows": rows, "dtype": "float32", "device": "cpu"}
        _, rec = pipeline.capture_chat(net, proc, load_image(demo_image_path()), "Hi", spec, max_new_tokens=4,
                                       min_new_tokens=4, progress=False)
        _CHAT[rows] = rec
    return _CHAT[rows]


def test_row_convention_on_chat_records():
    from minicpmv_attn.analysis.attention_map import fed_length, llm_attention_rows, prompt_length, resolve_rows

    rec = chat_record()
    L, P = len(rec.layout.tokens), rec.layout.n_prompt
    t = rec.tensors["llm.layers.2.attn"]
    assert L - P == 4 and t.shape[1:] == (L - 1, L) and fed_length(rec) == L - 1 and prompt_length(rec) == P
    assert resolve_rows(rec, "last") == resolve_rows(rec, -1) == [P - 1]
    assert resolve_rows(rec, "generated") == list(range(P - 1, L - 1))
    assert resolve_rows(rec, [-2, 3, P + 1]) == [P - 2, 3, P + 1]
    w, cov, _ = llm_attention_rows(rec, 2, [-1])
    np.testing.assert_allclose(w[0], t[:, P - 1].double().mean(0).numpy(), atol=1e-12)
    assert cov.all()
    w, _, _ = llm_attention_rows(rec, 2, "generated", head_reduce=None)
    np.testing.assert_allclose(w, t[:, P - 1: L - 1].double().numpy(), atol=1e-12)
    roles = np.array(rec.layout.roles)
    for rows, sel in (("last", [P - 1]), ("generated", list(range(P - 1, L - 1))), (-3, [P - 3])):
        rs = role_shares(rec, rows=rows)
        assert rs.rows == sel
        for r in ("text", "image", "special"):
            want = [t_l[:, sel][..., roles == r].double().sum(-1).mean().item()
                    for t_l in (rec.tensors[f"llm.layers.{l}.attn"] for l in rs.layers)]
            np.testing.assert_allclose(rs[r], want, atol=1e-9)
    hm = image_heatmap(rec, "last")
    assert hm.position == P - 1 and 0 < hm.image_share <= 1
    with pytest.raises(ValueError, match=r"position\(s\) \[%d\] were never fed" % (L - 1)):
        llm_attention_rows(rec, 0, [L - 1])
    with pytest.raises(ValueError, match="outside the sequence"):
        resolve_rows(rec, [-P - 1])


def test_rollout_on_chat_record_is_the_fed_square():
    rec = chat_record()
    L = len(rec.layout.tokens)
    mats = []
    for l in rec.layers("llm"):
        t = rec.tensors[f"llm.layers.{l}.attn"].double()
        assert float(t[:, :, L - 1].abs().max()) == 0.0  # the never-fed last column
        mats.append(t[:, :, : L - 1].mean(0))
    want = torch.eye(L - 1, dtype=torch.float64)
    for a in mats:
        a = 0.5 * a + 0.5 * torch.eye(L - 1, dtype=torch.float64)
        want = (a / a.sum(-1, keepdim=True)) @ want
    R = llm_rollout(rec)
    assert R.shape == (L - 1, L - 1)
    np.testing.assert_allclose(R, want.numpy(), atol=1e-10)
    hm = image_heatmap(rec, L - 2, layer_reduce="rollout")  # the row that produced the last token
    img = rec.layout.positions("image")
    assert hm.image_share == pytest.approx(R[L - 2, img].sum())
    with pytest.raises(ValueError, match="never fed"):
        image_heatmap(rec, L - 1, layer_reduce="rollout")
    last = chat_record("last")  # rows missing: named
    with pytest.raises(ValueError, match=r"lacks query rows 0\.\.%d, %d\.\.%d \(holds rows %d" % (
            last.layout.n_prompt - 2, last.layout.n_prompt, L - 2, last.layout.n_prompt - 1)):
        llm_rollout(last)
    # a leak into the never-fed column is refused, not dropped silently
    bad = AttentionRecord(tensors=dict(rec.tensors), index=dict(rec.index), layout=rec.layout)
    t = rec.tensors["llm.layers.0.attn"].clone()
    t[0, 5, L - 1] = 0.5
    bad.tensors["llm.layers.0.attn"] = t
    with pytest.raises(ValueError, match="never-fed columns"):
        llm_rollout(bad)
