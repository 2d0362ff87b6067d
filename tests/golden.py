"""Access to the golden fixtures in ../shared/golden (upstream's real outputs)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

#: ../shared/golden beside the repository, or MINICPMV_ATTN_GOLDEN (see the README's Tests section)
GOLDEN_ROOT = Path(os.environ.get("MINICPMV_ATTN_GOLDEN") or Path(__file__).resolve().parents[2] / "shared" / "golden")
GOLDEN = GOLDEN_ROOT / "minicpmv26"
MISSING = (f"golden fixtures not found at {GOLDEN} (upstream's outputs on tiny checkpoints; not published: put "
           f"them in ../shared/golden beside the repository or set MINICPMV_ATTN_GOLDEN; see README 'Tests')")
CASES = (json.loads((GOLDEN / "cases.json").read_text()) if (GOLDEN / "cases.json").is_file()
         else [pytest.param("no-golden", marks=pytest.mark.skip(reason=MISSING))])


def require_golden() -> None:
    """Skip the calling test, saying how to get them, when the golden fixtures are absent."""
    if not GOLDEN.is_dir():
        pytest.skip(MISSING)


def case_dir(case: str) -> Path:
    require_golden()
    return GOLDEN / case


def load_inputs(case: str):
    """(data dict for MiniCPMV.forward, attention_mask) exactly as upstream was called."""
    require_golden()
    t = load_file(str(GOLDEN / case / "inputs.safetensors"))
    b = t["input_ids"].shape[0]
    pixel_values, tgt_sizes, image_bound = [], [], []
    for s in range(b):
        n = sum(1 for k in t if k.startswith(f"pixel_values.{s}."))
        pixel_values.append([t[f"pixel_values.{s}.{j}"] for j in range(n)])
        tgt_sizes.append(t.get(f"tgt_sizes.{s}", torch.zeros((0, 2), dtype=torch.int32)))
        image_bound.append(t[f"image_bound.{s}"])
    data = {"input_ids": t["input_ids"], "pixel_values": pixel_values, "tgt_sizes": tgt_sizes,
            "image_bound": image_bound, "position_ids": t["position_ids"]}
    return data, t["attention_mask"]


def load_expected(case: str):
    require_golden()
    return load_file(str(GOLDEN / case / "expected.safetensors"))


def load_meta(case: str):
    require_golden()
    return json.loads((GOLDEN / case / "meta.json").read_text())


def real_patch_counts(data):
    return [int(h) * int(w) for sizes in data["tgt_sizes"] for h, w in sizes.tolist()]


def chat_checkpoint(parent, case: str = "single_image") -> Path:
    """A copy of a golden checkpoint in ``parent`` with the demo tokenizer beside it (what
    ``chat`` and ``AutoProcessor`` need); returns its folder."""
    from minicpmv_attn.demo import demo_tokenizer_path

    folder = Path(parent) / case
    shutil.copytree(case_dir(case), folder)
    for name in os.listdir(str(demo_tokenizer_path())):
        shutil.copy(os.path.join(str(demo_tokenizer_path()), name), folder)
    return folder
