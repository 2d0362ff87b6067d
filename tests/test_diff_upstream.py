"""scripts/diff_upstream.py and minicpmv_attn.upstream (pin, inventory, loader, parity, diff,
transformers_check).

"Upstream-like" folders are built from the fork's own files (the remote code a checkpoint
folder gets: every top-level module of the package), pinned, then given deliberate edits:
every edit must be reported and the exit code must say so.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minicpmv_attn.attention_record import atomic_write_json
from minicpmv_attn.scripts import diff_upstream
from minicpmv_attn.upstream import install, inventory, loader
from minicpmv_attn.upstream import pin as pinning
from minicpmv_attn.upstream import transformers_check
from minicpmv_attn.upstream.common import log_quiet, sha256_file

from golden import GOLDEN_ROOT

REPO = Path(__file__).resolve().parents[1]
FORK = REPO / "modeling"
GOLDEN = GOLDEN_ROOT  # ../shared/golden or MINICPMV_ATTN_GOLDEN
GOLDEN_CONFIG = GOLDEN / "minicpmv26" / "single_image" / "config.json"

ISSUE_HASHES = {
    "configuration_minicpm.py": "e07b81b20d94d1535e5f651f6737272c49639e8b2c3417f077d0ba39c18c04ff",
    "image_processing_minicpmv.py": "954f6c515644c8e2cc9acc227b889e1b1324cdbf0e54ba938a693fab2cb82499",
    "modeling_minicpmv.py": "777fbd5f51d3b47852649386eb2a4754de8ed736c969c29cc9a81b03d030e338",
    "modeling_navit_siglip.py": "c71ca316fe7405325b7097364f98f71c317fff8c9f5c8820f30d3362b1ed5bfa",
    "processing_minicpmv.py": "6fcce591845589e7034ba8c757084d951ad3b8542b756491bb81d3479dde247e",
    "resampler.py": "45c4d94fd144c9c0a2ffeb06aa0443d3d4ed4a091e1ad9a8dee5127d2bcd286c",
    "tokenization_minicpmv_fast.py": "4eb76984f6945cfdbfb5b2fece8cb3ebbdac96aea15e28af3eadbdba471f9b55",
}


# ----------------------------------------------------------------------------------------
# helpers: build an upstream-like folder, edit it through the AST
# ----------------------------------------------------------------------------------------
def make_upstream_like(tmp_path: Path) -> Path:
    """``tmp_path/upstream``: the fork's remote code as an upstream stand-in.

    The fork itself is snapshotted to ``tmp_path/fork`` first and the run compares with
    that snapshot (``--fork``), so edits made to the working tree while the tests run
    cannot leak into one side only.
    """
    fork = tmp_path / "fork"
    fork.mkdir()
    for p in FORK.glob("*.py"):
        shutil.copy2(p, fork / p.name)
    up = tmp_path / "upstream"
    up.mkdir()
    for name in install.remote_code_files(fork):
        shutil.copy2(fork / name, up / name)
    shutil.copy2(GOLDEN_CONFIG, up / "config.json")
    return up


def write_pin(up: Path, path: Path, changes=()) -> Path:
    pin = pinning.make_pin(up, base_pin={"changes": list(changes)})
    atomic_write_json(path, pin)
    return path


def run_cli(up: Path, pin: Path, out: Path, *extra):
    rc = diff_upstream.main(["--upstream", str(up), "--pin", str(pin), "--out", str(out),
                             "--fork", str(up.parent / "fork"), "-q", *extra])
    report = json.loads((out / "report.json").read_text())
    return rc, report


def rows(report, section=None, attention=None):
    out = []
    for f in report["findings"]:
        if section is not None and f["section"] != section:
            continue
        if attention is not None and f["attention"] != attention:
            continue
        out.append(f)
    return out


def find_def(tree: ast.Module, qualname: str):
    body, node = tree.body, None
    for part in qualname.split("."):
        node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    and n.name == part)
        body = node.body
    return node


def replace_def(path: Path, qualname: str, new_source: str = None):
    """Replace (or with ``None`` remove) the definition ``qualname`` in ``path``."""
    src = path.read_text()
    node = find_def(ast.parse(src), qualname)
    lines = src.splitlines(True)
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    indent = " " * node.col_offset
    new = [] if new_source is None else [indent + line if line.strip() else line
                                         for line in (new_source.rstrip("\n") + "\n").splitlines(True)]
    path.write_text("".join(lines[:start] + new + lines[node.end_lineno:]))


def pick_method_with_param(path: Path, cls: str):
    tree = ast.parse(path.read_text())
    for n in find_def(tree, cls).body:
        if isinstance(n, ast.FunctionDef) and not n.decorator_list:
            params = [a.arg for a in n.args.args[1:]]
            if params:
                return f"{cls}.{n.name}", params[0]
    raise AssertionError(f"no method with a parameter in {cls}")


def rename_param(path: Path, qualname: str, old: str, new: str):
    """Rename a parameter and its uses inside one function (attribute names untouched)."""
    node = find_def(ast.parse(path.read_text()), qualname)

    class Renamer(ast.NodeTransformer):
        def visit_arg(self, a):
            if a.arg == old:
                a.arg = new
            return a

        def visit_Name(self, n):
            if n.id == old:
                n.id = new
            return n

    Renamer().visit(node)
    replace_def(path, qualname, ast.unparse(node))


def add_parameter_to_init(path: Path, cls: str, line: str):
    """Append ``line`` as the last statement of ``cls.__init__``."""
    src = path.read_text()
    init = find_def(ast.parse(src), f"{cls}.__init__")
    last = init.body[-1]
    lines = src.splitlines(True)
    lines.insert(last.end_lineno, " " * last.col_offset + line + "\n")
    path.write_text("".join(lines))


@pytest.fixture
def upstream(tmp_path):
    up = make_upstream_like(tmp_path)
    pin = write_pin(up, tmp_path / "pin.json")
    return up, pin, tmp_path / "out"


# ----------------------------------------------------------------------------------------
# the pin and the package layout
# ----------------------------------------------------------------------------------------
def test_pin_records_upstream_identity_and_notes():
    pin = json.loads((REPO / "patches" / "UPSTREAM.json").read_text())
    assert pin["upstream"]["repo_id"] == "openbmb/MiniCPM-V-2_6"
    assert "revision" in pin["upstream"]
    assert pinning.pinned_files(pin) == ISSUE_HASHES
    for name in ISSUE_HASHES:  # the symbol snapshot that names an upstream edit by symbol
        symbols = pinning.pinned_symbols(pin, name)
        assert symbols and "<module>" in symbols, name
        assert all({"kind", "signature", "body", "text", "lines"} <= set(v) for v in symbols.values()), name
    assert pin["changes"], "one entry per note"
    notes_dir = REPO / "patches" / "notes"
    referenced = set()
    for entry in pin["changes"]:
        assert entry["file"] in ISSUE_HASHES, entry
        assert entry["symbol"] and entry["what"] and entry["why"], entry
        assert entry.get("kind", "changed") in ("changed", "added", "removed", "replaced"), entry
        assert inventory.entry_symbols(entry), entry
        assert (REPO / "patches" / entry["note"]).is_file(), entry["note"]
        referenced.add(entry["note"])
    # at the grain a maintainer reads: one entry per note, every note used, no one-liners
    assert len(referenced) == len(pin["changes"])
    assert referenced == {f"notes/{p.name}" for p in notes_dir.glob("*.md")}
    for note in notes_dir.glob("*.md"):
        text = note.read_text()
        assert "**Upstream.**" in text and "**Fork.**" in text and "**Why.**" in text, note.name
    snaps = transformers_check.transformers_snapshots(pin["transformers"])
    assert snaps and all(s["files"] for s in snaps.values()), "per-release transformers snapshots"


def test_generated_folder_is_git_ignored():
    """The CLI's default output folder, in a checkout, is patches/generated/, which git ignores."""
    assert "patches/generated/" in (REPO / ".gitignore").read_text().split()
    assert diff_upstream.default_out_dir() == REPO / "patches" / "generated"
    assert diff_upstream.build_parser().parse_args(["--upstream", "x"]).out == REPO / "patches" / "generated"


def test_default_pin_is_the_installed_package_data():
    from importlib.resources import files

    installed = files("minicpmv_attn.patches") / "UPSTREAM.json"
    assert pinning.installed_pin() == installed
    assert pinning.load_pin() == pinning.load_pin(Path(str(installed)))
    assert pinning.load_pin()["upstream"]["repo_id"] == "openbmb/MiniCPM-V-2_6"


def test_unreadable_pin_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "pin.json"
    bad.write_text("{not json")
    assert diff_upstream.main(["--transformers-only", "--pin", str(bad), "-q"]) == 2
    assert "cannot read the pin" in capsys.readouterr().err
    assert diff_upstream.main(["--transformers-only", "--pin", str(tmp_path / "missing.json"), "-q"]) == 2


def test_help_describes_the_cli(capsys):
    with pytest.raises(SystemExit) as e:
        diff_upstream.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--upstream", "--revision", "--numeric", "--out", "--pin", "--write-pin"):
        assert flag in text


def test_missing_upstream_folder_is_a_usage_error(tmp_path, capsys):
    assert diff_upstream.main(["--upstream", str(tmp_path / "nope"), "-q"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_revision_offline_gives_a_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "minicpmv_attn.scripts.diff_upstream", "--revision", "main",
                           "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "could not download openbmb/MiniCPM-V-2_6@main" in proc.stderr
    assert "--upstream DIR" in proc.stderr


# ----------------------------------------------------------------------------------------
# symbol inventory (pure AST)
# ----------------------------------------------------------------------------------------
def test_symbol_inventory_signatures_and_bodies():
    a = textwrap.dedent('''
        class A(Base):
            x = 1
            def f(self, a, b=2, *args, c, d=None, **kw):
                """doc"""
                return a + b  # comment
            @staticmethod
            def g(x: int) -> int:
                return x
        def h(p, /, q):
            pass
    ''')
    inv = inventory.symbol_inventory(a)
    assert set(inv) == {"A", "A.f", "A.g", "h"}
    assert inv["A"].kind == "class" and inv["A.f"].kind == "method" and inv["h"].kind == "function"
    assert inv["A.f"].signature == "(self, a, b=2, *args, c, d=None, **kw)"
    assert inv["h"].signature == "(p, /, q)"

    def changes(b):
        return {(c.qualname, c.change)
                for c in inventory.diff_inventories(inventory.symbol_inventory(b), inv, "m.py")}

    # docstrings, comments, formatting and annotations are not changes
    b = a.replace('"""doc"""', '"""other doc"""').replace("# comment", "").replace("x: int", "x: 'int'")
    assert changes(b) == set()
    assert changes(a.replace("b=2", "b=3")) == {("A.f", "signature")}
    assert changes(a.replace("a + b", "a - b")) == {("A.f", "body")}
    assert changes(a.replace("x = 1", "x = 2")) == {("A", "body")}
    assert changes(a.replace("    @staticmethod\n", "")) == {("A.g", "signature")}
    assert changes(a.replace("def h(p, /, q)", "def h2(p, /, q)")) == {("h", "removed"), ("h2", "added")}
    assert changes(a.replace("class A(Base)", "class A(Other)")) == {("A", "signature")}


def test_documented_changes_match_by_file_pattern_and_kind():
    pin = {"changes": [{"file": "r.py", "symbol": "Resampler.*", "kind": "changed"},
                       {"file": "r.py", "symbol": "MultiheadAttention*", "kind": "removed"}]}
    ch, documented_by = inventory.SymbolChange, inventory.documented_by
    assert documented_by(ch("r.py", "Resampler.forward", "signature", "method"), pin)
    assert not documented_by(ch("r.py", "Resampler.forward", "removed", "method"), pin)
    assert not documented_by(ch("x.py", "Resampler.forward", "signature", "method"), pin)
    assert documented_by(ch("r.py", "MultiheadAttention.forward", "removed", "method"), pin)
    assert not documented_by(ch("r.py", "MultiheadAttention", "added", "class"), pin)


def test_typing_shim_fixes_upstreams_star_import(tmp_path):
    """Upstream resampler.py relies on ``from torch.nn.functional import *`` providing List."""
    (tmp_path / "resampler.py").write_text(textwrap.dedent('''
        from torch.nn.functional import *
        def f(x: List[int]) -> Optional[int]:
            return None
    '''))
    pkg = loader.load_folder_package(tmp_path, "noshim", typing_shim=False)
    try:
        with pytest.raises(NameError, match="List"):
            loader.import_from_package(pkg, "resampler")
    finally:
        loader.unload_package(pkg)
    pkg = loader.load_folder_package(tmp_path, "shim", typing_shim=True)
    try:
        assert loader.import_from_package(pkg, "resampler").f([1]) is None
    finally:
        loader.unload_package(pkg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resampler.py"], "nothing written to the folder"


# ----------------------------------------------------------------------------------------
# whole runs on upstream-like folders (need the fork's model)
# ----------------------------------------------------------------------------------------
def test_unedited_copy_needs_no_attention(upstream, capsys):
    up, pin, out = upstream
    rc, report = run_cli(up, pin, out)
    printed = capsys.readouterr().out
    assert rc == 0, [f for f in report["findings"] if f["attention"]]
    assert not report["needs_attention"]
    assert any(f["status"] == "ok" for f in rows(report, "state_dict"))
    assert {f["status"] for f in rows(report, "config")} == {"ok"}
    assert all(f["status"] == "matches pin" for f in rows(report, "files"))
    assert "section" in printed and "nothing needs attention" in printed  # the summary table
    assert (out / "summary.txt").is_file()
    diffs = list((out / "files").glob("*.diff")) if (out / "files").exists() else []
    assert diffs == [], "identical files give no diff"


def test_renamed_parameter_is_reported(upstream):
    up, pin, out = upstream
    qual, param = pick_method_with_param(up / "modeling_minicpmv.py", "MiniCPMV")
    rename_param(up / "modeling_minicpmv.py", qual, param, param + "_renamed")
    rc, report = run_cli(up, pin, out, "--no-transformers")
    assert rc == 1
    sym = [f for f in rows(report, "symbols", attention=True) if f["item"] == f"modeling_minicpmv.py::{qual}"]
    assert sym and sym[0]["status"] == "signature (undocumented)"
    assert param + "_renamed" in sym[0]["detail"]
    assert any(f["item"] == "modeling_minicpmv.py" and f["status"] == "changed since pin" for f in rows(report, "files"))
    diff = (out / "files" / "modeling_minicpmv.py.diff").read_text()
    assert diff.startswith("--- upstream/modeling_minicpmv.py\n+++ fork/modeling_minicpmv.py\n")
    assert param + "_renamed" in diff


def test_documented_change_is_not_flagged(tmp_path):
    up = make_upstream_like(tmp_path)
    qual, param = pick_method_with_param(up / "modeling_minicpmv.py", "MiniCPMV")
    rename_param(up / "modeling_minicpmv.py", qual, param, param + "_renamed")
    entry = {"file": "modeling_minicpmv.py", "symbol": qual, "kind": "changed", "what": "w", "why": "y",
             "note": "notes/x.md"}
    pin = write_pin(up, tmp_path / "pin.json", changes=[entry])  # pinned after the edit: hashes match
    rc, report = run_cli(up, pin, tmp_path / "out", "--no-transformers")
    assert rc == 0, rows(report, attention=True)
    sym = [f for f in rows(report, "symbols") if f["item"] == f"modeling_minicpmv.py::{qual}"]
    assert sym[0]["status"] == "signature (documented)" and not sym[0]["attention"]


def test_removed_method_is_reported(upstream):
    up, pin, out = upstream
    replace_def(up / "modeling_minicpmv.py", "MiniCPMV.set_decoder", None)
    rc, report = run_cli(up, pin, out, "--no-transformers")
    assert rc == 1
    sym = [f for f in rows(report, "symbols", attention=True)
           if f["item"] == "modeling_minicpmv.py::MiniCPMV.set_decoder"]
    assert sym and sym[0]["status"] == "added (undocumented)"  # the fork has it, upstream does not


def test_added_state_dict_key_is_reported(upstream):
    up, pin, out = upstream
    add_parameter_to_init(up / "modeling_minicpmv.py", "MiniCPMV",
                          "self.extra_upstream_param = torch.nn.Parameter(torch.zeros(3, 5))")
    rc, report = run_cli(up, pin, out, "--no-transformers")
    assert rc == 1
    sd = rows(report, "state_dict", attention=True)
    assert [(f["item"], f["status"]) for f in sd] == [("extra_upstream_param", "upstream only")]
    assert "(3, 5)" in sd[0]["detail"]


def test_changed_file_hash_is_reported(upstream):
    up, pin, out = upstream
    with open(up / "resampler.py", "a") as f:
        f.write("\n# an upstream edit that changes nothing but the bytes\n")
    rc, report = run_cli(up, pin, out, "--no-transformers")
    assert rc == 1
    att = rows(report, attention=True)
    assert [(f["section"], f["item"], f["status"]) for f in att] == [
        ("files", "resampler.py", "changed since pin"),
        ("symbols", "resampler.py::<module>", "edited since pin (comments/docstrings/layout only)")]
    assert "<module>" in att[0]["detail"]  # the file row names the changed symbols too


def test_missing_file_is_reported(upstream):
    up, pin, out = upstream
    (up / "resampler.py").rename(up / "resampler_renamed.py.bak")
    rc, report = run_cli(up, pin, out, "--no-transformers", "--no-structural")
    assert rc == 1
    assert any(f["item"] == "resampler.py" and f["status"] == "missing" and f["attention"]
               for f in rows(report, "files"))


def test_every_edit_reported_together(upstream):
    up, pin, out = upstream
    qual, param = pick_method_with_param(up / "modeling_minicpmv.py", "MiniCPMV")
    rename_param(up / "modeling_minicpmv.py", qual, param, param + "_renamed")
    replace_def(up / "modeling_minicpmv.py", "MiniCPMV.set_decoder", None)
    add_parameter_to_init(up / "modeling_minicpmv.py", "MiniCPMV",
                          "self.extra_upstream_param = torch.nn.Parameter(torch.zeros(2))")
    with open(up / "configuration_minicpm.py", "a") as f:
        f.write("# edited\n")
    rc, report = run_cli(up, pin, out, "--no-transformers")
    assert rc == 1
    items = {(f["section"], f["item"]) for f in rows(report, attention=True)}
    assert ("symbols", f"modeling_minicpmv.py::{qual}") in items
    assert ("symbols", "modeling_minicpmv.py::MiniCPMV.set_decoder") in items
    assert ("state_dict", "extra_upstream_param") in items
    assert ("files", "configuration_minicpm.py") in items
    assert ("files", "modeling_minicpmv.py") in items


def test_config_field_difference_is_reported(upstream):
    up, pin, out = upstream
    cfg = json.loads((up / "config.json").read_text())
    # a config class default changed upstream: edit the copy's class, not config.json
    src = (up / "configuration_minicpm.py").read_text()
    assert "vision_batch_size=16" in src
    (up / "configuration_minicpm.py").write_text(src.replace("vision_batch_size=16", "vision_batch_size=8"))
    pin = write_pin(up, out.parent / "pin2.json")
    rc, report = run_cli(up, pin, out, "--no-transformers")
    assert rc == 1
    att = rows(report, "config", attention=True)
    assert [(f["item"], f["status"]) for f in att] == [("defaults:vision_batch_size", "differs")]
    assert cfg["vision_batch_size"] == 16  # from config.json both agree


def test_numeric_parity_and_a_numeric_change(upstream):
    up, pin, out = upstream
    rc, report = run_cli(up, pin, out, "--numeric", "--no-transformers")
    num = rows(report, "numeric")
    assert rc == 0 and num[0]["status"] == "ok", num
    with open(up / "modeling_minicpmv.py", "a") as f:
        f.write(textwrap.dedent('''

            _plain_forward = MiniCPMV.forward


            def _scaled_forward(self, *args, **kwargs):
                out = _plain_forward(self, *args, **kwargs)
                out.logits.mul_(1.01)
                return out


            MiniCPMV.forward = _scaled_forward
        '''))
    pin = write_pin(up, out.parent / "pin2.json", changes=[
        {"file": "modeling_minicpmv.py", "symbol": "_scaled_forward", "kind": "removed", "what": "-", "why": "-",
         "note": "-"}])
    rc, report = run_cli(up, pin, out, "--numeric", "--no-transformers")
    num = rows(report, "numeric")
    assert rc == 1 and num[0]["status"] == "differs" and num[0]["attention"], num
    assert [f["item"] for f in rows(report, attention=True)] == ["logits"]


def test_numeric_runs_upstream_with_its_known_breakages_shimmed(upstream):
    """The copy gets upstream's breakages back: star import + List, processor load in __init__."""
    up, _, out = upstream
    res = up / "resampler.py"
    res.write_text("from torch.nn.functional import *\n" + res.read_text() + textwrap.dedent('''

        def _upstream_style_annotation(x: List[int]) -> None:
            return None
    '''))
    add_parameter_to_init(up / "modeling_minicpmv.py", "MiniCPMV",
                          "self._upstream_processor = AutoProcessor.from_pretrained("
                          "self.config._name_or_path, trust_remote_code=True)")
    mod = up / "modeling_minicpmv.py"
    mod.write_text("from transformers import AutoProcessor\n" + mod.read_text())
    before = {p.name: sha256_file(p) for p in up.iterdir()}
    pin = write_pin(up, out.parent / "pin2.json")
    rc, report = run_cli(up, pin, out, "--numeric", "--no-transformers")
    num = rows(report, "numeric")
    assert num[0]["status"] == "ok", num
    assert {f["status"] for f in rows(report, "state_dict")} == {"ok"}
    assert {p.name: sha256_file(p) for p in up.iterdir()} == before, "upstream files never edited"


# ----------------------------------------------------------------------------------------
# transformers' attention code
# ----------------------------------------------------------------------------------------
def test_installed_transformers_matches_the_pin():
    """Fails when a transformers upgrade changes the Qwen2/SigLIP/SDPA code the fork mirrors."""
    pin = pinning.load_pin()
    findings, details = transformers_check.compare_transformers(pin, FORK, None, log=log_quiet)
    assert not [f for f in findings if f.attention], [f for f in findings if f.attention]


def test_transformers_change_is_flagged(tmp_path):
    """Edits to the installed release's own snapshot are each flagged; nothing else is."""
    import transformers

    installed = transformers.__version__
    fork_fns = pinning.load_pin()["transformers"]["fork_attention_functions"]  # the fork's, as pinned
    pin = {"transformers": transformers_check.transformers_snapshot({"fork_attention_functions": fork_fns})}
    qwen = pin["transformers"]["snapshots"][installed]["files"]["models/qwen2/modeling_qwen2.py"]
    qwen["symbols"]["eager_attention_forward"]["body"] = "0" * 16
    qwen["symbols"]["Qwen2Attention.forward"]["signature"] = "(self, hidden_states)"
    del qwen["symbols"]["repeat_kv"]
    findings, _ = transformers_check.compare_transformers(pin, FORK, tmp_path, log=log_quiet)
    att = {(f.item, f.status) for f in findings if f.attention}
    p = "models/qwen2/modeling_qwen2.py::"
    assert (p + "eager_attention_forward", "body changed since pin") in att
    assert any(item == p + "Qwen2Attention.forward" and s.startswith("signature changed") for item, s in att)
    assert (p + "repeat_kv", "added since pin") in att
    assert len(att) == 3  # the pinned release itself needs no attention
    diffs = list((tmp_path / "transformers").glob("*.diff"))
    assert diffs and all(d.read_text().startswith("--- transformers/") for d in diffs)
    # the same snapshot pinned under another release: the installed one is not verified
    pin["transformers"]["snapshots"] = {"0.0.0": pin["transformers"]["snapshots"][installed]}
    findings, _ = transformers_check.compare_transformers(pin, FORK, None, log=log_quiet)
    assert [(f.item, f.status) for f in findings if f.section == "transformers" and f.item == "version"] == [
        ("version", "not verified")]


# ----------------------------------------------------------------------------------------
# upstream against the pinned snapshot of itself: every edit named by file and symbol
# ----------------------------------------------------------------------------------------
def edit_line_in(path: Path, qualname: str, edit):
    """Apply ``edit(line) -> line`` to the first one-line simple statement (no comment on its
    line) in ``qualname``'s body; return its line number."""
    src = path.read_text()
    lines = src.splitlines(True)
    node = find_def(ast.parse(src), qualname)
    simple = (ast.Assign, ast.Return, ast.AugAssign, ast.Expr)
    stmt = min((n for n in ast.walk(node) if isinstance(n, simple) and n.lineno == n.end_lineno
                and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
                and "#" not in lines[n.lineno - 1]), key=lambda n: n.lineno)
    lines[stmt.lineno - 1] = edit(lines[stmt.lineno - 1].rstrip("\n")) + "\n"
    path.write_text("".join(lines))
    return stmt.lineno


def drift_rows(report):
    return [f for f in rows(report, "symbols", attention=True) if "since pin" in f["status"]]


@pytest.mark.parametrize("edit, status", [
    (lambda line: line + "; pass", "body changed since pin"),
    (lambda line: line + "  # edited upstream", "edited since pin (comments/docstrings/layout only)"),
])
def test_one_edited_line_is_named_by_file_and_symbol(upstream, edit, status):
    up, pin, out = upstream
    lineno = edit_line_in(up / "modeling_minicpmv.py", "MiniCPMV.get_vllm_embedding", edit)
    rc, report = run_cli(up, pin, out, "--no-transformers", "--no-structural")
    assert rc == 1
    drift = drift_rows(report)
    assert [(f["item"], f["status"]) for f in drift] == [("modeling_minicpmv.py::MiniCPMV.get_vllm_embedding", status)]
    lo, hi = [int(x) for x in drift[0]["detail"].split()[1].split("-")]
    assert lo <= lineno <= hi
    file_row = next(f for f in rows(report, "files") if f["item"] == "modeling_minicpmv.py")
    assert file_row["attention"] and "MiniCPMV.get_vllm_embedding" in file_row["detail"]
    upstream_changes = report["upstream_changes_since_pin"]
    assert [c["qualname"] for c in upstream_changes] == ["MiniCPMV.get_vllm_embedding"]


def test_signature_default_and_module_level_edits_are_named(upstream):
    up, pin, out = upstream
    cfg = up / "configuration_minicpm.py"
    cfg.write_text(cfg.read_text().replace("vision_batch_size=16", "vision_batch_size=8"))
    res = up / "resampler.py"
    qual, param = pick_method_with_param(res, "Resampler")
    rename_param(res, qual, param, param + "_renamed")
    mod = up / "modeling_minicpmv.py"
    assert "\nTERMINATORS = " in mod.read_text()
    mod.write_text(mod.read_text().replace("\nTERMINATORS = ", "\nTERMINATORS = ['<x>'] + "))
    rc, report = run_cli(up, pin, out, "--no-transformers", "--no-structural")
    assert rc == 1
    drift = {f["item"]: f for f in drift_rows(report)}
    init = drift["configuration_minicpm.py::MiniCPMVConfig.__init__"]
    assert init["status"] == "signature changed since pin" and "~vision_batch_size=8" in init["detail"]
    renamed = drift[f"resampler.py::{qual}"]
    assert renamed["status"] == "signature changed since pin" and f"+{param}_renamed" in renamed["detail"]
    assert f"-{param}" in renamed["detail"]
    assert drift["modeling_minicpmv.py::TERMINATORS"]["status"] == "body changed since pin"
    assert len(drift) == 3


def test_added_and_removed_upstream_symbols_since_pin(upstream):
    up, pin, out = upstream
    replace_def(up / "modeling_minicpmv.py", "MiniCPMV.set_decoder", None)
    with open(up / "resampler.py", "a") as f:
        f.write("\n\ndef new_upstream_helper(x, y=2):\n    return x\n")
    rc, report = run_cli(up, pin, out, "--no-transformers", "--no-structural")
    assert rc == 1
    drift = {(f["item"], f["status"]) for f in drift_rows(report)}
    assert ("modeling_minicpmv.py::MiniCPMV.set_decoder", "removed since pin") in drift
    assert ("resampler.py::new_upstream_helper", "added since pin") in drift


def test_a_pin_without_symbol_snapshot_still_needs_attention(upstream):
    up, pin, out = upstream
    data = json.loads(pin.read_text())
    for entry in data["upstream"]["files"].values():
        entry.pop("symbols")
    atomic_write_json(pin, data)
    with open(up / "resampler.py", "a") as f:
        f.write("# edited\n")
    rc, report = run_cli(up, pin, out, "--no-transformers", "--no-structural")
    assert rc == 1
    assert [(f["item"], f["status"]) for f in drift_rows(report)] == [("resampler.py::?", "changed since pin")]


def test_undocumented_fork_body_change_needs_attention(upstream):
    """The fork changed a body and no note says so: that is a fork change to document."""
    up, pin, out = upstream
    edit_line_in(up.parent / "fork" / "modeling_minicpmv.py", "MiniCPMV.get_vllm_embedding",
                 lambda line: line + "; pass")
    rc, report = run_cli(up, pin, out, "--no-transformers", "--no-structural")
    assert rc == 1
    att = rows(report, "symbols", attention=True)
    assert [(f["item"], f["status"]) for f in att] == [
        ("modeling_minicpmv.py::MiniCPMV.get_vllm_embedding", "body differs (undocumented)")]
    entry = {"file": "modeling_minicpmv.py", "symbol": "MiniCPMV.get_vllm_embedding", "kind": "changed",
             "what": "w", "why": "y", "note": "notes/x.md"}
    pin2 = write_pin(up, out.parent / "pin2.json", changes=[entry])
    rc, report = run_cli(up, pin2, out, "--no-transformers", "--no-structural")
    assert rc == 0, rows(report, attention=True)


def test_entries_document_by_kind_lists_and_stale_entries_are_listed(upstream):
    up, _, out = upstream
    replace_def(up / "modeling_minicpmv.py", "MiniCPMV.set_decoder", None)  # the fork "adds" it
    res = up / "resampler.py"
    res.write_text(res.read_text() + "\n\ndef upstream_only(x):\n    return x\n")  # the fork "removes" it
    entry = {"file": "modeling_minicpmv.py", "symbol": "MiniCPMV.get_decoder", "kind": "changed",
             "added": ["MiniCPMV.set_decoder"], "what": "w", "why": "y", "note": "notes/a.md"}
    entry2 = {"file": "resampler.py", "symbol": "*", "kind": "replaced", "what": "w", "why": "y",
              "note": "notes/b.md"}
    stale = {"file": "resampler.py", "symbol": "Resampler.forward", "kind": "changed", "what": "w", "why": "y",
             "note": "notes/c.md"}
    pin = write_pin(up, out.parent / "pin.json", changes=[stale, entry, entry2])
    rc, report = run_cli(up, pin, out, "--no-transformers", "--no-structural")
    assert rc == 0, rows(report, attention=True)
    statuses = {f["item"]: f["status"] for f in rows(report, "symbols")}
    assert statuses["modeling_minicpmv.py::MiniCPMV.set_decoder"] == "added (documented)"
    assert statuses["resampler.py::upstream_only"] == "removed (documented)"
    notes = rows(report, "notes")
    assert [(f["item"], f["status"], f["attention"]) for f in notes] == [
        ("resampler.py::Resampler.forward", "entry matches nothing", False)]


def test_import_source_swap_is_a_symbol_difference(upstream):
    """Upstream imports a name from transformers where the fork has its own module."""
    up, pin, out = upstream
    mod = up / "modeling_minicpmv.py"
    src = mod.read_text()
    assert "from .modeling_qwen2 import" in src
    mod.write_text(src + "\nfrom transformers import Qwen2ForCausalLM  # noqa\n")
    pin = write_pin(up, out.parent / "pin2.json")
    rc, report = run_cli(up, pin, out, "--no-transformers", "--no-structural")
    assert rc == 1
    att = rows(report, "symbols", attention=True)
    assert [(f["item"], f["status"]) for f in att] == [
        ("modeling_minicpmv.py::<import Qwen2ForCausalLM>", "signature (undocumented)")]
    assert "transformers" in att[0]["detail"]


# ----------------------------------------------------------------------------------------
# parity rows: present, and an error (with its reason) when they cannot run
# ----------------------------------------------------------------------------------------
NUMERIC_ROWS = ["logits", "llm attention", "vision attention", "resampler attention", "greedy generation"]


def test_numeric_compares_all_attention_families_and_generation(upstream):
    up, pin, out = upstream
    rc, report = run_cli(up, pin, out, "--numeric", "--no-transformers")
    num = {f["item"]: f for f in rows(report, "numeric")}
    assert rc == 0 and list(num) == NUMERIC_ROWS and {f["status"] for f in num.values()} == {"ok"}, num
    # an attention-only change upstream (the vision softmax temperature) shows where it happens
    sig = up / "modeling_navit_siglip.py"
    src = sig.read_text()
    assert "self.scale = self.head_dim ** -0.5" in src
    sig.write_text(src.replace("self.scale = self.head_dim ** -0.5", "self.scale = self.head_dim ** -0.4"))
    rc, report = run_cli(up, pin, out, "--numeric", "--no-transformers")
    num = {f["item"]: f for f in rows(report, "numeric")}
    assert rc == 1
    assert num["vision attention"]["status"] == "differs" and num["vision attention"]["attention"]
    assert num["logits"]["status"] == "differs"
    assert num["llm attention"]["attention"] or num["resampler attention"]["attention"]


def test_parity_that_cannot_run_is_an_error_row(upstream):
    up, pin, out = upstream
    replace_def(up / "modeling_minicpmv.py", "MiniCPMV.init_resampler",
                "def init_resampler(self, embed_dim, vision_dim):\n    raise RuntimeError('upstream is broken here')\n")
    pin = write_pin(up, out.parent / "pin2.json")
    rc, report = run_cli(up, pin, out, "--numeric", "--no-transformers")
    assert rc == 1
    sd = rows(report, "state_dict")
    assert [(f["status"], f["attention"]) for f in sd] == [("error", True)]
    assert "upstream is broken here" in sd[0]["detail"]
    num = rows(report, "numeric")
    assert [f["item"] for f in num] == NUMERIC_ROWS
    assert all(f["status"] == "error" and "upstream is broken here" in f["detail"] for f in num), num


def test_upstream_python_runs_upstream_in_a_subprocess(upstream):
    """``--upstream-python``: upstream's side in another interpreter (here: this one, as a
    subprocess), tensors exchanged as safetensors files."""
    up, pin, out = upstream
    rc, report = run_cli(up, pin, out, "--numeric", "--no-transformers", "--upstream-python", sys.executable)
    assert rc == 0, rows(report, attention=True)
    assert "--upstream-python" in rows(report, "parity")[0]["detail"]
    assert [f["status"] for f in rows(report, "numeric")] == ["ok"] * 5
    assert {f["status"] for f in rows(report, "state_dict")} == {"ok"}
    assert report["parity"]["numeric"]["upstream"]["versions"]["executable"] == sys.executable
    rc, report = run_cli(up, pin, out, "--numeric", "--no-transformers", "--upstream-python",
                         str(out.parent / "no-such-python"))
    assert rc == 1
    errors = rows(report, "state_dict") + rows(report, "numeric")
    assert len(errors) == 6 and all(f["status"] == "error" and "no-such-python" in f["detail"] for f in errors)


def test_upstream_import_shims_leave_nothing_behind():
    import importlib.util

    import torch

    assert importlib.util.find_spec("transformers") is not None
    shims = loader.Shims()
    had_tv = "torchvision" in sys.modules
    with loader.upstream_import_shims(shims):
        import torchvision  # noqa: F401  (the real one, or the stand-in)
        from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask
    if "torchvision" in shims.used and not had_tv:
        assert "torchvision" not in sys.modules  # the stand-in is gone again
        assert importlib.util.find_spec("torchvision") is None
    if "modeling_attn_mask_utils" in shims.used:
        assert "transformers.modeling_attn_mask_utils" not in sys.modules
    mask = _prepare_4d_attention_mask(torch.tensor([[1, 1, 0]]), torch.float32)
    assert mask.shape == (1, 1, 3, 3)
    assert (mask[..., :2] == 0).all() and (mask[..., 2] == torch.finfo(torch.float32).min).all()


def test_cross_interpreter_config_drift_is_informational():
    from minicpmv_attn.upstream.parity import compare_config_fields

    fork = {"query_num": 64, "rope_parameters.rope_theta": 1e6, "sliding_window": None}
    up = {"query_num": 64, "rope_theta": 1e6, "sliding_window": 4096}
    fork_base = {"defaults": {"rope_parameters.rope_theta": 1e6, "sliding_window": None}, "nested": {}}
    up_base = {"defaults": {"rope_theta": 1e6, "sliding_window": 4096}, "nested": {}}
    found = compare_config_fields(fork, up, {}, "defaults", fork_base, up_base)
    assert not any(f.attention for f in found)
    assert {f.status for f in found} >= {"fork only (transformers)", "upstream only (transformers)"}
    up["query_num"] = 32  # upstream's own field changed: never transformers' drift
    found = compare_config_fields(fork, up, {}, "defaults", fork_base, up_base)
    assert [(f.item, f.status) for f in found if f.attention] == [("defaults:query_num", "differs")]
    up["query_num"], up["sliding_window"] = 64, 8192  # a base field upstream overrides
    found = compare_config_fields(fork, up, {}, "defaults", fork_base, up_base)
    assert [(f.item, f.status) for f in found if f.attention] == [("defaults:sliding_window", "differs")]


def test_summary_table_fits_120_columns():
    from minicpmv_attn.upstream.report import Finding, format_table

    long = [Finding("symbols", "image_processing_minicpmv.py::MiniCPMVImageProcessor.get_slice_image_placeholder",
                    "edited since pin (comments/docstrings/layout only)", "x" * 300, attention=True),
            Finding("files", "resampler.py", "matches pin")]
    text = format_table(long)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "placeholder" in text and "!!" in text
    assert "x" * 300 in format_table(long, width=None)


def test_help_says_the_upstream_code_is_executed(capsys):
    with pytest.raises(SystemExit):
        diff_upstream.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "EXECUTE THE UPSTREAM FOLDER'S CODE" in text
    assert "--upstream-python" in text


def test_upstream_side_script_needs_only_torch_and_transformers(upstream):
    """``upstream_run.py`` as another interpreter runs it: no ``minicpmv_attn`` import at all."""
    from minicpmv_attn.upstream import upstream_run

    up, _, out = upstream
    work = out.parent / "work"
    work.mkdir()
    (work / "request.json").write_text(json.dumps({"op": "describe", "folder": str(up), "config": {}}))
    script = str(Path(upstream_run.__file__).resolve())
    code = ("import sys, runpy; sys.modules['minicpmv_attn'] = None; "
            f"sys.argv = [{script!r}, {str(work / 'request.json')!r}]; runpy.run_path({script!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=str(work))
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads((work / "response.json").read_text())
    assert not answer["errors"] and answer["state_dict"], answer.get("errors")


def test_built_package_carries_the_pin_notes_and_upstream_side(tmp_path):
    """What a wheel installs: ``minicpmv_attn.patches`` (pin + notes) and the upstream tools."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "generated", "*.egg-info")
    for name in ("modeling", "scripts", "patches"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    lib = tmp_path / "lib"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=str(src),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pkg = lib / "minicpmv_attn"
    pin = json.loads((pkg / "patches" / "UPSTREAM.json").read_text())
    notes = {f"notes/{p.name}" for p in (pkg / "patches" / "notes").glob("*.md")}
    assert {e["note"] for e in pin["changes"]} <= notes and notes
    assert (pkg / "upstream" / "upstream_run.py").is_file() and (pkg / "upstream" / "loader.py").is_file()
    code = ("from minicpmv_attn.upstream import pin; p = pin.installed_pin(); print(p); "
            "print(pin.notes_dir().joinpath('processing_minicpmv.md').is_file())")
    env = dict(os.environ, PYTHONPATH=str(lib))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = proc.stdout.split("\n")[:2]
    assert first.startswith(str(lib)) and second == "True"


def test_fork_marks_name_existing_notes():
    """Every ``# fork: <note>`` mark in the fork's upstream-named files names a note in patches/notes/."""
    from minicpmv_attn.upstream.diff import FORK_MARK

    notes = {p.stem for p in (REPO / "patches" / "notes").glob("*.md")}
    marks = {}
    for name in ISSUE_HASHES:
        for i, line in enumerate((FORK / name).read_text().splitlines(), 1):
            m = FORK_MARK.search(line)
            if m:
                marks[f"{name}:{i}"] = m.group(1).rstrip(".")
    assert marks, "the fork's edits are marked"
    assert {k: v for k, v in marks.items() if v not in notes} == {}
    used = {n for n in marks.values()}
    assert used == notes, f"notes without a mark: {sorted(notes - used)}"
