"""The fused Triton kernel equals the torch reference (fp32 softmax, then mean/max over heads).

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``).
Triton reads that variable when a function is jit-wrapped; ``capture_triton`` wraps its
kernels lazily, once per mode, and avoids triton's own jit helpers (``tl.max``,
``tl.sum``, ``tl.zeros``, wrapped when triton is imported), so setting the variable for
the duration of each test is enough, even when triton was imported earlier in the
session (importing transformers imports it), and nothing leaks to other test modules.
With a GPU the same tests run the compiled kernel on CUDA.
"""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton): fused capture kernel not tested")

from minicpmv_attn import capture_triton  # noqa: E402
from minicpmv_attn.capture_triton import fused_reduced_probs, is_available  # noqa: E402

_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if _CUDA else "cpu"
TOL = 1e-5


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not _CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def reference(q, k, scaling, rows, q_offset, causal, key_valid, reduce, head_map, row_valid=None):
    """Pure torch, like AttentionCapture.capture: fp32 scores, masked softmax, reduce over heads.

    Rows with no allowed key are zero (the kernel's convention).
    """
    B, H, R, D = q.shape
    Lk = k.shape[2]
    kk = k.float().index_select(1, head_map.long())  # [B, H, Lk, D]
    scores = torch.matmul(q.float(), kk.transpose(-1, -2)) * scaling
    allowed = torch.ones(B, 1, R, Lk, dtype=torch.bool, device=q.device)
    if causal:
        pos = rows.long() + q_offset
        allowed = allowed & (torch.arange(Lk, device=q.device)[None, :] <= pos[:, None])[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1) * allowed.any(-1, keepdim=True)
    out = probs.mean(1, keepdim=True) if reduce == "mean" else probs.amax(1, keepdim=True)
    if row_valid is not None:
        out = out * row_valid[:, None, :, None]
    return out, allowed


def make_case(seed, B, H_all, Hk, R_all, Lk, D, heads=None, row_sel=None, causal=True, q_offset=0,
              pad=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q_full = torch.randn(B, H_all, R_all, D, generator=g) * 1.5
    k = torch.randn(B, Hk, Lk, D, generator=g) * 1.5
    head_idx = torch.arange(H_all) if heads is None else torch.tensor(heads)
    rows = torch.arange(R_all) if row_sel is None else torch.tensor(row_sel)
    q = q_full.index_select(1, head_idx).index_select(2, rows)
    head_map = head_idx // (H_all // Hk)
    key_valid = (torch.rand(B, Lk, generator=g) >= pad) if pad else None
    to = dict(device=DEVICE)
    return dict(q=q.to(dtype=dtype, **to), k=k.to(dtype=dtype, **to), rows=rows.to(**to), q_offset=q_offset,
                causal=causal, key_valid=None if key_valid is None else key_valid.to(**to),
                head_map=head_map.to(**to))


def check(case, reduce, scaling=0.125, out_dtype=torch.float32, row_valid=None, tol=TOL):
    out = fused_reduced_probs(case["q"], case["k"], scaling, case["rows"], case["q_offset"], case["causal"],
                              case["key_valid"], reduce, out_dtype, head_map=case["head_map"], row_valid=row_valid)
    ref, allowed = reference(case["q"], case["k"], scaling, case["rows"], case["q_offset"], case["causal"],
                             case["key_valid"], reduce, case["head_map"], row_valid)
    B, H, R, D = case["q"].shape
    assert out.shape == (B, 1, R, case["k"].shape[2])
    assert out.dtype == out_dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol if out_dtype == torch.float32 else 1e-2)
    assert (out[~allowed] == 0).all(), "masked entries must be exactly 0"
    return out, ref


CASES = {
    # name: (B, H_all, Hk, R_all, Lk, D, heads, rows, causal, q_offset, pad)
    "mha_full_causal": (1, 2, 2, 20, 20, 16, None, None, True, 0, 0.0),
    "gqa_causal_ragged": (2, 6, 2, 70, 70, 24, None, None, True, 0, 0.0),  # R, Lk not multiples of 64
    "gqa_heads_subset": (1, 8, 2, 33, 33, 16, [7, 0, 3], None, True, 0, 0.0),
    "causal_q_offset": (2, 4, 1, 9, 130, 20, None, None, True, 121, 0.0),  # decode-like block
    "decode_one_row": (2, 4, 2, 1, 77, 32, None, None, True, 76, 0.0),
    "row_subset_padding": (2, 4, 2, 90, 90, 16, [1, 2], [89, 0, 45, 46, 70, 3], True, 0, 0.3),
    "bidirectional_padding": (3, 3, 3, 40, 70, 72, None, None, False, 0, 0.25),  # SigLIP-like D=72
    "cross_attention": (2, 2, 2, 16, 100, 16, None, None, False, 0, 0.0),  # resampler-like
}


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name, reduce):
    B, H, Hk, R, Lk, D, heads, rows, causal, q_offset, pad = CASES[name]
    case = make_case(hash(name) % 1000, B, H, Hk, R, Lk, D, heads, rows, causal, q_offset, pad)
    check(case, reduce, scaling=D ** -0.5)


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_fully_masked_rows_are_zero(reduce):
    case = make_case(3, 2, 4, 2, 12, 70, 16, causal=True, q_offset=0)
    kv = torch.ones(2, 70, dtype=torch.bool)
    kv[0, :5] = False  # batch 0: rows 0..4 see only padding keys
    kv[1] = False  # batch 1: nothing is valid
    case["key_valid"] = kv.to(DEVICE)
    out, _ = check(case, reduce)
    assert (out[0, :, :5] == 0).all() and (out[1] == 0).all()
    assert (out[0, 0, 5:].sum(-1) - 1).abs().max() < 1e-5 if reduce == "mean" else True


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes(seed):
    g = torch.Generator().manual_seed(100 + seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    Hk = ri(1, 3)
    H = Hk * ri(1, 3)
    Lk = ri(1, 140)
    R_all = Lk if seed % 2 else ri(1, Lk)
    causal = bool(seed % 3)
    q_offset = Lk - R_all if causal else 0
    heads = sorted(set(torch.randint(0, H, (ri(1, H),), generator=g).tolist()))
    rows = torch.randperm(R_all, generator=g)[: ri(1, min(R_all, 70))].tolist()
    case = make_case(seed, ri(1, 2), H, Hk, R_all, Lk, ri(1, 40), heads, rows, causal, q_offset,
                     pad=0.2 if seed >= 2 else 0.0)
    for reduce in ("mean", "max"):
        check(case, reduce, scaling=0.2)


def test_row_valid_and_out_dtypes():
    case = make_case(7, 2, 4, 2, 30, 70, 16, causal=True, pad=0.1)
    rv = torch.rand(2, 30, generator=torch.Generator().manual_seed(1)) > 0.3
    out, _ = check(case, "mean", row_valid=rv.to(DEVICE))
    assert (out[:, 0][~rv.to(DEVICE)] == 0).all()
    for dt in (torch.bfloat16, torch.float16):
        check(case, "max", out_dtype=dt, tol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    # half inputs: exact products, fp32 accumulation, like the reference's q.float() @ k.float()
    case = make_case(11, 1, 4, 2, 40, 70, 32, causal=True, dtype=dtype)
    check(case, "mean", scaling=32 ** -0.5, tol=2e-5)


def test_default_rows_and_head_map():
    case = make_case(5, 1, 4, 2, 24, 24, 16, causal=True)
    out = fused_reduced_probs(case["q"], case["k"], 0.25, causal=True, reduce="mean", out_dtype=torch.float32)
    ref, _ = reference(case["q"], case["k"], 0.25, case["rows"], 0, True, None, "mean", case["head_map"])
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)


def test_bad_inputs():
    case = make_case(1, 1, 2, 1, 4, 8, 16)
    q, k = case["q"], case["k"]
    with pytest.raises(ValueError, match="reduce"):
        fused_reduced_probs(q, k, 1.0, reduce="none")
    with pytest.raises(ValueError, match="head_map"):
        fused_reduced_probs(q, k, 1.0, head_map=torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="rows"):
        fused_reduced_probs(q, k, 1.0, rows=torch.arange(3, device=DEVICE))
    with pytest.raises(ValueError, match="key_valid"):
        fused_reduced_probs(q, k, 1.0, key_valid=torch.ones(1, 7, dtype=torch.bool, device=DEVICE))


def test_is_available():
    assert is_available(DEVICE)
    assert capture_triton.triton is not None


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from minicpmv_attn import capture_triton as ct\n"
            "import torch\n"
            "assert ct.triton is None and not ct.is_available('cuda') and not ct.is_available('cpu')\n"
            "try:\n    ct.fused_reduced_probs(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), 1.0)\n"
            "except RuntimeError as e:\n    assert 'triton' in str(e)\nelse:\n    raise SystemExit('no error')\n")
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_model_capture_through_fused_kernel_equals_torch_path(monkeypatch):
    """AttentionCapture's fused branch (forced on for CPU tensors) gives the torch path's maps."""
    from golden import case_dir, load_inputs
    from minicpmv_attn import MiniCPMV
    from minicpmv_attn.capture import AttentionCapture

    model = MiniCPMV.from_pretrained(str(case_dir("two_images_batch"))).eval()
    data, mask = load_inputs("two_images_batch")
    spec = {"reduce": "mean", "rows": [3, -1, 100], "cols": "image", "heads": {"llm": [0, 3]}, "chunk_elements": 700}
    with torch.no_grad():
        ref = model(data, attention_mask=mask, output_attentions=spec).captured
        calls = []

        def forced(self, query, key):
            calls.append(1)
            return fused_reduced_probs

        monkeypatch.setattr(AttentionCapture, "_fused_kernel", forced)
        got = model(data, attention_mask=mask, output_attentions=spec).captured
    assert calls and set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=TOL, rtol=0)
