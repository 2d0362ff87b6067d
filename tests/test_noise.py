"""Quiet by default where the fork causes the noise: transformers' repetition_penalty note, the
"Loading weights" bar under --quiet, bitsandbytes' int8 cast message at every matmul; and the two
dead ends of --model (a hub id out of reach, a folder without tokenizer files) are one line, at once."""
import logging
import shutil
import socket
import warnings

import pytest
import transformers

from minicpmv_attn.analysis import sources
from minicpmv_attn.checkpoint import INT8_CAST_LOGGER, quiet_int8_casts
from minicpmv_attn.demo import load_trained_demo, trained_demo_folder
from minicpmv_attn.demo.scenes import default_example

TF5 = int(transformers.__version__.split(".")[0]) >= 5


def test_chat_prints_no_repetition_penalty_note():
    model, processor = load_trained_demo()
    image, question, _, _ = default_example()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.chat(image, [{"role": "user", "content": question}], processor.tokenizer, processor=processor,
                   sampling=True, max_new_tokens=2, repetition_penalty=1.05)
    notes = [str(w.message) for w in seen if "repetition_penalty" in str(w.message)]
    assert not notes, notes


@pytest.mark.parametrize("progress", [False, True])
def test_quiet_loading_shows_no_weights_bar(progress, capfd):
    from minicpmv_attn.analysis.pipeline import load_model_and_processor

    load_model_and_processor(str(trained_demo_folder()), device="cpu", progress=progress)
    err = capfd.readouterr().err
    if progress:
        if TF5:  # transformers 4.x draws no such bar
            assert "Loading weights" in err
    else:
        assert "Loading weights" not in err, err[-500:]


def test_int8_cast_message_is_shown_once_per_dtype(caplog, monkeypatch):
    log = logging.getLogger(INT8_CAST_LOGGER)
    monkeypatch.setattr(log, "filters", [])  # a fresh filter: an earlier int8 load in this process saw messages
    quiet_int8_casts()
    quiet_int8_casts()  # idempotent: one filter
    assert len(log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=INT8_CAST_LOGGER):
        for _ in range(50):
            log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.bfloat16")
    assert [r.getMessage() for r in caplog.records] == [
        "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization",
        "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization"]


@pytest.fixture
def no_cache(monkeypatch):
    monkeypatch.setattr(sources, "cached_on_disk", lambda repo: False)


def test_offline_hub_id_fails_at_once_naming_the_local_folder(monkeypatch, no_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no probe when offline is set"))
    with pytest.raises(OSError, match=r"--model openbmb/MiniCPM-V-2_6: cannot reach the Hugging Face hub "
                                      r"\(HF_HUB_OFFLINE is set\).*--model /models/MiniCPM-V-2_6$"):
        sources.check_model_source("openbmb/MiniCPM-V-2_6")


def test_unreachable_hub_is_probed_with_a_short_timeout(monkeypatch, no_cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    seen = {}

    def refuse(address, timeout=None):
        seen.update(address=address, timeout=timeout)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(OSError, match="cannot connect to huggingface.co:443.*pass the local folder"):
        sources.check_model_source("org/model")
    assert seen["timeout"] <= 5


def test_cached_or_reachable_hub_ids_and_the_demo_pass(monkeypatch):
    monkeypatch.setattr(sources, "cached_on_disk", lambda repo: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sources.check_model_source("org/model")  # the cache serves it
    sources.check_model_source(None)
    sources.check_model_source(str(trained_demo_folder()))


def test_folder_without_tokenizer_files_is_one_line(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(trained_demo_folder(), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    with pytest.raises(OSError, match="no tokenizer files .*tokenizer.json"):
        sources.check_model_source(str(folder))


def test_cli_reports_an_offline_hub_id_in_one_line(monkeypatch, no_cache, capsys, tmp_path):
    from minicpmv_attn.scripts import visualize_attention

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert visualize_attention.main(["--model", "org/model", "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "--model org/model: cannot reach the Hugging Face hub" in err[0], err


def test_int8_model_logs_the_cast_once(caplog, tmp_path):
    """End to end: an int8 checkpoint folder, three forwards, one cast message (bitsandbytes logs one per matmul)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the `quant` extra)")
    from transformers.utils import is_bitsandbytes_available

    if not is_bitsandbytes_available():
        pytest.skip(f"transformers {transformers.__version__}'s bitsandbytes integration needs CUDA")
    import torch
    from golden import case_dir, load_inputs
    from transformers import BitsAndBytesConfig

    from minicpmv_attn import MiniCPMV

    data, mask = load_inputs("single_image")
    model = MiniCPMV.from_pretrained(str(case_dir("single_image")),
                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    with caplog.at_level(logging.WARNING, logger=INT8_CAST_LOGGER), torch.no_grad():
        for _ in range(3):
            model(data, attention_mask=mask)
    casts = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert len(casts) <= 1, len(casts)


@pytest.mark.skipif(not TF5, reason="transformers 4.x draws no loading bar")
def test_quiet_commands_print_no_loading_bar(tmp_path, capfd):
    from minicpmv_attn.scripts import extract_attention

    default_example()[0].save(tmp_path / "scene.png")
    (tmp_path / "jobs.jsonl").write_text('{"image": "scene.png", "prompt": "Which shape is red?"}\n')
    assert extract_attention.main([str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out"), "--quiet",
                                   "--max-new-tokens", "1", "--no-summary"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err, err[-800:]
