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
* Defaults sized for the real model (:data:`DEFAULT_SPEC`); before the first line the disk the
  records will take is estimated (:func:`estimate_disk`) and printed, and refused over ``max_disk``.
* Data parallel under ``torchrun`` / ``accelerate launch`` (:class:`~.pipeline.Ranks`): each line
  goes to one rank (its key mod the world size), each rank appends to ``results.rank<r>.jsonl``;
  rank 0 holds the lock and merges them into ``results.jsonl`` when all are done (and merges the
  files of a killed run when it starts). Resume reads every results file, so it works across
  a changed number of processes.
* At the end rank 0 writes ``summary.parquet`` (``.csv`` without pyarrow) and ``report.html``
  (:mod:`.summary`, :mod:`.dataset_report`).
"""
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..attention_record import atomic_write_json, layout_for_sample
from ..capture import (AttentionCapture, CaptureError, CaptureSpec, estimate_bytes, hook_name, parse_bytes,
                       parse_index_list, resolve_dtype, special_token_ids)
from ..image_processing_minicpmv import ImageLoadError, ImageTooLargeError
from . import pipeline
from .devices import DeviceError, pick_device
from .devices import pick as pick_device_dtype
from .pipeline import DEFAULT_MAX_IMAGE_BYTES, ToolError
from .results_folder import RANK_RESULTS, RESULTS, record_problem, results_files

__all__ = ["DEFAULT_SPEC", "DiskEstimate", "Extraction", "append_result", "estimate_disk", "extract",
           "finished_lines", "format_bytes", "job_key", "load_spec", "read_jobs", "record_name", "results_files",
           "safe_id"]

RECORDS = "records"
SETTINGS = "extract.json"
LOCK = "extract.lock"
STATUSES = ("succeeded", "skipped (already done)", "failed")
# sized for the real model: the LLM's head-mean rows of the generated tokens in bfloat16, plus the
# resampler (head-mean; it maps image tokens to pixels: the top region and the mean heatmaps).
# At MiniCPM-V-2.6's shapes (10 slices, ~710 prompt tokens, 16 new) that is about 1.9 MiB a sample
# (LLM 0.6, resampler 1.25), where every stage, layer and head in float32 is about 18 GiB
# (capture.estimate_bytes). SigLIP is opt-in (vision=True, --vision: +540 MiB a sample).
DEFAULT_SPEC: Dict[str, Any] = {"stages": ["llm", "resampler"], "rows": "generated", "reduce": "mean",
                                "dtype": "bfloat16", "device": "cpu"}
MAX_PROMPT_CHARS = 2 ** 18  # a longer prompt is refused per line: about 60k tokens, above MiniCPM-V-2.6's 32k context
MAX_SPEC_BYTES = 2 ** 20  # a --spec @file larger than this is refused unread (a spec is a few hundred bytes)
ESTIMATE_SAMPLE = 32  # lines (a seeded random sample) prepared, not run, for the disk estimate


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
        if name == "prompt" and len(value) > MAX_PROMPT_CHARS:  # never tokenised whole (estimate or run)
            return None, (f"{where}, field 'prompt': expected at most {MAX_PROMPT_CHARS:,} characters, found "
                          f"{len(value):,}")
        job[name] = value
    job["fields"] = {k: v for k, v in obj.items() if k not in ("image", "prompt", "id")}  # e.g. label: passed on
    return job, None


def read_jobs(path: str) -> Iterator[Tuple[int, Optional[dict], Optional[str]]]:
    """Yield (line_no, job or None, error or None) for each non-empty line of ``path``.

    A job is ``{"image": str, "prompt": str, "id": str or None, "fields": {...}}`` (an integer id
    becomes a string, an empty one None; ``fields`` holds the line's other keys, e.g. ``label``). Errors are one line naming the file, line and field."""
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


def image_fingerprint(path: str, max_bytes: int) -> Optional[str]:
    """SHA-256 of the image file's bytes, or None when it is not a regular file of at most
    ``max_bytes`` bytes (never read then: a FIFO would block; its line fails on extraction)."""
    import stat as stat_mod

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        st = os.stat(path)
        if not stat_mod.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            return None
        digest = hashlib.sha256()
        with open(path, "rb", opener=lambda p, _: os.open(p, flags)) as f:
            if not stat_mod.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def line_fingerprint(job: dict, image_sha256: Optional[str]) -> Optional[str]:
    """What must be unchanged for a done line to be skipped: the image's content and every field
    of the line (prompt, id, label and the other fields reach the record and the summary)."""
    if image_sha256 is None:
        return None
    norm = json.dumps({"job": job, "image_sha256": image_sha256}, sort_keys=True, ensure_ascii=True,
                      separators=(",", ":"))
    return hashlib.sha256(norm.encode("ascii")).hexdigest()


def weights_identity(folder: str) -> Dict[str, Any]:
    """The identity of a checkpoint folder's weights: per weight file its size and a SHA-256 of its
    first MiB (the safetensors header) and 32 evenly spaced 64 KiB blocks, plus config.json's hash.
    Weights replaced in place (a new fine-tune saved to the same folder) change it; reading it
    costs a few MiB per file, not the whole checkpoint."""
    out: Dict[str, Any] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or not (name == "config.json" or name.endswith(
                (".safetensors", ".bin", ".pt", ".pth", ".index.json"))):
            continue
        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 1 << 20:
                for i in range(32):
                    f.seek((1 << 20) + (size - (1 << 20)) * i // 32)
                    digest.update(f.read(1 << 16))
        out[name] = f"{size}:{digest.hexdigest()[:32]}"
    return out


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
    weights = None
    if model is None:
        model_id = "tiny demo (random weights)"
    else:
        model_id = os.path.abspath(model) if os.path.isdir(model) else model
        if os.path.isdir(model):
            try:
                weights = weights_identity(model)
            except OSError as e:
                raise ToolError(f"--model {model}: cannot read its weight files: {e.strerror or e}") from None
    torch_dtype = resolve_dtype(dtype, "--dtype")
    return {"tool": "minicpmv-attn-extract", "model": model_id, "weights": weights, "spec": spec,
            "max_new_tokens": max_new_tokens,
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
              rows: Optional[str] = None, reduce: Optional[str] = None, vision: bool = False) -> Dict[str, Any]:
    """The capture spec: :data:`DEFAULT_SPEC` (plus the SigLIP stage with ``vision``), then ``spec``
    (JSON text or ``@file.json``), then the selections given as on the command line. Validated (``CaptureSpec.from_flag``) before any work; a problem
    raises :class:`ToolError` naming the flag (``--spec``, ``--layers``, ...)."""
    out: Dict[str, Any] = dict(DEFAULT_SPEC, stages=list(DEFAULT_SPEC["stages"]) + (["vision"] if vision else []))

    def check(flag: str) -> None:
        try:
            CaptureSpec.from_flag(dict(out))
        except (CaptureError, TypeError, ValueError) as e:
            raise ToolError(f"{flag}: {_one_line(e)}") from None

    if spec:
        text, where = spec, "--spec"
        if text.startswith("@"):
            where = f"--spec {text}"
            try:  # a regular file of at most MAX_SPEC_BYTES: never a FIFO (blocks) or /dev/zero (endless)
                raw = pipeline.read_regular_file(text[1:], "the spec file", MAX_SPEC_BYTES, "capture specs' limit")
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ToolError(f"{where}: the spec file is not UTF-8 text ({e.reason} at byte {e.start})") from None
            except ValueError as e:
                why = _one_line(e).replace("the spec file cannot be read: ", "cannot read the file: ")
                raise ToolError(f"{where}: {why}") from None
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
                chosen = parse_index_list(value, key)
            except ValueError as e:
                raise ToolError(str(e)) from None
            out[key] = _with_llm(out.get(key), chosen)
            check(flag)
    for flag, value, key in (("--rows", rows, "rows"), ("--reduce", reduce, "reduce")):
        if value:
            out[key] = value
            check(flag)
    return out


def _with_llm(selection: Any, llm: Optional[List[int]]) -> Dict[str, Any]:
    """A ``layers``/``heads`` selection with its LLM part replaced by ``llm`` and every other
    stage's kept: ``--layers`` narrows the LLM, it never drops the vision selection of ``--spec``."""
    if isinstance(selection, dict):
        merged = dict(selection)
    elif selection is None:
        merged = {}
    else:  # one list for every stage (resampler aside: it has one layer)
        merged = {stage: selection for stage in ("vision", "resampler")}
    merged["llm"] = llm
    return merged


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
        pipeline.check_model_source(model)  # a hub id out of reach, a folder without tokenizer files
    except (ValueError, OSError) as e:
        raise ToolError(_one_line(e)) from None
    try:
        pick_device(device)
    except DeviceError as e:
        raise ToolError(str(e)) from None


def _load_model(model, device, dtype, spec: Dict[str, Any], flags: Dict[str, Optional[str]], progress: bool = True):
    """Load once and check the selections against the model's layers and heads."""
    try:
        net, processor, _ = pipeline.load_model_and_processor(model, device, dtype, progress=progress)
    except Exception as e:  # noqa: BLE001 - whatever the loader raises is one configuration error
        name = model if model is not None else "(tiny demo)"
        raise ToolError(f"--model {name}: cannot load it: {_one_line(e) or type(e).__name__}") from None
    dims = net.capture_dims() if hasattr(net, "capture_dims") else None
    if dims is not None:
        try:
            AttentionCapture(CaptureSpec.from_flag(dict(spec)), dims["layers"], dims["heads"])
        except (CaptureError, TypeError, ValueError) as e:
            raise _selection_error(e, flags) from None
        config = getattr(net, "config", None)
        if config is not None and pipeline.capture_dims_from_config(config) != dims:  # the disk estimate's shapes
            raise ToolError(f"--model {model}: its layers/heads {dims} differ from what its config says "
                            f"{pipeline.capture_dims_from_config(config)}; the disk estimate would be wrong")
    return net, processor


def _selection_error(e: Exception, flags: Dict[str, Optional[str]]) -> ToolError:
    msg = _one_line(e)
    flag = next((f for f, v in flags.items() if v and f[2:] in msg), "--spec")
    return ToolError(f"{flag}: {msg} (checked against the model before the first line)")


# --------------------------------------------------------------------------------------
# the disk estimate (before any model work)
# --------------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    """``n`` bytes as a short human string (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


@dataclass
class DiskEstimate:
    """Bytes one record takes on disk, from a sample of lines prepared (tokenised, image sliced) but
    not run, assuming every answer is ``max_new_tokens`` long (an upper bound: answers that stop
    early are smaller)."""

    per_sample: int  # mean over the sampled lines
    lines: int  # lines left to extract
    sampled: int  # lines the mean was measured on
    parts: Dict[str, int]  # per stage ("llm", "vision", "resampler") and "metadata", mean bytes

    @property
    def total(self) -> int:
        return self.per_sample * self.lines

    def describe(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items() if v)
        return (f"disk estimate: {format_bytes(self.per_sample)} per sample ({parts}; mean of {self.sampled} "
                f"sampled line(s), answers of max_new_tokens), {format_bytes(self.total)} for {self.lines} line(s) "
                f"to extract")


def _sample_bytes(spec: CaptureSpec, dims: Dict[str, Any], processor, image, prompt: str, max_new_tokens: int,
                  compute_dtype, meta: dict) -> Dict[str, int]:
    """Bytes of one record of this line: tensors from ``capture.estimate_bytes`` at the prepared
    shapes, the safetensors header, and the JSON (index, token layout, meta) built as a skeleton."""
    from ..modeling_minicpmv import chat_prompt

    text, images = chat_prompt(processor.tokenizer, None, [{"role": "user", "content": [image, prompt]}])
    inputs = processor([text], [images], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    n_prompt, new = len(ids), max_new_tokens
    sizes = [(int(h), int(w)) for h, w in (inputs["tgt_sizes"][0] if len(inputs["tgt_sizes"]) else [])]
    bounds = [(int(a), int(b)) for a, b in inputs["image_bound"][0].tolist()]
    n_image = sum(b - a for a, b in bounds)
    patches = max([h * w for h, w in sizes], default=0)
    est = estimate_bytes(spec, dims, 1, n_prompt, new, len(sizes), patches, n_image, compute_dtype=compute_dtype)
    out = {k: v for k, v in est.items() if k != "workspace"}
    # the JSON: a skeleton of what AttentionRecord.save writes, with answers of `new` tokens like the prompt's last
    filler = ids[-1]
    all_ids = ids + [filler] * new
    tokens = processor.tokenizer.convert_ids_to_tokens(all_ids)
    layout = layout_for_sample(all_ids, [t or "" for t in tokens], n_prompt, 0, bounds,
                               inputs["slice_layouts"][0], special_token_ids(processor.tokenizer))
    index, header = {}, {}
    for stage in ("llm", "vision", "resampler"):
        for layer in spec.layer_ids(stage, dims["layers"][stage]):
            name = "resampler.attn" if stage == "resampler" else hook_name(stage, layer)
            heads = spec.head_ids(stage, dims["heads"][stage])
            rows = None
            if stage == "llm" and spec.rows == "generated":
                rows = list(range(n_prompt - 1, n_prompt - 1 + new))
            elif stage == "llm" and not isinstance(spec.rows, str):
                rows = list(spec.rows)
            index[name] = {"heads": heads, "reduce": spec.reduce, "rows": rows, "cols": None}
            # the safetensors header entry, with numbers of typical width
            header[name] = {"dtype": "BF16", "shape": [64, 1024, 1024], "data_offsets": [10 ** 7, 10 ** 7]}
    payload = {"format": "minicpmv-attn.record/1", "index": index, "layout": layout.to_dict(),
               "meta": dict(meta, prompt=text, answer="x" * (2 * new), spec=spec.describe(), replayed=False,
                            model="m" * 40, sample=0),
               "dtypes": {k: str(spec.dtype or compute_dtype) for k in index}}
    out["metadata"] = len(json.dumps(payload, indent=1)) + 8 + len(json.dumps(header, separators=(",", ":")))
    return out


def _check_new_tokens(max_new_tokens: int, config) -> None:
    """Refuse ``max_new_tokens`` that cannot fit the model's context (before anything is sized by it)."""
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and not isinstance(context, bool) and 0 < context <= max_new_tokens:
        raise ToolError(f"--max-new-tokens {max_new_tokens}: expected fewer than the model's context of {context:,} "
                        f"positions (config max_position_embeddings)")


def estimate_disk(jobs: List[Tuple[dict, str]], spec: Dict[str, Any], model: Optional[str], max_new_tokens: int,
                  dtype: Optional[str], lines: int, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                  sample: int = ESTIMATE_SAMPLE, flags: Optional[Dict[str, Optional[str]]] = None
                  ) -> Optional[DiskEstimate]:
    """Bytes the records of ``lines`` lines will take, from ``sample`` of ``jobs`` ((job, absolute
    image path) pairs, a seeded random sample) prepared with the model's processor and config (no weights,
    nothing run). None when no sampled image can be opened. Selections that the model cannot have
    raise :class:`ToolError` (as the run would, later)."""
    import torch

    try:
        processor, config = pipeline.load_processor(model)
    except Exception as e:  # noqa: BLE001 - one configuration error
        name = model if model is not None else "(tiny demo)"
        raise ToolError(f"--model {name}: cannot load it: {_one_line(e) or type(e).__name__}") from None
    dims = pipeline.capture_dims_from_config(config)
    _check_new_tokens(max_new_tokens, config)
    cs = CaptureSpec.from_flag(dict(spec))
    torch_dtype = resolve_dtype(dtype, "--dtype")
    if torch_dtype is None:
        name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        torch_dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).replace("torch.", ""))
    import random

    picked = sorted(random.Random(0).sample(range(len(jobs)), min(sample, len(jobs))))
    per: List[Dict[str, int]] = []
    for job, image_path in (jobs[i] for i in picked):
        try:
            image = pipeline.open_image(image_path, max_image_bytes)
        except Exception:  # noqa: BLE001 - that line will fail on its own; sample another
            continue
        meta = {"image": image_path, "line": 10 ** 6, "id": job.get("id"), "key": "0" * 64, "input": image_path,
                "fields": job.get("fields") or {}}
        try:
            per.append(_sample_bytes(cs, dims, processor, image, job["prompt"], max_new_tokens, torch_dtype, meta))
        except CaptureError as e:
            raise _selection_error(e, flags or {}) from None
        except Exception:  # noqa: BLE001 - e.g. a prompt the processor refuses: that line will fail on its own
            continue
    if not per:
        return None
    keys = sorted({k for p in per for k in p}, key=["llm", "vision", "resampler", "metadata"].index)
    parts = {k: int(sum(p.get(k, 0) for p in per) / len(per)) for k in keys}
    return DiskEstimate(per_sample=sum(parts.values()), lines=lines, sampled=len(per), parts=parts)


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
@dataclass
class Extraction:
    """What one :func:`extract` run did (all ranks together on rank 0; this rank's part elsewhere)."""

    lines: int  # non-empty input lines
    counts: Dict[str, int]  # "succeeded", "skipped (already done)", "failed"
    seconds: float
    results: str  # path of results.jsonl
    warnings: List[str] = field(default_factory=list)
    ranks: int = 1
    estimate: Optional[DiskEstimate] = None
    summary_path: Optional[str] = None
    report_path: Optional[str] = None
    bytes_written: int = 0  # records written by this run (all ranks)

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    def exit_code(self, keep_going: bool = False) -> int:
        """0 when no line failed (or ``keep_going``), 1 otherwise."""
        return 1 if self.failed and not keep_going else 0

    def summary(self) -> str:
        counts = ", ".join(f"{self.counts.get(k, 0)} {k}" for k in STATUSES)
        done = self.counts.get("succeeded", 0) + self.counts.get("failed", 0)
        rate = done / self.seconds if self.seconds > 0 else 0.0
        procs = f" on {self.ranks} processes" if self.ranks > 1 else ""
        disk = ""
        if self.counts.get("succeeded", 0):
            disk = f"; records {format_bytes(self.bytes_written)}"
            if self.estimate is not None:
                disk += f" (estimated {format_bytes(self.estimate.total)})"
        return (f"{self.lines} lines: {counts} in {self.seconds:.1f} s{procs} ({rate:.2f} samples/s){disk}; "
                f"results in {self.results}")


def _finished(out: str, repair: bool, warn: Callable[[str], None]) -> Dict[str, dict]:
    done: Dict[str, dict] = {}
    for path in results_files(out):
        done.update(finished_lines(path, repair=repair, warn=warn))
    return done


def _plan(jsonl: str, out: str, done: Dict[str, dict],
          max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Tuple[int, List[dict], List[dict]]:
    """(lines, todo, skipped): every rank computes the same plan from the same input and folder."""
    base = os.path.dirname(os.path.abspath(jsonl))
    names = {os.path.basename(r["record"]): k for k, r in done.items()}
    first_line: Dict[str, int] = {}
    todo, skipped, lines = [], [], 0
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
                item["error"] = (f"{jsonl} line {line_no}: the same image, prompt and id as line {first_line[key]}; "
                                 f"expected each job once (give it another 'id' to extract it again)")
            else:
                first_line[key] = line_no
                row = done.get(key)
                if row is not None and record_problem(out, row["record"]) is None:
                    # skipped only when the image's content and every field are what the record was made from
                    now = line_fingerprint(job, image_fingerprint(image, max_image_bytes))
                    if now is not None and row.get("fingerprint") == now:
                        skipped.append(item)
                        continue
                    item["changed"] = True
                name = record_name(job, image, key)
                if names.get(name, key) != key:  # a 48-bit prefix clash: the full key
                    name = f"{name[:-12]}{key}"
                names[name] = key
                item["name"] = name
        todo.append(item)
    return lines, todo, skipped


def extract(jsonl: str, out: str, model: Optional[str] = None, spec: Optional[str] = None,
            layers: Optional[str] = None, heads: Optional[str] = None, rows: Optional[str] = None,
            reduce: Optional[str] = None, max_new_tokens: int = 16, device: Optional[str] = "auto",
            dtype: Optional[str] = None, quiet: bool = False, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
            log: Optional[Callable[[str], None]] = None, vision: bool = False, max_disk=None,
            summary: bool = True, group_by: Optional[str] = None, ranks: Optional[pipeline.Ranks] = None) -> Extraction:
    """Extract a record per line of ``jsonl`` into ``out`` (see the module doc).

    Configuration problems raise :class:`~.pipeline.ToolError` before the first line: the input,
    ``out``, ``max_new_tokens``, dtype, device, spec and selections are checked first; the disk
    estimate (:func:`estimate_disk`) is printed and, over ``max_disk`` (bytes or ``"50GB"``),
    refused before any model work; the model (``None``: the tiny demo) is loaded once, when
    some line is left to extract, and the selections are checked against it; another run
    holding ``out`` and settings that differ from the records already in ``out`` are refused. A
    failed append to the results stops the run (ToolError). ``log`` receives per-line errors and
    warnings (default: stderr).

    Data parallel: under ``torchrun``/``accelerate launch`` (``ranks``: default from the
    environment) each process takes the lines whose content key falls to its rank, appends to
    ``results.rank<r>.jsonl`` and writes its records; rank 0 holds the folder's lock, merges the
    rank files into ``results.jsonl`` after every rank is done, then (``summary``) writes
    ``summary.parquet``/``.csv`` and ``report.html`` (:mod:`.summary`, :mod:`.dataset_report`).
    """
    from tqdm.auto import tqdm

    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    ranks = ranks or pipeline.Ranks()
    _check_config(jsonl, out, model, device, dtype, max_new_tokens, max_image_bytes)
    capture_spec = load_spec(spec, layers, heads, rows, reduce, vision)
    try:
        limit = parse_bytes(max_disk, "--max-disk") if max_disk is not None else None
    except CaptureError as e:
        raise ToolError(_one_line(e).replace("capture --max-disk=", "--max-disk ")) from None
    if ranks.distributed and (device is None or device in ("auto", "cuda")):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{ranks.local_rank}"
    device, dtype = pick_device_dtype(device, dtype, "auto")  # CUDA, MPS, CPU; bf16 on CUDA; else the checkpoint's
    settings = _settings(model, capture_spec, max_new_tokens, dtype)
    ranks.start()
    try:
        return _run(jsonl, out, model, capture_spec, settings, layers, heads, max_new_tokens, device, dtype, quiet,
                    max_image_bytes, say, limit, summary, group_by, ranks)
    finally:
        ranks.stop()


def _agreed(ranks: pipeline.Ranks, error: Optional[str]) -> None:
    """A barrier where every rank learns whether some rank failed; the first error is raised everywhere."""
    errors = [e for e in ranks.gather(error) if e]
    if errors:
        raise ToolError(errors[0] if error is None or ranks.rank == 0 else error)


def _run(jsonl, out, model, capture_spec, settings, layers, heads, max_new_tokens, device, dtype, quiet,
         max_image_bytes, say, limit, summary, group_by, ranks: pipeline.Ranks) -> Extraction:
    from tqdm.auto import tqdm

    warnings: List[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        say(f"warning: {msg}")

    lead = ranks.rank == 0

    def info(msg: str) -> None:  # progress information on stdout (--quiet: none)
        if not quiet:
            tqdm.write(msg, file=sys.stdout)

    def note(msg: str) -> None:  # on stdout, even with --quiet
        tqdm.write(msg, file=sys.stdout)

    lock = pipeline.FolderLock(out, LOCK, holder="extraction run")
    results = os.path.join(out, RESULTS)
    error: Optional[str] = None
    try:
        if lead:  # one process prepares the folder before anyone reads it
            try:
                try:
                    os.makedirs(os.path.join(out, RECORDS), exist_ok=True)
                except OSError as e:
                    raise ToolError(f"--out {out}: cannot create the folder: {e.strerror or e}") from None
                lock.acquire()
                removed = pipeline.clean_stale_tmp([out, os.path.join(out, RECORDS)])
                if removed:
                    warn(f"removed {len(removed)} stale temporary file(s) of an interrupted run in {out}")
                done = _finished(out, True, warn)
                pipeline.merge_jsonl(results, results_files(out)[1:])  # rank files of a run that was killed
                _check_settings(os.path.join(out, SETTINGS), settings, bool(done))
            except ToolError as e:
                error = str(e)
        _agreed(ranks, error)
        run_id = ranks.broadcast(uuid.uuid4().hex[:12] if lead else None)
        done = _finished(out, False, lambda msg: None)
        lines, todo, skipped = _plan(jsonl, out, done, max_image_bytes)
        changed = sum(1 for i in todo if i.get("changed"))
        if changed and lead:
            warn(f"{changed} line(s) extracted before are redone: their image file's content or their fields "
                 f"changed since (or the earlier row predates content keys)")

        estimate, error = None, None
        if lead:
            try:
                ok = [(i["job"], i["image"]) for i in todo if i["error"] is None]
                estimate = estimate_disk(ok, capture_spec, model, max_new_tokens, dtype, len(ok), max_image_bytes,
                                         flags={"--layers": layers, "--heads": heads}) if ok else None
                if estimate is None:
                    info("disk estimate: not available (no sampled image could be opened)" if ok else
                        "disk estimate: nothing left to extract")
                    if limit is not None and ok:
                        raise ToolError(f"--max-disk {format_bytes(limit)}: cannot check it, no sampled line's image "
                                        f"could be opened")
                else:
                    info(estimate.describe())
                    if limit is not None and estimate.total > limit:
                        raise ToolError(
                            f"--max-disk {format_bytes(limit)}: the records would take about "
                            f"{format_bytes(estimate.total)} ({format_bytes(estimate.per_sample)} per sample x "
                            f"{estimate.lines} lines); capture less (--layers, --rows last, no --vision) or raise "
                            f"--max-disk")
            except ToolError as e:
                error = str(e)
        _agreed(ranks, error)

        mine = [i for i in todo if ranks.owns(i["key"], i["line"])]
        skipped_mine = sum(1 for i in skipped if ranks.owns(i["key"], i["line"]))
        log_path = results if not ranks.distributed else os.path.join(out, RANK_RESULTS.format(rank=ranks.rank))
        loaded: List[Any] = []

        def get_model():
            """(net, processor), loaded once."""
            if not loaded:
                loaded.extend(_load_model(model, device, dtype, capture_spec, {"--layers": layers, "--heads": heads},
                                          progress=not quiet))
            return loaded

        error = None
        if any(item["error"] is None for item in mine):
            try:
                get_model()  # a model or selection that does not work stops the run before the first line
            except ToolError as e:
                error = str(e)
        _agreed(ranks, error)
        if lead and any(item["error"] is None for item in todo):  # every rank with work has its model
            atomic_write_json(os.path.join(out, SETTINGS), settings)

        counts = {"succeeded": 0, "skipped (already done)": skipped_mine, "failed": 0}
        written = 0
        t0 = time.time()
        error = None
        bar = tqdm(mine, desc=f"rank {ranks.rank}" if ranks.distributed else "extracting", unit="sample",
                   position=ranks.rank, disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)
        try:
            for item in bar:
                line_no, job, error_line = item["line"], item["job"], item["error"]
                where = f"{jsonl} line {line_no}"
                row: Dict[str, Any] = {"input": os.path.abspath(jsonl), "line": line_no, "key": item["key"]}
                if error_line is None:
                    error_line = _extract_one(get_model, job, item, capture_spec, max_new_tokens, max_image_bytes, out,
                                              where, row)
                if error_line is not None:
                    row.update(status="error", id=job.get("id") if job else None, error=error_line)
                    say(f"failed: {error_line}")
                row.update(run=run_id, rank=ranks.rank)
                try:
                    append_result(log_path, row)
                except OSError as e:
                    raise ToolError(f"{log_path}: cannot append the row of {where}: {e.strerror or e}; its line will "
                                    f"be redone on the next run") from None
                counts["succeeded" if error_line is None else "failed"] += 1
                written += item.get("bytes", 0)
        except ToolError as e:
            error = str(e)
        finally:
            bar.close()
        seconds = time.time() - t0
        everyone = ranks.gather((counts, seconds, error, written))  # also the barrier before the merge
        errors = [e for _, _, e, _ in everyone if e]
        total = {k: sum(c[k] for c, _, _, _ in everyone) for k in counts}
        result = Extraction(lines=lines, counts=total, seconds=max(s for _, s, _, _ in everyone), results=results,
                            warnings=warnings, ranks=ranks.world, estimate=estimate,
                            bytes_written=sum(b for _, _, _, b in everyone))
        try:
            if lead:
                pipeline.merge_jsonl(results, results_files(out)[1:])
                if summary and not errors:
                    _summarise(out, group_by, result, note, warn)
        finally:
            # every rank waits for rank 0's merge and summary (even a failed one), so none tears the gloo
            # group down while rank 0 still holds it (a rank that left first was once seen to abort in
            # C++: "terminate called without an active exception")
            ranks.gather(None)
        if errors:
            raise ToolError(error or errors[0])
        return result
    finally:
        lock.release()


def _summarise(out: str, group_by: Optional[str], result: Extraction, info, warn) -> None:
    """summary table + dataset report after a run; a failure here is a warning (the records stand)."""
    from .dataset_report import build_report

    try:
        built = build_report(out, group_by=group_by, warn=warn, say=info)
    except ToolError as e:
        warn(f"no summary/report: {e}")
        return
    result.summary_path, result.report_path = built.summary_path, built.report_path


def _extract_one(get_model: Callable[[], Any], job: dict, item: dict, spec: Dict[str, Any], max_new_tokens: int,
                 max_image_bytes: int, out: str, where: str, row: Dict[str, Any]) -> Optional[str]:
    """Extract one line into ``row``; returns None, or the one-line error."""
    path = item["image"]
    fingerprint = line_fingerprint(job, image_fingerprint(path, max_image_bytes))
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
    fields = job.get("fields") or {}
    record.meta.update(image=path, line=item["line"], id=job.get("id"), key=item["key"], input=row["input"],
                       fields=fields)
    try:  # what load() would refuse is never written as "ok" (NaN/inf attention, rows that are no distribution)
        record.validate("the captured attention")
    except ValueError as e:
        return f"{where}: {_one_line(e)}"
    try:
        record.save(stem)
    except Exception as e:  # noqa: BLE001 - e.g. a full disk: this line fails, the next may not
        reason = _one_line(getattr(e, "strerror", None) or e)
        return f"{where}: cannot write the record {stem}: {type(e).__name__}: {reason}"
    row.update(status="ok", id=job.get("id"), answer=answer, record=os.path.relpath(stem, out), image=path,
               fields=fields, fingerprint=fingerprint)
    item["bytes"] = sum(os.path.getsize(stem + ext) for ext in (".safetensors", ".json"))
    return None
