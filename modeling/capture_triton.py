"""Fused Triton kernel for head-reduced attention probabilities (the GPU fast path of capture).

``softmax(q k^T * scaling + mask)`` reduced over heads (mean or max) is, done in torch,
dominated by memory traffic over [H, rows, Lk] fp32 blocks. Here it is computed in two
passes, with no per-head [rows, Lk] tensor ever written to memory:

1. per (batch, head, row): the running max and sum of exponentials over all key blocks
   (the softmax normaliser, fp32);
2. per (batch, row block, key block): for each head in turn, the scores are recomputed,
   normalised with pass 1's statistics and accumulated (sum or max) in registers; the
   reduced [rows, keys] tile is written once, in the output dtype.

Triton is optional: this module imports without it, and :func:`is_available` tells
whether the kernel can run (Triton importable and a CUDA device, or Triton's interpreter
enabled with ``TRITON_INTERPRET=1``, which runs it on CPU tensors, for tests).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

try:
    import triton
    import triton.language as tl
    # tl.max / tl.sum / tl.zeros are themselves jit functions, fixed as compiled or
    # interpreted when triton is imported; tl.reduce with these combine functions (which
    # the interpreter recognises) and tl.full keep the kernels runnable in the interpreter
    # even when triton was imported before TRITON_INTERPRET=1 was set.
    _MAX = tl.standard._elementwise_max
    _SUM = tl.standard._sum_combine
except Exception:  # not installed, or broken: the torch path is used instead
    triton = None
    tl = None

__all__ = ["is_available", "fused_reduced_probs"]

_KERNELS: Dict[bool, tuple] = {}  # interpret mode -> (row_stats, reduced_probs)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def is_available(device=None) -> bool:
    """True if :func:`fused_reduced_probs` can run for tensors on ``device``.

    Needs Triton; then either a CUDA device or Triton's interpreter (``TRITON_INTERPRET=1``,
    any device, slow: for tests).
    """
    if triton is None:
        return False
    if _interpret():
        return True
    device = torch.device(device) if device is not None else None
    return device is not None and device.type == "cuda" and torch.cuda.is_available()


def _build():
    # Triton decides compiled vs interpreted when a function is jit-wrapped, so the
    # kernels are wrapped lazily, once per mode. Scores are accumulated over the head dim
    # in BLOCK_K slices (a whole fp32 [rows, D] operand per thread spills registers).
    @triton.jit
    def _row_stats(Q, K, ROWS, HMAP, KVALID, M_OUT, L_OUT,
                   scaling, q_offset, R, Lk, D, H,
                   s_qb, s_qh, s_qr, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vn,
                   CAUSAL: tl.constexpr, HAS_KV: tl.constexpr, DOT_IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)  # int64 offsets: [B, R, Lk] can pass 2**31 elements
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = offs_m < R
        q_pos = q_offset + tl.load(ROWS + offs_m, mask=row_ok, other=0)  # absolute positions
        kh = tl.load(HMAP + h)
        q_ptr = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qr
        k_ptr = K + b * s_kb + kh * s_kh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, tl.float32)
        hi = Lk
        if CAUSAL:  # keys past the last row's position are masked for every row of the block
            hi = tl.minimum(Lk, tl.reduce(tl.where(row_ok, q_pos, -1), 0, _MAX) + 1)
        for start in range(0, hi, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < Lk
            s = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
            for d0 in range(0, D, BLOCK_K):
                dd = d0 + offs_k
                d_ok = dd < D
                qc = tl.load(q_ptr + dd[None, :] * s_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                kc = tl.load(k_ptr + cols[None, :] * s_kn + dd[:, None] * s_kd,
                             mask=d_ok[:, None] & col_ok[None, :], other=0.0)  # [K, N]
                if DOT_IEEE:
                    s = tl.dot(qc.to(tl.float32), kc.to(tl.float32), s, input_precision="ieee")
                else:
                    s = tl.dot(qc, kc, s)
            s = s * scaling
            allowed = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= q_pos[:, None])
            if HAS_KV:
                kv = tl.load(KVALID + b * s_vb + cols * s_vn, mask=col_ok, other=0)
                allowed = allowed & (kv[None, :] != 0)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: no NaN
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
            m_i = m_new
        base = (b * H + h) * R
        tl.store(M_OUT + base + offs_m, m_i, mask=row_ok)
        tl.store(L_OUT + base + offs_m, l_i, mask=row_ok)

    @triton.jit
    def _reduced_probs(Q, K, ROWS, HMAP, KVALID, RVALID, M_IN, L_IN, OUT,
                       scaling, q_offset, R, Lk, D, H,
                       s_qb, s_qh, s_qr, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vn, s_rb, s_rr,
                       s_ob, s_or, s_on,
                       CAUSAL: tl.constexpr, HAS_KV: tl.constexpr, HAS_RV: tl.constexpr,
                       REDUCE_MAX: tl.constexpr, DOT_IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)  # int64 offsets: [B, R, Lk] can pass 2**31 elements
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = offs_m < R
        col_ok = cols < Lk
        q_pos = q_offset + tl.load(ROWS + offs_m, mask=row_ok, other=0)
        allowed = row_ok[:, None] & col_ok[None, :]
        n_heads = H
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= q_pos[:, None])
            # a key block wholly after every row of the block: all zeros, skip the heads
            last = tl.reduce(tl.where(row_ok, q_pos, -1), 0, _MAX)
            n_heads = tl.where(pid_n * BLOCK_N <= last, H, 0)
        if HAS_KV:
            kv = tl.load(KVALID + b * s_vb + cols * s_vn, mask=col_ok, other=0)
            allowed = allowed & (kv[None, :] != 0)
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)  # probabilities are >= 0: 0 starts max too
        for h in range(0, n_heads):
            kh = tl.load(HMAP + h)
            q_ptr = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qr
            k_ptr = K + b * s_kb + kh * s_kh + cols[None, :] * s_kn
            s = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
            for d0 in range(0, D, BLOCK_K):
                dd = d0 + offs_k
                d_ok = dd < D
                qc = tl.load(q_ptr + dd[None, :] * s_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                kc = tl.load(k_ptr + dd[:, None] * s_kd, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
                if DOT_IEEE:
                    s = tl.dot(qc.to(tl.float32), kc.to(tl.float32), s, input_precision="ieee")
                else:
                    s = tl.dot(qc, kc, s)
            s = s * scaling
            base = (b * H + h) * R
            m = tl.load(M_IN + base + offs_m, mask=row_ok, other=0.0)
            l = tl.load(L_IN + base + offs_m, mask=row_ok, other=1.0)
            m = tl.where(m == float("-inf"), 0.0, m)  # fully masked row: every entry masked below
            l = tl.where(l == 0.0, 1.0, l)
            p = tl.where(allowed, tl.exp(s - m[:, None]) / l[:, None], 0.0)
            if REDUCE_MAX:
                acc = tl.maximum(acc, p)
            else:
                acc = acc + p
        if not REDUCE_MAX:
            acc = acc / H
        if HAS_RV:
            rv = tl.load(RVALID + b * s_rb + offs_m * s_rr, mask=row_ok, other=0)
            acc = tl.where(rv[:, None] != 0, acc, 0.0)
        tl.store(OUT + b * s_ob + offs_m[:, None] * s_or + cols[None, :] * s_on,
                 acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    return _row_stats, _reduced_probs


def _kernels():
    mode = _interpret()
    if mode not in _KERNELS:
        _KERNELS[mode] = _build()
    return _KERNELS[mode]


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _config(native: bool, D: int, R: int) -> dict:
    """Tile sizes and warps (chosen from ptxas register counts for sm_90: no spills)."""
    block_m = _pow2(R, 16, 64)
    if native:  # fp16/bf16 on tensor cores, head dim in slices of up to 64
        return dict(block_m=block_m, block_n=64, block_k=_pow2(D, 16, 64), warps_stats=4, warps_probs=8)
    return dict(block_m=_pow2(R, 16, 32), block_n=32, block_k=16, warps_stats=4, warps_probs=4)


def fused_reduced_probs(q: torch.Tensor, k: torch.Tensor, scaling: float,
                        rows: Optional[torch.Tensor] = None, q_offset: int = 0, causal: bool = False,
                        key_valid: Optional[torch.Tensor] = None, reduce: str = "mean",
                        out_dtype: Optional[torch.dtype] = None, head_map: Optional[torch.Tensor] = None,
                        row_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Head-reduced ``softmax(q k^T * scaling + mask)``: [B, 1, R, Lk] in ``out_dtype``.

    q: [B, H, R, D], the already selected heads and query rows.
    k: [B, Hk, Lk, D]; head ``h`` of ``q`` uses key head ``head_map[h]``.
    head_map: int [H] (None: ``arange(H) // (H // Hk)``, i.e. all heads, grouped-query).
    rows: int [R]; selected row ``i`` has absolute position ``q_offset + rows[i]``
        (None: ``arange(R)``).
    causal, key_valid ([B, Lk] bool or None): key ``j`` is allowed for row ``i`` iff
        ``(not causal or j <= q_offset + rows[i]) and key_valid[b, j]``.
    reduce: ``"mean"`` or ``"max"`` over the H heads of ``q``.
    row_valid: [B, R] bool or None; rows where it is False are zero.

    The softmax is computed in fp32 (scores from fp32 products; fp16/bf16 inputs are
    multiplied exactly and accumulated in fp32, fp32 inputs use IEEE fp32 products, not
    TF32). Masked entries are exactly 0; rows with no allowed key are all 0 (not NaN).
    Not differentiable.
    """
    if triton is None:
        raise RuntimeError("fused_reduced_probs needs triton (pip install triton)")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce={reduce!r}: the fused kernel supports 'mean' and 'max'")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, R, D] and [B, Hk, Lk, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, R, D = q.shape
    Bk, Hk, Lk, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if H == 0:
        raise ValueError("fused_reduced_probs: no heads selected")
    device = q.device
    if k.device != device:
        raise ValueError(f"q on {device} but k on {k.device}")
    out_dtype = out_dtype or q.dtype
    out = torch.empty((B, 1, R, Lk), dtype=out_dtype, device=device)
    if B == 0 or R == 0 or Lk == 0:
        return out
    if head_map is None:
        if H % Hk:
            raise ValueError(f"{H} query heads and {Hk} key heads: pass head_map")
        head_map = torch.arange(H, device=device) // (H // Hk)
    head_map = torch.as_tensor(head_map, device=device).to(torch.int32).contiguous()
    if head_map.shape != (H,):
        raise ValueError(f"head_map must have shape [{H}], got {tuple(head_map.shape)}")
    if int(head_map.min()) < 0 or int(head_map.max()) >= Hk:
        raise ValueError(f"head_map values must be in [0, {Hk})")
    if rows is None:
        rows = torch.arange(R, device=device)
    rows = torch.as_tensor(rows, device=device).to(torch.int64).contiguous()
    if rows.shape != (R,):
        raise ValueError(f"rows must have shape [{R}], got {tuple(rows.shape)}")
    # fp16/bf16: the tensor-core dot (exact products, fp32 accumulation); anything else is
    # converted to fp32 tile by tile in the kernel (IEEE products, not TF32). Triton's
    # interpreter multiplies bf16 as raw bits, so there bf16 goes the fp32 way too.
    native = q.dtype == k.dtype and (q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and not _interpret()))
    if q.dtype == torch.float64 or k.dtype == torch.float64:
        q, k = q.float(), k.float()
    has_kv = key_valid is not None
    kv = key_valid.to(device=device, dtype=torch.uint8) if has_kv else rows  # rows: an unused placeholder
    if has_kv and kv.shape != (B, Lk):
        raise ValueError(f"key_valid must be [{B}, {Lk}], got {tuple(key_valid.shape)}")
    has_rv = row_valid is not None
    rv = row_valid.to(device=device, dtype=torch.uint8) if has_rv else rows
    if has_rv and rv.shape != (B, R):
        raise ValueError(f"row_valid must be [{B}, {R}], got {tuple(row_valid.shape)}")
    m = torch.empty((B, H, R), dtype=torch.float32, device=device)
    l = torch.empty_like(m)

    row_stats, reduced_probs = _kernels()
    cfg = _config(native, D, R)
    kv_s = (kv.stride(0), kv.stride(1)) if has_kv else (0, 0)
    rv_s = (rv.stride(0), rv.stride(1)) if has_rv else (0, 0)
    common = (float(scaling), int(q_offset), R, Lk, D, H, *q.stride(), *k.stride(), *kv_s)
    flags = dict(CAUSAL=bool(causal), HAS_KV=has_kv, DOT_IEEE=not native,
                 BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], enable_fp_fusion=False)
    row_stats[(triton.cdiv(R, cfg["block_m"]), H, B)](
        q, k, rows, head_map, kv, m, l, *common, num_warps=cfg["warps_stats"], **flags)
    reduced_probs[(triton.cdiv(Lk, cfg["block_n"]), triton.cdiv(R, cfg["block_m"]), B)](
        q, k, rows, head_map, kv, rv, m, l, out, *common, *rv_s, out.stride(0), out.stride(2), out.stride(3),
        HAS_RV=has_rv, REDUCE_MAX=reduce == "max", num_warps=cfg["warps_probs"], **flags)
    return out
