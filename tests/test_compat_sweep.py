"""The transformers sweep and CI's canary: version choice, reports, the one failure line."""
import re
from pathlib import Path

import pytest

from minicpmv_attn import modeling_qwen2 as mq
from minicpmv_attn.scripts import sweep_transformers as cli
from minicpmv_attn.upstream import transformers_sweep as ts

REPO = Path(__file__).resolve().parents[1]
INDEX = ["5.24.0", "5.23.0", "5.22.2", "5.22.1", "5.22.0", "5.1.0", "5.0.0", "5.0.0rc1", "4.57.6", "4.57.5",
         "4.56.2", "4.41.2", "4.40.2", "4.40.1", "4.40.0", "4.39.3"]


def test_sweep_covers_card_release_last_4x_and_every_5x_minor():
    assert ts.sweep_versions(INDEX) == ["4.40.0", "4.57.6", "5.0.0", "5.1.0", "5.22.2", "5.23.0", "5.24.0"]
    assert ts.release("5.0.0rc1") == (5, 0, 0) and not ts.is_final("5.0.0rc1")


def test_torch_sweep_takes_the_newest_patch_of_every_minor_from_the_minimum():
    index = ["2.15.0", "2.14.1", "2.14.0", "2.13.0+cpu", "2.13.0", "2.7.1", "2.7.0", "2.6.0", "2.5.1", "2.1.2"]
    assert ts.torch_sweep_versions(index, "2.6.0") == ["2.6.0", "2.7.1", "2.13.0", "2.14.1", "2.15.0"]


def test_verified_range_is_read_from_the_one_place_it_is_kept():
    rng = ts.verified_range()
    assert rng == {"min": mq.TRANSFORMERS_MIN, "cap": mq.TRANSFORMERS_CAP, "newest": mq.TRANSFORMERS_NEWEST_VERIFIED}
    assert ts.verified_range(package="torch") == {"min": mq.TORCH_MIN, "cap": mq.TORCH_CAP,
                                                   "newest": mq.TORCH_NEWEST_VERIFIED}
    with pytest.raises(ValueError, match="package"):
        ts.verified_range(package="numpy")


def test_canary_tries_only_releases_at_or_above_the_cap():
    rng = {"min": "4.40.0", "cap": "5.25", "newest": "5.24.0"}
    assert ts.canary_decision(INDEX, rng) is None
    assert ts.canary_decision(["5.25.0", "5.26.1", "5.24.0"], rng) == "5.26.1"


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_golden" name="test_greedy_generate_matches_upstream[single_image]">
  <failure message="minicpmv_attn.modeling_qwen2.GenerationInvariantError: generate step 2: the KV cache passed in holds 0 positions&#10;more">tb</failure>
</testcase>
<testcase classname="tests.test_chat" name="test_stream"><error message="RuntimeError: boom">tb</error></testcase>
<testcase classname="tests.test_chat" name="test_chat_plain"/>
<testcase classname="tests.test_cli" name="test_x"><skipped message="no"/></testcase>
</testsuite></testsuites>
"""


def test_junit_report_and_the_one_failure_line(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT)
    passed, failed, skipped, failures = ts.parse_junit(path)
    assert (passed, failed, skipped) == (1, 2, 1)
    assert failures[0].startswith("tests/test_golden.py::test_greedy_generate_matches_upstream[single_image]: "
                                  "minicpmv_attn.modeling_qwen2.GenerationInvariantError: generate step 2")
    o = ts.Outcome("5.25.0", "FAIL", passed, failed, skipped, failures, torch="2.13.0")
    line = ts.failure_line(o, {"min": "4.40.0", "cap": "5.25", "newest": "5.24.0"})
    assert "\n" not in line
    assert line.startswith("CANARY FAILED: transformers 5.25.0 (above the verified 4.40.0..5.24.0, cap <5.25; "
                           "with torch 2.13.0) breaks 2 of 3 compatibility tests: tests/test_golden.py::")
    assert "tests/test_chat.py::test_stream: RuntimeError: boom" in line
    o = ts.Outcome("5.25.0", "FAIL", passed, failed, skipped, failures, torch="2.16.0")
    line = ts.failure_line(o, {"min": "2.6.0", "cap": "2.16", "newest": "2.15.0"}, package="torch")
    assert "\n" not in line
    assert line.startswith("CANARY FAILED: torch 2.16.0 (above the verified 2.6.0..2.15.0, cap <2.16; with "
                           "transformers 5.25.0) breaks 2 of 3 compatibility tests: tests/test_golden.py::")


def test_table_goes_between_the_doc_markers(tmp_path):
    doc = tmp_path / "compatibility.md"
    doc.write_text(f"# x\n\n{ts.TABLE_START}\nold\n{ts.TABLE_END}\n\nrest\n")
    outcomes = [ts.Outcome("4.40.0", "pass", 60, 0, differ="as pinned", seconds=90, torch="2.6.0",
                           installed="torch 2.6.0 (CUDA 12.4 build), transformers 4.40.0", date="2026-12-07",
                           commit="abc1234"),
                ts.Outcome("5.25.0", "FAIL", 50, 10, failures=["tests/t.py::x: E | bad"], differ="drift (see log)",
                           seconds=60, torch="2.15.0"),
                ts.Outcome("5.25.0", "pass", 60, 0, torch="2.6.0")]
    ts.update_doc(doc, ts.markdown_table(outcomes))
    text = doc.read_text()
    assert "old" not in text and text.endswith("\n\nrest\n")
    assert "| transformers \\ torch | 2.6.0 | 2.15.0 |" in text
    assert "| 4.40.0 | pass 60/0 | - |" in text  # the grid says what was not measured
    assert "| 5.25.0 | pass 60/0 | FAIL 50/10 |" in text
    assert ("| 4.40.0 | 2.6.0 | torch 2.6.0 (CUDA 12.4 build), transformers 4.40.0 | pass | 60 / 0 | as pinned | 1.5 "
            "| 2026-12-07, abc1234 |") in text
    assert "- transformers 5.25.0, torch 2.15.0: tests/t.py::x: E / bad" in text
    assert ts.table_block(text) == ts.markdown_table(list(reversed(outcomes)))  # order-free, clock-free
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="compat-table"):
        ts.update_doc(tmp_path / "plain.md", "t")


def test_record_merges_runs_by_transformers_and_torch(tmp_path):
    path = tmp_path / "c.json"
    assert ts.load_record(path) == []
    first = [ts.Outcome("5.25.0", "FAIL", 1, 1, torch="2.15.0"), ts.Outcome("5.25.0", "pass", 2, 0, torch="2.13.0")]
    ts.save_record(first, path)
    again = ts.merge(ts.load_record(path), [ts.Outcome("5.25.0", "pass", 2, 0, torch="2.15.0")])
    assert [(o.torch, o.status) for o in again] == [("2.13.0", "pass"), ("2.15.0", "pass")]
    path.write_text('{"format": 1, "runs": [{"version": "5.25.0", "status": "pass", "colour": "red"}]}')
    with pytest.raises(ValueError, match=r"runs\[0\]: unknown fields colour"):
        ts.load_record(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="expected a sweep record"):
        ts.load_record(path)


def test_cli_usage_errors(capsys):
    assert cli.main(["--versions", "5.x", "--workdir", "/nonexistent"]) == 2
    assert "not release numbers" in capsys.readouterr().err
    assert cli.main(["--jobs", "0"]) == 2
    assert cli.main(["--versions", "5.24.0", "--pin", "p.json", "--drop-venvs"]) == 2
    assert "--drop-venvs" in capsys.readouterr().err
    assert cli.main(["--versions", "5.24.0", "--torch", "2.15", "2.x", "--workdir", "/nonexistent"]) == 2
    assert "--torch: 2.x are not release numbers" in capsys.readouterr().err
    assert cli.main(["--table", "/nonexistent/c.json"]) == 0  # an empty record renders an empty table


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("tests_pass", [True, False])
def test_drop_venv_frees_the_disk_whatever_the_outcome(tmp_path, monkeypatch, drop, tests_pass):
    """CI ran out of disk with a venv left behind per release: --drop-venvs deletes each one."""
    seen = []

    def fake_build(version, workdir, repo, log_file, torch, share_torch=False):
        venv = workdir / ts.venv_name(version, torch)
        (venv / "lib").mkdir(parents=True)
        (venv / "lib" / "big").write_bytes(b"x" * 1000)
        return venv

    def fake_run(cmd, log_file, env=None, timeout=0):
        seen.append(cmd)
        if "pytest" in cmd:
            basetemp = Path(next(a for a in cmd if a.startswith("--basetemp=")).split("=", 1)[1])
            (basetemp / "t0").mkdir(parents=True)
            junit = Path(next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1])
            case = '<testcase classname="tests.test_x" name="t"/>' if tests_pass else (
                '<testcase classname="tests.test_x" name="t"><failure message="E: bad"/></testcase>')
            junit.write_text(f"<testsuite>{case}</testsuite>")
            return 0 if tests_pass else 1
        return 0

    monkeypatch.setattr(ts, "build_env", fake_build)
    monkeypatch.setattr(ts, "_run", fake_run)
    monkeypatch.setattr(ts, "probe", lambda python, version, torch: (f"torch {torch} (CPU build)", "3.11"))
    o = ts.run_release("9.9.0", tmp_path, REPO, log=lambda m: None, drop_venv=drop, torch="9.1.0")
    assert o.status == ("pass" if tests_pass else "FAIL")
    assert (o.torch, o.installed, o.python) == ("9.1.0", "torch 9.1.0 (CPU build)", "3.11")
    assert o.date and o.commit  # when and on what it was measured
    name = "tf-9.9.0-torch-9.1.0"
    pytest_cmd = next(c for c in seen if "pytest" in c)
    assert f"--basetemp={tmp_path / (name + '.tmp')}" in pytest_cmd  # the tests' files stay in the workdir
    assert (tmp_path / name).exists() is not drop
    assert (tmp_path / f"{name}.tmp").exists() is not drop
    assert (tmp_path / f"{name}.log").is_file() and (tmp_path / f"{name}.junit.xml").is_file()  # reports kept


def test_probe_refuses_a_venv_that_holds_other_releases(tmp_path):
    """pip may resolve something else than asked (a local build, a constraint): the run says so."""
    import sys
    import torch
    import transformers
    installed, py = ts.probe(sys.executable, transformers.__version__, torch.__version__.split("+")[0])
    assert installed.startswith(f"torch {torch.__version__} (") and py == f"{sys.version_info[0]}.{sys.version_info[1]}"
    with pytest.raises(RuntimeError, match="asked for torch 1.0.0"):
        ts.probe(sys.executable, transformers.__version__, "1.0.0")


DOC, RECORD = REPO / "docs" / "compatibility.md", REPO / "docs" / "compatibility.json"


def test_doc_table_is_the_rendering_of_the_committed_sweep_record():
    """docs/compatibility.md's table is exactly what the sweep's JSON beside it renders to."""
    runs = ts.load_record(RECORD)
    assert ts.table_block(DOC.read_text(encoding="utf-8"), str(DOC)) == ts.markdown_table(runs), (
        "docs/compatibility.md differs from docs/compatibility.json: run "
        "python scripts/sweep_transformers.py --table docs/compatibility.json --doc docs/compatibility.md")


def test_record_backs_the_declared_ranges():
    """The ends of the declared ranges passed, measured together, and every torch minor from
    TORCH_MIN's to the newest verified passed on the newest verified transformers."""
    runs = {(o.version, o.torch): o for o in ts.load_record(RECORD)}
    tf, torch_ = ts.verified_range(), ts.verified_range(package="torch")
    for pair in ((tf["newest"], torch_["newest"]), (tf["min"], torch_["newest"]), (tf["min"], ts.DEFAULT_TORCH),
                 (tf["newest"], ts.DEFAULT_TORCH)):
        assert pair in runs and runs[pair].status == "pass", f"transformers {pair[0]} + torch {pair[1]} not verified"
        assert runs[pair].date and runs[pair].commit and runs[pair].installed
    torch_minors = {ts.release(t)[:2] for v, t in runs if v == tf["newest"] and runs[v, t].status == "pass"}
    lo, hi = ts.release(torch_["min"])[:2], ts.release(torch_["newest"])[:2]
    wanted = {(lo[0], m) for m in range(lo[1], hi[1] + 1)} if lo[0] == hi[0] else set()
    assert wanted and wanted <= torch_minors, (f"torch minors not verified on transformers {tf['newest']}: "
                                               f"{sorted(wanted - torch_minors)}")


def test_readme_ci_and_sweep_install_the_same_torch_and_state_the_declared_ranges():
    """README's first commands, .ci/run and the sweep's default torch are one release, inside the
    verified range; README's Compatibility section states the ranges setup.py declares."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    first_commands = readme.split("```bash", 1)[1].split("```", 1)[0]
    pins = set(re.findall(r"pip install (?:-q )?torch==([0-9.]+)", first_commands))
    assert pins == {ts.DEFAULT_TORCH}, pins
    assert set(re.findall(r"pip install (?:-q )?torch==([0-9.]+)", ci)) == {ts.DEFAULT_TORCH}
    lo, hi = ts.verified_range(package="torch")["min"], ts.verified_range(package="torch")["cap"]
    assert ts.release(lo) <= ts.release(ts.DEFAULT_TORCH) < ts.release(hi)
    section = readme.split("## Compatibility\n", 1)[1].split("\n## ", 1)[0]
    assert f"`transformers>={mq.TRANSFORMERS_MIN},<{mq.TRANSFORMERS_CAP}`" in section
    assert f"`torch>={mq.TORCH_MIN},<{mq.TORCH_CAP}`" in section
    assert "docs/compatibility.md" in section


def test_one_venv_per_torch_installs_each_transformers_into_it(tmp_path, monkeypatch):
    """--one-venv-per-torch: torch is installed once; each release is installed over the last."""
    seen = []

    def fake_run(cmd, log_file, env=None, timeout=0):
        seen.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            python = ts.venv_python(Path(cmd[3]))
            python.parent.mkdir(parents=True)
            python.write_text("")
        return 0

    held = [["filelock", "torch"]]  # what the venv holds: torch alone, then what each release adds

    def fake_list(python):
        return list(held[-1])

    monkeypatch.setattr(ts, "_run", fake_run)
    monkeypatch.setattr(ts, "installed_packages", fake_list)
    log = tmp_path / "log"
    first = ts.build_env("5.25.0", tmp_path, REPO, log, torch="2.15.0", share_torch=True)
    n_first = len(seen)
    held.append(["filelock", "kernels", "minicpmv-attn", "torch", "transformers"])
    second = ts.build_env("5.0.0", tmp_path, REPO, log, torch="2.15.0", share_torch=True)
    assert first == second == tmp_path / "torch-2.15.0"
    assert any(c[1:3] == ["-m", "venv"] for c in seen[:n_first])
    later = seen[n_first:]
    assert not any(c[1:3] == ["-m", "venv"] for c in later)  # the torch venv is reused
    # what 5.25.0 brought (kernels broke 5.0.0's import) goes before 5.0.0 comes in; torch stays
    assert later[0][3:] == ["uninstall", "-q", "-y", "kernels", "minicpmv-attn", "transformers"]
    assert any("transformers==5.0.0" in c for c in later[1:])
    own = ts.build_env("5.25.0", tmp_path, REPO, log, torch="2.15.0")  # without sharing: a venv of its own
    assert own == tmp_path / "tf-5.25.0-torch-2.15.0"
    assert cli.main(["--versions", "5.25.0", "--pin", "p.json", "--one-venv-per-torch"]) == 2


def test_torch_canary_tries_a_new_torch_with_the_newest_verified_transformers(tmp_path, monkeypatch):
    asked = []

    def fake_release(version, workdir, repo, log=None, drop_venv=False, torch=ts.DEFAULT_TORCH, **kw):
        asked.append((version, torch, drop_venv))
        return ts.Outcome(version, "FAIL", 63, 1, failures=["tests/test_golden.py::x: RuntimeError: boom"],
                          torch=torch)

    monkeypatch.setattr(ts, "run_release", fake_release)
    monkeypatch.setattr(ts, "index_versions", lambda package="transformers", **kw: {
        "torch": ["2.16.1", "2.16.0", "2.15.0"], "transformers": ["5.25.0"]}[package])
    rc, line = ts.canary(tmp_path, REPO, package="torch", drop_venv=True)
    assert asked == [(mq.TRANSFORMERS_NEWEST_VERIFIED, "2.16.1", True)]
    assert rc == 1 and "\n" not in line
    assert line.startswith(f"CANARY FAILED: torch 2.16.1 (above the verified {mq.TORCH_MIN}.."
                           f"{mq.TORCH_NEWEST_VERIFIED}, cap <{mq.TORCH_CAP}; with transformers "
                           f"{mq.TRANSFORMERS_NEWEST_VERIFIED}) breaks 1 of 64")
    assert ts.canary(tmp_path, REPO, package="transformers")[0] == 0  # nothing above the transformers cap
    assert len(asked) == 1
