"""Bad and unusual image inputs: clear errors, no crashes, sane pixels, nothing written."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmv_attn.demo import demo_tokenizer_path
from minicpmv_attn.image_processing_minicpmv import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLoadError,
    ImageTooLargeError,
    MiniCPMVImageProcessor,
    load_image,
    to_rgb,
)
from minicpmv_attn.processing_minicpmv import IMAGE_TAG, MiniCPMVProcessor
from minicpmv_attn.tokenization_minicpmv_fast import MiniCPMVTokenizerFast


@pytest.fixture(scope="module")
def processor():
    ip = MiniCPMVImageProcessor(scale_resolution=112, image_feature_size=4, use_image_id=True)
    return MiniCPMVProcessor(ip, MiniCPMVTokenizerFast.from_pretrained(demo_tokenizer_path()))


def _snapshot(folder):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())


def _png_bytes(size=(64, 48)):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def bad_files(tmp_path):
    data = _png_bytes()
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "header_only.png").write_bytes(data[:12])
    (tmp_path / "notes.png").write_text("this is a text file, not a PNG\n")
    (tmp_path / "folder.png").mkdir()
    return tmp_path


BAD = [
    ("missing.png", "cannot be read: no such file"),
    ("zero.png", "is empty (0 bytes)"),
    ("truncated.png", "is truncated/corrupt"),
    ("header_only.png", "truncated/corrupt"),
    ("notes.png", "cannot be read: not a recognised image format"),
    ("folder.png", "cannot be read: it is a directory"),
]


@pytest.mark.parametrize("name,phrase", BAD)
def test_load_image_errors_name_the_file(bad_files, name, phrase):
    before = _snapshot(bad_files)
    path = bad_files / name
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    assert isinstance(err.value, ValueError)
    assert str(path) in str(err.value) and phrase in str(err.value)
    assert _snapshot(bad_files) == before  # nothing written, nothing removed


@pytest.mark.parametrize("name,phrase", BAD)
def test_processor_reports_bad_files(bad_files, processor, name, phrase):
    before = _snapshot(bad_files)
    with pytest.raises(ImageLoadError, match=phrase.replace("(", r"\(").replace(")", r"\)")) as err:
        processor(f"look {IMAGE_TAG}", [str(bad_files / name)])
    assert name in str(err.value)
    assert _snapshot(bad_files) == before


def test_load_image_from_bytes_and_file_objects(tmp_path):
    data = _png_bytes((30, 20))
    assert load_image(data).size == (30, 20)
    assert load_image(io.BytesIO(data)).size == (30, 20)
    (tmp_path / "ok.png").write_bytes(data)
    with open(tmp_path / "ok.png", "rb") as f:
        assert load_image(f).size == (30, 20)
    with pytest.raises(ImageLoadError, match=r"is empty \(0 bytes\)"):
        load_image(io.BytesIO(b""))
    with pytest.raises(ImageLoadError, match="truncated/corrupt"):
        load_image(data[: len(data) - 40])


def test_pixel_limit_is_enforced_with_a_clear_error(tmp_path):
    assert MiniCPMVImageProcessor.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 178_956_970
    path = tmp_path / "img.png"
    path.write_bytes(_png_bytes((64, 48)))
    with pytest.raises(ImageTooLargeError, match=r"64 x 48 = 3,072 pixels.*limit of 1,000 pixels") as err:
        load_image(path, max_pixels=1000)
    assert isinstance(err.value, ValueError) and str(path) in str(err.value)
    ip = MiniCPMVImageProcessor(max_image_pixels=1000)
    with pytest.raises(ImageTooLargeError, match=r"40 x 30 = 1,200 pixels.*1,000"):
        ip(Image.new("RGB", (40, 30)))
    with pytest.raises(ImageTooLargeError, match="limit of 1,000"):
        ip(str(path))
    assert ip(Image.new("RGB", (25, 40)))["tgt_sizes"][0].shape[1] == 2  # at the limit: fine
    assert MiniCPMVImageProcessor(max_image_pixels=5).to_dict()["max_image_pixels"] == 5  # a config key


GREY = 128
GREY_VALUE = (GREY / 255 - 0.5) / 0.5  # what upstream gives for grey 128


def _grey_in_mode(mode, size=(30, 30)):
    rgb = Image.new("RGB", size, (GREY, GREY, GREY))
    if mode == "I;16":
        return Image.fromarray(np.full(size[::-1], GREY * 257, dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(np.full(size[::-1], GREY * 257, dtype=np.int32))
    if mode == "F":
        return Image.fromarray(np.full(size[::-1], GREY / 255, dtype=np.float32))
    if mode == "P":  # adaptive palette: exact grey (the web palette would dither it)
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "RGB"])
def test_modes_convert_to_sane_pixels(mode):
    ip = MiniCPMVImageProcessor(scale_resolution=112)
    im = _grey_in_mode(mode)
    assert im.mode == mode
    pv = ip(im, return_tensors="pt")["pixel_values"][0]
    assert len(pv) == 1 and pv[0].shape == (3, 14, 14 * 8 * 8)
    assert torch.isfinite(pv[0]).all()
    # uniform grey stays grey (resizing a flat image changes nothing); 16-bit is scaled, not clipped to white
    assert torch.allclose(pv[0], torch.full_like(pv[0], GREY_VALUE), atol=2.5 / 255), mode


def test_mode_1_and_transparent_images():
    ip = MiniCPMVImageProcessor(scale_resolution=112)
    white = Image.new("1", (30, 30), 1)
    assert torch.allclose(ip(white, return_tensors="pt")["pixel_values"][0][0], torch.tensor(1.0))
    checker = Image.fromarray((np.indices((30, 30)).sum(0) % 2 * 255).astype(np.uint8)).convert("1")
    pv = ip(checker, return_tensors="pt")["pixel_values"][0][0]
    assert pv.min() >= -1 and pv.max() <= 1 and pv.std() > 0.1
    # fully transparent red: upstream drops alpha (red); with alpha_background it is the background
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 0))
    dropped = np.asarray(to_rgb(rgba))
    assert tuple(dropped[0, 0]) == (255, 0, 0)
    assert tuple(np.asarray(to_rgb(rgba, alpha_background=(255, 255, 255)))[0, 0]) == (255, 255, 255)
    ip_white = MiniCPMVImageProcessor(scale_resolution=112, alpha_background=[255, 255, 255])
    assert torch.allclose(ip_white(rgba, return_tensors="pt")["pixel_values"][0][0], torch.tensor(1.0))
    pal = Image.new("P", (30, 30), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    assert tuple(np.asarray(to_rgb(pal))[0, 0]) == (10, 20, 30)
    la = Image.new("LA", (30, 30), (200, 0))
    assert tuple(np.asarray(to_rgb(la, alpha_background=(0, 0, 0)))[0, 0]) == (0, 0, 0)


def test_16bit_gradient_uses_the_full_range(tmp_path):
    grad = np.tile(np.linspace(0, 65535, 60).astype(np.uint16), (40, 1))
    path = tmp_path / "grad16.png"
    Image.fromarray(grad).save(path)
    im = load_image(path)
    assert im.mode in ("I;16", "I")
    rgb = np.asarray(to_rgb(im))
    assert rgb.min() == 0 and rgb.max() == 255  # not clipped to white
    assert abs(rgb.mean() - 127.5) < 3
    # numpy uint16 input is scaled the same way
    ip = MiniCPMVImageProcessor(scale_resolution=112)
    a = ip(grad, return_tensors="pt")["pixel_values"][0][0]
    b = ip(im, return_tensors="pt")["pixel_values"][0][0]
    assert torch.allclose(a, b, atol=1e-6)


def test_array_and_tensor_inputs_match_pil():
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    ip = MiniCPMVImageProcessor(scale_resolution=112)
    ref = ip(Image.fromarray(hwc), return_tensors="pt")["pixel_values"][0]
    for x in (hwc, np.ascontiguousarray(hwc.transpose(2, 0, 1)), torch.from_numpy(hwc.transpose(2, 0, 1).copy()),
              hwc.astype(np.float32) / 255 + 1e-4):
        out = ip(x, return_tensors="pt")["pixel_values"][0]
        assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(out, ref))
    with pytest.raises(TypeError, match="invalid image type"):
        ip([[object()]])


@pytest.mark.parametrize("size", [(1, 1), (4000, 14), (14, 4000), (2, 3000)])
def test_tiny_and_extreme_aspect_images(processor, size):
    img = Image.new("RGB", size, (200, 100, 50))
    out = processor(f"see {IMAGE_TAG}", [img])
    tgt = out["tgt_sizes"][0]
    pvs = out["pixel_values"][0]
    assert len(pvs) == tgt.shape[0] == out["image_bound"][0].shape[0] >= 1
    for pv, (h, w) in zip(pvs, tgt.tolist()):
        assert h >= 1 and w >= 1 and pv.shape == (3, 14, 14 * h * w)
        assert torch.allclose(pv[:, :, :14], pv.new_tensor([200, 100, 50]).div(255).sub(0.5).div(0.5)[:, None, None],
                              atol=1e-6)
    layout = out["slice_layouts"][0][0]
    assert layout.size == size and layout.slices[0].box == (0.0, 0.0, float(size[0]), float(size[1]))
    ids = out["input_ids"][0]
    for start, end in out["image_bound"][0].tolist():  # each bound spans exactly the query tokens
        assert end - start == 4 and bool((ids[start:end] == processor.tokenizer.unk_id).all())
