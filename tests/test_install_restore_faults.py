"""Install and restore against hostile manifests, files that cannot be replaced and a second
run at the same time (issue 27)."""
import json
import os
from pathlib import Path

import pytest

from minicpmv_attn.scripts import install_into_snapshot as cli
from minicpmv_attn.upstream import install
from minicpmv_attn.upstream.common import sha256_file
from test_install_faults import checkpoint, stub_fork
from test_install_snapshot import tree


@pytest.fixture
def installed(tmp_path):
    """(folder after one install, fork, tree of the original folder)."""
    fork = stub_fork(tmp_path / "fork", 1)
    folder = checkpoint(tmp_path)
    before = tree(folder)
    assert cli.main([str(folder), "-q", "--fork", str(fork)]) == 0
    return folder, fork, before


def edit_manifest(folder, fn):
    path = folder / install.BACKUP_DIRNAME / install.MANIFEST_NAME
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def one_line_refusal(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("refused: "), err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o1644, 0o666, 0o777])
def test_restore_refuses_a_manifest_mode_with_setuid_or_world_write(installed, capsys, mode):
    folder, _, _ = installed
    edit_manifest(folder, lambda m: m["files"]["modeling_minicpmv.py"].update(mode=mode))
    after_install = tree(folder)
    capsys.readouterr()
    assert cli.main([str(folder), "--restore"]) == 1
    one_line_refusal(capsys, 'files["modeling_minicpmv.py"].mode: expected permission bits without setuid, setgid, '
                             f"sticky or world-write (within 0o775, e.g. 420 = 0o644), got {mode}")
    assert tree(folder) == after_install


def test_restore_never_removes_a_json_file_a_manifest_calls_absent(installed, capsys):
    folder, _, _ = installed
    sha = sha256_file(folder / "config.json")
    edit_manifest(folder, lambda m: (m["files"].__setitem__("config.json", {"state": "absent"}),
                                     m["installed"].__setitem__("config.json", sha)))
    capsys.readouterr()
    assert cli.main([str(folder), "--restore", "--force"]) == 1
    one_line_refusal(capsys, 'files["config.json"].state: expected "file" or "symlink"', 'got "absent"')
    assert (folder / "config.json").is_file()


class StuckReplace:
    """``install.os`` whose ``replace`` onto ``name`` fails as on an immutable file."""

    def __init__(self, name):
        self.name = name

    def __getattr__(self, attr):
        return getattr(os, attr)

    def replace(self, src, dst):
        if Path(dst).name == self.name:
            raise PermissionError(1, "Operation not permitted", str(dst))
        return os.replace(src, dst)


def test_a_first_install_that_cannot_replace_a_file_puts_the_originals_back(tmp_path, monkeypatch, capsys):
    fork = stub_fork(tmp_path / "fork", 1)
    folder = checkpoint(tmp_path)
    before = tree(folder)
    monkeypatch.setattr(install, "os", StuckReplace("resampler.py"))
    assert cli.main([str(folder), "-q", "--fork", str(fork)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: install stopped: cannot put {folder / 'resampler.py'} in "
                                                   f"place (Operation not permitted); ") and \
        err.endswith("files were already installed; the originals were put back, the folder is as it was\n"), err
    assert tree(folder) == before


def test_a_later_install_that_stops_says_how_to_undo_it(installed, tmp_path, monkeypatch, capsys):
    """A second install stops at a file it cannot replace: one line says so and what to run;
    --restore then gives back every original."""
    folder, _, before = installed
    fork2 = stub_fork(tmp_path / "fork2", 2)
    with monkeypatch.context() as m:
        m.setattr(install, "os", StuckReplace("resampler.py"))
        assert cli.main([str(folder), "-q", "--fork", str(fork2)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "install stopped: cannot put" in err and err.endswith(
        "; run --restore to put the originals back, or fix it and rerun the install\n"), err
    assert cli.main([str(folder), "-q", "--restore"]) == 0, capsys.readouterr().err
    assert tree(folder) == before


def test_restore_leaves_alone_a_file_that_already_is_its_original(tmp_path, monkeypatch, capsys):
    """An install killed before it replaced resampler.py (a file that cannot be replaced):
    --restore puts the others back without touching it."""
    fork = stub_fork(tmp_path / "fork", 1)
    folder = checkpoint(tmp_path)
    before = tree(folder)
    monkeypatch.setattr(install, "_stopped", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with monkeypatch.context() as m:
        m.setattr(install, "os", StuckReplace("resampler.py"))
        with pytest.raises(KeyboardInterrupt):
            install.install(folder, src=fork, log=lambda msg: None)
        assert tree(folder) != before
        assert cli.main([str(folder), "-q", "--restore"]) == 0, capsys.readouterr().err
    assert tree(folder) == before


def test_a_second_restore_at_the_same_time_is_refused_in_one_line(installed, capsys):
    folder, fork, _ = installed
    after_install = tree(folder)
    capsys.readouterr()
    with install.folder_lock(folder):  # the first restore (or install) holds the folder
        assert cli.main([str(folder), "--restore"]) == 1
        one_line_refusal(capsys, f"{folder}: another install or restore is running on this folder")
        assert cli.main([str(folder), "--fork", str(fork)]) == 1
        one_line_refusal(capsys, "another install or restore is running")
        assert tree(folder) == after_install
    assert cli.main([str(folder), "-q", "--restore"]) == 0  # the lock went with its holder


def test_two_real_restores_race_and_the_loser_says_so(installed, monkeypatch, capsys):
    """The winner is slowed down inside its run; the loser starts meanwhile and is refused."""
    import threading

    folder, _, before = installed
    started, release = threading.Event(), threading.Event()
    real = install._restore

    def slow(*a, **k):
        started.set()
        release.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(install, "_restore", slow)
    codes = []
    winner = threading.Thread(target=lambda: codes.append(cli.main([str(folder), "-q", "--restore"])))
    winner.start()
    assert started.wait(30)
    monkeypatch.setattr(install, "_restore", real)
    assert cli.main([str(folder), "--restore"]) == 1
    release.set()
    winner.join(60)
    assert codes == [0]
    one_line_refusal(capsys, "another install or restore is running")
    assert tree(folder) == before
