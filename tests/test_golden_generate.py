"""Generated rows against upstream itself (../shared/golden/*/expected_generate.safetensors).

Upstream's remote code ran ``generate(output_attentions=True)`` eagerly and greedily for 6
new tokens. ``gen_attn.{step}.{layer}`` is [B, H, 1, L + step] (L = the padded prompt
length): the row that produced new token ``step`` (step 0 is the last prompt row, position
L - 1; step s is position L - 1 + s). ``sequences`` [B, 6] holds the new ids.

The fork captures the same rows by recompute during its own generate
(``rows="generated"``, per head, no reduction, float32): one tensor per layer,
[B, H, 6, L + 6], row s being position L - 1 + s.

Column mapping: the fork's generate output keeps the batch's layout, so its column c is
key position c of the same left-padded sequence upstream saw (``capture_index`` cols is
None). Upstream's row for step s has L + s columns; the fork's row s has the same L + s
key positions followed by 6 - s zero columns (keys not yet fed). Comparison is on
real key positions (attention_mask 1 in the prompt, every generated token); on the
left-padding columns both must be exactly 0 (upstream masks them, the fork too).
"""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from golden import CASES, case_dir, load_inputs
from minicpmv_attn import CaptureSpec
from test_golden import FakeTokenizer, load

N_NEW = 6
TOL = 1e-5
# the rows of neighbouring steps differ far more than TOL: the comparison can tell them apart
NEIGHBOUR_GAP = 1e-3

pytestmark = pytest.mark.compat


def load_generate_golden(case):
    """({name: tensor}, metadata) of a case's expected_generate.safetensors."""
    path = Path(case_dir(case)) / "expected_generate.safetensors"
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def fork_generate(case, attn="sdpa", **spec):
    """(model, data, mask, output) of the fork's greedy generate capturing the generated rows
    (per head, float32; ``spec`` adds or overrides CaptureSpec fields)."""
    model = load(case, attn=attn)
    data, mask = load_inputs(case)
    spec = CaptureSpec(**dict(dict(stages=["llm"], rows="generated", reduce="none", dtype=torch.float32), **spec))
    out = model.generate(input_ids=data["input_ids"], pixel_values=data["pixel_values"], tgt_sizes=data["tgt_sizes"],
                         image_bound=data["image_bound"], attention_mask=mask, tokenizer=FakeTokenizer(),
                         do_sample=False, num_beams=1, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                         output_attentions=spec)
    return model, data, mask, out


def upstream_rows(exp, layer):
    """Upstream's generated rows of one layer as [B, H, N_NEW, L + N_NEW], zero past each step's keys
    (the last of the L + N_NEW columns, the last new token, is never fed: zero in both)."""
    parts = [exp[f"gen_attn.{s}.{layer}"] for s in range(N_NEW)]
    width = parts[0].shape[-1] + N_NEW
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts], 2)


def fork_key_positions(index_entry, width):
    """The upstream (padded-sequence) key position of each of the fork's columns."""
    assert index_entry["cols"] is None, "generate with cols='all' keeps every key position"
    return list(range(width))


def test_golden_generate_file_is_what_the_test_reads():
    """The fixture holds what its metadata says: 6 steps per layer, widening by one key per step."""
    for case in CASES:
        exp, meta = load_generate_golden(case)
        assert "gen_attn.{step}.{layer}" in meta.get("what", ""), meta
        data, mask = load_inputs(case)
        B, L = data["input_ids"].shape
        layers = sorted({int(k.split(".")[2]) for k in exp if k.startswith("gen_attn.")})
        assert exp["sequences"].shape == (B, N_NEW)
        assert len(exp) == N_NEW * len(layers) + 1
        for s in range(N_NEW):
            for layer in layers:
                assert exp[f"gen_attn.{s}.{layer}"].shape[::2] == (B, 1) and \
                    exp[f"gen_attn.{s}.{layer}"].shape[-1] == L + s


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_generated_rows_equal_upstream(case, attn):
    model, data, mask, out = fork_generate(case, attn)
    exp, _ = load_generate_golden(case)
    B, L = data["input_ids"].shape
    assert torch.equal(out.sequences, exp["sequences"]), (out.sequences, exp["sequences"])
    n_layers = model.config.num_hidden_layers
    assert sorted(out.captured) == [f"llm.layers.{i}.attn" for i in range(n_layers)]
    real_keys = torch.cat([mask.bool(), torch.ones(B, N_NEW, dtype=torch.bool)], 1)  # [B, L + N_NEW]
    for layer in range(n_layers):
        name = f"llm.layers.{layer}.attn"
        got, info = out.captured[name], out.capture_index[name]
        want = upstream_rows(exp, layer)
        H = model.config.num_attention_heads
        assert got.dtype == torch.float32 and got.shape == (B, H, N_NEW, L + N_NEW) == want.shape
        assert info["rows"] == list(range(L - 1, L - 1 + N_NEW)) and info["heads"] is None
        cols = fork_key_positions(info, got.shape[-1])
        for b in range(B):
            keys = [c for c in cols if real_keys[b, c]]
            pad = [c for c in cols if not real_keys[b, c]]
            torch.testing.assert_close(got[b][..., keys], want[b][..., keys], atol=TOL, rtol=0)
            assert (got[b][..., pad] == 0).all() and (want[b][..., pad] == 0).all()
            for s in range(N_NEW):  # keys not yet generated at step s: nothing there
                assert (got[b, :, s, L + s:] == 0).all()
                total = got[b, :, s].sum(-1)
                torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
        # the data can tell an off-by-one row apart: step s+1's row is far from upstream's step s
        shifted = (got[:, :, 1:, : L + N_NEW - 1] - want[:, :, :-1, : L + N_NEW - 1]).abs().amax()
        assert shifted > NEIGHBOUR_GAP, shifted


@pytest.mark.parametrize("case", ["two_images_batch", "text_only"])
def test_generate_column_selections_equal_upstream_columns(case):
    """cols as positions (one fed only later) and cols='text' (generated tokens are text) during
    generate equal upstream's generated rows at those key positions; not-yet-fed keys are 0.
    In generate, spec positions count from each sample's first real token (the same columns in any
    batch); the index names the batch positions, ``p + padding`` of the sample."""
    data, mask = load_inputs(case)
    B, L = data["input_ids"].shape
    pad = [int(L - mask[b].sum()) for b in range(B)]
    shortest = L - max(pad)  # the shortest prompt, in its own numbering
    exp, _ = load_generate_golden(case)
    picked = [0, shortest - 1, shortest + 2]  # first and last key of the shortest prompt, its third new token
    model, _, _, out = fork_generate(case, cols=picked)
    _, _, _, text = fork_generate(case, cols="text")
    for layer in range(model.config.num_hidden_layers):
        name = f"llm.layers.{layer}.attn"
        want = upstream_rows(exp, layer)
        got = out.captured[name]
        assert got.shape == (B, 4, N_NEW, len(picked))
        for b in range(B):
            batch_pos = [p + pad[b] for p in picked]
            assert out.capture_index[name]["cols"][b] == batch_pos
            torch.testing.assert_close(got[b], want[b][..., batch_pos], atol=TOL, rtol=0)
            if pad[b] == max(pad):  # the shortest prompt's third new token is fed at step 3
                assert (got[b, :, :3, 2] == 0).all() and (got[b, :, 3:, 2] > 0).all()
        for b in range(B):
            cols = text.capture_index[name]["cols"][b]
            assert cols[-N_NEW + 1:] == list(range(L, L + N_NEW - 1)), cols  # every fed new token is a text key
            torch.testing.assert_close(text.captured[name][b, ..., : len(cols)], want[b][..., cols], atol=TOL, rtol=0)
