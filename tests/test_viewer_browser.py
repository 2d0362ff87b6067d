"""The viewer page in headless Chromium (selenium): it loads offline without console errors, every
control redraws the overlay, the JS maps equal attention_map's, and nothing is fetched.

Skips only when selenium, chromium or chromedriver is not installed."""
import math
import shutil

import numpy as np
import pytest
import torch

from minicpmv_attn.analysis import attention_map as am
from minicpmv_attn.analysis import viewer as vw
from minicpmv_attn.scripts.bench_viewer import synthetic_image, synthetic_record

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is not installed").By

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="headless browser test needs chromium and chromedriver on PATH")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    rec = synthetic_record(n_layers=3, n_heads=4, n_gen=5, grid=(2, 2), size=(300, 200), src_tgt=(6, 8),
                           slice_tgt=(5, 6), queries=8, res_heads=2, vis_heads=2, vis_layers=(0, 1), rows="all",
                           dtype=torch.float32, seed=5, sharpness=2.0)
    rel = {k: np.random.default_rng(k).random((20, 30)) for k in range(5)}
    path = tmp_path_factory.mktemp("browser") / "index.html"
    # one sink of each role: the first token (special), a text token and an image token of slice 1
    sinks = [0, 1, rec.layout.slices[1].token_span[0] + 3]
    vw.write_viewer(rec, synthetic_image((300, 200)), str(path), extra_kinds={"relevancy": rel}, sinks=sinks)
    rec.meta["test_sinks"] = sinks
    return rec, path


@pytest.fixture(scope="module")
def driver():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,1000"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def overlay(drv) -> str:
    return drv.execute_script("return document.getElementById('overlay').toDataURL()")


def severe(drv):
    return [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]


def js_map(drv, t):
    """The page's map for token ``t`` with the current controls (flat list, grid order)."""
    return drv.execute_script(
        f"window.viewer.state.t = {t}; window.viewer.draw(); return Array.from(window.viewer.compute().map)")


def choose(drv, sel_id, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(drv.find_element(By.ID, sel_id)).select_by_value(value)


def test_viewer_in_headless_chromium(page, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    rec, path = page
    driver.get(path.as_uri())
    assert driver.execute_script("return typeof window.viewerReady") == "number", severe(driver)
    assert severe(driver) == []
    kinds = driver.execute_script("return [...document.getElementById('kind').options].map(o => o.value)")
    assert kinds == ["llm", "resampler", "vision", "x:relevancy"]
    blank = driver.execute_script(
        "const c = document.createElement('canvas'); const o = document.getElementById('overlay');"
        "c.width = o.width; c.height = o.height; return c.toDataURL()")
    seen = [overlay(driver)]
    assert seen[0] != blank

    def changed(what):
        now = overlay(driver)
        assert now != seen[-1], f"overlay did not change after {what}"
        seen.append(now)

    tokens = driver.find_elements(By.CSS_SELECTOR, ".token")
    assert len(tokens) == 5
    tokens[2].click()
    changed("clicking token 2")
    assert "sel" in tokens[2].get_attribute("class")
    choose(driver, "layer", "1")
    changed("layer 1")
    choose(driver, "head", "3")
    changed("head 3")
    choose(driver, "head", "max")
    changed("head max")
    choose(driver, "layer", "rollout")
    changed("layer rollout")
    share = driver.find_element(By.ID, "share").text
    assert share.startswith("image share ") and "layer rollout, head max" in share
    for kind in ("resampler", "vision", "x:relevancy", "llm"):
        choose(driver, "kind", kind)
        changed(f"kind {kind}")
    choose(driver, "kind", "vision")
    before = overlay(driver)
    ActionChains(driver).move_to_element_with_offset(driver.find_element(By.ID, "overlay"), 40, 30).click().perform()
    assert overlay(driver) != before and "attention of patch" in driver.find_element(By.ID, "info").text
    choose(driver, "kind", "llm")
    tokens[0].click()
    changed("clicking token 0")
    driver.find_element(By.ID, "nosinks").click()
    changed("without sinks")  # an image token is a sink: the map changes
    assert severe(driver) == []
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith(("data:", "file:")) for r in resources), resources


def test_js_maps_equal_attention_map(page, driver):
    """The map the page computes (before colouring) equals image_heatmap's at the page's grid."""
    rec, path = page
    driver.get(path.as_uri())
    gw, gh = driver.execute_script("return window.viewer.grid")
    data = driver.execute_script("return window.viewer.data.tokens")
    for layer, head, kw in (("mean", "mean", {}), ("2", "1", dict(layers=[2], heads=[1])),
                            ("rollout", "max", dict(layer_reduce="rollout", head_reduce="max"))):
        choose(driver, "layer", layer)
        choose(driver, "head", head)
        for t in (0, 4):
            got = js_map(driver, t)
            ref = am.image_heatmap(rec, data[t]["row"], out_size=(gw, gh), **kw).map
            got = np.asarray(got).reshape(gh, gw)
            assert np.abs(got - ref).max() <= 0.01 * ref.max(), (layer, head, t)
    # without sinks: image_heatmap's exclude_sinks (mean heads: rows sum to 1)
    driver.execute_script("document.getElementById('nosinks').click()")
    for layer, head, kw in (("mean", "mean", {}), ("0", "2", dict(layers=[0], heads=[2]))):
        choose(driver, "layer", layer)
        choose(driver, "head", head)
        for t in (1, 3):
            got = js_map(driver, t)
            ref = am.image_heatmap(rec, data[t]["row"], out_size=(gw, gh), exclude_sinks=True,
                                   sinks=rec.meta["test_sinks"], **kw)
            got = np.asarray(got).reshape(gh, gw)
            assert np.abs(got - ref.map).max() <= 0.01 * ref.map.max(), ("nosinks", layer, head, t)
            share = driver.execute_script("return document.getElementById('share').textContent")
            shown = float(share.split("image share ")[1].split("%")[0])
            assert shown == pytest.approx(100 * float(ref.image_share), abs=0.15), (share, ref.image_share)
    assert severe(driver) == []


def test_through_siglip_checkbox(page, driver):
    """#thruvision: the LLM map follows the resampler's patches back through the SigLIP rollout and
    equals image_heatmap(through_vision=True); the resampler-query kind uses the composed maps too."""
    rec, path = page
    driver.get(path.as_uri())
    gw, gh = driver.execute_script("return window.viewer.grid")
    data = driver.execute_script("return window.viewer.data.tokens")
    box = driver.find_element(By.ID, "thruvision")
    assert box.is_enabled() and not box.is_selected()
    info = lambda: driver.find_element(By.ID, "info").text  # noqa: E731
    before, plain_info = overlay(driver), info()
    assert "SigLIP" not in plain_info
    box.click()
    assert box.is_selected() and overlay(driver) != before, "overlay did not change after ticking #thruvision"
    assert "SigLIP rollout" in info() and "through SigLIP" in info()
    for layer, head, kw in (("mean", "mean", {}), ("1", "3", dict(layers=[1], heads=[3]))):
        choose(driver, "layer", layer)
        choose(driver, "head", head)
        for t in (0, 3):
            got = js_map(driver, t)
            ref = am.image_heatmap(rec, data[t]["row"], out_size=(gw, gh), through_vision=True, **kw).map
            plain = am.image_heatmap(rec, data[t]["row"], out_size=(gw, gh), **kw).map
            got = np.asarray(got).reshape(gh, gw)
            assert np.abs(got - ref).max() <= 0.01 * ref.max(), (layer, head, t)
            assert np.abs(got - plain).max() > 0.05 * plain.max(), (layer, head, t)  # not the plain map
    choose(driver, "kind", "resampler")
    on = overlay(driver)
    assert "resampler query map through SigLIP" in info()
    box.click()
    assert overlay(driver) != on and "SigLIP" not in info()
    choose(driver, "kind", "vision")
    assert not box.is_enabled()  # the SigLIP patch kind has no through-SigLIP variant
    assert severe(driver) == []


def test_main_command_page_loads(tmp_path, driver):
    """The page the main command writes (the random demo, made to say 3 tokens) draws without errors."""
    from minicpmv_attn.analysis.visualize import RANDOM_DEMO, visualize

    out = tmp_path / "out"
    visualize(model=RANDOM_DEMO, out=str(out), max_new_tokens=3, quiet=True, relevancy=True)
    driver.get((out / "index.html").as_uri())
    assert driver.execute_script("return typeof window.viewerReady") == "number"
    assert driver.execute_script("return document.querySelectorAll('.token').length") == 3
    before = overlay(driver)
    choose(driver, "kind", "x:relevancy")
    assert overlay(driver) != before and "relevancy map" in driver.execute_script(
        "return document.getElementById('info').textContent")
    assert not math.isnan(float(driver.execute_script("return window.viewerReady")))
    assert severe(driver) == []


def test_issue25_image_size_zoom_side_by_side_grid_legend_rows(page, driver):
    """Issue 25's viewer: the image is >= 800 px and fits the window, #zoom enlarges it, #sidebyside
    shows the original beside the overlay, the slice grid is thin lines, the legend speaks in words,
    "image token -1" is explained and tokens are named by the API's row ("row N (predicts token X)")."""
    rec, path = page
    driver.set_window_size(1300, 1000)
    driver.get(path.as_uri())
    assert not severe(driver)
    js = "const r = document.getElementById(arguments[0]).getBoundingClientRect(); return [r.width, r.height]"
    w0, _ = driver.execute_script(js, "stage")
    assert w0 >= 800, w0
    assert driver.execute_script("return document.getElementById('view').clientWidth") >= w0
    driver.find_element(By.ID, "zoom").send_keys("\ue014" * 4)  # arrow right: 1 -> 2
    w1, _ = driver.execute_script(js, "stage")
    assert w1 >= 1.9 * w0, (w0, w1)
    assert driver.execute_script("return document.getElementById('overlay').width") >= w1  # drawn at screen resolution
    driver.execute_script("const z = document.getElementById('zoom'); z.value = 1; z.dispatchEvent(new Event('input'))")
    assert not driver.find_element(By.ID, "orig").is_displayed()
    driver.find_element(By.ID, "sidebyside").click()
    (ow, oh), (sw, sh) = driver.execute_script(js, "orig"), driver.execute_script(js, "stage")
    assert driver.find_element(By.ID, "orig").is_displayed() and ow == sw and oh == sh
    assert driver.find_element(By.ID, "photo-orig").tag_name == "img"
    driver.find_element(By.ID, "sidebyside").click()
    # the grid: thin lines change a small part of the overlay (the old boxes, 1.5 px strokes inset on both
    # sides of each edge at image resolution, changed about 10 %)
    frac = driver.execute_script("""
        const o = document.getElementById('overlay'), c = o.getContext('2d'), b = document.getElementById('boxes');
        const get = () => c.getImageData(0, 0, o.width, o.height).data;
        b.checked = false; window.viewer.draw(); const a = get(); b.checked = true; window.viewer.draw(); const g = get();
        let n = 0; for (let i = 0; i < a.length; i += 4) if (a[i] !== g[i] || a[i + 1] !== g[i + 1] || a[i + 3] !== g[i + 3]) n++;
        return n / (a.length / 4)""")
    assert 0 < frac < 0.04, frac
    words = driver.find_element(By.ID, "legendwords").text
    assert "share of this token's attention that lands on this area" in words
    choose(driver, "kind", "resampler")
    assert "resampler query" in driver.find_element(By.ID, "legendwords").text
    assert "image token -1 = the one this token attended to most" in driver.find_element(By.ID, "info").text
    assert "-1" in driver.find_element(By.ID, "query").find_element(By.XPATH, "..").get_attribute("title")
    choose(driver, "kind", "llm")
    t0 = driver.execute_script("return window.viewer.data.tokens[0]")
    assert t0["row"] == t0["pos"] - 1
    info = driver.execute_script("window.viewer.state.t = 0; window.viewer.draw(); "
                                 "return document.getElementById('info').textContent")
    assert info.startswith(f"row {t0['row']} (predicts token \"{t0['text']}\")"), info
    assert driver.find_elements(By.CSS_SELECTOR, ".token")[0].get_attribute("title").startswith(f"row {t0['row']} ")


def test_token_view_shows_the_row_and_clicks_select(page, driver):
    """Issue 25's token view: the selected token's row over the text tokens as backgrounds (the
    embedded row, per layer and head), and a click on a token whose row is shown selects it."""
    rec, path = page
    driver.get(path.as_uri())
    choose(driver, "layer", "1")
    choose(driver, "head", "2")
    data = driver.execute_script("return window.viewer.data")
    cols = [c["pos"] for c in data["text_cols"]]
    toks = data["tokens"]
    w, _, _ = am.llm_attention_rows(rec, 1, [t["row"] for t in toks], heads=None, head_reduce=None)
    spans = driver.find_elements(By.CSS_SELECTOR, "#tokview .tv")
    assert len(spans) == len(cols)
    for t in (0, 3):
        got = np.array(driver.execute_script(
            f"window.viewer.state.t = {t}; window.viewer.draw(); return Array.from(window.viewer.tokenRow({t}))"))
        ref = w[2, t, cols].numpy() if hasattr(w, "numpy") else w[2, t, cols]
        assert np.abs(got - ref).max() <= ref.max() / 500 + 1e-7
        i = int(np.argmax(ref))
        assert f"{100 * ref[i]:.1f}%" in spans[i].get_attribute("title")
        bg = [s.value_of_css_property("background-color") for s in spans]
        assert bg[i] != bg[int(np.argmin(ref))]
    assert "row " in driver.find_element(By.ID, "tokviewdesc").text
    target = 2
    spans[cols.index(toks[target]["row"])].click()
    assert driver.execute_script("return window.viewer.state.t") == target
    assert driver.find_element(By.CSS_SELECTOR, ".token.sel").get_attribute("data-t") == str(target)
    assert not severe(driver)


def test_overlay_lets_the_image_show_where_the_map_is_zero(tmp_path, driver):
    """Issue 25 ("the heat colours hide the object"): the overlay's opacity follows the map (the
    opacity control is its value at the peak). On a constructed map that is 0 on the left half, the
    overlay pane shows the image's own pixels there, as the original beside it does (side by side);
    where the map peaks the pixels differ. Without an image the colours stay opaque."""
    from PIL import Image

    rec = synthetic_record(n_layers=1, n_heads=2, n_gen=2, grid=None, size=(300, 200), src_tgt=(4, 6),
                           slice_tgt=(4, 6), queries=4, res_heads=1, vis_heads=1, vis_layers=(), rows="all",
                           n_text=3, seed=2)
    m = np.zeros((20, 30))
    m[:, 15:] = np.linspace(0.05, 1.0, 15)[None, :]
    path = tmp_path / "index.html"
    vw.write_viewer(rec, synthetic_image((300, 200)), str(path), extra_kinds={"constructed": {0: m, 1: m}})
    driver.set_window_size(1300, 1000)
    driver.get(path.as_uri())
    choose(driver, "kind", "x:constructed")
    driver.execute_script("document.getElementById('boxes').checked = false; window.viewer.draw()")
    driver.find_element(By.ID, "sidebyside").click()
    alpha = driver.execute_script("""
        const o = document.getElementById('overlay'), d = o.getContext('2d').getImageData(0, 0, o.width, o.height).data;
        const left = [], right = [];
        for (let y = 0; y < o.height; y += 7) for (let x = 0; x < o.width; x += 3) {
          const a = d[4 * (y * o.width + x) + 3];
          if (x < 0.45 * o.width) left.push(a); else if (x > 0.97 * o.width) right.push(a); }
        return [Math.max(...left), Math.min(...right), Math.max(...right)]""")
    assert alpha[0] == 0 and alpha[1] > 0 and alpha[2] == round(255 * 0.6), alpha  # the control's 0.6 at the peak

    def pane(element_id):
        import io

        png = driver.find_element(By.ID, element_id).screenshot_as_png
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)

    over, orig = pane("stage"), pane("orig")
    assert over.shape == orig.shape
    w = over.shape[1]
    assert np.abs(over[:, : int(0.45 * w)] - orig[:, : int(0.45 * w)]).max() <= 1  # the image, unchanged
    assert np.abs(over[:, int(0.97 * w):] - orig[:, int(0.97 * w):]).max() > 20  # tinted where the map peaks
    driver.execute_script("const a = document.getElementById('alpha'); a.value = 1; a.dispatchEvent(new Event('input'))")
    top = driver.execute_script("""const o = document.getElementById('overlay');
        return o.getContext('2d').getImageData(o.width - 2, o.height >> 1, 1, 1).data[3]""")
    assert top == 255
    # without an image: the map in its plain colours (the control sets one opacity for all)
    bare = tmp_path / "bare.html"
    vw.write_viewer(rec, None, str(bare), extra_kinds={"constructed": {0: m, 1: m}})
    driver.get(bare.as_uri())
    choose(driver, "kind", "x:constructed")
    driver.execute_script("document.getElementById('boxes').checked = false; window.viewer.draw()")
    left = driver.execute_script("""const o = document.getElementById('overlay');
        return o.getContext('2d').getImageData(2, o.height >> 1, 1, 1).data[3]""")
    assert left == round(255 * 0.6)
    assert severe(driver) == []
