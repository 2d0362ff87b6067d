"""Tests written to kill mutants that survived the mutation pass (scripts/mutation_pass.py,
docs/mutation_pass.md): each names the wrong edit it catches. Deterministic, CPU, seconds."""
import random

import numpy as np
import pytest
import torch

from golden import load_inputs
from minicpmv_attn.analysis import attention_map as am
from minicpmv_attn.demo.pointing import chat_record, map_kinds, peak, play
from minicpmv_attn.demo.scenes import COLORS, make_scene
from test_attention_map import CASES as MAP_CASES, build_layout, build_record
from test_golden import load


# --------------------------------------------------------------------------------------
# head mean / max (capture.py and analysis/attention_map.py): deterministic, not only hypothesis
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [None, {"llm": [1, 3]}])
def test_capture_head_mean_and_max_are_the_per_head_mean_and_max(heads):
    """capture.py: reduce='mean' / 'max' equal the per-head capture's mean / max over the selected
    heads, in every stage (kills mean<->max swapped and a reduction over the wrong axis)."""
    model = load("single_image")
    data, mask = load_inputs("single_image")
    got = {}
    for reduce in ("none", "mean", "max"):
        with torch.no_grad():
            out = model(data, attention_mask=mask, output_attentions={"reduce": reduce, "heads": heads,
                                                                      "dtype": "float32"})
        got[reduce] = out.captured
    assert sorted(got["mean"]) == sorted(got["none"]) and len(got["none"]) > 3
    for name, per_head in got["none"].items():
        assert got["mean"][name].shape[1] == got["max"][name].shape[1] == 1
        torch.testing.assert_close(got["mean"][name], per_head.mean(1, keepdim=True), atol=1e-6, rtol=0)
        torch.testing.assert_close(got["max"][name], per_head.amax(1, keepdim=True), atol=1e-6, rtol=0)
        assert (got["max"][name] - got["mean"][name]).abs().max() > 1e-3, name  # the two can be told apart


def test_map_head_mean_and_max_are_the_per_head_mean_and_max():
    """analysis/attention_map.py _reduce_heads: head_reduce='mean' / 'max' of LLM rows, resampler maps
    and vision maps equal numpy's mean / max over the per-head values (kills mean<->max)."""
    size, grid, src, sl = MAP_CASES["300x200_grid3x2"]
    rec = build_record(build_layout([(size, grid, src, sl)]))
    per, _, _ = am.llm_attention_rows(rec, 1, "all", head_reduce=None)
    mean, _, _ = am.llm_attention_rows(rec, 1, "all", head_reduce="mean")
    top, _, _ = am.llm_attention_rows(rec, 1, "all", head_reduce="max")
    np.testing.assert_allclose(mean, per.mean(0), atol=1e-12)
    np.testing.assert_allclose(top, per.max(0), atol=1e-12)
    assert np.abs(top - mean).max() > 1e-2
    res = rec["resampler.attn"].numpy()
    for reduce, fn in (("mean", np.mean), ("max", np.max)):
        maps = am.resampler_query_maps(rec, slice=1, head_reduce=reduce)
        want = fn(res[1], axis=0)[:, : sl[0] * sl[1]].reshape(-1, *sl)
        np.testing.assert_allclose(np.asarray(maps).reshape(want.shape), want, atol=1e-12)


# --------------------------------------------------------------------------------------
# the pointing game (demo/pointing.py): the answer's row, and chance from the target's own pixels
# --------------------------------------------------------------------------------------
_DEMO = {}


def trained():
    if "m" not in _DEMO:
        from minicpmv_attn.demo import load_trained_demo

        _DEMO["m"] = load_trained_demo()
    return _DEMO["m"]


def answer_row(record, answer, tokenizer):
    """The position whose prediction is the answer's first token, found from the token ids alone:
    the position just before the first one holding that token after the last image."""
    first = tokenizer(answer, add_special_tokens=False)["input_ids"][0]
    ids = record.layout.input_ids
    after = max(b for _, b in record.layout.image_bound)
    return next(p for p in range(after, len(ids)) if ids[p] == first) - 1


def test_pointing_scores_the_row_that_predicts_the_answer():
    """demo/pointing.py: every map kind is computed on the row that predicts the answer's first
    token (kills chat_record returning n_prompt, n_prompt - 2 or n_prompt + 1, and play passing another row)."""
    model, processor = trained()
    seen = []

    def probe(ctx):
        seen.append((ctx.row, answer_row(ctx.record, ctx.answer, processor.tokenizer), ctx))
        W, H = ctx.scene.image.size
        return np.zeros((H, W))

    res = play(model, processor, seed=3, n=2, kinds={"probe": probe})
    assert len(seen) == 2 and res.answer_accuracy == 1.0
    for row, want, ctx in seen:
        assert row == want, (row, want)
        raw = map_kinds(model.config.num_hidden_layers)["raw mean"](ctx)
        np.testing.assert_allclose(raw, am.image_heatmap(ctx.record, want, layer_reduce="mean").map)
    answer, record, row = chat_record(model, processor, make_scene(random.Random(3)))
    assert row == answer_row(record, answer, processor.tokenizer)


def target_pixel_box(scene):
    """(x0, y0, x1, y1) of the pixels drawn in the target's colour (counted, not read from the scene)."""
    rgb = np.asarray(COLORS[scene.objects[scene.target].color], dtype=np.uint8)
    ys, xs = np.nonzero((np.asarray(scene.image) == rgb).all(-1))
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def test_chance_is_the_share_of_the_targets_own_pixels_box():
    """Chance = mean over scenes of (box of the target's drawn pixels) / (image area), counted from
    the image itself (kills a wrong box area in scenes.box_share or a wrong mean in play)."""
    model, processor = trained()
    res = play(model, processor, seed=11, n=3, kinds={"flat": lambda c: np.ones(c.scene.image.size[::-1])})
    rng = random.Random(11)
    shares = []
    for entry in res.rows:
        scene = make_scene(rng)
        box = target_pixel_box(scene)
        assert tuple(entry["target_box"]) == box  # the box scored is the target's drawn box
        W, H = scene.image.size
        assert entry["size"] == [W, H]
        shares.append((box[2] - box[0]) * (box[3] - box[1]) / (W * H))
    assert res.chance == pytest.approx(float(np.mean(shares)), abs=1e-12)


def test_peak_refuses_a_single_nan():
    """demo/pointing.py peak: one NaN among finite values is refused (kills isfinite().all() -> any())."""
    m = np.zeros((4, 5))
    m[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        peak(m)


# --------------------------------------------------------------------------------------
# the memory estimate (capture.py estimate_bytes): every stage's bytes, counted by hand
# --------------------------------------------------------------------------------------
def test_estimate_counts_every_stage_exactly():
    from minicpmv_attn import CaptureSpec
    from minicpmv_attn.capture import estimate_bytes

    dims = {"layers": {"llm": 3, "vision": 2, "resampler": 1}, "heads": {"llm": 4, "vision": 5, "resampler": 6},
            "query_num": 7}
    f32 = 4
    # no slices: no vision or resampler entry at all
    est = estimate_bytes(CaptureSpec(), dims, 2, 10, new_tokens=3)
    assert sorted(est) == ["llm", "workspace"] and est["llm"] == 3 * 2 * 4 * 13 * 13 * f32
    assert est["workspace"] == 2 * 4 * 13 * 13 * 4 * 3  # fp32 scores, probabilities and a copy of one chunk
    big = estimate_bytes(CaptureSpec(chunk_elements=1000), dims, 2, 4096)
    assert big["workspace"] == 1000 * 4 * 3  # bounded by the chunk, not the sequence
    est = estimate_bytes(CaptureSpec(), dims, 2, 10, new_tokens=3, n_slices=3, patches=11, image_tokens=5)
    assert est["vision"] == 2 * 3 * 5 * 11 * 11 * f32
    assert est["resampler"] == 3 * 6 * 7 * 11 * f32
    unsized = estimate_bytes(CaptureSpec(), dims, 2, 10, n_slices=3)  # patches default 0: nothing stored
    assert unsized["vision"] == unsized["resampler"] == 0
    assert estimate_bytes(CaptureSpec(cols="image"), dims, 2, 10)["llm"] == 0  # image_tokens default 0
    gen = estimate_bytes(CaptureSpec(rows="generated", cols="image"), dims, 2, 10, new_tokens=3, image_tokens=5)
    assert gen["llm"] == 3 * 2 * 4 * 3 * 5 * f32
    picked = estimate_bytes(CaptureSpec(rows=[1, 2], cols=[0, 4, 6], reduce="max", layers=[0]), dims, 2, 10)
    assert picked["llm"] == 1 * 2 * 1 * 2 * 3 * f32


# --------------------------------------------------------------------------------------
# record validation (attention_record.py validate)
# --------------------------------------------------------------------------------------
from test_record_validation import LLM, saved, tamper  # noqa: E402,F401  (the saved record fixture)


def _one_value(value):
    def edit(t):
        x = t[LLM].clone()
        x.view(-1)[0] = value
        t[LLM] = x
    return edit


@pytest.mark.parametrize("value, words", [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"),
                                          (-0.5, r"outside \[0, 1\]")])
def test_one_bad_value_among_good_ones_is_refused(saved, tmp_path, value, words):  # noqa: F811
    """One NaN / inf / negative entry is enough (kills isfinite().all() -> any() and t.min() -> t.max())."""
    from minicpmv_attn.attention_record import AttentionRecord, RecordError

    with pytest.raises(RecordError, match=words):
        AttentionRecord.load(tamper(saved, tmp_path, tensor_edit=_one_value(value)))


def test_records_with_selected_columns_load_and_too_many_columns_are_refused(tmp_path):
    """A record of selected key columns (index cols a list) loads; an index listing more columns
    than the tensor has is refused (kills a dropped 'not' in the cols check)."""
    from minicpmv_attn.attention_record import AttentionRecord, RecordError, records_from_capture

    model = load("single_image")
    data, mask = load_inputs("single_image")
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions={"stages": ["llm"], "rows": "last",
                                                                  "cols": "image"})
    rec = records_from_capture(out.captured, out.capture_index, prompt_ids=data["input_ids"], attention_mask=mask,
                               image_bound=data["image_bound"], tgt_sizes=data["tgt_sizes"])[0]
    name = "llm.layers.0.attn"
    assert isinstance(rec.index[name]["cols"], list) and len(rec.index[name]["cols"]) == rec[name].shape[-1]
    stem = str(tmp_path / "cols")
    rec.save(stem)
    assert AttentionRecord.load(stem).equals(rec)
    rec.index[name]["cols"] = rec.index[name]["cols"] + [0]
    with pytest.raises(RecordError, match="columns but index lists"):
        rec.validate()


def test_records_of_a_batch_without_tgt_sizes():
    """records_from_capture with no tgt_sizes (LLM-only capture) gives one record per sample
    (kills '[[]] * B' -> '[[]]')."""
    from minicpmv_attn.attention_record import records_from_capture

    model = load("two_images_batch")
    data, mask = load_inputs("two_images_batch")
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions={"stages": ["llm"], "rows": "last"})
    recs = records_from_capture(out.captured, out.capture_index, prompt_ids=data["input_ids"], attention_mask=mask)
    assert len(recs) == 2
    for b, rec in enumerate(recs):
        pad = int((mask[b] == 0).sum())  # a record is the sample's own run: its left padding is cut
        torch.testing.assert_close(rec["llm.layers.0.attn"], out.captured["llm.layers.0.attn"][b][..., pad:])
        assert rec.layout.padding == 0 and len(rec.layout.tokens) == mask.shape[1] - pad


# --------------------------------------------------------------------------------------
# analysis/attention_map.py: argument checks and layout-less records
# --------------------------------------------------------------------------------------
def test_map_argument_checks():
    """place_patch_map refuses one non-positive size (kills min -> max); rollout refuses a
    non-square 2-D map (kills 'or' -> 'and'); image_heatmap draws the source alone or the slices
    alone and refuses neither (kills a dropped 'not')."""
    with pytest.raises(ValueError, match="positive"):
        am.place_patch_map(np.ones((2, 2)), (0, 0, 4, 4), (4, 4), out_size=(0, 4))
    with pytest.raises(ValueError, match="square"):
        am.rollout([np.ones((2, 3)) / 3])
    size, grid, src, sl = MAP_CASES["300x200_grid3x2"]
    rec = build_record(build_layout([(size, grid, src, sl)]))
    row = rec.layout.n_prompt - 1
    both = am.image_heatmap(rec, row).map
    source = am.image_heatmap(rec, row, include_slices=False).map
    slices = am.image_heatmap(rec, row, include_source=False).map
    assert source.shape == slices.shape == both.shape and not np.allclose(source, slices)
    with pytest.raises(ValueError, match="nothing to draw"):
        am.image_heatmap(rec, row, include_source=False, include_slices=False)


def test_sink_shares_of_a_record_without_layout():
    """A record without a layout still gets sink shares, with no token strings (kills 'and' -> 'or')."""
    from test_sinks import planted

    rec = planted(padding=0, sink=3)
    rec.layout = None
    ss = am.sink_shares(rec, rows=[5, 6, 7], sinks=[0, 3])
    assert ss.tokens == [None, None] and ss.sinks == [0, 3]
    direct = [rec.tensors[f"llm.layers.{l}.attn"][:, [5, 6, 7]][..., [0, 3]].sum(-1).mean(-1).numpy()
              for l in (0, 1)]
    np.testing.assert_allclose(ss.shares, np.stack(direct), atol=1e-12)


# --------------------------------------------------------------------------------------
# demo/pointing.py: peak tolerance, box edges, chat_record's check, the per-scene rows
# --------------------------------------------------------------------------------------
def test_peak_tolerance_is_relative():
    """Pixels within 1e-9 (relative) of the maximum share it, at any scale (kills an absolute
    tolerance and max(abs(top), 1e-30) -> min)."""
    m = np.zeros((6, 8))
    m[2, 3] = 1.0
    m[2, 5] = 1.0 - 1e-12  # float noise: the same maximum
    assert peak(m) == (4.5, 2.5)
    assert peak(m * 1e-12) == (4.5, 2.5)  # tiny maps: only the top pixels, not every pixel within 1e-9
    m[4, 7] = 1.0 - 1e-6  # a real difference: not the maximum
    assert peak(m) == (4.5, 2.5)


def test_inside_includes_every_edge():
    from minicpmv_attn.demo.pointing import inside

    box = (5, 5, 6, 6)
    for p in ((5, 5), (6, 6), (5, 6), (6, 5), (5.5, 5.5)):
        assert inside(p, box), p
    for p in ((4.9, 5), (6.1, 5), (5, 4.9), (5, 6.1)):
        assert not inside(p, box), p


def test_chat_record_refuses_a_layout_without_prompt():
    """chat_record checks n_prompt against the record (kills 'or' -> 'and')."""
    from types import SimpleNamespace

    scene = make_scene(random.Random(0))
    for n_prompt in (0, 9):
        rec = SimpleNamespace(layout=SimpleNamespace(n_prompt=n_prompt, tokens=["a"] * 8))
        model = SimpleNamespace(chat=lambda *a, **k: ("red", rec))
        with pytest.raises(ValueError, match=f"n_prompt={n_prompt} of 8 tokens"):
            chat_record(model, SimpleNamespace(tokenizer=None), scene)


def test_play_rows_record_answers_and_peaks(capfd):
    """Each scene's row: correct iff the answer equals the expected word; the peak as peak() gives it
    rounded to 0.1 px; answer accuracy is the share of correct rows; no progress bar unless asked."""
    model, processor = trained()

    def spot(ctx):  # maximum at (x, y) = (10, 5), (11, 5), (11, 6), (11, 7): peak (10.75 + 0.5, 5.75 + 0.5)
        W, H = ctx.scene.image.size
        m = np.zeros((H, W))
        m[5, 10] = m[5, 11] = m[6, 11] = m[7, 11] = 1.0
        return m

    res = play(model, processor, seed=5, n=2, kinds={"spot": spot}, progress=False)
    assert "pointing game" not in capfd.readouterr().err
    assert res.rows[0]["peaks"]["spot"][:2] == [round(11.25, 1), round(6.25, 1)]
    for entry in res.rows:
        assert entry["correct"] == (entry["answer"].strip() == entry["expected"])
    assert res.answer_accuracy == np.mean([e["correct"] for e in res.rows])
