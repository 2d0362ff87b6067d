"""Captured probabilities are differentiable and their gradients match stock eager attention."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from golden import case_dir, load_inputs
from minicpmv_attn import MiniCPMV
from minicpmv_attn.train.model import enable_checkpointing

TOL = 1e-4


def stock_qwen2(model):
    """transformers' own Qwen2ForCausalLM (eager attention) with the fork's LLM weights."""
    c = model.config
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                      rope_theta=10000.0, max_position_embeddings=c.max_position_embeddings,
                      attn_implementation="eager")
    ref = Qwen2ForCausalLM(cfg)
    missing, unexpected = ref.load_state_dict(model.llm.state_dict(), strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected
    return ref.float().train()


def selection_loss(maps, weights):
    return sum((m.float() * w).sum() for m, w in zip(maps, weights))


@pytest.mark.parametrize("spec, select", [
    ({"stages": ["llm"]}, lambda a: a),
    ({"stages": ["llm"], "rows": "last", "heads": [1, 2], "reduce": "mean"},
     lambda a: a[:, [1, 2]][:, :, -1:].mean(1, keepdim=True)),
    ({"stages": ["llm"], "rows": [3, 7, 20], "reduce": "max", "chunk_elements": 50},
     lambda a: a[:, :, [3, 7, 20]].amax(1, keepdim=True)),
])
def test_capture_gradients_match_stock_eager(spec, select):
    model = MiniCPMV.from_pretrained(str(case_dir("text_only"))).train()
    ref = stock_qwen2(model)
    data, mask = load_inputs("text_only")
    ids = data["input_ids"]
    out = model(data, attention_mask=mask, output_attentions=spec)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(a.shape, generator=gen) for a in out.attentions]
    selection_loss(out.attentions, weights).backward()
    ref_out = ref(input_ids=ids, attention_mask=mask, position_ids=data["position_ids"], output_attentions=True)
    assert len(ref_out.attentions) == len(out.attentions)
    selection_loss([select(a) for a in ref_out.attentions], weights).backward()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
        ours = model.llm.get_parameter(name).grad
        theirs = ref.get_parameter(name).grad
        assert ours is not None and float(ours.abs().max()) > 0, name
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=1e-3)


def test_vision_and_resampler_capture_differentiable():
    model = MiniCPMV.from_pretrained(str(case_dir("single_image"))).train()
    data, mask = load_inputs("single_image")
    out = model(data, attention_mask=mask, output_attentions={"stages": ["vision", "resampler"], "reduce": "mean"})
    loss = out.resampler_attentions[:, :, :, :4].sum() + out.vision_attentions[0][:, :, 0, :3].sum()
    loss.backward()
    assert model.resampler.attn.in_proj_weight.grad.abs().max() > 0
    assert model.vpm.encoder.layers[0].self_attn.q_proj.weight.grad.abs().max() > 0


def test_gradient_checkpointing_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = MiniCPMV.from_pretrained(str(case_dir("single_image"))).train()
        if checkpointing:
            enable_checkpointing(model)  # the API the installed transformers does not deprecate
            assert model.llm.model.gradient_checkpointing and model.vpm.encoder.gradient_checkpointing
        data, mask = load_inputs("single_image")
        labels = data["input_ids"].masked_fill(mask == 0, -100)
        out = model(data, attention_mask=mask, labels=labels,
                    output_attentions={"stages": ["llm", "resampler"], "rows": "last", "reduce": "mean"})
        assert len(out.attentions) == model.config.num_hidden_layers  # not duplicated by recomputation
        (out.loss + 10 * sum(a[..., 5:40].sum() for a in out.attentions) + out.resampler_attentions.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_text_only_training_keeps_vision_in_the_graph():
    """Like upstream: a text-only training batch gives the vision side (zero) gradients."""
    model = MiniCPMV.from_pretrained(str(case_dir("text_only"))).train()
    data, mask = load_inputs("text_only")
    labels = data["input_ids"].masked_fill(mask == 0, -100)
    out = model(data, attention_mask=mask, labels=labels)
    out.loss.backward()
    grad = model.vpm.encoder.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and float(grad.abs().max()) == 0.0
    assert model.resampler.query.grad is not None
    model.eval()
    with torch.no_grad():
        again = model(data, attention_mask=mask, labels=labels)
    torch.testing.assert_close(again.loss, out.loss.detach(), atol=1e-6, rtol=0)
