"""diff_upstream against hostile inputs (issue 27): an upstream folder whose files are FIFOs,
devices or huge, and an --upstream-python that is broken (missing, garbage, not JSON). Each is
one line or an error row, never a hang, a memory blow-up or a traceback."""
import os
import stat

import pytest

from minicpmv_attn.scripts import diff_upstream
from test_bounded_inputs import POSIX
from test_diff_upstream import make_upstream_like, rows, run_cli, write_pin
from test_extract_faults import deadline


@pytest.fixture
def upstream(tmp_path):
    up = make_upstream_like(tmp_path)
    return up, write_pin(up, tmp_path / "pin.json"), tmp_path / "out"


@POSIX
@pytest.mark.parametrize("kind", ["fifo", "dev_zero_link", "config_fifo", "huge"])
def test_an_upstream_folder_with_special_or_huge_files_is_one_line(upstream, capsys, kind):
    up, pin, out = upstream
    target = up / ("config.json" if kind == "config_fifo" else "resampler.py")
    target.unlink()
    if kind in ("fifo", "config_fifo"):
        os.mkfifo(target)
    elif kind == "dev_zero_link":
        os.symlink("/dev/zero", target)
    else:
        with open(target, "wb") as f:
            f.truncate(64 * 2 ** 20 + 1)  # sparse: 64 MiB + 1 byte
    with deadline(60):
        rc = diff_upstream.main(["--upstream", str(up), "--pin", str(pin), "--out", str(out), "-q",
                                 "--fork", str(up.parent / "fork"), "--no-structural", "--no-transformers"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --upstream {up}: {target.name}: "), err
    found = {"fifo": "expected a regular file, found a FIFO (named pipe)",
             "config_fifo": "expected a regular file, found a FIFO (named pipe)",
             "dev_zero_link": "expected a regular file, found a character device",
             "huge": "is 67,108,865 bytes, above the limit of 67,108,864 bytes"}[kind]
    assert found in err, err


def fake_python(folder, body):
    """An executable that stands in for --upstream-python: runs ``body`` (sh) in the work folder."""
    path = folder / "fake-python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


BROKEN = {
    "missing": (None, "cannot run it"),
    "not_json": ("printf 'garbage' > response.json", "answered with text that is not JSON"),
    "a_list": ("printf '[1, 2]' > response.json", "answered with a list, expected a JSON object"),
    "bad_fields": ("printf '{\"versions\": 5, \"errors\": []}' > response.json",
                   "answered with field 'versions' a int, expected an object"),
    "fatal_not_text": ("printf '{\"fatal\": {\"x\": 1}}' > response.json", "upstream side failed: {'x': 1}"),
    "garbage_output": ("echo 'Segmentation fault' >&2; exit 139", "exited 139 without an answer: Segmentation fault"),
    "bad_tensors": ("printf '{\"versions\": {}, \"errors\": {}}' > response.json; printf 'x' > weights.safetensors",
                    "weights.safetensors is not a readable safetensors file"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_upstream_python_is_an_error_row_not_a_traceback(upstream, capsys, case):
    up, pin, out = upstream
    body, words = BROKEN[case]
    python = str(out.parent / "no-such-python") if body is None else fake_python(out.parent, body)
    rc, report = run_cli(up, pin, out, "--numeric", "--no-transformers", "--upstream-python", python)
    assert rc == 1 and "Traceback" not in capsys.readouterr().err
    errors = [f for f in rows(report, "state_dict") + rows(report, "numeric") if f["status"] == "error"]
    assert errors and any(words in f["detail"] for f in errors), errors
    assert all("\n" not in f["detail"] for f in errors)


@POSIX
@pytest.mark.parametrize("flag", ["--pin", "--config"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_pin_and_config_must_be_small_regular_files(upstream, tmp_path, capsys, flag, kind):
    up, pin, out = upstream
    path = "/dev/zero"
    if kind == "fifo":
        path = str(tmp_path / "pipe.json")
        os.mkfifo(path)
    argv = ["--upstream", str(up), "--pin", str(pin) if flag != "--pin" else path, "--out", str(out), "-q",
            "--fork", str(up.parent / "fork"), "--no-structural", "--no-transformers"]
    argv += ["--config", path] if flag == "--config" else []
    with deadline(60):
        assert diff_upstream.main(argv) == 2
    err = capsys.readouterr().err
    found = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert err == f"error: {flag} {path}: expected a regular file, found {found}\n", err
