"""The tools' own inputs are bounded before anything is expanded, read or tokenised (issue 27):
index ranges, spec files, byte limits, token counts, prompt lengths, image paths."""
import json
import os

import pytest

from minicpmv_attn.capture import CaptureError, CaptureSpec, parse_bytes, parse_index_list
from test_extract_faults import deadline, fakes, run, write_image, write_jsonl  # noqa: F401 - fakes is a fixture

POSIX = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs POSIX")


def test_a_huge_index_range_is_refused_before_it_is_expanded():
    with deadline(20):
        with pytest.raises(ValueError, match=r"--layers: '0:3000000000' selects more than 65,536 indices"):
            parse_index_list("0:3000000000", "layers")
        with pytest.raises(ValueError, match=r"--heads: '0:40000,0:40000' selects more than"):
            parse_index_list("0:40000,0:40000", "heads")
    assert parse_index_list("0:3,7", "layers") == [0, 1, 2, 7]


@pytest.mark.parametrize("value", [1e400, float("inf"), float("nan"), "1e400", "inf", "1e400GiB", "nan"])
def test_non_finite_byte_limits_are_one_line_errors(value):
    with pytest.raises(CaptureError, match=r"capture max_bytes=.*expected a non-negative number of bytes"):
        parse_bytes(value)
    with pytest.raises(CaptureError, match="max_bytes"):
        CaptureSpec.from_flag(json.loads('{"max_bytes": 1e400}'))


def test_max_disk_1e400_is_a_one_line_error(tmp_path, fakes, capsys):  # noqa: F811
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"image": write_image(tmp_path), "prompt": "p"}])
    assert run(jobs, "--out", tmp_path / "out", "--max-disk", "1e400") == 2
    assert "error: --max-disk '1e400': expected a non-negative number of bytes" in capsys.readouterr().err
    assert run(jobs, "--out", tmp_path / "out", "--spec", '{"max_bytes": 1e400}') == 2
    err = capsys.readouterr().err
    assert "error: --spec: capture max_bytes=inf: expected a non-negative number of bytes" in err, err


@POSIX
def test_spec_files_must_be_small_regular_files(tmp_path, fakes, capsys):  # noqa: F811
    calls, _ = fakes
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"image": write_image(tmp_path), "prompt": "p"}])
    os.mkfifo(tmp_path / "spec.fifo")
    (tmp_path / "big.json").write_text('{"reduce": "mean"' + " " * (2 ** 20) + "}")
    (tmp_path / "latin1.json").write_bytes(b'{"reduce": "m\xe9an"}')
    cases = [("/dev/zero", "cannot read the file: expected a regular file, found a character device"),
             (tmp_path / "spec.fifo", "cannot read the file: expected a regular file, found a FIFO"),
             (tmp_path / "big.json", "the spec file is 1,048,594 bytes, above the limit of 1,048,576 bytes"),
             (tmp_path / "latin1.json", "the spec file is not UTF-8 text (invalid continuation byte at byte 13)"),
             (tmp_path / "missing.json", "cannot read the file: No such file or directory")]
    for path, message in cases:
        with deadline(30):
            assert run(jobs, "--out", tmp_path / "out", "--spec", f"@{path}") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: --spec @{path}: {message}" in err, err
    assert calls == []


def test_max_new_tokens_is_bounded_by_the_context_before_the_estimate(tmp_path, fakes, capsys):  # noqa: F811
    calls, _ = fakes
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"image": write_image(tmp_path), "prompt": "p"}])
    with deadline(60):
        assert run(jobs, "--out", tmp_path / "out", "--max-new-tokens", "200000000") == 2
    err = capsys.readouterr().err
    assert "error: --max-new-tokens 200000000: expected fewer than the model's context of 4,096 positions" in err, err
    assert calls == []


def test_a_huge_prompt_is_a_line_error_never_tokenised(tmp_path, fakes, capsys, monkeypatch):  # noqa: F811
    import minicpmv_attn.modeling_minicpmv as mm

    calls, _ = fakes
    seen = []
    real = mm.chat_prompt
    monkeypatch.setattr(mm, "chat_prompt", lambda tok, sys_, msgs: seen.append(len(str(msgs))) or real(tok, sys_, msgs))
    img = write_image(tmp_path)
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"image": img, "prompt": "x " * 5 * 2 ** 20},
                                                 {"image": img, "prompt": "fine"}])
    with deadline(60):
        assert run(jobs, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{jobs} line 1, field 'prompt': expected at most 262,144 characters, found 10,485,760" in err, err
    assert calls == ["fine"] and seen and max(seen) < 10 ** 5


@POSIX
@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_visualize_image_must_be_a_bounded_regular_file(tmp_path, capsys, kind):
    from minicpmv_attn.scripts.visualize_attention import main

    path = "/dev/zero"
    if kind == "fifo":
        path = str(tmp_path / "pipe.png")
        os.mkfifo(path)
    with deadline(60):
        assert main(["--image", path, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    found = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert f"image file '{path}' cannot be read: expected a regular file, found {found}" in err, err


def test_finetune_images_are_loaded_within_the_tools_byte_limit(tmp_path):
    """A data set's image is read like every tool's (bounded), not whole: a 300 MB file is skipped unread."""
    from minicpmv_attn.analysis.pipeline import load_processor
    from minicpmv_attn.train.data import builtin_examples, encode_examples, read_jsonl, write_jsonl

    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(300 * 10 ** 6)  # sparse
    good = builtin_examples()[0]
    bad = type(good)(**dict(vars(good), id="big", image=str(big)))
    examples = read_jsonl(write_jsonl([good, bad], str(tmp_path / "data.jsonl")), lambda msg: None)
    assert [e.id for e in examples] == ["demo0", "big"]
    said = []
    encoded = encode_examples(load_processor(None)[0], examples, report=said.append)
    assert [e.example.id for e in encoded] == ["demo0"]
    assert len(said) == 1 and f"image file '{big}' is 300,000,000 bytes, above the limit of 268,435,456 bytes" in \
        said[0] and said[0].endswith("; skipped"), said
