"""Hand-edited token layouts are refused when a record is loaded (issue 27): one line naming the
file and the field, never a traceback in ``view`` or a page drawn from nonsense."""
import json

import pytest

from minicpmv_attn.attention_record import AttentionRecord, RecordError
from test_record_validation import tamper


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A chat record of the tiny demo on the demo photo: a layout with an image and its slices."""
    from minicpmv_attn.analysis import pipeline
    from minicpmv_attn.demo import demo_image_path
    from minicpmv_attn.image_processing_minicpmv import load_image

    net, proc = pipeline.load_model_and_processor(None)[:2]
    spec = {"stages": ["llm", "resampler"], "rows": "last", "dtype": "float32", "device": "cpu", "layers": {"llm": [0]}}
    _, rec = pipeline.capture_chat(net, proc, load_image(demo_image_path()), "Hi", spec, max_new_tokens=2,
                                   min_new_tokens=2, progress=False)
    assert rec.layout.images and rec.layout.images[0].slices
    stem = tmp_path_factory.mktemp("rec") / "r"
    rec.save(str(stem))
    return stem


def lay(fn):
    return lambda p: fn(p["layout"])


def slice0(fn):
    return lambda p: fn(p["layout"]["images"][0]["slices"][0])


EDITS = {
    "size_zero": (lay(lambda l: l["images"][0].__setitem__("size", [0, 0])),
                  "layout.images[0].size: expected [width, height] of positive integers, got [0, 0]"),
    "n_prompt_1e400": (lay(lambda l: l.__setitem__("n_prompt", 1e400)),
                       "layout.n_prompt: expected an integer from 1 to"),
    "n_prompt_float": (lay(lambda l: l.__setitem__("n_prompt", 3.5)), "layout.n_prompt: expected an integer"),
    "tokens_ints": (lay(lambda l: l.__setitem__("tokens", list(range(len(l["tokens"]))))),
                    "layout.tokens[0]: expected a string, got 0"),
    "input_ids_text": (lay(lambda l: l["input_ids"].__setitem__(2, "x")), "layout.input_ids[2]: expected an integer"),
    "padding_past_prompt": (lay(lambda l: l.__setitem__("padding", l["n_prompt"] + 1)),
                            "layout.padding: expected an integer from 0 to"),
    "bound_past_end": (lay(lambda l: l.__setitem__("image_bound", [[3, 10 ** 9]])),
                       "layout.image_bound[0]: expected [start, end) with 0 <= start <= end <="),
    "tgt_size_zero": (slice0(lambda s: s.__setitem__("tgt_size", [0, 7])),
                      "layout.images[0].slices[0].tgt_size: expected [rows, cols] of positive integers"),
    "box_inf": (slice0(lambda s: s.__setitem__("box", [0, 0, 1e400, 5])),
                "layout.images[0].slices[0].box: expected 4 finite numbers x0 < x1, y0 < y1"),
    "span_past_end": (slice0(lambda s: s.__setitem__("token_span", [0, 10 ** 12])),
                      "layout.images[0].slices[0].token_span: expected [start, end) within the"),
    "size_huge": (lay(lambda l: l["images"][0].__setitem__("size", [10 ** 400, 5])),
                  "layout.images[0].size: expected [width, height] of positive integers"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_hand_edited_layout_is_refused_on_load(saved, tmp_path, edit):
    fn, words = EDITS[edit]
    stem = tamper(saved, tmp_path, json_edit=fn)
    with pytest.raises(RecordError) as info:
        AttentionRecord.load(stem)
    msg = str(info.value)
    assert msg.startswith(f"attention record: {stem}.json field ") and words in msg and "\n" not in msg, msg


@pytest.mark.parametrize("edit", ["size_zero", "n_prompt_1e400", "tokens_ints"])
def test_view_on_a_hand_edited_layout_is_one_line(saved, tmp_path, capsys, edit):
    from minicpmv_attn.scripts.visualize_attention import main

    stem = tamper(saved, tmp_path, json_edit=EDITS[edit][0])
    assert main(["view", stem, "--out", str(tmp_path / "page")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: attention record: ") and EDITS[edit][1] in err, err
