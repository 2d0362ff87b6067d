"""Diff the fork against upstream MiniCPM-V-2.6 (and the installed transformers' attention code).

Examples::

    python scripts/diff_upstream.py --upstream ~/.cache/huggingface/hub/models--openbmb--MiniCPM-V-2_6/snapshots/<rev>
    python scripts/diff_upstream.py --revision main --numeric
    python scripts/diff_upstream.py --upstream DIR --numeric --upstream-python ~/venv-tf440/bin/python
    python scripts/diff_upstream.py --upstream DIR --write-pin patches/UPSTREAM.json   # re-pin after review
    python scripts/diff_upstream.py --transformers-only          # the installed transformers vs its snapshot
    python scripts/diff_upstream.py --transformers-only --write-pin patches/UPSTREAM.json  # add its snapshot

The structural and numeric checks execute the upstream folder's Python code (only run it on a
copy you trust). The pin defaults to the one installed with the package
(``minicpmv_attn.patches``); the diffs, report.json and summary.txt go to
``patches/generated/`` of the checkout this script is in (git-ignored), or
``./upstream_diff_out`` when the script is not in a checkout.

Exit status: 0 nothing needs attention, 1 something does (rows marked ``!!`` in the
summary table), 2 bad usage or the upstream copy could not be obtained.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

# the library is imported in main(), so that --help answers without loading torch
UPSTREAM_REPO_ID = "openbmb/MiniCPM-V-2_6"  # upstream.pin.UPSTREAM_REPO_ID (tests/test_cli_help.py holds them equal)


def default_out_dir() -> Path:
    """``patches/generated/`` of the checkout this script is in; ``./upstream_diff_out`` otherwise."""
    repo = Path(__file__).resolve().parents[1]
    return repo / "patches" / "generated" if (repo / "setup.py").is_file() else Path.cwd() / "upstream_diff_out"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minicpmv-attn-diff-upstream",
        description=(
            "Compare the fork (minicpmv_attn) with an upstream copy of openbmb/MiniCPM-V-2_6's remote code: "
            "(1) which upstream files match the pin (UPSTREAM.json), changed since, or are missing; "
            "(2) unified diffs fork vs upstream per file; (3) symbol inventories (classes, functions, "
            "methods, signatures, bodies): a fork difference no pin entry documents needs attention, and so "
            "does every upstream symbol changed since the pin (named by file and symbol); (4) structural "
            "parity: both MiniCPMV classes built on the meta device, state-dict keys/shapes/dtypes and config "
            "fields (defaults and config.json) compared; (5) with --numeric, both models on the same random "
            "weights and inputs: logits, LLM / vision / resampler attention and a greedy generation. "
            "WARNING: (4) and (5) EXECUTE THE UPSTREAM FOLDER'S CODE (imported and run, in this interpreter "
            "with run-time shims for upstream's known breakages, or in --upstream-python's). Also checks the "
            "installed transformers' Qwen2/SigLIP/SDPA attention code and the generation interface the fork "
            "plugs into against the pinned snapshot of the same release; a release without a snapshot is not "
            "verified and needs attention. A check that could not run is an error row, never a missing one."),
        epilog="Exit status: 0 clean, 1 needs attention, 2 usage error or upstream unavailable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--upstream", metavar="DIR", type=Path,
                     help="a folder with upstream's files, e.g. a Hugging Face snapshot folder (its Python code "
                          "is executed by the structural and numeric checks)")
    src.add_argument("--revision", metavar="REV",
                     help="download upstream at this revision with huggingface_hub (needs network)")
    p.add_argument("--repo-id", default=UPSTREAM_REPO_ID, help="upstream Hub repository for --revision")
    p.add_argument("--out", metavar="DIR", type=Path, default=default_out_dir(),
                   help="where diffs, report.json and summary.txt go")
    p.add_argument("--pin", metavar="FILE", type=Path, default=None,
                   help="the pin to compare with (default: UPSTREAM.json installed with minicpmv_attn.patches)")
    p.add_argument("--fork", metavar="DIR", type=Path, default=None,
                   help="the fork's package folder (default: the installed minicpmv_attn)")
    p.add_argument("--config", metavar="FILE", type=Path, default=None,
                   help="config.json for the parity checks (default: the upstream copy's, else class defaults)")
    p.add_argument("--numeric", action="store_true",
                   help="also run both models on the same random weights and inputs and compare logits, the "
                        "three attention families and a greedy generation")
    p.add_argument("--atol", type=float, default=1e-4, help="logit and attention tolerance for --numeric")
    p.add_argument("--seed", type=int, default=0, help="seed for --numeric weights and inputs")
    p.add_argument("--upstream-python", metavar="PY", type=Path, default=None,
                   help="run upstream's side of (4) and (5) in this Python (one with upstream's transformers, "
                        "e.g. 4.40.0, plus torch and safetensors) in a subprocess, exchanging tensors as "
                        "safetensors files; default: this interpreter, with shims for upstream's known breakages "
                        "(torchvision import, transformers.modeling_attn_mask_utils, List, "
                        "all_tied_weights_keys, _initialize_weights)")
    p.add_argument("--fork-attn", default=None, metavar="IMPL",
                   help="attn_implementation of the fork for --numeric (default: the fork's default)")
    p.add_argument("--no-structural", action="store_true", help="skip the meta-device parity check")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers attention-code check")
    p.add_argument("--transformers-only", action="store_true",
                   help="only check the installed transformers against its pinned snapshot (no upstream copy "
                        "needed); with --write-pin, add the installed release's snapshot to the pin")
    p.add_argument("--write-pin", metavar="FILE", type=Path, default=None,
                   help="after review: write a pin for this upstream copy and the installed transformers to FILE "
                        "(keeps the change notes of --pin) and exit")
    p.add_argument("--full", action="store_true", help="print every row (not the informational counts), uncut")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from minicpmv_attn.upstream.common import log_quiet, log_stderr
    from minicpmv_attn.upstream.diff import check_installed_transformers, run_diff
    from minicpmv_attn.upstream.pin import (PinError, UpstreamUnavailable, add_transformers_snapshot,
                                            obtain_upstream, regular_file_problem, write_pin)
    from minicpmv_attn.upstream.report import format_table, needs_attention, summarize

    log = log_quiet if args.quiet else log_stderr
    if not args.transformers_only and args.upstream is None and args.revision is None:
        parser.error("one of --upstream, --revision or --transformers-only is required")
    for flag, path in (("--pin", args.pin), ("--config", args.config)):
        problem = regular_file_problem(path) if path is not None else None
        if problem:  # never a FIFO (blocks) or a device (endless): one line before anything runs
            print(f"error: {flag} {path}: {problem}", file=sys.stderr)
            return 2
    try:
        if args.transformers_only and args.write_pin is not None:
            pin = add_transformers_snapshot(args.write_pin, base_pin_path=args.pin)
            log(f"wrote {args.write_pin}: transformers snapshots {', '.join(pin['transformers']['snapshots'])}")
            return 0
        if args.transformers_only:
            findings = check_installed_transformers(args.pin, fork=args.fork, log=log)
        else:
            if args.revision is not None:
                log(f"downloading {args.repo_id}@{args.revision} ...")
            upstream = obtain_upstream(args.upstream, args.revision, repo_id=args.repo_id)
            if args.write_pin is not None:
                pin = write_pin(upstream, args.write_pin, base_pin_path=args.pin,
                                repo_id=args.repo_id if args.revision else None, revision=args.revision)
                log(f"wrote {args.write_pin} ({len(pin['upstream']['files'])} upstream files, transformers "
                    f"snapshots {', '.join(pin['transformers']['snapshots'])})")
                return 0
            findings, _ = run_diff(
                upstream, args.out, pin_path=args.pin, fork=args.fork, numeric=args.numeric,
                structural=not args.no_structural, check_transformers=not args.no_transformers,
                config_path=args.config, atol=args.atol, seed=args.seed, fork_attn=args.fork_attn,
                upstream_python=args.upstream_python, log=log)
    except UpstreamUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PinError as e:
        print(f"error: cannot read the pin: {e}", file=sys.stderr)
        return 2
    print(format_table(findings, width=None) if args.full else format_table(summarize(findings)))
    if not args.transformers_only:
        print(f"\ndiffs and report.json in {args.out}")
    return 1 if needs_attention(findings) else 0


if __name__ == "__main__":
    sys.exit(main())
