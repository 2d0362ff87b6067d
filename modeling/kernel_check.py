"""Self-check of the fast kernels at first use: a small probe against the plain torch math.

The fused Triton kernel of capture (``capture_triton.fused_reduced_probs``) and
flash-attention-2 (``flash_attn.flash_attn_func``) only run on CUDA, where nobody may ever
compare them by hand. So the first time one of them is about to be used in a process for a
given key, a small probe runs through it and through the torch path that would otherwise
be used, and the two are compared at a tolerance fit for the dtype:

* fused kernel, key (kernel, device, dtype, head reduction); the probe has padding keys,
  causal rows at a query offset, a subset of query rows, grouped-query heads (several query
  heads per key head), rows marked invalid, and lengths and a head dim that are not multiples
  of the kernel's tile sizes; a causal and a bidirectional call;
* flash-attention-2 output, key (device, dtype, head dim), against SDPA; a causal
  grouped-query self-attention call and a non-causal cross-attention call.

A verdict is kept for the rest of the process (:func:`verdicts`). On a mismatch (or when the
kernel raises on the probe) the mode decides:

* ``"warn"`` (default): one :class:`KernelMismatchWarning` line per key and process, and the
  torch path (SDPA for flash) is used for the rest of the process;
* ``"error"``: :class:`KernelCheckError` with the same line, at every use;
* ``"off"``: no check, the kernel is used.

The mode is ``CaptureSpec(kernel_check=...)`` for capture, else the environment variable
``MINICPMV_ATTN_KERNEL_CHECK`` (``warn``/``error``/``off``), else ``"warn"``.

Which capture path runs is :func:`triton_mode`: ``MINICPMV_ATTN_TRITON`` = ``auto`` (default:
the fused kernel for head-reduced maps on CUDA), ``force`` (also on CPU tensors, where it
needs Triton's interpreter, ``TRITON_INTERPRET=1``: for tests) or ``off`` (the torch path
everywhere; ``MINICPMV_ATTN_NO_TRITON=1`` means the same).

This module imports only torch and the standard library; kernels and capture import it.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["MODES", "ENV_MODE", "ENV_TRITON", "ENV_NO_TRITON", "KernelCheckError", "KernelMismatchWarning",
           "Verdict", "check_mode", "triton_mode", "fused_probs_ok", "flash_ok", "verdicts", "reset"]

MODES = ("warn", "error", "off")
ENV_MODE = "MINICPMV_ATTN_KERNEL_CHECK"
ENV_TRITON = "MINICPMV_ATTN_TRITON"
ENV_NO_TRITON = "MINICPMV_ATTN_NO_TRITON"
_TRITON_MODES = {"": "auto", "auto": "auto", "force": "force", "on": "force", "1": "force", "true": "force",
                 "off": "off", "0": "off", "false": "off", "no": "off"}

# max |kernel - reference| allowed on the probe. Fused kernel: fp32 probabilities in [0, 1]
# from fp32 scores both ways (half inputs give exact products), so only the order of the
# fp32 sums differs (about 1e-6 seen); the half slack covers tensor-core accumulation.
# Flash: outputs in the input dtype, a few ulps of values about 1 apart at most.
# Every deliberately wrong kernel tried (a dropped causal / key / row mask, scale x1.05, mean for max,
# a row offset off by one, wrong key heads) is off by at least 0.014 on the probe.
FUSED_TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}
FLASH_TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
FUSED_KERNEL = "triton fused_reduced_probs"
FLASH_KERNEL = "flash_attn_func"


class KernelCheckError(RuntimeError):
    """A kernel disagreed with the torch reference on its self-check probe (mode ``"error"``)."""


class KernelMismatchWarning(RuntimeWarning):
    """A kernel disagreed with the torch reference on its probe; the torch path is used instead."""


@dataclass
class Verdict:
    """The outcome of one self-check: which kernel, where, how far from the reference, at what cost."""

    kernel: str
    device: str
    dtype: str
    reduce: Optional[str]  # head reduction (fused kernel) or None (flash)
    passed: bool
    max_diff: float
    tol: float
    cost_ms: float
    triton: Optional[str]
    error: Optional[str] = None  # the kernel raised on the probe: "Type: message"
    head_dim: Optional[int] = None  # flash: the head dim probed
    warned: bool = False

    def line(self) -> str:
        """One line naming the kernel, device, dtype, reduction, Triton version and max difference."""
        what = f"{self.kernel} on {self.device}, {self.dtype}, reduce={self.reduce or '-'}"
        if self.head_dim is not None:
            what += f", head_dim={self.head_dim}"
        what += f", triton {self.triton or 'not installed'}"
        ref = "SDPA" if self.kernel == FLASH_KERNEL else "the torch recompute"
        if self.error:
            diff = f"raised {self.error}"
        else:
            diff = f"max |diff| {self.max_diff:.2e} vs {ref} (tol {self.tol:.0e})"
        line = f"minicpmv-attn kernel self-check {'PASS' if self.passed else 'FAIL'}: {what}: {diff}; " \
               f"{self.cost_ms:.1f} ms"
        if not self.passed:
            line += (f"; using {'SDPA' if self.kernel == FLASH_KERNEL else 'the torch path'} for the rest of this "
                     f"process ({ENV_MODE}=error to raise instead)")
        return line

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready fields (a non-finite difference, from a kernel that raised or gave NaN, is None)."""
        d = asdict(self)
        d.pop("warned")
        d["max_diff"] = d["max_diff"] if math.isfinite(d["max_diff"]) else None
        return d


_LOCK = threading.Lock()
_VERDICTS: Dict[Tuple, Verdict] = {}


def verdicts() -> List[Verdict]:
    """Every self-check verdict of this process, in the order they were reached."""
    with _LOCK:
        return list(_VERDICTS.values())


def reset() -> None:
    """Forget every verdict (the next use checks again); for tests and benchmarks."""
    with _LOCK:
        _VERDICTS.clear()


def check_mode(value: Optional[str] = None) -> str:
    """The mode: ``value`` if given, else ``$MINICPMV_ATTN_KERNEL_CHECK``, else ``"warn"``."""
    where = "kernel_check"
    if value is None:
        value, where = os.environ.get(ENV_MODE, "").strip().lower() or "warn", ENV_MODE
    if value not in MODES:
        raise ValueError(f"{where}={value!r}: expected one of {list(MODES)}")
    return value


def triton_mode() -> str:
    """``"auto"``, ``"force"`` or ``"off"`` from ``MINICPMV_ATTN_TRITON`` / ``MINICPMV_ATTN_NO_TRITON``."""
    raw = os.environ.get(ENV_TRITON, "").strip().lower()
    if raw not in _TRITON_MODES:
        raise ValueError(f"{ENV_TRITON}={raw!r}: expected auto, force or off")
    mode = _TRITON_MODES[raw]
    if os.environ.get(ENV_NO_TRITON):
        if mode == "force":
            raise ValueError(f"{ENV_NO_TRITON} and {ENV_TRITON}=force are both set: unset one")
        return "off"
    return mode


def _triton_version() -> Optional[str]:
    mod = sys.modules.get("triton")
    return getattr(mod, "__version__", None) if mod is not None else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} instead of {tuple(ref.shape)}")
    return float((got.double() - ref.double()).abs().max()) if got.numel() else 0.0


def _verdict(key: Tuple, fields: Dict[str, Any], tol: float, probe: Callable[[], Iterator[float]], mode) -> bool:
    """Run ``probe`` once per ``key`` (the max of its differences), record, warn or raise."""
    mode = check_mode(mode)
    if mode == "off":
        return True
    with _LOCK:
        verdict = _VERDICTS.get(key)
        if verdict is None:
            device = torch.device(fields["device"])
            error = None
            _sync(device)
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    diff = max(probe())
            except Exception as e:  # noqa: BLE001  (a kernel that fails on the probe fails the check)
                text = str(e).strip().splitlines()
                diff, error = float("inf"), f"{type(e).__name__}: {text[0] if text else ''}".strip()
            _sync(device)
            cost = (time.perf_counter() - start) * 1000
            verdict = Verdict(passed=diff <= tol, max_diff=diff, tol=tol, cost_ms=cost, triton=_triton_version(),
                              error=error, **fields)
            _VERDICTS[key] = verdict
    if verdict.passed:
        return True
    if mode == "error":
        raise KernelCheckError(verdict.line())
    if not verdict.warned:
        verdict.warned = True
        warnings.warn(verdict.line(), KernelMismatchWarning, stacklevel=3)
    return False


# --------------------------------------------------------------------------------------
# the fused head-reduced probabilities kernel
# --------------------------------------------------------------------------------------
PROBE_HEAD_DIM = 72  # not a multiple of 16 or 64: the head-dim tiles end ragged (SigLIP's head dim)
PROBE_KEYS = 70  # not a multiple of 32 or 64: the key tiles end ragged


def _fused_probes(device, dtype) -> Iterator[Dict[str, Any]]:
    """The probe's two calls, as keyword arguments of ``fused_reduced_probs``."""
    g = torch.Generator().manual_seed(1234)
    D, Lk = PROBE_HEAD_DIM, PROBE_KEYS

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 1.5).to(device=device, dtype=dtype)

    # LLM-like: causal rows 10..69 of a 70-token sequence, 6 of them selected (out of order),
    # 3 of 4 query heads over 2 key heads (heads 0 and 1 share key head 0); sample 1 is
    # left-padded by 14 keys (its rows before position 14 are padding: row_valid False),
    # sample 0 has a hole of padding keys in the middle.
    q_offset = 10
    rows = torch.tensor([59, 0, 1, 2, 17, 40])
    key_valid = torch.ones(2, Lk, dtype=torch.bool)
    key_valid[1, :14] = False
    key_valid[0, 30:34] = False
    row_valid = torch.stack([torch.ones(len(rows), dtype=torch.bool), rows + q_offset >= 14])
    yield dict(q=rnd(2, 3, len(rows), D), k=rnd(2, 2, Lk, D), scaling=D ** -0.5, rows=rows.to(device),
               q_offset=q_offset, causal=True, key_valid=key_valid.to(device),
               head_map=torch.tensor([1, 0, 0], device=device), row_valid=row_valid.to(device))
    # vision/resampler-like: bidirectional, 20 rows, sample 1's last 9 keys are padding
    key_valid = torch.ones(2, Lk, dtype=torch.bool)
    key_valid[1, Lk - 9:] = False
    yield dict(q=rnd(2, 2, 20, D), k=rnd(2, 2, Lk, D), scaling=D ** -0.5, rows=torch.arange(20, device=device),
               q_offset=0, causal=False, key_valid=key_valid.to(device),
               head_map=torch.arange(2, device=device), row_valid=None)


def fused_probs_ok(fused: Callable, reference: Callable, device, dtype: torch.dtype, reduce: str,
                   mode: Optional[str] = None) -> bool:
    """Whether capture may use ``fused`` for (``device``, ``dtype``, ``reduce``) in this process.

    ``fused`` and ``reference`` have the signature of ``capture_triton.fused_reduced_probs``
    (``q, k, scaling, rows, q_offset, causal, key_valid, reduce, out_dtype, head_map=, row_valid=``);
    ``reference`` is the torch recompute capture uses otherwise. The first call per key runs
    the probe; False means: use the torch path (a warning was given once). Raises
    :class:`KernelCheckError` in mode ``"error"`` when the kernel failed its probe.
    """
    device = torch.device(device)

    def probe():
        for case in _fused_probes(device, dtype):
            args = (case["q"], case["k"], case["scaling"], case["rows"], case["q_offset"], case["causal"],
                    case["key_valid"], reduce, torch.float32)
            extra = dict(head_map=case["head_map"], row_valid=case["row_valid"])
            yield _max_diff(fused(*args, **extra).float(), reference(*args, **extra).float())

    fields = dict(kernel=FUSED_KERNEL, device=str(device), dtype=str(dtype).replace("torch.", ""), reduce=reduce)
    return _verdict((FUSED_KERNEL, str(device), dtype, reduce), fields, FUSED_TOL.get(dtype, 1e-3), probe, mode)


# --------------------------------------------------------------------------------------
# flash-attention-2 output
# --------------------------------------------------------------------------------------
def _flash_probes(device, dtype, head_dim: int) -> Iterator[Dict[str, Any]]:
    g = torch.Generator().manual_seed(4321)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    D = int(head_dim)
    # causal grouped-query self-attention, 70 positions (4 query heads over 2 key heads)
    yield dict(q=rnd(2, 4, PROBE_KEYS, D), k=rnd(2, 2, PROBE_KEYS, D), v=rnd(2, 2, PROBE_KEYS, D), causal=True,
               scaling=D ** -0.5)
    # cross-attention (resampler-like): 16 queries over 70 keys, not causal
    yield dict(q=rnd(2, 4, 16, D), k=rnd(2, 4, PROBE_KEYS, D), v=rnd(2, 4, PROBE_KEYS, D), causal=False,
               scaling=D ** -0.5)


def flash_ok(flash: Callable, reference: Callable, device, dtype: torch.dtype, head_dim: int,
             mode: Optional[str] = None) -> bool:
    """Whether ``flash`` (``flash_attn_func``'s signature, [B, L, H, D] tensors) may be used for
    (``device``, ``dtype``, ``head_dim``) in this process; False means: use SDPA (warned once).

    ``reference(q, k, v, causal, scaling)`` takes [B, H, L, D] tensors and returns SDPA's output
    as [B, L, H, D]. Raises :class:`KernelCheckError` in mode ``"error"`` on a mismatch.
    """
    device = torch.device(device)

    def probe():
        for c in _flash_probes(device, dtype, head_dim):
            got = flash(c["q"].transpose(1, 2), c["k"].transpose(1, 2), c["v"].transpose(1, 2), dropout_p=0.0,
                        softmax_scale=c["scaling"], causal=c["causal"])
            yield _max_diff(got.float(), reference(c["q"], c["k"], c["v"], c["causal"], c["scaling"]).float())

    fields = dict(kernel=FLASH_KERNEL, device=str(device), dtype=str(dtype).replace("torch.", ""), reduce=None,
                  head_dim=int(head_dim))
    key = (FLASH_KERNEL, str(device), dtype, int(head_dim))
    return _verdict(key, fields, FLASH_TOL.get(dtype, 3e-2), probe, mode)
