"""Benchmark attention capture: the fork vs SDPA vs stock eager, on MiniCPM-V-2.6's shapes.

One run measures, per prompt length, a batch-1 prefill (random ``inputs_embeds``,
``torch.no_grad``, ``use_cache=False``, ``logits_to_keep=1``) of:

====================  ======================================================================
``sdpa_ref``          transformers' stock ``Qwen2ForCausalLM``, ``attn_implementation="sdpa"``
                      (the SDPA reference every ratio is taken against)
``fork_off``          the fork's ``Qwen2ForCausalLM``, ``output_attentions=False``
``stock_eager``       stock ``Qwen2ForCausalLM``, ``attn_implementation="eager"``,
                      ``output_attentions=True`` (the stock way to get attention weights)
``fork_last``         (a) ``{"stages": ["llm"], "rows": "last"}``
``fork_mean``         (b) ``{"stages": ["llm"], "reduce": "mean"}``
``fork_full_cpu``     (c) ``{"stages": ["llm"], "device": "cpu"}``
====================  ======================================================================

The fork and the stock model share one random state dict (identical keys). It also times
the SigLIP vision tower, upstream-style eager vs the fork's SDPA, on 10 slices of 32x32
patches. On CUDA the true shapes are used in bfloat16 (Qwen2-7B-shaped LLM, SigLIP-so400m);
on the CPU a scaled-down float32 model (``CPU_LLM``/``CPU_VISION`` in ``minicpmv_attn.bench.tasks``).

Time is the median of the timed calls (after a warmup call); the rows of one length run
round-robin in one process, so load changes on a shared machine hit all of them alike.
Memory is the peak above the state before the call (weights and inputs already there): on
CUDA ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call; on the
CPU each (row, length) also runs in a fresh worker subprocess that resets its peak RSS
(VmHWM via ``/proc/self/clear_refs``) after setup and reports the peak of its call; the parent
also records that child's ``ru_maxrss`` minus a no-op child's (same setup, no forward).
A capture whose estimate cannot fit is refused by the fork (``CaptureTooLarge``, before
allocating) and shown as "refused (needs X GiB)"; stock eager running out of memory as "OOM".

Examples::

    python scripts/bench_capture.py --device cuda                 # the H100 run (~5-8 min)
    python scripts/bench_capture.py --device cpu --json cpu.json  # scaled model, a few minutes
    python scripts/bench_capture.py --quick                       # fewer lengths, 1 repeat

Exit status: 0 done (FAIL verdicts are results, not errors; see --strict), 1 with
--strict and a FAIL, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

# what the help names, kept here so that --help answers without importing torch or the package
# (the library's values; tests/test_cli_help.py holds them equal): minicpmv_attn.bench.report.TARGETS,
# minicpmv_attn.bench.tasks' rows (name, label) and lengths, minicpmv_attn.capture.DTYPES' names
TARGETS = {
    "off": "capture off (fork_off) within 2% of SDPA time at every length",
    "a": "(a) last-token rows: <= 1.10x SDPA time at every length to 16k; extra memory < 5% of stock eager's at 4k",
    "b": "(b) head-mean maps: runs at 8k and 16k; <= 2x SDPA time at 8k",
    "c": "(c) full maps to CPU: at 4k no slower than stock eager; GPU peak <= SDPA's + one chunk (workspace)",
}
ROWS = [("sdpa_ref", "stock Qwen2 SDPA (reference)"), ("fork_off", "fork, capture off"),
        ("stock_eager", "stock eager + output_attentions"), ("fork_last", "fork (a) last-token rows"),
        ("fork_mean", "fork (b) head-mean maps"), ("fork_full_cpu", "fork (c) full maps -> CPU"),
        ("vision_eager", "SigLIP upstream-style eager"), ("vision_sdpa", "SigLIP fork SDPA")]
GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384)
CPU_LENGTHS = (256, 512, 1024, 2048)
QUICK_GPU_LENGTHS = (1024, 4096)
QUICK_CPU_LENGTHS = (256, 1024)
DTYPE_NAMES = ["bf16", "bfloat16", "float16", "float32", "float64", "fp16", "fp32"]

# the golden copy of MiniCPM-V-2.6's config.json next to the repository (--config's default when present)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "golden" / "MiniCPM-V-2_6.config.json"


def _json_arg(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    intro = textwrap.fill(
        "Benchmark the fork's attention capture against SDPA and stock eager attention on MiniCPM-V-2.6's Qwen2 "
        "LLM (true shapes with random bf16 weights on CUDA; a scaled-down float32 model on the CPU), and the "
        "SigLIP vision tower eager vs SDPA. Prints time, peak extra memory, the ratios to SDPA and "
        "PASS/FAIL/n.a. against the targets:", 100)
    rows = "\n".join(f"  {name:<14} {label}" for name, label in ROWS)
    p = argparse.ArgumentParser(
        prog="bench_capture",
        description=intro + "\n  " + "\n  ".join(TARGETS.values()) + "\n\nrows:\n" + rows,
        epilog=("examples:\n"
                "  python scripts/bench_capture.py --device cuda                 # H100, true shapes (~5-8 min)\n"
                "  python scripts/bench_capture.py --device cpu --json cpu.json  # scaled model, a few minutes\n"
                "  python scripts/bench_capture.py --quick --skip-stock          # 2 lengths, 1 repeat\n\n"
                "exit status: 0 done (FAIL verdicts are results), 1 a FAIL with --strict, 2 usage error."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--lengths", default=None,
                   help=f"prompt lengths, e.g. 1k,2k (default: cuda {','.join(map(str, GPU_LENGTHS))}; "
                        f"cpu {','.join(map(str, CPU_LENGTHS))})")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per row after the warmup, median reported (default: 5; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warmup calls per row (default: 1)")
    p.add_argument("--rows", default=None,
                   help="comma-separated subset of rows (sdpa_ref is always run: it is the reference)")
    p.add_argument("--skip-stock", action="store_true", help="skip the stock eager row (slow, OOMs from 8k on H100)")
    p.add_argument("--no-vision", action="store_true", help="skip the vision-tower rows")
    p.add_argument("--quick", action="store_true",
                   help=f"fewer lengths (cuda {QUICK_GPU_LENGTHS}, cpu {QUICK_CPU_LENGTHS}) and 1 repeat")
    p.add_argument("--json", metavar="OUT", default=None, help="also write machine-readable results to OUT")
    p.add_argument("--config", metavar="FILE", default=str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None,
                   help="model config.json (default: shared/golden/MiniCPM-V-2_6.config.json, else built-in)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="weights/compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--llm-overrides", type=_json_arg, default={}, metavar="JSON",
                   help='override LLM config fields, e.g. \'{"num_hidden_layers": 2}\'')
    p.add_argument("--vision-overrides", type=_json_arg, default={}, metavar="JSON",
                   help="override SigLIP config fields")
    p.add_argument("--vision-slices", type=int, default=10, help="image slices for the vision rows (default: 10)")
    p.add_argument("--vision-grid", type=int, default=32, help="patches per side of a slice (default: 32)")
    p.add_argument("--target-scale", type=int, default=None,
                   help="the target lengths 4k/8k/16k are divided by this (default: 1 cuda, 4 cpu)")
    p.add_argument("--max-row-seconds", type=float, default=60.0,
                   help="fewer repeats for rows whose first call is slow (default: 60 s of timed repeats)")
    p.add_argument("--host-fraction", type=float, default=0.8,
                   help="skip a CPU-target capture whose host peak (~2x the capture) exceeds this fraction of "
                        "the free host memory (default: 0.8)")
    p.add_argument("--capture-max-bytes", type=int, default=None,
                   help="pass max_bytes to the fork's capture specs (exercises refusal)")
    p.add_argument("--in-process", action="store_true",
                   help="cpu: no worker subprocesses, memory measured in this process too (faster; memory "
                        "figures approximate)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, also in the workers (default: 1 on cpu, where timings on a small or "
                        "shared machine are far steadier single-threaded; torch's default on cuda)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default: 0)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any target verdict is FAIL")
    p.add_argument("--worker", metavar="TASK", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # before any heavy import: --help and usage errors answer at once
    from minicpmv_attn.bench import runner
    from minicpmv_attn.bench.tasks import worker_main

    if args.worker is not None:  # one CPU measurement (see minicpmv_attn.bench.worker)
        return worker_main(json.loads(args.worker))
    try:
        settings = runner.resolve(args)
    except ValueError as e:
        parser.error(str(e))
    command = "python scripts/bench_capture.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return runner.run_bench(settings, command)


if __name__ == "__main__":
    sys.exit(main())
