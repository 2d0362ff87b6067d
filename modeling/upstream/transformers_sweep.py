"""Run the compatibility subset of the tests on many transformers and torch releases, one venv each.

The subset is the tests marked ``compat`` (golden logits, attention and greedy generate,
capture during generate, chat, the main command, the generation guard). The sweep is what
docs/compatibility.md (rendered from the sweep's JSON record beside it), ``TRANSFORMERS_CAP``
and ``TORCH_CAP`` rest on; the canaries are what CI runs to notice a new release of either at or
above its cap.

Besides the standard library only the package's atomic writer is used here (the venvs hold the
transformers releases under test). Nothing here computes paths outside the package: the
checkout to test comes in as ``repo`` (the script's ``--repo``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..attention_record import atomic_write_json, atomic_write_text

#: The torch the README's first commands and CI install, and the sweep's default: the newest release
#: served as a CPU build (torch==2.13.0 resolves to the local 2.13.0+cpu wheel; the package index
#: has only CUDA builds of 2.14 and later, ~3 GB with their libraries).
DEFAULT_TORCH = "2.13.0"
TEST_REQUIREMENTS = ["pytest", "hypothesis"]
TABLE_START, TABLE_END = "<!-- compat-table:start -->", "<!-- compat-table:end -->"
PACKAGES = ("transformers", "torch")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# versions
# ----------------------------------------------------------------------------------------
def release(version: str) -> Tuple[int, ...]:
    """``"5.24.0"`` -> (5, 24, 0); pre-releases sort with their release."""
    out = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d*", part).group(0)
        out.append(int(digits) if digits else 0)
    return tuple(out + [0] * (3 - len(out)))


def is_final(version: str) -> bool:
    return re.fullmatch(r"\d+(\.\d+)*", version) is not None


def verified_range(source: Optional[Path] = None, package: str = "transformers") -> Dict[str, str]:
    """PACKAGE_MIN / _CAP / _NEWEST_VERIFIED (``package``: transformers or torch) as written in
    ``source`` (a ``modeling_qwen2.py``; default: the installed package's own)."""
    if package not in PACKAGES:
        raise ValueError(f"package: expected one of {', '.join(PACKAGES)}, got {package!r}")
    source = Path(source) if source is not None else Path(__file__).resolve().parents[1] / "modeling_qwen2.py"
    prefix = package.upper()
    found = dict(re.findall(rf'^{prefix}_([A-Z_]+) = "([0-9.]+)"$', source.read_text(encoding="utf-8"), re.M))
    missing = {"MIN", "CAP", "NEWEST_VERIFIED"} - set(found)
    if missing:
        raise RuntimeError(f"{source}: {', '.join(f'{prefix}_{m}' for m in sorted(missing))} not found")
    return {"min": found["MIN"], "cap": found["CAP"], "newest": found["NEWEST_VERIFIED"]}


def index_versions(python: str = sys.executable, package: str = "transformers") -> List[str]:
    """The final releases of ``package`` the package index serves, newest first (local builds such
    as ``2.13.0+cpu`` are left out: they are the same release)."""
    proc = subprocess.run([python, "-m", "pip", "index", "versions", package], capture_output=True,
                          text=True, timeout=300)
    text = proc.stdout
    m = re.search(r"Available versions:\s*(.+)", text)
    if proc.returncode != 0 or not m:
        # older pips: the list of versions is in the error of an impossible request
        proc = subprocess.run([python, "-m", "pip", "download", "--no-deps", "-d", tempfile.gettempdir(),
                               f"{package}==0.0.0.invalid"], capture_output=True, text=True, timeout=300)
        m = re.search(r"from versions:\s*([^)]+)\)", proc.stderr)
        if not m:
            raise RuntimeError(f"could not list {package} releases on the package index: "
                               + (proc.stderr.strip().splitlines() or ["no answer"])[-1])
    versions = [v.strip() for v in m.group(1).split(",") if is_final(v.strip())]
    return sorted(set(versions), key=release, reverse=True)


def sweep_versions(available: Sequence[str], minimum: str = "4.40.0") -> List[str]:
    """The releases the sweep covers: ``minimum`` (the model card's), the newest patch of the
    last 4.x minor, and the newest patch of every 5.x (and later) minor."""
    finals = [v for v in available if is_final(v) and release(v) >= release(minimum)]
    newest_patch: Dict[Tuple[int, int], str] = {}
    for v in finals:
        key = release(v)[:2]
        if key not in newest_patch or release(v) > release(newest_patch[key]):
            newest_patch[key] = v
    chosen = {minimum} if minimum in finals else set()
    four = [k for k in newest_patch if k[0] == 4]
    if four:
        chosen.add(newest_patch[max(four)])
    chosen.update(v for k, v in newest_patch.items() if k[0] >= 5)
    return sorted(chosen, key=release)


def torch_sweep_versions(available: Sequence[str], minimum: str) -> List[str]:
    """The torch releases the sweep covers: the newest patch of every minor from ``minimum``'s on."""
    newest_patch: Dict[Tuple[int, int], str] = {}
    for v in available:
        if is_final(v) and release(v)[:2] >= release(minimum)[:2]:
            key = release(v)[:2]
            if key not in newest_patch or release(v) > release(newest_patch[key]):
                newest_patch[key] = v
    return sorted(newest_patch.values(), key=release)


# ----------------------------------------------------------------------------------------
# one release
# ----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    version: str  # the transformers release
    status: str  # pass | FAIL | error (the venv could not be built)
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: List[str] = field(default_factory=list)  # "test id: first line of the error"
    differ: str = ""  # the transformers differ's verdict
    seconds: float = 0.0
    detail: str = ""
    torch: str = DEFAULT_TORCH  # the torch release asked for
    installed: str = ""  # what the venv imported: "torch 2.13.0+cpu (CPU build), transformers 5.25.0"
    python: str = ""
    date: str = ""  # when it was measured (UTC day)
    commit: str = ""  # the checkout it was measured on


def venv_name(version: str, torch: str = DEFAULT_TORCH) -> str:
    return f"tf-{version}-torch-{torch}"


def venv_dir(workdir: Path, version: str, torch: str = DEFAULT_TORCH, share_torch: bool = False) -> Path:
    """The venv of a pair: its own, or with ``share_torch`` one per torch release that each
    transformers release is installed into in turn (a CUDA build of torch is ~6 GB to install)."""
    return workdir / (f"torch-{torch}" if share_torch else venv_name(version, torch))


def _run(cmd: Sequence[str], log_file: Path, env=None, timeout: int = 1800) -> int:
    with open(log_file, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            return subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"timed out after {timeout} s\n")
            return 124


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def pip_env() -> Dict[str, str]:
    """The environment of the venvs' pip: a machine-wide constraint file (one may cap torch at the
    releases kept on the machine's disk) would make the exact release asked for uninstallable, so
    none is read; no cache is kept (a CUDA build of torch is ~3 GB)."""
    return dict(os.environ, PIP_CONSTRAINT=os.devnull, PIP_NO_CACHE_DIR="1")


def build_env(version: str, workdir: Path, repo: Path, log_file: Path, torch: str = DEFAULT_TORCH,
              share_torch: bool = False) -> Path:
    """A venv with torch==torch, transformers==version, the test tools and the fork (editable, no deps).

    Reused when it already holds those releases (the fork is installed again: ``repo`` may be
    another checkout). The fork is installed without its dependencies so a release above
    setup.py's caps can be tried (the canaries). torch comes from the package index as it is
    served: a CPU build where one is (2.13.0+cpu here), else the CUDA build, which runs on the CPU.
    With ``share_torch`` the venv is the torch release's (:func:`venv_dir`): what the previous
    release installed is removed down to the packages the venv held with torch alone (a package one
    release pulls in and an older one only imports if present, such as ``kernels``, broke
    transformers 5.0.0), then transformers==version goes in.
    """
    venv = venv_dir(workdir, version, torch, share_torch)
    python = venv_python(venv)
    marker = venv / ".minicpmv-attn-sweep"
    fork = [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(repo)]
    libraries = [str(python), "-m", "pip", "install", "-q", f"torch=={torch}", f"transformers=={version}",
                 "safetensors", "einops", "numpy", "matplotlib", "pillow", "tqdm", *TEST_REQUIREMENTS]
    wanted = f"torch {torch}" if share_torch else f"{version} {torch}"
    base = venv / ".torch-only"
    if marker.is_file() and marker.read_text().strip() == wanted and python.is_file():
        steps = [fork]
        if share_torch:
            extra = sorted(set(installed_packages(python)) - set(base.read_text().split()))
            steps = ([[str(python), "-m", "pip", "uninstall", "-q", "-y", *extra]] if extra else []) + [libraries, fork]
    else:
        if venv.exists():
            shutil.rmtree(venv)
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", f"torch=={torch}"], libraries, fork]
    for cmd in steps:
        if cmd is libraries and share_torch and not base.is_file():
            base.write_text("\n".join(installed_packages(python)) + "\n")
        if _run(cmd, log_file, env=pip_env()) != 0:
            raise RuntimeError(f"`{' '.join(cmd[2:6])} ...` failed (see {log_file})")
    marker.write_text(wanted + "\n")
    return venv


def installed_packages(python: Path) -> List[str]:
    """The distribution names a venv holds (normalised: lower case, ``-``)."""
    proc = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=600, env=pip_env())
    if proc.returncode != 0:
        raise RuntimeError(f"pip list in {python} failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    names = {re.sub(r"[-_.]+", "-", line.split("==")[0].split(" @ ")[0]).lower()
             for line in proc.stdout.splitlines() if line.strip() and not line.startswith("#")}
    return sorted(names - {"pip", "setuptools", "wheel"})


PROBE = ("import sys, torch, transformers; cuda = torch.version.cuda; "
         "print(f'torch {torch.__version__} ({\"CUDA \" + cuda if cuda else \"CPU\"} build), "
         "transformers {transformers.__version__}|{sys.version_info[0]}.{sys.version_info[1]}')")


def probe(python: str, version: str, torch: str) -> Tuple[str, str]:
    """(what the venv imports, its Python) -- checked against what was asked for."""
    proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError("importing torch / transformers failed: "
                           + (proc.stderr.strip().splitlines() or ["no message"])[-1])
    installed, py = proc.stdout.strip().rsplit("|", 1)
    got = re.match(r"torch (\S+) .*transformers (\S+)$", installed)
    if got is None or got.group(1).split("+")[0] != torch or got.group(2) != version:
        raise RuntimeError(f"asked for torch {torch}, transformers {version}; the venv has {installed}")
    return installed, py


def parse_junit(path: Path) -> Tuple[int, int, int, List[str]]:
    """(passed, failed, skipped, ["test id: first line of the error", ...]) of a pytest junit xml."""
    root = ET.parse(str(path)).getroot()
    passed = failed = skipped = 0
    failures = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            failed += 1
            test = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append(f"{test}: {message[0][:160] if message else bad.tag}")
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped, failures


def run_release(version: str, workdir: Path, repo: Path, marker: str = "compat", threads: int = 1,
                log: Log = _stderr, drop_venv: bool = False, torch: str = DEFAULT_TORCH,
                share_torch: bool = False) -> Outcome:
    """Build (or reuse) the venv for transformers ``version`` and ``torch`` and run the ``marker``
    tests and the differ there.

    The tests' temporary files go under ``workdir`` (``tf-VERSION-torch-T.tmp``, emptied by pytest
    at each run). With ``drop_venv`` the venv (~1.3 GB with a CPU torch, ~6 GB with a CUDA one) and
    those files are deleted once the run is over, so a sweep's disk use stays at one venv however
    many releases it tries (CI).
    """
    name = venv_name(version, torch)
    try:
        o = _run_release(version, torch, workdir, Path(repo), marker, threads, log, share_torch)
    finally:
        if drop_venv:
            for path in (venv_dir(workdir, version, torch, share_torch), workdir / f"{name}.tmp"):
                shutil.rmtree(path, ignore_errors=True)
    o.date, o.commit = time.strftime("%Y-%m-%d", time.gmtime()), commit_of(repo)
    return o


def _run_release(version: str, torch: str, workdir: Path, repo: Path, marker: str, threads: int,
                 log: Log, share_torch: bool = False) -> Outcome:
    workdir.mkdir(parents=True, exist_ok=True)
    name = venv_name(version, torch)
    log_file = workdir / f"{name}.log"
    log_file.write_text("")
    start = time.time()
    log(f"transformers {version}, torch {torch}: building the venv ...")
    try:
        venv = build_env(version, workdir, repo, log_file, torch=torch, share_torch=share_torch)
        installed, py = probe(str(venv_python(venv)), version, torch)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return Outcome(version, "error", detail=str(e), seconds=time.time() - start, torch=torch)
    python = str(venv_python(venv))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONDONTWRITEBYTECODE="1")
    junit = workdir / f"{name}.junit.xml"
    if junit.exists():
        junit.unlink()
    log(f"transformers {version}, torch {torch}: running the '{marker}' tests ...")
    with tempfile.TemporaryDirectory() as tmp:
        env["MINICPMV_ATTN_CACHE"] = tmp
        rc = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, str(repo / "tests"),
                   f"--basetemp={workdir / f'{name}.tmp'}", f"--junitxml={junit}", "-o",
                   "junit_family=xunit1"], log_file, env=env)
    if not junit.is_file():
        return Outcome(version, "error", detail=f"pytest exited {rc} without a report (see {log_file})",
                       seconds=time.time() - start, torch=torch, installed=installed, python=py)
    passed, failed, skipped, failures = parse_junit(junit)
    differ_rc = _run([python, str(repo / "scripts" / "diff_upstream.py"), "--transformers-only", "-q"], log_file,
                     env=env, timeout=600)
    differ = {0: "as pinned", 1: "drift (see log)"}.get(differ_rc, f"error {differ_rc}")
    ok = rc == 0 and failed == 0 and passed > 0
    return Outcome(version, "pass" if ok else "FAIL", passed, failed, skipped, failures, differ,
                   time.time() - start, "" if ok or failures else f"pytest exited {rc} (see {log_file})",
                   torch=torch, installed=installed, python=py)


def sweep(versions: Sequence[str], workdir: Path, repo: Path, jobs: int = 1, log: Log = _stderr,
          drop_venvs: bool = False, torches: Sequence[str] = (DEFAULT_TORCH,), share_torch: bool = False
          ) -> List[Outcome]:
    """Run :func:`run_release` for each of ``versions`` with each of ``torches`` on the checkout
    ``repo``, ``jobs`` at once (with ``share_torch``: one torch at a time, its releases in turn in
    its venv, deleted after the last with ``drop_venvs``)."""
    repo = Path(repo)
    if share_torch:
        outcomes = []
        for t in torches:
            for i, v in enumerate(versions):
                outcomes.append(run_release(v, workdir, repo, log=log, torch=t, share_torch=True,
                                            drop_venv=drop_venvs and i == len(versions) - 1))
        return sorted(outcomes, key=lambda o: (release(o.version), release(o.torch)))
    pairs = [(v, t) for t in torches for v in versions]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = list(pool.map(lambda p: run_release(p[0], workdir, repo, log=log, drop_venv=drop_venvs,
                                                       torch=p[1]), pairs))
    return sorted(outcomes, key=lambda o: (release(o.version), release(o.torch)))


def pin_snapshots(outcomes: Sequence[Outcome], workdir: Path, pin: Path, repo: Path, log: Log = _stderr
                  ) -> List[str]:
    """Add each passing release's transformers snapshot to ``pin`` (one at a time: one file)."""
    repo = Path(repo)
    done = []
    for o in outcomes:
        if o.status != "pass":
            continue
        name = venv_name(o.version, o.torch)
        if o.version in done:
            continue
        python = str(venv_python(workdir / name))
        rc = _run([python, str(repo / "scripts" / "diff_upstream.py"), "--transformers-only", "--pin", str(pin),
                   "--write-pin", str(pin), "-q"], workdir / f"{name}.log")
        if rc == 0:
            done.append(o.version)
        else:
            log(f"transformers {o.version}: could not add its snapshot to {pin} (exit {rc})")
    return done


# ----------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------
def commit_of(repo: Optional[Path]) -> str:
    """The short commit id of a git checkout, ``+changes`` when its tracked files differ from it ("" when
    it is not one)."""
    if repo is None:
        return ""
    try:
        proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    if proc.returncode != 0:
        return ""
    return proc.stdout.strip() + ("+changes" if dirty.returncode == 0 and dirty.stdout.strip() else "")


JSON_FORMAT = 1


def load_record(path: Path) -> List[Outcome]:
    """The runs of a sweep record (``[]`` when ``path`` does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != JSON_FORMAT or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path}: expected a sweep record {{\"format\": {JSON_FORMAT}, \"runs\": [...]}}")
    names = set(Outcome.__dataclass_fields__)
    runs = []
    for i, run in enumerate(data["runs"]):
        unknown = set(run) - names if isinstance(run, dict) else {"(not an object)"}
        if unknown:
            raise ValueError(f"{path}: runs[{i}]: unknown fields {', '.join(sorted(unknown))}")
        runs.append(Outcome(**run))
    return runs


def merge(old: Sequence[Outcome], new: Sequence[Outcome]) -> List[Outcome]:
    """``old`` with each run of ``new`` added, replacing the run of the same transformers and torch."""
    by_key = {(o.version, o.torch): o for o in old}
    by_key.update({(o.version, o.torch): o for o in new})
    return sorted(by_key.values(), key=lambda o: (release(o.version), release(o.torch)))


def save_record(outcomes: Sequence[Outcome], path: Path) -> None:
    """Write the runs as a sweep record (what :func:`markdown_table` renders)."""
    atomic_write_json(path, {"format": JSON_FORMAT, "runs": [asdict(o) for o in outcomes]})


def _cell(o: Outcome) -> str:
    return f"{o.status} {o.passed}/{o.failed}" if o.status != "error" else "error"


def markdown_table(outcomes: Sequence[Outcome]) -> str:
    """The compatibility tables of docs/compatibility.md, from the runs alone (no clock, no git):
    the torch x transformers grid as measured, then one line per run."""
    runs = sorted(outcomes, key=lambda o: (release(o.version), release(o.torch)))
    torches = sorted({o.torch for o in runs}, key=release)
    versions = sorted({o.version for o in runs}, key=release)
    grid = {(o.version, o.torch): o for o in runs}
    lines = ["compat tests passed/failed per transformers (rows) and torch (columns); - not measured", "",
             "| transformers \\ torch | " + " | ".join(torches) + " |",
             "| --- |" + " --- |" * len(torches)]
    for v in versions:
        lines.append(f"| {v} | " + " | ".join(_cell(grid[v, t]) if (v, t) in grid else "-" for t in torches) + " |")
    lines += ["", "| transformers | torch | installed (all run on the CPU) | result | compat tests (passed / failed) "
                  "| differ | minutes | measured (UTC day, commit) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for o in runs:
        tests = f"{o.passed} / {o.failed}" if o.status != "error" else o.detail[:80].replace("|", "/")
        lines.append(f"| {o.version} | {o.torch} | {o.installed or '-'} | {o.status} | {tests} | {o.differ or '-'} "
                     f"| {o.seconds / 60:.1f} | {o.date or '?'}, {o.commit or '?'} |")
    failing = [o for o in runs if o.failures]
    if failing:
        lines += ["", "What failed:"]
        for o in failing:
            shown = o.failures[:3] + ([f"and {len(o.failures) - 3} more"] if len(o.failures) > 3 else [])
            lines.append(f"- transformers {o.version}, torch {o.torch}: " + "; ".join(
                f.replace("|", "/") for f in shown))
    pythons = sorted({o.python for o in runs if o.python})
    commits = sorted({o.commit for o in runs if o.commit})
    days = sorted({o.date for o in runs if o.date})
    lines += ["", f"{len(runs)} runs, Python {', '.join(pythons) or '?'}, measured "
              + (f"{days[0]} to {days[-1]}" if len(days) > 1 else (days[0] if days else "?"))
              + f" on commit{'s' if len(commits) > 1 else ''} {', '.join(commits) or '?'} by "
                "`python scripts/sweep_transformers.py`; rendered from docs/compatibility.json by "
                "`python scripts/sweep_transformers.py --table docs/compatibility.json --doc docs/compatibility.md`."]
    return "\n".join(lines)


def table_block(text: str, where: str = "document") -> str:
    """The text between the compat-table markers of a document."""
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{where}: no {TABLE_START} ... {TABLE_END} block")
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip("\n")


def update_doc(doc: Path, table: str) -> None:
    """Put ``table`` between the compat-table markers of ``doc`` (written atomically)."""
    text = doc.read_text(encoding="utf-8")
    table_block(text, str(doc))
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    atomic_write_text(doc, head + TABLE_START + "\n" + table + "\n" + TABLE_END + tail)


def failure_line(o: Outcome, rng: Dict[str, str], package: str = "transformers", limit: int = 3) -> str:
    """One line: which release (of ``package``) broke what."""
    shown = "; ".join(o.failures[:limit]) + (f"; and {len(o.failures) - limit} more" if len(o.failures) > limit
                                             else "")
    what = shown or o.detail
    new = o.version if package == "transformers" else o.torch
    other = f"torch {o.torch}" if package == "transformers" else f"transformers {o.version}"
    return (f"CANARY FAILED: {package} {new} (above the verified {rng['min']}..{rng['newest']}, "
            f"cap <{rng['cap']}; with {other}) breaks {o.failed} of {o.passed + o.failed} compatibility tests: {what}")


def canary_decision(available: Sequence[str], rng: Dict[str, str]) -> Optional[str]:
    """The release the canary must try: the newest on the index at or above the cap, else None."""
    above = [v for v in available if release(v) >= release(rng["cap"])]
    return max(above, key=release) if above else None


def canary(workdir: Path, repo: Path, version: Optional[str] = None, log: Log = _stderr,
           drop_venv: bool = False, package: str = "transformers") -> Tuple[int, str]:
    """(exit code, one line). Exit 1 when a release of ``package`` (transformers or torch) at or above
    its cap breaks the compatibility tests of the checkout ``repo``. A new transformers is tried with
    the README's torch; a new torch with the newest verified transformers."""
    repo = Path(repo)
    source = repo / "modeling" / "modeling_qwen2.py"
    rng = verified_range(source, package)
    if version is None:
        try:
            available = index_versions(package=package)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            return 1, f"CANARY ERROR: {package}: {e}"
        version = canary_decision(available, rng)
        if version is None:
            return 0, (f"canary: the newest {package} on the package index is {available[0]}, inside the "
                       f"verified range (<{rng['cap']}): nothing new to try")
    if package == "transformers":
        o = run_release(version, workdir, repo, log=log, drop_venv=drop_venv)
    else:
        o = run_release(verified_range(source)["newest"], workdir, repo, log=log, drop_venv=drop_venv, torch=version)
    if o.status == "error":
        return 1, f"CANARY ERROR: {package} {version}: {o.detail}"
    if o.status == "FAIL":
        return 1, failure_line(o, rng, package)
    return 0, (f"canary: {package} {version} passes the {o.passed} compatibility tests (differ: {o.differ}; "
               f"{o.installed}); run the full sweep, then raise {package.upper()}_CAP in modeling/modeling_qwen2.py")
