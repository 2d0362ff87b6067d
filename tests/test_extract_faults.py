"""scripts/extract_attention.py under faults: edited inputs, clashing ids, two runs at once, a full
disk, killed writes, hostile lines and configuration errors. Most tests use a fake model (the
record plumbing is what is tested); the lone-surrogate test runs the tiny demo model."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from minicpmv_attn import AttentionRecord

HERE = Path(__file__).resolve().parent


class FakeNet:
    """Stands in for the model: 2 LLM layers, 2 heads."""

    def capture_dims(self):
        return {"layers": {"llm": 2, "vision": 1, "resampler": 1}, "heads": {"llm": 2, "vision": 2, "resampler": 2},
                "query_num": 4}


def install_fakes(set_attr, calls, loads, slow_prompt=None):
    """Replace model loading and the capture with fast fakes (``set_attr``: monkeypatch.setattr or setattr)."""
    import time

    import minicpmv_attn.analysis.pipeline as pipeline

    def load(*a, **k):
        loads.append(a)
        return FakeNet(), object(), True

    def chat(net, processor, image, prompt, spec, max_new_tokens=8, **k):
        if prompt == slow_prompt:
            print("busy", flush=True)
            time.sleep(120)
        calls.append(prompt)
        v = len(prompt) / 100  # a distribution over the keys whose first value tells the lines apart
        t = torch.tensor([[[v, (1 - v) / 2, (1 - v) / 2]]])
        return f"answer to {prompt}", AttentionRecord(tensors={"llm.layers.0.attn": t}, index={"llm.layers.0.attn": {}})

    set_attr(pipeline, "load_model_and_processor", load)
    set_attr(pipeline, "capture_chat", chat)


@pytest.fixture
def fakes(monkeypatch):
    calls, loads = [], []
    install_fakes(monkeypatch.setattr, calls, loads)
    return calls, loads


def write_image(folder, name="img.png"):
    Image.new("RGB", (32, 24), (200, 40, 40)).save(Path(folder) / name)
    return name


def write_jsonl(path, jobs):
    Path(path).write_text("".join((j if isinstance(j, str) else json.dumps(j)) + "\n" for j in jobs))
    return str(path)


def run(*argv):
    from minicpmv_attn.scripts.extract_attention import main

    return main([str(a) for a in argv] + ["--quiet"])


def rows(out):
    return [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]


def ok_rows(out):
    return [r for r in rows(out) if r["status"] == "ok"]


# --------------------------------------------------------------------------- 1. resume keyed by content
def test_resume_is_keyed_by_content_not_line_numbers(tmp_path, fakes, capsys):
    calls, _ = fakes
    img = write_image(tmp_path)
    out = tmp_path / "out"
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"image": img, "prompt": p} for p in ("one", "two", "three")])
    assert run(jobs, "--out", out) == 0
    assert calls == ["one", "two", "three"]

    # the same file edited: lines moved, one changed, one added -> only the changed and the new one run
    calls.clear()
    write_jsonl(tmp_path / "jobs.jsonl", [{"image": img, "prompt": p} for p in ("three", "one", "TWO", "four")])
    assert run(jobs, "--out", out) == 0
    assert calls == ["TWO", "four"]
    assert "4 lines: 2 succeeded, 2 skipped (already done), 0 failed" in capsys.readouterr().out

    # another input into the same OUT is extracted next to the others, never skipped
    calls.clear()
    (tmp_path / "other").mkdir()
    write_image(tmp_path / "other")
    other = write_jsonl(tmp_path / "other" / "jobs.jsonl", [{"image": img, "prompt": "one"}])
    assert run(other, "--out", out) == 0
    assert calls == ["one"]  # same text, another image file (resolved against its own folder)
    by_key = {}
    for r in ok_rows(out):
        by_key.setdefault(r["key"], []).append(r)
    assert len(by_key) == 6 and all(len(v) == 1 for v in by_key.values())
    recs = {AttentionRecord.load(str(out / r["record"])).meta["image"] for r in ok_rows(out)}
    assert recs == {str(tmp_path / img), str(tmp_path / "other" / img)}

    # other settings into an OUT with records: refused with one line, nothing run
    calls.clear()
    assert run(jobs, "--out", out, "--max-new-tokens", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "other settings" in err and "max_new_tokens: 16 there, 3 now" in err
    assert calls == []


# --------------------------------------------------------------------------- 2. unique record names
def test_ids_that_sanitise_alike_or_repeat_keep_their_own_records(tmp_path, fakes, capsys):
    img = write_image(tmp_path)
    out = tmp_path / "out"
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [
        {"image": img, "prompt": "p1", "id": "a/b"},
        {"image": img, "prompt": "p2", "id": "a_b"},
        {"image": img, "prompt": "p3", "id": "dup"},
        {"image": img, "prompt": "p4", "id": "dup"},
        {"image": img, "prompt": "p5", "id": ".tmp-abcdefghx"},  # never looks like a stale temporary file
        {"image": img, "prompt": "p1", "id": "a/b"},  # an exact repeat of line 1
    ])
    status = run(jobs, "--out", out)
    ok = ok_rows(out)
    assert [r["line"] for r in ok] == [1, 2, 3, 4, 5]
    assert len({r["record"] for r in ok}) == 5
    assert status == 1 and "jobs.jsonl line 6: the same image, prompt and id as line 1" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "records").iterdir()) == sorted(
        Path(r["record"]).name + ext for r in ok for ext in (".json", ".safetensors"))
    for r in ok:  # the index says which file belongs to which line, and the record agrees
        rec = AttentionRecord.load(str(out / r["record"]))
        assert rec.meta["line"] == r["line"] and rec.meta["id"] == r["id"] and rec.meta["key"] == r["key"]
        # len("pN") / 100: its own capture, not another line's
        assert abs(float(rec["llm.layers.0.attn"][0, 0, 0]) - 0.02) < 1e-6
        assert not Path(r["record"]).name.startswith(".")
    # a rerun keeps them all (nothing overwritten, nothing redone)
    assert run(jobs, "--out", out) == 1
    assert "6 lines: 0 succeeded, 5 skipped (already done), 1 failed" in capsys.readouterr().out


# --------------------------------------------------------------------------- 3. one run per OUT
HOLDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    from test_extract_faults import install_fakes
    install_fakes(setattr, [], [], slow_prompt="slow")
    from minicpmv_attn.scripts.extract_attention import main
    sys.exit(main([{jobs!r}, "--out", {out!r}, "--quiet"]))
""")


def test_a_second_run_on_the_same_out_is_refused(tmp_path, fakes, capsys):
    calls, loads = fakes
    img = write_image(tmp_path)
    out = tmp_path / "out"
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"image": img, "prompt": p} for p in ("first", "slow", "last")])
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(here=str(HERE), jobs=jobs, out=str(out))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "busy", proc.stderr.read()  # run 1 is inside line 2
        assert run(jobs, "--out", out) == 2  # run 2, at the same time
        err = capsys.readouterr().err.strip()
        assert err == (f"error: --out {out}: another extraction run (pid {proc.pid}) is writing to this folder (it "
                       f"holds {out / 'extract.lock'}); wait for it to finish or use another --out")
        assert calls == [] and loads == []
        assert [r["line"] for r in rows(out)] == [1]  # run 2 wrote nothing
        proc.send_signal(signal.SIGKILL)  # kill -9 run 1 in the middle of a line
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    # the lock died with it; resuming is exact: line 1 kept, lines 2 and 3 done once
    assert run(jobs, "--out", out) == 0
    assert calls == ["slow", "last"]
    assert [r["line"] for r in ok_rows(out)] == [1, 2, 3]
    assert "3 lines: 2 succeeded, 1 skipped (already done), 0 failed" in capsys.readouterr().out


# --------------------------------------------------------------------------- 4. a full disk while appending
def test_an_append_that_fails_halfway_leaves_no_half_row(tmp_path, fakes, monkeypatch, capsys):
    import minicpmv_attn.analysis.pipeline as pipeline

    calls, _ = fakes
    img = write_image(tmp_path)
    out = tmp_path / "out"
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"image": img, "prompt": p} for p in ("one", "two", "three")])
    real_write, appends = os.write, []

    def disk_full_on_second_row(fd, data):
        appends.append(data)
        if len(appends) == 2:  # half the row reaches the disk, then ENOSPC
            real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(pipeline, "_write", disk_full_on_second_row)
    assert run(jobs, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {out / 'results.jsonl'}: cannot append the row of {jobs} line 2")
    assert "No space left on device" in err
    text = (out / "results.jsonl").read_text()
    assert text.endswith("\n") and [r["line"] for r in rows(out)] == [1]  # rolled back, nothing glued

    monkeypatch.setattr(pipeline, "_write", real_write)
    calls.clear()
    assert run(jobs, "--out", out) == 0
    assert calls == ["two", "three"]
    assert sorted(r["line"] for r in ok_rows(out)) == [1, 2, 3]  # each line listed once


def test_a_row_cut_by_a_crash_is_repaired_on_resume(tmp_path, fakes, capsys):
    calls, _ = fakes
    img = write_image(tmp_path)
    out = tmp_path / "out"
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"image": img, "prompt": p} for p in ("one", "two", "three")])
    assert run(jobs, "--out", out) == 0
    results = out / "results.jsonl"
    full = results.read_bytes().splitlines(keepends=True)
    # killed in the middle of appending row 3 (the rollback never ran): half a row, no newline
    results.write_bytes(b"".join(full[:2]) + full[2][:40])
    calls.clear()
    assert run(jobs, "--out", out) == 0
    err = capsys.readouterr().err
    assert f"warning: {results} line 3: the last row was cut short" in err and "dropped" in err
    assert calls == ["three"]
    assert [r["line"] for r in ok_rows(out)] == [1, 2, 3]
    # a whole row that only lost its newline is kept (not redone) and completed
    results.write_bytes(results.read_bytes().rstrip(b"\n"))
    calls.clear()
    assert run(jobs, "--out", out) == 0
    assert "it is complete, newline added" in capsys.readouterr().err and calls == []
    assert results.read_bytes().endswith(b"\n") and [r["line"] for r in ok_rows(out)] == [1, 2, 3]


# --------------------------------------------------------------------------- 5. stale temporary files
def test_stale_temporary_files_of_this_tool_are_removed(tmp_path, fakes, capsys):
    out = tmp_path / "out"
    (out / "records" / "sub").mkdir(parents=True)
    ours = [out / "records" / ".tmp-abc_1234rec-0123456789ab.safetensors", out / "records" / ".tmp-k2j3h4g5rec.json",
            out / ".tmp-zz9yy8xxextract.json"]
    theirs = [out / "records" / ".tmp-notours.txt", out / "records" / "keep.json", out / ".tmp-abcdefghnotes.txt",
              out / "records" / "sub" / ".tmp-abcdefghx.json", tmp_path / ".tmp-abcdefghx.json"]
    for p in ours + theirs:
        p.write_text("x")
    link = out / "records" / ".tmp-abcdefghlink.json"
    link.symlink_to(tmp_path / ".tmp-abcdefghx.json")
    jobs = write_jsonl(tmp_path / "jobs.jsonl", ["{not json"])
    status = run(jobs, "--out", out)
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs) and link.is_symlink()
    assert status == 1 and "removed 3 stale temporary file(s)" in capsys.readouterr().err


# --------------------------------------------------------------------------- 6. a bad line never stops the run
def test_a_lone_surrogate_in_a_prompt_is_a_line_error(tmp_path, capsys):
    img = write_image(tmp_path)
    out = tmp_path / "out"
    jobs = write_jsonl(tmp_path / "jobs.jsonl", ['{"image": "%s", "prompt": "bad \\udcff"}' % img,
                                                 {"image": img, "prompt": "Colour?"}])
    argv = [jobs, "--out", out, "--max-new-tokens", "2", "--layers", "0"]
    for skipped in (0, 1):  # on resume too
        assert run(*argv) == 1
        captured = capsys.readouterr()
        assert (f"failed: {jobs} line 1, field 'prompt': expected valid Unicode text, found a lone surrogate U+DCFF "
                f"at character 4") in captured.err
        assert f"2 lines: {1 - skipped} succeeded, {skipped} skipped (already done), 1 failed" in captured.out
    assert [r["line"] for r in ok_rows(out)] == [2]


class Hung(BaseException):
    """Not an Exception: no per-line handler may swallow it."""


@contextmanager
def deadline(seconds):
    def fail(*_):
        raise Hung(f"the run did not finish within {seconds} s (blocked on an image?)")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs POSIX")
def test_image_paths_must_be_bounded_regular_files(tmp_path, fakes, capsys):
    calls, _ = fakes
    img = write_image(tmp_path)
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 5000)
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"image": "pipe.png", "prompt": "fifo"},
                                                 {"image": "/dev/zero", "prompt": "zero"},
                                                 {"image": "big.png", "prompt": "big"},
                                                 {"image": img, "prompt": "fine"}])
    with deadline(60):
        assert run(jobs, "--out", tmp_path / "out", "--max-image-bytes", "4096") == 1
    err = capsys.readouterr().err
    assert (f"{jobs} line 1, field 'image': image file '{tmp_path / 'pipe.png'}' cannot be read: expected a regular "
            f"file, found a FIFO (named pipe)") in err
    assert f"{jobs} line 2, field 'image': image file '/dev/zero' cannot be read: expected a regular file, found " \
           f"a character device" in err
    assert f"{jobs} line 3, field 'image': image file '{tmp_path / 'big.png'}' is 5,008 bytes, above the limit " \
           f"of 4,096 bytes (--max-image-bytes)" in err
    assert calls == ["fine"]


def _config_cases(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty_model").mkdir()
    return [
        (["--model", str(tmp_path / "no_such_model")], "--model", "no such folder", True),
        (["--model", str(tmp_path / "empty_model")], "--model", "cannot load it", True),
        (["--layers", "x:y"], "--layers", "cannot read 'x:y'", False),
        (["--layers", "5"], "--layers", "llm layer 5 is out of range", False),
        (["--heads", "0,9"], "--heads", "llm head 9 is out of range", False),
        (["--dtype", "float8"], "--dtype", "expected one of", False),
        (["--spec", "[1, 2]"], "--spec", "expected a JSON object", False),
        (["--spec", "{oops"], "--spec", "not valid JSON", False),
        (["--spec", '{"reduce": "sum"}'], "--spec", "valid values", False),
        (["--spec", '{"colour": 1}'], "--spec", "valid keys", False),
        (["--spec", '{"chunk_elements": [1]}'], "--spec", "chunk_elements", False),
        (["--spec", "@" + str(tmp_path / "missing.json")], "--spec", "cannot read the file", False),
        (["--rows", "middle"], "--rows", "rows='middle'", False),
        (["--max-new-tokens", "0"], "--max-new-tokens", "at least 1", False),
        (["--device", "nonsense"], "--device", "torch device", False),
        (["--out", str(tmp_path / "a_file")], "--out", "is a file", False),
    ]


def test_configuration_errors_stop_before_the_first_line(tmp_path, monkeypatch, capsys):
    import minicpmv_attn.analysis.pipeline as pipeline

    img = write_image(tmp_path)
    jobs = write_jsonl(tmp_path / "jobs.jsonl", ["{not json"] + [{"image": img, "prompt": p} for p in ("one", "two")])
    real_load = pipeline.load_model_and_processor
    for extra, flag, words, real_model in _config_cases(tmp_path):
        calls, loads = [], []
        install_fakes(monkeypatch.setattr, calls, loads)
        if real_model:
            monkeypatch.setattr(pipeline, "load_model_and_processor",
                                lambda *a, **k: (loads.append(a), real_load(*a, **k))[1])
        out = tmp_path / f"out{len(extra)}{abs(hash(tuple(extra)))}"
        argv = [jobs, "--out", out] + extra if "--out" not in extra else [jobs] + extra
        assert run(*argv) == 2, extra
        err = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith(("error", "Traceback", "failed"))]
        assert len(err) == 1 and err[0].startswith(f"error: {flag}") and words in err[0], (extra, err)
        assert calls == [] and len(loads) <= 1, extra
        assert not (out / "results.jsonl").exists() or not rows(out), extra  # not even the bad line 1


# --------------------------------------------------------------------------- 7. exit codes and summary
def test_exit_status_and_summary(tmp_path, fakes, capsys):
    from minicpmv_attn.scripts.extract_attention import build_parser

    img = write_image(tmp_path)
    out = tmp_path / "out"
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"image": img, "prompt": "one"}, {"image": "gone.png", "prompt": "x"}])
    assert run(jobs, "--out", out) == 1
    assert "2 lines: 1 succeeded, 0 skipped (already done), 1 failed" in capsys.readouterr().out
    assert run(jobs, "--out", out, "--keep-going") == 0
    assert "2 lines: 0 succeeded, 1 skipped (already done), 1 failed" in capsys.readouterr().out
    write_jsonl(jobs, [{"image": img, "prompt": "one"}, {"image": img, "prompt": "two"}])
    assert run(jobs, "--out", out) == 0
    assert "2 lines: 1 succeeded, 1 skipped (already done), 0 failed" in capsys.readouterr().out
    text = " ".join(build_parser().format_help().split())
    for promise in ("Exit status: 0", "1 some lines failed (0 with --keep-going)", "2 the run did not start",
                    "OUT/extract.lock", "kill -9", ".tmp-*", "--max-image-bytes", "never overwrite each other",
                    "before the first line", "edited lines are redone"):
        assert promise in text, promise
