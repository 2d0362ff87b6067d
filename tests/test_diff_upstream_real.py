"""scripts/diff_upstream.py on the REAL upstream remote code (openbmb/MiniCPM-V-2_6).

Runs only where ``MINICPMV_UPSTREAM`` points at a folder holding upstream's 7 remote-code
files with the pinned sha256 (e.g. ``git show 8490e59:<file>`` of the public repository
``404805854/minicpmv2.6-onnx``, whose commit 8490e59 is the original Hugging Face code; keep
the folder outside this repository). ``MINICPMV_UPSTREAM_PYTHON`` (optional) names a Python
with upstream's own transformers (e.g. 4.40.0) for the ``--upstream-python`` run. CI, without
them, is covered by the upstream-like folders of ``test_diff_upstream.py``.

The pin on the real files must be clean (exit 0, structural and numeric rows present and
passing); every kind of one-line edit to a copy must be reported by file and symbol with a
non-zero exit.
"""
import ast
import json
import os
import shutil
from pathlib import Path

import pytest

from minicpmv_attn.scripts import diff_upstream
from minicpmv_attn.upstream import pin as pinning
from minicpmv_attn.upstream.common import sha256_file

REPO = Path(__file__).resolve().parents[1]
FORK = REPO / "modeling"
UPSTREAM = os.environ.get("MINICPMV_UPSTREAM")
UPSTREAM_PYTHON = os.environ.get("MINICPMV_UPSTREAM_PYTHON")
NUMERIC_ROWS = ["logits", "llm attention", "vision attention", "resampler attention", "greedy generation"]

pytestmark = pytest.mark.skipif(
    not UPSTREAM,
    reason="MINICPMV_UPSTREAM is not set: point it at a folder with openbmb/MiniCPM-V-2_6's 7 remote-code files "
           "(e.g. extracted from 404805854/minicpmv2.6-onnx at commit 8490e59) to run the real-upstream checks")


@pytest.fixture
def real(tmp_path):
    """(copy of the real upstream, snapshot of the fork, out folder). Edits go to the copy only."""
    src = Path(UPSTREAM)
    pinned = pinning.pinned_files(pinning.load_pin())
    mismatched = [n for n, h in pinned.items() if not (src / n).is_file() or sha256_file(src / n) != h]
    assert not mismatched, f"MINICPMV_UPSTREAM={src} is not the pinned upstream: {mismatched} differ or are missing"
    up = tmp_path / "upstream"
    up.mkdir()
    for name in pinned:
        shutil.copy2(src / name, up / name)
    fork = tmp_path / "fork"  # the fork as it is now, frozen for the run
    fork.mkdir()
    for p in FORK.glob("*.py"):
        shutil.copy2(p, fork / p.name)
    return up, fork, tmp_path / "out"


def run(up: Path, fork: Path, out: Path, *extra):
    rc = diff_upstream.main(["--upstream", str(up), "--fork", str(fork), "--out", str(out), "-q",
                             "--no-transformers", *extra])
    return rc, json.loads((out / "report.json").read_text())


def rows(report, section=None, attention=None):
    return [f for f in report["findings"] if (section is None or f["section"] == section)
            and (attention is None or f["attention"] == attention)]


def att_items(report):
    return {(f["section"], f["item"]): f for f in rows(report, attention=True)}


def find_def(tree, qualname):
    body, node = tree.body, None
    for part in qualname.split("."):
        node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
        body = node.body
    return node


def replace_line(path: Path, old: str, new: str):
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name}: {old!r} occurs {text.count(old)} times"
    path.write_text(text.replace(old, new))


def assert_clean(rc, report):
    assert rc == 0, [f for f in report["findings"] if f["attention"]]
    assert all(f["status"] == "matches pin" for f in rows(report, "files"))
    assert [f["status"] for f in rows(report, "state_dict")] == ["ok"]
    assert "ok" in [f["status"] for f in rows(report, "config") if f["item"] == "defaults"]
    numeric = rows(report, "numeric")
    assert [f["item"] for f in numeric] == NUMERIC_ROWS and {f["status"] for f in numeric} == {"ok"}, numeric


# ----------------------------------------------------------------------------------------
# the exact pin: nothing needs attention, parity runs for real
# ----------------------------------------------------------------------------------------
def test_exact_pin_is_clean_with_structural_and_numeric_parity(real, capsys):
    up, fork, out = real
    rc, report = run(up, fork, out, "--numeric")
    printed = capsys.readouterr().out
    assert_clean(rc, report)
    assert "nothing needs attention" in printed
    assert max(len(line) for line in printed.splitlines()) <= 120
    shims = report["parity"]["structural"]["upstream"]["shims"]
    assert "typing" in shims  # upstream itself ran, with its breakages shimmed


@pytest.mark.skipif(not UPSTREAM_PYTHON, reason="MINICPMV_UPSTREAM_PYTHON is not set (a Python with upstream's "
                                               "transformers, e.g. 4.40.0, for --upstream-python)")
def test_exact_pin_is_clean_with_upstream_in_its_own_interpreter(real):
    up, fork, out = real
    rc, report = run(up, fork, out, "--numeric", "--upstream-python", UPSTREAM_PYTHON)
    assert_clean(rc, report)
    versions = report["parity"]["numeric"]["upstream"]["versions"]
    assert Path(versions["executable"]).resolve() == Path(UPSTREAM_PYTHON).resolve()


# ----------------------------------------------------------------------------------------
# loud on any change
# ----------------------------------------------------------------------------------------
def _one_line_statement(path: Path):
    """(qualname, line number) of the last one-line simple statement inside a function or
    method of ``path`` whose line has no comment."""
    src = path.read_text()
    lines = src.splitlines()
    found = []

    def visit(body, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")
            elif isinstance(node, ast.FunctionDef):
                for n in ast.walk(node):
                    if isinstance(n, (ast.Assign, ast.Return, ast.AugAssign)) and n.lineno == n.end_lineno \
                            and "#" not in lines[n.lineno - 1]:
                        found.append((prefix + node.name, n.lineno))

    visit(ast.parse(src).body, "")
    return found[-1]


@pytest.mark.parametrize("name", sorted(pinning.UPSTREAM_FILES))
@pytest.mark.parametrize("kind", ["code", "comment"])
def test_one_edited_line_in_any_file_is_named(real, name, kind):
    up, fork, out = real
    path = up / name
    qual, lineno = _one_line_statement(path)
    lines = path.read_text().splitlines(True)
    suffix = "; pass" if kind == "code" else "  # edited upstream"
    lines[lineno - 1] = lines[lineno - 1].rstrip("\n") + suffix + "\n"
    path.write_text("".join(lines))
    rc, report = run(up, fork, out, "--no-structural")
    assert rc == 1
    items = att_items(report)
    assert ("files", name) in items and qual in items[("files", name)]["detail"]
    row = items[("symbols", f"{name}::{qual}")]
    assert row["status"] == ("body changed since pin" if kind == "code" else
                             "edited since pin (comments/docstrings/layout only)")
    lo, hi = [int(x) for x in row["detail"].split()[1].split("-")]
    assert lo <= lineno <= hi


def test_renamed_parameter_is_reported(real):
    up, fork, out = real
    replace_line(up / "resampler.py", "def forward(self, x, tgt_sizes=None):", "def forward(self, x, sizes=None):")
    rc, report = run(up, fork, out, "--no-structural")
    assert rc == 1
    row = att_items(report)[("symbols", "resampler.py::Resampler.forward")]
    assert row["status"] == "signature changed since pin"
    assert "-tgt_sizes" in row["detail"] and "+sizes" in row["detail"]


def test_changed_default_is_reported_as_signature_and_config_field(real):
    up, fork, out = real
    replace_line(up / "configuration_minicpm.py", "query_num=64,", "query_num=96,")
    rc, report = run(up, fork, out)
    assert rc == 1
    items = att_items(report)
    row = items[("symbols", "configuration_minicpm.py::MiniCPMVConfig.__init__")]
    assert row["status"] == "signature changed since pin" and "~query_num=96" in row["detail"]
    cfg = items[("config", "defaults:query_num")]
    assert cfg["status"] == "differs" and "upstream=96" in cfg["detail"]


def test_changed_config_field_is_reported(real):
    up, fork, out = real
    replace_line(up / "configuration_minicpm.py", "self.vision_batch_size = vision_batch_size",
                 "self.vision_batch_size = vision_batch_size * 2")
    rc, report = run(up, fork, out)
    assert rc == 1
    items = att_items(report)
    assert items[("symbols", "configuration_minicpm.py::MiniCPMVConfig.__init__")]["status"] == \
        "body changed since pin"
    assert items[("config", "defaults:vision_batch_size")]["status"] == "differs"


def test_added_state_dict_key_is_reported(real):
    up, fork, out = real
    replace_line(up / "resampler.py", "        self._set_2d_pos_cache(self.max_size)\n",
                 "        self._set_2d_pos_cache(self.max_size)\n"
                 "        self.extra_gate = nn.Parameter(torch.zeros(embed_dim))\n")
    rc, report = run(up, fork, out)
    assert rc == 1
    items = att_items(report)
    sd = items[("state_dict", "resampler.extra_gate")]
    assert sd["status"] == "upstream only" and "shape=(" in sd["detail"]
    assert items[("symbols", "resampler.py::Resampler.__init__")]["status"] == "body changed since pin"


def test_numeric_change_is_reported(real):
    up, fork, out = real
    replace_line(up / "modeling_navit_siglip.py", "self.scale = self.head_dim**-0.5", "self.scale = self.head_dim**-0.45")
    rc, report = run(up, fork, out, "--numeric")
    assert rc == 1
    items = att_items(report)
    assert items[("symbols", "modeling_navit_siglip.py::SiglipAttention.__init__")]["status"] == \
        "body changed since pin"
    assert items[("numeric", "vision attention")]["status"] == "differs"
    assert items[("numeric", "logits")]["status"] == "differs"
