#!/usr/bin/env python
"""Extract attention records for a JSONL of (image, prompt) pairs.

Each input line is a JSON object: {"image": "path.jpg", "prompt": "...", "id": "optional-name"}
(relative image paths are resolved against the JSONL's folder). For every line the
model answers and one attention record is written to OUT/records/<id>.safetensors +
.json (atomically), and a line is appended to OUT/results.jsonl. Re-running with the
same OUT resumes: finished lines are skipped, nothing is redone or lost. A bad line
(unreadable JSON, missing image, corrupt image, ...) is reported and skipped; it
never stops the run. A summary is printed at the end.
"""
import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="minicpmv-attn-extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", help="input JSONL with one {image, prompt[, id]} object per line")
    p.add_argument("--out", required=True, help="output folder (records/ and results.jsonl)")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: tiny demo, random weights)")
    p.add_argument("--spec", default=None,
                   help="capture spec as JSON (or @file.json), e.g. '{\"rows\": \"generated\", \"reduce\": \"mean\"}'")
    p.add_argument("--layers", default=None, help="LLM layers, e.g. '0,3' or '20:28' (overrides the spec)")
    p.add_argument("--heads", default=None, help="LLM heads (overrides the spec)")
    p.add_argument("--rows", default=None, help="LLM rows: generated | last | all (default generated)")
    p.add_argument("--reduce", default=None, choices=["none", "mean", "max"], help="head reduction")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from minicpmv_attn.analysis.extract import extract
    from minicpmv_attn.analysis.pipeline import ToolError

    try:
        done = extract(args.jsonl, args.out, model=args.model, spec=args.spec, layers=args.layers, heads=args.heads,
                       rows=args.rows, reduce=args.reduce, max_new_tokens=args.max_new_tokens, device=args.device,
                       dtype=args.dtype, quiet=args.quiet)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(done.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
