"""Plot tests: each figure is written, is a PNG of the expected pixel size, is not blank."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minicpmv_attn.analysis import plotting

_spec = importlib.util.spec_from_file_location(
    "_attention_map_builders", pathlib.Path(__file__).with_name("test_attention_map.py"))
_builders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_builders)
build_layout, build_record = _builders.build_layout, _builders.build_record


@pytest.fixture(scope="module")
def rec():
    layout = build_layout([((300, 200), (3, 2), (4, 6), (5, 5))], n_gen=3)
    return build_record(layout, n_layers=3, heads=4, seed=11)


@pytest.fixture(scope="module")
def photo():
    y, x = np.mgrid[0:200, 0:300]
    arr = np.stack([x * 255 // 300, y * 255 // 200, np.full_like(x, 128)], -1).astype(np.uint8)
    return Image.fromarray(arr)


def check_png(path, size=None):
    assert os.path.isfile(path) and os.path.getsize(path) > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            assert im.size == size
        arr = np.asarray(im.convert("L"), dtype=float)
    assert arr.std() > 5  # something is drawn
    leftovers = [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp-")]
    assert leftovers == []
    return arr


def test_token_heatmaps(rec, photo, tmp_path):
    p = plotting.plot_token_heatmaps(rec, tmp_path / "tok.png", photo, figsize=(8, 4), dpi=50)
    assert p == str(tmp_path / "tok.png")
    check_png(p, (400, 200))
    # no image, shared scale, rollout, default size; overwriting works
    p2 = plotting.plot_token_heatmaps(rec, tmp_path / "tok.png", None, positions=[-1, -2],
                                      layer_reduce="rollout", shared_scale=True)
    with Image.open(p2) as im:
        w, h = im.size
    assert w > 300 and h > 150
    check_png(p2)


def test_head_image_share(rec, tmp_path):
    p = plotting.plot_head_image_share(rec, tmp_path / "heads.png", rows="generated", figsize=(5, 4), dpi=60)
    check_png(p, (300, 240))
    with pytest.raises(ValueError, match="role must be"):
        plotting.plot_head_image_share(rec, tmp_path / "x.png", role="audio")


def test_attention_matrix(rec, tmp_path):
    p = plotting.plot_attention_matrix(rec, tmp_path / "sub" / "mat.png", 1, figsize=(9, 8), dpi=40)
    check_png(p, (360, 320))
    # small sub-matrix with token labels, log scale, one head
    rows = list(range(len(rec.layout.tokens)))[-3:]
    sub = type(rec)(tensors=dict(rec.tensors), index=dict(rec.index), layout=rec.layout)
    sub.tensors["llm.layers.0.attn"] = rec.tensors["llm.layers.0.attn"][:, rows]
    sub.index["llm.layers.0.attn"] = {"rows": rows, "cols": None, "heads": None, "reduce": "none"}
    check_png(plotting.plot_attention_matrix(sub, tmp_path / "mat2.png", 0, heads=[2], log_scale=True,
                                             max_labels=100))
    with pytest.raises(ValueError, match="no llm.layers.9.attn"):
        plotting.plot_attention_matrix(rec, tmp_path / "bad.png", 9)
    assert not (tmp_path / "bad.png").exists()


def test_role_shares(rec, tmp_path):
    p = plotting.plot_role_shares(rec, tmp_path / "roles.png", figsize=(6, 3), dpi=50)
    arr = check_png(p, (300, 150))
    # the stacked bars are coloured: the image is not grey only
    with Image.open(p) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=int)
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 60).any()
    assert arr.shape == (150, 300)


def test_resampler_queries(rec, photo, tmp_path):
    p = plotting.plot_resampler_queries(rec, tmp_path / "q.png", photo, slice=3, figsize=(4, 4), dpi=50)
    check_png(p, (200, 200))
    p = plotting.plot_resampler_queries(rec, tmp_path / "q0.png", None, queries=[0, 2])
    check_png(p)
    with pytest.raises(ValueError, match="out of range"):
        plotting.plot_resampler_queries(rec, tmp_path / "q1.png", queries=[9])


def test_modules_import_matplotlib_lazily():
    code = ("import sys, minicpmv_attn.analysis.attention_map, minicpmv_attn.analysis.plotting; "
            "sys.exit(1 if 'matplotlib' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_vision_received(rec, photo, tmp_path):
    p = plotting.plot_vision_received(rec, tmp_path / "vision.png", image=photo, figsize=(7, 3), dpi=60)
    check_png(p, size=(420, 180))
    with pytest.raises(ValueError, match="only 2 vision layers captured"):
        plotting.plot_vision_received(rec, tmp_path / "bad.png", layer=-3)
    assert not (tmp_path / "bad.png").exists()


# ------------------------------------------------------------------------------------------ figure checks
@pytest.fixture
def figs(monkeypatch):
    """The matplotlib figures the plot functions save (drawn by the save)."""
    saved = []
    real = plotting._save

    def spy(fig, path, dpi):
        out = real(fig, path, dpi)
        saved.append(fig)
        return out

    monkeypatch.setattr(plotting, "_save", spy)
    return saved


def texts_outside(fig):
    """Visible non-empty texts whose box leaves the canvas (clipped titles / labels)."""
    from matplotlib.text import Text

    r = fig.canvas.get_renderer()
    W, H = fig.canvas.get_width_height()
    bad = []
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip():
            continue
        b = t.get_window_extent(r)
        if b.x0 < -1 or b.y0 < -1 or b.x1 > W + 1 or b.y1 > H + 1:
            bad.append(t.get_text())
    return bad


def test_small_head_grid_keeps_title_and_colourbar_label_inside(tmp_path, figs):
    small = build_record(build_layout([((90, 90), None, (3, 3), None)], n_gen=2), n_layers=1, heads=2, seed=1)
    p = plotting.plot_head_image_share(small, tmp_path / "h.png", rows="generated")
    check_png(p)
    assert texts_outside(figs[-1]) == []
    assert any("share on image tokens" in t.get_text() for t in figs[-1].findobj(lambda a: hasattr(a, "get_text")))


def test_token_heatmaps_share_one_colour_scale(rec, photo, tmp_path, figs):
    def clims(fig):  # the heat layer is the last image of each panel
        return [ax.images[-1].get_clim() for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]

    plotting.plot_token_heatmaps(rec, tmp_path / "s.png", photo, positions="generated")
    shared = clims(figs[-1])
    assert len(shared) == 3 and len(set(shared)) == 1 and shared[0][1] > 0
    colourbars = [ax for ax in figs[-1].axes if ax.get_label() == "<colorbar>"]
    assert len(colourbars) == 1
    plotting.plot_token_heatmaps(rec, tmp_path / "p.png", photo, positions="generated", shared_scale=False)
    own = clims(figs[-1])
    assert len(own) == 3 and len(set(own)) == 3
    # every colour bar writes its ticks with the same formatter (one power of ten, same digits)
    bars = [ax for ax in figs[-1].axes if ax.get_label() == "<colorbar>"]
    labels = {ax.get_ylabel() for ax in bars}
    assert len(bars) == 3 and len(labels) == 1
    fmts = [ax.yaxis.get_major_formatter() for ax in bars]
    assert len({f(0.5 * own[0][1], 0) for f in fmts}) == 1


def test_attention_matrix_masked_cells_are_not_black(rec, tmp_path, figs):
    p = plotting.plot_attention_matrix(rec, tmp_path / "m.png", 0, figsize=(8, 8), dpi=60)
    fig = figs[-1]
    ax = [a for a in fig.axes if a.images and a.get_label() != "<colorbar>" and a.get_xlabel()][0]
    drawn = ax.images[0].get_array()
    assert np.ma.is_masked(drawn) or np.isnan(np.asarray(drawn, dtype=float)).any()
    with Image.open(p) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=float)
    bb = ax.get_window_extent()
    H = rgb.shape[0]
    # a patch of the upper-right triangle (future keys): grey / hatched, never the colormap's zero (black)
    x0, x1 = int(bb.x0 + 0.75 * bb.width), int(bb.x0 + 0.95 * bb.width)
    y0, y1 = int(H - (bb.y0 + 0.95 * bb.height)), int(H - (bb.y0 + 0.75 * bb.height))
    patch = rgb[y0:y1, x0:x1]
    assert patch.mean() > 120 and np.abs(patch[..., 0] - patch[..., 2]).mean() < 10
    assert any("masked" in (t.get_text() or "") for t in fig.legends[0].get_texts())


def test_attention_matrix_of_generated_rows_is_wide_and_short(tmp_path, figs):
    lay = build_layout([((300, 200), (3, 2), (4, 6), (5, 5))], n_text=40, n_gen=7)
    full = build_record(lay, n_layers=1, heads=2, seed=2)
    rows = list(range(lay.n_prompt - 1, len(lay.tokens) - 1))
    t = full.tensors["llm.layers.0.attn"][:, rows]
    gen = type(full)(tensors={**full.tensors, "llm.layers.0.attn": t},
                     index={**full.index, "llm.layers.0.attn": {"rows": rows, "cols": None, "heads": None,
                                                                 "reduce": "none"}}, layout=lay)
    p = plotting.plot_attention_matrix(gen, tmp_path / "g.png", 0)
    with Image.open(p) as im:
        w, h = im.size
    assert h < w / 2.5 and h >= 300, (w, h)
    fig = figs[-1]
    r = fig.canvas.get_renderer()
    inner = [c for ax in fig.axes for c in ax.child_axes]  # the row labels sit on the role band
    labels = [t for ax in inner for t in ax.get_yticklabels() if t.get_text()]
    assert len(labels) == len(rows) and min(t.get_fontsize() for t in labels) >= 6
    ys = sorted(t.get_window_extent(r).y0 for t in labels)
    assert min(np.diff(ys)) >= 0.9 * max(t.get_window_extent(r).height for t in labels)  # no overlap
    assert texts_outside(fig) == []


def test_sink_share_plot(rec, tmp_path, figs):
    p = plotting.plot_sink_shares(rec, tmp_path / "sinks.png")
    check_png(p)
    assert texts_outside(figs[-1]) == []
    title = figs[-1]._suptitle.get_text()
    assert "sinks (first token" in title and "0 '<s>'" in title
    check_png(plotting.plot_sink_shares(rec, tmp_path / "s2.png", sinks=[0, 2], figsize=(5, 3), dpi=60), (300, 180))


def test_plots_of_a_chat_record(tmp_path, figs):
    chat = _builders.chat_record()
    p = plotting.plot_token_heatmaps(chat, tmp_path / "roll.png", None, layer_reduce="rollout")
    check_png(p)
    check_png(plotting.plot_attention_matrix(chat, tmp_path / "m.png", 1))
    gen = _builders.chat_record("generated")  # 4 rows x all columns
    p = plotting.plot_attention_matrix(gen, tmp_path / "g.png", 1)
    with Image.open(p) as im:
        assert im.size[1] < im.size[0] / 3
    assert texts_outside(figs[-1]) == []
    check_png(plotting.plot_head_image_share(gen, tmp_path / "h.png", rows="generated"))
    check_png(plotting.plot_sink_shares(gen, tmp_path / "s.png", rows="last"))


def test_attention_matrix_labels_tokens_when_image_runs_are_long(tmp_path, figs):
    """Issue 25: a matrix with more positions than ``max_labels`` still names its text and special
    tokens (position and token), with each run of image tokens labelled once."""
    lay = build_layout([((300, 200), (3, 2), (4, 6), (5, 5))], n_text=12, n_gen=3)
    full = build_record(lay, n_layers=1, heads=2, seed=2)
    n = len(lay.tokens)
    assert n > 64
    plotting.plot_attention_matrix(full, tmp_path / "m.png", 0)
    fig = figs[-1]
    xl = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    text_pos = [p for p in range(n) if lay.roles[p] != "image"]
    named = [f"{p} {plotting._label(lay.tokens[p], 10)}" for p in text_pos]
    assert [x for x in xl if not x.startswith("image ")] == named
    assert any(x.startswith("image ") and ".." in x for x in xl)
    assert texts_outside(fig) == []


# ------------------------------------------------------------------------------------------ heat overlay
def test_overlay_keeps_the_image_where_the_map_is_zero():
    """Issue 25 ("the heat colours hide the object"): the overlay's opacity follows the map, so
    where the map is 0 the pixels are the image's own, and where it peaks they are tinted."""
    from minicpmv_attn.analysis.heat_overlay import heat_alpha, overlay_rgb

    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    heat = np.zeros((10, 15))
    heat[:, 8:] = np.linspace(0.1, 1.0, 7)[None, :]  # 0 on the left half, rising to a peak at the right edge
    heat[4, 14] = 3.0
    out = overlay_rgb(img, heat, vmax=3.0, a_max=0.6)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(out[:, :32], img[:, :32])  # cells 0..7 of 15 over 60 px: x < 32
    assert np.abs(out[16:20, 56:60].astype(int) - img[16:20, 56:60]).max() > 10  # the peak cell is tinted
    a = heat_alpha(heat, 3.0, 0.6)
    assert a[:, :8].max() == 0 and a[4, 14] == pytest.approx(0.6) and 0 < a[0, 8] < a[0, 14] < 0.6
    want = np.rint(img[16, 56] * 0.4 + np.array(__import__("matplotlib").colormaps["inferno"](1.0)[:3]) * 255 * 0.6)
    assert np.array_equal(out[16, 56], want)
    with pytest.raises(ValueError, match="opacity from 0 to 1"):
        heat_alpha(heat, 1.0, 1.5)


def test_token_heatmap_panels_show_the_image_where_the_map_is_zero(rec, photo, tmp_path, figs, monkeypatch):
    """The PNG's panels blend per pixel: a map that is 0 on its left half leaves those pixels of the
    drawn image exactly as they are (no flat 0.6 tint), and tints them where it peaks."""
    import dataclasses

    from minicpmv_attn.analysis import attention_map as am

    real = am.image_heatmap

    def constructed(*a, **k):
        hm = real(*a, **k)
        m = np.zeros_like(hm.map)
        w = m.shape[1]
        m[:, w // 2:] = np.linspace(0.0, 1.0, w - w // 2)[None, :]
        return dataclasses.replace(hm, map=m)

    monkeypatch.setattr(am, "image_heatmap", constructed)
    plotting.plot_token_heatmaps(rec, tmp_path / "z.png", photo, positions=[-1])
    panel = [ax for ax in figs[-1].axes if ax.images and ax.get_label() != "<colorbar>"][0]
    drawn = np.asarray(panel.images[-1].get_array())
    assert len(panel.images) == 1 and drawn.ndim == 3  # one RGB layer: the blend, no flat heat layer on top
    shown = plotting._load_image(photo, drawn.shape[1::-1])
    w = drawn.shape[1]
    assert np.array_equal(drawn[:, : w // 2], shown[:, : w // 2])
    assert np.abs(drawn[:, -2:].astype(int) - shown[:, -2:]).max() > 10
