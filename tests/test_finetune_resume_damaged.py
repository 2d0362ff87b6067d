"""finetune --resume from a damaged latest checkpoint (issue 27): one line naming the file and
the earlier checkpoint to resume from, never a traceback; that earlier checkpoint resumes."""
import json
import shutil

import pytest

from minicpmv_attn.train.data import builtin_examples, write_jsonl
from test_finetune import read_metrics, run_cli

COMMON = ["--layers", "3", "--freeze-vision", "--quiet", "--no-eval", "--save-every", 1, "--keep", 3]


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """A run folder with checkpoints at steps 1 and 2."""
    base = tmp_path_factory.mktemp("run")
    data = base / "data.jsonl"
    write_jsonl(builtin_examples()[:2], str(data))
    out = base / "out"
    assert run_cli(COMMON + ["--data", data, "--steps", 2, "--out", out]) == 0
    return data, out


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "weights": ("model/model.safetensors", truncate),
    "optimizer": ("optimizer.pt", truncate),
    "rng": ("rng.pt", lambda p: p.write_bytes(b"not a torch file")),
    "state_step": ("state.json", lambda p: p.write_text(json.dumps(dict(json.loads(p.read_text()), step="two")))),
    "state_text": ("state.json", lambda p: p.write_bytes(b"\xff\xfe{")),
    "weights_gone": ("model/model.safetensors", lambda p: p.unlink()),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_from_a_damaged_latest_checkpoint_is_one_line(run2, tmp_path, capsys, damage):
    data, src = run2
    out = tmp_path / "out"
    shutil.copytree(src, out)
    name, fn = DAMAGES[damage]
    fn(out / "checkpoint-000002" / name)
    capsys.readouterr()
    assert run_cli(COMMON + ["--data", data, "--steps", 3, "--out", out, "--resume"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("error", "Traceback", "  File"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    err = lines[0]
    assert str(out / "checkpoint-000002") in err and \
        err.rstrip().endswith(f"; resume from the earlier checkpoint with --resume {out / 'checkpoint-000001'}"), err
    assert run_cli(COMMON + ["--data", data, "--steps", 3, "--out", out, "--resume", out / "checkpoint-000001"]) == 0
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
