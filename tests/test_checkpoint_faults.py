"""Checkpoint folders that used to load and then fail or give NaN (issue 27): non-finite weights,
quantisation configs that do not match the file, and pytorch_model.bin folders, which now get
the same strict checks as safetensors."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from minicpmv_attn import CheckpointError, MiniCPMV
from minicpmv_attn.checkpoint import check_checkpoint_tensors, check_loaded_weights
from test_loading import copy_case, edit_weights, fake_nf4_folder
from test_quantized import W, edited, needs_bnb, saved  # noqa: F401 - saved is a fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LN = "vpm.post_layernorm.weight"
FC = "llm.model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("value,count", [(float("inf"), "1 inf"), (float("-inf"), "1 inf"), (float("nan"), "1 NaN")])
def test_a_non_finite_weight_is_named_not_blamed_on_transformers(tmp_path, value, count):
    """Anywhere in the tensor, not only in the sampled first row: inf equals inf, so the value check
    alone passed it, and a NaN was reported as transformers not copying the weight."""
    folder = copy_case(tmp_path)
    edit_weights(folder, lambda t: t[FC].__setitem__((5, 7), value))
    with pytest.raises(CheckpointError) as info:
        MiniCPMV.from_pretrained(str(folder))
    message = str(info.value)
    assert f"holds non-finite weights, which make the logits NaN: {FC} ({count}); the weights file is damaged" in message
    assert "transformers" not in message and "\n" not in message


@pytest.mark.parametrize("claim", [{"load_in_8bit": True}, {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}])
def test_a_float_checkpoint_whose_config_claims_bitsandbytes_is_refused(tmp_path, claim):
    folder = copy_case(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = dict(quant_method="bitsandbytes", **claim)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: quantization_config says bnb-(8|4)bit but no weight in "
                                              r"the folder is quantised \(a float checkpoint\): remove"):
        check_checkpoint_tensors(str(folder), MiniCPMV)


def test_an_nf4_folder_that_lost_its_skip_list_is_refused(tmp_path):
    folder = fake_nf4_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["quantization_config"]["llm_int8_skip_modules"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_tensors(str(folder), MiniCPMV)
    message = str(info.value)
    assert ("float weights that quantization_config would quantise (modules not in llm_int8_skip_modules, a list "
            "config.json lacks) (") in message
    assert "resampler.kv_proj.weight" in message and "vpm.encoder.layers.0.mlp.fc1.weight" in message
    assert "llm.lm_head.weight" not in message  # transformers keeps the output embeddings float by default
    cfg["quantization_config"]["llm_int8_skip_modules"] = ["lm_head", "vpm"]  # the resampler's Linears not kept
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"llm_int8_skip_modules\) \(2\): resampler.attn.out_proj.weight, "
                                              r"resampler.kv_proj.weight$") as info:
        check_checkpoint_tensors(str(folder), MiniCPMV)
    assert "vpm." not in str(info.value)


@pytest.mark.parametrize("bad", ["int8", "torch.int32", 7])
def test_a_non_float_compute_dtype_is_refused(tmp_path, bad):
    folder = fake_nf4_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_compute_dtype"] = bad
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"quantization_config.bnb_4bit_compute_dtype is {bad!r}, expected one "
                                              rf"of float32, float16, bfloat16"):
        MiniCPMV.from_pretrained(str(folder))


# ------------------------------------------------------------------------------------------ pytorch_model.bin
def bin_folder(tmp_path, edit=None, name="single_image"):
    folder = copy_case(tmp_path / name)
    tensors = load_file(str(folder / "model.safetensors"))
    if edit is not None:
        edit(tensors)
    torch.save(tensors, str(folder / "pytorch_model.bin"))
    (folder / "model.safetensors").unlink()
    return folder


def test_a_bin_only_folder_loads_and_is_checked_like_safetensors(tmp_path):
    folder = bin_folder(tmp_path)
    model = MiniCPMV.from_pretrained(str(folder))
    check_loaded_weights(model, str(folder))
    with torch.no_grad():
        model.get_parameter(LN).data[0] += 1
    with pytest.raises(CheckpointError, match=rf"do not hold the checkpoint's values \({LN}\)"):
        check_loaded_weights(model, str(folder))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(LN), rf"missing keys \(1\): {LN}$"),
    (lambda t: t.__setitem__("vpm.bogus", torch.zeros(2)), r"unexpected keys \(1\): vpm.bogus$"),
    (lambda t: t.__setitem__(LN, torch.zeros(3)), rf"wrong shapes \(1\): {LN} \(expected \[64\], got \[3\]\)$"),
    (lambda t: t.__setitem__(LN, t[LN].round().to(torch.int32)), rf"not floating-point \(1\): {LN} \(I32\)$"),
    (lambda t: t[FC].__setitem__((3, 3), float("inf")), rf"non-finite weights.*{FC} \(1 inf\)"),
])
def test_a_bin_only_folder_gets_the_strict_checks(tmp_path, edit, message):
    folder = bin_folder(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        MiniCPMV.from_pretrained(str(folder))


class Payload:
    def __reduce__(self):
        return (print, ("code ran while checking",))


def test_a_bin_file_that_is_not_weights_only_is_refused_without_running_it(tmp_path, capsys):
    folder = bin_folder(tmp_path)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: not a weights-only PyTorch state dict"):
        MiniCPMV.from_pretrained(str(folder))
    assert "code ran" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ bitsandbytes statistics
@needs_bnb
@pytest.mark.parametrize("fmt,key", [("nf4", f"{W}.nested_absmax"), ("fp4", f"{W}.absmax"),
                                     ("int8", "llm.model.layers.0.self_attn.q_proj.SCB")])
def test_non_finite_bitsandbytes_statistics_are_refused(fmt, key, tmp_path, saved):  # noqa: F811
    folder = edited(tmp_path, saved, fmt, lambda t: t[key].view(-1).__setitem__(1, float("inf")))
    with pytest.raises(CheckpointError, match=r"holds non-finite weights, which make the logits NaN: .*\(1 inf\)"):
        MiniCPMV.from_pretrained(folder)


def test_a_key_the_file_lacks_is_not_blamed_on_the_file(tmp_path):
    """strict=False: a missing key holds whatever the model's init left (uninitialised memory can be
    NaN); the finite check skips the keys the loader reports missing, and only those."""
    folder = copy_case(tmp_path)
    edit_weights(folder, lambda t: t.pop("resampler.query"))
    model = MiniCPMV.from_pretrained(str(folder), strict=False)
    with torch.no_grad():
        model.resampler.query.fill_(float("nan"))  # what an uninitialised tensor may hold
    check_loaded_weights(model, str(folder), missing=["resampler.query"])  # not the file's fault
    with pytest.raises(CheckpointError, match=r"resampler\.query \(\d+ NaN\)"):
        check_loaded_weights(model, str(folder))
