"""The generation guard tells the loop's own steps from other forwards of the same LLM inside
generate (issue 27): a StoppingCriteria that scores with the same model (a verifier) is not a
broken loop, and a broken loop is still caught."""
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from minicpmv_attn import modeling_qwen2 as mq
from minicpmv_attn.modeling_qwen2 import GenerationGuard, GenerationInvariantError
from test_generation_guard import drop_cache, gen_kwargs  # noqa: F401 - drop_cache is a fixture
from test_golden import load

pytestmark = pytest.mark.compat


class Verifier(StoppingCriteria):
    """Scores the text so far with the same LLM (no cache, the whole sequence), never stops."""

    def __init__(self, llm, use_cache=False):
        self.llm, self.use_cache, self.calls = llm, use_cache, 0

    def __call__(self, input_ids, scores, **kwargs):
        with torch.no_grad():
            out = self.llm(input_ids=input_ids, use_cache=self.use_cache)
        assert torch.isfinite(out.logits).all()
        self.calls += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("use_cache", [False, True])
def test_a_verifier_forward_inside_generate_is_not_a_broken_loop(monkeypatch, use_cache):
    steps = []
    original = GenerationGuard.finish
    monkeypatch.setattr(GenerationGuard, "finish", lambda self, n, exact: (steps.append(self.steps),
                                                                          original(self, n, exact))[1])
    model = load("text_only")
    plain = model.generate(**gen_kwargs("text_only"))
    verifier = Verifier(model.llm, use_cache)
    checked = model.generate(**gen_kwargs("text_only", stopping_criteria=StoppingCriteriaList([verifier])))
    assert verifier.calls >= 4 and torch.equal(plain, checked)
    assert steps == [5, 5]  # the verifier's forwards are not counted as the loop's steps
    assert mq.active_guard(model.llm) is None


def test_a_dropped_cache_is_still_caught_with_a_verifier(drop_cache):  # noqa: F811
    model = load("text_only")
    verifier = Verifier(model.llm)
    with pytest.raises(GenerationInvariantError, match="the KV cache passed in holds"):
        model.generate(**gen_kwargs("text_only", stopping_criteria=StoppingCriteriaList([verifier])))


@pytest.mark.parametrize("rows", ["all", "generated"])
def test_a_verifier_inside_a_capturing_generate_is_refused_not_mixed_in(rows):
    """Its rows would land in the record (rows "all": 69 rows instead of 54): refused in one line."""
    from minicpmv_attn.capture import CaptureError

    model = load("text_only")
    spec = {"rows": rows, "stages": ["llm"], "reduce": "mean"}
    with pytest.raises(CaptureError, match=r"ran inside generate \(e.g. a verifier in a StoppingCriteria\) while "
                                           r"generate captures attention"):
        model.generate(**gen_kwargs("text_only", output_attentions=spec, return_dict_in_generate=True,
                                    stopping_criteria=StoppingCriteriaList([Verifier(model.llm)])))
    out = model.generate(**gen_kwargs("text_only", output_attentions=spec, return_dict_in_generate=True))
    assert out.captured["llm.layers.0.attn"].shape[2] == (54 if rows == "all" else 5)
