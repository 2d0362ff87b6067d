"""User strings in the offline pages never become markup, URLs or template placeholders.

A hostile-strings record (prompt, answer, tokens, labels, ids, record paths) goes through the
viewer and the dataset report; the pages are checked as text (always) and in headless Chromium
(when installed): no handler runs, nothing is requested, every link is a file beside the page.
"""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from minicpmv_attn import AttentionRecord
from minicpmv_attn.analysis import viewer as vw
from minicpmv_attn.scripts.bench_viewer import synthetic_record

HOSTILE = ("<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>"
           "{{JS}}{{U8}}{{FOOTER}}{{PHOTO}}{{DATA}}' \" $\\frac{$ javascript:window.__pwned=3")
JS_URL = "javascript:window.__pwned=4;void(0)"


def small_hostile_record():
    rec = synthetic_record(n_layers=2, n_heads=2, n_gen=3, grid=None, size=(120, 80), src_tgt=(4, 6),
                           slice_tgt=(4, 6), queries=4, res_heads=1, vis_heads=1, vis_layers=(), rows="all",
                           n_text=3, seed=1)
    lay = rec.layout
    lay.tokens = [HOSTILE if r == "text" else t for t, r in zip(lay.tokens, lay.roles)]
    rec.meta.update(prompt=HOSTILE, answer=HOSTILE, model=HOSTILE)
    return rec


@pytest.fixture(scope="module")
def viewer_page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_view")
    path = folder / "index.html"
    vw.write_viewer(small_hostile_record(), None, str(path), title=HOSTILE)
    return path


def test_viewer_placeholders_in_user_strings_are_not_filled(viewer_page):
    page = viewer_page.read_text()
    assert page.count("<script") == 5  # data, u8, f32, lut, the viewer's code: none added
    assert page.count("<img") == 0 and page.count("<noscript>") == 1  # no photo, no second copy of the page
    assert page.count('"use strict"') == 1  # the JS once, not again where the prompt says {{JS}}
    assert "{{JS}}" in page  # the prompt's text, shown as text
    assert "<img src=x" not in page and "<script>window" not in page  # escaped everywhere
    data = vw.read_viewer_data(page)
    assert data["prompt"] == HOSTILE and data["answer"] == HOSTILE


def test_view_embeds_only_the_image_the_user_names(tmp_path, capsys):
    from minicpmv_attn.scripts.visualize_attention import main

    rec = small_hostile_record()
    private = tmp_path / "private.png"
    Image.new("RGB", (120, 80), (10, 200, 30)).save(private)
    rec.meta["image"] = str(private)  # a record from someone else naming a local file
    rec.save(str(tmp_path / "rec"))
    assert main(["view", str(tmp_path / "rec"), "--out", str(tmp_path / "v"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    page = (tmp_path / "v" / "index.html").read_text()
    assert "data:image/jpeg" not in page and "private.png" not in page
    assert "pass --image" in printed
    assert main(["view", str(tmp_path / "rec"), "--out", str(tmp_path / "v2"), "--quiet", "--image",
                 str(private)]) == 0
    assert "data:image/jpeg" in (tmp_path / "v2" / "index.html").read_text()


@pytest.fixture(scope="module")
def report_folder(tmp_path_factory):
    """An extraction folder whose labels, ids and answers are hostile and whose record is stored
    under a file name that reads as a javascript: URL."""
    from minicpmv_attn.analysis.dataset_report import build_report
    from minicpmv_attn.analysis.extract import extract

    folder = tmp_path_factory.mktemp("hostile_report")
    Image.new("RGB", (64, 48), (200, 40, 40)).save(folder / "a.png")
    jobs = [{"image": "a.png", "prompt": "What is it?", "id": HOSTILE, "label": HOSTILE},
            {"image": "a.png", "prompt": "Colour?", "id": "two", "label": "$\\frac{$"},
            {"image": "a.png", "prompt": "Where?", "id": "three", "label": "<b>bold</b>"},
            {"image": "a.png", "prompt": "Up?", "id": "../../x", "label": "dots"}]
    (folder / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    out = folder / "out"
    done = extract(str(folder / "jobs.jsonl"), str(out), max_new_tokens=3, quiet=True, summary=False)
    assert done.counts["succeeded"] == 4
    results = out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    for ext in (".json", ".safetensors"):
        shutil.move(str(out / (rows[1]["record"] + ext)), str(out / (JS_URL + ext)))
    rows[1]["record"] = JS_URL
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_report(str(out), group_by="label")
    return out


def test_report_links_are_files_and_labels_are_text(report_folder):
    page = (report_folder / "report.html").read_text()
    assert "href=\"javascript:" not in page and "href='javascript:" not in page
    assert "./javascript%3Awindow.__pwned%3D4%3Bvoid%280%29.json" in page
    assert "<script" not in page and "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "{{JS}}" in page  # as text: the report is not a template
    for link in [p.split('"')[0] for p in page.split('href="')[1:]]:
        from urllib.parse import unquote

        assert (report_folder / unquote(link)).is_file(), link


def test_report_outlier_pages_stay_in_the_folder_and_escape_names(report_folder):
    """The outliers' viewer pages (issue 25) are named from the record's file name reduced to safe
    characters: the javascript: record and the id ``../../x`` give files inside ``out/viewer/``,
    linked relatively; the names are text on the pages; nothing is written outside ``out``."""
    from urllib.parse import unquote

    page = (report_folder / "report.html").read_text()
    links = [p.split('"')[0] for p in page.split('class=viewer href="')[1:]]
    assert len(set(links)) == 4 and all(x.startswith("./viewer/") for x in links), links
    assert "./viewer/javascript_window.__pwned_4_void_0_.html" in links
    pages = sorted((report_folder / "viewer").iterdir())
    assert [p.name for p in pages] == sorted(Path(unquote(x)).name for x in set(links))
    folder = report_folder.parent
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "jobs.jsonl", "out"]  # nothing beside out
    for p in pages:
        html = p.read_text()
        assert "<img src=x" not in html and "<script>window" not in html and "href=\"javascript:" not in html
        assert html.count("<script") == 5 and html.count("data:image/jpeg;base64,") == 1  # a.png, named in the JSONL
        for href in [h.split('"')[0] for h in html.split('href="')[1:]]:
            assert (p.parent / unquote(href)).resolve().is_file(), href
    dots = next(p for p in pages if "x-" in p.name and p.name.startswith("_"))
    assert "<b>Record:</b> ../../x<br>" in dots.read_text()  # the id as text, not as a path


# ---------------------------------------------------------------------------------------------
# in the browser
# ---------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                             reason="headless browser test needs chromium and chromedriver on PATH")


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    drv = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _no_handler_no_request(drv):
    assert drv.execute_script("return window.__pwned === undefined")
    resources = drv.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith("data:") for r in resources), resources


@browser
def test_hostile_viewer_in_chromium(viewer_page, driver):
    from selenium.webdriver.common.by import By

    driver.get(viewer_page.as_uri())
    assert driver.execute_script("return typeof window.viewerReady") == "number"
    assert driver.execute_script("return document.getElementById('prompt').textContent") == HOSTILE
    assert driver.execute_script("return document.title") == HOSTILE
    for tok in driver.find_elements(By.CSS_SELECTOR, ".token"):
        tok.click()
    _no_handler_no_request(driver)
    assert driver.execute_script("return document.querySelectorAll('script').length") == 5


@browser
def test_hostile_report_in_chromium(report_folder, driver):
    from selenium.webdriver.common.by import By

    driver.get((report_folder / "report.html").as_uri())
    _no_handler_no_request(driver)
    protocols = driver.execute_script("return [...document.links].map(a => a.protocol)")
    assert protocols and set(protocols) == {"file:"}, protocols
    assert driver.execute_script("return document.querySelectorAll('script, iframe, [onerror]').length") == 0
    # an outlier opens its viewer page: it draws offline, its links are files, no handler runs
    hostile = driver.find_element(By.CSS_SELECTOR, "a.viewer[href*='javascript_']")
    hostile.click()
    assert driver.current_url.endswith("/out/viewer/javascript_window.__pwned_4_void_0_.html")
    assert driver.execute_script("return typeof window.viewerReady") == "number"
    assert driver.execute_script("return document.getElementById('photo').tagName") == "IMG"
    _no_handler_no_request(driver)
    protocols = driver.execute_script("return [...document.links].map(a => a.protocol)")
    assert protocols and set(protocols) == {"file:"}, protocols
    driver.back()
    assert driver.current_url.endswith("/out/report.html")
