"""The processor's output goes straight into forward, and results print as one readable line."""
import pytest
import torch

from minicpmv_attn.analysis.attention_map import image_heatmap
from minicpmv_attn.demo import load_trained_demo
from minicpmv_attn.demo.scenes import default_example


@pytest.fixture(scope="module")
def demo():
    model, processor = load_trained_demo()
    image, question, _, _ = default_example()
    return model, processor, image, question


def _inputs(processor, image, question, n=1):
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": "(<image>./</image>)\n" + question}],
                                                   tokenize=False, add_generation_prompt=True)
    return processor([text] * n, [[image]] * n, return_tensors="pt")


def test_forward_takes_the_processor_output_as_it_comes(demo):
    model, processor, image, question = demo
    inputs = _inputs(processor, image, question)
    assert not isinstance(inputs, dict)  # a BatchFeature: upstream's check refused it
    with torch.no_grad():
        got = model(inputs, output_attentions=True)
        ref = model(dict(inputs), attention_mask=inputs["attention_mask"], output_attentions=True)
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)
    for a, b in zip(got.attentions + got.vision_attentions, ref.attentions + ref.vision_attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got.resampler_attentions, ref.resampler_attentions, rtol=0, atol=0)


def test_the_processor_mask_is_used_for_a_padded_batch(demo):
    """A left-padded batch from the processor is masked without passing attention_mask."""
    model, processor, image, question = demo
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "(<image>./</image>)\n" + question}], tokenize=False, add_generation_prompt=True)
    short = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "(<image>./</image>)\nred"}], tokenize=False, add_generation_prompt=True)
    inputs = processor([text, short], [[image], [image]], return_tensors="pt")
    mask = inputs["attention_mask"]
    assert not bool(mask.all()), "the two prompts should differ in length"
    with torch.no_grad():
        got = model(inputs).logits
        masked = model(dict(inputs), attention_mask=mask).logits
        unmasked = model(dict(inputs)).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], masked[real], rtol=0, atol=0)
    assert not torch.allclose(got[real], unmasked[real])  # a plain dict stays upstream's call


def test_record_and_heatmap_print_one_readable_line(demo):
    model, processor, image, question = demo
    _, record = model.chat(image, [{"role": "user", "content": question}], processor.tokenizer,
                           processor=processor, sampling=False, output_attentions=True)
    text = repr(record)
    n = model.config.num_hidden_layers
    layers = f"[{', '.join(map(str, range(n)))}]" if n <= 2 else f"0..{n - 1}"
    assert text.startswith(f"AttentionRecord(llm: layers {layers} [4, ") and "\n" not in text and len(text) < 400
    assert "48 image" in text and "1 image(s)" in text and "tensor(" not in text
    heat = image_heatmap(record, -1)
    text = repr(heat)
    assert text.startswith(f"ImageHeatmap(position {record.layout.n_prompt - 1} ") and "\n" not in text
    assert "map [112, 224] float32" in text and "peak" in text and "array(" not in text and len(text) < 400
    assert f"image share {float(heat.image_share):.3g}" in text
