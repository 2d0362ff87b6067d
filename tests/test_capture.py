"""Selective capture equals the matching slices / reductions of the full eager probabilities."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from golden import load_expected, load_inputs, real_patch_counts
from minicpmv_attn import CaptureError, CaptureSpec, CaptureTooLarge
from minicpmv_attn.capture import ROLE_CODES, token_roles
from test_golden import FakeTokenizer, load

TOL = 1e-5


def reference_llm(full, mask, heads, rows, cols, reduce, roles):
    """Apply a selection to full [B, H, L, L] maps (upstream's), zeroing padding rows."""
    ref = full * mask[:, None, :, None].to(full.dtype)
    if heads is not None:
        ref = ref[:, heads]
    ref = ref[:, :, rows]
    if cols is not None:
        out = torch.zeros(ref.shape[:3] + (max(len(c) for c in cols),))
        for b, c in enumerate(cols):
            out[b, :, :, : len(c)] = ref[b][:, :, c]
        ref = out
    if reduce == "mean":
        ref = ref.mean(1, keepdim=True)
    elif reduce == "max":
        ref = ref.amax(1, keepdim=True)
    return ref


def select_cols(mode, roles):
    if mode == "all":
        return None
    code = {"text": 0, "image": 1, "special": 2}[mode]
    return [torch.nonzero(r == code).flatten().tolist() for r in roles]


def row_positions(rows, L):
    if rows == "all":
        return list(range(L))
    if rows == "last":
        return [L - 1]
    return sorted({r + L if r < 0 else r for r in rows})


specs = st.fixed_dictionaries({
    "case": st.sampled_from(["single_image", "two_images_batch", "text_only"]),
    "stages": st.lists(st.sampled_from(["llm", "vision", "resampler"]), min_size=1, max_size=3, unique=True),
    "layers": st.one_of(st.none(), st.lists(st.sampled_from([0, 1, -1]), min_size=1, max_size=2, unique=True)),
    "heads": st.one_of(st.none(), st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True)),
    "rows": st.one_of(st.sampled_from(["all", "last"]), st.lists(st.integers(-20, 40), min_size=1, max_size=4)),
    "cols": st.sampled_from(["all", "image", "text", "special"]),
    "reduce": st.sampled_from(["none", "mean", "max"]),
    "chunk_elements": st.sampled_from([1 << 26, 500, 64]),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_forward_capture_equals_eager_selection(params):
    case = params.pop("case")
    model = load(case)
    data, mask = load_inputs(case)
    exp = load_expected(case)
    if params["cols"] == "image" and not real_patch_counts(data):
        params["cols"] = "text"
    spec = CaptureSpec(**params)
    roles = token_roles(data["input_ids"], data["image_bound"], mask)
    if "llm" in spec.stages and spec.cols in ROLE_CODES and not bool((roles == ROLE_CODES[spec.cols]).any()):
        with pytest.raises(CaptureError, match="selects no key column"):  # refused, never an empty map
            model(data, attention_mask=mask, output_attentions=spec)
        return
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions=spec)
    L = mask.shape[1]
    n_llm = model.config.num_hidden_layers
    expected_names = set()
    if "llm" in spec.stages:
        expected_names |= {f"llm.layers.{i}.attn" for i in spec.layer_ids("llm", n_llm)}
    if "vision" in spec.stages and real_patch_counts(data):
        expected_names |= {f"vision.layers.{i}.attn" for i in spec.layer_ids("vision", len(model.vpm.encoder.layers))}
    if "resampler" in spec.stages and real_patch_counts(data):
        expected_names.add("resampler.attn")
    assert set(out.captured) == expected_names
    for name, got in out.captured.items():
        heads = spec.head_ids(name.split(".")[0], 4 if not name.startswith("resampler") else 2)
        if name.startswith("llm."):
            layer = int(name.split(".")[2])
            rows = row_positions(spec.rows, L)
            cols = select_cols(spec.cols, roles)
            ref = reference_llm(exp[f"llm_attn.{layer}"], mask, heads, rows, cols, spec.reduce, roles)
            assert out.capture_index[name]["rows"] in (None, rows)
            torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
        else:
            key = "resampler_attn" if name == "resampler.attn" else f"vision_attn.{name.split('.')[2]}"
            full = exp[key].clone()
            if name.startswith("vision"):
                for i, c in enumerate(real_patch_counts(data)):
                    full[i, :, c:] = 0  # padded patch rows: zero in the fork
            if heads is not None:
                full = full[:, heads]
            if spec.reduce == "mean":
                full = full.mean(1, keepdim=True)
            elif spec.reduce == "max":
                full = full.amax(1, keepdim=True)
            torch.testing.assert_close(got, full, atol=TOL, rtol=0)


gen_specs = st.fixed_dictionaries({
    "case": st.sampled_from(["single_image", "two_images_batch", "text_only"]),
    "rows": st.sampled_from(["generated", "all", "last"]),
    "heads": st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True)),
    "reduce": st.sampled_from(["none", "mean", "max"]),
    "layers": st.one_of(st.none(), st.just([-1])),
})


@pytest.mark.compat
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gen_specs)
def test_generate_capture_equals_replayed_eager_rows(params):
    case = params.pop("case")
    model = load(case)
    eager = load(case, attn="eager")
    data, mask = load_inputs(case)
    n_new = 6
    spec = CaptureSpec(stages=["llm"], **params)
    out = model.generate(input_ids=data["input_ids"], pixel_values=data["pixel_values"], tgt_sizes=data["tgt_sizes"],
                         image_bound=data["image_bound"], attention_mask=mask, tokenizer=FakeTokenizer(),
                         do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, output_attentions=spec)
    B, L = data["input_ids"].shape
    full_ids = torch.cat([data["input_ids"], out.sequences], 1)
    full_mask = torch.cat([mask, torch.ones_like(out.sequences)], 1)
    replay = dict(data, input_ids=full_ids, position_ids=(full_mask.cumsum(1) - 1).clamp(min=0))
    with torch.no_grad():
        ref = eager(replay, attention_mask=full_mask, output_attentions={"stages": ["llm"]})
    rows = {"generated": list(range(L - 1, L + n_new - 1)), "all": list(range(L + n_new - 1)), "last": [L - 1]}[spec.rows]
    for name, got in out.captured.items():
        layer = int(name.split(".")[2])
        assert out.capture_index[name]["rows"] in (rows, None)
        want = reference_llm(ref.attentions[layer], full_mask, spec.head_ids("llm", 4), rows, None, spec.reduce, None)
        assert got.shape == want.shape[:3] + (L + n_new,)
        torch.testing.assert_close(got[..., : L + n_new], want, atol=TOL, rtol=0)


def test_refused_selection_allocates_nothing(monkeypatch):
    model = load("single_image")
    data, mask = load_inputs("single_image")

    def boom(*a, **k):
        raise AssertionError("the model ran although the capture was refused")

    monkeypatch.setattr(model.vpm, "forward", boom)
    monkeypatch.setattr(model.llm, "forward", boom)
    with pytest.raises(CaptureTooLarge) as err:
        model(data, attention_mask=mask, output_attentions={"max_bytes": 10_000})
    msg = str(err.value)
    assert "GiB" in msg and "reduce='mean'" in msg and "device='cpu'" in msg and "layers=" in msg


def test_estimate_scales_with_selection():
    from minicpmv_attn.capture import estimate_bytes

    model = load("single_image")
    dims = model.capture_dims()
    full = estimate_bytes(CaptureSpec(), dims, 1, 4096, compute_dtype=torch.bfloat16)
    last = estimate_bytes(CaptureSpec(rows="last"), dims, 1, 4096, compute_dtype=torch.bfloat16)
    mean = estimate_bytes(CaptureSpec(reduce="mean"), dims, 1, 4096, compute_dtype=torch.bfloat16)
    assert full["llm"] == 2 * 4 * 4096 * 4096 * 2
    assert last["llm"] == full["llm"] // 4096
    assert mean["llm"] == full["llm"] // 4


@pytest.mark.parametrize("bad, words", [
    ({"stages": ["llm", "audio"]}, "valid stages"),
    ({"reduce": "sum"}, "valid values"),
    ({"rows": "first"}, "valid are"),
    ({"cols": "pixels"}, "valid are"),
    ({"dtype": "int8"}, "valid values"),
    ({"device": "gpu:7"}, "not a torch device"),
    ({"bogus": 1}, "valid keys"),
    # a string or bool where ids go is refused, never iterated or read as a number
    ({"layers": "10"}, r"layers='10': expected None \(all\), an int or a non-empty list of ints"),
    ({"rows": True}, "rows=True: expected"),
    ({"heads": []}, "heads=\\[\\]: expected"),
    ({"layers": [[0, 1]]}, "expected None"),
    ({"heads": {"llm": "0"}}, "heads\\['llm'\\]"),
    ({"cols": []}, "cols=\\[\\]: expected"),
    ({"max_bytes": "lots"}, "max_bytes='lots': expected a non-negative number of bytes"),
    ({"max_bytes": -1}, "max_bytes=-1"),
    ({"chunk_elements": 0}, "chunk_elements=0: expected a positive integer"),
    ({"chunk_elements": 2.5}, "chunk_elements=2.5"),
    ({"stages": []}, "valid stages"),
])
def test_invalid_specs_are_refused(bad, words):
    with pytest.raises(CaptureError, match=words):
        CaptureSpec.from_flag(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_refused_without_cuda():
    with pytest.raises(CaptureError, match="CUDA is not available"):
        CaptureSpec(device="cuda")


def test_byte_budgets_read_units():
    assert CaptureSpec(max_bytes="1.5GiB").max_bytes == int(1.5 * 2 ** 30)
    assert CaptureSpec(max_bytes="800 MB").max_bytes == 800 * 10 ** 6
    assert CaptureSpec(max_bytes=1024).max_bytes == 1024


@given(st.one_of(st.text(max_size=4), st.booleans(), st.floats(), st.lists(st.text(max_size=2), min_size=1, max_size=3),
                 st.lists(st.lists(st.integers(0, 3), max_size=2), min_size=1, max_size=2), st.just([])))
@settings(max_examples=60, deadline=None)
def test_ids_fields_accept_only_ints(value):
    """Property: for layers/heads, anything but None, an int or a non-empty list of ints is refused."""
    for field in ("layers", "heads"):
        with pytest.raises(CaptureError, match=f"capture {field}="):
            CaptureSpec(**{field: value})


def test_rows_and_cols_that_can_never_be_fed_are_refused_in_generate():
    model = load("text_only")
    data, mask = load_inputs("text_only")
    L = data["input_ids"].shape[1]
    kw = dict(input_ids=data["input_ids"], pixel_values=data["pixel_values"], tgt_sizes=data["tgt_sizes"],
              image_bound=data["image_bound"], attention_mask=mask, tokenizer=FakeTokenizer(), do_sample=False,
              max_new_tokens=4)
    last_fed = L + 4 - 2
    with pytest.raises(CaptureError, match=rf"rows \[{L + 10}\] are outside the {last_fed + 1} positions"):
        model.generate(output_attentions={"stages": ["llm"], "rows": [L + 10]}, **kw)
    with pytest.raises(CaptureError, match=rf"cols \[{L + 3}\] are outside"):
        model.generate(output_attentions={"stages": ["llm"], "rows": "generated", "cols": [0, L + 3]}, **kw)
    out = model.generate(output_attentions={"stages": ["llm"], "rows": [last_fed], "cols": [0, last_fed]}, **kw)
    assert all(t.shape[2] == 1 and t.shape[3] == 2 for t in out.captured.values())


def test_role_columns_that_select_nothing_are_refused():
    model = load("text_only")
    data, mask = load_inputs("text_only")
    with pytest.raises(CaptureError, match="cols='image' selects no key column: this input has no image tokens"):
        model(data, attention_mask=mask, output_attentions={"stages": ["llm"], "cols": "image"})
    with pytest.raises(CaptureError, match="no special tokens .forward does not know the tokenizer"):
        model(data, attention_mask=mask, output_attentions={"stages": ["llm"], "cols": "special"})


def test_out_of_range_layers_heads_rows():
    model = load("text_only")
    data, mask = load_inputs("text_only")
    for spec, words in (({"layers": [5]}, "out of range; llm has layers 0..1"),
                        ({"heads": [9]}, "out of range; llm has heads 0..3"),
                        ({"rows": [500]}, "outside the sequence"),
                        ({"rows": "generated"}, "needs generate")):
        with pytest.raises(CaptureError, match=words):
            model(data, attention_mask=mask, output_attentions=spec)


def test_cpu_offload_and_dtype():
    model = load("single_image")
    data, mask = load_inputs("single_image")
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions={"device": "cpu", "dtype": "bfloat16",
                                                                  "stages": ["llm"], "rows": "last"})
    t = out.captured["llm.layers.0.attn"]
    assert t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.shape == (1, 4, 1, mask.shape[1])


def test_llm_only_forward_refuses_oversize_capture():
    model = load("text_only")
    data, mask = load_inputs("text_only")
    with pytest.raises(CaptureTooLarge, match="max_bytes"):
        model.llm(input_ids=data["input_ids"], attention_mask=mask,
                  output_attentions={"stages": ["llm"], "max_bytes": 1000})


def test_joined_capture_is_not_copied_twice():
    from minicpmv_attn.capture import AttentionCapture, _Piece

    cap = AttentionCapture(CaptureSpec(stages=["llm"]), {"llm": 1}, {"llm": 2})
    t = torch.rand(1, 2, 8, 8)
    cap.add("llm.layers.0.attn", _Piece(t, torch.arange(8), None))
    assert cap.result()[0]["llm.layers.0.attn"].data_ptr() == t.data_ptr()
    cap = AttentionCapture(CaptureSpec(stages=["llm"]), {"llm": 1}, {"llm": 2})
    a, b = torch.rand(1, 2, 3, 5), torch.rand(1, 2, 1, 6)
    cap.add("llm.layers.0.attn", _Piece(a, torch.arange(3), None))
    cap.add("llm.layers.0.attn", _Piece(b, torch.tensor([3]), None))
    out = cap.result()[0]["llm.layers.0.attn"]
    assert out.shape == (1, 2, 4, 6)
    assert torch.equal(out[:, :, :3, :5], a) and (out[:, :, :3, 5] == 0).all() and torch.equal(out[:, :, 3:], b)
