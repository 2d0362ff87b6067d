"""``diff_upstream --numeric`` fails when either side returns NaN or inf at a real position
(``max(worst, nan)`` used to keep ``worst`` and pass)."""
import pytest
import torch

from minicpmv_attn.upstream.parity import compare_numeric


def _case():
    mask = torch.ones(1, 4, dtype=torch.long)
    data = {"tgt_sizes": [torch.tensor([[2, 2]])]}
    logits = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(0))
    return data, mask, logits


@pytest.mark.parametrize("side", ["fork", "upstream", "both"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_fail_the_numeric_check(side, value):
    data, mask, logits = _case()
    fork, up = logits.clone(), logits.clone()
    for name, t in (("fork", fork), ("upstream", up)):
        if side in (name, "both"):
            t[0, 2, 1] = value
    found = compare_numeric({"logits": fork}, {"logits": up}, data, mask, atol=1e-4)["logits"]
    assert found.status == "differs" and "NaN or inf" in found.detail, found


def test_equal_finite_logits_pass():
    data, mask, logits = _case()
    found = compare_numeric({"logits": logits}, {"logits": logits + 1e-6}, data, mask, atol=1e-4)["logits"]
    assert found.status == "ok", found
