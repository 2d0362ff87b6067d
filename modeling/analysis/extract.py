"""Attention records for a JSONL of (image, prompt) pairs, resumable.

What ``scripts/extract_attention.py`` runs. Each input line is a JSON object
``{"image": "path.jpg", "prompt": "...", "id": "optional-name"}`` (relative image paths
are resolved against the JSONL's folder). For every line the model answers and one
record is written to ``OUT/records/<id>.safetensors`` + ``.json`` (atomically), and a
line is appended to ``OUT/results.jsonl``. Running again with the same ``OUT`` resumes:
finished lines are skipped. A bad line (unreadable JSON, missing or corrupt image, ...)
is reported and skipped; it never stops the run.
"""
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

from ..capture import CaptureError, CaptureSpec, parse_index_list
from ..image_processing_minicpmv import load_image
from . import pipeline
from .pipeline import ToolError

__all__ = ["Extraction", "append_result", "extract", "finished_lines", "load_spec", "read_jobs", "safe_id"]


def read_jobs(path: str) -> Iterator[Tuple[int, Optional[dict], Optional[str]]]:
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


def finished_lines(results_path: str) -> Dict[int, dict]:
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


def append_result(path: str, row: dict) -> None:
    """Append one JSON line to results.jsonl and make it durable before going on."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def safe_id(job: dict, line_no: int) -> str:
    raw = str(job.get("id") or f"line{line_no:06d}")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)[:120]


def load_spec(spec: Optional[str] = None, layers: Optional[str] = None, heads: Optional[str] = None,
              rows: Optional[str] = None, reduce: Optional[str] = None) -> Dict[str, Any]:
    """The capture spec: defaults, then ``spec`` (JSON text or ``@file.json``), then the selections
    given as on the command line. Validated (``CaptureSpec.from_flag``) before any work."""
    out: Dict[str, Any] = {"rows": "generated", "device": "cpu", "dtype": "float32"}
    if spec:
        text = spec
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        out.update(json.loads(text))
    if layers:
        out["layers"] = {"llm": parse_index_list(layers, "layers")}
    if heads:
        out["heads"] = {"llm": parse_index_list(heads, "heads")}
    if rows:
        out["rows"] = rows
    if reduce:
        out["reduce"] = reduce
    CaptureSpec.from_flag(out)  # validate before any work
    return out


@dataclass
class Extraction:
    """What one :func:`extract` run did."""

    lines: int  # non-empty input lines
    counts: Dict[str, int]  # "ok", "error", "skipped (already done)"
    seconds: float
    results: str  # path of results.jsonl

    def summary(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        return f"{self.lines} lines: {counts} in {self.seconds:.1f} s; results in {self.results}"


def extract(jsonl: str, out: str, model: Optional[str] = None, spec: Optional[str] = None,
            layers: Optional[str] = None, heads: Optional[str] = None, rows: Optional[str] = None,
            reduce: Optional[str] = None, max_new_tokens: int = 16, device: Optional[str] = None,
            dtype: Optional[str] = "auto", quiet: bool = False) -> Extraction:
    """Extract a record per line of ``jsonl`` into ``out`` (see the module doc).

    A missing input file or a bad spec raises :class:`~.pipeline.ToolError` before any work; the
    model is loaded at the first line that needs it (``model=None``: the tiny demo model).
    """
    from tqdm.auto import tqdm

    if not os.path.isfile(jsonl):
        raise ToolError(f"input file {jsonl} does not exist")
    try:
        capture_spec = load_spec(spec, layers, heads, rows, reduce)
    except (ValueError, OSError) as e:
        raise ToolError(f"--spec: {e}") from e
    os.makedirs(os.path.join(out, "records"), exist_ok=True)
    results = os.path.join(out, "results.jsonl")
    done = finished_lines(results)
    jobs = list(read_jobs(jsonl))
    todo = [j for j in jobs if j[0] not in done]
    base = os.path.dirname(os.path.abspath(jsonl))
    counts = {"ok": 0, "error": 0, "skipped (already done)": len(jobs) - len(todo)}
    net = processor = None
    t0 = time.time()
    for line_no, job, error in tqdm(todo, desc="extracting", unit="line", disable=quiet):
        row = {"line": line_no}
        if error is None:
            try:
                if net is None:
                    net, processor, _ = pipeline.load_model_and_processor(model, device, dtype)
                path = job["image"] if os.path.isabs(job["image"]) else os.path.join(base, job["image"])
                image = load_image(path)
                answer, record = pipeline.capture_chat(net, processor, image, job["prompt"], capture_spec,
                                                       max_new_tokens, progress=False)
                record.meta.update(image=path, line=line_no, id=job.get("id"))
                stem = os.path.join(out, "records", safe_id(job, line_no))
                record.save(stem)
                row.update(status="ok", id=job.get("id"), answer=answer, record=os.path.relpath(stem, out))
            except (CaptureError, ValueError, OSError) as e:
                error = f"line {line_no}: {e}"
        if error is not None:
            row.update(status="error", error=error)
            tqdm.write(f"skipped {error}", file=sys.stderr)
        append_result(results, row)
        counts[row["status"]] += 1
    return Extraction(lines=len(jobs), counts=counts, seconds=time.time() - t0, results=results)
