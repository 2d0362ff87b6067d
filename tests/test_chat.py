"""chat() end to end on a golden checkpoint with the shipped tokenizer, with and without attention."""
import pytest
import torch
from PIL import Image

from golden import chat_checkpoint
from minicpmv_attn import AttentionRecord, CaptureError, MiniCPMV
from minicpmv_attn.modeling_minicpmv import chat_prompt

MSGS = [{"role": "user", "content": "Describe please."}]

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoProcessor

    folder = chat_checkpoint(tmp_path_factory.mktemp("ckpt"))
    processor = AutoProcessor.from_pretrained(str(folder))
    model = MiniCPMV.from_pretrained(str(folder)).eval()
    image = Image.open(folder / "image_0_0.png")
    return model, processor, image


def test_chat_plain(setup):
    model, processor, image = setup
    torch.manual_seed(0)
    answer = model.chat(image, MSGS, processor.tokenizer, processor=processor, max_new_tokens=6)
    assert isinstance(answer, str)
    greedy = model.chat(image, MSGS, processor.tokenizer, processor=processor, max_new_tokens=6, sampling=False)
    assert greedy == model.chat(image, MSGS, processor.tokenizer, processor=processor, max_new_tokens=6,
                                sampling=False)
    # the processor is found from the checkpoint folder when not given
    assert model.chat(image, MSGS, processor.tokenizer, max_new_tokens=6, sampling=False) == greedy


def test_chat_record_layout_matches_processor(setup, tmp_path):
    model, processor, image = setup
    answer, record = model.chat(image, MSGS, processor.tokenizer, processor=processor, max_new_tokens=5,
                                sampling=False, num_beams=1, output_attentions=True)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "(<image>./</image>)\nDescribe please."}], tokenize=False,
        add_generation_prompt=True)
    inputs = processor([prompt], [[image]], return_tensors="pt")
    lay = record.layout
    assert lay.image_bound == [tuple(map(int, r)) for r in inputs["image_bound"][0].tolist()]
    assert lay.input_ids[: lay.n_prompt] == inputs["input_ids"][0].tolist()
    assert len(lay.images) == 1 and lay.images[0].size == image.size and lay.images[0].grid == (3, 2)
    sizes = inputs["tgt_sizes"][0].tolist()
    assert [list(s.tgt_size) for s in lay.slices] == sizes
    assert lay.slices[0].box == (0.0, 0.0, 300.0, 200.0)
    for s, (a, b) in zip(lay.slices, lay.image_bound):
        assert s.token_span == (a, b) and all(r == "image" for r in lay.roles[a:b])
    assert lay.roles[0] == "special" and lay.tokens[0] == "<|im_start|>"
    L = lay.n_prompt + 5
    assert len(lay.tokens) == L
    assert record["llm.layers.0.attn"].shape == (4, L - 1, L)
    assert record["vision.layers.1.attn"].shape == (7, 4, 64, 64)
    assert record["resampler.attn"].shape == (7, 2, 16, 64)
    record.save(str(tmp_path / "rec"))
    again = AttentionRecord.load(str(tmp_path / "rec.json"))
    assert again.equals(record)
    assert record.meta["answer"] == answer


def test_replay_equals_online_capture(setup):
    """Beam search captures by replay; on greedy decoding both routes must agree."""
    model, processor, image = setup
    spec = {"rows": "generated", "stages": ["llm"]}
    answer, online = model.chat(image, MSGS, processor.tokenizer, processor=processor, max_new_tokens=5,
                                sampling=False, num_beams=1, output_attentions=spec)
    ids = torch.tensor([online.layout.input_ids[online.layout.n_prompt:]])
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "(<image>./</image>)\nDescribe please."}], tokenize=False,
        add_generation_prompt=True)
    inputs = processor([prompt], [[image]], return_tensors="pt")
    model_inputs = {k: inputs[k] for k in ("input_ids", "pixel_values", "tgt_sizes", "image_bound", "attention_mask")}
    from minicpmv_attn.attention_record import replay_capture
    from minicpmv_attn.capture import CaptureSpec

    tensors, index = replay_capture(model, model_inputs, ids, CaptureSpec(**spec), processor.tokenizer)
    for name, t in tensors.items():
        assert index[name]["rows"] == online.index[name]["rows"]
        torch.testing.assert_close(t[0], online[name], atol=1e-5, rtol=0)
    _, beam = model.chat(image, MSGS, processor.tokenizer, processor=processor, max_new_tokens=5, sampling=False,
                         output_attentions=spec)
    assert beam.meta["replayed"] is True and beam["llm.layers.0.attn"].shape[1] == 5


def test_batched_chat_returns_records(setup):
    model, processor, image = setup
    small = image.resize((90, 90))
    msgs = [[{"role": "user", "content": [image, "Describe please."]}],
            [{"role": "user", "content": ["Compare", small, image]}]]
    answers, records = model.chat(None, msgs, processor.tokenizer, processor=processor, max_new_tokens=3,
                                  sampling=False, num_beams=1, output_attentions={"rows": "last", "reduce": "max"})
    assert len(answers) == 2 and len(records) == 2
    assert len(records[0].layout.images) == 1 and len(records[1].layout.images) == 2
    assert records[1].layout.images[0].grid is None
    n1 = len(records[1].layout.slices)
    assert records[1]["resampler.attn"].shape[0] == n1 and records[0]["resampler.attn"].shape[0] == 7
    # the shorter prompt was left padded in the batch; its record starts at its own first token
    assert len({r.layout.n_prompt for r in records}) == 2
    assert all(r.layout.padding == 0 and r.layout.tokens[0] == "<|im_start|>" for r in records)


def test_stream(setup):
    model, processor, image = setup
    chunks = list(model.chat(image, MSGS, processor.tokenizer, processor=processor, max_new_tokens=4, stream=True))
    assert all(isinstance(c, str) for c in chunks)
    with pytest.raises(CaptureError, match="stream"):
        model.chat(image, MSGS, processor.tokenizer, processor=processor, max_new_tokens=4, stream=True,
                   output_attentions=True)


@pytest.mark.parametrize("msgs, words", [
    ([], "msgs is empty"),
    ([{"role": "assistant", "content": "hi"}], "first message must be from the user"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "role 'robot'"),
    ([{"content": "a"}], "must be a dict with 'role' and 'content'"),
    ("[not json", "not valid JSON"),
    ([{"role": "user", "content": ["a", 3]}], "content item of type int"),
])
def test_bad_messages(setup, msgs, words):
    model, processor, image = setup
    with pytest.raises(ValueError, match=words):
        model.chat(None, msgs, processor.tokenizer, processor=processor, max_new_tokens=2)


def test_placeholder_cut_by_max_inp_length(setup):
    model, processor, image = setup
    with pytest.raises(ValueError, match="max"):
        model.chat(image, MSGS, processor.tokenizer, processor=processor, max_new_tokens=2, max_inp_length=40)


@pytest.mark.parametrize("spare", [-1, 0])
def test_over_long_prompt_is_refused_never_cut(setup, spare):
    """Upstream cuts at max_inp_length (through the assistant header): the answer would then belong
    to another prompt. The fork refuses with the length needed; exactly enough passes."""
    model, processor, image = setup
    text_only = [{"role": "user", "content": "Describe please. " * 20}]
    prompt, _ = chat_prompt(processor.tokenizer, None, text_only)
    n = len(processor.tokenizer.encode(prompt))
    if spare < 0:
        with pytest.raises(ValueError, match=rf"{n} tokens long, over max_inp_length={n - 1}.*max_inp_length >= {n}"):
            model.chat(None, text_only, processor.tokenizer, processor=processor, max_new_tokens=2,
                       max_inp_length=n - 1)
    else:
        assert isinstance(model.chat(None, text_only, processor.tokenizer, processor=processor, max_new_tokens=2,
                                     max_inp_length=n, sampling=False), str)


def test_tag_image_mismatch(setup):
    model, processor, image = setup
    with pytest.raises(ValueError, match="image"):
        model.chat(None, [{"role": "user", "content": "(<image>./</image>) two tags (<image>./</image>)"}],
                   processor.tokenizer, processor=processor, max_new_tokens=2)


def test_chat_greedy_equals_a_loop_of_full_forwards(setup):
    """chat's answer through transformers' generation loop equals one computed without it: a
    forward over the whole sequence per token (the golden-verified forward), argmax, with
    chat's repetition penalty on the new tokens. Catches a loop that mishandles the cache."""
    model, processor, image = setup
    tok = processor.tokenizer
    n_new, penalty = 6, 1.2
    answer = model.chat(image, MSGS, tok, processor=processor, max_new_tokens=n_new, sampling=False, num_beams=1)
    prompt = tok.apply_chat_template([{"role": "user", "content": "(<image>./</image>)\nDescribe please."}],
                                     tokenize=False, add_generation_prompt=True)
    inputs = processor([prompt], [[image]], return_tensors="pt")
    ids, new = inputs["input_ids"], []
    terminators = set(model._terminator_ids(tok))
    for _ in range(n_new):
        full = torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], 1) if new else ids
        data = {"input_ids": full, "pixel_values": inputs["pixel_values"], "tgt_sizes": inputs["tgt_sizes"],
                "image_bound": inputs["image_bound"], "position_ids": torch.arange(full.shape[1])[None]}
        with torch.no_grad():
            logits = model(data, attention_mask=torch.ones_like(full)).logits[0, -1].clone()
        for t in set(new):
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        new.append(int(logits.argmax()))
        if new[-1] in terminators:
            break
    assert answer == model._decode_text([torch.tensor(new)], tok)[0]
