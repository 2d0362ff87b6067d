"""The interactive viewer's data (no browser): the embedded maps decode back to attention_map's
maps within quantisation error, the budget holds, the view command works and fails cleanly."""
import base64
import html
import math
import os
import re

import numpy as np
import pytest
import torch

from minicpmv_attn.analysis import attention_map as am
from minicpmv_attn.analysis import viewer as vw
from minicpmv_attn.scripts.bench_viewer import synthetic_image, synthetic_record


def small_record(rows="all", **kw):
    args = dict(n_layers=3, n_heads=4, n_gen=5, grid=(2, 2), size=(300, 200), src_tgt=(6, 8), slice_tgt=(5, 6),
                queries=8, res_heads=2, vis_heads=2, vis_layers=(0, 1), rows=rows, dtype=torch.float32, seed=3,
                sharpness=2.0)
    args.update(kw)
    return synthetic_record(**args)


def grid_size(data):
    dw, dh = data["display"]
    gs = min(1.0, data["grid_side"] / max(dw, dh))
    return max(1, math.floor(dw * gs + 0.5)), max(1, math.floor(dh * gs + 0.5))


def decode_rows(data, u, f, n_rows, n_cols):
    q = data["u8"][u: u + n_rows * n_cols].reshape(n_rows, n_cols).astype(np.float64)
    return q * data["f32"][f: f + n_rows, None] / 255


def decoded_map(data, key, t, out_size, through_vision=False):
    """The LLM -> image map the page draws, rebuilt in numpy from the embedded data (with
    ``through_vision``: from the through-SigLIP query maps, as the page with #thruvision ticked)."""
    N = data["n_image_tokens"]
    b = data["blocks"][key]
    w = decode_rows(data, b["u"], b["f"], len(data["tokens"]), N)[t]
    out = np.zeros(out_size[::-1])
    for s, sl in enumerate(data["slices"]):
        h, wd = sl["tgt"]
        e = data["through_vision"][s] if through_vision else sl
        R = decode_rows(data, e["u"], e["f"], sl["nq"], h * wd)
        m = (w[sl["n0"]: sl["n0"] + sl["nq"]] @ R).reshape(h, wd)
        out += am.place_patch_map(m, sl["box"], data["image_size"], out_size)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    rec = small_record()
    path = tmp_path_factory.mktemp("viewer") / "index.html"
    relevancy = {0: np.outer(np.arange(40), np.arange(60)) / 2400.0, 2: -np.ones((20, 30))}
    v = vw.write_viewer(rec, synthetic_image((300, 200)), str(path), extra_kinds={"relevancy": relevancy},
                        sinks=[0])
    return rec, v, path, vw.read_viewer_data(path.read_text()), relevancy


CASES = [  # block key -> image_heatmap arguments
    ("mean|mean", dict()),
    ("1|mean", dict(layers=[1])),
    ("mean|max", dict(head_reduce="max")),
    ("mean|2", dict(heads=[2])),
    ("2|max", dict(layers=[2], head_reduce="max")),
    ("0|3", dict(layers=[0], heads=[3])),
    ("rollout|mean", dict(layer_reduce="rollout")),
]


@pytest.mark.parametrize("key,kw", CASES)
def test_llm_maps_decode_to_image_heatmap(built, key, kw):
    rec, v, path, data, _ = built
    size = grid_size(data)
    assert key in data["blocks"]
    for t, tok in enumerate(data["tokens"]):
        ref = am.image_heatmap(rec, tok["row"], out_size=size, **kw)
        got = decoded_map(data, key, t, size)
        assert ref.map.shape == got.shape
        # uint8 rows (error <= max / 510) of both factors: well under 1% of the map's peak
        assert np.abs(got - ref.map).max() <= 0.01 * ref.map.max() + 1e-9, (key, t)
        image_share, text_share, special_share, sink_share = data["blocks"][key]["sh"][t]
        assert image_share == pytest.approx(float(ref.image_share), abs=1e-4)
        assert text_share == pytest.approx(float(ref.shares["text"]), abs=1e-4)
        assert special_share == pytest.approx(float(ref.shares["special"]), abs=1e-4)
        if kw.get("head_reduce") != "max":  # rows summing to 1: the sink share of the row
            ex = am.image_heatmap(rec, tok["row"], out_size=size, exclude_sinks=True, sinks=[0], **kw)
            assert sink_share == pytest.approx(float(ex.extra["sink_share"]), abs=1e-4)
        # through SigLIP (#thruvision): the composed query maps give image_heatmap(through_vision=True)
        tv = am.image_heatmap(rec, tok["row"], out_size=size, through_vision=True, **kw).map
        got_tv = decoded_map(data, key, t, size, through_vision=True)
        assert np.abs(got_tv - tv).max() <= 0.01 * tv.max() + 1e-9, (key, t)
        assert np.abs(tv - ref.map).max() > 0.05 * ref.map.max()  # a different map, not the plain one again


def test_tokens_are_the_generated_ones(built):
    rec, v, path, data, _ = built
    lay = rec.layout
    assert [t["pos"] for t in data["tokens"]] == list(range(lay.n_prompt, len(lay.tokens)))
    assert [t["row"] for t in data["tokens"]] == [p - 1 for p in range(lay.n_prompt, len(lay.tokens))]
    assert data["tokens"][0]["text"] == " tok0"  # byte-level BPE decoded
    assert data["layers"] == ["mean", "0", "1", "2", "rollout"] and data["heads"] == ["mean", "max", "0", "1", "2", "3"]
    assert len(data["blocks"]) == 4 + 1 + 5 + 4 + 12  # every group fits this small record
    assert v.notes == []
    rows = [t["row"] for t in data["tokens"]]
    want = float(am.sink_shares(rec, rows=rows, sinks=[0], per_head=False).shares.mean())
    assert data["sinks"] == [{"position": 0, "token": "<|im_start|>", "role": "special",
                              "share": pytest.approx(want, abs=1e-4)}]
    assert data["sink_image"] == []


def test_default_sinks_come_from_find_sinks():
    rec = small_record()
    v = vw.build_viewer(rec, None)
    rows = [t["row"] for t in v.data["tokens"]]
    assert [s["position"] for s in v.data["sinks"]] == am.find_sinks(rec, rows, None)
    assert all(len(b["sh"][0]) == 4 for b in v.data["blocks"].values())
    img_sink = vw.build_viewer(rec, None, sinks=[rec.layout.slices[1].token_span[0] + 2, 0])
    assert img_sink.data["sink_image"] == [8 + 2]  # the overview's 8 image tokens come first


def test_resampler_and_vision_maps_decode(built):
    rec, v, path, data, _ = built
    assert data["vision"]["pool"] == 1 and [x["layer"] for x in data["vision"]["layers"]] == [0, 1]
    for s, sl in enumerate(data["slices"]):
        h, w = sl["tgt"]
        ref = am.resampler_query_maps(rec, 0, sl["index"]).reshape(sl["nq"], h * w)
        got = decode_rows(data, sl["u"], sl["f"], sl["nq"], h * w)
        assert np.abs(got - ref).max() <= ref.max() / 510 + 1e-7
        for vl in data["vision"]["layers"]:
            e = vl["slices"][s]
            got = decode_rows(data, e["u"], e["f"], h * w, h * w)
            for patch in (0, h * w - 1, (h // 2) * w + w // 2):
                ref = am.vision_patch_map(rec, patch, vl["layer"], 0, sl["index"]).ravel()
                assert np.abs(got[patch] - ref).max() <= ref.max() / 510 + 1e-7


def test_through_vision_maps_decode_and_enable_the_checkbox(built):
    rec, v, path, data, _ = built
    page = path.read_text()
    assert re.search(r"<input id=thruvision type=checkbox> through SigLIP", page)  # enabled
    assert not any(n.startswith(vw.THROUGH_VISION_UNAVAILABLE) for n in v.notes)
    slices = rec.layout.slices
    assert len(data["through_vision"]) == len(data["slices"]) == len(slices)
    for s, sl in enumerate(data["slices"]):
        h, w = sl["tgt"]
        plain = am.resampler_query_maps(rec, 0, sl["index"]).reshape(sl["nq"], h * w)
        ref = plain @ am.vision_rollout(rec, 0, sl["index"])
        e = data["through_vision"][s]
        got = decode_rows(data, e["u"], e["f"], sl["nq"], h * w)
        assert np.abs(got - ref).max() <= ref.max() / 510 + 1e-7
        assert np.abs(ref - plain).max() > 0.01  # the rollout moved mass


@pytest.mark.parametrize("case,why", [
    ("gap", "the record has vision layers [1] only; capture all SigLIP layers"),
    ("none", "the record has no SigLIP attention"),
])
def test_through_vision_unavailable_disables_the_checkbox(case, why):
    rec = small_record(vis_layers=(1,) if case == "gap" else ())
    v = vw.build_viewer(rec, None)
    page = vw.render_viewer(v)
    assert v.data["through_vision"] is None
    notes = [n for n in v.notes if n.startswith(vw.THROUGH_VISION_UNAVAILABLE + ": ")]
    assert len(notes) == 1 and why in notes[0] and "\n" not in notes[0], v.notes
    assert re.search(r"<input id=thruvision type=checkbox disabled> through SigLIP", page)
    assert f"<li>{html.escape(notes[0])}</li>" in page  # the page's notes say why
    assert vw.read_viewer_data(page)["through_vision"] is None
    # the plain maps are still there and right
    data = vw.read_viewer_data(page)
    size = grid_size(data)
    ref = am.image_heatmap(rec, data["tokens"][0]["row"], out_size=size).map
    assert np.abs(decoded_map(data, "mean|mean", 0, size) - ref).max() <= 0.01 * ref.max()


def test_vision_pooling_matches_block_means():
    rec = small_record(slice_tgt=(9, 10), src_tgt=(12, 14), vis_layers=(0,))
    old = vw.VISION_BUDGET_BYTES
    try:
        vw.VISION_BUDGET_BYTES = 4000  # forces pooled query patches
        v = vw.build_viewer(rec, None)
    finally:
        vw.VISION_BUDGET_BYTES = old
    data = dict(v.data, u8=np.frombuffer(base64.b64decode(v.u8), np.uint8),
                f32=np.frombuffer(base64.b64decode(v.f32), "<f4"))
    f = data["vision"]["pool"]
    assert f > 1 and any("pooled" in n for n in v.notes)
    sl = data["slices"][0]
    h, w = sl["tgt"]
    bh, bw = -(-h // f), -(-w // f)
    e = data["vision"]["layers"][0]["slices"][0]
    got = decode_rows(data, e["u"], e["f"], bh * bw, h * w)
    full = am.vision_attention(rec, 0, 0, 0).reshape(h, w, h * w)
    ref = full[f:2 * f, 0:f].mean((0, 1))  # block (1, 0)
    assert np.abs(got[bw] - ref).max() <= ref.max() / 510 + 1e-7


def test_extra_kinds_decode(built):
    rec, v, path, data, relevancy = built
    ex = data["extras"]["relevancy"]
    assert sorted(ex) == ["0", "2"]
    e = ex["0"]
    assert e["shape"] == [40, 60]  # at most EXTRA_SIDE: kept as is
    lo, hi = data["f32"][e["f"]: e["f"] + 2]
    got = lo + (hi - lo) * data["u8"][e["u"]: e["u"] + 2400].reshape(40, 60) / 255
    assert np.abs(got - relevancy[0]).max() <= (hi - lo) / 510 + 1e-6
    big = vw.build_viewer(rec, None, extra_kinds={"r": {0: np.random.rand(500, 700)}})
    assert big.data["extras"]["r"]["0"]["shape"] == [63, 64]  # block means, long side <= 64
    for bad, msg in (({"llm": {0: np.ones((2, 2))}}, "new kind name"), ({"r": {9: np.ones((2, 2))}}, "token indices"),
                     ({"r": {0: np.ones(3)}}, "2-D"), ({"r": {0: np.full((2, 2), np.nan)}}, "NaN")):
        with pytest.raises(ValueError, match=msg):
            vw.build_viewer(rec, None, extra_kinds=bad)


def test_page_is_self_contained(built):
    rec, v, path, data, _ = built
    page = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"<link\b|<script[^>]*\bsrc=|@import|url\(", page, re.I)
    assert re.findall(r"""src=["']?([a-z]+):""", page) == ["data"]  # the image only
    assert "http://" not in page and "https://" not in page


def test_budget_leaves_out_groups_then_tokens():
    rec = small_record(n_layers=4, n_heads=6, n_gen=20)
    full = vw.build_viewer(rec, None)
    assert len(full.data["blocks"]) == 6 + 7 + 5 + 24 and full.notes == []
    N, T = full.data["n_image_tokens"] + len(full.data["text_cols"]) + 4, 20  # image + text columns, 2 scales
    fixed = full.data_bytes - len(full.data["blocks"]) * T * (N + 4)
    tight = fixed + 10 * T * (N + 4)  # room for group 1 (6 maps) but not group 2 (7)
    v = vw.build_viewer(rec, None, max_data_bytes=tight)
    assert sorted(v.data["blocks"]) == sorted(["mean|mean", "0|mean", "1|mean", "2|mean", "3|mean", "rollout|mean"])
    assert v.data_bytes <= tight
    assert sum("left out" in n for n in v.notes) == 3
    cut = vw.build_viewer(rec, None, max_data_bytes=fixed + 6 * 7 * (N + 4))
    assert len(cut.data["tokens"]) == 7 and any("only the first 7 of 20 tokens" in n for n in cut.notes)
    with pytest.raises(ValueError, match="do not fit"):
        vw.build_viewer(rec, None, max_data_bytes=fixed + 10)


def test_real_size_record_stays_within_budget(tmp_path):
    """28 layers x 28 heads, 10 slices x 64 queries (real MiniCPM-V-2.6 shapes), 48 tokens."""
    rec = synthetic_record(n_gen=48, vis_heads=2, seed=1)
    path = tmp_path / "index.html"
    v = vw.write_viewer(rec, None, str(path))
    assert v.data_bytes <= vw.MAX_DATA_BYTES
    assert path.stat().st_size <= vw.MAX_DATA_BYTES * 4 / 3 + 2**20
    assert v.data["n_image_tokens"] == 640 and len(v.data["tokens"]) == 48
    assert any("each (layer, head) pair" in n for n in v.notes)  # 28 x 28 maps do not fit
    assert "28|mean" not in v.data["blocks"] and "27|mean" in v.data["blocks"] and "mean|27" in v.data["blocks"]
    assert v.data["vision"]["pool"] == 2  # 972^2 + 9 x 768^2 bytes unpooled > 3 MiB; 2 x 2 blocks fit
    page = path.read_text()
    assert "each (layer, head) pair" in page  # the note is in the page


def test_token_text():
    assert vw.token_text("Ġhello") == " hello"
    assert vw.token_text("Ċ") == "\n"
    assert vw.token_text("<|im_end|>") == "<|im_end|>"
    assert vw.token_text("ä¸Ń") == "中"
    assert vw.token_text("▁word") == " word"
    assert vw.token_text(None) == ""


def run_view(argv, capsys):
    from minicpmv_attn.scripts.visualize_attention import main

    rc = main(["view"] + argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out


def test_view_command_on_saved_record(tmp_path, capsys):
    rec = small_record()
    rec.meta["image"] = "/somewhere/that/does/not/exist.png"
    rec.save(str(tmp_path / "rec"))
    img = tmp_path / "photo.png"
    synthetic_image((600, 400)).save(img)  # a larger copy of the same shape is fine
    out = tmp_path / "view"
    rc, printed = run_view([str(tmp_path / "rec.json"), "--image", str(img), "--out", str(out), "--quiet"], capsys)
    assert rc == 0, printed.err
    page = (out / "index.html").read_text()
    assert str(tmp_path) not in page and "photo.png" in page
    data = vw.read_viewer_data(page)
    assert len(data["tokens"]) == 5 and "data:image/jpeg;base64," in page
    # the record's meta names an image that is gone: drawn on grey, still written
    rc, printed = run_view([str(tmp_path / "rec"), "--out", str(tmp_path / "v2"), "--quiet", "--layers", "0,2",
                            "--max-tokens", "2"], capsys)
    assert rc == 0, printed.err
    data = vw.read_viewer_data((tmp_path / "v2" / "index.html").read_text())
    assert data["layers"] == ["mean", "0", "2", "rollout"] and len(data["tokens"]) == 2
    assert "only the first 2 of 5 tokens" in printed.out


@pytest.mark.parametrize("case", ["missing", "bad_json", "wrong_image", "bad_layers"])
def test_view_command_errors(case, tmp_path, capsys):
    rec = small_record()
    rec.save(str(tmp_path / "rec"))
    argv = [str(tmp_path / "rec"), "--out", str(tmp_path / "o"), "--quiet"]
    want = None
    if case == "missing":
        argv[0], want = str(tmp_path / "nope"), "missing file"
    elif case == "bad_json":
        (tmp_path / "rec.json").write_text("{not json")
        want = "not valid JSON"
    elif case == "wrong_image":
        synthetic_image((100, 300)).save(tmp_path / "tall.png")
        argv += ["--image", str(tmp_path / "tall.png")]
        want = "expected the record's image (300 x 200 px"
    else:
        argv += ["--layers", "7"]
        want = "no LLM layer(s) [7]"
    rc, out = run_view(argv, capsys)
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], out.err
    assert not (tmp_path / "o" / "index.html").exists()


def test_main_command_page_has_no_machine_paths(tmp_path):
    from minicpmv_attn.analysis.visualize import visualize

    out = tmp_path / "out"
    done = visualize(out=str(out), max_new_tokens=2, quiet=True, vision_layers="none", relevancy=True)
    page = (out / "index.html").read_text()
    assert str(tmp_path) not in page and os.path.dirname(done.record.meta["image"]) not in page
    data = vw.read_viewer_data(page)
    assert len(data["tokens"]) == 2 and "rollout|mean" in data["blocks"]
    rel = data["extras"]["relevancy"]
    assert sorted(rel) == ["0", "1"] and max(rel["0"]["shape"]) == vw.EXTRA_SIDE
    tam = data["extras"]["token activation"]  # the Token Activation Map kind is always offered
    assert sorted(tam) == ["0", "1"] and max(tam["0"]["shape"]) == vw.EXTRA_SIDE
    assert data["vision"]["layers"] == []  # vision_layers="none": no SigLIP kind
    assert "token_heatmaps.png" in page and "<img src='token_heatmaps.png'" not in page


@pytest.mark.parametrize("key", ["1|mean", "0|3", "2|max", "mean|mean"])
def test_token_view_rows_decode_to_the_llm_rows(built, key):
    """Issue 25's token view: each block embeds the token's row over the text / special columns."""
    rec, v, path, data, _ = built
    lay = rec.layout
    cols = [c["pos"] for c in data["text_cols"]]
    assert cols == [p for p in range(len(lay.tokens)) if lay.roles[p] != "image"]
    assert [c["text"] for c in data["text_cols"]] == [vw.token_text(lay.tokens[p]) for p in cols]
    rows = [t["row"] for t in data["tokens"]]
    layer, head = key.split("|")
    layers = range(3) if layer == "mean" else [int(layer)]
    ref = 0
    for l in layers:
        w, cov, _ = am.llm_attention_rows(rec, l, rows, heads=None, head_reduce=None)
        w = w.astype(np.float64)
        ref = ref + (w.mean(0) if head == "mean" else w.max(0) if head == "max" else w[int(head)])
    ref = ref[:, cols] / len(layers)
    b = data["blocks"][key]["x"]
    got = decode_rows(data, b["u"], b["f"], len(rows), len(cols))
    assert np.abs(got - ref).max() <= ref.max(-1, keepdims=True).max() / 500 + 1e-9
    assert ref.max() > 0.01


def test_token_view_needs_the_text_columns():
    rec = small_record()
    lay = rec.layout
    img = [p for p in range(len(lay.tokens)) if lay.roles[p] == "image"]
    tensors, index = dict(rec.tensors), {k: dict(x) for k, x in rec.index.items()}
    for name in [k for k in tensors if k.startswith("llm.")]:
        tensors[name] = tensors[name][:, :, img].contiguous()
        index[name]["cols"] = img
    only_img = type(rec)(tensors=tensors, index=index, layout=lay, meta=dict(rec.meta))
    v = vw.build_viewer(only_img, synthetic_image((300, 200)))
    assert v.data["text_cols"] is None and not any("x" in b for b in v.data["blocks"].values())
    assert any(n.startswith("token view unavailable") for n in v.notes)
    assert vw.build_viewer(rec, None).data["text_cols"] is not None
