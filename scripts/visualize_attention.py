#!/usr/bin/env python
"""Chat with MiniCPM-V-2.6 about an image and plot where its attention went.

With no arguments it runs the embedded default: a tiny MiniCPM-V-2.6 shipped in the
package, trained on coloured-shape scenes (nothing downloaded), asked about a generated
binding scene whose answer is known ("What shape is the red object?" at --seed 1; every object is
coloured, so the question says which one matters): the page shows the known answer next to the
model's, and the answer row's map beside the map of the row before the question. --model random-demo is the seeded
random-weight demo; use --model with a real checkpoint folder (or a hub id, when online)
and --image for your own pictures.

Writes to --out (default ./attention_out): PNG plots, the attention record
(record.safetensors + record.json) and index.html: an interactive viewer in one
self-contained offline file (click a generated token to see its heatmap over the
image; pick the map kind, layer and head; slice boxes; attention shares).

  view RECORD [--image IMG] [--out DIR]   write the viewer of a saved record
                                          (see: visualize_attention.py view --help)

Budget: memory and time beyond the model and its capture (which refuses what does not
fit) do not grow with the image. The image is decoded once at full size (at most
178,956,970 pixels) and refused before the model loads if preparing it needs more
than 2 GiB (about 12 bytes per pixel for 8-bit RGB, 32 for 16-bit); an image so narrow
or wide that one slice would get more than 4x the patches of a square image is
refused. Plots draw downsampled copies only: at most 1024 px on the long side (8 Mpx
per figure in all), panels at most 4:1 (more extreme images are drawn stretched), and
every PNG is at most 4096 px a side and 8 Mpx. The viewer embeds at most 16 MiB of
map data (uint8) and 1024 tokens; (layer, head) maps beyond that are left out, with
a note in the page.
"""
import argparse
import os
import sys


VIEW_DOC = """Write the interactive attention viewer (one self-contained offline index.html) of a
saved attention record (record.safetensors + record.json, e.g. from the main command or
minicpmv-attn-extract).

Budget: the page embeds at most 16 MiB of map data (uint8) and 1024 tokens; LLM
(layer, head) maps beyond that are left out, with a note in the page.
"""


def build_view_parser():
    p = argparse.ArgumentParser(prog="minicpmv-attn-visualize view", description=VIEW_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("record", help="the record: its stem, or its .json or .safetensors file")
    p.add_argument("--image", default=None,
                   help="the image the record was captured on (default: none, the maps are drawn on grey; the "
                        "path a record names is never opened, so a record from elsewhere cannot embed a local file)")
    p.add_argument("--out", default="attention_view", help="output folder for index.html (default ./attention_view)")
    p.add_argument("--layers", default=None, help="LLM layers to offer: '0,3', '2:6', 'all' (default all captured)")
    p.add_argument("--max-tokens", type=int, default=None, help="show only the first N generated tokens")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def view_main(argv) -> int:
    args = build_view_parser().parse_args(argv)
    from minicpmv_attn.analysis.pipeline import ToolError
    from minicpmv_attn.analysis.viewer import view_record

    try:
        path, v = view_record(args.record, args.image, args.out, max_tokens=args.max_tokens, layers=args.layers,
                              progress=not args.quiet)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in v.notes:
        print(f"note: {note}")
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, {len(v.data['tokens'])} tokens, "
          f"{v.seconds:.1f} s)")
    return 0


# what --help shows, without importing torch (the library's values: analysis.visualize.DEFAULTS, RANDOM_DEMO,
# pipeline.DEFAULT_PROMPT and demo.scenes.default_example(0); tests/test_cli_help.py holds them equal)
RANDOM_DEMO = "random-demo"
DEFAULT_PROMPT = "Describe this image."
SCENE_QUESTION = "What shape is the red object?"  # default_example(1, trained_demo_task())'s question
DEFAULTS = {"max_new_tokens": 8, "max_plot_tokens": 16, "out": "attention_out", "device": "auto", "seed": 1}


def build_parser():
    D = DEFAULTS
    p = argparse.ArgumentParser(
        prog="minicpmv-attn-visualize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the shipped tiny demo model "
                   f"trained on coloured shapes; '{RANDOM_DEMO}': the seeded random-weight demo)")
    p.add_argument("--image", default=None,
                   help="image file (default: a generated coloured-shape scene with the trained demo, whose answer "
                        "is known; matplotlib's grace_hopper.jpg otherwise)")
    p.add_argument("--prompt", default=None,
                   help="question about the image, plain text (not empty; no <image>, </image>, <slice> or </slice> "
                        f"markers: the image is put in by the tool). Default: the generated scene's question "
                        f"({SCENE_QUESTION!r} at --seed 1; the scene follows --seed), else {DEFAULT_PROMPT!r}")
    p.add_argument("--max-new-tokens", type=int, default=D["max_new_tokens"],
                   help=f"tokens to generate (default {D['max_new_tokens']})")
    p.add_argument("--layers", default=None, help="LLM layers to capture: '0,3', '2:6', 'all' (default all)")
    p.add_argument("--heads", default=None, help="LLM heads to capture (default all)")
    p.add_argument("--rows", choices=["all", "generated"], default=None,
                   help="LLM query rows to keep: 'all' (full matrix, needed for the matrix plot) or "
                        "'generated' (the rows that produced each new token; far cheaper for long prompts). "
                        "Default: all for the demo model, generated with --model")
    p.add_argument("--vision-layers", default=None,
                   help="SigLIP layers to keep (e.g. '-1', '0,13', 'all', 'none'); default: all for the demo models "
                        "(the viewer's 'through SigLIP' maps need every layer), the last one (-1) with --model")
    p.add_argument("--max-plot-tokens", type=int, default=D["max_plot_tokens"],
                   help=f"generated tokens shown in the heatmap grid (1 to 128, default {D['max_plot_tokens']})")
    p.add_argument("--out", default=D["out"], help=f"output folder (default ./{D['out']})")
    p.add_argument("--device", default=D["device"],
                   help="auto (default: CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 | float16 | auto (the checkpoint's); default: bfloat16 on CUDA, else auto")
    p.add_argument("--sampling", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=D["seed"],
                   help=f"random seed of the generated scene and of sampling (default {D['seed']})")
    p.add_argument("--relevancy", action="store_true",
                   help="also compute gradient relevancy maps (one more forward, one backward per token; first "
                        "--max-plot-tokens tokens) and offer them in the viewer")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["view"]:
        return view_main(argv[1:])
    args = build_parser().parse_args(argv)
    from minicpmv_attn.analysis.pipeline import ToolError
    from minicpmv_attn.analysis.visualize import visualize

    try:
        done = visualize(model=args.model, image=args.image, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                         layers=args.layers, heads=args.heads, rows=args.rows, vision_layers=args.vision_layers,
                         max_plot_tokens=args.max_plot_tokens, out=args.out, device=args.device, dtype=args.dtype,
                         sampling=args.sampling, seed=args.seed, quiet=args.quiet, relevancy=args.relevancy)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"answer: {done.answer!r}")
    print(f"wrote {len(done.plots)} plots, record.safetensors/json and index.html to {done.out} "
          f"({done.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
