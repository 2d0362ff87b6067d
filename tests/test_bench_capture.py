"""scripts/bench_capture.py (minicpmv_attn.bench) at toy sizes on the CPU: every row is measured and reported,
ratios are sane."""
import json

import pytest

from minicpmv_attn.bench.report import TARGETS
from minicpmv_attn.bench.tasks import LLM_ROWS as ROWS
from minicpmv_attn.scripts import bench_capture as bench

TOY = [
    "--device", "cpu", "--repeats", "1", "--warmup", "0", "--seed", "0",
    "--llm-overrides", json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}),
    "--vision-overrides", json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                      "num_attention_heads": 2}),
    "--vision-slices", "2", "--vision-grid", "4",
]
LLM_ROWS = [r.name for r in ROWS]
VERDICTS = {"PASS", "FAIL", "n.a.", "-"}


def _run(tmp_path, capsys, *extra):
    out = tmp_path / "bench.json"
    rc = bench.main(TOY + ["--json", str(out), *extra])
    text = capsys.readouterr().out
    return rc, text, json.loads(out.read_text())


def test_cpu_toy_run_reports_every_row(tmp_path, capsys):
    # lengths / 128: the 4k, 8k and 16k targets land on 32, 64 and 128 tokens
    rc, text, data = _run(tmp_path, capsys, "--in-process", "--lengths", "32,64,128", "--target-scale", "128")
    assert rc == 0
    rows = {(r["length"], r["row"]): r for r in data["results"]}
    for n in (32, 64, 128):
        for name in LLM_ROWS:
            r = rows[(n, name)]
            assert r["status"] == "ok", r
            assert f"| {n} | {name} | ok |" in text
            assert r["time_ms"] > 0 and r["extra_bytes"] >= 0
            assert 0 < r["time_ratio_sdpa"] < 1000
            assert r["verdict"] in VERDICTS
        assert rows[(n, "sdpa_ref")]["time_ratio_sdpa"] == pytest.approx(1.0)
        # same full per-head maps from stock eager and from the fork (same dtype)
        full = 2 * 4 * n * n * 4  # layers * heads * n^2 * float32
        assert rows[(n, "stock_eager")]["captured_bytes"] == full
        assert rows[(n, "fork_full_cpu")]["captured_bytes"] == full
        assert rows[(n, "fork_mean")]["captured_bytes"] == full // 4
        assert rows[(n, "fork_last")]["captured_bytes"] == 2 * 4 * 1 * n * 4
        assert rows[(n, "fork_off")]["logit_diff"] < 1e-5
        assert rows[(n, "stock_eager")]["logit_diff"] < 1e-4
    # target rows carry a verdict where the target applies
    assert rows[(32, "fork_full_cpu")]["verdict"] in {"PASS", "FAIL"}
    assert rows[(64, "fork_mean")]["verdict"] in {"PASS", "FAIL"}
    assert rows[(128, "fork_mean")]["verdict"] == "PASS"  # "runs at 16k"
    assert rows[(32, "fork_mean")]["verdict"] == "n.a."
    assert set(data["targets"]) == set(TARGETS)
    assert "Targets (" in text and "Sanity:" in text
    vision = {r["row"]: r for r in data["results"] if r["row"].startswith("vision")}
    assert set(vision) == {"vision_eager", "vision_sdpa"}
    assert all(r["status"] == "ok" and r["time_ms"] > 0 for r in vision.values())
    assert "| 2 x 4x4 patches | vision_sdpa | ok |" in text
    assert data["meta"]["device"] == "cpu" and data["meta"]["lengths"] == [32, 64, 128]
    # on the CPU capture runs the torch path: no kernel self-check ran, and the report says so
    assert data["meta"]["kernel_checks"] == [] and "Kernel self-check: no kernel was checked" in text


def test_capture_that_cannot_fit_is_refused(tmp_path, capsys):
    rc, text, data = _run(tmp_path, capsys, "--in-process", "--lengths", "32", "--no-vision",
                          "--rows", "fork_last,fork_mean,fork_full_cpu", "--capture-max-bytes", "1")
    assert rc == 0
    rows = {r["row"]: r for r in data["results"]}
    assert rows["sdpa_ref"]["status"] == "ok"  # the reference always runs
    for name in ("fork_last", "fork_mean", "fork_full_cpu"):
        assert rows[name]["status"] == "refused"
        assert rows[name]["message"].startswith("refused (needs ")
    assert "refused (needs " in text


def test_worker_subprocess_measures_memory(tmp_path, capsys):
    rc, text, data = _run(tmp_path, capsys, "--lengths", "32", "--rows", "sdpa_ref", "--no-vision")
    assert rc == 0
    (r,) = data["results"]
    assert r["status"] == "ok" and r["time_ms"] > 0
    assert r["mem_method"] in ("worker VmHWM reset", "worker ru_maxrss - no-op child")
    assert r["extra_bytes"] >= 0 and r["extra_bytes_maxrss"] is not None
    assert data["meta"]["noop_maxrss_mib"]["stock"] > 0
    assert "| 32 | sdpa_ref | ok |" in text


def test_cli_usage(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    assert "fork_full_cpu" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", "--rows", "nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", "--lengths", "1k,x"])
    assert e.value.code == 2
