"""bitsandbytes 4-bit (nf4, fp4) and 8-bit MiniCPM-V checkpoints: load strictly, run, capture.

Each format quantises a golden case in memory (``from_pretrained(quantization_config=...)``,
the way transformers writes ``openbmb/MiniCPM-V-2_6-int4``), saves it with ``save_pretrained``
and loads it back through ``MiniCPMV.from_pretrained`` with the strict checks on. bitsandbytes'
4-bit and 8-bit layers run on the CPU with transformers 5.x; transformers 4.40's integration
refuses without CUDA, so there these tests skip with that reason.
"""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from golden import case_dir, load_expected, load_inputs, real_patch_counts
from minicpmv_attn import CaptureError, CaptureSpec, CheckpointError, MiniCPMV, MiniCPMVConfig
from minicpmv_attn import attention
from minicpmv_attn.capture import estimate_bytes
from minicpmv_attn.checkpoint import check_loaded_weights


def _why_not():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (the `quant` extra)"
    import transformers
    from transformers.utils import is_bitsandbytes_available

    if not is_bitsandbytes_available():
        return (f"transformers {transformers.__version__}'s bitsandbytes integration needs CUDA "
                f"(is_bitsandbytes_available() is False without a GPU)")
    return None


needs_bnb = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CASE = "single_image"
#: openbmb/MiniCPM-V-2_6-int4's skip list: the resampler's kv_proj / attn.out_proj and lm_head stay float
UPSTREAM_SKIP = ["out_proj", "kv_proj", "lm_head"]
FORMATS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=UPSTREAM_SKIP),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32,
                llm_int8_skip_modules=UPSTREAM_SKIP),
    "int8": dict(load_in_8bit=True, llm_int8_skip_modules=UPSTREAM_SKIP),
}
#: logits vs the float32 golden on real positions, ||diff|| / ||golden|| (measured on these tiny
#: random-weight models on CPU with bitsandbytes 0.50.2: nf4 0.342, fp4 0.450, int8 0.040)
REL_BOUND = {"nf4": 0.40, "fp4": 0.50, "int8": 0.06}
W = "llm.model.layers.0.self_attn.q_proj.weight"


def bnb_config(fmt, **extra):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**dict(FORMATS[fmt], **extra))


_SAVED = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """fmt -> (folder of the saved quantised checkpoint, logits of the in-memory quantised model)."""
    def get(fmt):
        if fmt not in _SAVED:
            model = MiniCPMV.from_pretrained(str(case_dir(CASE)), quantization_config=bnb_config(fmt))
            folder = tmp_path_factory.mktemp(fmt)
            model.save_pretrained(str(folder))  # before any forward: see test_saving_after_a_cpu_forward
            data, mask = load_inputs(CASE)
            with torch.no_grad():
                logits = model(data, attention_mask=mask).logits
            _SAVED[fmt] = (folder, logits)
        return _SAVED[fmt]
    return get


def quant_modules(model):
    import bitsandbytes as bnb

    return {n: type(m).__name__ for n, m in model.named_modules()
            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


@needs_bnb
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_saved_quantised_checkpoint_loads_strictly_and_runs(fmt, saved):
    folder, in_memory = saved(fmt)
    keys = load_file(str(folder / "model.safetensors"))
    if fmt == "int8":
        assert keys[W].dtype == torch.int8 and "llm.model.layers.0.self_attn.q_proj.SCB" in keys
    else:
        assert keys[W].dtype == torch.uint8 and f"{W}.absmax" in keys and f"{W}.quant_state.bitsandbytes__{fmt}" in keys
    model = MiniCPMV.from_pretrained(str(folder))  # strict (default)
    kinds = quant_modules(model)
    want = "Linear8bitLt" if fmt == "int8" else "Linear4bit"
    assert kinds["llm.model.layers.0.self_attn.q_proj"] == want
    assert kinds["vpm.encoder.layers.0.self_attn.k_proj"] == want
    for float_module in ("llm.lm_head", "resampler.kv_proj", "resampler.attn.out_proj"):  # the skip list
        assert float_module not in kinds
    data, mask = load_inputs(CASE)
    with torch.no_grad():
        logits = model(data, attention_mask=mask).logits
    torch.testing.assert_close(logits, in_memory, atol=1e-6, rtol=0)  # the file holds what was in memory
    ref = load_expected(CASE)["logits"]
    real = mask.bool()
    rel = float((logits - ref)[real].norm() / ref[real].norm())
    assert rel < REL_BOUND[fmt], f"{fmt}: logits ||diff||/||float32|| = {rel:.3f}"


@needs_bnb
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_capture_on_quantised_model_equals_its_eager(fmt, saved, monkeypatch):
    """q and k come out of the bitsandbytes projections; the capture recomputes exactly what the
    fork's eager kernel computes from them, in every stage."""
    folder, _ = saved(fmt)
    model = MiniCPMV.from_pretrained(str(folder), attn_implementation="eager")
    assert "q_proj" in next(n for n in quant_modules(model) if n.startswith("llm."))
    eager_weights = {}
    kernel = attention.ATTENTION_FUNCTIONS["eager"]

    def recording(module, *args, **kwargs):
        out, weights = kernel(module, *args, **kwargs)
        eager_weights.setdefault(module.hook_name, []).append(weights.detach())
        return out, weights

    monkeypatch.setitem(attention.ATTENTION_FUNCTIONS, "eager", recording)
    data, mask = load_inputs(CASE)
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions=True)
    assert set(out.captured) == set(eager_weights) and len(out.captured) == 2 + 2 + 1
    patches = real_patch_counts(data)
    for name, got in out.captured.items():
        want = torch.cat(eager_weights[name])
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        if name.startswith("llm."):
            want = want * mask[:, None, :, None]
        elif name.startswith("vision."):
            for n, p in enumerate(patches):
                want[n, :, p:] = 0
                got = got.clone()
                got[n, :, p:] = 0
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)


@needs_bnb
def test_capture_estimate_uses_the_compute_dtype():
    """A bf16 nf4 model: q/k (and so the captured maps) are bf16, never the uint8 storage; the
    estimate counts exactly the bytes the capture holds."""
    model = MiniCPMV.from_pretrained(str(case_dir(CASE)), dtype=torch.bfloat16, quantization_config=bnb_config(
        "nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    assert model.llm.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    data, mask = load_inputs(CASE)
    spec = CaptureSpec()
    capture = model.new_capture(spec, data)
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions=spec)
    assert {t.dtype for t in out.captured.values()} == {torch.bfloat16}
    held = {"llm": 0, "vision": 0, "resampler": 0}
    for name, t in out.captured.items():
        held[name.split(".")[0]] += t.numel() * t.element_size()
    assert {k: v for k, v in capture.estimate.items() if k != "workspace"} == held
    with pytest.raises(CaptureError, match="compute_dtype=torch.uint8 is not a floating dtype"):
        estimate_bytes(spec, model.capture_dims(), 1, 10, compute_dtype=torch.uint8)


@needs_bnb
def test_llm_only_quantisation_keeps_vision_exact():
    """Skipping vpm and the resampler too (an LLM-only int4): those stay float32 and their
    attention equals upstream's float32 golden, while the LLM is 4-bit."""
    model = MiniCPMV.from_pretrained(str(case_dir(CASE)), quantization_config=bnb_config(
        "nf4", llm_int8_skip_modules=UPSTREAM_SKIP + ["vpm", "resampler"]))
    kinds = quant_modules(model)
    assert kinds and all(n.startswith("llm.model.layers.") for n in kinds)
    data, mask = load_inputs(CASE)
    exp = load_expected(CASE)
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions=True)
    for i, p in enumerate(real_patch_counts(data)):
        for layer, got in enumerate(out.vision_attentions):
            torch.testing.assert_close(got[i, :, :p, :p], exp[f"vision_attn.{layer}"][i, :, :p, :p], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.resampler_attentions[i, :, :, :p], exp["resampler_attn"][i, :, :, :p],
                                   atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# the strict checks on quantised folders
# ------------------------------------------------------------------------------------------
def edited(tmp_path, saved, fmt, fn, config_fn=None):
    import json

    src, _ = saved(fmt)
    folder = tmp_path / fmt
    shutil.copytree(src, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config_fn is not None:
        cfg = json.loads((folder / "config.json").read_text())
        config_fn(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


@needs_bnb
@pytest.mark.parametrize("fmt,key", [
    ("nf4", f"{W}.absmax"), ("nf4", f"{W}.nested_absmax"), ("nf4", f"{W}.quant_state.bitsandbytes__nf4"),
    ("nf4", W), ("fp4", f"{W}.quant_map"), ("int8", "llm.model.layers.0.self_attn.q_proj.SCB"), ("int8", W),
])
def test_missing_quantised_tensor_is_named(fmt, key, tmp_path, saved):
    folder = edited(tmp_path, saved, fmt, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing keys \(1\): {key.replace('.', '[.]')}(;|$)"):
        MiniCPMV.from_pretrained(folder)


@needs_bnb
@pytest.mark.parametrize("key", [f"{W}.bogus", "vpm.post_layernorm.weight.absmax", "llm.lm_head.weight.absmax",
                                 "llm.model.layers.0.self_attn.q_proj.SCB"])
def test_stray_key_in_a_quantised_checkpoint_is_named(key, tmp_path, saved):
    """Unknown names, companions of non-Linear / float (skipped) tensors and another format's
    companions are all unexpected."""
    folder = edited(tmp_path, saved, "nf4", lambda t: t.__setitem__(key, torch.zeros(4, dtype=torch.uint8)))
    with pytest.raises(CheckpointError, match=rf"\(bnb-4bit nf4\): unexpected keys \(1\): {key.replace('.', '[.]')}"):
        MiniCPMV.from_pretrained(folder)


@needs_bnb
def test_truncated_packed_weight_is_named(tmp_path, saved):
    folder = edited(tmp_path, saved, "nf4", lambda t: t.__setitem__(W, t[W][:-2]))
    with pytest.raises(CheckpointError, match=rf"wrong shapes \(1\): {W} \(expected 32768 bytes of packed 4-bit data"):
        MiniCPMV.from_pretrained(folder)


@needs_bnb
def test_quantised_tensors_without_quantization_config_are_explained(tmp_path, saved):
    folder = edited(tmp_path, saved, "nf4", lambda t: None, lambda cfg: cfg.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="unexpected keys.*config.json has no quantization_config"):
        MiniCPMV.from_pretrained(folder)


@needs_bnb
def test_unsupported_quantisation_method_is_refused(tmp_path, saved):
    folder = edited(tmp_path, saved, "nf4", lambda t: None,
                    lambda cfg: cfg["quantization_config"].update(quant_method="gptq"))
    with pytest.raises(CheckpointError, match="quant_method 'gptq'.*is not a supported format"):
        MiniCPMV.from_pretrained(folder)


@needs_bnb
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_value_check_compares_packed_data(fmt, saved):
    """Reloaded packed 4-bit / int8 data and quant states equal the file's bytes; a changed byte is named."""
    folder, _ = saved(fmt)
    model = MiniCPMV.from_pretrained(str(folder))
    check_loaded_weights(model, str(folder))
    with torch.no_grad():
        weight = model.get_parameter(W)
        weight.data.view(-1)[:4] = (weight.data.view(-1)[:4].to(torch.int16) + 1).to(weight.dtype)
    with pytest.raises(CheckpointError, match=rf"1 tensor\(s\) do not hold the checkpoint's values \({W}\)"):
        check_loaded_weights(model, str(folder))


@needs_bnb
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_value_check_on_weights_quantised_while_loading(fmt):
    """A float checkpoint quantised on load: the dequantised values lie within the format's
    rounding bound of the file's; a re-drawn weight is named."""
    folder = str(case_dir(CASE))
    model = MiniCPMV.from_pretrained(folder, quantization_config=bnb_config(fmt))  # runs the check
    key = "llm.model.layers.1.mlp.down_proj.weight"
    weight = model.get_parameter(key)
    with torch.no_grad():
        if fmt == "int8":
            weight.data.copy_(torch.randint(-127, 128, weight.shape, generator=torch.Generator().manual_seed(0)))
        else:  # other (random) 4-bit codes under the same quant state
            weight.data.copy_(torch.randint(0, 256, weight.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(CheckpointError, match=rf"1 tensor\(s\) do not hold the checkpoint's values \({key}\)"):
        check_loaded_weights(model, folder)


@needs_bnb
def test_saving_after_a_cpu_forward(tmp_path):
    """bitsandbytes (0.50) repacks 4-bit weights for its CPU kernel at the first forward and
    save_pretrained then writes the repacked statistics (absmax [n, m] instead of [n * m]):
    such a folder is refused, naming the absmax tensors, instead of loading wrong scales. A
    bitsandbytes that saves the standard layout loads back to the same logits."""
    model = MiniCPMV.from_pretrained(str(case_dir(CASE)), quantization_config=bnb_config(
        "nf4", bnb_4bit_use_double_quant=False))
    data, mask = load_inputs(CASE)
    with torch.no_grad():
        logits = model(data, attention_mask=mask).logits
    model.save_pretrained(str(tmp_path))
    absmax = load_file(str(tmp_path / "model.safetensors"))[f"{W}.absmax"]
    if absmax.dim() == 2:
        with pytest.raises(CheckpointError, match=rf"wrong shapes \(\d+\): .*{W}[.]absmax \(expected \[1024\] for "
                                                  rf"blocksize 64, got \[4, 256\]\)"):
            MiniCPMV.from_pretrained(str(tmp_path))
    else:
        with torch.no_grad():
            again = MiniCPMV.from_pretrained(str(tmp_path))(data, attention_mask=mask).logits
        torch.testing.assert_close(again, logits, atol=1e-6, rtol=0)


@needs_bnb
def test_memory_estimate_counts_what_transformers_saves(saved):
    """The README's memory table counts a quantised checkpoint's bytes like the file holds them
    (float tensors at 2 bytes, as in a bf16 checkpoint; quant-state JSON blobs not counted)."""
    from minicpmv_attn.bench.quant_memory import weight_bytes

    with torch.device("meta"):
        model = MiniCPMV(MiniCPMVConfig.from_pretrained(str(case_dir(CASE))))
    for fmt in ("nf4", "int8"):
        tensors = load_file(str(saved(fmt)[0] / "model.safetensors"))
        held = sum(t.numel() * (2 if t.is_floating_point() and t.dim() and not k.endswith(
            (".SCB", "quant_map", ".nested_absmax")) else t.element_size()) for k, t in tensors.items()
            if ".quant_state." not in k)
        assert abs(weight_bytes(model, fmt) - held) <= 0.01 * held, fmt
    assert weight_bytes(model, "bf16") == 2 * sum(p.numel() for p in model.parameters())


def test_memory_table_cli(capsys, tmp_path):
    """The table at MiniCPM-V-2.6's real shapes: nf4 < int8 < bf16 weights (bf16: 2 bytes per
    parameter, about 8.1e9 of them), capture adds the capture estimate; a missing config exits 2."""
    from minicpmv_attn.scripts import bench_quant_memory

    assert bench_quant_memory.main([]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    weights = {r[0].strip("| "): float(r[3]) for r in rows}
    assert 14.5 < weights["bf16"] < 15.5 and weights["nf4"] < weights["int8"] < weights["bf16"]
    assert len(rows) == 3 * 2 * 3 and all(float(r[6]) >= float(r[3]) for r in rows)
    assert bench_quant_memory.main(["--config", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
