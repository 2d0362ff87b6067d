"""Loading upstream checkpoints: Auto classes, strict key checks, clear refusals."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minicpmv_attn
from golden import case_dir
from minicpmv_attn import CheckpointError, MiniCPMV, MiniCPMVConfig


def copy_case(tmp_path, case="single_image"):
    dst = tmp_path / case
    shutil.copytree(case_dir(case), dst)
    return dst


def edit_weights(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_auto_classes_registered():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder = str(case_dir("single_image"))
    cfg = AutoConfig.from_pretrained(folder)
    assert isinstance(cfg, MiniCPMVConfig) and cfg.query_num == 16 and cfg.vision_config.hidden_size == 64
    assert cfg.slice_config.scale_resolution == 112 and cfg.patch_size == 14
    for auto in (AutoModel, AutoModelForCausalLM):
        model = auto.from_pretrained(folder)
        assert isinstance(model, MiniCPMV)


def test_config_round_trip(tmp_path):
    cfg = MiniCPMVConfig.from_pretrained(str(case_dir("two_images_batch")))
    cfg.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "minicpmv"
    assert saved["vision_config"]["num_hidden_layers"] == 2 and saved["slice_config"]["max_slice_nums"] == 9
    again = MiniCPMVConfig.from_pretrained(str(tmp_path))
    assert again.num_hidden_layers == 3 and again.vision_config.intermediate_size == 128


def test_state_dict_keys_are_upstreams():
    folder = case_dir("single_image")
    model = MiniCPMV.from_pretrained(str(folder))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in load_file(str(folder / "model.safetensors")).items()}
    assert ours == theirs


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        MiniCPMV.from_pretrained(str(tmp_path))


def test_wrong_model_type(tmp_path):
    folder = copy_case(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        MiniCPMV.from_pretrained(str(folder))


def test_corrupt_config(tmp_path):
    folder = copy_case(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        MiniCPMV.from_pretrained(str(folder))


def test_missing_weights_file(tmp_path):
    folder = copy_case(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        MiniCPMV.from_pretrained(str(folder))


def test_missing_tensor_named(tmp_path):
    folder = copy_case(tmp_path)
    edit_weights(folder, lambda t: t.pop("resampler.query"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): resampler.query"):
        MiniCPMV.from_pretrained(str(folder))


def test_extra_tensor_named(tmp_path):
    folder = copy_case(tmp_path)
    edit_weights(folder, lambda t: t.__setitem__("llm.model.extra_thing", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected keys.*llm.model.extra_thing"):
        MiniCPMV.from_pretrained(str(folder))


def test_wrong_shape_named(tmp_path):
    folder = copy_case(tmp_path)
    edit_weights(folder, lambda t: t.__setitem__("vpm.post_layernorm.weight", torch.ones(5)))
    with pytest.raises(CheckpointError, match=r"wrong shapes \(1\): vpm.post_layernorm.weight \(expected \[64\], got \[5\]\)"):
        MiniCPMV.from_pretrained(str(folder))


def test_non_strict_allows_missing(tmp_path):
    folder = copy_case(tmp_path)
    edit_weights(folder, lambda t: t.pop("resampler.query"))
    model, info = MiniCPMV.from_pretrained(str(folder), strict=False, output_loading_info=True)
    assert "resampler.query" in info["missing_keys"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_load(dtype):
    model = MiniCPMV.from_pretrained(str(case_dir("text_only")), dtype=dtype)
    assert model.dtype == dtype and model.resampler.query.dtype == dtype


def test_drop_in_remote_code(tmp_path):
    """modeling/*.py copied over a checkpoint folder loads as remote code (without importing the package)."""
    import subprocess
    import sys
    from pathlib import Path

    folder = copy_case(tmp_path)
    src = Path(minicpmv_attn.__file__).parent
    for f in src.glob("*.py"):
        shutil.copy(f, folder)
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from transformers import AutoModel
m = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
assert "minicpmv_attn" not in sys.modules
from golden import load_inputs, load_expected
data, mask = load_inputs("single_image")
exp = load_expected("single_image")
with torch.no_grad():
    out = m(data, attention_mask=mask, output_attentions=True)
real = mask.bool()
print("MAXDIFF", float((out.logits - exp["logits"])[real].abs().max()), len(out.vision_attentions))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("MAXDIFF")][0]
    diff, n_vision = float(line.split()[1]), int(line.split()[2])
    assert diff < 1e-4 and n_vision == 2


@pytest.mark.compat
def test_loaded_weights_are_the_checkpoints():
    """After loading, every tensor holds the file's values (transformers 5.0 re-drew them silently)."""
    from minicpmv_attn.checkpoint import check_loaded_weights

    folder = str(case_dir("single_image"))
    model = MiniCPMV.from_pretrained(folder)
    stored = load_file(str(case_dir("single_image") / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, stored[key]), key
    with torch.no_grad():
        model.llm.lm_head.weight[0, 3] += 1.0
        model.vpm.post_layernorm.bias.normal_()
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) do not hold the checkpoint's values "
                                              r"\(llm.lm_head.weight, vpm.post_layernorm.bias\); transformers"):
        check_loaded_weights(model, folder)


def test_reinitialising_loader_is_refused(monkeypatch):
    """A transformers whose loading re-runs the weight init on loaded tensors: refused, named."""
    from transformers import PreTrainedModel

    from minicpmv_attn.modeling_qwen2 import init_module_weights

    original = PreTrainedModel.from_pretrained.__func__

    def loader(cls, *args, **kwargs):
        out = original(cls, *args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        for module in model.llm.modules():
            for t in module.parameters(recurse=False):
                t._is_hf_initialized = False
            init_module_weights(model.config, module)
        return out

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(loader))
    with pytest.raises(CheckpointError, match="do not hold the checkpoint's values.*llm.lm_head.weight"):
        MiniCPMV.from_pretrained(str(case_dir("text_only")))


def test_integer_tensor_in_a_float_checkpoint_is_refused(tmp_path):
    folder = copy_case(tmp_path)
    edit_weights(folder, lambda t: t.__setitem__("vpm.post_layernorm.weight",
                                                 t["vpm.post_layernorm.weight"].round().to(torch.int32)))
    with pytest.raises(CheckpointError, match=r"not floating-point \(1\): vpm.post_layernorm.weight \(I32\)"):
        MiniCPMV.from_pretrained(str(folder))


def test_shard_index_beside_a_single_file_is_ambiguous(tmp_path):
    folder = copy_case(tmp_path)
    keys = list(load_file(str(folder / "model.safetensors")))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model.safetensors" for k in keys}}))
    with pytest.raises(CheckpointError, match="both model.safetensors and model.safetensors.index.json"):
        MiniCPMV.from_pretrained(str(folder))


def test_corrupt_shard_index_is_named(tmp_path):
    folder = copy_case(tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a safetensors index"):
        MiniCPMV.from_pretrained(str(folder))


def fake_nf4_folder(tmp_path, skip=("out_proj", "kv_proj", "lm_head", "vpm", "resampler")):
    """single_image laid out like a bitsandbytes nf4 checkpoint (packed LLM Linear weights plus
    their statistics, made by hand: the key/shape check needs no bitsandbytes)."""
    folder = copy_case(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                  "bnb_4bit_use_double_quant": False, "llm_int8_skip_modules": list(skip)}
    (folder / "config.json").write_text(json.dumps(cfg))

    def quantise(t):
        for key in [k for k in t if k.startswith("llm.model.layers.") and k.endswith("proj.weight")]:
            n = t[key].numel()
            state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": list(t[key].shape)})
            t[key] = torch.zeros(((n + 1) // 2, 1), dtype=torch.uint8)
            t[f"{key}.absmax"] = torch.ones(-(-n // 64))
            t[f"{key}.quant_map"] = torch.linspace(-1, 1, 16)
            t[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(state.encode()), dtype=torch.uint8)
    edit_weights(folder, quantise)
    return folder


def test_quantised_layout_is_checked_without_bitsandbytes(tmp_path):
    """The strict key check knows the bitsandbytes 4-bit layout: a complete one passes, a missing
    statistic, a stray key, a companion of a module kept float, a wrong recorded shape and an
    unknown quantisation method are named."""
    from minicpmv_attn.checkpoint import check_checkpoint_tensors

    folder = fake_nf4_folder(tmp_path)
    check_checkpoint_tensors(str(folder), MiniCPMV)
    w = "llm.model.layers.1.mlp.up_proj.weight"
    cases = [
        (lambda t: t.pop(f"{w}.absmax"), rf"\(bnb-4bit nf4\): missing keys \(1\): {w}.absmax$"),
        (lambda t: t.__setitem__(f"{w}.extra", torch.zeros(1)), rf"unexpected keys \(1\): {w}.extra$"),
        (lambda t: t.__setitem__("vpm.encoder.layers.0.mlp.fc1.weight.absmax", torch.ones(2)),
         r"unexpected keys \(1\): vpm.encoder.layers.0.mlp.fc1.weight.absmax$"),
        (lambda t: t.__setitem__(f"{w}.quant_state.bitsandbytes__nf4", torch.tensor(list(json.dumps(
            {"quant_type": "nf4", "blocksize": 64, "shape": [7, 7]}).encode()), dtype=torch.uint8)),
         rf"wrong shapes \(1\): {w}.quant_state.bitsandbytes__nf4 \(records nf4 \[7, 7\], expected nf4 \[512, 256\]\)"),
        (lambda t: t.__setitem__(f"{w}.absmax", torch.ones(3)),
         rf"wrong shapes \(1\): {w}.absmax \(expected \[2048\] for blocksize 64, got \[3\]\)"),
    ]
    for i, (edit, message) in enumerate(cases):
        broken = fake_nf4_folder(tmp_path / str(i))
        edit_weights(broken, edit)
        with pytest.raises(CheckpointError, match=message):
            check_checkpoint_tensors(str(broken), MiniCPMV)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'awq'.*supported: bitsandbytes"):
        check_checkpoint_tensors(str(folder), MiniCPMV)


def test_quantised_tensors_in_a_float_checkpoint_are_explained(tmp_path):
    folder = copy_case(tmp_path)
    edit_weights(folder, lambda t: t.__setitem__("llm.model.layers.0.mlp.up_proj.weight.absmax", torch.ones(4)))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): llm.model.layers.0.mlp.up_proj.weight.absmax; "
                                              r"the file holds quantised tensors but config.json has no "
                                              r"quantization_config"):
        MiniCPMV.from_pretrained(str(folder))


def test_execution_device_follows_accelerate_hooks():
    """A module whose weights were offloaded (meta) runs where its accelerate hook says."""
    from types import SimpleNamespace

    from minicpmv_attn.checkpoint import execution_device

    layer = torch.nn.Linear(2, 2)
    assert execution_device(layer) == torch.device("cpu")
    outer = torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"), layer)
    assert execution_device(outer) == torch.device("meta")  # no hook: nothing says where it runs
    outer[0]._hf_hook = SimpleNamespace(execution_device="cpu")
    assert execution_device(outer) == torch.device("cpu")
    outer[0]._hf_hook = SimpleNamespace(execution_device=1)
    assert execution_device(outer) == torch.device("cuda", 1)
