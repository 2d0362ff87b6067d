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
import json
import os
import sys
import time


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


def read_jobs(path):
    """Yield (line_no, job dict or None, error or None) for each non-empty line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                job = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, None, f"line {n}: not valid JSON ({e.msg})"
                continue
            if not isinstance(job, dict) or not isinstance(job.get("image"), str) or not isinstance(
                    job.get("prompt"), str):
                yield n, None, f"line {n}: expected an object with string fields 'image' and 'prompt'"
                continue
            yield n, job, None


def finished_lines(results_path):
    """Line numbers already extracted (status ok) according to results.jsonl; bad lines are retried."""
    done = {}
    if not os.path.isfile(results_path):
        return done
    with open(results_path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
            if row.get("status") == "ok":
                done[int(row["line"])] = row
    return done


def append_result(path, row):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def safe_id(job, line_no):
    raw = str(job.get("id") or f"line{line_no:06d}")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)[:120]


def load_spec(args):
    spec = {"rows": "generated", "device": "cpu", "dtype": "float32"}
    if args.spec:
        text = args.spec
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        spec.update(json.loads(text))
    from minicpmv_attn.pipeline import parse_index_list

    if args.layers:
        spec["layers"] = {"llm": parse_index_list(args.layers, "layers")}
    if args.heads:
        spec["heads"] = {"llm": parse_index_list(args.heads, "heads")}
    if args.rows:
        spec["rows"] = args.rows
    if args.reduce:
        spec["reduce"] = args.reduce
    from minicpmv_attn import CaptureSpec

    CaptureSpec.from_flag(spec)  # validate before any work
    return spec


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm.auto import tqdm

    from minicpmv_attn import CaptureError
    from minicpmv_attn.image_processing_minicpmv import load_image
    from minicpmv_attn.pipeline import capture_chat, load_model_and_processor

    if not os.path.isfile(args.jsonl):
        print(f"error: input file {args.jsonl} does not exist", file=sys.stderr)
        return 2
    try:
        spec = load_spec(args)
    except (ValueError, OSError) as e:
        print(f"error: --spec: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(args.out, "records"), exist_ok=True)
    results = os.path.join(args.out, "results.jsonl")
    done = finished_lines(results)
    jobs = list(read_jobs(args.jsonl))
    todo = [j for j in jobs if j[0] not in done]
    base = os.path.dirname(os.path.abspath(args.jsonl))
    counts = {"ok": 0, "error": 0, "skipped (already done)": len(jobs) - len(todo)}
    model = processor = None
    t0 = time.time()
    for line_no, job, error in tqdm(todo, desc="extracting", unit="line", disable=args.quiet):
        row = {"line": line_no}
        if error is None:
            try:
                if model is None:
                    model, processor, _ = load_model_and_processor(args.model, args.device, args.dtype)
                path = job["image"] if os.path.isabs(job["image"]) else os.path.join(base, job["image"])
                image = load_image(path)
                answer, record = capture_chat(model, processor, image, job["prompt"], spec, args.max_new_tokens,
                                              progress=False)
                record.meta.update(image=path, line=line_no, id=job.get("id"))
                stem = os.path.join(args.out, "records", safe_id(job, line_no))
                record.save(stem)
                row.update(status="ok", id=job.get("id"), answer=answer, record=os.path.relpath(stem, args.out))
            except (CaptureError, ValueError, OSError) as e:
                error = f"line {line_no}: {e}"
        if error is not None:
            row.update(status="error", error=error)
            tqdm.write(f"skipped {error}", file=sys.stderr)
        append_result(results, row)
        counts[row["status"]] += 1
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    print(f"{len(jobs)} lines: {summary} in {time.time() - t0:.1f} s; results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
