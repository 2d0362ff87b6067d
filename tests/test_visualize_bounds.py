"""The main command's budget: plots draw bounded copies and write bounded PNGs whatever the image
size or shape, over-budget inputs and bad prompts are refused up front with one line."""
import importlib.util
import math
import os
import pathlib
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from minicpmv_attn.analysis import plotting
from minicpmv_attn.analysis import visualize as vz

_spec = importlib.util.spec_from_file_location(
    "_attention_map_builders_bounds", pathlib.Path(__file__).with_name("test_attention_map.py"))
_builders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_builders)
build_layout, build_record = _builders.build_layout, _builders.build_record

# (image size, grid, source tgt (rows, cols), slice tgt): what the processor makes of such shapes
SHAPES = {
    "20x20000": ((20, 20000), (1, 3), (226, 1), (150, 2)),
    "20000x20": ((20000, 20), (3, 1), (1, 226), (2, 150)),
    "12000x9000": ((12000, 9000), (3, 3), (28, 37), (32, 32)),
}


class Drawn(list):
    def __init__(self):
        super().__init__()
        self.panels = []


@pytest.fixture
def drawn(monkeypatch):
    """Shapes of every array matplotlib is asked to draw (Axes.imshow), per call."""
    from matplotlib.axes import Axes

    shapes = []
    real = Axes.imshow

    def spy(self, X, *a, **k):
        shapes.append(np.asarray(X).shape)
        ext = k.get("extent")
        if ext is not None and k.get("aspect") != "auto":  # an image panel: its drawn shape
            shapes.panels.append((abs(ext[1] - ext[0]), abs(ext[2] - ext[3])))
        return real(self, X, *a, **k)

    shapes = Drawn()

    monkeypatch.setattr(Axes, "imshow", spy)
    return shapes


def png_size(path):
    with Image.open(path) as im:
        return im.size


def assert_png_in_budget(path):
    w, h = png_size(path)
    assert w <= plotting.MAX_PNG_SIDE and h <= plotting.MAX_PNG_SIDE and w * h <= plotting.MAX_PNG_PIXELS, \
        (os.path.basename(path), w, h)
    return w, h


def assert_drawn_in_budget(shapes):
    """One figure's imshow calls: each array at most MAX_DRAW_SIDE a side, all together within
    the figure's budget (maps + images under them), panels at most MAX_ASPECT:1."""
    for s in shapes:
        assert max(s[:2]) <= plotting.MAX_DRAW_SIDE, s
    assert sum(s[0] * s[1] for s in shapes) <= 2 * plotting.MAX_DRAW_PIXELS + 2 * 4096  # + role bands
    for w, h in shapes.panels:
        assert max(w, h) / min(w, h) <= plotting.MAX_ASPECT + 0.05, (w, h)
    shapes.clear()
    shapes.panels.clear()


def gradient(size):
    """A cheap synthetic RGB image of ``size`` = (w, h) (no per-pixel Python work)."""
    w, h = size
    return Image.linear_gradient("L").resize((w, h)).convert("RGB")


def all_plots(rec, out, image):
    yield plotting.plot_token_heatmaps(rec, out / "tok.png", image)
    yield plotting.plot_resampler_queries(rec, out / "q.png", image, slice=0)
    yield plotting.plot_resampler_queries(rec, out / "q1.png", image, slice=1)
    yield plotting.plot_vision_received(rec, out / "vision.png", image=image)
    yield plotting.plot_attention_matrix(rec, out / "mat.png", 0)
    yield plotting.plot_head_image_share(rec, out / "heads.png", rows="generated")
    yield plotting.plot_role_shares(rec, out / "roles.png")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_plots_of_extreme_and_large_images_stay_in_budget(shape, tmp_path, drawn):
    size, grid, src, sl = SHAPES[shape]
    rec = build_record(build_layout([(size, grid, src, sl)], n_gen=3), n_layers=2, heads=2, seed=3)
    image = gradient(size) if size[0] * size[1] <= 1_000_000 else None  # the big one: geometry only
    t0 = time.time()
    for path in all_plots(rec, tmp_path, image):
        w, h = assert_png_in_budget(path)
        assert min(w, h) >= 150  # still a readable figure
        assert_drawn_in_budget(drawn)
    assert time.time() - t0 < 60


def test_large_image_is_reduced_before_per_query_drawing(tmp_path, drawn):
    """A 6000 x 4500 photo (the 12000 x 9000 one is the same code path): what numpy/matplotlib
    allocate while drawing stays far below one full-size copy of the image."""
    size = (6000, 4500)
    rec = build_record(build_layout([(size, (3, 3), (28, 37), (32, 32))], n_gen=3), n_layers=2, heads=2)
    photo = gradient(size)
    full_rgba_float = size[0] * size[1] * 4 * 8  # what matplotlib made of the full-size crop before
    tracemalloc.start()
    try:
        plotting.plot_resampler_queries(rec, tmp_path / "q.png", photo, slice=0)
        plotting.plot_token_heatmaps(rec, tmp_path / "tok.png", photo)
        plotting.plot_vision_received(rec, tmp_path / "v.png", image=photo)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20 < full_rgba_float, peak
    assert all(max(s[:2]) <= plotting.MAX_DRAW_SIDE for s in drawn)
    small = plotting.display_image(photo)
    assert max(small.size) == plotting.MAX_DRAW_SIDE and small.mode == "RGB"


def test_many_panels_share_the_figure_budget(tmp_path, drawn):
    size = (4000, 3000)
    rec = build_record(build_layout([(size, None, (24, 32), None)], n_gen=40), n_layers=1, heads=1)
    p = plotting.plot_token_heatmaps(rec, tmp_path / "tok.png", gradient(size), max_tokens=40, max_side=1024)
    assert_png_in_budget(p)
    side = math.isqrt(plotting.MAX_DRAW_PIXELS // 40)
    assert all(max(s[:2]) <= side for s in drawn)
    assert_drawn_in_budget(drawn)


def test_large_attention_matrix_drawn_as_block_means(tmp_path, drawn):
    rec = build_record(build_layout([((90, 90), None, (3, 3), None)], n_text=750, n_gen=3),
                       n_layers=1, heads=1, vis_layers=1)
    n = len(rec.layout.tokens)
    assert n > plotting.MAX_DRAW_SIDE
    p = plotting.plot_attention_matrix(rec, tmp_path / "mat.png", 0)
    assert_png_in_budget(p)
    assert max(drawn[0]) <= plotting.MAX_DRAW_SIDE
    m = np.arange(12.0).reshape(3, 4)
    small, (fy, fx) = plotting._block_mean(m, 2, 2)
    assert (fy, fx) == (2, 2) and small.shape == (2, 2)
    assert np.allclose(small, [[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4], [(8 + 9) / 2, (10 + 11) / 2]])


def test_explicit_sizes_over_budget_are_refused(tmp_path):
    rec = build_record(build_layout([((300, 200), (3, 2), (4, 6), (5, 5))]), n_layers=1, heads=1)
    with pytest.raises(ValueError, match="expected at most 4096 px a side"):
        plotting.plot_role_shares(rec, tmp_path / "r.png", figsize=(50, 5), dpi=100)
    with pytest.raises(ValueError, match="max_side=5000: expected 1 to 1024"):
        plotting.plot_token_heatmaps(rec, tmp_path / "t.png", max_side=5000)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ the command
@pytest.fixture
def no_model(monkeypatch):
    import minicpmv_attn.analysis.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))


def run_main(argv, capsys):
    """(exit status, the error line or all of stderr when there is none); an error must be one
    line (progress bars of the model build may come before it) and no traceback."""
    from minicpmv_attn.scripts.visualize_attention import main

    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, errors
    return rc, errors[0] if errors else err


@pytest.mark.parametrize("prompt", ["", "   "])
def test_visualize_refuses_empty_prompt(prompt, tmp_path, capsys, no_model):
    rc, err = run_main(["--prompt", prompt, "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert rc == 2
    assert err.startswith("error: --prompt") and "empty" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("prompt,marker", [("look (<image>./</image>) here", "<image>, </image>"),
                                           ("</slice>", "</slice>"), ("a <slice> b", "<slice>")])
def test_visualize_refuses_image_markers_in_prompt(prompt, marker, tmp_path, capsys, no_model):
    rc, err = run_main(["--prompt", prompt, "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert rc == 2
    assert err.startswith("error: --prompt: expected plain text") and marker in err
    assert not (tmp_path / "o").exists()


def test_image_cost_estimates():
    budget = vz.IMAGE_BUDGET_BYTES
    assert vz.image_cost_bytes((12000, 9000), "RGB") <= budget  # legal photo: accepted
    assert vz.image_cost_bytes((13000, 13000), "RGB") <= budget  # every RGB image the loader takes
    assert vz.image_cost_bytes((13000, 13000), "RGBA") > budget
    assert vz.image_cost_bytes((9000, 9000), "I;16") > budget


def test_visualize_refuses_image_over_budget_before_loading(tmp_path, capsys, no_model, monkeypatch):
    img = tmp_path / "photo.png"
    gradient((400, 300)).save(img)
    monkeypatch.setattr(vz, "IMAGE_BUDGET_BYTES", 1_000_000)
    rc, err = run_main(["--image", str(img), "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert rc == 2
    assert "photo.png" in err and "400 x 300 = 120,000 pixels" in err and "GiB" in err and "expected" in err
    assert not (tmp_path / "o").exists()


def test_visualize_refuses_extreme_slice_shape(tmp_path, capsys):
    """1 x 8000 px: the random demo's processor (224 px slices) would give the overview slice 1,431 patches."""
    img = tmp_path / "line.png"
    gradient((1, 8000)).save(img)
    rc, err = run_main(["--model", "random-demo", "--image", str(img), "--out", str(tmp_path / "o"), "--quiet"],
                       capsys)
    assert rc == 2
    assert "line.png" in err and "expected at most 1,024 patches per slice" in err and "1,431" in err
    assert not (tmp_path / "o").exists()


def test_visualize_refuses_too_many_plot_tokens(tmp_path, capsys, no_model):
    rc, err = run_main(["--max-plot-tokens", "500", "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert rc == 2 and "--max-plot-tokens: expected 1 to 128" in err


def test_visualize_extreme_aspect_end_to_end(tmp_path, capsys, drawn):
    """20 x 20000 px used to take ~2 minutes and write a 980 x 445,440 px PNG."""
    img = tmp_path / "strip.png"
    gradient((20, 20000)).save(img)
    out = tmp_path / "out"
    t0 = time.time()
    rc, err = run_main(["--image", str(img), "--out", str(out), "--quiet", "--max-new-tokens", "2"], capsys)
    assert rc == 0, err
    assert time.time() - t0 < 120
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 6
    for p in pngs:
        assert_png_in_budget(p)
    assert all(max(s[:2]) <= plotting.MAX_DRAW_SIDE for s in drawn)
    assert "(20 x 20000 px; the plots draw a copy at most 1024 px on the long side, stretched to 4:1)" in \
        (out / "index.html").read_text()


def test_help_states_the_budget():
    from minicpmv_attn.scripts.visualize_attention import build_parser

    text = " ".join(build_parser().format_help().split())
    for phrase in (f"{vz.IMAGE_BUDGET_BYTES / 2**30:g} GiB", f"{vz.BYTES_PER_PIXEL['RGB']} bytes per pixel",
                   f"{vz.MAX_SLICE_PATCHES_FACTOR}x the patches", f"at most {plotting.MAX_DRAW_SIDE} px",
                   f"{plotting.MAX_ASPECT:g}:1", f"{plotting.MAX_PNG_SIDE} px a side",
                   f"{plotting.MAX_PNG_PIXELS // 1_000_000} Mpx", "178,956,970 pixels", "</slice>"):
        assert phrase in text, phrase
