"""Mutation pass over the capture, record, map and pointing-game code: which small wrong edits
does the test suite let through?

    python scripts/mutation_pass.py [--file capture.py ...] [--max-per-file N] [--timeout S]
                                    [--list] [--no-fork] [--out TABLE.md]

Each mutant (an operator, a constant, swapped arguments, a dropped mask or ``not`` ...) is
applied alone to its file, the tests mapped to that file run (``pytest -x -q``,
OMP_NUM_THREADS=1), and the file is restored (always, also on Ctrl-C). Prints one line per
mutant and a markdown table (file:line, mutation, killed-by test or SURVIVED). Exit code 0
when every mutant was killed, 1 when some survived or timed out, 2 on bad input.
The engine is ``modeling/bench/mutation.py``; it is loaded by path so the package under test
is only ever imported by the forked test runs, after the mutant is written.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def kills(*names):
    """Node ids of tests in tests/test_mutation_kills.py (the tests written for this pass's survivors)."""
    return [f"tests/test_mutation_kills.py::{n}" for n in names]


# file -> the functions whose logic is mutated, lines always mutated (holding a focus snippet),
# the tests that cover them (fastest first)
PLAN = {
    "modeling/capture.py": dict(
        functions=["token_roles", "CaptureSpec.layer_ids", "CaptureSpec.head_ids", "AttentionCapture.begin_llm",
                   "AttentionCapture._row_positions", "AttentionCapture._col_index", "AttentionCapture.capture",
                   "AttentionCapture.result", "_join", "pad_llm_columns", "estimate_bytes", "check_fits"],
        focus=["probs.mean(1", "probs.amax(1", "keep = pos >= P - 1"],
        tests=[*kills("test_capture_head_mean_and_max_are_the_per_head_mean_and_max",
                      "test_estimate_counts_every_stage_exactly"),
               "tests/test_golden_generate.py", "tests/test_capture.py"]),
    "modeling/attention_record.py": dict(
        functions=["TokenLayout.positions", "AttentionRecord.names", "AttentionRecord.layers",
                   "AttentionRecord.validate", "AttentionRecord.equals", "layout_for_sample",
                   "records_from_capture", "replay_capture", "chat_records"],
        focus=["rec_tensors[name] = t["],
        tests=[*kills("test_one_bad_value_among_good_ones_is_refused",
                      "test_records_with_selected_columns_load_and_too_many_columns_are_refused",
                      "test_records_of_a_batch_without_tgt_sizes"),
               "tests/test_record_validation.py", "tests/test_chat.py", "tests/test_attention_map.py"]),
    # the map code (analysis.attention_map is its public module; the code lives in maps/)
    "modeling/maps/image_geometry.py": dict(
        functions=["_patch_rc", "patch_box", "_axis_weights", "place_patch_map"], focus=[],
        tests=[*kills("test_map_argument_checks"), "tests/test_attention_map.py"]),
    "modeling/maps/rows.py": dict(
        functions=["_select_heads", "_reduce_heads", "resolve_rows", "llm_attention_rows", "rollout", "_fed_square",
                   "llm_rollout"],
        focus=["return t.mean(axis)", "return t.amax(axis)"],
        tests=[*kills("test_map_head_mean_and_max_are_the_per_head_mean_and_max", "test_map_argument_checks"),
               "tests/test_attention_map.py", "tests/test_sinks.py"]),
    "modeling/maps/shares.py": dict(
        functions=["row_role_shares", "role_shares", "find_sinks", "sink_shares"], focus=[],
        tests=[*kills("test_sink_shares_of_a_record_without_layout"), "tests/test_attention_map.py",
               "tests/test_sinks.py"]),
    "modeling/maps/heatmap.py": dict(
        functions=["place_token_weights", "image_heatmap", "compose_vision_rollout", "vision_rollout"], focus=[],
        tests=[*kills("test_map_argument_checks"), "tests/test_attention_map.py", "tests/test_sinks.py"]),
    "modeling/demo/pointing.py": dict(
        functions=["peak", "inside", "PointingResult.best", "chat_record", "play"],
        focus=["n_prompt - 1", "shares.append"],
        tests=[*kills("test_peak_refuses_a_single_nan", "test_peak_tolerance_is_relative",
                      "test_inside_includes_every_edge", "test_chat_record_refuses_a_layout_without_prompt"),
               "tests/test_pointing_game.py",
               *kills("test_pointing_scores_the_row_that_predicts_the_answer",
                      "test_chance_is_the_share_of_the_targets_own_pixels_box",
                      "test_play_rows_record_answers_and_peaks")],
        pytest_args=["--deselect", "tests/test_pointing_game.py::test_command_reports_and_refuses_bad_input"]),
}
# imported once in a probe subprocess to learn which third-party modules to preload
PROBE = ["minicpmv_attn.demo.pointing", "minicpmv_attn.analysis.attention_map", "minicpmv_attn.analysis.relevancy",
         "minicpmv_attn.demo", "safetensors.torch", "matplotlib.pyplot"]


def load_engine():
    spec = importlib.util.spec_from_file_location("_mutation_engine", REPO / "modeling" / "bench" / "mutation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", action="append", default=None,
                   help="only this file (a path of the plan or its base name; repeatable); default: all four")
    p.add_argument("--max-per-file", type=int, default=30, help="sample at most N mutants per file (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default %(default)s)")
    p.add_argument("--line", action="append", type=int, default=None, help="only mutants on these lines (repeatable)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per mutant's test run (default %(default)s)")
    p.add_argument("--list", action="store_true", help="print the selected mutants and run nothing")
    p.add_argument("--no-fork", action="store_true", help="run each mutant's tests as a fresh python subprocess")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.max_per_file < 1 or args.timeout <= 0:
        print("error: --max-per-file and --timeout must be positive", file=sys.stderr)
        return 2
    files = list(PLAN)
    if args.file:
        files = [f for f in PLAN if f in args.file or Path(f).name in args.file]
        unknown = [f for f in args.file if f not in PLAN and f not in {Path(x).name for x in PLAN}]
        if unknown:
            print(f"error: --file {unknown}: not in the plan; valid: {[Path(f).name for f in PLAN]}", file=sys.stderr)
            return 2
    eng = load_engine()
    plan = {}
    for f in files:
        source = (REPO / f).read_text(encoding="utf-8")
        every = eng.mutants_of(f, source, PLAN[f]["functions"])
        chosen = eng.pick(every, args.max_per_file, args.seed, PLAN[f].get("focus", ()), source)
        if args.line:
            chosen = [m for m in every if m.line in args.line]
        plan[f] = dict(PLAN[f], mutants=chosen)
        print(f"{f}: {len(chosen)} of {len(every)} mutants; tests: {' '.join(PLAN[f]['tests'])}", flush=True)
    if args.list:
        for f, entry in plan.items():
            for m in entry["mutants"]:
                print(f"{Path(f).name}:{m.line}  {m.what}")
        return 0
    fork = not args.no_fork
    if fork:
        n = eng.preload("minicpmv_attn", PROBE)
        print(f"preloaded {n} third-party modules; each mutant imports only minicpmv_attn", flush=True)
    baseline = {}
    for f, entry in plan.items():  # the unmutated code must pass its tests, or no verdict means anything
        key = tuple(entry["tests"])
        if key not in baseline:
            baseline[key] = eng.run_tests(entry["tests"], args.timeout * 2, fork, entry.get("pytest_args", ()))
        rc, log, late = baseline[key]
        if rc != 0:
            print(f"error: the unmutated tests of {f} do not pass (rc {rc}): {eng._failed_test(log)}", file=sys.stderr)
            return 2

    def say(o):
        res = f"killed by {o.by}" if o.verdict == "killed" else f"{o.verdict} {o.by}".strip()
        print(f"{Path(o.mutant.path).name}:{o.mutant.line:<5} {o.mutant.what[:60]:<60} {res}  ({o.seconds:.0f}s)",
              flush=True)

    try:
        outcomes = eng.run_pass(plan, REPO, args.timeout, fork, say)
    except KeyboardInterrupt:
        print("interrupted; every file was restored", file=sys.stderr)
        return 130
    text = eng.table(outcomes)
    print(text)
    survived = [o for o in outcomes if o.verdict in ("SURVIVED", "TIMEOUT")]
    print(f"{len(outcomes)} mutants: {len(outcomes) - len(survived)} killed, {len(survived)} survived or timed out")
    if args.out:
        tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(args.out)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
