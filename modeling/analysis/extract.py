"""Attention records for a JSONL of (image, prompt) pairs, resumable.

What ``scripts/extract_attention.py`` runs (its ``--help`` states the same promises). Each input
line is a JSON object ``{"image": "path.jpg", "prompt": "...", "id": "optional-name"}`` (relative
image paths are resolved against the JSONL's folder).

* Records: each line's record is written atomically to ``OUT/records/<name>.safetensors`` +
  ``.json``, where ``<name>`` is the sanitised id (or the image's file name) followed by the first
  12 hex digits of the line's *key*, a SHA-256 of the normalised job (absolute image path, prompt,
  id). Different jobs never share a name; ``OUT/results.jsonl`` gets one row per attempt with
  ``input`` (the JSONL), ``line``, ``key``, ``status`` and ``record`` or ``error``.
* Resume is keyed by content: a line is skipped when a row with its key says ``ok`` and its record
  files exist, whatever its line number or input file. Edited lines are redone; lines of another
  JSONL are extracted next to the others. ``OUT/extract.json`` keeps the settings (model, spec,
  dtype, max new tokens); once OUT holds records, a run with other settings is refused.
* One run per OUT: an exclusive lock on ``OUT/extract.lock``; a second run is refused.
* Crash safety: rows are appended with one write of a whole line and fsync; a failed append is
  rolled back; a row cut short by a crash is repaired (or dropped) with a warning on the next run;
  stale ``.tmp-*`` files of killed atomic writes in OUT and OUT/records are removed.
* A bad line (not UTF-8, not JSON, a missing or wrongly typed field, text that is not valid
  Unicode, an image that is missing, not a regular file, larger than ``max_image_bytes``, corrupt,
  a capture that fails, ...) is reported on one line, recorded as ``error`` and the run goes on.
* Configuration errors (input, ``--out``, model, device, dtype, spec and selections, checked
  against the model) raise :class:`~.pipeline.ToolError` before the first line is extracted.
"""
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..attention_record import atomic_write_json
from ..capture import AttentionCapture, CaptureError, CaptureSpec, parse_index_list, resolve_dtype
from ..image_processing_minicpmv import ImageLoadError, ImageTooLargeError
from . import pipeline
from .pipeline import DEFAULT_MAX_IMAGE_BYTES, ToolError

__all__ = ["Extraction", "append_result", "extract", "finished_lines", "job_key", "load_spec", "read_jobs",
           "record_name", "safe_id"]

RESULTS = "results.jsonl"
RECORDS = "records"
SETTINGS = "extract.json"
LOCK = "extract.lock"
STATUSES = ("succeeded", "skipped (already done)", "failed")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _found(value: Any) -> str:
    """How a JSON value is named in messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {ascii(value[:40])}" + ("..." if len(value) > 40 else "")
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _invalid_unicode(text: str) -> Optional[str]:
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}"


# --------------------------------------------------------------------------------------
# the input
# --------------------------------------------------------------------------------------
def _check_job(obj: Any, where: str) -> Tuple[Optional[dict], Optional[str]]:
    if not isinstance(obj, dict):
        return None, f"{where}: expected a JSON object {{\"image\": ..., \"prompt\": ...}}, found {_found(obj)}"
    job = {}
    for name, expected in (("image", "a string (an image path)"), ("prompt", "a string"),
                           ("id", "a string or an integer")):
        if name not in obj:
            if name == "id":
                job["id"] = None
                continue
            return None, f"{where}, field '{name}': missing; expected {expected}"
        value = obj[name]
        if name == "id":
            if value is None or value == "":
                job["id"] = None
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
        if not isinstance(value, str):
            return None, f"{where}, field '{name}': expected {expected}, found {_found(value)}"
        bad = _invalid_unicode(value)
        if bad:
            return None, f"{where}, field '{name}': expected valid Unicode text, found {bad}"
        if name == "image" and ("\x00" in value or not value.strip()):
            return None, f"{where}, field 'image': expected a file path, found {_found(value)}"
        job[name] = value
    return job, None


def read_jobs(path: str) -> Iterator[Tuple[int, Optional[dict], Optional[str]]]:
    """Yield (line_no, job or None, error or None) for each non-empty line of ``path``.

    A job is ``{"image": str, "prompt": str, "id": str or None}`` (an integer id becomes a
    string, an empty one None). Errors are one line naming the file, line and field."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, f"{where}: expected UTF-8 text, found byte 0x{raw[e.start]:02x} at byte {e.start + 1}"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                yield n, None, f"{where}: expected a JSON object, found text that is not valid JSON ({msg})"
                continue
            job, error = _check_job(obj, where)
            yield n, job, error


def job_key(job: dict, base: str) -> Tuple[str, str]:
    """(absolute image path, key): the key is the SHA-256 of the normalised job."""
    image = os.path.normpath(os.path.join(base, os.path.expanduser(job["image"])))
    norm = json.dumps({"image": image, "prompt": job["prompt"], "id": job.get("id")}, sort_keys=True,
                      ensure_ascii=True, separators=(",", ":"))
    return image, hashlib.sha256(norm.encode("ascii")).hexdigest()


def safe_id(text: str, limit: int = 80) -> str:
    """``text`` as a file-name stem: ASCII letters, digits, ``-_.`` (others ``_``), no leading dot."""
    out = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in text)[:limit].lstrip(".")
    return out or "job"


def record_name(job: dict, image: str, key: str) -> str:
    """``<sanitised id or image name>-<12 hex digits of key>``."""
    stem = job.get("id") or os.path.splitext(os.path.basename(image))[0]
    return f"{safe_id(stem)}-{key[:12]}"


# --------------------------------------------------------------------------------------
# the output folder: results.jsonl and the settings of its records
# --------------------------------------------------------------------------------------
def finished_lines(results_path: str, repair: bool = False,
                   warn: Optional[Callable[[str], None]] = None) -> Dict[str, dict]:
    """The rows with status ok in ``results.jsonl``, by key (the last one of a key wins).

    Read with :func:`~.pipeline.read_jsonl_rows`: unreadable rows are ignored with a warning, a
    last row cut short by a crash is (with ``repair``) completed or cut off the file."""
    warn = warn or (lambda msg: None)
    done: Dict[str, dict] = {}
    old = 0
    for row in pipeline.read_jsonl_rows(results_path, repair=repair, warn=warn, what="row"):
        if row.get("status") == "ok" and isinstance(row.get("key"), str) and isinstance(row.get("record"), str):
            done[row["key"]] = row
        elif row.get("status") == "ok":
            old += 1
    if old:
        warn(f"{results_path}: {old} ok row(s) without a content key (an older version of this tool) are not "
             f"counted as done; their lines will be redone")
    return done


def append_result(path: str, row: dict) -> None:
    """Append ``row`` to results.jsonl durably, all or nothing (:func:`~.pipeline.append_jsonl`)."""
    pipeline.append_jsonl(path, row)


def _settings(model: Optional[str], spec: Dict[str, Any], max_new_tokens: int, dtype: Optional[str]) -> dict:
    if model is None:
        model_id = "tiny demo (random weights)"
    else:
        model_id = os.path.abspath(model) if os.path.isdir(model) else model
    torch_dtype = resolve_dtype(dtype, "--dtype")
    return {"tool": "minicpmv-attn-extract", "model": model_id, "spec": spec, "max_new_tokens": max_new_tokens,
            "dtype": "auto" if torch_dtype is None else str(torch_dtype).replace("torch.", "")}


def _check_settings(path: str, settings: dict, has_records: bool) -> None:
    if not has_records or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
    except (OSError, ValueError) as e:
        raise ToolError(f"{path}: expected the settings of the earlier runs as JSON, found unreadable text ({e}); "
                        f"use another --out") from None
    before = before if isinstance(before, dict) else {}
    now = json.loads(json.dumps(settings))
    diff = [f"{k}: {json.dumps(before.get(k))} there, {json.dumps(now[k])} now" for k in now if before.get(k) != now[k]]
    if diff:
        raise ToolError(f"--out {os.path.dirname(path)}: holds records made with other settings ({'; '.join(diff)}); "
                        f"use another --out, or the settings in {path}")


# --------------------------------------------------------------------------------------
# the command line's settings
# --------------------------------------------------------------------------------------
def load_spec(spec: Optional[str] = None, layers: Optional[str] = None, heads: Optional[str] = None,
              rows: Optional[str] = None, reduce: Optional[str] = None) -> Dict[str, Any]:
    """The capture spec: defaults, then ``spec`` (JSON text or ``@file.json``), then the selections
    given as on the command line. Validated (``CaptureSpec.from_flag``) before any work; a problem
    raises :class:`ToolError` naming the flag (``--spec``, ``--layers``, ...)."""
    out: Dict[str, Any] = {"rows": "generated", "device": "cpu", "dtype": "float32"}

    def check(flag: str) -> None:
        try:
            CaptureSpec.from_flag(dict(out))
        except (CaptureError, TypeError, ValueError) as e:
            raise ToolError(f"{flag}: {_one_line(e)}") from None

    if spec:
        text, where = spec, "--spec"
        if text.startswith("@"):
            where = f"--spec {text}"
            try:
                with open(text[1:], encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ToolError(f"{where}: cannot read the file: {getattr(e, 'strerror', None) or e}") from None
        try:
            given = json.loads(text)
        except ValueError as e:
            raise ToolError(f"{where}: expected a JSON object, found text that is not valid JSON ({e})") from None
        if not isinstance(given, dict):
            raise ToolError(f"{where}: expected a JSON object like {{\"reduce\": \"mean\"}}, found {_found(given)}")
        out.update(given)
        check(where)
    for flag, value, key in (("--layers", layers, "layers"), ("--heads", heads, "heads")):
        if value:
            try:
                out[key] = {"llm": parse_index_list(value, key)}
            except ValueError as e:
                raise ToolError(str(e)) from None
            check(flag)
    for flag, value, key in (("--rows", rows, "rows"), ("--reduce", reduce, "reduce")):
        if value:
            out[key] = value
            check(flag)
    return out


def _check_config(jsonl: str, out: str, model: Optional[str], device: Optional[str], dtype: Optional[str],
                  max_new_tokens: int, max_image_bytes: int) -> None:
    """What can be checked without the model, before anything is written."""
    if not os.path.exists(jsonl):
        raise ToolError(f"input file {jsonl}: does not exist; expected a JSONL file of {{image, prompt[, id]}} lines")
    if not os.path.isfile(jsonl):
        raise ToolError(f"input file {jsonl}: is not a regular file; expected a JSONL file")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ToolError(f"--out {out}: is a file; expected a folder (new or from an earlier run)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ToolError(f"--max-new-tokens {max_new_tokens}: expected an integer of at least 1")
    if isinstance(max_image_bytes, bool) or not isinstance(max_image_bytes, int) or max_image_bytes < 1:
        raise ToolError(f"--max-image-bytes {max_image_bytes}: expected a positive number of bytes")
    try:
        resolve_dtype(dtype, "--dtype")
        pipeline.check_model_arg(model)
    except (ValueError, OSError) as e:
        raise ToolError(_one_line(e)) from None
    if device is not None:
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ToolError(f"--device {device}: expected a torch device like 'cpu' or 'cuda:0'") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ToolError(f"--device {device}: CUDA is not available on this machine; use 'cpu'")


def _load_model(model, device, dtype, spec: Dict[str, Any], flags: Dict[str, Optional[str]]):
    """Load once and check the selections against the model's layers and heads."""
    try:
        net, processor, _ = pipeline.load_model_and_processor(model, device, dtype)
    except Exception as e:  # noqa: BLE001 - whatever the loader raises is one configuration error
        name = model if model is not None else "(tiny demo)"
        raise ToolError(f"--model {name}: cannot load it: {_one_line(e) or type(e).__name__}") from None
    dims = net.capture_dims() if hasattr(net, "capture_dims") else None
    if dims is not None:
        try:
            AttentionCapture(CaptureSpec.from_flag(dict(spec)), dims["layers"], dims["heads"])
        except (CaptureError, TypeError, ValueError) as e:
            msg = _one_line(e)
            flag = next((f for f, v in flags.items() if v and f[2:] in msg), "--spec")
            raise ToolError(f"{flag}: {msg} (checked against the model before the first line)") from None
    return net, processor


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
@dataclass
class Extraction:
    """What one :func:`extract` run did."""

    lines: int  # non-empty input lines
    counts: Dict[str, int]  # "succeeded", "skipped (already done)", "failed"
    seconds: float
    results: str  # path of results.jsonl
    warnings: List[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    def exit_code(self, keep_going: bool = False) -> int:
        """0 when no line failed (or ``keep_going``), 1 otherwise."""
        return 1 if self.failed and not keep_going else 0

    def summary(self) -> str:
        counts = ", ".join(f"{self.counts.get(k, 0)} {k}" for k in STATUSES)
        return f"{self.lines} lines: {counts} in {self.seconds:.1f} s; results in {self.results}"


def extract(jsonl: str, out: str, model: Optional[str] = None, spec: Optional[str] = None,
            layers: Optional[str] = None, heads: Optional[str] = None, rows: Optional[str] = None,
            reduce: Optional[str] = None, max_new_tokens: int = 16, device: Optional[str] = None,
            dtype: Optional[str] = "auto", quiet: bool = False, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
            log: Optional[Callable[[str], None]] = None) -> Extraction:
    """Extract a record per line of ``jsonl`` into ``out`` (see the module doc).

    Configuration problems raise :class:`~.pipeline.ToolError` before the first line: the input,
    ``out``, ``max_new_tokens``, dtype, device, spec and selections are checked first; the model
    (``None``: the tiny demo) is loaded once, before the first line, when some line is left to
    extract, and the selections are checked against it; another run holding ``out`` and settings
    that differ from the records already in ``out`` are refused. A failed append to results.jsonl stops the run (ToolError).
    ``log`` receives per-line errors and warnings (default: stderr).
    """
    from tqdm.auto import tqdm

    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    _check_config(jsonl, out, model, device, dtype, max_new_tokens, max_image_bytes)
    capture_spec = load_spec(spec, layers, heads, rows, reduce)
    settings = _settings(model, capture_spec, max_new_tokens, dtype)
    try:
        os.makedirs(os.path.join(out, RECORDS), exist_ok=True)
    except OSError as e:
        raise ToolError(f"--out {out}: cannot create the folder: {e.strerror or e}") from None
    results = os.path.join(out, RESULTS)
    warnings: List[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        say(f"warning: {msg}")

    with pipeline.FolderLock(out, LOCK, holder="extraction run"):
        removed = pipeline.clean_stale_tmp([out, os.path.join(out, RECORDS)])
        if removed:
            warn(f"removed {len(removed)} stale temporary file(s) of an interrupted run in {out}")
        done = finished_lines(results, repair=True, warn=warn)
        _check_settings(os.path.join(out, SETTINGS), settings, bool(done))

        base = os.path.dirname(os.path.abspath(jsonl))
        source = os.path.abspath(jsonl)
        names = {os.path.basename(r["record"]): k for k, r in done.items()}
        first_line: Dict[str, int] = {}
        todo, lines, skipped = [], 0, 0
        try:
            jobs = list(read_jobs(jsonl))
        except OSError as e:
            raise ToolError(f"input file {jsonl}: cannot be read: {e.strerror or e}") from None
        for line_no, job, error in jobs:
            lines += 1
            item = {"line": line_no, "job": job, "error": error, "key": None}
            if job is not None:
                image, key = job_key(job, base)
                item.update(image=image, key=key)
                if key in first_line:
                    item["error"] = (f"{jsonl} line {line_no}: the same image, prompt and id as line "
                                     f"{first_line[key]}; "
                                     f"expected each job once (give it another 'id' to extract it again)")
                else:
                    first_line[key] = line_no
                    row = done.get(key)
                    if row is not None and all(os.path.isfile(os.path.join(out, row["record"] + ext))
                                               for ext in (".safetensors", ".json")):
                        skipped += 1
                        continue
                    name = record_name(job, image, key)
                    if names.get(name, key) != key:  # a 48-bit prefix clash: the full key
                        name = f"{name[:-12]}{key}"
                    names[name] = key
                    item["name"] = name
            todo.append(item)

        counts = {"succeeded": 0, "skipped (already done)": skipped, "failed": 0}
        loaded: List[Any] = []
        t0 = time.time()

        def get_model():
            """(net, processor), loaded once."""
            if not loaded:
                loaded.extend(_load_model(model, device, dtype, capture_spec, {"--layers": layers, "--heads": heads}))
                atomic_write_json(os.path.join(out, SETTINGS), settings)
            return loaded

        if any(item["error"] is None for item in todo):
            get_model()  # a model or selection that does not work stops the run before the first line

        for item in tqdm(todo, desc="extracting", unit="line", disable=quiet):
            line_no, job, error = item["line"], item["job"], item["error"]
            where = f"{jsonl} line {line_no}"
            row: Dict[str, Any] = {"input": source, "line": line_no, "key": item["key"]}
            if error is None:
                error = _extract_one(get_model, job, item, capture_spec, max_new_tokens, max_image_bytes, out, where,
                                     row)
            if error is not None:
                row.update(status="error", id=job.get("id") if job else None, error=error)
                say(f"failed: {error}")
            try:
                append_result(results, row)
            except OSError as e:
                raise ToolError(f"{results}: cannot append the row of {where}: {e.strerror or e}; its line will be "
                                f"redone on the next run") from None
            counts["succeeded" if error is None else "failed"] += 1
    return Extraction(lines=lines, counts=counts, seconds=time.time() - t0, results=results, warnings=warnings)


def _extract_one(get_model: Callable[[], Any], job: dict, item: dict, spec: Dict[str, Any], max_new_tokens: int,
                 max_image_bytes: int, out: str, where: str, row: Dict[str, Any]) -> Optional[str]:
    """Extract one line into ``row``; returns None, or the one-line error."""
    path = item["image"]
    try:
        image = pipeline.open_image(path, max_image_bytes)
    except (ImageLoadError, ImageTooLargeError) as e:
        return f"{where}, field 'image': {_one_line(e)}"
    except Exception as e:  # noqa: BLE001 - a bad line never stops the run
        return f"{where}, field 'image': {type(e).__name__}: {_one_line(e)}"
    net, processor = get_model()
    try:
        answer, record = pipeline.capture_chat(net, processor, image, job["prompt"], spec, max_new_tokens,
                                               progress=False)
    except CaptureError as e:
        return f"{where}: the capture was refused: {_one_line(e)}"
    except Exception as e:  # noqa: BLE001
        return f"{where}: extraction failed: {type(e).__name__}: {_one_line(e)}"
    stem = os.path.join(out, RECORDS, item["name"])
    record.meta.update(image=path, line=item["line"], id=job.get("id"), key=item["key"], input=row["input"])
    try:
        record.save(stem)
    except Exception as e:  # noqa: BLE001 - e.g. a full disk: this line fails, the next may not
        reason = _one_line(getattr(e, "strerror", None) or e)
        return f"{where}: cannot write the record {stem}: {type(e).__name__}: {reason}"
    row.update(status="ok", id=job.get("id"), answer=answer, record=os.path.relpath(stem, out))
    return None
