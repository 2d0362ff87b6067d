"""scripts/extract_attention.py data parallel (torchrun, 2 CPU processes with gloo), its defaults
sized for the real model, and the disk estimate / --max-disk refusal; on the tiny demo model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "extract_attention.py"


def write_jobs(folder: Path, n: int, name: str = "jobs.jsonl") -> Path:
    Image.new("RGB", (320, 240), (200, 40, 40)).save(folder / "a.png")
    Image.new("RGB", (200, 300), (40, 40, 200)).save(folder / "b.png")
    lines = [json.dumps({"image": "a.png" if i % 2 else "b.png", "prompt": f"What is shown {i}?", "id": f"s{i}",
                         "label": "right" if i % 3 else "wrong", "score": i}) for i in range(n)]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def torchrun(nproc: int, jobs: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(SCRIPT), str(jobs), "--out", str(out), "--max-new-tokens", "4", "--quiet", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def results(out: Path):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def owner(key: str, world: int) -> int:
    from minicpmv_attn.analysis.pipeline import Ranks

    return next(r for r in range(world) if Ranks({"RANK": str(r), "WORLD_SIZE": str(world)}).owns(key, 0))


def summary_rows(out: Path):
    from test_summary import read_summary

    return read_summary(out)


def test_two_processes_split_the_lines_and_merge(tmp_path):
    jobs = write_jobs(tmp_path, 7)
    out = tmp_path / "out"
    proc = torchrun(2, jobs, out)
    assert "7 lines: 7 succeeded, 0 skipped (already done), 0 failed" in proc.stdout
    assert "on 2 processes" in proc.stdout and proc.stdout.count("7 lines:") == 1  # rank 0 reports, once
    rows = results(out)
    assert sorted(r["line"] for r in rows) == list(range(1, 8))  # each line exactly once
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["rank"] == owner(r["key"], 2) for r in rows)  # the deterministic assignment
    assert len({r["run"] for r in rows}) == 1
    assert not list(out.glob("results.rank*.jsonl"))  # merged and removed
    names = sorted(p.name for p in (out / "records").iterdir())
    assert len(names) == 14 and names == sorted(f"{Path(r['record']).name}{e}" for r in rows
                                                 for e in (".json", ".safetensors"))
    summary = summary_rows(out)
    assert len(summary) == 7 and sorted(r["line"] for r in summary) == list(range(1, 8))
    assert {r["label"] for r in summary} == {"right", "wrong"}
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page


def test_resume_across_a_changed_world_size(tmp_path):
    jobs = write_jobs(tmp_path, 7)
    prefix = tmp_path / "prefix.jsonl"
    prefix.write_text("".join(jobs.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "out"
    torchrun(2, prefix, out)
    first = results(out)
    assert sorted(r["line"] for r in first) == [1, 2, 3, 4]
    # now one process on all 7 lines: only the 3 new ones are extracted
    proc = torchrun(1, jobs, out)
    assert "7 lines: 3 succeeded, 4 skipped (already done), 0 failed" in proc.stdout
    rows = results(out)
    assert rows[:4] == first
    assert sorted(r["line"] for r in rows[4:]) == [5, 6, 7] and all(r["rank"] == 0 for r in rows[4:])
    assert len({r["key"] for r in rows}) == 7 and len(list((out / "records").iterdir())) == 14
    # and back to two processes: nothing left to do
    proc = torchrun(2, jobs, out)
    assert "7 lines: 0 succeeded, 7 skipped (already done), 0 failed" in proc.stdout
    assert len(results(out)) == 7 and len(summary_rows(out)) == 7


def test_a_killed_runs_rank_files_count_as_done_and_are_merged(tmp_path, monkeypatch, capsys):
    """Rows a killed 2-process run left in results.rank<r>.jsonl are done for any later run."""
    from minicpmv_attn.analysis import extract, pipeline

    jobs = write_jobs(tmp_path, 3)
    out = tmp_path / "out"
    done = extract.extract(str(jobs), str(out), max_new_tokens=2, quiet=True, summary=False)
    assert done.counts["succeeded"] == 3
    rows = results(out)
    # pretend rows 2 and 3 were written by ranks of a run killed before its merge
    (out / "results.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (out / "results.rank0.jsonl").write_text(json.dumps(rows[1]) + "\n")
    (out / "results.rank1.jsonl").write_text(json.dumps(rows[2]) + "\n" + json.dumps(rows[0]) + "\n")
    monkeypatch.setattr(pipeline, "load_model_and_processor", lambda *a, **k: pytest.fail("nothing to redo"))
    again = extract.extract(str(jobs), str(out), max_new_tokens=2, quiet=True, summary=False)
    assert again.counts == {"succeeded": 0, "skipped (already done)": 3, "failed": 0}
    assert results(out) == rows  # merged once, the row already there not repeated
    assert not list(out.glob("results.rank*.jsonl"))


def test_ranks_read_from_the_environment_and_split_every_line_once():
    from minicpmv_attn.analysis.pipeline import Ranks, ToolError

    one = Ranks({})
    assert (one.rank, one.world, one.distributed) == (0, 1, False)
    r = Ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (r.rank, r.world, r.local_rank) == (3, 4, 1)
    with pytest.raises(ToolError, match="RANK='x': expected an integer"):
        Ranks({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ToolError, match="0 <= RANK < WORLD_SIZE"):
        Ranks({"RANK": "2", "WORLD_SIZE": "2"})
    import hashlib

    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    for world in (1, 2, 3, 8):
        ranks = [Ranks({"RANK": str(i), "WORLD_SIZE": str(world)}) for i in range(world)]
        for n, key in enumerate(keys):
            assert sum(rk.owns(key, n) for rk in ranks) == 1
            assert sum(rk.owns(None, n) for rk in ranks) == 1  # unreadable lines go by line number
        if world > 1:
            share = [sum(rk.owns(k, 0) for k in keys) for rk in ranks]
            assert min(share) > 0.7 * 2000 / world  # balanced (binomial: > 5 sd below the mean)


def test_defaults_are_sized_for_the_real_model():
    from minicpmv_attn.analysis.extract import DEFAULT_SPEC, load_spec

    spec = load_spec()
    assert spec == DEFAULT_SPEC
    assert spec["stages"] == ["llm", "resampler"] and spec["rows"] == "generated"
    assert spec["reduce"] == "mean" and spec["dtype"] == "bfloat16"
    assert load_spec(vision=True)["stages"] == ["llm", "resampler", "vision"]
    assert load_spec(reduce="none")["reduce"] == "none"


def test_the_disk_estimate_matches_the_bytes_written(tmp_path, monkeypatch, capsys):
    from minicpmv_attn.analysis import pipeline
    from minicpmv_attn.analysis.extract import extract

    real = pipeline.capture_chat  # answers of max_new_tokens, what the estimate assumes (an upper bound)
    monkeypatch.setattr(pipeline, "capture_chat", lambda *a, **k: real(*a, min_new_tokens=a[5], **k))
    jobs = write_jobs(tmp_path, 4)
    out = tmp_path / "out"
    done = extract(str(jobs), str(out), max_new_tokens=6, summary=False)
    printed = capsys.readouterr().out
    assert "disk estimate:" in printed and "per sample" in printed and "for 4 line(s)" in printed
    written = sum(p.stat().st_size for p in (out / "records").iterdir())
    est = done.estimate
    assert est is not None and est.lines == 4 and est.sampled == 4
    assert abs(est.total - written) <= 0.10 * written, (est, written)
    assert done.bytes_written == written and "records " in done.summary()
    lengths = [json.loads(p.read_text())["layout"] for p in (out / "records").glob("*.json")]
    assert all(len(lay["input_ids"]) - lay["n_prompt"] == 6 for lay in lengths)


def test_the_estimate_at_the_real_shapes_of_minicpm_v_2_6():
    """Every stage, layer and head in float32 is GiBs a sample; the default is about a MB."""
    import torch

    from minicpmv_attn.capture import CaptureSpec, estimate_bytes
    from minicpmv_attn.analysis.extract import DEFAULT_SPEC

    dims = {"layers": {"llm": 28, "vision": 26, "resampler": 1}, "heads": {"llm": 28, "vision": 16, "resampler": 28},
            "query_num": 64}
    shape = dict(batch=1, prompt_len=700, new_tokens=16, n_slices=10, patches=1024, image_tokens=640,
                 compute_dtype=torch.bfloat16)
    full = estimate_bytes(CaptureSpec(dtype="float32"), dims, **shape)
    default = estimate_bytes(CaptureSpec(**DEFAULT_SPEC), dims, **shape)
    total = lambda e: sum(v for k, v in e.items() if k != "workspace")  # noqa: E731
    assert total(full) > 4 * 2 ** 30
    assert total(default) < 3 * 2 ** 20 and "vision" not in default


def test_max_disk_refuses_before_any_model_work(tmp_path, monkeypatch, capsys):
    from minicpmv_attn.analysis import pipeline
    from minicpmv_attn.scripts.extract_attention import main

    monkeypatch.setattr(pipeline, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(pipeline, "capture_chat", lambda *a, **k: pytest.fail("model run"))
    jobs = write_jobs(tmp_path, 3)
    out = tmp_path / "out"
    assert main([str(jobs), "--out", str(out), "--max-disk", "10KB", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --max-disk 9.8 KiB: the records would take about")
    assert "per sample x 3 lines" in err[0]
    assert not list((out / "records").iterdir()) and not (out / "results.jsonl").exists()
    assert main([str(jobs), "--out", str(out), "--max-disk", "lots"]) == 2
    assert "--max-disk" in capsys.readouterr().err


def test_bench_extract_table_and_usage(capsys):
    from minicpmv_attn.bench.extract_bench import ExtractBench, format_table
    from minicpmv_attn.scripts.bench_extract import main

    table = format_table([ExtractBench(1, 8, 2.0, 10.0, "c1"), ExtractBench(2, 8, 3.0, 8.0, "c2")])
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["processes", "samples/s"]
    assert lines[1].split()[:3] == ["1", "2.00", "1.00x"] and lines[2].split()[:5] == ["2", "3.00", "1.50x", "8.0",
                                                                                        "1.25x"]
    assert main(["--procs", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_settings_are_kept_when_rank_0_has_no_line(tmp_path):
    from minicpmv_attn.analysis.extract import job_key

    Image.new("RGB", (64, 48), (9, 9, 9)).save(tmp_path / "c.png")
    job = next(j for j in ({"image": "c.png", "prompt": "Why?", "id": f"x{i}"} for i in range(64))
               if owner(job_key(j, str(tmp_path))[1], 2) == 1)
    jobs = tmp_path / "one.jsonl"
    jobs.write_text(json.dumps(job) + "\n")
    out = tmp_path / "out"
    torchrun(2, jobs, out)
    assert [r["rank"] for r in results(out)] == [1]
    settings = json.loads((out / "extract.json").read_text())
    assert settings["max_new_tokens"] == 4 and settings["spec"]["dtype"] == "bfloat16"
