"""The summary table (summary.parquet / summary.csv) and the dataset report (report.html) of an
extraction folder, on records of the tiny demo model; the ``report`` subcommand needs no model."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicpmv_attn import AttentionRecord


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    from minicpmv_attn.analysis.extract import extract

    folder = tmp_path_factory.mktemp("summary")
    Image.new("RGB", (320, 240), (200, 40, 40)).save(folder / "a.png")
    Image.new("RGB", (200, 300), (40, 40, 200)).save(folder / "b.png")
    jobs = [{"image": "a.png", "prompt": "What is it?", "id": "one", "label": "right", "score": 0.5},
            {"image": "a.png", "prompt": "Colour?", "id": "two", "label": "wrong", "note": {"nested": 1}},
            {"image": "b.png", "prompt": "Where?", "id": "three", "label": "right"},
            {"image": "missing.png", "prompt": "gone", "id": "four", "label": "wrong"}]
    (folder / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    out = folder / "out"
    done = extract(str(folder / "jobs.jsonl"), str(out), max_new_tokens=5, quiet=True)
    assert done.counts["succeeded"] == 3 and done.counts["failed"] == 1
    return out


def copy_of(extracted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(extracted, out)
    return out


def _cell(text):
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_summary(out):
    """The summary rows: summary.parquet with pyarrow, else summary.csv (what a run writes without it)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        assert not (out / "summary.parquet").exists()
        with open(out / "summary.csv", newline="") as f:
            return [{k: _cell(v) for k, v in r.items()} for r in csv.DictReader(f)]
    assert not (out / "summary.csv").exists()
    return pq.read_table(out / "summary.parquet").to_pylist()


def has_pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def test_summary_has_one_row_per_record_with_the_measures(extracted):
    from minicpmv_attn.analysis.attention_map import role_shares

    rows = read_summary(extracted)
    assert [r["id"] for r in rows] == ["one", "two", "three"]  # the failed line has no record
    assert [r["label"] for r in rows] == ["right", "wrong", "right"]
    assert rows[0]["score"] == 0.5 and rows[1]["note"] == "{'nested': 1}" and rows[2]["score"] is None
    for r in rows:
        rec = AttentionRecord.load(str(extracted / r["record"]))
        lay = rec.layout
        assert str(r["answer"]) == json.loads((extracted / r["record"]).with_suffix(".json").read_text())["meta"]["answer"]
        assert (r["n_prompt"], r["n_generated"]) == (lay.n_prompt, len(lay.input_ids) - lay.n_prompt)
        assert r["n_image_tokens"] == lay.roles.count("image") > 0
        layers = rec.layers("llm")
        shares = role_shares(rec)
        for i, layer in enumerate(layers):
            assert r[f"img_share_L{layer:02d}"] == pytest.approx(shares["image"][i], abs=1e-6)
        assert r["image_share"] + r["text_share"] + r["special_share"] == pytest.approx(1.0, abs=1e-3)
        # sink share and entropy, independently from the raw head-mean tensors
        sink, ent, n = 0.0, 0.0, 0
        for layer in layers:
            t = rec[f"llm.layers.{layer}.attn"].float()[0]  # [rows, cols]
            sink += float(t[:, 0].sum())
            p = t.clamp_min(1e-30)
            ent += float(-(t * p.log()).sum())
            n += t.shape[0]
        assert r["sink_share"] == pytest.approx(sink / n, rel=1e-3)
        assert r["entropy"] == pytest.approx(ent / n, rel=1e-3)
        # the top region: one cell of the grid, inside the image, where the mean heatmap peaks
        W, H = lay.images[0].size
        assert (r["image_w"], r["image_h"]) == (W, H)
        assert 0 <= r["top_x0"] < r["top_x1"] <= W and 0 <= r["top_y0"] < r["top_y1"] <= H
        assert r["top_x1"] - r["top_x0"] <= W / 16 + 1
        rows_ = [p for p in rec.index["llm.layers.0.attn"]["rows"]]
        from minicpmv_attn.analysis.attention_map import image_heatmap

        full = sum(image_heatmap(rec, p, layer_reduce="mean").map for p in rows_)
        cell = full[r["top_y0"]:r["top_y1"], r["top_x0"]:r["top_x1"]].mean()
        assert cell >= np.quantile(full, 0.9)  # the chosen cell is among the hottest at full resolution


def test_csv_when_pyarrow_is_missing_and_back(extracted, tmp_path, monkeypatch, capsys):
    from minicpmv_attn.analysis import summary
    from minicpmv_attn.scripts.extract_attention import main

    out = copy_of(extracted, tmp_path)
    want = read_summary(out)

    def no_pyarrow():
        raise ImportError("No module named 'pyarrow'")

    monkeypatch.setattr(summary, "_import_pyarrow", no_pyarrow)
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("note: pyarrow is not installed") == 1 and "summary.csv" in printed
    assert not (out / "summary.parquet").exists()  # no stale table next to the new one
    with open(out / "summary.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert float(got[0]["img_share_L00"]) == pytest.approx(want[0]["img_share_L00"], rel=1e-6)
    assert got[2]["score"] == ""  # missing field: empty cell
    monkeypatch.undo()
    if has_pyarrow():  # with pyarrow again: parquet, and the csv goes
        assert main(["report", str(out)]) == 0
        assert (out / "summary.parquet").exists() and not (out / "summary.csv").exists()
        assert read_summary(out) == want


def test_report_is_one_offline_file_and_rebuilds_without_the_model(extracted, tmp_path, monkeypatch, capsys):
    from minicpmv_attn.analysis import pipeline
    from minicpmv_attn.scripts.extract_attention import main

    out = copy_of(extracted, tmp_path)
    (out / "report.html").unlink()
    monkeypatch.setattr(pipeline, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["report", str(out), "--group-by", "label"]) == 0
    assert "3 records" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    for needle in ("Image share of attention per LLM layer", "By label", "difference: right - wrong",
                   "Mean answer heatmap by label", "Lowest image share", "Highest image share",
                   "1 line(s) failed"):
        assert needle in page, needle
    assert page.count("data:image/png;base64,") >= 3
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for href in ("records/one-", "records/two-", "records/three-"):
        assert f'href="./{href}' in page  # outliers link their records, relatively
    for link in [p.split('"')[0] for p in page.split('href="')[1:]]:
        assert (out / link).is_file(), link
    assert main(["report", str(out), "--group-by", "colour"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --group-by colour: no such column") and "label" in err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_report_is_bounded(extracted, tmp_path, monkeypatch):
    from minicpmv_attn.analysis import dataset_report

    out = copy_of(extracted, tmp_path)
    monkeypatch.setattr(dataset_report, "MAX_PLOT_ROWS", 2)
    built = dataset_report.build_report(str(out))
    page = Path(built.report_path).read_text()
    assert built.rows == 3 and "3 records: the plots show a random sample of 2" in page


def test_a_record_that_cannot_be_measured_keeps_its_row(extracted, tmp_path):
    from minicpmv_attn.analysis.summary import summarise

    out = copy_of(extracted, tmp_path)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    target = next(r for r in rows if r.get("id") == "two")
    stem = out / target["record"]
    rec = AttentionRecord.load(str(stem))
    AttentionRecord(tensors={"resampler.attn": rec["resampler.attn"]}, index={"resampler.attn": {}},
                    layout=rec.layout, meta=rec.meta).save(str(stem))
    table = summarise(str(out))
    bad = next(r for r in table.rows if r["id"] == "two")
    assert "no LLM attention" in bad["summary_error"] and "summary_error" in table.columns
    assert all("summary_error" not in r for r in table.rows if r["id"] != "two")


def _viewer_links(page):
    """The report's outlier links to viewer pages, in order (href values)."""
    return [p.split('"')[0] for p in page.split('class=viewer href="')[1:]]


def test_report_outliers_open_viewer_pages_with_the_records_maps(extracted, tmp_path):
    """Issue 25: each outlier opens the record's viewer page (``viewer/<name>.html``, beside the
    report) holding that record's maps, on its image when the recorded path still holds it; a record
    whose image is gone still gets its page, saying so, and keeps its JSON link. Pages of earlier
    outliers are removed."""
    from minicpmv_attn.analysis import viewer as vw
    from minicpmv_attn.analysis.dataset_report import build_report

    out = copy_of(extracted, tmp_path)
    results = out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    for r in rows:
        if r.get("id") == "three":
            r["image"] = str(tmp_path / "gone.png")  # its image is no longer where the extraction saw it
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "viewer").mkdir(exist_ok=True)
    (out / "viewer" / "stale.html").write_text("an earlier outlier")
    build_report(str(out))
    page = (out / "report.html").read_text()
    links = _viewer_links(page)
    assert len(links) == 6 and len(set(links)) == 3, links  # 3 records, in both tables
    assert sorted(p.name for p in (out / "viewer").iterdir()) == sorted({Path(x).name for x in links})
    by_id = {r["id"]: r for r in read_summary(out)}
    for rid, r in by_id.items():
        name = Path(r["record"]).name
        link = f"./viewer/{name}.html"
        assert link in links
        html = (out / link).read_text()
        assert f'href="./{r["record"]}.json">json</a>' in page  # the raw record stays linked
        # the record's own maps: the page's data equals the viewer built from the record here
        want = vw.build_viewer(AttentionRecord.load(str(out / r["record"])), None)
        got = vw.read_viewer_data(html)
        assert got["blocks"] == want.data["blocks"] and got["slices"] == want.data["slices"]
        assert np.array_equal(got["u8"], np.frombuffer(__import__("base64").b64decode(want.u8), np.uint8))
        assert f'href="../{r["record"]}.json"' in html and 'href="../report.html"' in html
        if rid == "three":
            assert "data:image/jpeg" not in html
            assert "image not embedded: gone.png is missing" in html
        else:
            assert html.count("data:image/jpeg;base64,") == 1 and "image not embedded" not in html
    assert "image not embedded: gone.png is missing" in page  # the report says it too


def test_outlier_pages_refuse_a_viewer_folder_that_leads_elsewhere(extracted, tmp_path):
    """A ``viewer`` entry that is a link (to a folder outside the run) gets no page written through
    it: the outliers link their JSON with a note, and nothing appears outside ``out``."""
    from minicpmv_attn.analysis.dataset_report import build_report

    out = copy_of(extracted, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(out / "viewer")  # the pages the extraction's own report wrote
    (out / "viewer").symlink_to(elsewhere, target_is_directory=True)
    warned = []
    build_report(str(out), warn=warned.append)
    page = (out / "report.html").read_text()
    assert list(elsewhere.iterdir()) == []
    assert _viewer_links(page) == [] and "is not a folder of the run" in page
    assert any("no viewer pages written" in w for w in warned)
    assert 'href="./records/one-' in page  # the JSON links stay


def test_outlier_pages_are_bounded_and_a_page_that_cannot_be_built_leaves_the_json_link(extracted, tmp_path,
                                                                                        monkeypatch):
    """Each page gets PAGE_DATA_BYTES of map data; a record whose maps do not fit (or cannot be viewed)
    gets no page but a note and a warning, keeps its JSON link, and the report is still written."""
    from minicpmv_attn.analysis import outlier_pages
    from minicpmv_attn.analysis.dataset_report import build_report

    out = copy_of(extracted, tmp_path)
    monkeypatch.setattr(outlier_pages, "PAGE_DATA_BYTES", 1000)
    warned = []
    build_report(str(out), warn=warned.append)
    page = (out / "report.html").read_text()
    assert _viewer_links(page) == [] and list((out / "viewer").iterdir()) == []  # the old pages went too
    assert page.count("no viewer page: viewer budget") == 6 and len([w for w in warned if "viewer budget" in w]) == 3
    assert 'href="./records/one-' in page
