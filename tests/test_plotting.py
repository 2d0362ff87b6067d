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
