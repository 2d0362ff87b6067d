#!/usr/bin/env python
"""Extract attention records for a JSONL of (image, prompt) pairs.

Each input line is a JSON object: {"image": "path.jpg", "prompt": "...", "id": "optional-name"}
(relative image paths are resolved against the JSONL's folder; "id" is a string or an integer).

What it promises:
  records   For every line the model answers and one attention record is written atomically to
            OUT/records/<name>.safetensors + .json, <name> being the sanitised id (or the image's
            file name) plus 12 hex digits of the line's key, the SHA-256 of its normalised job
            (absolute image path, prompt, id): different jobs never overwrite each other. One
            row per attempt is appended to OUT/results.jsonl with the input file, the line
            number, the key, the status and the record (or the error).
  resume    Re-running with the same OUT skips every line whose key already has a record,
            whatever its line number or input file: edited lines are redone, lines of another
            JSONL are added next to the others. The settings (model, spec, dtype, max new tokens)
            are kept in OUT/extract.json; once OUT holds records, other settings are refused.
            An exact repeat of a line (same image, prompt and id) is an error for that line.
  one run   A run holds an exclusive lock on OUT/extract.lock; a second run on the same OUT
            is refused with one line (exit status 2).
  crashes   A run killed at any point (even kill -9) resumes exactly: rows are appended with
            one write and an fsync, a row cut short is repaired or dropped with a warning,
            stale .tmp-* files of interrupted writes in OUT are removed on the next run.
  bad lines A bad line (not UTF-8 or JSON, a missing or wrongly typed field, text that is not
            valid Unicode, an image that is missing, not a regular file, over --max-image-bytes
            or corrupt, a refused capture, ...) is reported on one line naming the file, line
            and field, recorded as an error, and the run goes on with the next line.
  config    Configuration errors (input file, --out, --model, --device, --dtype, --spec and the
            selections, also checked against the model's layers and heads) stop the run before
            the first line with one line on stderr and exit status 2.

  defaults  Sized for the real model: LLM + resampler attention, mean over heads, the rows of
            the generated tokens, bfloat16 (about 1.9 MiB a sample at MiniCPM-V-2.6's shapes; every
            stage, layer and head in float32 would be about 18 GiB). --vision adds SigLIP.
  disk      Before the first line the per-sample and total disk estimate of the chosen spec
            and model is printed (a sample of lines is tokenised and sliced, nothing is run);
            over --max-disk (e.g. 50GB) the run is refused before any model work.
  parallel  Data parallel under torchrun or accelerate launch (RANK, WORLD_SIZE, LOCAL_RANK):
              torchrun --nproc_per_node N scripts/extract_attention.py JOBS --out DIR
            Each line goes to exactly one process (its content key mod the world size); each
            appends to OUT/results.rank<r>.jsonl and writes its records; rank 0 holds the lock
            and merges them into OUT/results.jsonl (atomically) once all are done. Resume is by
            content across all files, whatever the number of processes before.
  summary   At the end OUT/summary.parquet (OUT/summary.csv without pyarrow: one row per record:
            id, the line's other fields such as label, answer, token counts, img_share_L<nn>
            per layer, text/special shares, entropy, sink share, top image region) and
            OUT/report.html (one offline file: per-layer distributions, groups by --group-by,
            outliers, mean heatmaps). Rebuild both without the model:
              extract_attention.py report OUT [--group-by label]

Exit status: 0 every line succeeded or was already done; 1 some lines failed (0 with
--keep-going); 2 the run did not start or stopped (configuration, lock, results.jsonl not
writable). The summary says how many lines succeeded, were skipped as done, and failed.
"""
import argparse
import os
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="minicpmv-attn-extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", help="(or 'report OUT': rebuild the summary and report of OUT without the model) "
                                 "input JSONL with one {image, prompt[, id]} object per line")
    p.add_argument("--out", required=True, help="output folder (records/, results.jsonl, extract.json, extract.lock)")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: tiny demo, random weights)")
    p.add_argument("--spec", default=None,
                   help="capture spec as a JSON object (or @file.json), "
                        "e.g. '{\"rows\": \"generated\", \"reduce\": \"mean\"}'")
    p.add_argument("--layers", default=None, help="LLM layers, e.g. '0,3' or '20:28' (overrides the spec)")
    p.add_argument("--heads", default=None, help="LLM heads (overrides the spec)")
    p.add_argument("--rows", default=None, help="LLM rows: generated | last | all (default generated)")
    p.add_argument("--reduce", default=None, help="head reduction: none | mean | max (default mean)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-image-bytes", type=int, default=None,
                   help="refuse (per line) image files larger than this (default 268435456, 256 MiB)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default=None, help="model dtype: auto (the checkpoint's) | float32 | bfloat16 | float16 "
                                                 "(default: bfloat16 on CUDA, else auto)")
    p.add_argument("--vision", action="store_true", help="also capture SigLIP (vision) attention (large)")
    p.add_argument("--max-disk", default=None,
                   help="refuse before any model work when the records would take more, e.g. 50GB or 2TiB")
    p.add_argument("--group-by", default=None, help="report: the column that splits groups (default: label if present)")
    p.add_argument("--no-summary", action="store_true", help="skip summary.parquet/csv and report.html at the end")
    p.add_argument("--keep-going", action="store_true", help="exit status 0 even when some lines failed")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no disk estimate line (errors, warnings and the summary still print)")
    return p


def build_report_parser():
    p = argparse.ArgumentParser(prog="minicpmv-attn-extract report",
                                description="Rebuild OUT/summary.parquet (or .csv) and OUT/report.html from the "
                                            "records of an extraction folder, without the model.")
    p.add_argument("out", help="the --out folder of an extraction run")
    p.add_argument("--group-by", default=None, help="the column that splits groups (default: label if present)")
    return p


def report_main(argv) -> int:
    args = build_report_parser().parse_args(argv)
    from minicpmv_attn.analysis.dataset_report import build_report
    from minicpmv_attn.analysis.pipeline import ToolError

    def warn(msg):
        print(f"warning: {msg}", file=sys.stderr)

    try:
        built = build_report(args.out, group_by=args.group_by, warn=warn, say=print,
                             quiet=False)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{built.rows} records: summary in {built.summary_path}, report in {built.report_path}")
    return 0


def _speaks() -> bool:
    """Whether this process prints: rank 0 of a launch, or any process whose RANK/WORLD_SIZE are
    not a launch's (then the error is about them, and nobody else would say it)."""
    from minicpmv_attn.analysis.pipeline import Ranks, ToolError

    try:
        return Ranks().rank == 0
    except ToolError:
        return True


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    from minicpmv_attn.analysis.extract import extract
    from minicpmv_attn.analysis.pipeline import ToolError

    limits = {} if args.max_image_bytes is None else {"max_image_bytes": args.max_image_bytes}
    try:
        done = extract(args.jsonl, args.out, model=args.model, spec=args.spec, layers=args.layers, heads=args.heads,
                       rows=args.rows, reduce=args.reduce, max_new_tokens=args.max_new_tokens, device=args.device,
                       dtype=args.dtype, quiet=args.quiet, vision=args.vision, max_disk=args.max_disk,
                       group_by=args.group_by, summary=not args.no_summary, **limits)
    except ToolError as e:
        if _speaks():  # under torchrun every rank knows; rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        return 2
    if _speaks():
        print(done.summary())
        for path in (done.summary_path, done.report_path):
            if path:
                print(f"wrote {path}")
    return done.exit_code(args.keep_going)


if __name__ == "__main__":
    sys.exit(main())
