"""The benchmark run: flags -> settings, the CPU memory workers, the timing pass, the report.

``resolve(args)`` turns the flags of ``scripts/bench_capture.py`` (an argparse namespace)
into the run's settings, raising ``ValueError`` with a usage message; ``run_bench(settings)``
measures, prints the tables and the verdicts, writes the JSON and returns the exit status.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import kernel_check
from ..attention_record import atomic_write_json
from ..capture import parse_index_list, resolve_dtype
from .report import TARGETS, public_result, report
from .tasks import (
    CPU_LENGTHS, GIB, GPU_LENGTHS, LLM_ROWS, MIB, QUICK_CPU_LENGTHS, QUICK_GPU_LENGTHS, ROWS_BY_NAME, VISION_ROWS,
    Models, Result, Row, _cleanup, _worker_failure, execute, llm_job, load_config, model_dims, quiet_transformers,
    spawn_worker, vision_job,
)

__all__ = ["merge_memory", "resolve", "run_bench", "run_memory_workers", "run_timing"]


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, unit="row", dynamic_ncols=True, disable=None)
    except ImportError:  # pragma: no cover
        class _Plain:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k

            def write(self, s, file=None):
                print(s, file=file or sys.stderr)

            def close(self):
                pass

        return _Plain()


def _log(bar, r: Result, what: str) -> None:
    if r.ok and what == "memory":
        msg = f"  memory {r.length:>6} {r.row:<14} +{(r.extra_bytes or 0) / MIB:8.0f} MiB"
    elif r.ok:
        msg = f"  time   {r.length:>6} {r.row:<14} {r.time_ms:9.1f} ms  +{(r.extra_bytes or 0) / MIB:8.0f} MiB"
    else:
        msg = f"  {what:<6} {r.length:>6} {r.row:<14} {r.message}"
    bar.write(msg, file=sys.stderr)


def resolve(args) -> Dict[str, Any]:
    """Turn the parsed flags into the run's settings (device, dtype, lengths, rows, configs).

    ``args.config`` None: the built-in true shapes (``TRUE_CONFIG``). Raises ``ValueError``
    with a usage message for a bad combination of flags."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    if repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if args.vision_slices < 1 or args.vision_grid < 1:
        raise ValueError("--vision-slices and --vision-grid must be >= 1")
    if args.lengths:
        try:  # 1k = 1024
            lengths = parse_index_list(re.sub(r"(\d+)k", lambda m: str(int(m.group(1)) * 1024), args.lengths.lower()),
                                       "lengths")
        except ValueError:
            raise ValueError(f"--lengths {args.lengths!r}: expected e.g. 1024,2048 or 1k,2k") from None
        if not lengths or any(n < 2 for n in lengths):
            raise ValueError("--lengths: at least one length >= 2")
    elif args.quick:
        lengths = list(QUICK_GPU_LENGTHS if device == "cuda" else QUICK_CPU_LENGTHS)
    else:
        lengths = list(GPU_LENGTHS if device == "cuda" else CPU_LENGTHS)
    names, no_vision = [r.name for r in LLM_ROWS], args.no_vision
    if args.rows:
        wanted = [s.strip() for s in args.rows.split(",") if s.strip()]
        bad = [s for s in wanted if s not in ROWS_BY_NAME]
        if bad:
            raise ValueError(f"--rows: unknown {bad}; valid: {list(ROWS_BY_NAME)}")
        names = [r.name for r in LLM_ROWS if r.name in wanted or r.name == "sdpa_ref"]
        no_vision = no_vision or not any(w.startswith("vision") for w in wanted)
    if args.skip_stock:
        names = [n for n in names if n != "stock_eager"]
    try:
        config = load_config(args.config)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--config: {e}") from None
    llm_cfg, vision_cfg = model_dims(config, device, args.llm_overrides, args.vision_overrides)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device == "cuda" else "float32"), "--dtype", allow_auto=False)
    return {
        "device": device, "dtype": dtype,
        "lengths": lengths, "repeats": repeats, "scale": args.target_scale or (1 if device == "cuda" else 4),
        "llm_rows": [ROWS_BY_NAME[n] for n in names], "vision_rows": [] if no_vision else list(VISION_ROWS),
        "llm_cfg": llm_cfg, "vision_cfg": vision_cfg,
        "subprocesses": device == "cpu" and not args.in_process,
        "threads": args.threads if args.threads is not None else (1 if device == "cpu" else None),
        "opts": {"warmup": args.warmup, "repeats": repeats, "max_row_seconds": args.max_row_seconds,
                 "host_fraction": args.host_fraction, "capture_max_bytes": args.capture_max_bytes},
        "seed": args.seed, "vision_slices": args.vision_slices, "vision_grid": args.vision_grid,
        "json": args.json, "strict": args.strict,
    }


def run_timing(run: Dict[str, Any], meta: Dict[str, Any], skip: Dict[Tuple[int, str], Result],
               done: Callable[[List[Result]], None]) -> None:
    """Time every row in this process: per length, its rows round-robin (see :func:`execute`).

    The models are built once; the stock model shares the fork's weights. ``skip`` holds rows
    already settled (failed in a worker); a row that ran out of memory is not tried at longer
    prompts."""
    device = torch.device(run["device"])
    models = Models(run["llm_cfg"], run["vision_cfg"], device, run["dtype"], run["seed"])
    opts = run["opts"]
    if run["llm_rows"]:
        fork = models.fork()
        if any(r.model == "stock" for r in run["llm_rows"]):
            stock = models.stock("sdpa")
            meta["weights_shared"] = stock.lm_head.weight.data_ptr() == fork.lm_head.weight.data_ptr()
        if device.type == "cuda":
            meta["weights_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 2)
    oom_at: Dict[str, int] = {}
    for n in run["lengths"]:
        _cleanup(device)  # the fork's check_fits reads the free memory: release the allocator's cache first
        jobs, settled = [], []
        for row in run["llm_rows"]:
            if (n, row.name) in skip:
                settled.append(skip[(n, row.name)])
            elif row.name in oom_at:
                settled.append(Result(row.name, n, "OOM", "OOM", note=f"not run: OOM at {oom_at[row.name]} tokens"))
            else:
                jobs.append(llm_job(row, models, n, opts))
        execute([j for j in jobs if j.result.ok], device, opts["warmup"], opts["repeats"], opts["max_row_seconds"])
        for res in [j.result for j in jobs]:
            if res.status == "OOM":
                oom_at.setdefault(res.row, n)
        by_name = {r.row: r for r in [j.result for j in jobs] + settled}
        done([by_name[row.name] for row in run["llm_rows"]])
    models.drop_llm()
    if run["vision_rows"]:
        n_vision = run["vision_slices"] * run["vision_grid"] ** 2
        jobs = [vision_job(row, models, run["vision_slices"], run["vision_grid"]) for row in run["vision_rows"]
                if (n_vision, row.name) not in skip]
        execute(jobs, device, opts["warmup"], opts["repeats"], opts["max_row_seconds"])
        by_name = {j.result.row: j.result for j in jobs}
        done([by_name.get(row.name) or skip[(n_vision, row.name)] for row in run["vision_rows"]])


def run_memory_workers(run: Dict[str, Any], meta: Dict[str, Any],
                       done: Callable[[List[Result]], None]) -> Dict[Tuple[int, str], Result]:
    """CPU: the memory of each (row, length) in a fresh worker process (one warmup and one
    measured call), plus one no-op worker per model kind (same setup, no forward) as the
    ``ru_maxrss`` baseline. Returns ``{(length, row): result}``."""
    opts = dict(run["opts"], warmup=1, repeats=1)
    base_task = {"device": run["device"], "dtype": str(run["dtype"]).replace("torch.", ""), "llm": run["llm_cfg"],
                 "vision": run["vision_cfg"], "seed": run["seed"], "threads": run["threads"], "opts": opts,
                 "slices": run["vision_slices"], "grid": run["vision_grid"]}
    noop_rss: Dict[str, int] = {}

    def baseline(row: Row, length: int) -> int:
        if row.model not in noop_rss:
            _, rss, _ = spawn_worker(dict(base_task, row=row.name, length=length, noop=True))
            noop_rss[row.model] = rss
        return noop_rss[row.model]

    n_vision = run["vision_slices"] * run["vision_grid"] ** 2
    jobs = [(r, n) for n in run["lengths"] for r in run["llm_rows"]] + [(r, n_vision) for r in run["vision_rows"]]
    out: Dict[Tuple[int, str], Result] = {}
    oom_at: Dict[str, int] = {}
    for row, n in jobs:
        if row.name in oom_at:
            res = Result(row.name, n, "OOM", "OOM", note=f"not run: OOM at {oom_at[row.name]} tokens")
        else:
            res, rss, tail = spawn_worker(dict(base_task, row=row.name, length=n))
            if res is None:
                res = _worker_failure(row.name, n, tail)
            elif res.ok:
                base = baseline(row, n if row.model == "vision" else max(run["lengths"]))
                res.extra_bytes_maxrss = max(0, rss - base)
                if res.mem_method != "VmHWM reset":  # the child could not reset its peak: use the no-op diff
                    res.extra_bytes, res.mem_method = res.extra_bytes_maxrss, "ru_maxrss - no-op child"
            if res.status == "OOM":
                oom_at[row.name] = n
        out[(n, row.name)] = res
        done([res])
    meta["noop_maxrss_mib"] = {k: round(v / MIB, 1) for k, v in noop_rss.items()}
    return out


def merge_memory(timed: Result, mem: Optional[Result]) -> Result:
    """The timing pass's result with the worker's (isolated) memory figures."""
    if mem is None or not timed.ok:
        return timed
    timed.extra_bytes, timed.mem_method = mem.extra_bytes, "worker " + mem.mem_method
    timed.extra_bytes_maxrss = mem.extra_bytes_maxrss
    return timed


def run_bench(run: Dict[str, Any], command: str = "") -> int:
    """Measure, print the tables and verdicts, write ``run["json"]``; the exit status (1: a FAIL
    with ``run["strict"]``, else 0). ``command`` is recorded in the JSON's meta."""
    quiet_transformers()
    device, cfg = run["device"], run["llm_cfg"]
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": run["threads"] or torch.get_num_threads(),
        "load_avg_start": _loadavg(),
        "dtype": str(run["dtype"]).replace("torch.", ""), "torch": torch.__version__,
        "transformers": _version("transformers"), "python": platform.python_version(),
        "lengths": run["lengths"], "repeats": run["repeats"], "warmup": run["opts"]["warmup"],
        "target_scale": run["scale"],
        "llm_config": cfg, "vision_config": run["vision_cfg"], "vision_slices": run["vision_slices"],
        "vision_grid": run["vision_grid"],
        "memory_method": (
            "torch.cuda.max_memory_allocated minus the allocation before the call, max over the calls"
            if device == "cuda" else
            "peak RSS of a fresh worker process per measurement (VmHWM reset after setup; ru_maxrss minus a no-op "
            "worker's in the JSON)" if run["subprocesses"] else "in-process VmHWM reset per call (approximate)"),
        "timing": "median of the timed calls; the rows of one length run round-robin in one process",
        "prefill": "batch 1, random inputs_embeds, attention_mask of ones, use_cache=False, logits_to_keep=1, "
                   "torch.no_grad",
        "command": command,
    }
    print(f"bench_capture: {device} ({meta['device_name']}), {meta['dtype']}, lengths {run['lengths']}, "
          f"{run['repeats']} repeats + {run['opts']['warmup']} warmup; LLM {cfg['num_hidden_layers']} layers x "
          f"{cfg['num_attention_heads']} heads (kv {cfg['num_key_value_heads']}), hidden {cfg['hidden_size']}",
          flush=True)

    results: List[Result] = []
    pairs = len(run["lengths"]) * len(run["llm_rows"]) + len(run["vision_rows"])
    bar = _progress(pairs * (2 if run["subprocesses"] else 1), "bench")
    memory: Dict[Tuple[int, str], Result] = {}

    def worker_done(batch: List[Result]) -> None:
        for res in batch:
            _log(bar, res, "memory")
        bar.update(len(batch))

    def timing_done(batch: List[Result]) -> None:
        for res in batch:
            results.append(merge_memory(res, memory.get((res.length, res.row))))
            _log(bar, res, "time")
        bar.update(len(batch))

    kernel_check.reset()  # this run's own verdicts, with their cost measured here
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        if run["threads"]:
            torch.set_num_threads(run["threads"])
        if run["subprocesses"]:
            memory = run_memory_workers(run, meta, worker_done)
        skip = {k: v for k, v in memory.items() if not v.ok}
        run_timing(run, meta, skip, timing_done)
    finally:  # this may run inside a longer process (tests): leave it as it was
        bar.close()
        gc.unfreeze()
        torch.set_num_threads(threads)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["load_avg_end"] = _loadavg()
    run["kernel_checks"] = kernel_check.verdicts()
    meta["kernel_checks"] = [v.as_dict() for v in run["kernel_checks"]]
    overall = report(results, run, meta)

    if run["json"]:
        payload = {"meta": meta, "targets": {k: {"text": TARGETS[k], "verdict": v} for k, v in overall.items()},
                   "results": [public_result(r, results) for r in results]}
        atomic_write_json(run["json"], payload)
    return 1 if run["strict"] and any(v == "FAIL" for v in overall.values()) else 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "?"

