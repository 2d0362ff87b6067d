"""The fork checks, during generate, the invariants it relies on from transformers' loop.

A generation loop that drops the KV cache (what transformers 5.24 did to the fork: the cache
came back as ``cache=`` and was ignored), re-feeds the prompt, or loses a captured row must
raise :class:`GenerationInvariantError` naming the installed transformers and the verified
range, never return wrong tokens.
"""
import functools
import importlib.metadata
import re
import threading
from pathlib import Path

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache

from golden import load_inputs
from minicpmv_attn import modeling_qwen2 as mq
from minicpmv_attn.capture import AttentionCapture
from minicpmv_attn.modeling_qwen2 import GenerationGuard, GenerationInvariantError, Qwen2ForCausalLM
from test_golden import FakeTokenizer, load

pytestmark = pytest.mark.compat
REPO = Path(__file__).resolve().parents[1]


def gen_kwargs(case="single_image", **extra):
    data, mask = load_inputs(case)
    kw = dict(input_ids=data["input_ids"], pixel_values=data["pixel_values"], tgt_sizes=data["tgt_sizes"],
              image_bound=data["image_bound"], attention_mask=mask, tokenizer=FakeTokenizer(), do_sample=False,
              num_beams=1, max_new_tokens=5, min_new_tokens=5)
    kw.update(extra)
    return kw


def assert_names_versions(err: GenerationInvariantError):
    msg = str(err)
    assert transformers.__version__ in msg
    assert f"{mq.TRANSFORMERS_MIN} to {mq.TRANSFORMERS_NEWEST_VERIFIED}" in msg
    assert f"<{mq.TRANSFORMERS_CAP}" in msg


@pytest.fixture
def drop_cache(monkeypatch):
    """A generation loop that never hands the KV cache back (transformers 5.24 as the fork saw it)."""
    original = Qwen2ForCausalLM.prepare_inputs_for_generation

    @functools.wraps(original)  # transformers reads its signature
    def prepare(self, *args, **kwargs):
        inputs = original(self, *args, **kwargs)
        inputs.pop("cache", None)
        inputs.pop("past_key_values", None)
        return inputs

    monkeypatch.setattr(Qwen2ForCausalLM, "prepare_inputs_for_generation", prepare)


@pytest.mark.parametrize("case", ["single_image", "two_images_batch"])
def test_dropped_cache_raises_instead_of_wrong_tokens(drop_cache, case):
    model = load(case)
    with pytest.raises(GenerationInvariantError, match="step 2: the KV cache passed in holds 0 positions") as e:
        model.generate(**gen_kwargs(case))
    assert_names_versions(e.value)


def test_dropped_cache_raises_during_capture_and_chat_replay(drop_cache):
    model = load("single_image")
    with pytest.raises(GenerationInvariantError):
        model.generate(**gen_kwargs(output_attentions={"rows": "generated", "stages": ["llm"]}))


def test_dropped_cache_in_a_stream_raises_in_the_reader(drop_cache):
    """The error in generate's thread reaches whoever reads the stream (no hang, no silent end)."""
    model = load("single_image")
    box = {}

    def read():
        try:
            box["texts"] = list(model.generate(stream=True, **gen_kwargs()))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the stream reader hung after generate failed"
    assert isinstance(box.get("error"), GenerationInvariantError), box


def test_refed_prompt_raises(monkeypatch):
    """A loop that feeds the whole sequence again on a kept cache breaks 'only the new tokens'."""
    original = Qwen2ForCausalLM.prepare_inputs_for_generation

    @functools.wraps(original)
    def prepare(self, input_ids, *args, **kwargs):
        inputs = original(self, input_ids, *args, **kwargs)
        if inputs.get("input_ids") is not None and inputs["input_ids"].shape[1] == 1 and input_ids.shape[1] > 1:
            inputs["input_ids"] = input_ids[:, -2:]
        return inputs

    monkeypatch.setattr(Qwen2ForCausalLM, "prepare_inputs_for_generation", prepare)
    model = load("single_image")
    with pytest.raises(GenerationInvariantError, match="fed 2 positions, expected 1 new token|attention mask covers"):
        model.generate(**gen_kwargs())


def test_lost_capture_row_raises(monkeypatch):
    """Captured rows must advance by one per generated token."""
    original = AttentionCapture.capture

    def capture(self, name, module, query, key, scaling, mask):
        if mask.q_offset > 0 and query.shape[2] == 1 and mask.q_offset % 2 == 0:
            return None  # a step whose row silently goes missing
        return original(self, name, module, query, key, scaling, mask)

    monkeypatch.setattr(AttentionCapture, "capture", capture)
    model = load("text_only")
    with pytest.raises(GenerationInvariantError, match="rows must advance by one per generated token"):
        model.generate(**gen_kwargs("text_only", output_attentions={"rows": "generated", "stages": ["llm"]}))


def test_guard_passes_and_counts_steps_on_a_real_generate(monkeypatch):
    seen = []
    original = GenerationGuard.finish

    def finish(self, n_new, exact):
        seen.append((self.steps, n_new, exact))
        return original(self, n_new, exact)

    monkeypatch.setattr(GenerationGuard, "finish", finish)
    model = load("two_images_batch")
    ids = model.generate(**gen_kwargs("two_images_batch"))
    assert seen == [(5, 5, True)] and ids.shape[1] == 5
    model.generate(**gen_kwargs("two_images_batch", num_beams=3))
    assert seen[-1][2] is False  # beam search: at least one step per token
    assert mq.active_guard(model.llm) is None  # removed after the call


@pytest.mark.parametrize("steps, words", [
    ([(0, 10, 10, True), (0, 1, 11, True)], "the KV cache passed in holds 0 positions"),
    ([(0, 10, 10, True), (10, 11, 21, True)], "fed 11 positions, expected 1 new token"),
    ([(0, 10, 10, True), (10, 1, 12, True)], "the attention mask covers 12 positions"),
    ([(0, 10, 10, False), (0, 10, 11, False)], "without a KV cache a step must feed the whole sequence of 11"),
    ([(0, 0, 0, True)], "fed no position"),
])
def test_guard_checks_each_invariant(steps, words):
    guard = GenerationGuard()
    with pytest.raises(GenerationInvariantError, match=words) as e:
        for past, fed, mask_len, uses_cache in steps:
            guard.before(past, fed, mask_len, uses_cache)
            cache = DynamicCache()
            cache.update(torch.zeros(1, 1, past + fed, 2), torch.zeros(1, 1, past + fed, 2), 0)
            guard.after(cache if uses_cache else None)
    assert_names_versions(e.value)


def test_guard_checks_cache_growth_and_token_count():
    guard = GenerationGuard()
    guard.before(0, 4, 4, True)
    with pytest.raises(GenerationInvariantError, match="holds 0 positions after the step, expected 0 \\+ 4 fed"):
        guard.after(None)
    with pytest.raises(GenerationInvariantError, match="returned 3 new tokens after 1 decoding steps"):
        guard.finish(3, exact=True)
    guard.finish(1, exact=True)
    assert GenerationGuard(one_token_steps=False).steps == 0


def test_forward_takes_the_cache_under_either_name():
    model = load("text_only").llm
    x = torch.randn(1, 4, model.config.hidden_size)
    with torch.no_grad():
        a = model(inputs_embeds=x, use_cache=True)
        cache = mq.output_cache(a)
        assert cache is not None and cache.get_seq_length() == 4
        b = model(input_ids=torch.tensor([[5]]), cache=cache)
        assert mq.output_cache(b).get_seq_length() == 5
        c = model(input_ids=torch.tensor([[6]]), past_key_values=mq.output_cache(b))
        assert mq.output_cache(c).get_seq_length() == 6
        with pytest.raises(ValueError, match="pass the KV cache once"):
            model(input_ids=torch.tensor([[6]]), past_key_values=cache, cache=DynamicCache())
    assert mq.CACHE_FIELD in type(a).__dataclass_fields__


@pytest.mark.parametrize("package", ["transformers", "torch"])
def test_installed_requirement_is_the_verified_range(package):
    """setup.py declares PACKAGE>=MIN,<CAP from the constants in modeling_qwen2.py."""
    lo, hi, newest = (getattr(mq, f"{package.upper()}_{k}") for k in ("MIN", "CAP", "NEWEST_VERIFIED"))
    reqs = [r for r in importlib.metadata.requires("minicpmv-attn") or [] if re.match(rf"{package}\b", r)]
    assert len(reqs) == 1
    assert f">={lo}" in reqs[0] and f"<{hi}" in reqs[0], reqs
    newest = tuple(int(x) for x in newest.split("."))
    cap = tuple(int(x) for x in hi.split("."))
    assert cap == (newest[0], newest[1] + 1), "the cap is the next minor after the newest verified release"



@pytest.mark.parametrize("name", ["dtype", "torch_dtype"])
def test_dtype_under_either_name(name):
    from golden import case_dir
    from minicpmv_attn import MiniCPMV

    model = MiniCPMV.from_pretrained(str(case_dir("text_only")), **{name: torch.float64})
    assert model.dtype == torch.float64 and model.llm.lm_head.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        MiniCPMV.from_pretrained(str(case_dir("text_only")), dtype=torch.float64, torch_dtype=torch.float32)


def test_unverified_release_warns():
    assert mq.warn_if_unverified(mq.TRANSFORMERS_NEWEST_VERIFIED) is False
    assert mq.warn_if_unverified(mq.TRANSFORMERS_MIN) is False
    for version in (mq.TRANSFORMERS_CAP + ".0", "4.39.3", "6.0.0"):
        with pytest.warns(UserWarning, match=f"transformers {re.escape(version)} is outside the verified range"):
            assert mq.warn_if_unverified(version) is True
