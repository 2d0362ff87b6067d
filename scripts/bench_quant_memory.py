"""Estimated GPU memory of a one-image chat with a bf16, int8 or nf4 (int4) MiniCPM-V-2.6 checkpoint.

Counts parameters of the model built on the meta device from a config (nothing is loaded)
and sizes captures with the capture's own estimate; see minicpmv_attn.bench.quant_memory.

Example::

    python scripts/bench_quant_memory.py --config ../shared/golden/MiniCPM-V-2_6.config.json

Exit status: 0 done, 2 bad usage (e.g. a missing config file).
"""
import argparse
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "golden",
                              "MiniCPM-V-2_6.config.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="a MiniCPM-V-2.6 config.json (default: ../shared/golden/MiniCPM-V-2_6.config.json)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.config):
        print(f"error: --config {args.config}: no such file", file=sys.stderr)
        return 2
    from minicpmv_attn.bench.quant_memory import format_table, memory_table

    print(format_table(memory_table(args.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
