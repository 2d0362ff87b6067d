"""--device auto everywhere: CUDA, then MPS, then the CPU; bfloat16 on CUDA unless --dtype; a device
this machine cannot run is one line and exit status 2 in every command."""
import json

import pytest
import torch

from minicpmv_attn.analysis import devices
from minicpmv_attn.analysis.devices import DeviceError, pick, pick_device, pick_dtype

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def fake_cuda(monkeypatch, available=True, count=1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    fake_cuda(monkeypatch, True)
    assert pick_device("auto") == pick_device(None) == "cuda"
    fake_cuda(monkeypatch, False)
    monkeypatch.setattr(devices, "_mps_available", lambda t: True)
    assert pick_device("auto") == "mps"
    monkeypatch.setattr(devices, "_mps_available", lambda t: False)
    assert pick_device("AUTO") == "cpu"


def test_bfloat16_on_cuda_unless_dtype_says_otherwise(monkeypatch):
    assert pick_dtype("cuda:1", None, "auto") == "bfloat16"
    assert pick_dtype("cuda", "float32", "auto") == "float32"
    assert pick_dtype("cpu", None, "auto") == "auto" and pick_dtype("mps", None, "float32") == "float32"
    fake_cuda(monkeypatch, True)
    assert pick("auto", None, "float32") == ("cuda", "bfloat16")


def test_unusable_devices_are_one_line(monkeypatch):
    fake_cuda(monkeypatch, True, count=1)
    with pytest.raises(DeviceError, match=r"--device cuda:3: this machine has 1 CUDA device\(s\)"):
        pick_device("cuda:3")
    with pytest.raises(DeviceError, match="not a torch device"):
        pick_device("gpu0")
    fake_cuda(monkeypatch, False)
    with pytest.raises(DeviceError, match="--device cuda: .*use --device cpu"):
        pick_device("cuda")
    monkeypatch.setattr(devices, "_mps_available", lambda t: False)
    with pytest.raises(DeviceError, match="MPS is not available"):
        pick_device("mps")


def _commands(tmp_path):
    from minicpmv_attn.scripts import (extract_attention, finetune_attention, pointing_game,
                                       visualize_attention)

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": "x.png", "prompt": "hi"}) + "\n")
    return {"visualize": (visualize_attention.main, []),
            "extract": (extract_attention.main, [str(jobs), "--out", str(tmp_path / "o")]),
            "finetune": (finetune_attention.main, ["--out", str(tmp_path / "f")]),
            "pointing-game": (pointing_game.main, ["--n", "1"])}


@NO_CUDA
@pytest.mark.parametrize("name", ["visualize", "extract", "finetune", "pointing-game"])
def test_device_cuda_without_cuda_is_one_line_and_exit_2(name, tmp_path, capsys):
    main, argv = _commands(tmp_path)[name]
    assert main(argv + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda: ") and "--device cpu" in err[0], err


@pytest.mark.parametrize("name", ["visualize", "extract", "finetune"])
def test_the_default_device_is_auto_and_cuda_gets_bfloat16(name, tmp_path, monkeypatch, capsys):
    """With CUDA present (faked) and no flags, the loader is asked for cuda + bfloat16."""
    from minicpmv_attn.analysis import pipeline

    seen = {}

    def loader(model=None, device="auto", dtype=None, *a, **k):
        seen.update(device=device, dtype=dtype)
        raise OSError("stop here")

    fake_cuda(monkeypatch, True)
    monkeypatch.setattr(pipeline, "load_model_and_processor", loader)
    if name == "extract":  # the extraction loads after its disk estimate: feed it a real image
        from PIL import Image

        Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    main, argv = _commands(tmp_path)[name]
    assert main(argv) != 0
    assert seen == {"device": "cuda", "dtype": "bfloat16"}, capsys.readouterr().err
