"""Fine-tuning options that used to lose work or run the wrong thing without a word: negative
warm-up / weights, ``--resume`` with other settings, ``--keep`` rotating away the checkpoint a run
went back to, and teacher records without attention mass."""
import json
import os

import pytest
import torch

from minicpmv_attn.attention_record import AttentionRecord
from minicpmv_attn.train.data import DataError, builtin_examples, write_jsonl
from minicpmv_attn.train.losses import teacher_maps


def run_cli(argv):
    from minicpmv_attn.scripts.finetune_attention import main

    return main([str(a) for a in argv])


@pytest.mark.parametrize("flag, value", [("--warmup", -5), ("--attn-weight", -1), ("--lr", -1e-3), ("--keep", -1),
                                         ("--max-grad-norm", "nan")])
def test_values_that_reverse_training_are_refused(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli([flag, value, "--steps", 1, "--quiet", "--out", tmp_path / "o"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} " in err.splitlines()[-1] and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """Four steps of a box-loss run, checkpoints at steps 2 and 4 (--keep 2)."""
    folder = tmp_path_factory.mktemp("ft")
    data = folder / "data.jsonl"
    write_jsonl(builtin_examples()[:2], str(data))
    common = ["--data", data, "--layers", "3", "--freeze-vision", "--quiet", "--no-eval", "--keep", 2]
    assert run_cli(common + ["--steps", 4, "--save-every", 2, "--out", folder / "run"]) == 0
    return folder, common


def _checkpoints(path):
    return sorted(n for n in os.listdir(path) if n.startswith("checkpoint-"))


@pytest.mark.parametrize("change", [["--attn-weight", 2.0], ["--seed", 3], ["--layers", "2"], ["--attn-loss", "none"],
                                    ["--lr", 1e-3], ["--warmup", 2]])
def test_resume_with_other_settings_is_refused(run_folder, change, capsys):
    folder, common = run_folder
    args = common + ["--steps", 6, "--save-every", 2, "--out", folder / "run", "--resume"]
    i = args.index(change[0]) if change[0] in args else None
    if i is not None:
        args[i + 1] = change[1]
    else:
        args += change
    before = _checkpoints(folder / "run")
    assert run_cli(args) == 1
    err = capsys.readouterr().err
    name = change[0][2:].replace("-", "_")
    assert "other settings" in err and f"{name}:" in err, err
    assert _checkpoints(folder / "run") == before


def test_keep_rotates_by_recency_not_step(run_folder, tmp_path):
    """Going back to checkpoint 2 (later steps diverged) and saving step 3 keeps 2 and 3: the
    abandoned step 4 goes, not the checkpoint the run resumed from."""
    import shutil

    folder, common = run_folder
    run = tmp_path / "run"
    shutil.copytree(folder / "run", run)
    assert _checkpoints(run) == ["checkpoint-000002", "checkpoint-000004"]
    assert run_cli(common + ["--steps", 3, "--save-every", 1, "--out", run, "--resume",
                             run / "checkpoint-000002"]) == 0
    assert _checkpoints(run) == ["checkpoint-000002", "checkpoint-000003"]
    assert json.loads((run / "checkpoint-000003" / "state.json").read_text())["step"] == 3


def test_teacher_rows_without_mass_are_refused():
    rec = AttentionRecord(tensors={"llm.layers.0.attn": torch.tensor([[[0.0, 0.0], [0.25, 0.75]]])},
                          index={"llm.layers.0.attn": {"rows": [6, 7], "cols": [1, 3], "reduce": "mean"}})
    maps, _ = teacher_maps(rec, [0], [7], 4)  # the row with mass is fine
    assert maps.shape == (1, 1, 2)
    with pytest.raises(DataError, match="no attention mass on row 6"):
        teacher_maps(rec, [0], [6, 7], 4)
