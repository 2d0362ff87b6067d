"""The fast kernels check themselves at first use (``minicpmv_attn.kernel_check``).

* The fused Triton kernel of capture runs in Triton's CPU interpreter here
  (``TRITON_INTERPRET=1``, as in test_capture_triton.py) with ``MINICPMV_ATTN_TRITON=force``.
  A deliberately wrong kernel (monkeypatched in place of ``fused_reduced_probs``) must be
  caught by the probe, warned about once, and the maps must still come out right (the torch
  path); the real kernel must pass.
* flash-attention is not installed: a fake ``flash_attn`` module carries a correct or a wrong
  ``flash_attn_func`` written in torch, and flash's device / dtype gates are widened to CPU
  float32 tensors.
"""
import sys
import types
import warnings

import pytest
import torch

from minicpmv_attn import attention, kernel_check
from minicpmv_attn.capture import AttentionCapture, CaptureError, CaptureSpec, torch_reduced_probs
from minicpmv_attn.kernel_check import KernelCheckError, KernelMismatchWarning

try:
    import triton  # noqa: F401
    from minicpmv_attn import capture_triton
    HAVE_TRITON = capture_triton.triton is not None
except ImportError:
    HAVE_TRITON = False
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed: the fused kernel cannot run")

TOL = 1e-5
CASE = "two_images_batch"  # left-padded batch of two, images, GQA
SPEC = {"reduce": "mean", "layers": [0, 1], "rows": [3, -1, 40, 100], "heads": {"llm": [0, 3]},
        "chunk_elements": 500}  # several chunks per layer


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for var in (kernel_check.ENV_MODE, kernel_check.ENV_TRITON, kernel_check.ENV_NO_TRITON):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel_check.reset()
    yield
    kernel_check.reset()


@pytest.fixture(scope="module")
def model_and_inputs():
    from golden import case_dir, load_inputs
    from minicpmv_attn import MiniCPMV

    model = MiniCPMV.from_pretrained(str(case_dir(CASE))).eval()
    return model, *load_inputs(CASE)


def run_capture(model_and_inputs, spec=SPEC):
    model, data, mask = model_and_inputs
    with torch.no_grad():
        return model(data, attention_mask=mask, output_attentions=spec).captured


@pytest.fixture(scope="module")
def torch_maps(model_and_inputs):
    """The maps of the plain torch path (what capture gives on the CPU without any switch)."""
    return run_capture(model_and_inputs)


def assert_same_maps(got, ref):
    assert set(got) == set(ref) and ref
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=TOL, rtol=0)


def wrong(kernel, how):
    """``kernel`` with one deliberate bug; counts its calls in ``.calls``."""
    swap = {"mean": "max", "max": "mean"}

    def bad(q, k, scaling, rows, q_offset, causal, key_valid, reduce, out_dtype, **kw):
        bad.calls += 1
        if how == "dropped_mask":
            causal, key_valid = False, None
        elif how == "wrong_scale":
            scaling = scaling * 1.25
        elif how == "swapped_mean_max":
            reduce = swap[reduce]
        return kernel(q, k, scaling, rows, q_offset, causal, key_valid, reduce, out_dtype, **kw)

    bad.calls = 0
    return bad


def counting(kernel):
    def spy(*args, **kw):
        spy.calls += 1
        return kernel(*args, **kw)

    spy.calls = 0
    return spy


def mismatch_warnings(record):
    return [w for w in record if issubclass(w.category, KernelMismatchWarning)]


# --------------------------------------------------------------------------------------
# the fused Triton kernel of capture
# --------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype,reduce", [(torch.float32, "mean"), (torch.bfloat16, "max")])
def test_real_kernel_passes_its_check_in_the_interpreter(dtype, reduce):
    ok = kernel_check.fused_probs_ok(capture_triton.fused_reduced_probs, torch_reduced_probs, "cpu", dtype, reduce)
    [v] = kernel_check.verdicts()
    assert ok and v.passed and v.error is None, v.line()
    assert v.max_diff < kernel_check.FUSED_TOL[dtype] and v.max_diff < 1e-5
    assert (v.kernel, v.device, v.dtype, v.reduce) == (kernel_check.FUSED_KERNEL, "cpu", str(dtype)[6:], reduce)
    assert v.triton == triton.__version__ and v.cost_ms > 0


def test_probe_covers_padding_causal_offset_gqa_ragged_and_row_valid():
    cases = list(kernel_check._fused_probes("cpu", torch.float32))
    causal = [c for c in cases if c["causal"]]
    assert causal and any(not c["causal"] for c in cases)
    c = causal[0]
    assert c["q_offset"] > 0 and c["rows"].numel() < c["k"].shape[2] - c["q_offset"]  # offset rows, a subset
    assert len(set(c["head_map"].tolist())) < c["head_map"].numel()  # two query heads share a key head
    assert (~c["key_valid"]).any() and (~c["row_valid"]).any()
    for case in cases:
        assert case["k"].shape[2] % 16 and case["q"].shape[-1] % 16  # ragged keys and head dim
        assert (~case["key_valid"]).any()


SUBTLE = {  # bugs that show on one of the probe's two calls only, or on a few entries
    "causal_off_by_one": lambda a, kw: (a[:4] + (a[4] + 1,) + a[5:], kw),
    "row_valid_ignored": lambda a, kw: (a, dict(kw, row_valid=None)),
    "key_heads_not_grouped": lambda a, kw: (a, dict(kw, head_map=kw["head_map"] * 0)),
    "key_padding_ignored": lambda a, kw: (a[:6] + (None,) + a[7:], kw),
}


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("bug", sorted(SUBTLE))
def test_subtle_bugs_are_caught_by_the_probe(bug, reduce):
    def bad(*args, **kw):
        args, kw = SUBTLE[bug](args, kw)
        return torch_reduced_probs(*args, **kw)

    with pytest.warns(KernelMismatchWarning, match=f"FAIL: triton fused_reduced_probs on cpu, float32, reduce={reduce}"):
        assert not kernel_check.fused_probs_ok(bad, torch_reduced_probs, "cpu", torch.float32, reduce)
    assert kernel_check.verdicts()[0].max_diff > 1e-2


@needs_triton
@pytest.mark.parametrize("how", ["dropped_mask", "wrong_scale", "swapped_mean_max"])
def test_wrong_kernel_is_caught_maps_stay_right_warned_once(how, monkeypatch, model_and_inputs, torch_maps):
    bad = wrong(capture_triton.fused_reduced_probs, how)
    monkeypatch.setattr(capture_triton, "fused_reduced_probs", bad)
    monkeypatch.setenv("MINICPMV_ATTN_TRITON", "force")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = run_capture(model_and_inputs)
        second = run_capture(model_and_inputs)
    assert_same_maps(first, torch_maps)
    assert_same_maps(second, torch_maps)
    assert bad.calls == 2, "the wrong kernel ran beyond its probe (two calls)"
    [w] = mismatch_warnings(record)  # once, not once per layer, stage, chunk or call
    line = str(w.message)
    assert "\n" not in line
    for part in ("FAIL", "triton fused_reduced_probs", "on cpu", "float32", "reduce=mean",
                 f"triton {triton.__version__}", "max |diff|", "torch path"):
        assert part in line, (part, line)
    [v] = kernel_check.verdicts()
    assert not v.passed and v.max_diff > 1e-2 and f"{v.max_diff:.2e}" in line


@needs_triton
def test_passing_kernel_is_used_for_every_chunk(monkeypatch, model_and_inputs, torch_maps):
    """Forced on: a correct kernel passes its check and then serves the captures."""
    spy = counting(torch_reduced_probs)
    monkeypatch.setattr(capture_triton, "fused_reduced_probs", spy)
    monkeypatch.setenv("MINICPMV_ATTN_TRITON", "force")
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelMismatchWarning)
        got = run_capture(model_and_inputs)
    assert_same_maps(got, torch_maps)
    [v] = kernel_check.verdicts()
    assert v.passed and v.max_diff == 0
    assert spy.calls > 2 + 4, "the probe's 2 calls, then the captures' chunks"


@needs_triton
@pytest.mark.parametrize("via", ["spec", "env"])
def test_error_mode_raises_with_the_line(via, monkeypatch, model_and_inputs):
    monkeypatch.setattr(capture_triton, "fused_reduced_probs", wrong(torch_reduced_probs, "wrong_scale"))
    monkeypatch.setenv("MINICPMV_ATTN_TRITON", "force")
    spec = dict(SPEC)
    if via == "spec":
        spec["kernel_check"] = "error"
    else:
        monkeypatch.setenv("MINICPMV_ATTN_KERNEL_CHECK", "error")
    with pytest.raises(KernelCheckError) as err:
        run_capture(model_and_inputs, spec)
    text = str(err.value)
    assert text.startswith("minicpmv-attn kernel self-check FAIL: triton fused_reduced_probs on cpu, float32, "
                           "reduce=mean") and "max |diff|" in text and "\n" not in text
    with pytest.raises(KernelCheckError):  # every use raises, not only the first
        run_capture(model_and_inputs, spec)
    assert len(kernel_check.verdicts()) == 1


@needs_triton
def test_check_off_trusts_the_kernel(monkeypatch, model_and_inputs, torch_maps):
    bad = wrong(torch_reduced_probs, "wrong_scale")
    monkeypatch.setattr(capture_triton, "fused_reduced_probs", bad)
    monkeypatch.setenv("MINICPMV_ATTN_TRITON", "force")
    got = run_capture(model_and_inputs, dict(SPEC, kernel_check="off"))
    assert kernel_check.verdicts() == [] and bad.calls > 0
    assert any((got[n] - torch_maps[n]).abs().max() > 1e-3 for n in torch_maps), "the unchecked wrong kernel ran"


@needs_triton
def test_kernel_that_raises_fails_its_check(monkeypatch, model_and_inputs, torch_maps):
    def broken(*args, **kw):
        raise RuntimeError("PTX compilation failed\nmore detail")

    monkeypatch.setattr(capture_triton, "fused_reduced_probs", broken)
    monkeypatch.setenv("MINICPMV_ATTN_TRITON", "force")
    with pytest.warns(KernelMismatchWarning, match="raised RuntimeError: PTX compilation failed;"):
        got = run_capture(model_and_inputs)
    assert_same_maps(got, torch_maps)
    assert kernel_check.verdicts()[0].as_dict()["max_diff"] is None


class _FakeTensor:
    """Just what ``_fused_kernel`` reads of q and k, on a device this machine may not have."""

    def __init__(self, device):
        self.device, self.dtype, self.requires_grad = torch.device(device), torch.bfloat16, False


@needs_triton
def test_forced_path_switch_both_ways(monkeypatch):
    cap = AttentionCapture(CaptureSpec(reduce="mean"), {"llm": 1}, {"llm": 1})
    checked = []
    monkeypatch.setattr("minicpmv_attn.capture.fused_probs_ok", lambda *a: checked.append(a[2:5]) or True)
    monkeypatch.delenv("TRITON_INTERPRET")  # compiled mode: the kernel needs CUDA
    monkeypatch.setattr(capture_triton, "is_available", lambda device=None: torch.device(device).type == "cuda")
    gpu, cpu = _FakeTensor("cuda:0"), _FakeTensor("cpu")
    # auto: the kernel on CUDA (checked first), the torch path on the CPU
    assert cap._fused_kernel(gpu, gpu) is capture_triton.fused_reduced_probs
    assert checked == [(torch.device("cuda:0"), torch.bfloat16, "mean")]
    assert cap._fused_kernel(cpu, cpu) is None
    # off: the torch path even on CUDA, by either variable
    for var, value in (("MINICPMV_ATTN_TRITON", "off"), ("MINICPMV_ATTN_NO_TRITON", "1")):
        monkeypatch.setenv(var, value)
        assert cap._fused_kernel(gpu, gpu) is None
        monkeypatch.delenv(var)
    # force where the kernel cannot run: a clear refusal, not a silent torch path
    monkeypatch.setenv("MINICPMV_ATTN_TRITON", "force")
    with pytest.raises(CaptureError, match="MINICPMV_ATTN_TRITON=force: the fused kernel cannot run on cpu"):
        cap._fused_kernel(cpu, cpu)
    monkeypatch.setenv("MINICPMV_ATTN_NO_TRITON", "1")
    with pytest.raises(ValueError, match="both set"):
        kernel_check.triton_mode()
    monkeypatch.setenv("MINICPMV_ATTN_TRITON", "sometimes")
    with pytest.raises(ValueError, match="MINICPMV_ATTN_TRITON='sometimes'"):
        kernel_check.triton_mode()


@needs_triton
@pytest.mark.parametrize("switch", ["force", "off"])
def test_forced_path_switch_end_to_end(switch, monkeypatch, model_and_inputs, torch_maps):
    spy = counting(torch_reduced_probs)
    monkeypatch.setattr(capture_triton, "fused_reduced_probs", spy)
    monkeypatch.setenv("MINICPMV_ATTN_TRITON", switch)
    assert_same_maps(run_capture(model_and_inputs), torch_maps)
    assert (spy.calls > 0) == (switch == "force")
    assert len(kernel_check.verdicts()) == (1 if switch == "force" else 0)


def test_spec_and_env_mode_validation(monkeypatch):
    with pytest.raises(CaptureError, match="kernel_check='loud'"):
        CaptureSpec(kernel_check="loud")
    assert CaptureSpec().kernel_check is None and kernel_check.check_mode() == "warn"
    monkeypatch.setenv("MINICPMV_ATTN_KERNEL_CHECK", "Error")
    assert kernel_check.check_mode() == "error" and kernel_check.check_mode("warn") == "warn"
    monkeypatch.setenv("MINICPMV_ATTN_KERNEL_CHECK", "strict")
    with pytest.raises(ValueError, match="MINICPMV_ATTN_KERNEL_CHECK='strict'"):
        kernel_check.check_mode()


# --------------------------------------------------------------------------------------
# flash-attention-2 output
# --------------------------------------------------------------------------------------
def fake_flash(bug=None):
    """A flash_attn_func in torch ([B, L, H, D] in and out, grouped-query keys), optionally wrong."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        flash_attn_func.calls += 1
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scale = 1.0 if bug == "wrong_scale" else softmax_scale
        scores = q @ k.transpose(-1, -2) * scale
        if causal and bug != "dropped_mask":
            L = q.shape[2]
            scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.softmax(scores, -1) @ v
        return out.transpose(1, 2).to(q.dtype)

    flash_attn_func.calls = 0
    return flash_attn_func


@pytest.fixture
def flash_on_cpu(monkeypatch):
    """Install a fake flash_attn and let flash run on CPU float32 tensors; returns its setter."""
    monkeypatch.setattr(attention, "FLASH_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(attention, "FLASH_DTYPES", (torch.float32,))

    def install(fn):
        module = types.ModuleType("flash_attn")
        module.flash_attn_func = fn
        monkeypatch.setitem(sys.modules, "flash_attn", module)
        return fn

    return install


def flash_inputs(seed=0, L=37, D=64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, L, D, generator=g), torch.randn(2, 2, L, D, generator=g),
            torch.randn(2, 2, L, D, generator=g), attention.AttnMask(causal=True), D ** -0.5)


def run_flash(q, k, v, mask, scaling):
    return attention.flash_attention_forward(torch.nn.Module(), q, k, v, mask, scaling)[0]


def run_sdpa(q, k, v, mask, scaling):
    return attention.sdpa_attention_forward(torch.nn.Module(), q, k, v, mask, scaling)[0]


def test_correct_flash_passes_and_is_used(flash_on_cpu):
    fn = flash_on_cpu(fake_flash())
    args = flash_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelMismatchWarning)
        out = run_flash(*args)
        run_flash(*flash_inputs(1))
    torch.testing.assert_close(out, run_sdpa(*args), atol=1e-5, rtol=0)
    [v] = kernel_check.verdicts()
    assert v.passed and v.kernel == "flash_attn_func" and v.head_dim == 64 and v.max_diff < 1e-5
    assert fn.calls == 2 + 2, "two probe calls, then flash serves both forwards (checked once)"


@pytest.mark.parametrize("bug", ["dropped_mask", "wrong_scale"])
def test_wrong_flash_is_caught_and_sdpa_used(bug, flash_on_cpu):
    fn = flash_on_cpu(fake_flash(bug))
    args = flash_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = run_flash(*args)
        again = run_flash(*flash_inputs(1))
    torch.testing.assert_close(out, run_sdpa(*args), atol=0, rtol=0)
    torch.testing.assert_close(again, run_sdpa(*flash_inputs(1)), atol=0, rtol=0)
    assert fn.calls == 2, "the wrong flash ran beyond its probe"
    [w] = mismatch_warnings(record)
    line = str(w.message)
    assert line.startswith("minicpmv-attn kernel self-check FAIL: flash_attn_func on cpu, float32, reduce=-, "
                           "head_dim=64") and "vs SDPA" in line and "using SDPA" in line


def test_wrong_flash_raises_in_error_mode(flash_on_cpu, monkeypatch):
    flash_on_cpu(fake_flash("wrong_scale"))
    monkeypatch.setenv("MINICPMV_ATTN_KERNEL_CHECK", "error")
    with pytest.raises(KernelCheckError, match="FAIL: flash_attn_func on cpu, float32"):
        run_flash(*flash_inputs())


def test_flash_check_per_head_dim_and_skipped_when_flash_is_not_used(flash_on_cpu):
    fn = flash_on_cpu(fake_flash())
    run_flash(*flash_inputs(D=64))
    run_flash(*flash_inputs(D=72))
    assert [v.head_dim for v in kernel_check.verdicts()] == [64, 72]
    q, k, v, _, scaling = flash_inputs()
    calls = fn.calls
    padded = attention.AttnMask(key_valid=torch.ones(2, q.shape[2], dtype=torch.bool).index_fill(1, torch.tensor([0]), False))
    run_flash(q, k, v, padded, scaling)  # padding: SDPA, flash never asked
    assert fn.calls == calls and len(kernel_check.verdicts()) == 2


# --------------------------------------------------------------------------------------
# the benchmark's report of the verdicts
# --------------------------------------------------------------------------------------
def test_bench_prints_each_verdict_with_its_cost():
    from minicpmv_attn.bench.report import kernel_check_lines
    from minicpmv_attn.bench.tasks import Result

    kernel_check.fused_probs_ok(torch_reduced_probs, torch_reduced_probs, "cpu", torch.float32, "mean")
    with pytest.warns(KernelMismatchWarning):
        kernel_check.fused_probs_ok(wrong(torch_reduced_probs, "dropped_mask"), torch_reduced_probs, "cpu",
                                    torch.float32, "max")
    results = [Result("fork_mean", 1024, time_ms=100.0), Result("fork_mean", 2048, time_ms=400.0)]
    lines = kernel_check_lines(kernel_check.verdicts(), results)
    assert len(lines) == 3
    passed, failed = kernel_check.verdicts()
    assert lines[1].startswith("  PASS  triton fused_reduced_probs, cpu, float32, reduce=mean")
    assert f"cost {passed.cost_ms:.1f} ms = {100 * passed.cost_ms / 400:.2f}% of one fork_mean call at 2048" in lines[1]
    assert lines[2].startswith("  FAIL  triton fused_reduced_probs, cpu, float32, reduce=max") and "max |diff|" in lines[2]
    assert "no kernel was checked" in kernel_check_lines([], results)[0]
