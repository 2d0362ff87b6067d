#!/usr/bin/env python
"""Chat with MiniCPM-V-2.6 about an image and plot where its attention went.

With no arguments it runs the embedded default: a tiny MiniCPM-V with seeded RANDOM
weights (built locally, nothing downloaded), the shipped tokenizer and a real photo
bundled with matplotlib. Its maps show the pipeline, not meaning. Use --model with a
real checkpoint folder (or a hub id, when online) for meaningful maps.

Writes to --out (default ./attention_out): PNG plots, the attention record
(record.safetensors + record.json) and index.html showing everything.
"""
import argparse
import html
import os
import sys
import time


def build_parser():
    p = argparse.ArgumentParser(
        prog="minicpmv-attn-visualize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="checkpoint folder or hub id (default: the tiny seeded demo model, random weights)")
    p.add_argument("--image", default=None, help="image file (default: matplotlib's grace_hopper.jpg)")
    p.add_argument("--prompt", default=None, help="question about the image (default: 'Describe this image.')")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    p.add_argument("--layers", default=None, help="LLM layers to capture: '0,3', '2:6', 'all' (default all)")
    p.add_argument("--heads", default=None, help="LLM heads to capture (default all)")
    p.add_argument("--rows", choices=["all", "generated"], default=None,
                   help="LLM query rows to keep: 'all' (full matrix, needed for the matrix plot) or "
                        "'generated' (the rows that produced each new token; far cheaper for long prompts). "
                        "Default: all for the demo model, generated with --model")
    p.add_argument("--vision-layers", default="-1",
                   help="SigLIP layers to keep (e.g. '-1', '0,13', 'all', 'none'); default the last one")
    p.add_argument("--max-plot-tokens", type=int, default=16, help="generated tokens shown in the heatmap grid")
    p.add_argument("--out", default="attention_out", help="output folder (default ./attention_out)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (checkpoint's)")
    p.add_argument("--sampling", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    from minicpmv_attn import CaptureError
    from minicpmv_attn import plotting as pl
    from minicpmv_attn.attention_record import atomic_write_text
    from minicpmv_attn.demo import demo_image_path
    from minicpmv_attn.image_processing_minicpmv import load_image
    from minicpmv_attn.pipeline import DEFAULT_PROMPT, capture_chat, load_model_and_processor, parse_index_list

    try:
        layers = parse_index_list(args.layers, "layers")
        heads = parse_index_list(args.heads, "heads")
        no_vision = str(args.vision_layers).lower() == "none"
        vision_layers = None if no_vision else parse_index_list(args.vision_layers, "vision-layers")
        image_path = args.image or demo_image_path()
        image = load_image(image_path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    t0 = time.time()
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    log("loading model ..." if args.model else "building the tiny demo model (random weights) ...")
    try:
        model, processor, is_demo = load_model_and_processor(args.model, args.device, args.dtype)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.rows is None:
        args.rows = "all" if is_demo else "generated"
    stages = ["llm", "resampler"]
    layer_sel = {"llm": layers}
    if not no_vision:
        stages.append("vision")
        layer_sel["vision"] = vision_layers
    spec = {"stages": stages, "rows": args.rows, "dtype": "float32", "device": "cpu", "layers": layer_sel,
            "heads": {"llm": heads} if heads is not None else None}
    prompt = args.prompt or DEFAULT_PROMPT
    try:
        # the random demo model would often stop after a token or two: make it say max_new_tokens
        answer, record = capture_chat(model, processor, image, prompt, spec, args.max_new_tokens,
                                      sampling=args.sampling, progress=not args.quiet,
                                      min_new_tokens=args.max_new_tokens if is_demo else 0)
    except CaptureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    record.meta.update(image=os.path.abspath(image_path), demo=is_demo)
    record.save(os.path.join(out, "record"))
    lay = record.layout
    n_gen = len(lay.input_ids) - lay.n_prompt
    gen_rows = list(range(lay.n_prompt - 1, lay.n_prompt - 1 + min(n_gen, args.max_plot_tokens)))
    llm_layers = record.llm_layers()
    plots = [
        ("token_heatmaps.png", "Where each generated token looked in the image (LLM attention to image tokens x "
                               "resampler attention, mean over layers and heads)",
         lambda p: pl.plot_token_heatmaps(record, p, image=image, positions=gen_rows)),
        ("head_image_share.png", "Share of attention on image tokens per layer and head (generated rows)",
         lambda p: pl.plot_head_image_share(record, p, rows="generated")),
        ("role_shares.png", "Text vs image vs special attention share per layer (generated rows)",
         lambda p: pl.plot_role_shares(record, p, rows="generated")),
        ("resampler_queries.png", "Resampler query maps over the overview slice",
         lambda p: pl.plot_resampler_queries(record, p, image=image, slice=0)),
    ]
    if not no_vision:
        plots.append(("vision_received.png", "SigLIP: attention each patch receives (last captured layer), "
                                              "overview and grid slices",
                      lambda p: pl.plot_vision_received(record, p, image=image)))
    if args.rows == "all":
        plots.insert(2, (f"attention_matrix_layer{llm_layers[-1]}.png",
                         f"LLM attention matrix, layer {llm_layers[-1]}, mean over heads, with token roles",
                         lambda p: pl.plot_attention_matrix(record, p, layer=llm_layers[-1])))
    written = []
    for name, caption, fn in tqdm(plots, desc="plotting", disable=args.quiet, leave=False):
        written.append((fn(os.path.join(out, name)), caption))
    page = render_index(prompt, answer, image_path, written, is_demo, args.model, record)
    atomic_write_text(os.path.join(out, "index.html"), page)
    print(f"answer: {answer!r}")
    print(f"wrote {len(written)} plots, record.safetensors/json and index.html to {out} "
          f"({time.time() - t0:.1f} s)")
    return 0


def render_index(prompt, answer, image_path, plots, is_demo, model_name, record) -> str:
    esc = html.escape
    note = ("<p class=warn><b>Demo model with random weights:</b> these maps show the pipeline "
            "(tokens &rarr; slices &rarr; patches &rarr; pixels), not meaning. Pass <code>--model</code> "
            "with a real MiniCPM-V-2.6 checkpoint for meaningful maps.</p>" if is_demo else "")
    items = "\n".join(f"<figure><img src='{esc(os.path.basename(p))}' alt='{esc(c)}'><figcaption>{esc(c)}"
                      f"</figcaption></figure>" for p, c in plots)
    names = ", ".join(record.names())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>minicpmv-attn: attention maps</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
img{{max-width:100%;border:1px solid #ddd}} figure{{margin:2em 0}} .warn{{background:#fff3cd;padding:.6em}}
code{{background:#f4f4f4;padding:0 .2em}}</style></head><body>
<h1>Attention maps</h1>{note}
<p><b>Model:</b> {esc(model_name or 'tiny demo (seeded, random weights)')}<br>
<b>Image:</b> {esc(image_path)}<br><b>Prompt:</b> {esc(prompt)}<br><b>Answer:</b> {esc(answer)}</p>
<p>Record: <code>record.safetensors</code> + <code>record.json</code> (load with
<code>minicpmv_attn.AttentionRecord.load('record')</code>); captured: {esc(names)}</p>
{items}
</body></html>
"""


if __name__ == "__main__":
    sys.exit(main())
