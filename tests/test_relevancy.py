"""Gradient-weighted relevancy (Chefer et al. 2021) against an independent autograd reference."""
import numpy as np
import pytest
import torch

from minicpmv_attn.analysis import relevancy as rl
from minicpmv_attn.analysis.attention_map import find_slice, place_patch_map

ANSWER = [20, 21, 22, 23, 24]  # a teacher-forced answer (relevancy does not need the model's own)


@pytest.fixture(scope="module")
def demo():
    from minicpmv_attn.analysis import pipeline
    from minicpmv_attn.demo import demo_image_path
    from minicpmv_attn.image_processing_minicpmv import load_image

    model, processor, _ = pipeline.load_model_and_processor(None)
    image = load_image(demo_image_path())
    inputs = rl.relevancy_inputs(model, processor, image, prompt="Hi", answer_ids=ANSWER)
    return model, processor, image, inputs


def stock_qwen2(model):
    """transformers' own Qwen2ForCausalLM (eager attention: its returned weights are the ones the
    output is computed from) with the fork's LLM weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from minicpmv_attn.modeling_qwen2 import rope_theta

    c = model.config
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                      rope_theta=rope_theta(c), max_position_embeddings=c.max_position_embeddings,
                      attn_implementation="eager")
    ref = Qwen2ForCausalLM(cfg)
    missing, unexpected = ref.load_state_dict(model.llm.state_dict(), strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected
    return ref.float().eval()


def reference_rows(model, inputs, tokens):
    """Chefer's rule written out plainly: autograd of the logit w.r.t. the eager attention
    probabilities, R = I, R += mean_h(clamp(grad * A, 0)) @ R from layer 0 up; rows of R."""
    ref = stock_qwen2(model)
    with torch.no_grad():
        embeds = model.get_vllm_embedding(inputs.data)[0]
    out = ref(inputs_embeds=embeds, position_ids=inputs.data["position_ids"], output_attentions=True)
    n = embeds.shape[1]
    P = inputs.layout.n_prompt
    rows = []
    for t in tokens:
        row, tid = P + t - 1, inputs.layout.input_ids[P + t]
        grads = torch.autograd.grad(out.logits[0, row, tid], out.attentions, retain_graph=True)
        R = torch.eye(n, dtype=torch.float64)
        for a, g in zip(out.attentions, grads):
            cam = (g[0] * a[0].detach()).clamp(min=0).mean(0).double()
            R = R + cam @ R
        rows.append((R[row].numpy(), float(out.logits[0, row, tid].detach())))
    return rows


def test_llm_relevancy_matches_autograd_reference(demo):
    model, _, _, inputs = demo
    tokens = [0, 2, -1]
    ours = rl.tokens_relevancy(model, inputs, tokens)
    theirs = reference_rows(model, inputs, [0, 2, len(ANSWER) - 1])
    for r, (want, logit) in zip(ours, theirs):
        assert r.logit == pytest.approx(logit, abs=1e-4)
        np.testing.assert_allclose(r.llm, want, rtol=1e-4, atol=1e-6)
        img = [p for p in r.image_tokens()]
        assert np.abs(want[img]).max() > 1e-4  # the image tokens do get relevancy
    assert [r.position for r in ours] == [inputs.layout.n_prompt + t for t in (0, 2, len(ANSWER) - 1)]
    assert [r.token_id for r in ours] == [ANSWER[0], ANSWER[2], ANSWER[-1]]


def test_gradient_of_attention_is_grad_out_times_values():
    """dy/dA = (dy/dO) V^T per head, grouped-query heads included (checked with autograd)."""
    g = torch.Generator().manual_seed(0)
    H, Hk, q, k, D = 4, 2, 5, 7, 3
    A = torch.rand(H, q, k, generator=g, dtype=torch.float64, requires_grad=True)
    V = torch.randn(k, Hk * D, generator=g, dtype=torch.float64)
    W = torch.randn(q, H * D, generator=g, dtype=torch.float64)
    O = torch.einsum("hqk,khd->qhd", A, V.view(k, Hk, D).repeat_interleave(H // Hk, 1)).reshape(q, H * D)
    (want,) = torch.autograd.grad((W * O).sum(), A)
    torch.testing.assert_close(rl._grad_attention(W, V, H).double(), want, atol=1e-6, rtol=1e-5)


def test_image_map_placement(demo):
    model, _, _, inputs = demo
    r = rl.token_relevancy(model, inputs, 1)
    lay = inputs.layout
    res = r.resampler
    for s, sl in enumerate(lay.slices):  # query rows sum to 1 over the slice's real patches
        h, w = sl.tgt_size
        np.testing.assert_allclose(res[s, :, : h * w].sum(-1), 1.0, atol=1e-9)
    W, H = lay.images[0].size
    m = r.image_map()
    assert m.shape == (H, W)
    assert m.sum() == pytest.approx(sum(r.image_tokens().values()), rel=1e-5)
    # by hand for one grid slice: its tokens' relevancy through its resampler rows, placed in its box
    g = find_slice(lay, 0, 2)
    sl = lay.slices[g]
    h, w = sl.tgt_size
    a, b = sl.token_span
    want = place_patch_map((r.llm[a:b] @ res[g, : b - a, : h * w]).reshape(h, w), sl.box, (W, H), (40, 30))
    only = rl.RelevancyResult(**{**r.__dict__, "llm": np.where(np.isin(np.arange(len(r.llm)), range(a, b)), r.llm, 0)})
    np.testing.assert_allclose(only.image_map(out_size=(40, 30)), want, rtol=1e-5, atol=1e-9)
    src = r.image_map(include_slices=False, out_size=(40, 30))
    a0, b0 = lay.slices[0].token_span
    assert src.sum() == pytest.approx(r.llm[a0:b0].sum(), rel=1e-5)
    grad = rl.token_relevancy(model, inputs, 1, resampler="grad")
    np.testing.assert_allclose(grad.llm, r.llm, atol=1e-10)  # the LLM part does not change
    assert not np.allclose(grad.resampler, res)
    h0, w0 = lay.slices[0].tgt_size
    sums = grad.resampler[0, :, : h0 * w0].sum(-1)
    assert np.all((np.abs(sums - 1) < 1e-9) | (sums == 0))


def test_relevancy_maps_from_a_chat_record(demo, tmp_path):
    from minicpmv_attn.analysis import pipeline

    model, processor, image, _ = demo
    spec = {"stages": ["llm"], "rows": "last", "reduce": "mean", "dtype": "float32", "device": "cpu"}
    _, rec = pipeline.capture_chat(model, processor, image, "Hi", spec, max_new_tokens=3, min_new_tokens=3,
                                   progress=False)
    P = rec.layout.n_prompt
    maps = rl.relevancy_maps(model, processor, image, rec, tokens=[0, -1], out_size=(48, 56))
    again = rl.relevancy_maps(model, processor, image, prompt="Hi", answer_ids=rec.layout.input_ids[P:],
                              tokens=[0, -1], out_size=(48, 56))
    assert len(maps) == 2 and maps[0].shape == (56, 48)
    for a, b in zip(maps, again):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match=r"token\(s\) \[3\] out of range; the answer has 3 tokens"):
        rl.relevancy_maps(model, processor, image, rec, tokens=[3])
    with pytest.raises(ValueError, match="prompt ids differ"):
        rl.relevancy_maps(model, processor, image.resize((120, 700)), rec, tokens=[0])
    with pytest.raises(ValueError, match="no generated tokens"):
        rl.tokens_relevancy(model, rl.relevancy_inputs(model, processor, image, prompt="Hi", answer_ids=[]))
