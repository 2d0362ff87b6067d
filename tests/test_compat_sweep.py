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


def test_verified_range_is_read_from_the_one_place_it_is_kept():
    rng = ts.verified_range()
    assert rng == {"min": mq.TRANSFORMERS_MIN, "cap": mq.TRANSFORMERS_CAP, "newest": mq.TRANSFORMERS_NEWEST_VERIFIED}


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
    o = ts.Outcome("5.25.0", "FAIL", passed, failed, skipped, failures)
    line = ts.failure_line(o, {"min": "4.40.0", "cap": "5.25", "newest": "5.24.0"})
    assert "\n" not in line
    assert line.startswith("CANARY FAILED: transformers 5.25.0 (above the verified 4.40.0..5.24.0, cap <5.25) "
                           "breaks 2 of 3 compatibility tests: tests/test_golden.py::")
    assert "tests/test_chat.py::test_stream: RuntimeError: boom" in line


def test_table_goes_between_the_readme_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{ts.TABLE_START}\nold\n{ts.TABLE_END}\n\nrest\n")
    outcomes = [ts.Outcome("4.40.0", "pass", 60, 0, differ="as pinned", seconds=90),
                ts.Outcome("5.25.0", "FAIL", 50, 10, differ="drift (see log)", seconds=60)]
    ts.update_readme(readme, ts.markdown_table(outcomes))
    text = readme.read_text()
    assert "old" not in text and text.endswith("\n\nrest\n")
    assert "| 4.40.0 | pass | 60 / 0 | as pinned | 1.5 |" in text
    assert "| 5.25.0 | FAIL | 50 / 10 |" in text
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="compat-table"):
        ts.update_readme(tmp_path / "plain.md", "t")


def test_cli_usage_errors(capsys):
    assert cli.main(["--versions", "5.x", "--workdir", "/nonexistent"]) == 2
    assert "not release numbers" in capsys.readouterr().err
    assert cli.main(["--jobs", "0"]) == 2
    assert cli.main(["--versions", "5.24.0", "--pin", "p.json", "--drop-venvs"]) == 2
    assert "--drop-venvs" in capsys.readouterr().err


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("tests_pass", [True, False])
def test_drop_venv_frees_the_disk_whatever_the_outcome(tmp_path, monkeypatch, drop, tests_pass):
    """CI ran out of disk with a venv left behind per release: --drop-venvs deletes each one."""
    seen = []

    def fake_build(version, workdir, repo, log_file):
        venv = workdir / f"tf-{version}"
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
    o = ts.run_release("9.9.0", tmp_path, REPO, log=lambda m: None, drop_venv=drop)
    assert o.status == ("pass" if tests_pass else "FAIL")
    pytest_cmd = next(c for c in seen if "pytest" in c)
    assert f"--basetemp={tmp_path / 'tf-9.9.0.tmp'}" in pytest_cmd  # the tests' files stay in the workdir
    assert (tmp_path / "tf-9.9.0").exists() is not drop
    assert (tmp_path / "tf-9.9.0.tmp").exists() is not drop
    assert (tmp_path / "tf-9.9.0.log").is_file() and (tmp_path / "tf-9.9.0.junit.xml").is_file()  # reports kept


def test_readme_table_shows_the_newest_verified_release():
    """The README's table is the sweep's output and lists every release up to the newest verified."""
    readme = (REPO / "README.md").read_text()
    block = readme.split(ts.TABLE_START, 1)[1].split(ts.TABLE_END, 1)[0]
    rows = dict(re.findall(r"^\| (\d+\.\d+\.\d+) \| (\w+) \|", block, re.M))
    assert rows.get(mq.TRANSFORMERS_NEWEST_VERIFIED) == "pass"
    assert rows.get(mq.TRANSFORMERS_MIN) == "pass"
    assert all(status == "pass" for status in rows.values()), rows
