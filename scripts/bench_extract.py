#!/usr/bin/env python
"""Benchmark data-parallel extraction: samples/s of scripts/extract_attention.py with 1 and 2
(or --procs ...) processes under torchrun, printed side by side.

Each process count extracts the same N lines (default 32, the tiny demo model, default spec,
--no-summary) into a fresh temporary folder. "samples/s" is the run's own rate (the extraction
loop, model loading excluded); "wall s" is the whole torchrun command (start-up, loading and
rendezvous included). On a CPU give each process its own cores (--threads sets OMP_NUM_THREADS
per process): 2 processes on 2 cores with 1 thread each is the fair comparison.

Example:
  python scripts/bench_extract.py --lines 32 --procs 1 2

Exit status: 0 done, 1 a run failed, 2 bad usage.
"""
import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="bench_extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=32, help="lines to extract per run (default 32)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process (default 1)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the tiny demo)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.lines < 1 or args.threads < 1 or any(p < 1 for p in args.procs) or args.max_new_tokens < 1:
        print("error: --lines, --procs, --threads and --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    from minicpmv_attn.bench.extract_bench import bench_extract, format_table

    try:
        rows = bench_extract(args.lines, args.procs, args.max_new_tokens, args.model, threads=args.threads)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(rows))
    for r in rows:
        print(f"command ({r.procs}): {r.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
