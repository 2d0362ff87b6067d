"""A documented ``rows=range(...)`` is checked against the sequence by its ends, never expanded
first: ``range(0, 10**9)`` is refused in one line at once instead of hanging."""
import subprocess
import sys

import pytest
import torch

from golden import load_inputs
from minicpmv_attn.capture import CaptureError, CaptureSpec
from test_golden import load


def test_a_huge_range_is_not_expanded():
    code = ("from minicpmv_attn.capture import CaptureSpec; s = CaptureSpec(rows=range(0, 10**9)); "
            "print(type(s.rows).__name__, len(s.rows))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and done.stdout.split() == ["range", str(10 ** 9)], done.stderr[-500:]


def test_a_range_past_the_sequence_is_refused_before_running():
    model = load("single_image")
    data, mask = load_inputs("single_image")
    L = data["input_ids"].shape[1]
    with pytest.raises(CaptureError, match=rf"rows \[{10 ** 9 - 1}\] are outside the sequence of {L} positions"):
        model(data, attention_mask=mask, output_attentions={"rows": range(0, 10 ** 9), "layers": [0]})
    with torch.no_grad():  # a range inside the sequence captures exactly its rows
        out = model(data, attention_mask=mask, output_attentions={"rows": range(L - 3, L), "layers": [0],
                                                                   "stages": ["llm"]})
    assert out.capture_index["llm.layers.0.attn"]["rows"] == [L - 3, L - 2, L - 1]
    with pytest.raises(CaptureError, match="empty range"):
        CaptureSpec(rows=range(3, 3))
