"""Regression against upstream's real outputs (../shared/golden), float32 on CPU.

Compared on real positions only (the golden README: padding rows are upstream artifacts):
LLM rows where attention_mask is 1, vision rows below each slice's h*w patches.
"""
import pytest
import torch

from golden import CASES, case_dir, load_expected, load_inputs, real_patch_counts
from minicpmv_attn import MiniCPMV

LOGIT_TOL = 1e-4
ATTN_TOL = 1e-5

pytestmark = pytest.mark.compat


class FakeTokenizer:
    """Just what generate() needs from a tokenizer on the golden toy vocabulary."""

    bos_id = 3
    all_special_ids = list(range(1, 19))

    def convert_tokens_to_ids(self, token):
        return {"<|im_end|>": 4, "<|endoftext|>": 2}[token]

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


_MODELS = {}


def load(case, dtype=torch.float32, attn="sdpa"):
    key = (case, dtype, attn)
    if key not in _MODELS:
        _MODELS[key] = MiniCPMV.from_pretrained(str(case_dir(case)), dtype=dtype,
                                                attn_implementation=attn).eval()
    return _MODELS[key]


def run_full(case, attn="sdpa"):
    model = load(case, attn=attn)
    data, mask = load_inputs(case)
    grabbed = {}
    hook = model.vpm.post_layernorm.register_forward_hook(lambda m, i, o: grabbed.setdefault("vision", []).append(o))
    try:
        with torch.no_grad():
            out = model(data, attention_mask=mask, output_attentions=True, output_hidden_states=True)
            _, vision_hidden = model.get_vllm_embedding(data)
    finally:
        hook.remove()
    return model, data, mask, out, grabbed, vision_hidden


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_upstream(case, attn):
    model, data, mask, out, grabbed, vision_hidden = run_full(case, attn)
    exp = load_expected(case)
    real = mask.bool()
    assert out.logits.shape == exp["logits"].shape
    torch.testing.assert_close(out.logits[real], exp["logits"][real], atol=LOGIT_TOL, rtol=0)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    for k, h in enumerate(out.hidden_states):
        torch.testing.assert_close(h[real], exp[f"llm_hidden.{k}"][real], atol=LOGIT_TOL, rtol=0)
    assert len(out.attentions) == model.config.num_hidden_layers
    for k, a in enumerate(out.attentions):
        e = exp[f"llm_attn.{k}"]
        assert a.shape == e.shape
        torch.testing.assert_close(a.transpose(1, 2)[real], e.transpose(1, 2)[real], atol=ATTN_TOL, rtol=0)
    counts = real_patch_counts(data)
    if not counts:
        assert out.vision_attentions is None and out.resampler_attentions is None
        return
    assert len(out.vision_attentions) == len(model.vpm.encoder.layers)
    for k, a in enumerate(out.vision_attentions):
        e = exp[f"vision_attn.{k}"]
        assert a.shape == e.shape
        for i, c in enumerate(counts):
            torch.testing.assert_close(a[i, :, :c], e[i, :, :c], atol=ATTN_TOL, rtol=0)
    assert out.resampler_attentions.shape == exp["resampler_attn"].shape
    torch.testing.assert_close(out.resampler_attentions, exp["resampler_attn"], atol=ATTN_TOL, rtol=0)
    vision_last = torch.cat(grabbed["vision"])
    for i, c in enumerate(counts):
        torch.testing.assert_close(vision_last[i, :c], exp["vision_last_hidden"][i, :c], atol=LOGIT_TOL, rtol=0)
    resampler_out = torch.cat([v for v in vision_hidden if len(v)])
    torch.testing.assert_close(resampler_out, exp["resampler_out"], atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_plain_sdpa_logits_without_capture(case):
    model = load(case)
    data, mask = load_inputs(case)
    exp = load_expected(case)
    with torch.no_grad():
        out = model(data, attention_mask=mask)
    assert model.config._attn_implementation == "sdpa" and model.vision_implementation == "sdpa"
    assert out.attentions is None and out.vision_attentions is None and out.captured is None
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], exp["logits"][real], atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_attention_rows_are_distributions(case):
    """Real rows sum to 1; masked entries (future, padding, padded patches) are exactly 0;
    padding rows are all zero (the fork's documented choice)."""
    model, data, mask, out, *_ = run_full(case)
    real = mask.bool()
    L = mask.shape[1]
    future = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    for a in out.attentions:
        rows = a.transpose(1, 2)[real]  # [n_real, H, L]
        torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)), atol=1e-5, rtol=0)
        assert (a[:, :, future] == 0).all()
        pad_cols = ~real[:, None, None, :].expand_as(a)
        assert (a[pad_cols] == 0).all()
        assert (a.transpose(1, 2)[~real] == 0).all()
    counts = real_patch_counts(data)
    for a in out.vision_attentions or ():
        for i, c in enumerate(counts):
            s = a[i, :, :c].sum(-1)
            torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)
            assert (a[i, :, :, c:] == 0).all() and (a[i, :, c:] == 0).all()
    if counts:
        r = out.resampler_attentions
        for i, c in enumerate(counts):
            s = r[i].sum(-1)
            torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)
            assert (r[i, :, :, c:] == 0).all()


@pytest.mark.parametrize("case", CASES)
def test_greedy_generate_matches_upstream(case):
    model = load(case)
    data, mask = load_inputs(case)
    exp = load_expected(case)
    kw = dict(input_ids=data["input_ids"], pixel_values=data["pixel_values"], tgt_sizes=data["tgt_sizes"],
              image_bound=data["image_bound"], attention_mask=mask, tokenizer=FakeTokenizer(), do_sample=False,
              num_beams=1, max_new_tokens=10, min_new_tokens=10)
    ids = model.generate(**kw)
    assert torch.equal(ids, exp["generated_ids"])
    out = model.generate(output_attentions=True, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, exp["generated_ids"])
    assert len(out.attentions) == 10  # one entry per generated token
    L = data["input_ids"].shape[1]
    assert out.attentions[0][0].shape == (mask.shape[0], model.config.num_attention_heads, L, L)
    for step in range(1, 10):
        assert len(out.attentions[step]) == model.config.num_hidden_layers
        assert out.attentions[step][0].shape == (mask.shape[0], model.config.num_attention_heads, 1, L + step)
    # the prompt step's attention equals the forward pass's
    with torch.no_grad():
        fwd = model(data, attention_mask=mask, output_attentions={"stages": ["llm"]})
    real = mask.bool()
    for a, b in zip(out.attentions[0], fwd.attentions):
        torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=1e-6, rtol=0)
    texts = model.generate(decode_text=True, **kw)
    assert isinstance(texts, list) and len(texts) == mask.shape[0]


def test_vision_hidden_states_reuse():
    case = "single_image"
    model = load(case)
    data, mask = load_inputs(case)
    kw = dict(input_ids=data["input_ids"], image_bound=data["image_bound"], attention_mask=mask,
              tokenizer=FakeTokenizer(), do_sample=False, max_new_tokens=5, min_new_tokens=5)
    ids, vhs = model.generate(pixel_values=data["pixel_values"], tgt_sizes=data["tgt_sizes"],
                              return_vision_hidden_states=True, **kw)
    again = model.generate(pixel_values=data["pixel_values"], vision_hidden_states=vhs, **kw)
    assert torch.equal(ids, again)


# bfloat16: weights and activations in bf16 (8-bit mantissa); the logits then differ
# from float32 by rounding only. Measured on real positions (max / mean |diff|, logits
# up to ~7 in magnitude): single_image 0.169 / 0.023, two_images_batch 0.223 / 0.026,
# text_only 0.156 / 0.026. Stated bound: max 0.35 and mean 0.05 absolute.
BF16_MAX, BF16_MEAN = 0.35, 0.05


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_close_to_float32_golden(case):
    model = load(case, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    data, mask = load_inputs(case)
    exp = load_expected(case)
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions=True)
    real = mask.bool()
    diff = (out.logits.float() - exp["logits"])[real].abs()
    assert diff.max().item() < BF16_MAX and diff.mean().item() < BF16_MEAN, (diff.max().item(), diff.mean().item())
    assert out.attentions[0].dtype == torch.bfloat16


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.pop("input_ids"), "input_ids"),
    (lambda d: d.__setitem__("tgt_sizes", d["tgt_sizes"][:0]), "tgt_sizes.*one entry per sample"),
    (lambda d: d.__setitem__("image_bound", [torch.tensor([[150, 400]])]), "outside the 166 positions"),
    (lambda d: d.__setitem__("position_ids", d["position_ids"][:, :5]), "position_ids"),
    (lambda d: d["pixel_values"][0].__setitem__(1, torch.zeros(3, 14, 20)), r"pixel_values\[0\]\[1\]: expected shape"),
    (lambda d: d.__setitem__("image_bound", [d["image_bound"][0][:3]]), "image_bound covers 48 positions"),
])
def test_malformed_data_is_named(edit, words):
    model = load("single_image")
    data, mask = load_inputs("single_image")
    edit(data)
    with pytest.raises(ValueError, match=words):
        model(data, attention_mask=mask)
