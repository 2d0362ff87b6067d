"""A model split over devices by ``device_map`` (accelerate): same logits, same captured attention.

On a CPU-only machine the split that can be forced is CPU plus disk offload (accelerate
moves each offloaded module's weights in for its forward); the capture's gathering of pieces
computed on different devices is tested with the meta device; a real two-GPU split runs
where two CUDA devices exist.
"""
import pytest
import torch

from golden import case_dir, load_inputs
from minicpmv_attn import CaptureSpec, MiniCPMV, MiniCPMVConfig
from minicpmv_attn.capture import AttentionCapture, _join, _Piece, parse_hook_name

CASE = "two_images_batch"  # left padding, two samples, several slices


def _accelerate_missing():
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return True
    return False


needs_accelerate = pytest.mark.skipif(_accelerate_missing(), reason="device_map needs accelerate (not installed)")


def split_map(case, devices):
    """Every tower's layers spread round-robin over ``devices`` (embeddings and heads included)."""
    cfg = MiniCPMVConfig.from_pretrained(str(case_dir(case)))
    names = ["vpm.embeddings", *(f"vpm.encoder.layers.{i}" for i in range(cfg.vision_config.num_hidden_layers)),
             "vpm.post_layernorm", "resampler", "llm.model.embed_tokens",
             *(f"llm.model.layers.{i}" for i in range(cfg.num_hidden_layers)), "llm.model.norm", "llm.lm_head"]
    return {name: devices[i % len(devices)] for i, name in enumerate(names)}


_REF = {}


def reference(case, spec):
    key = (case, repr(spec))
    if key not in _REF:
        model = MiniCPMV.from_pretrained(str(case_dir(case)))
        data, mask = load_inputs(case)
        with torch.no_grad():
            _REF[key] = model(data, attention_mask=mask, output_attentions=spec)
    return _REF[key]


@needs_accelerate
@pytest.mark.parametrize("spec", [CaptureSpec(), CaptureSpec(layers=[0, -1], rows="last", reduce="mean", device="cpu")],
                         ids=["all", "selection-to-cpu"])
def test_cpu_and_disk_offload_equals_unsplit(spec, tmp_path):
    device_map = split_map(CASE, ["cpu", "disk"])
    model = MiniCPMV.from_pretrained(str(case_dir(CASE)), device_map=device_map, offload_folder=str(tmp_path))
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert any(n.startswith("llm.model.layers.") for n in offloaded) and any(n.startswith("vpm.") for n in offloaded)
    assert any(n.startswith("resampler.") for n in offloaded) or device_map["resampler"] == "cpu"
    data, mask = load_inputs(CASE)
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions=spec)
    ref = reference(CASE, spec)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
    assert set(out.captured) == set(ref.captured) and out.capture_index == ref.capture_index
    for name, got in out.captured.items():
        assert got.device.type == "cpu", name
        torch.testing.assert_close(got, ref.captured[name], atol=1e-6, rtol=0, msg=name)


@needs_accelerate
def test_generate_with_capture_on_an_offloaded_model(tmp_path):
    from test_golden import FakeTokenizer

    data, mask = load_inputs(CASE)
    kw = dict(input_ids=data["input_ids"], pixel_values=data["pixel_values"], tgt_sizes=data["tgt_sizes"],
              image_bound=data["image_bound"], attention_mask=mask, tokenizer=FakeTokenizer(), do_sample=False,
              max_new_tokens=4, min_new_tokens=4, output_attentions=CaptureSpec(stages=["llm"], rows="generated"))
    split = MiniCPMV.from_pretrained(str(case_dir(CASE)), device_map=split_map(CASE, ["disk", "cpu"]),
                                     offload_folder=str(tmp_path))
    whole = MiniCPMV.from_pretrained(str(case_dir(CASE)))
    got, want = split.generate(**kw), whole.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    assert set(got.captured) == set(want.captured)
    for name in want.captured:
        torch.testing.assert_close(got.captured[name], want.captured[name], atol=1e-6, rtol=0, msg=name)


def test_join_gathers_pieces_from_different_devices():
    """Pieces computed on different devices are gathered on the spec's device, else on the
    first piece's (meta stands in for a second device)."""
    cpu = torch.ones(1, 2, 3, 4)
    meta = torch.empty(1, 2, 5, 3, device="meta")
    joined = _join([meta, cpu], 2)
    assert joined.device.type == "meta" and joined.shape == (1, 2, 8, 4)
    joined = _join([cpu, meta], 2, device="meta")
    assert joined.device.type == "meta" and joined.shape == (1, 2, 8, 4)
    single = _join([cpu], 2, device="meta")
    assert single.device.type == "meta" and single.shape == cpu.shape
    assert _join([cpu, cpu * 2], 0).device.type == "cpu"
    padded = torch.nn.functional.pad(cpu[..., :2], (0, 2))
    torch.testing.assert_close(_join([cpu[..., :2], cpu * 2], 2), torch.cat([padded, cpu * 2], 2))


def test_capture_result_gathers_on_the_spec_device():
    dims = {"layers": {"llm": 2, "vision": 1, "resampler": 1}, "heads": {"llm": 2, "vision": 2, "resampler": 2},
            "query_num": 4}
    for device, want in ((None, "cpu"), ("meta", "meta")):
        capture = AttentionCapture(CaptureSpec(stages=["llm", "vision"], device=device), dims["layers"], dims["heads"])
        capture.add("llm.layers.0.attn", _Piece(torch.rand(1, 2, 3, 3), torch.arange(3), None))
        capture.add("llm.layers.0.attn", _Piece(torch.empty(1, 2, 1, 4, device="meta"), torch.tensor([3]), None))
        capture.add("vision.layers.0.attn", _Piece(torch.rand(2, 2, 5, 5), None, None))
        capture.add("vision.layers.0.attn", _Piece(torch.empty(1, 2, 5, 5, device="meta"), None, None))
        if device is None:  # the first piece's device (cpu): copying from meta has no data
            with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
                capture.result()
            continue
        tensors, index = capture.result()
        assert {t.device.type for t in tensors.values()} == {want}
        assert tensors["llm.layers.0.attn"].shape == (1, 2, 4, 4) and index["llm.layers.0.attn"]["rows"] == [0, 1, 2, 3]
        assert tensors["vision.layers.0.attn"].shape == (3, 2, 5, 5)


@needs_accelerate
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"needs two CUDA devices (this machine has "
                                                             f"{torch.cuda.device_count()})")
def test_two_gpu_split_equals_cpu():
    """Layers alternate over cuda:0 and cuda:1: the same logits and maps as the unsplit CPU
    model; with spec.device None each map stays on the device of the layer that computed it,
    with device="cpu" all come to the CPU."""
    device_map = split_map(CASE, [0, 1])
    model = MiniCPMV.from_pretrained(str(case_dir(CASE)), device_map=device_map)
    data, mask = load_inputs(CASE)
    for spec in (CaptureSpec(), CaptureSpec(device="cpu"), CaptureSpec(device="cuda:1")):
        with torch.no_grad():
            out = model(data, attention_mask=mask.to("cuda:0"), output_attentions=spec)
        ref = reference(CASE, CaptureSpec())
        torch.testing.assert_close(out.logits.cpu(), ref.logits, atol=1e-4, rtol=0)
        for name, got in out.captured.items():
            stage, layer = parse_hook_name(name)
            module = {"llm": f"llm.model.layers.{layer}", "vision": f"vpm.encoder.layers.{layer}"}.get(stage,
                                                                                                      "resampler")
            want = torch.device(spec.device) if spec.device is not None else torch.device("cuda", device_map[module])
            assert got.device == want, (name, got.device, want)
            torch.testing.assert_close(got.cpu(), ref.captured[name], atol=1e-5, rtol=0, msg=name)


@needs_accelerate
@pytest.mark.parametrize("num_beams", [1, 2])  # 2: beam search captures by replaying prompt + answer
def test_chat_with_capture_on_an_offloaded_model(tmp_path, num_beams):
    """chat() feeds the processor's tensors to where the LLM's embeddings run, even when they
    are offloaded (their weights on meta): the same answer and record as the unsplit model."""
    import os
    import shutil

    from PIL import Image
    from transformers import AutoProcessor

    from minicpmv_attn.demo import demo_tokenizer_path

    folder = tmp_path / "ckpt"
    shutil.copytree(case_dir("single_image"), folder)
    for name in os.listdir(str(demo_tokenizer_path())):
        shutil.copy(os.path.join(str(demo_tokenizer_path()), name), folder)
    processor = AutoProcessor.from_pretrained(str(folder))
    image = Image.open(folder / "image_0_0.png")
    msgs = [{"role": "user", "content": "Describe please."}]
    kw = dict(processor=processor, max_new_tokens=4, sampling=False, num_beams=num_beams,
              output_attentions=CaptureSpec(rows="generated"))
    split = MiniCPMV.from_pretrained(str(folder), device_map=split_map("single_image", ["cpu", "disk"]),
                                     offload_folder=str(tmp_path / "offload"))
    assert split.llm.model.embed_tokens.weight.device.type == "meta"
    whole = MiniCPMV.from_pretrained(str(folder))
    (got, got_record), (want, want_record) = (m.chat(image, msgs, processor.tokenizer, **kw) for m in (split, whole))
    assert got == want
    assert set(got_record.tensors) == set(want_record.tensors) and got_record.tensors
    for name, t in want_record.tensors.items():
        torch.testing.assert_close(got_record.tensors[name], t, atol=1e-6, rtol=0, msg=name)
