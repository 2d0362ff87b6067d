"""Records hold attention distributions at positions of their own sequence: all-ones or all-zero
rows, and row / column positions outside the layout, are refused on load with one line."""
import pytest
import torch

from minicpmv_attn.attention_record import AttentionRecord, RecordError
from test_record_validation import LLM, saved, tamper  # noqa: F401  (the fixture)

RES = "resampler.attn"
VIS = "vision.layers.1.attn"


def _n_tokens(p):
    return len(p["layout"]["tokens"])


@pytest.mark.parametrize("json_edit, tensor_edit, words", [
    (None, lambda t: t.__setitem__(LLM, torch.ones_like(t[LLM])), "summing to"),  # all-ones rows
    (None, lambda t: t.__setitem__(LLM, torch.zeros_like(t[LLM])), "summing to 0"),  # all-zero rows
    (None, lambda t: t.__setitem__(LLM, t[LLM] * 0.5), "summing to 0.5"),  # unnormalised
    (None, lambda t: t.__setitem__(RES, torch.zeros_like(t[RES])), "resampler.attn slice 0 has query rows"),
    (None, lambda t: t.__setitem__(VIS, torch.full_like(t[VIS], 1 / 32)), "summing to 2"),
    (None, lambda t: t.__setitem__(VIS, torch.zeros_like(t[VIS])), "summing to 0"),
    (lambda p: p["index"][LLM].update(rows=[10 ** 9]), None, r"\['rows'\] holds \[1000000000\]"),
    (lambda p: p["index"][LLM].update(rows=[-1]), None, r"\['rows'\] holds \[-1\]"),
    (lambda p: p["index"][LLM].update(rows=[1.5]), None, r"\['rows'\] holds \[1.5\]"),
])
def test_records_that_are_not_distributions_are_refused(saved, tmp_path, json_edit, tensor_edit, words):  # noqa: F811
    with pytest.raises(RecordError, match=words) as e:
        AttentionRecord.load(tamper(saved, tmp_path, json_edit, tensor_edit))
    assert str(e.value).startswith(str(tmp_path / "t"))


@pytest.mark.parametrize("where", ["negative", "past_end", "twice"])
def test_column_positions_outside_the_layout_are_refused(saved, tmp_path, where):  # noqa: F811
    """A record of a subset of columns whose positions torch would wrap onto other tokens."""
    def edit(p):
        n = _n_tokens(p)
        cols = {"negative": [-1, 0, 1], "past_end": [0, 1, n + 5], "twice": [0, 1, 1]}[where]
        p["index"][LLM]["cols"] = cols

    def narrow(t):
        t[LLM] = t[LLM][..., :3].contiguous() * 0.1

    with pytest.raises(RecordError, match=r"\['cols'\]"):
        AttentionRecord.load(tamper(saved, tmp_path, edit, narrow))


def test_a_subset_of_columns_may_sum_below_one(saved, tmp_path):  # noqa: F811
    def edit(p):
        p["index"][LLM]["cols"] = [0, 1, 2]

    def narrow(t):
        t[LLM] = t[LLM][..., :3].contiguous()

    rec = AttentionRecord.load(tamper(saved, tmp_path, edit, narrow))
    assert float(rec[LLM].sum(-1).max()) < 1

    def over(t):
        t[LLM] = torch.full_like(t[LLM][..., :3], 0.9)

    with pytest.raises(RecordError, match="summing to 2.7"):
        AttentionRecord.load(tamper(saved, tmp_path, edit, over))
