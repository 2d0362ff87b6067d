#!/usr/bin/env python
"""Benchmark the interactive viewer on a synthetic record of MiniCPM-V-2.6's real size.

Builds a record with the shapes the model captures (random causal softmax rows, no model):
LLM 28 layers x 28 heads over the generated rows ("generated" capture, the default with
--model), the resampler (28 heads, 64 queries per slice) and the last SigLIP layer (16 heads)
on a 1344 x 1008 image cut into a 3 x 3 grid (10 slices, 640 image tokens), then writes the
viewer and prints its size and build time. With --browser it also opens the page in headless
Chromium (selenium + chromedriver) and prints the time to the first overlay drawn
(``window.viewerReady``, from navigation start) and the median time of a redraw after a
token click.

Budget: the record takes about (layers x heads x tokens x positions + slices x 16 x 1024^2) x 2
bytes (float16; about 0.9 GiB at the defaults); --tokens is capped at 1024.
"""
import argparse
import os
import sys
import time
from typing import Optional, Sequence, Tuple


def synthetic_record(n_layers: int = 28, n_heads: int = 28, n_gen: int = 300, grid: Optional[Tuple[int, int]] = (3, 3),
                     size: Tuple[int, int] = (1344, 1008), src_tgt: Tuple[int, int] = (27, 36),
                     slice_tgt: Tuple[int, int] = (24, 32), queries: int = 64, res_heads: int = 28,
                     vis_heads: int = 16, vis_layers: Sequence[int] = (26,), rows: str = "generated",
                     n_text: int = 12, dtype=None, seed: int = 0, sharpness: float = 3.0):
    """An :class:`AttentionRecord` with MiniCPM-V-2.6's layout and tensor shapes and random
    softmax rows (logits ~ N(0, sharpness^2), causal; every row a probability distribution).
    ``grid`` = (cols, rows) of slices or None; ``rows`` = "generated" or "all"."""
    import torch  # here, so that --help answers without loading torch

    from minicpmv_attn.attention_record import AttentionRecord, ImageLayout, SliceLayout, TokenLayout
    from minicpmv_attn.capture import hook_name

    dtype = torch.float16 if dtype is None else dtype
    g = torch.Generator().manual_seed(seed)
    tokens, roles, bounds = [], [], []

    def add(tok, role):
        tokens.append(tok)
        roles.append(role)

    for t in ("<|im_start|>", "user", "Ċ"):
        add(t, "special" if t.startswith("<|") else "text")
    W, H = size
    im = ImageLayout(index=0, size=(W, H), grid=grid)

    def add_slice(kind, tgt, box, grid_pos, opener, closer):
        add(opener, "special")
        start = len(tokens)
        for _ in range(queries):
            add("<unk>", "image")
        bounds.append((start, len(tokens)))
        im.slices.append(SliceLayout(image=0, index=len(im.slices), kind=kind, tgt_size=tgt, box=box,
                                     grid_pos=grid_pos, token_span=(start, len(tokens))))
        add(closer, "special")

    add_slice("source", src_tgt, (0.0, 0.0, float(W), float(H)), None, "<image>", "</image>")
    if grid is not None:
        cols, nrows = grid
        for r in range(nrows):
            for c in range(cols):
                add_slice("slice", slice_tgt, (c * W / cols, r * H / nrows, (c + 1) * W / cols, (r + 1) * H / nrows),
                          (r, c), "<slice>", "</slice>")
            add("Ċ", "text")
    for k in range(n_text):
        add(f"Ġword{k}", "text")
    for t in ("<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"):
        add(t, "special" if t.startswith("<|") else "text")
    n_prompt = len(tokens)
    for k in range(n_gen):
        add(f"Ġtok{k}", "text")
    L = len(tokens)
    layout = TokenLayout(input_ids=list(range(L)), tokens=tokens, roles=roles, image_bound=bounds, images=[im],
                         n_prompt=n_prompt)
    row_ids = list(range(n_prompt - 1, L - 1)) if rows == "generated" else list(range(L))
    r = torch.tensor(row_ids)
    causal = torch.arange(L)[None, :] > r[:, None]  # [R, L]
    tensors, index = {}, {}
    for l in range(n_layers):
        x = torch.randn(n_heads, len(row_ids), L, generator=g) * sharpness
        x[:, :, 0] += 2 * sharpness  # a sink on the first token
        tensors[hook_name("llm", l)] = x.masked_fill(causal, float("-inf")).softmax(-1).to(dtype)
        index[hook_name("llm", l)] = {"rows": None if rows == "all" else row_ids, "cols": None, "heads": None,
                                      "reduce": "none"}
    sl = im.slices
    P = max(a * b for a, b in (s.tgt_size for s in sl))
    res = torch.zeros(len(sl), res_heads, queries, P, dtype=dtype)
    vis = {v: torch.zeros(len(sl), vis_heads, P, P, dtype=dtype) for v in vis_layers}
    for s, x in enumerate(sl):
        n = x.tgt_size[0] * x.tgt_size[1]
        res[s, :, :, :n] = (torch.randn(res_heads, queries, n, generator=g) * sharpness).softmax(-1).to(dtype)
        for v in vis.values():
            v[s, :, :n, :n] = (torch.randn(vis_heads, n, n, generator=g) * sharpness).softmax(-1).to(dtype)
    tensors["resampler.attn"] = res
    index["resampler.attn"] = {"heads": None, "reduce": "none"}
    for l, v in vis.items():
        tensors[hook_name("vision", l)] = v
        index[hook_name("vision", l)] = {"heads": None, "reduce": "none"}
    return AttentionRecord(tensors=tensors, index=index, layout=layout,
                           meta={"prompt": "Describe this image in detail.",
                                 "answer": "".join(t.replace("Ġ", " ") for t in tokens[n_prompt:]),
                                 "model": "synthetic (random softmax rows)"})


def synthetic_image(size: Tuple[int, int]):
    """A smooth colour gradient of ``size`` = (w, h) (PIL RGB)."""
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1),
                                     ((x + y) * 255 // max(1, w + h - 2))[::-1]], -1).astype(np.uint8))


def browser_times(path: str, timeout: float = 120.0):
    """(ms to the first overlay drawn, median ms of 20 redraws after clicking a token) of the page in
    headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.binary_location = "/usr/bin/chromium"
    drv = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
    try:
        drv.set_page_load_timeout(timeout)
        drv.get("file://" + os.path.abspath(path))
        t0 = time.time()
        while drv.execute_script("return window.viewerReady === undefined") and time.time() - t0 < timeout:
            time.sleep(0.05)
        ready = drv.execute_script("return window.viewerReady")
        tm = drv.execute_script("return window.viewerTimings")
        print(f"  page: script starts {tm['script']:.0f} ms (HTML parsed), data decoded {tm['decoded']:.0f} ms, "
              f"first overlay {ready:.0f} ms after navigation start")
        redraw = drv.execute_script(
            "const v = window.viewer, ms = [];"
            "for (let i = 0; i < 20; i++) { const t = performance.now(); v.state.t = (i * 7) % v.data.tokens.length;"
            "  v.draw(); ms.push(performance.now() - t); }"
            "ms.sort((a, b) => a - b); return ms[10];")
        return ready, redraw
    finally:
        drv.quit()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_viewer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=300, help="generated tokens (default 300, at most 1024)")
    p.add_argument("--layers", type=int, default=28, help="LLM layers (default 28)")
    p.add_argument("--heads", type=int, default=28, help="LLM heads (default 28)")
    p.add_argument("--rows", choices=["generated", "all"], default="generated",
                   help="captured LLM rows (default generated; 'all' enables rollout and costs far more memory)")
    p.add_argument("--out", default="viewer_bench", help="output folder (default ./viewer_bench)")
    p.add_argument("--browser", action="store_true", help="also time the page in headless Chromium")
    args = p.parse_args(argv)
    if not 1 <= args.tokens <= 1024:
        print(f"error: --tokens: expected 1 to 1024, found {args.tokens}", file=sys.stderr)
        return 2
    from minicpmv_attn.analysis.viewer import write_viewer

    t0 = time.time()
    rec = synthetic_record(n_layers=args.layers, n_heads=args.heads, n_gen=args.tokens, rows=args.rows)
    print(f"record: {len(rec.layout.tokens)} positions, {sum(t.numel() for t in rec.tensors.values()) * 2 / 2**30:.2f} "
          f"GiB (float16), built in {time.time() - t0:.1f} s")
    path = os.path.join(args.out, "index.html")
    t0 = time.time()
    v = write_viewer(rec, synthetic_image(rec.layout.images[0].size), path, title="viewer benchmark", progress=True)
    build = time.time() - t0
    print(f"viewer: {path}: {os.path.getsize(path) / 2**20:.1f} MiB, built in {build:.1f} s "
          f"({v.data_bytes / 2**20:.1f} MiB of data, {len(v.data['blocks'])} LLM maps per token)")
    for n in v.notes:
        print(f"  note: {n}")
    if args.browser:
        ready, redraw = browser_times(path)
        print(f"chromium (headless): first overlay drawn {ready:.0f} ms after navigation start; "
              f"redraw after a token click {redraw:.1f} ms (median of 20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
