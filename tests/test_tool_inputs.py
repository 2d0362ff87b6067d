"""The extraction tools on their documented options and on folders edited after a run: records
captured with ``cols="image"``, results rows naming lost or foreign records, JSONL fields named
like the summary's own columns, and launch variables left in the environment."""
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from minicpmv_attn.analysis import viewer as vw


def _jobs(folder, jobs):
    Image.new("RGB", (64, 48), (200, 40, 40)).save(folder / "a.png")
    Image.new("RGB", (48, 64), (40, 40, 200)).save(folder / "b.png")
    (folder / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return folder / "jobs.jsonl"


@pytest.fixture(scope="module")
def image_cols(tmp_path_factory):
    """An extraction with the documented spec ``{"cols": "image"}``."""
    from minicpmv_attn.analysis.extract import extract

    folder = tmp_path_factory.mktemp("cols_image")
    jsonl = _jobs(folder, [{"image": "a.png", "prompt": "What is it?", "id": "one", "label": "x"},
                           {"image": "b.png", "prompt": "Colour?", "id": "two", "label": "y"}])
    done = extract(str(jsonl), str(folder / "out"), spec='{"cols": "image"}', max_new_tokens=3, quiet=True)
    assert done.counts["succeeded"] == 2
    return folder


def test_cols_image_records_are_summarised(image_cols):
    from minicpmv_attn.analysis.summary import summarise

    table = summarise(str(image_cols / "out"))
    for row in table.rows:
        assert "summary_error" not in row, row.get("summary_error")
        assert 0 < row["image_share"] < 1 and row["img_share_L00"] is not None
        # what a subset of the key columns cannot give stays empty, never 0 or NaN
        assert row["text_share"] is None and row["special_share"] is None
        assert row["entropy"] is None and row["sink_share"] is None
    page = (image_cols / "out" / "report.html").read_text()
    assert "Image share of attention per LLM layer" in page and "Nothing to plot" not in page


def test_cols_image_record_is_viewable(image_cols, tmp_path):
    stem = next((image_cols / "out" / "records").glob("one-*.json")).with_suffix("")
    path, v = vw.view_record(str(stem), str(image_cols / "a.png"), str(tmp_path / "v"), progress=False)
    data = vw.read_viewer_data(open(path).read())
    shares = np.array(next(iter(data["blocks"].values()))["sh"], dtype=object)
    assert all(s is None for s in shares[:, 1]) and all(s is None for s in shares[:, 2])
    assert all(0 < s < 1 for s in shares[:, 0])
    assert "not captured" in open(path).read()  # the page says so


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain extraction whose lines carry fields named like the summary's columns."""
    from minicpmv_attn.analysis.extract import extract

    folder = tmp_path_factory.mktemp("plain")
    jsonl = _jobs(folder, [
        {"image": "a.png", "prompt": "What is it?", "id": "one", "record": "mine", "field_record": "also mine",
         "answer": "gold", "field_answer": "gold too", "fields": "f"},
        {"image": "b.png", "prompt": "Where?", "id": "two", "label": "y"},
        {"image": "a.png", "prompt": "Colour?", "id": "three", "label": "z"}])
    done = extract(str(jsonl), str(folder / "out"), max_new_tokens=3, quiet=True, summary=False)
    assert done.counts["succeeded"] == 3
    return folder / "out"


def test_fields_named_like_summary_columns_all_survive(plain):
    from minicpmv_attn.analysis.summary import summarise

    row = next(r for r in summarise(str(plain)).rows if r["id"] == "one")
    assert row["record"].startswith("records/one-")  # the table's own column
    # a field keeps its name unless the table has it; then field_ in front until the name is free
    assert row["field_record"] == "also mine" and row["field_field_record"] == "mine"
    assert row["field_answer"] == "gold too" and row["field_field_answer"] == "gold"
    assert row["answer"] != "gold"  # the model's answer


def _rows(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_lost_and_foreign_records_count_as_failed(plain, tmp_path, capsys):
    from minicpmv_attn.scripts.extract_attention import main

    out = tmp_path / "out"
    shutil.copytree(plain, out)
    rows = _rows(out)
    two = next(r for r in rows if r.get("id") == "two")
    (out / (two["record"] + ".safetensors")).unlink()  # lost after the run
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    three = next(r for r in rows if r.get("id") == "three")
    for ext in (".json", ".safetensors"):
        shutil.copy(out / (three["record"] + ext), outside / ("rec" + ext))
    three["record"] = "../elsewhere/rec"  # a row pointing outside the run folder
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr()
    assert "record file " in printed.err and "missing" in printed.err
    assert "outside the run folder" in printed.err
    page = (out / "report.html").read_text()
    assert "1 records in" in page and "2 line(s) failed" in page
    assert "elsewhere" not in page


@pytest.mark.parametrize("env", [{"RANK": "abc"}, {"RANK": "3", "WORLD_SIZE": "2"}])
def test_launch_variables_without_a_launch_say_so(env, tmp_path, monkeypatch, capsys):
    from minicpmv_attn.scripts.extract_attention import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "jobs.jsonl").write_text("")
    assert main([str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out")]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: environment variable") and "RANK" in lines[0]


def test_non_finite_attention_fails_the_line(tmp_path, monkeypatch, capsys):
    """A model whose attention comes out NaN (e.g. fp16 overflow) gives failed lines and exit 1,
    never records marked ok."""
    from minicpmv_attn.analysis import pipeline
    from minicpmv_attn.scripts.extract_attention import main

    original = pipeline.capture_chat

    def nan_capture(*args, **kwargs):
        answer, record = original(*args, **kwargs)
        name = record.names("llm")[0]
        record.tensors[name] = torch.full_like(record.tensors[name], float("nan"))
        return answer, record

    monkeypatch.setattr(pipeline, "capture_chat", nan_capture)
    jsonl = _jobs(tmp_path, [{"image": "a.png", "prompt": "What is it?", "id": "one"}])
    rc = main([str(jsonl), "--out", str(tmp_path / "out"), "--max-new-tokens", "3", "--quiet", "--no-summary"])
    assert rc == 1
    rows = _rows(tmp_path / "out")
    assert [r["status"] for r in rows] == ["error"] and "NaN or infinite" in rows[0]["error"]
    assert not list((tmp_path / "out" / "records").glob("*.json"))
    assert "failed: " in capsys.readouterr().err


def test_layers_and_heads_flags_narrow_the_llm_part_of_the_spec():
    from minicpmv_attn.analysis.extract import load_spec
    from minicpmv_attn.capture import AttentionCapture, CaptureSpec

    spec = load_spec('{"layers": {"vision": [0]}}', layers="1", vision=True)
    capture = AttentionCapture(CaptureSpec.from_flag(spec), {"llm": 4, "vision": 3, "resampler": 1},
                               {"llm": 2, "vision": 2, "resampler": 2})
    assert capture.layers["vision"] == {0} and capture.layers["llm"] == {1}  # not every SigLIP layer
    spec = load_spec('{"layers": [2], "heads": [1]}', layers="0", heads="0", vision=True)
    capture = AttentionCapture(CaptureSpec.from_flag(spec), {"llm": 4, "vision": 3, "resampler": 1},
                               {"llm": 2, "vision": 2, "resampler": 2})
    assert capture.layers["vision"] == {2} and capture.layers["llm"] == {0}
    assert capture.heads == {"llm": [0], "vision": [1], "resampler": [1]}


# ---------------------------------------------------------------------------------------------
# resume: keyed on the image's content, every field of the line and the weights' identity
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_model(monkeypatch):
    from test_extract_faults import install_fakes

    calls, loads = [], []
    install_fakes(monkeypatch.setattr, calls, loads)
    return calls


def _run(*argv):
    from minicpmv_attn.scripts.extract_attention import main

    return main([str(a) for a in argv] + ["--quiet", "--no-summary"])


def test_resume_redoes_lines_whose_image_or_fields_changed(fake_model, tmp_path, capsys):
    calls = fake_model
    jobs = [{"image": "a.png", "prompt": "one", "label": "cat"}, {"image": "b.png", "prompt": "two", "label": "dog"}]
    jsonl = _jobs(tmp_path, jobs)
    out = tmp_path / "out"
    assert _run(jsonl, "--out", out) == 0 and calls == ["one", "two"]
    calls.clear()
    assert _run(jsonl, "--out", out) == 0 and calls == []  # nothing changed: both skipped
    Image.new("RGB", (64, 48), (0, 255, 0)).save(tmp_path / "a.png")  # another picture at the same path
    assert _run(jsonl, "--out", out) == 0 and calls == ["one"]
    assert "redone" in capsys.readouterr().err
    calls.clear()
    jobs[1]["label"] = "wolf"  # an edited label reaches the record and the summary
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    assert _run(jsonl, "--out", out) == 0 and calls == ["two"]
    rows = _rows(out)
    assert rows[-1]["fields"] == {"label": "wolf"} and rows[-1]["status"] == "ok"
    calls.clear()
    assert _run(jsonl, "--out", out) == 0 and calls == []


def test_weights_replaced_in_place_are_another_model(fake_model, tmp_path, capsys):
    from minicpmv_attn.demo import build_demo_checkpoint

    model = Path(build_demo_checkpoint(str(tmp_path / "model")))
    weights = (model / "model.safetensors").read_bytes()
    jsonl = _jobs(tmp_path, [{"image": "a.png", "prompt": "one"}])
    out = tmp_path / "out"
    assert _run(jsonl, "--out", out, "--model", model) == 0
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"image": "b.png", "prompt": "two"}) + "\n")
    assert _run(jsonl, "--out", out, "--model", model) == 0  # same weights: goes on
    changed = bytearray(weights)
    middle = len(weights) // 2
    changed[middle: middle + (1 << 18)] = bytes(1 << 18)  # a new fine-tune saved to the same folder, same size
    (model / "model.safetensors").write_bytes(bytes(changed))
    assert len(changed) == len(weights) > 4 << 20
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "three"}) + "\n")
    assert _run(jsonl, "--out", out, "--model", model) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "weights" in err and "model.safetensors" in err
