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
on the CPU a scaled-down float32 model (see ``CPU_LLM``/``CPU_VISION``).

Time is the median of the timed calls (after a warmup call); the rows of one length run
round-robin in one process, so load changes on a shared machine hit all of them alike.
Memory is the peak above the state before the call (weights and inputs already there): on
CUDA ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call; on the
CPU each (row, length) also runs in a fresh ``--worker`` subprocess that resets its peak RSS
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
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

GIB = 1 << 30
MIB = 1 << 20
RESULT_TAG = "@@BENCH_RESULT@@"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "golden" / "MiniCPM-V-2_6.config.json"

# MiniCPM-V-2.6's true shapes (its config.json); used when --config is not given and the
# golden copy is not next to the repository.
TRUE_CONFIG: Dict[str, Any] = {
    "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 151666, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False, "bos_token_id": 151643,
    "eos_token_id": 151645, "query_num": 64,
    "vision_config": {"model_type": "siglip", "hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
}
# The CPU's scaled-down model (a few minutes on 2 cores): LLM widths / 16 (head_dim 32), heads / 4
# with the same 7:1 grouped-query ratio, 4 layers; SigLIP with its head_dim 72, 2 heads, 4 layers.
CPU_LLM = {"hidden_size": 224, "intermediate_size": 1184, "num_hidden_layers": 4, "num_attention_heads": 7,
           "num_key_value_heads": 1, "vocab_size": 2048}
CPU_VISION = {"hidden_size": 144, "intermediate_size": 538, "num_hidden_layers": 4, "num_attention_heads": 2}
LLM_FIELDS = ("hidden_act", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "tie_word_embeddings", "bos_token_id", "eos_token_id")

GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384)
CPU_LENGTHS = (256, 512, 1024, 2048)
QUICK_GPU_LENGTHS = (1024, 4096)
QUICK_CPU_LENGTHS = (256, 1024)


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    model: str  # "stock" | "fork" | "vision"
    impl: str  # attention implementation
    capture: Any = None  # output_attentions value


LLM_ROWS = (
    Row("sdpa_ref", "stock Qwen2 SDPA (reference)", "stock", "sdpa", False),
    Row("fork_off", "fork, capture off", "fork", "sdpa", False),
    Row("stock_eager", "stock eager + output_attentions", "stock", "eager", True),
    Row("fork_last", "fork (a) last-token rows", "fork", "sdpa", {"stages": ["llm"], "rows": "last"}),
    Row("fork_mean", "fork (b) head-mean maps", "fork", "sdpa", {"stages": ["llm"], "reduce": "mean"}),
    Row("fork_full_cpu", "fork (c) full maps -> CPU", "fork", "sdpa", {"stages": ["llm"], "device": "cpu"}),
)
VISION_ROWS = (
    Row("vision_eager", "SigLIP upstream-style eager", "vision", "eager"),
    Row("vision_sdpa", "SigLIP fork SDPA", "vision", "sdpa"),
)
ROWS_BY_NAME = {r.name: r for r in LLM_ROWS + VISION_ROWS}


@dataclass
class Result:
    row: str
    length: int  # LLM tokens; for vision rows: slices * patches per slice
    status: str = "ok"  # ok | OOM | refused | skipped | error
    message: str = ""
    time_ms: Optional[float] = None
    times_ms: List[float] = field(default_factory=list)
    min_ms: Optional[float] = None
    extra_bytes: Optional[int] = None  # peak above the post-setup state
    mem_method: str = ""
    extra_bytes_maxrss: Optional[int] = None  # CPU workers: child ru_maxrss - no-op child ru_maxrss
    captured_bytes: Optional[int] = None
    estimate: Optional[Dict[str, int]] = None
    logits: Optional[List[float]] = None  # a sample of the last-token logits (sanity check)
    logit_diff: Optional[float] = None  # max |logits - sdpa_ref logits|
    target: str = ""
    verdict: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------------------------
# models and inputs
# --------------------------------------------------------------------------------------------
def load_config(path: Optional[str]) -> Dict[str, Any]:
    if path:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if DEFAULT_CONFIG.is_file():
        with open(DEFAULT_CONFIG, encoding="utf-8") as f:
            return json.load(f)
    return json.loads(json.dumps(TRUE_CONFIG))


def model_dims(config: Dict[str, Any], device: str, llm_overrides: Dict[str, Any],
               vision_overrides: Dict[str, Any]):
    """(llm fields, vision config) for the device: the true shapes on CUDA, scaled on the CPU."""
    llm = {k: config[k] for k in LLM_FIELDS if k in config}
    vision = dict(config.get("vision_config") or TRUE_CONFIG["vision_config"])
    if device == "cpu":
        llm.update(CPU_LLM)
        vision.update(CPU_VISION)
    llm.update(llm_overrides)
    vision.update(vision_overrides)
    for key, fallback in (("bos_token_id", 0), ("eos_token_id", 1)):  # keep special ids inside a scaled vocab
        if llm.get(key) is not None and llm[key] >= llm["vocab_size"]:
            llm[key] = fallback
    return llm, vision


@contextmanager
def constructing(device: torch.device, dtype: torch.dtype):
    """Build modules directly on ``device`` in ``dtype`` (no float32 copy on the host)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def seeded_init_(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Deterministic random weights by parameter name: the same name gets the same tensor in
    every process and in both the fork and the stock model (their keys are identical)."""
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if "norm" in name and name.endswith("weight"):
            t.fill_(1.0)
            continue
        g = torch.Generator(device=t.device)
        g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        t.normal_(0.0, std, generator=g)


def set_impl(model, impl: str) -> None:
    """Switch a stock transformers model between eager and sdpa attention."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(impl)
    else:  # transformers 4.4x
        model.config._attn_implementation = impl
    if model.config._attn_implementation != impl:
        raise RuntimeError(f"could not switch the stock model to attn_implementation={impl!r}")


class Models:
    """The models one process needs, built lazily; the stock model shares the fork's tensors."""

    def __init__(self, llm: Dict[str, Any], vision: Dict[str, Any], device: torch.device, dtype: torch.dtype,
                 seed: int):
        self.llm_cfg, self.vision_cfg = llm, vision
        self.device, self.dtype, self.seed = device, dtype, seed
        self._fork = self._stock = self._vision = None

    def fork(self):
        if self._fork is None:
            from minicpmv_attn import MiniCPMVConfig
            from minicpmv_attn.modeling_qwen2 import Qwen2ForCausalLM

            cfg = MiniCPMVConfig(**self.llm_cfg, use_cache=False)
            cfg._attn_implementation = "sdpa"
            with constructing(self.device, self.dtype):
                model = Qwen2ForCausalLM(cfg)
            model.to(dtype=self.dtype).eval()
            if self._stock is not None:
                model.load_state_dict(self._stock.state_dict(), strict=True, assign=True)
            else:
                seeded_init_(model, self.seed)
            self._fork = model
        return self._fork

    def stock(self, impl: str):
        if self._stock is None:
            import transformers

            cfg = transformers.Qwen2Config(**self.llm_cfg, use_cache=False)
            with constructing(self.device, self.dtype):
                model = transformers.Qwen2ForCausalLM(cfg)
            model.to(dtype=self.dtype).eval()
            if self._fork is not None:  # share storage: one copy of the weights
                model.load_state_dict(self._fork.state_dict(), strict=True, assign=True)
            else:
                seeded_init_(model, self.seed)
            self._stock = model
            _cleanup(self.device)
        set_impl(self._stock, impl)
        return self._stock

    def vision(self):
        if self._vision is None:
            from minicpmv_attn.modeling_navit_siglip import SiglipVisionConfig, SiglipVisionTransformer

            with constructing(self.device, self.dtype):
                model = SiglipVisionTransformer(SiglipVisionConfig(**self.vision_cfg))
            model.to(dtype=self.dtype).eval()
            seeded_init_(model, self.seed)
            self._vision = model
        return self._vision

    def drop_llm(self):
        self._fork = self._stock = None
        _cleanup(self.device)

    def llm_inputs(self, n: int):
        g = torch.Generator().manual_seed(self.seed + n)
        x = torch.randn(1, n, self.llm_cfg["hidden_size"], generator=g).to(self.device, self.dtype)
        return x, torch.ones(1, n, dtype=torch.long, device=self.device)

    def vision_inputs(self, slices: int, grid: int):
        patch = int(self.vision_cfg.get("patch_size", 14))
        g = torch.Generator().manual_seed(self.seed + 7)
        pixels = torch.randn(slices, 3, patch, patch * grid * grid, generator=g).to(self.device, self.dtype)
        mask = torch.ones(slices, 1, grid * grid, dtype=torch.bool, device=self.device)
        sizes = torch.tensor([[grid, grid]] * slices, dtype=torch.int32)
        return pixels, mask, sizes


# --------------------------------------------------------------------------------------------
# memory and timing
# --------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_available_bytes() -> int:
    from minicpmv_attn.capture import _free_bytes

    return _free_bytes(torch.device("cpu"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cleanup(device: torch.device, empty_cache: bool = True) -> None:
    gc.collect()  # cheap once the setup's objects are frozen (see execute)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if empty_cache:
            torch.cuda.empty_cache()


def _is_capture_too_large(exc: BaseException) -> bool:
    from minicpmv_attn.capture import CaptureTooLarge

    return isinstance(exc, CaptureTooLarge)


def _classify(exc: BaseException) -> Tuple[str, str, str]:
    """(status, message, note) of a failed call: refused / OOM / error."""
    text = str(exc)
    if _is_capture_too_large(exc):
        return "refused", f"refused ({_needs(text)})", text
    oom_cls = getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(exc, (MemoryError, oom_cls)) or (
            isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)):
        return "OOM", "OOM", (text.splitlines() or [""])[0][:300]
    return "error", f"error: {type(exc).__name__}", traceback.format_exc()[-2000:]


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"


def _needs(message: str) -> str:
    import re

    m = re.search(r"needs about ([0-9.]+ GiB)", message)
    return f"needs {m.group(1)}" if m else "too large"


@dataclass
class Job:
    """One row ready to run: ``run()`` is one forward, ``summarize(out)`` keeps what the report needs."""

    result: Result
    run: Callable[[], Any]
    summarize: Callable[[Any], Dict[str, Any]]
    times: List[float] = field(default_factory=list)
    peak: int = 0
    calls: int = 0
    quota: Optional[int] = None  # timed repeats for a slow row
    before: Optional[Callable[[], None]] = None  # untimed, before each call


def _one_call(job: Job, device: torch.device) -> float:
    """One timed call; its peak memory above the state before it goes into ``job.peak``."""
    if job.before is not None:
        job.before()
    _cleanup(device, empty_cache=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _reset_peak_rss()
        base = (_proc_status_kib("VmRSS") or 0) * 1024
    _sync(device)
    t0 = time.perf_counter()
    out = job.run()
    _sync(device)
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = (_proc_status_kib("VmHWM") or 0) * 1024 - base
    job.peak = max(job.peak, int(peak))
    if job.calls == 0:
        for key, value in job.summarize(out).items():
            setattr(job.result, key, value)
    job.calls += 1
    del out  # outside the timed region; never two outputs alive at once
    return dt


def execute(jobs: List[Job], device: torch.device, warmup: int, repeats: int, max_seconds: float) -> None:
    """Run ``jobs`` round-robin (warmup rounds, then timed rounds) and fill their results.

    Interleaving the rows makes load changes on a shared machine hit all rows alike. Time is
    the median of the timed calls; memory the largest per-call peak above the state before
    the call (CUDA: ``max_memory_allocated``; CPU: VmHWM after a reset, approximate in a
    process that already ran other rows). A row whose first call is slow gets fewer timed
    calls (``max_seconds`` in all, at least one). A failing row (CaptureTooLarge, out of
    memory, error) leaves the rotation with that status.
    """
    _cleanup(device)
    gc.freeze()  # models, inputs, imports: later gc.collect() calls only scan what the calls create
    if device.type == "cuda":
        method = "cuda max_memory_allocated"
    else:
        method = "VmHWM reset" if _reset_peak_rss() else "VmHWM (no reset)"
    repeats = max(1, repeats)
    for rnd in range(warmup + repeats):
        shift = rnd % max(1, len(jobs))  # rotate the order: no row always runs first
        for job in jobs[shift:] + jobs[:shift]:
            res = job.result
            if not res.ok or (job.quota is not None and rnd >= warmup + job.quota):
                continue
            failure = None
            try:
                dt = _one_call(job, device)
            except Exception as e:  # noqa: BLE001 - reported in the table
                failure = _classify(e)
            if failure is not None:  # outside the except block: the traceback's tensors are gone
                _cleanup(device)
                res.status, res.message, res.note = failure
                continue
            if rnd >= warmup:
                job.times.append(dt)
            if rnd == 0 and dt * repeats > max_seconds:
                job.quota = max(1, min(repeats, int(max_seconds // max(dt, 1e-9))))
    _cleanup(device)
    for job in jobs:
        res = job.result
        if res.ok and job.times:
            res.times_ms = [t * 1e3 for t in job.times]
            res.time_ms = statistics.median(job.times) * 1e3
            res.min_ms = min(job.times) * 1e3
            res.extra_bytes, res.mem_method = max(0, job.peak), method


# --------------------------------------------------------------------------------------------
# the rows
# --------------------------------------------------------------------------------------------
def _llm_summary(out) -> Dict[str, Any]:
    att = getattr(out, "attentions", None) or ()
    return {"captured_bytes": int(sum(a.numel() * a.element_size() for a in att)),
            "logits": out.logits[0, -1, :1024].float().cpu().tolist()}


def capture_precheck(row: Row, models: Models, n: int, capture_max_bytes: Optional[int],
                     host_fraction: float) -> Tuple[Any, Result]:
    """The fork's own estimate and refusal (``check_fits``), plus the bench's host-memory guard."""
    from minicpmv_attn.capture import CaptureSpec, CaptureTooLarge, check_fits, estimate_bytes

    spec_dict = dict(row.capture)
    if capture_max_bytes is not None:
        spec_dict["max_bytes"] = int(capture_max_bytes)
    spec = CaptureSpec.from_flag(spec_dict)
    cfg = models.llm_cfg
    dims = {"layers": {"llm": cfg["num_hidden_layers"]}, "heads": {"llm": cfg["num_attention_heads"]},
            "query_num": 64}
    est = estimate_bytes(spec, dims, 1, n, compute_dtype=models.dtype, device=models.device)
    stored = sum(v for k, v in est.items() if k != "workspace")
    target = torch.device(spec.device) if spec.device is not None else models.device
    need = stored + (est.get("workspace", 0) if target == models.device else 0)
    try:
        check_fits(spec, est, models.device)
    except CaptureTooLarge as e:
        return spec_dict, Result(row.name, n, "refused", f"refused (needs {_size(need)})", estimate=est,
                                 note=str(e).split(". Select")[0])
    if target.type == "cpu":
        # the maps land in host memory next to the pieces being computed; stay well inside it
        avail = host_available_bytes()
        if stored > host_fraction * avail:
            return spec_dict, Result(
                row.name, n, "skipped", f"skipped (needs ~{_size(stored)} host)", estimate=est,
                note=f"{stored / GIB:.1f} GiB captured > {host_fraction:g} x {avail / GIB:.0f} GiB free host "
                     f"memory (--host-fraction)")
    return spec_dict, Result(row.name, n, estimate=est)


def llm_job(row: Row, models: Models, n: int, opts: Dict[str, Any]) -> Job:
    """A job for an LLM row (already failed, e.g. refused, if its capture cannot fit)."""
    spec, res = row.capture, Result(row.name, n)
    if isinstance(row.capture, dict):
        spec, res = capture_precheck(row, models, n, opts.get("capture_max_bytes"), opts["host_fraction"])
        if not res.ok:
            return Job(res, lambda: None, lambda out: {})
    model = models.fork() if row.model == "fork" else models.stock(row.impl)
    x, mask = models.llm_inputs(n)

    def run():
        with torch.no_grad():
            return model(inputs_embeds=x, attention_mask=mask, output_attentions=spec, use_cache=False,
                         logits_to_keep=1)

    # one stock model serves sdpa_ref and stock_eager: switch it (untimed) before each call
    before = (lambda: set_impl(model, row.impl)) if row.model == "stock" else None
    return Job(res, run, _llm_summary, before=before)


def vision_job(row: Row, models: Models, slices: int, grid: int) -> Job:
    model = models.vision()
    pixels, mask, sizes = models.vision_inputs(slices, grid)

    def run():
        with torch.no_grad():
            return model(pixels, patch_attention_mask=mask, tgt_sizes=sizes, implementation=row.impl)

    return Job(Result(row.name, slices * grid * grid), run, lambda out: {})


# --------------------------------------------------------------------------------------------
# CPU workers: one fresh process per memory measurement
# --------------------------------------------------------------------------------------------
def worker_main(task: Dict[str, Any]) -> int:
    """``--worker TASK``: build what one measurement needs, run it, print ``RESULT_TAG {json}``."""
    _quiet_transformers()
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    device, dtype = torch.device(task["device"]), _DTYPES[task["dtype"]]
    models = Models(task["llm"], task["vision"], device, dtype, task["seed"])
    opts = task["opts"]
    row = ROWS_BY_NAME[task["row"]]
    try:
        if task.get("noop"):  # same setup, no forward: the baseline for ru_maxrss
            if row.model == "vision":
                held = (models.vision(), models.vision_inputs(task["slices"], task["grid"]))
            else:
                held = (models.fork() if row.model == "fork" else models.stock(row.impl),
                        models.llm_inputs(task["length"]))
            res = Result(row.name, task["length"], message=f"noop ({len(held)} objects held)")
        else:
            if row.model == "vision":
                job = vision_job(row, models, task["slices"], task["grid"])
            else:
                job = llm_job(row, models, task["length"], opts)
            execute([job], device, opts["warmup"], opts["repeats"], opts["max_row_seconds"])
            res = job.result
    except Exception as e:  # noqa: BLE001
        res = Result(row.name, task.get("length", 0), "error", f"error: {type(e).__name__}",
                     note=traceback.format_exc()[-2000:])
    sys.stdout.write(RESULT_TAG + " " + json.dumps(asdict(res)) + "\n")
    sys.stdout.flush()
    return 0


def spawn_worker(task: Dict[str, Any]) -> Tuple[Optional[Result], int, str]:
    """Run one worker; returns (its result, its ru_maxrss in bytes, its stderr tail)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-3000:]
    maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_TAG):
            return Result(**json.loads(line[len(RESULT_TAG):])), maxrss, tail
    return None, maxrss, f"worker exit status {proc.returncode}\n{tail}"


def _worker_failure(row: str, length: int, rc_tail: str) -> Result:
    killed = "exit status -9" in rc_tail or "exit status 137" in rc_tail
    return Result(row, length, "OOM" if killed else "error", "OOM (killed)" if killed else "error: worker failed",
                  note=rc_tail[-1500:])


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------
TARGETS = {
    "off": "capture off (fork_off) within 2% of SDPA time at every length",
    "a": "(a) last-token rows: <= 1.10x SDPA time at every length to 16k; extra memory < 5% of stock eager's at 4k",
    "b": "(b) head-mean maps: runs at 8k and 16k; <= 2x SDPA time at 8k",
    "c": "(c) full maps to CPU: at 4k no slower than stock eager; GPU peak <= SDPA's + one chunk (workspace)",
}


def evaluate(results: List[Result], scale: int, device: str) -> Dict[str, str]:
    """Fill each row's target/verdict; return the overall verdict per target."""
    l4, l8, l16 = 4096 // scale, 8192 // scale, 16384 // scale
    by = {(r.length, r.row): r for r in results}
    per_target: Dict[str, List[str]] = {k: [] for k in TARGETS}

    def ratio(r: Result) -> Optional[float]:
        ref = by.get((r.length, "sdpa_ref"))
        if r.ok and ref is not None and ref.ok and ref.time_ms:
            return r.time_ms / ref.time_ms
        return None

    for r in results:
        ref = by.get((r.length, "sdpa_ref"))
        eager = by.get((r.length, "stock_eager"))
        rt = ratio(r)
        if r.row in ("sdpa_ref", "stock_eager") or r.row.startswith("vision"):
            r.target, r.verdict = "-", "-"
            continue
        checks: List[Optional[bool]] = []
        notes: List[str] = []
        if r.row == "fork_off":
            r.target = "<=1.02x SDPA"
            checks.append(None if rt is None else rt <= 1.02)
            key = "off"
        elif r.row == "fork_last":
            key = "a"
            if r.length > l16:
                r.target, r.verdict = "n.a.", "n.a."
                continue
            r.target = "<=1.10x SDPA"
            checks.append(None if rt is None else rt <= 1.10)
            if r.length == l4:
                r.target += ", mem <5% eager"
                if r.ok and eager is not None and eager.ok and eager.extra_bytes:
                    frac = r.extra_bytes / eager.extra_bytes
                    notes.append(f"mem {100 * frac:.1f}% of stock eager's")
                    checks.append(frac < 0.05)
                elif r.ok and eager is not None and eager.status == "OOM":
                    notes.append("stock eager OOM")
                    checks.append(True)
                elif r.ok:
                    notes.append("memory part n.a.: stock eager not measured")
                    checks.append(None)
        elif r.row == "fork_mean":
            key = "b"
            if r.length == l8:
                r.target = "runs, <=2x SDPA"
                checks.append(False if not r.ok else (None if rt is None else rt <= 2.0))
            elif r.length == l16:
                r.target = "runs"
                checks.append(r.ok)
            else:
                r.target, r.verdict = "n.a.", "n.a."
                continue
        elif r.row == "fork_full_cpu":
            key = "c"
            if r.length != l4:
                r.target, r.verdict = "n.a.", "n.a."
                continue
            r.target = "<= eager time" + (", GPU <= SDPA + chunk" if device == "cuda" else "")
            if not r.ok:
                checks.append(False)
            else:
                if eager is not None and eager.ok:
                    checks.append(r.time_ms <= eager.time_ms)
                    notes.append(f"{r.time_ms / eager.time_ms:.2f}x eager time")
                elif eager is not None and eager.status == "OOM":
                    checks.append(True)
                    notes.append("stock eager OOM")
                else:
                    checks.append(None)
                if device == "cuda":
                    ws = (r.estimate or {}).get("workspace", 0)
                    if ref is not None and ref.ok:
                        budget = ref.extra_bytes + ws
                        checks.append(r.extra_bytes <= budget)
                        notes.append(f"GPU peak {r.extra_bytes / MIB:.0f} MiB vs SDPA's {ref.extra_bytes / MIB:.0f}"
                                     f" + the fork's chunk workspace estimate {ws / MIB:.0f} MiB")
                    else:
                        checks.append(None)
                else:
                    notes.append("memory part n.a. on CPU (maps live in the same memory)")
        else:
            continue
        if r.status in ("refused", "OOM", "error"):  # the row did not run where a target applies
            checks.append(False)
        if any(c is False for c in checks):
            r.verdict = "FAIL"
        elif checks and all(c is True for c in checks):
            r.verdict = "PASS"
        else:
            r.verdict = "n.a."
        r.note = "; ".join(filter(None, [r.note] + notes)) if notes else r.note
        per_target[key].append(r.verdict)

    overall = {}
    measured = {r.length for r in results if not r.row.startswith("vision")}
    required = {"off": set(), "a": {l4}, "b": {l8, l16}, "c": {l4}}  # target lengths each target names
    for key, verdicts in per_target.items():
        complete = required[key] <= measured and verdicts and all(v == "PASS" for v in verdicts)
        if "FAIL" in verdicts:
            overall[key] = "FAIL"
        elif complete:
            overall[key] = "PASS"
        elif "PASS" in verdicts:
            overall[key] = "PASS (partial: not every target length measured)"
        else:
            overall[key] = "n.a."
    return overall


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def llm_table(results: List[Result]) -> List[str]:
    by = {(r.length, r.row): r for r in results}
    lines = ["| tokens | row | status | time (ms) | x SDPA | peak extra (MiB) | x SDPA mem | captured (MiB) "
             "| target | verdict |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        if r.row.startswith("vision"):
            continue
        ref = by.get((r.length, "sdpa_ref"))
        tr = mr = None
        if r.ok and ref is not None and ref.ok:
            tr = r.time_ms / ref.time_ms if ref.time_ms else None
            mr = r.extra_bytes / ref.extra_bytes if ref.extra_bytes else None
        status = "ok" if r.ok else r.message
        lines.append(
            f"| {r.length} | {r.row} | {status} | {_fmt(r.time_ms, '.1f')} | {_fmt(tr, '.2f')} | "
            f"{_fmt(None if r.extra_bytes is None else r.extra_bytes / MIB, '.0f')} | {_fmt(mr, '.2f')} | "
            f"{_fmt(None if not r.captured_bytes else r.captured_bytes / MIB, '.1f')} | {r.target or '-'} | "
            f"{r.verdict or '-'} |")
    return lines


def vision_table(results: List[Result], slices: int, grid: int) -> List[str]:
    by = {r.row: r for r in results if r.row.startswith("vision")}
    if not by:
        return []
    lines = ["| vision input | row | status | time (ms) | peak extra (MiB) | speedup vs eager |",
             "|---|---|---|---:|---:|---:|"]
    eager = by.get("vision_eager")
    for r in by.values():
        sp = (eager.time_ms / r.time_ms) if (r.ok and eager is not None and eager.ok) else None
        mib = None if r.extra_bytes is None else r.extra_bytes / MIB
        lines.append(f"| {slices} x {grid}x{grid} patches | {r.row} | {'ok' if r.ok else r.message} | "
                     f"{_fmt(r.time_ms, '.1f')} | {_fmt(mib, '.0f')} | {_fmt(sp, '.2f')} |")
    return lines


def logit_check(results: List[Result]) -> Dict[str, float]:
    """Max |last-token logits - sdpa_ref's| per row over lengths (same weights, same inputs)."""
    by = {(r.length, r.row): r for r in results}
    worst: Dict[str, float] = {}
    for r in results:
        ref = by.get((r.length, "sdpa_ref"))
        if r.row == "sdpa_ref" or not r.logits or ref is None or not ref.logits:
            continue
        a, b = torch.tensor(r.logits), torch.tensor(ref.logits)
        r.logit_diff = float((a - b).abs().max())
        worst[r.row] = max(worst.get(r.row, 0.0), r.logit_diff)
    return worst


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _json_arg(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _lengths_arg(text: str) -> List[int]:
    try:
        out = [int(t.lower().replace("k", "")) * (1024 if t.lower().endswith("k") else 1)
               for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths {text!r}: expected e.g. 1024,2048 or 1k,2k") from None
    if not out or any(n < 2 for n in out):
        raise argparse.ArgumentTypeError("--lengths: at least one length >= 2")
    return out


def build_parser() -> argparse.ArgumentParser:
    intro = textwrap.fill(
        "Benchmark the fork's attention capture against SDPA and stock eager attention on MiniCPM-V-2.6's Qwen2 "
        "LLM (true shapes with random bf16 weights on CUDA; a scaled-down float32 model on the CPU), and the "
        "SigLIP vision tower eager vs SDPA. Prints time, peak extra memory, the ratios to SDPA and "
        "PASS/FAIL/n.a. against the targets:", 100)
    rows = "\n".join(f"  {r.name:<14} {r.label}" for r in LLM_ROWS + VISION_ROWS)
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
    p.add_argument("--lengths", type=_lengths_arg, default=None,
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
    p.add_argument("--config", metavar="FILE", default=None,
                   help="model config.json (default: shared/golden/MiniCPM-V-2_6.config.json, else built-in)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
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


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


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


def resolve(args, parser) -> Dict[str, Any]:
    """Turn the parsed flags into the run's settings (device, dtype, lengths, rows, configs)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    if repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.vision_slices < 1 or args.vision_grid < 1:
        parser.error("--vision-slices and --vision-grid must be >= 1")
    if args.lengths:
        lengths = args.lengths
    elif args.quick:
        lengths = list(QUICK_GPU_LENGTHS if device == "cuda" else QUICK_CPU_LENGTHS)
    else:
        lengths = list(GPU_LENGTHS if device == "cuda" else CPU_LENGTHS)
    names, no_vision = [r.name for r in LLM_ROWS], args.no_vision
    if args.rows:
        wanted = [s.strip() for s in args.rows.split(",") if s.strip()]
        bad = [s for s in wanted if s not in ROWS_BY_NAME]
        if bad:
            parser.error(f"--rows: unknown {bad}; valid: {list(ROWS_BY_NAME)}")
        names = [r.name for r in LLM_ROWS if r.name in wanted or r.name == "sdpa_ref"]
        no_vision = no_vision or not any(w.startswith("vision") for w in wanted)
    if args.skip_stock:
        names = [n for n in names if n != "stock_eager"]
    try:
        config = load_config(args.config)
    except (OSError, json.JSONDecodeError) as e:
        parser.error(f"--config: {e}")
    llm_cfg, vision_cfg = model_dims(config, device, args.llm_overrides, args.vision_overrides)
    return {
        "device": device, "dtype": _DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")],
        "lengths": lengths, "repeats": repeats, "scale": args.target_scale or (1 if device == "cuda" else 4),
        "llm_rows": [ROWS_BY_NAME[n] for n in names], "vision_rows": [] if no_vision else list(VISION_ROWS),
        "llm_cfg": llm_cfg, "vision_cfg": vision_cfg,
        "subprocesses": device == "cpu" and not args.in_process,
        "threads": args.threads if args.threads is not None else (1 if device == "cpu" else None),
        "opts": {"warmup": args.warmup, "repeats": repeats, "max_row_seconds": args.max_row_seconds,
                 "host_fraction": args.host_fraction, "capture_max_bytes": args.capture_max_bytes},
    }


def run_timing(run: Dict[str, Any], args, meta: Dict[str, Any], skip: Dict[Tuple[int, str], Result],
               done: Callable[[List[Result]], None]) -> None:
    """Time every row in this process: per length, its rows round-robin (see :func:`execute`).

    The models are built once; the stock model shares the fork's weights. ``skip`` holds rows
    already settled (failed in a worker); a row that ran out of memory is not tried at longer
    prompts."""
    device = torch.device(run["device"])
    models = Models(run["llm_cfg"], run["vision_cfg"], device, run["dtype"], args.seed)
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
        n_vision = args.vision_slices * args.vision_grid ** 2
        jobs = [vision_job(row, models, args.vision_slices, args.vision_grid) for row in run["vision_rows"]
                if (n_vision, row.name) not in skip]
        execute(jobs, device, opts["warmup"], opts["repeats"], opts["max_row_seconds"])
        by_name = {j.result.row: j.result for j in jobs}
        done([by_name.get(row.name) or skip[(n_vision, row.name)] for row in run["vision_rows"]])


def run_memory_workers(run: Dict[str, Any], args, meta: Dict[str, Any],
                       done: Callable[[List[Result]], None]) -> Dict[Tuple[int, str], Result]:
    """CPU: the memory of each (row, length) in a fresh worker process (one warmup and one
    measured call), plus one no-op worker per model kind (same setup, no forward) as the
    ``ru_maxrss`` baseline. Returns ``{(length, row): result}``."""
    opts = dict(run["opts"], warmup=1, repeats=1)
    base_task = {"device": run["device"], "dtype": str(run["dtype"]).replace("torch.", ""), "llm": run["llm_cfg"],
                 "vision": run["vision_cfg"], "seed": args.seed, "threads": run["threads"], "opts": opts,
                 "slices": args.vision_slices, "grid": args.vision_grid}
    noop_rss: Dict[str, int] = {}

    def baseline(row: Row, length: int) -> int:
        if row.model not in noop_rss:
            _, rss, _ = spawn_worker(dict(base_task, row=row.name, length=length, noop=True))
            noop_rss[row.model] = rss
        return noop_rss[row.model]

    n_vision = args.vision_slices * args.vision_grid ** 2
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


def report(results: List[Result], run: Dict[str, Any], args, meta: Dict[str, Any]) -> Dict[str, str]:
    """Print the tables, the target verdicts and the notes; return the overall verdicts."""
    overall = evaluate(results, run["scale"], run["device"])
    worst = logit_check(results)
    print()
    print("\n".join(llm_table(results)))
    vt = vision_table(results, args.vision_slices, args.vision_grid)
    if vt:
        print()
        print("\n".join(vt))
    print()
    where = ("H100 targets" if run["scale"] == 1 else
             f"H100 targets, checked here at lengths / {run['scale']} (indicative only)")
    print(f"Targets ({where}):")
    for key, text in TARGETS.items():
        print(f"  {overall[key]:<5}  {text}")
    notes = [f"  {r.length} {r.row}: {r.note}" for r in results
             if r.note and r.status != "error" and (r.verdict in ("PASS", "FAIL") or not r.ok)]
    errors = [f"  {r.length} {r.row}: {r.note.strip().splitlines()[-1] if r.note else r.message}"
              for r in results if r.status == "error"]
    if notes:
        print("Notes:\n" + "\n".join(notes))
    if errors:
        print("Errors:\n" + "\n".join(errors))
    if worst:
        print("Sanity: max |last-token logits - sdpa_ref| " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    load = ""
    if run["device"] == "cpu" and meta.get("load_avg_start"):
        load = (f" Load average {meta['load_avg_start'][0]:.1f} -> {meta['load_avg_end'][0]:.1f} on "
                f"{meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads.")
    print(f"Wall time {meta['wall_s']:.0f} s.{load} Memory: {meta['memory_method']}. Prefill: {meta['prefill']}.")
    meta["logit_max_abs_diff"] = worst
    return overall


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker_main(json.loads(args.worker))
    _quiet_transformers()
    run = resolve(args, parser)
    device, cfg = run["device"], run["llm_cfg"]
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": run["threads"] or torch.get_num_threads(),
        "load_avg_start": _loadavg(),
        "dtype": str(run["dtype"]).replace("torch.", ""), "torch": torch.__version__,
        "transformers": _version("transformers"), "python": platform.python_version(),
        "lengths": run["lengths"], "repeats": run["repeats"], "warmup": args.warmup, "target_scale": run["scale"],
        "llm_config": cfg, "vision_config": run["vision_cfg"], "vision_slices": args.vision_slices,
        "vision_grid": args.vision_grid,
        "memory_method": (
            "torch.cuda.max_memory_allocated minus the allocation before the call, max over the calls"
            if device == "cuda" else
            "peak RSS of a fresh worker process per measurement (VmHWM reset after setup; ru_maxrss minus a no-op "
            "worker's in the JSON)" if run["subprocesses"] else "in-process VmHWM reset per call (approximate)"),
        "timing": "median of the timed calls; the rows of one length run round-robin in one process",
        "prefill": "batch 1, random inputs_embeds, attention_mask of ones, use_cache=False, logits_to_keep=1, "
                   "torch.no_grad",
        "command": "python scripts/bench_capture.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(f"bench_capture: {device} ({meta['device_name']}), {meta['dtype']}, lengths {run['lengths']}, "
          f"{run['repeats']} repeats + {args.warmup} warmup; LLM {cfg['num_hidden_layers']} layers x "
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

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        if run["threads"]:
            torch.set_num_threads(run["threads"])
        if run["subprocesses"]:
            memory = run_memory_workers(run, args, meta, worker_done)
        skip = {k: v for k, v in memory.items() if not v.ok}
        run_timing(run, args, meta, skip, timing_done)
    finally:  # main() may run inside a longer process (tests): leave it as it was
        bar.close()
        gc.unfreeze()
        torch.set_num_threads(threads)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["load_avg_end"] = _loadavg()
    overall = report(results, run, args, meta)

    if args.json:
        payload = {"meta": meta, "targets": {k: {"text": TARGETS[k], "verdict": v} for k, v in overall.items()},
                   "results": [_public(r, results) for r in results]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
    return 1 if args.strict and any(v == "FAIL" for v in overall.values()) else 0


def _public(r: Result, results: List[Result]) -> Dict[str, Any]:
    """A result as JSON, with its label and ratios to the SDPA reference (no logits sample)."""
    d = asdict(r)
    d.pop("logits", None)
    d["label"] = ROWS_BY_NAME[r.row].label
    ref = next((x for x in results if x.row == "sdpa_ref" and x.length == r.length), None)
    ok = r.ok and ref is not None and ref.ok
    d["time_ratio_sdpa"] = r.time_ms / ref.time_ms if ok and ref.time_ms else None
    d["mem_ratio_sdpa"] = r.extra_bytes / ref.extra_bytes if ok and ref.extra_bytes else None
    return d


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


if __name__ == "__main__":
    sys.exit(main())
