"""Attention records are validated on load: a damaged or hand-edited record is refused with one
line naming the file and what is wrong, never loaded and plotted silently."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from golden import load_inputs
from minicpmv_attn.attention_record import AttentionRecord, RecordError, records_from_capture
from test_golden import load


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = load("single_image")
    data, mask = load_inputs("single_image")
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions={"rows": "last", "reduce": "mean", "layers": [-1]})
    rec = records_from_capture(out.captured, out.capture_index, prompt_ids=data["input_ids"], attention_mask=mask,
                               image_bound=data["image_bound"], tgt_sizes=data["tgt_sizes"])[0]
    stem = tmp_path_factory.mktemp("rec") / "r"
    rec.save(str(stem))
    return stem


def tamper(saved, tmp_path, json_edit=None, tensor_edit=None):
    stem = tmp_path / "t"
    payload = json.loads(saved.with_suffix(".json").read_text())
    tensors = load_file(str(saved.with_suffix(".safetensors")))
    if json_edit:
        json_edit(payload)
    if tensor_edit:
        tensor_edit(tensors)
    stem.with_suffix(".json").write_text(payload if isinstance(payload, str) else json.dumps(payload))
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    return str(stem)


def test_untouched_record_loads(saved, tmp_path):
    rec = AttentionRecord.load(tamper(saved, tmp_path))
    assert rec.names() == ["llm.layers.1.attn", "vision.layers.1.attn", "resampler.attn"]


LLM = "llm.layers.1.attn"


@pytest.mark.parametrize("json_edit, tensor_edit, words", [
    (lambda p: p["index"][LLM].update(rows=[1, 2, 3]), None, r"has 1 rows but index lists 3"),
    (lambda p: p["index"][LLM].update(heads=[0, 1], reduce="none"), None, r"has 1 heads but index lists heads \[0, 1\]"),
    (lambda p: p["index"][LLM].update(reduce="sum"), None, "expected none/mean/max"),
    (lambda p: p["index"].pop(LLM), None, "have no index entry"),
    (lambda p: p["index"].update({"llm.layers.x.attn": {}}), None, "have no tensor"),
    (lambda p: p.update(index=[1, 2]), None, "field 'index' must be an object"),
    (lambda p: p["layout"].pop("tokens"), None, "field 'layout' is malformed"),
    (None, lambda t: t.__setitem__(LLM, t[LLM] * float("nan")), "NaN or infinite"),
    (None, lambda t: t.__setitem__(LLM, (t[LLM] * 100).to(torch.int32)), "dtype torch.int32"),
    (None, lambda t: t.__setitem__(LLM, t[LLM] + 2), r"outside \[0, 1\]"),
    (None, lambda t: t.__setitem__(LLM, t[LLM][0]), "expected 3 dimensions"),
    (None, lambda t: t.__setitem__("resampler.attn", t["resampler.attn"][:2]), "resampler.attn holds 2 slices but vision.layers.1.attn holds 7"),
    (None, lambda t: t.__setitem__("extra", torch.zeros(1)), "have no index entry"),
])
def test_damaged_records_are_refused(saved, tmp_path, json_edit, tensor_edit, words):
    path = tamper(saved, tmp_path, json_edit, tensor_edit)
    with pytest.raises(RecordError, match=words) as e:
        AttentionRecord.load(path)
    assert "\n" not in str(e.value)


def test_deeply_nested_json_is_one_clear_error(saved, tmp_path):
    path = tamper(saved, tmp_path)
    with open(path + ".json", "w") as f:
        f.write('{"format": "minicpmv-attn.record/1", "meta": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(RecordError, match="not valid JSON"):
        AttentionRecord.load(path)
