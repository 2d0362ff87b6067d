"""Processor, image processor and demo tokenizer against upstream's golden outputs.

Golden fixtures: ../shared/golden/minicpmv26/<case>/ (upstream's real processor outputs on
the toy vocabulary); see shared/golden/README.md.
"""
import importlib.util
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from minicpmv_attn.demo import demo_tokenizer_path
from minicpmv_attn.image_processing_minicpmv import (
    ImageLayout,
    MiniCPMVBatchFeature,
    MiniCPMVImageProcessor,
    best_slice_grid,
    reshape_by_patch,
    slice_layout,
)
from minicpmv_attn.processing_minicpmv import IMAGE_TAG, MiniCPMVProcessor, register_processing
from minicpmv_attn.tokenization_minicpmv_fast import MiniCPMVTokenizerFast

from golden import GOLDEN as GOLDEN_DIR, MISSING

REPO = Path(__file__).resolve().parents[1]
GOLDEN = GOLDEN_DIR  # ../shared/golden/minicpmv26 or under MINICPMV_ATTN_GOLDEN
CASES = ["single_image", "two_images_batch", "text_only"]

pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(), reason=MISSING)


# ----------------------------------------------------------------------------- helpers


def _meta(case):
    return json.loads((GOLDEN / case / "meta.json").read_text())


def _inputs(case):
    return load_file(str(GOLDEN / case / "inputs.safetensors"))


def _preproc_cfg(case):
    return json.loads((GOLDEN / case / "preprocessor_config.json").read_text())


def _images(case):
    return [[Image.open(GOLDEN / case / im["file"]) for im in s["images"]] for s in _meta(case)["samples"]]


@pytest.fixture(scope="module")
def tokenizer():
    return MiniCPMVTokenizerFast.from_pretrained(demo_tokenizer_path())


def _processor(case, tokenizer):
    return MiniCPMVProcessor(MiniCPMVImageProcessor(**_preproc_cfg(case)), tokenizer)


def _prompts(case, tokenizer):
    """The golden ``text`` wrapped in the demo tokenizer's ChatML template."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": s["text"]}], tokenize=False,
                                          add_generation_prompt=True) for s in _meta(case)["samples"]]


# ----------------------------------------------------------------------------- demo tokenizer


def test_demo_tokenizer_reproduces_golden_vocab(tokenizer):
    vocab = {int(k): v for k, v in _meta("single_image")["vocab"].items()}
    assert len(tokenizer) == max(vocab) + 1 == 115
    for idx, tok in vocab.items():
        assert tokenizer.convert_ids_to_tokens(idx) == tok, idx
        # every golden token is one id, markers included
        assert tokenizer.encode(tok, add_special_tokens=False) == [idx], tok
    assert tokenizer.pad_token_id == 0
    assert tokenizer.encode("é", add_special_tokens=False) == [tokenizer.unk_token_id]


def test_demo_tokenizer_build_is_deterministic_and_shipped(tmp_path):
    spec = importlib.util.spec_from_file_location("build_demo_tokenizer", REPO / "scripts" / "build_demo_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a, b = tmp_path / "a", tmp_path / "b"
    mod.build(str(a))
    mod.build(str(b))
    names = sorted(p.name for p in a.iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    shipped = Path(demo_tokenizer_path())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        assert (a / name).read_bytes() == (shipped / name).read_bytes(), f"{name}: shipped copy is stale"


def test_tokenizer_marker_ids(tokenizer):
    t = tokenizer
    assert (t.im_start_id, t.im_end_id, t.slice_start_id, t.slice_end_id) == (5, 6, 7, 8)
    assert (t.im_id_start_id, t.im_id_end_id, t.ref_start_id, t.box_start_id, t.point_end_id) == (9, 10, 11, 13, 18)
    assert (t.unk_id, t.bos_id, t.eos_id, t.newline_id) == (1, 3, 4, 114)
    assert t.convert_tokens_to_ids(t.im_start) == 5 and t.slice_end == "</slice>"
    assert {5, 6, 7, 8, 9, 10} <= set(t.all_special_ids)


def test_chat_template_gives_golden_prompt_frame(tokenizer):
    for case in CASES:
        for sample, prompt in zip(_meta(case)["samples"], _prompts(case, tokenizer)):
            assert prompt == f"<|im_start|>user\n{sample['text']}<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------- image processor


@pytest.mark.parametrize("case", ["single_image", "two_images_batch"])
def test_pixel_values_and_tgt_sizes_match_golden(case):
    ip = MiniCPMVImageProcessor(**_preproc_cfg(case))
    gold = _inputs(case)
    out = ip(_images(case), return_tensors="pt")
    assert isinstance(out, MiniCPMVBatchFeature)
    for s, sample in enumerate(_meta(case)["samples"]):
        assert torch.equal(out["tgt_sizes"][s].to(torch.int32), gold[f"tgt_sizes.{s}"])
        n = gold[f"tgt_sizes.{s}"].shape[0]
        assert len(out["pixel_values"][s]) == n
        for j in range(n):
            pv, g = out["pixel_values"][s][j], gold[f"pixel_values.{s}.{j}"]
            assert pv.dtype == torch.float32 and pv.shape == g.shape
            assert (pv - g).abs().max().item() <= 1e-6, (s, j)
        assert [tuple(x.tolist()) for x in out["image_sizes"][s]] == [tuple(im["size"]) for im in sample["images"]]


@pytest.mark.parametrize("case", ["single_image", "two_images_batch"])
def test_grid_and_placeholder_text_match_golden(case, tokenizer):
    ip = MiniCPMVImageProcessor(**_preproc_cfg(case))
    for sample, prompt in zip(_meta(case)["samples"], _prompts(case, tokenizer)):
        chunks = prompt.split(IMAGE_TAG)
        assert len(chunks) == len(sample["images"]) + 1
        text = chunks[0]
        for i, im in enumerate(sample["images"]):
            assert ip.get_sliced_grid(im["size"]) == im["grid"]
            layout = ip.get_slice_layout(im["size"])
            assert (list(layout.grid) if layout.grid else None) == im["grid"]
            text += ip.get_slice_image_placeholder(im["size"], i) + chunks[i + 1]
        assert text == sample["prompt"]


def test_placeholder_variants():
    ip = MiniCPMVImageProcessor(scale_resolution=112, image_feature_size=2, use_image_id=False)
    q = "<unk><unk>"
    assert ip.get_slice_image_placeholder((50, 50)) == f"<image>{q}</image>"
    assert ip.get_slice_image_placeholder((50, 50), 3, use_image_id=True) == f"<image_id>3</image_id><image>{q}</image>"
    s = f"<slice>{q}</slice>"
    assert ip.get_slice_image_placeholder((300, 200)) == f"<image>{q}</image>{s * 3}\n{s * 3}"
    assert ip.get_slice_image_placeholder((300, 200), max_slice_nums=1) == f"<image>{q}</image>"


def test_reshape_by_patch_matches_unfold_layout():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((3, 28, 42)).astype(np.float32)
    t = torch.from_numpy(img)
    ref = torch.nn.functional.unfold(t, (14, 14), stride=(14, 14)).reshape(3, 14, 14, -1)
    ref = ref.permute(0, 1, 3, 2).reshape(3, 14, -1).numpy()
    out = reshape_by_patch(img, 14)
    assert out.shape == (3, 14, 14 * 6)
    np.testing.assert_array_equal(out, ref)


SIZES = [(300, 200), (150, 260), (260, 120), (90, 90), (1000, 1000), (1333, 777), (4000, 14), (14, 4000),
         (1, 1), (1344, 448), (700, 2100), (999, 10)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("scale_resolution,max_slices", [(112, 9), (448, 9), (112, 4)])
def test_slice_layout_boxes_tile_the_image(size, scale_resolution, max_slices):
    W, H = size
    layout = slice_layout(size, max_slice_nums=max_slices, scale_resolution=scale_resolution, patch_size=14)
    assert isinstance(layout, ImageLayout) and layout.size == size
    src = layout.slices[0]
    assert src.kind == "source" and src.box == (0.0, 0.0, float(W), float(H)) and src.grid_pos is None
    cells = layout.slices[1:]
    assert layout.grid == best_slice_grid(size, max_slices, scale_resolution)
    if layout.grid is None:
        assert len(cells) == 0
        return
    cols, rows = layout.grid
    assert 2 <= cols * rows <= max_slices + 1 and len(cells) == cols * rows
    assert [c.grid_pos for c in cells] == [(r, c) for r in range(rows) for c in range(cols)]  # model order
    assert [c.index for c in layout.slices] == list(range(len(layout.slices)))
    area = 0.0
    for c in cells:
        x0, y0, x1, y1 = c.box
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        area += (x1 - x0) * (y1 - y0)
        assert c.tgt_size[0] >= 1 and c.tgt_size[1] >= 1
        assert c.pixel_size == (c.tgt_size[1] * 14, c.tgt_size[0] * 14)
    assert area == pytest.approx(W * H, rel=1e-12)  # union covers the image ...
    for a, b in itertools.combinations(cells, 2):  # ... with no overlap
        ix = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
        iy = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
        assert ix <= 1e-9 or iy <= 1e-9
    xs = sorted({c.box[0] for c in cells} | {c.box[2] for c in cells})
    ys = sorted({c.box[1] for c in cells} | {c.box[3] for c in cells})
    assert len(xs) == cols + 1 and len(ys) == rows + 1 and xs[0] == 0 and xs[-1] == W and ys[-1] == H


@pytest.mark.parametrize("size", [(300, 200), (150, 260), (260, 120), (90, 90), (500, 37), (14, 700), (1, 1)])
def test_slice_layout_matches_processed_slices(size):
    ip = MiniCPMVImageProcessor(scale_resolution=112, image_feature_size=4)
    out = ip(Image.new("RGB", size, (30, 60, 90)), return_tensors="pt")
    layout = ip.get_slice_layout(size)
    tgt = out["tgt_sizes"][0]
    assert tgt.tolist() == [list(s.tgt_size) for s in layout.slices]
    for pv, (h, w) in zip(out["pixel_values"][0], tgt.tolist()):
        assert pv.shape == (3, 14, 14 * h * w)


def test_best_grid_follows_log_aspect_ratio():
    assert best_slice_grid((300, 200), 9, 112) == (3, 2)
    assert best_slice_grid((150, 260), 9, 112) == (1, 3)
    assert best_slice_grid((90, 90), 9, 112) is None
    assert best_slice_grid((4000, 14), 9, 112) == (6, 1)
    assert best_slice_grid((14, 4000), 9, 112) == (1, 6)
    assert best_slice_grid((448 * 3, 448 * 3), 9, 448) == (3, 3)
    assert best_slice_grid((448 * 5, 448 * 5), 9, 448) == (3, 3)  # capped by max_slice_nums


# ----------------------------------------------------------------------------- processor


@pytest.mark.parametrize("case", CASES)
def test_processor_matches_golden_inputs(case, tokenizer):
    proc = _processor(case, tokenizer)
    gold, meta = _inputs(case), _meta(case)
    images = _images(case)
    out = proc(_prompts(case, tokenizer), images if any(images) else None)
    assert out["input_ids"].dtype == torch.long
    assert torch.equal(out["input_ids"], gold["input_ids"])
    assert torch.equal(out["attention_mask"].long(), gold["attention_mask"])
    assert torch.equal(out["attention_mask"].bool(), out["input_ids"] != 0)
    B = gold["input_ids"].shape[0]
    assert len(out["image_bound"]) == len(out["pixel_values"]) == len(out["slice_layouts"]) == B
    for s in range(B):
        assert torch.equal(out["image_bound"][s], gold[f"image_bound.{s}"])
        assert int((out["attention_mask"][s] == 0).sum()) == meta["padding"][s]
        n = sum(1 for k in gold if k.startswith(f"pixel_values.{s}."))
        assert len(out["pixel_values"][s]) == n
        for j in range(n):
            assert torch.allclose(out["pixel_values"][s][j], gold[f"pixel_values.{s}.{j}"], atol=1e-6, rtol=0)
        if n:
            assert torch.equal(out["tgt_sizes"][s].to(torch.int32), gold[f"tgt_sizes.{s}"])
            layouts = out["slice_layouts"][s]
            assert [l.size for l in layouts] == [tuple(im["size"]) for im in meta["samples"][s]["images"]]
            assert sum(len(l.slices) for l in layouts) == n
        else:
            assert out["tgt_sizes"][s] == [] and out["slice_layouts"][s] == []


def test_processor_prompt_tokens_equal_golden_prompt(tokenizer):
    """The tokens of the processed prompt spell out meta.json's prompt (real positions only)."""
    case = "two_images_batch"
    out = _processor(case, tokenizer)(_prompts(case, tokenizer), _images(case))
    for s, sample in enumerate(_meta(case)["samples"]):
        ids = out["input_ids"][s][out["attention_mask"][s].bool()]
        assert tokenizer.decode(ids.tolist()) == sample["prompt"]


def test_batch_feature_to_casts_floats_only(tokenizer):
    case = "single_image"
    out = _processor(case, tokenizer)(_prompts(case, tokenizer), _images(case))
    layouts = out["slice_layouts"]
    out = out.to(torch.float16)
    assert out["pixel_values"][0][0].dtype == torch.float16
    assert out["input_ids"].dtype == torch.long and out["image_bound"][0].dtype == torch.long
    assert out["tgt_sizes"][0].dtype == torch.int32
    out = out.to("cpu")
    assert out["input_ids"].device.type == "cpu" and out["slice_layouts"] == layouts
    assert out.input_ids is out["input_ids"]  # attribute access as in upstream's chat()
    with pytest.raises(ValueError):
        out.to([1, 2])


def test_tag_image_count_mismatch_errors(tokenizer):
    proc = _processor("single_image", tokenizer)
    img = _images("single_image")[0][0]
    with pytest.raises(ValueError, match=r"2 image tag\(s\).*1 image\(s\)"):
        proc(f"a {IMAGE_TAG} b {IMAGE_TAG}", [img])
    with pytest.raises(ValueError, match=r"1 image tag\(s\).*2 image\(s\)"):
        proc(f"a {IMAGE_TAG}", [img, img])
    with pytest.raises(ValueError, match=r"0 image tag\(s\).*1 image\(s\)"):
        proc("no tag", [img])
    with pytest.raises(ValueError, match=r"1 image tag\(s\).*0 image\(s\)"):
        proc(f"a {IMAGE_TAG}")
    with pytest.raises(ValueError, match=r"2 text\(s\).*1 sample"):
        proc([f"a {IMAGE_TAG}", f"b {IMAGE_TAG}"], [img, img])


def test_stray_marker_tokens_are_refused(tokenizer):
    proc = _processor("single_image", tokenizer)
    with pytest.raises(ValueError, match="marker"):
        proc("text with a raw <image> marker")


def test_max_length_cutting_a_placeholder_errors(tokenizer):
    case = "single_image"
    proc = _processor(case, tokenizer)
    prompt, images = _prompts(case, tokenizer), _images(case)
    full = proc(prompt, images)
    L = full["input_ids"].shape[1]
    needed = int(full["image_bound"][0][-1, 1]) + 1  # last </slice> included
    assert needed < L
    for bad in (10, needed - 1, int(full["image_bound"][0][0, 0])):
        with pytest.raises(ValueError, match=rf"max_length={bad}.*max_length >= {needed}"):
            proc(prompt, images, max_length=bad)
    cut = proc(prompt, images, max_length=needed)  # text after the images may be truncated, as upstream
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, :needed])
    assert torch.equal(cut["image_bound"][0], full["image_bound"][0])
    assert torch.equal(proc(prompt, images, max_length=L)["input_ids"], full["input_ids"])
    text_only = proc("hello world", max_length=4)  # no image: plain truncation
    assert text_only["input_ids"].shape == (1, 4)


def test_use_image_id_and_max_slice_nums_overrides(tokenizer):
    case = "single_image"
    proc = _processor(case, tokenizer)
    img = _images(case)[0][0]
    out = proc(f"x{IMAGE_TAG}", [img], use_image_id=False, max_slice_nums=1)
    ids = out["input_ids"][0].tolist()
    assert tokenizer.im_id_start_id not in ids and tokenizer.slice_start_id not in ids
    assert len(out["pixel_values"][0]) == 1 and out["image_bound"][0].shape == (1, 2)
    assert out["slice_layouts"][0][0].grid is None


def test_decode_strips_padding_bos_eos(tokenizer):
    proc = _processor("text_only", tokenizer)
    ids = [0, 0, tokenizer.bos_id] + tokenizer.encode(" hi there ", add_special_tokens=False) + [tokenizer.eos_id]
    assert proc.decode(torch.tensor(ids)) == "hi there"
    assert proc.batch_decode(torch.tensor([ids, ids])) == ["hi there", "hi there"]
    assert proc.decode([0, 0]) == ""


def test_auto_processor_from_pretrained_without_remote_code(tmp_path, tokenizer):
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    import minicpmv_attn.processing_minicpmv  # noqa: F401  (registers via the package, if it does)

    register_processing()
    register_processing()  # idempotent
    cfg = _preproc_cfg("single_image")
    cfg.update(processor_class="MiniCPMVProcessor", auto_map={
        "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
        "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    for f in Path(demo_tokenizer_path()).iterdir():
        shutil.copy(f, tmp_path / f.name)
    proc = AutoProcessor.from_pretrained(str(tmp_path))
    assert type(proc) is MiniCPMVProcessor
    assert type(proc.image_processor) is MiniCPMVImageProcessor
    assert type(proc.tokenizer) is MiniCPMVTokenizerFast
    assert proc.image_processor.scale_resolution == 112 and proc.image_processor.use_image_id is True
    assert type(AutoImageProcessor.from_pretrained(str(tmp_path))) is MiniCPMVImageProcessor
    assert type(AutoTokenizer.from_pretrained(str(tmp_path))) is MiniCPMVTokenizerFast
    out = proc(_prompts("single_image", tokenizer), _images("single_image"))
    assert torch.equal(out["input_ids"], _inputs("single_image")["input_ids"])
    # and it survives a save / load round trip
    proc.save_pretrained(str(tmp_path / "saved"))
    again = AutoProcessor.from_pretrained(str(tmp_path / "saved"))
    assert type(again) is MiniCPMVProcessor and again.image_processor.image_feature_size == 16


def test_tokenizer_from_vocab_and_merges_only(tmp_path):
    """A checkpoint folder with Qwen2's vocab.json + merges.txt but no tokenizer.json still loads."""
    import json as _json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    import minicpmv_attn  # noqa: F401  (registers the classes)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, this is a small corpus"] * 20, trainer)
    tok.model.save(str(tmp_path))
    markers = ["<|im_start|>", "<|im_end|>", "<image>", "</image>", "<slice>", "</slice>", "<image_id>",
               "</image_id>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>", "<unk>"]
    (tmp_path / "tokenizer_config.json").write_text(_json.dumps({
        "tokenizer_class": "MiniCPMVTokenizerFast", "eos_token": "<|im_end|>", "unk_token": "<unk>",
        "pad_token": "<|endoftext|>", "additional_special_tokens": markers}))
    assert not (tmp_path / "tokenizer.json").exists()
    t = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(t).__name__ == "MiniCPMVTokenizerFast"
    ids = t("hello <image>world</image>").input_ids
    assert t.im_start_id in ids and t.im_end_id in ids and t.decode(ids) == "hello <image>world</image>"
