"""The benchmark's measurements: rows, models, timing and memory, CPU worker processes.

Per prompt length one batch-1 prefill (random ``inputs_embeds``, ``torch.no_grad``,
``use_cache=False``, ``logits_to_keep=1``) of each row of ``LLM_ROWS`` (stock SDPA, the
fork with capture off, stock eager + ``output_attentions``, the fork's captures (a), (b),
(c)), and the SigLIP vision tower eager vs SDPA (``VISION_ROWS``). The fork and the stock
model share one random state dict (identical keys). On CUDA the true shapes are used in
bfloat16; on the CPU a scaled-down float32 model (``CPU_LLM`` / ``CPU_VISION``).

Time is the median of the timed calls (after a warmup call); the rows of one length run
round-robin in one process (:func:`execute`). Memory is the peak above the state before
the call: on CUDA ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the
call; on the CPU each (row, length) also runs in a fresh worker process
(``python -m minicpmv_attn.bench.worker TASK``, :func:`spawn_worker`) that resets its peak RSS
(VmHWM via ``/proc/self/clear_refs``) after setup and reports the peak of its call. A capture
whose estimate cannot fit is refused by the fork (``CaptureTooLarge``, before allocating);
stock eager running out of memory is reported as "OOM".
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..capture import resolve_dtype

GIB = 1 << 30
MIB = 1 << 20
RESULT_TAG = "@@BENCH_RESULT@@"
WORKER_MODULE = "minicpmv_attn.bench.worker"  # python -m WORKER_MODULE TASK_JSON

# MiniCPM-V-2.6's true shapes (its config.json); used when no config file is given.
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
    """The model config.json at ``path``; None: a copy of ``TRUE_CONFIG``."""
    if path:
        with open(path, encoding="utf-8") as f:
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
    from ..attention import set_attention_implementation

    model = models.vision()
    pixels, mask, sizes = models.vision_inputs(slices, grid)

    def run():
        with torch.no_grad():
            return model(pixels, patch_attention_mask=mask, tgt_sizes=sizes)

    # one tower serves vision_eager and vision_sdpa: switch its kernel (untimed) before each call
    return Job(Result(row.name, slices * grid * grid), run, lambda out: {},
               before=lambda: set_attention_implementation(model, row.impl))


# --------------------------------------------------------------------------------------------
# CPU workers: one fresh process per memory measurement
# --------------------------------------------------------------------------------------------
def worker_main(task: Dict[str, Any]) -> int:
    """One worker process: build what one measurement needs, run it, print ``RESULT_TAG {json}``."""
    quiet_transformers()
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    device, dtype = torch.device(task["device"]), resolve_dtype(task["dtype"], "dtype", allow_auto=False)
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
    cmd = [sys.executable, "-m", WORKER_MODULE, json.dumps(task)]
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


def quiet_transformers() -> None:
    """transformers' logging at error level (no warnings in the tables' way)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
