#!/usr/bin/env python
"""Chat with MiniCPM-V-2.6 about an image and plot where its attention went.

With no arguments it runs the embedded default: a tiny MiniCPM-V with seeded RANDOM
weights (built locally, nothing downloaded), the shipped tokenizer and a real photo
bundled with matplotlib. Its maps show the pipeline, not meaning. Use --model with a
real checkpoint folder (or a hub id, when online) for meaningful maps.

Writes to --out (default ./attention_out): PNG plots, the attention record
(record.safetensors + record.json) and index.html showing everything.

Budget: memory and time beyond the model and its capture (which refuses what does not
fit) do not grow with the image. The image is decoded once at full size (at most
178,956,970 pixels) and refused before the model loads if preparing it needs more
than 2 GiB (about 12 bytes per pixel for 8-bit RGB, 32 for 16-bit); an image so narrow
or wide that one slice would get more than 4x the patches of a square image is
refused. Plots draw downsampled copies only: at most 1024 px on the long side (8 Mpx
per figure in all), panels at most 4:1 (more extreme images are drawn stretched), and
every PNG is at most 4096 px a side and 8 Mpx.
"""
import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(
        prog="minicpmv-attn-visualize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="checkpoint folder or hub id (default: the tiny seeded demo model, random weights)")
    p.add_argument("--image", default=None, help="image file (default: matplotlib's grace_hopper.jpg)")
    p.add_argument("--prompt", default=None,
                   help="question about the image, plain text (not empty; no <image>, </image>, <slice> or </slice> "
                        "markers: the image is put in by the tool). Default: 'Describe this image.'")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    p.add_argument("--layers", default=None, help="LLM layers to capture: '0,3', '2:6', 'all' (default all)")
    p.add_argument("--heads", default=None, help="LLM heads to capture (default all)")
    p.add_argument("--rows", choices=["all", "generated"], default=None,
                   help="LLM query rows to keep: 'all' (full matrix, needed for the matrix plot) or "
                        "'generated' (the rows that produced each new token; far cheaper for long prompts). "
                        "Default: all for the demo model, generated with --model")
    p.add_argument("--vision-layers", default="-1",
                   help="SigLIP layers to keep (e.g. '-1', '0,13', 'all', 'none'); default the last one")
    p.add_argument("--max-plot-tokens", type=int, default=16,
                   help="generated tokens shown in the heatmap grid (1 to 128, default 16)")
    p.add_argument("--out", default="attention_out", help="output folder (default ./attention_out)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (checkpoint's)")
    p.add_argument("--sampling", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from minicpmv_attn.analysis.pipeline import ToolError
    from minicpmv_attn.analysis.visualize import visualize

    try:
        done = visualize(model=args.model, image=args.image, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                         layers=args.layers, heads=args.heads, rows=args.rows, vision_layers=args.vision_layers,
                         max_plot_tokens=args.max_plot_tokens, out=args.out, device=args.device, dtype=args.dtype,
                         sampling=args.sampling, seed=args.seed, quiet=args.quiet)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"answer: {done.answer!r}")
    print(f"wrote {len(done.plots)} plots, record.safetensors/json and index.html to {done.out} "
          f"({done.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
