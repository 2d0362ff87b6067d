"""A sample's attention record is the same whatever it was batched with.

Each conversation of a batch of three (a sliced image, a small one-slice image with a longer
prompt, a text-only one) gets the record it gets alone: same tensor names, shapes, index and
layout, values within 1e-5 (float32), for ``chat`` (online capture and the beam-search replay),
``generate`` with a spec (split by ``records_from_capture``) and extraction (one ``chat`` per line).
"""
import json

import pytest
import torch
from PIL import Image

from golden import chat_checkpoint
from minicpmv_attn import AttentionRecord, MiniCPMV
from minicpmv_attn.attention_record import chat_records, records_from_capture
from minicpmv_attn.capture import CaptureError, CaptureSpec
from minicpmv_attn.modeling_minicpmv import chat_prompt

TOL = 1e-5
NEW = 8  # "Hi" (text only) ends after 7 new tokens on this checkpoint, the others run to 8
GREEDY = dict(sampling=False, num_beams=1, max_new_tokens=NEW)
SPECS = {
    "everything": True,
    "generated-text-mean": {"rows": "generated", "cols": "text", "reduce": "mean"},
    "prompt-end-special-max": {"rows": [-3, -1], "cols": "special", "reduce": "max", "heads": {"llm": [1, 3]}},
    "all-rows-image-cols": {"stages": ["llm", "resampler"], "rows": "all", "cols": "image", "layers": [-1]},
    # non-negative positions count from each sample's first real token, as when it runs alone
    "positions": {"stages": ["llm"], "rows": [0, 3, 9, -1], "cols": [0, 2, 5, 11], "reduce": "mean"},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoProcessor

    folder = chat_checkpoint(tmp_path_factory.mktemp("ckpt"))
    processor = AutoProcessor.from_pretrained(str(folder))
    model = MiniCPMV.from_pretrained(str(folder)).eval()
    image = Image.open(folder / "image_0_0.png")  # 300 x 200: an overview and 6 slices
    convs = [[{"role": "user", "content": [image, "Describe please."]}],
             [{"role": "user", "content": ["What is in this picture? Tell me in great detail, please.",
                                           image.resize((90, 70))]}],  # one slice, fewer patches
             [{"role": "user", "content": "Hi"}]]  # no image
    return model, processor, convs


def assert_same_record(got, want, where):
    """Names, shapes, dtypes, values (within TOL), index, layout and meta (but the batch slot)."""
    assert got.names() == want.names(), where
    for name in want.names():
        g, w = got[name], want[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), \
            f"{where} {name}: {g.dtype} {tuple(g.shape)} vs {w.dtype} {tuple(w.shape)}"
        torch.testing.assert_close(g, w, atol=TOL, rtol=0, msg=lambda m: f"{where} {name}: {m}")
    assert json.dumps(got.index, sort_keys=True) == json.dumps(want.index, sort_keys=True), where
    assert json.dumps(got.layout.to_dict()) == json.dumps(want.layout.to_dict()), where
    strip = lambda meta: {k: v for k, v in meta.items() if k != "sample"}  # noqa: E731
    assert json.dumps(strip(got.meta), sort_keys=True) == json.dumps(strip(want.meta), sort_keys=True), where
    got.validate(where)


def chat(model, processor, convs, spec, **kw):
    return model.chat(None, convs, processor.tokenizer, processor=processor, output_attentions=spec,
                      **dict(GREEDY, **kw))


def check_batch_is_mixed(records, answers_new):
    """The batch really mixes what can go wrong: left padding, slice counts, patch counts,
    an image-free sample and an answer that ended before the others."""
    lay = [r.layout for r in records]
    assert [len(x.slices) for x in lay] == [7, 1, 0]
    assert len({len(x.input_ids[: x.n_prompt]) for x in lay}) == 3  # three prompt lengths
    assert max(answers_new) == NEW and min(answers_new) < NEW  # one answer ended first


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_chat_record_equals_solo_run(setup, spec):
    model, processor, convs = setup
    answers, records = chat(model, processor, convs, spec)
    check_batch_is_mixed(records, [len(r.layout.tokens) - r.layout.n_prompt for r in records])
    for i, conv in enumerate(convs):
        if isinstance(spec, dict) and spec.get("cols") == "image" and not records[i].layout.images:
            # alone, a selection with no column is refused (never an empty map); in a batch the
            # image-free sample's maps have no column
            with pytest.raises(CaptureError, match="selects no key column"):
                chat(model, processor, [conv], spec)
            assert all(records[i][n].shape[-1] == 0 and records[i].index[n]["cols"] == [] for n in records[i].names())
            continue
        (answer,), (solo,) = chat(model, processor, [conv], spec)
        assert answers[i] == answer
        assert_same_record(records[i], solo, f"chat sample {i}")
        assert records[i].layout.padding == 0 and records[i].meta["sample"] == i
    # the batch order does not matter either
    _, shuffled = chat(model, processor, [convs[2], convs[0], convs[1]], spec)
    for j, i in enumerate([2, 0, 1]):
        assert_same_record(shuffled[j], records[i], f"chat sample {i} in slot {j}")


def test_saved_record_files_equal_solo(setup, tmp_path):
    """The files on disk (what the viewer and the maps read): same JSON, same tensors."""
    model, processor, convs = setup
    _, records = chat(model, processor, convs, True)
    _, (solo,) = chat(model, processor, [convs[1]], True)
    records[1].meta["sample"] = 0  # its slot in the batch is the one thing allowed to differ
    records[1].save(str(tmp_path / "batched"))
    solo.save(str(tmp_path / "solo"))
    assert (tmp_path / "batched.json").read_text() == (tmp_path / "solo.json").read_text()
    assert_same_record(AttentionRecord.load(str(tmp_path / "batched")), AttentionRecord.load(str(tmp_path / "solo")),
                       "saved sample 1")


def _inputs(processor, convs):
    prompts, images = zip(*(chat_prompt(processor.tokenizer, None, c) for c in convs))
    return processor(list(prompts), list(images), return_tensors="pt"), list(prompts)


@pytest.mark.parametrize("spec", [SPECS["everything"], SPECS["prompt-end-special-max"], SPECS["positions"]],
                         ids=["everything", "prompt-end", "positions"])
def test_generate_records_equal_solo_run(setup, spec):
    model, processor, convs = setup
    tok = processor.tokenizer

    def run(subset):
        inputs, _ = _inputs(processor, subset)
        keys = ("input_ids", "pixel_values", "tgt_sizes", "image_bound", "attention_mask")
        out = model.generate(**{k: inputs[k] for k in keys}, tokenizer=tok, max_new_tokens=NEW, do_sample=False,
                             repetition_penalty=1.2, output_attentions=spec)
        return records_from_capture(out.captured, out.capture_index, inputs["input_ids"], out.sequences,
                                    inputs["attention_mask"], inputs["image_bound"], inputs["tgt_sizes"],
                                    inputs["slice_layouts"], tok)

    batched = run(convs)
    check_batch_is_mixed(batched, [len(r.layout.tokens) - r.layout.n_prompt for r in batched])
    for i, conv in enumerate(convs):
        assert_same_record(batched[i], run([conv])[0], f"generate sample {i}")


@pytest.mark.parametrize("spec", [{"rows": "generated"}, SPECS["positions"]], ids=["generated", "positions"])
def test_replayed_records_equal_solo_run(setup, spec):
    """Beam search captures by replaying the answers; the same answers give the same records."""
    model, processor, convs = setup
    tok = processor.tokenizer
    spec = CaptureSpec(**spec)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = [[45, 46, 47, 48], [50, end, 0, 0], [60, 61, end, 0]]  # two end early: pad (0) after the end

    def replay(idx):
        inputs, prompts = _inputs(processor, [convs[i] for i in idx])
        width = max(len([t for t in answers[i] if t]) for i in idx)
        ids = torch.tensor([answers[i][:width] for i in idx])
        return chat_records(model, ids, spec, True, inputs, prompts, tok)[1]

    batched = replay([0, 1, 2])
    assert [len(r.layout.tokens) - r.layout.n_prompt for r in batched] == [4, 2, 3]
    for i in range(3):
        assert_same_record(batched[i], replay([i])[0], f"replay sample {i}")


def test_beam_search_chat_records_equal_solo_run(setup):
    """chat's default sampling=False (3 beams, repetition penalty 1.2, captured by replay)."""
    model, processor, convs = setup
    spec = {"rows": "generated", "reduce": "mean"}
    answers, records = chat(model, processor, convs, spec, num_beams=3)
    assert all(r.meta["replayed"] for r in records)
    for i, conv in enumerate(convs):
        (answer,), (solo,) = chat(model, processor, [conv], spec, num_beams=3)
        assert answers[i] == answer
        assert_same_record(records[i], solo, f"beam chat sample {i}")


def test_extraction_record_equals_batched_chat(setup):
    """Extraction runs one chat per line (it does not batch); its record, with its default
    spec, equals that line's record from a batched chat."""
    from minicpmv_attn.analysis.extract import DEFAULT_SPEC
    from minicpmv_attn.analysis.pipeline import capture_chat

    model, processor, convs = setup
    spec = dict(DEFAULT_SPEC, dtype="float32")
    prompt, image = convs[1][0]["content"]
    line = [{"role": "user", "content": [image, prompt]}]  # how capture_chat asks (image first)
    answer, record = capture_chat(model, processor, image, prompt, spec, max_new_tokens=NEW, progress=False)
    answers, batched = chat(model, processor, [convs[0], line, convs[2]], spec)
    assert answers[1] == answer and batched[1].layout.padding == 0
    assert_same_record(batched[1], record, "batched chat vs extraction")


def test_full_batch_forward_keeps_stock_padding(setup):
    """The batch-level forward output is upstream's [B, H, L, L] with the padding (golden-tested
    elsewhere); only records are cut to their sample."""
    model, processor, convs = setup
    inputs, _ = _inputs(processor, convs)
    data = {k: inputs[k] for k in ("input_ids", "pixel_values", "tgt_sizes", "image_bound")}
    with torch.no_grad():
        out = model(data, attention_mask=inputs["attention_mask"], output_attentions=True)
    L = inputs["input_ids"].shape[1]
    assert all(t.shape == (3, 4, L, L) for t in out.attentions)
    n_slices = sum(len(t) for t in inputs["tgt_sizes"])
    P = max(int(h) * int(w) for t in inputs["tgt_sizes"] for h, w in t)
    assert out.resampler_attentions.shape[0] == n_slices and out.resampler_attentions.shape[-1] == P


def test_answer_lengths_and_left_padding():
    from minicpmv_attn.attention_record import answer_lengths
    from minicpmv_attn.capture import left_padding

    new = torch.tensor([[5, 0, 7, 9], [5, 2, 0, 0], [0, 0, 0, 0]])  # 0: generate's padding (and a real token)
    assert answer_lengths(new, eos_ids=[2]) == [4, 2, 4]  # through the first terminator, else all
    assert answer_lengths(new) == [4, 2, 0]  # through the last non-zero token: a 0 inside an answer stays
    assert left_padding(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])) == [2, 0]
    with pytest.raises(ValueError, match=r"attention_mask row 1: expected left padding \(zeros, then ones\)"):
        left_padding(torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
