"""The command-line tools end to end on the embedded demo model (no download)."""
import json

import numpy as np
import pytest
from PIL import Image

from minicpmv_attn import AttentionRecord


@pytest.mark.compat
def test_visualize_default_is_the_trained_demo_on_a_known_scene(tmp_path, capsys):
    """The no-argument run: the trained demo answers the generated scene's question right, the page
    shows the known answer, the answer token's map peaks on the target object, and the page's
    "question steers" section scores the answer row against the row before the question with the
    same maps a reader can recompute from the record."""
    from minicpmv_attn.analysis.attention_map import image_heatmap
    from minicpmv_attn.demo import trained_demo_task
    from minicpmv_attn.demo.baselines import before_question_row
    from minicpmv_attn.demo.pointing import inside, peak
    from minicpmv_attn.demo.scenes import default_example
    from minicpmv_attn.scripts.visualize_attention import main

    out = tmp_path / "attention_out"
    assert main(["--out", str(out), "--quiet"]) == 0
    from minicpmv_attn.analysis.visualize import DEFAULTS

    _, question, answer, box = default_example(DEFAULTS["seed"], trained_demo_task())
    rec = AttentionRecord.load(str(out / "record"))
    assert rec.meta["expected_answer"] == answer and rec.meta["target_box"] == [float(v) for v in box]
    html = (out / "index.html").read_text()
    assert question in html and f"the model said <b>{answer}</b> (right)" in html
    assert "random weights" not in html and (out / "scene.png").is_file()
    hm = image_heatmap(rec, "last")  # the row that predicted the answer word
    assert hm.map.shape == (112, 224) and inside(peak(hm.map), box), (peak(hm.map), box)
    # the steer section: its numbers are the record's own maps at the two rows
    assert "Does the question steer the attention?" in html and "data:image/png;base64," in html
    lay = rec.layout
    q_row = before_question_row(lay.tokens, int(lay.n_prompt))
    assert q_row < int(lay.n_prompt) - 1 and lay.tokens[q_row] in ("</image>", "</slice>")
    pointing = rec.meta["pointing"]
    for row, got in ((int(lay.n_prompt) - 1, pointing["peaks"]["raw mean"]),
                     (q_row, pointing["before_question"]["raw mean"])):
        m = image_heatmap(rec, row, layer_reduce="mean").map
        assert got[2] == inside(peak(m), box) and got[:2] == [round(v, 1) for v in peak(m)]
    assert f"(row {q_row} in the viewer)" in html
    assert set(pointing["baselines"]) == {"random object", "saliency", "centre"}


@pytest.mark.compat
def test_visualize_random_demo_end_to_end(tmp_path, capsys):
    from minicpmv_attn.scripts.visualize_attention import main

    out = tmp_path / "attention_out"
    assert main(["--model", "random-demo", "--out", str(out), "--quiet", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["attention_matrix_layer3.png", "head_image_share.png", "resampler_queries.png",
                    "role_shares.png", "token_heatmaps.png", "vision_received.png"]
    for name in pngs:
        with Image.open(out / name) as im:
            w, h = im.size
            arr = np.asarray(im.convert("L"), dtype=np.float32)
        assert 300 <= w <= 4000 and 200 <= h <= 4000, (name, im.size)
        assert arr.std() > 5, f"{name} looks blank"
    # 4 generated tokens in a grid of 4 columns: one row of panels, wider than tall
    with Image.open(out / "token_heatmaps.png") as im:
        assert im.size[0] > im.size[1]
    html = (out / "index.html").read_text()
    assert all(name in html for name in pngs) and "random weights" in html
    rec = AttentionRecord.load(str(out / "record"))
    lay = rec.layout
    assert len(lay.input_ids) == lay.n_prompt + 4
    assert rec["llm.layers.0.attn"].shape == (4, lay.n_prompt + 3, lay.n_prompt + 4)
    assert rec["resampler.attn"].shape[0] == len(lay.slices) > 1
    assert not list(out.glob(".tmp-*"))


def test_visualize_bad_image(tmp_path, capsys):
    from minicpmv_attn.scripts.visualize_attention import main

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    assert main(["--image", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def write_jobs(tmp_path):
    from minicpmv_attn.demo import demo_image_path

    img = Image.open(demo_image_path()).resize((140, 98))
    img.save(tmp_path / "small.png")
    lines = [json.dumps({"image": "small.png", "prompt": "What is this?", "id": "a"}),
             "{not json",
             json.dumps({"image": "missing.png", "prompt": "hm"}),
             json.dumps({"image": demo_image_path(), "prompt": "Describe.", "id": "b"}),
             json.dumps({"image": "small.png", "prompt": "Colour?", "id": "c"}),
             json.dumps({"image": "small.png"})]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.compat
def test_extract_resumes_without_redoing(tmp_path, monkeypatch, capsys):
    import minicpmv_attn.analysis.pipeline as pipeline
    from minicpmv_attn.scripts import extract_attention

    jobs = write_jobs(tmp_path)
    out = tmp_path / "out"
    real = pipeline.capture_chat
    calls = []

    def interrupted(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(a[3])
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "capture_chat", interrupted)
    argv = [str(jobs), "--out", str(out), "--max-new-tokens", "3", "--quiet", "--reduce", "mean"]
    with pytest.raises(KeyboardInterrupt):
        extract_attention.main(argv)
    assert calls == ["What is this?", "Describe."]
    first = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in first if r["status"] == "ok"] == [1, 4]

    calls.clear()
    monkeypatch.setattr(pipeline, "capture_chat", lambda *a, **k: (calls.append(a[3]), real(*a, **k))[1])
    assert extract_attention.main(argv) == 1  # some lines failed
    assert calls == ["Colour?"]  # only the line not finished before
    summary = capsys.readouterr().out
    assert "6 lines: 1 succeeded, 2 skipped (already done), 3 failed" in summary
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    ok = {r["line"]: r for r in rows if r["status"] == "ok"}
    assert sorted(ok) == [1, 4, 5]
    errors = {r["line"]: r["error"] for r in rows if r["status"] == "error"}
    assert errors[2].startswith(f"{jobs} line 2: expected a JSON object") and "not valid JSON" in errors[2]
    assert errors[3].startswith(f"{jobs} line 3, field 'image'") and "missing.png" in errors[3]
    assert errors[6] == f"{jobs} line 6, field 'prompt': missing; expected a string"
    for line, r in ok.items():
        rec = AttentionRecord.load(str(out / r["record"]))
        assert rec.meta["line"] == line and rec["llm.layers.0.attn"].shape[0] == 1  # head mean
        assert r["record"] == f"records/{r['id']}-{r['key'][:12]}"
    assert sorted(p.name for p in (out / "records").iterdir()) == sorted(
        f"{r['id']}-{r['key'][:12]}{ext}" for r in ok.values() for ext in (".json", ".safetensors"))
    assert not list(out.rglob(".tmp-*"))


def test_extract_rejects_bad_spec(tmp_path, capsys):
    from minicpmv_attn.scripts.extract_attention import main

    jobs = write_jobs(tmp_path)
    assert main([str(jobs), "--out", str(tmp_path / "o"), "--spec", '{"reduce": "sum"}']) == 2
    assert "valid values" in capsys.readouterr().err


def test_visualize_rejects_bad_selection_before_loading(tmp_path, capsys, monkeypatch):
    import minicpmv_attn.analysis.pipeline as pipeline
    from minicpmv_attn.scripts.visualize_attention import main

    monkeypatch.setattr(pipeline, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["--layers", "x:y", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--layers" in capsys.readouterr().err
    assert main(["--vision-layers", "1,a", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--vision-layers" in capsys.readouterr().err
