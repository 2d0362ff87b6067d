"""Parity of the fork with an upstream copy: structure (meta device) and numbers (random weights).

Upstream's code is executed (see :mod:`upstream_run`), in this interpreter with
:mod:`loader`'s shims or, with ``upstream_python``, in that interpreter (a Python with
upstream's own transformers) through a subprocess that exchanges tensors as safetensors files.
The fork always runs here.

* **Structural**: config fields (class defaults, and built from ``config.json`` when there is
  one) and every state-dict key, shape and dtype of both ``MiniCPMV`` classes built on the
  meta device. A config field that differs between two interpreters only as their plain
  transformers configs do is transformers' drift (informational); fields the pin lists under
  ``expected_config_differences`` are documented; any other difference needs attention.
* **Numeric**: both built on a tiny version of the config with upstream's random weights, run
  on two left-padded samples with images: logits, the LLM, vision and resampler attention
  (per head, on real positions) within ``atol``, and a greedy generation token for token.

A check that could not run is an ``error`` row with its reason, never an absent row.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import upstream_run as run
from .upstream_run import randomize_state_dict, synthetic_inputs, tiny_config_dict  # noqa: F401  (one home)
from .common import Log, log_stderr
from .loader import build_config, build_model, load_side, unload_package
from .report import Finding

NUMERIC_PREFIXES = {"logits": "logits", "llm attention": "attn.llm.", "vision attention": "attn.vision.",
                    "resampler attention": "attn.resampler", "greedy generation": "generated"}
NUMERIC_ROWS = tuple(NUMERIC_PREFIXES)
NEW_TOKENS = 6


MAX_RESPONSE_BYTES = 64 * 2 ** 20  # the upstream side's response.json (a few kilobytes when it works)


class UpstreamSideError(RuntimeError):
    """Upstream's side could not run at all (the message says where and why)."""


class UpstreamRunner:
    """Runs :mod:`upstream_run` on an upstream folder: here, or in ``python`` (a subprocess)."""

    def __init__(self, folder, python=None, timeout: float = 900.0, log: Log = log_stderr):
        self.folder = str(Path(folder).resolve())
        self.python = str(python) if python else None
        self.timeout = timeout
        self.log = log

    def where(self) -> str:
        return f"--upstream-python {self.python}" if self.python else "this interpreter"

    def describe(self, config_dict: Dict[str, Any]) -> Dict[str, Any]:
        if not self.python:
            return run.describe(self.folder, config_dict)
        with tempfile.TemporaryDirectory(prefix="minicpmv_up_") as work:
            return self._call(Path(work), {"op": "describe", "folder": self.folder, "config": config_dict})

    def numeric(self, tiny: Dict[str, Any], data, mask, seed: int, new_tokens: int):
        if not self.python:
            return run.run_numeric(self.folder, tiny, data, mask, seed, new_tokens)
        from safetensors.torch import load_file, save_file

        with tempfile.TemporaryDirectory(prefix="minicpmv_up_") as work:
            work = Path(work)
            save_file(run.pack_inputs(data, mask), str(work / "inputs.safetensors"))
            info = self._call(work, {"op": "numeric", "folder": self.folder, "config": tiny, "seed": seed,
                                     "new_tokens": new_tokens})
            weights = self._tensors(work, "weights.safetensors", load_file)
            outputs = self._tensors(work, "outputs.safetensors", load_file)
        return weights, outputs, info

    def _tensors(self, work: Path, name: str, load_file) -> Dict[str, Any]:
        """A safetensors file the upstream side wrote ({} if none), or :class:`UpstreamSideError`."""
        path = work / name
        if not path.is_file():
            return {}
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise UpstreamSideError(f"--upstream-python {self.python}: its {name} is not a readable safetensors file "
                                    f"({' '.join(str(e).split())[:160]})") from None

    def _call(self, work: Path, request: Dict[str, Any]) -> Dict[str, Any]:
        (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
        cmd = [self.python, str(Path(run.__file__).resolve()), str(work / "request.json")]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.log(f"  upstream side ({request['op']}): {' '.join(cmd[:2])} ...")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout, env=env, cwd=str(work))
        except OSError as e:  # not there, not executable, ...
            raise UpstreamSideError(f"--upstream-python {self.python}: cannot run it ({e})") from None
        except subprocess.TimeoutExpired:
            raise UpstreamSideError(f"--upstream-python {self.python}: no answer in {self.timeout:.0f} s") from None
        answer = work / "response.json"
        if not answer.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise UpstreamSideError(f"--upstream-python {self.python} exited {proc.returncode} without an answer: "
                                    + " | ".join(tail))
        return self._answer(answer)

    def _answer(self, answer: Path) -> Dict[str, Any]:
        """The upstream side's response.json, checked: a JSON object whose ``versions``, ``errors``
        and ``shims`` are objects; else (or with ``fatal``) :class:`UpstreamSideError` in one line."""
        who = f"--upstream-python {self.python}"
        if answer.stat().st_size > MAX_RESPONSE_BYTES:
            raise UpstreamSideError(f"{who}: answered with {answer.stat().st_size:,} bytes, above the limit of "
                                    f"{MAX_RESPONSE_BYTES:,}")
        try:
            response = json.loads(answer.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise UpstreamSideError(f"{who}: answered with text that is not JSON ({type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:120]})") from None
        if not isinstance(response, dict):
            raise UpstreamSideError(f"{who}: answered with a {type(response).__name__}, expected a JSON object")
        if "fatal" in response:
            raise UpstreamSideError(f"{who}: upstream side failed: {' '.join(str(response['fatal']).split())[:300]}")
        for key in ("versions", "errors", "shims"):
            if key in response and not isinstance(response[key], dict):
                raise UpstreamSideError(f"{who}: answered with field {key!r} a {type(response[key]).__name__}, "
                                        f"expected an object")
        return response


def _side_note(desc: Dict[str, Any]) -> str:
    v = desc.get("versions", {})
    shims = ", ".join(sorted(desc.get("shims", {}))) or "none"
    return f"transformers {v.get('transformers', '?')}, torch {v.get('torch', '?')}, shims: {shims}"


# --------------------------------------------------------------------------------------
# structural parity
# --------------------------------------------------------------------------------------
def _attributable(fields: Dict[str, Any], base: Dict[str, Dict[str, Any]], level: str, key: str) -> bool:
    """Whether ``key`` is on this side exactly as this side's plain transformers config has it."""
    top, _, rest = key.partition(".")
    ref = base.get("nested", {}) if rest and top in ("vision_config", "slice_config") else base.get(level, {})
    name = rest if rest and top in ("vision_config", "slice_config") else key
    if key in fields:
        return name in ref and ref[name] == fields[key]
    return name not in ref


def compare_config_fields(fork, up, pin: Dict[str, Any], label: str, fork_base=None, up_base=None,
                          level: str = "defaults") -> List[Finding]:
    """Config fields of both sides (flattened dicts, or config objects) -> findings."""
    fork = fork if isinstance(fork, dict) else run.config_fields(fork)
    up = up if isinstance(up, dict) else run.config_fields(up)
    expected = pin.get("expected_config_differences", [])
    out = []
    for k in sorted(set(fork) | set(up)):
        if k in fork and k in up and fork[k] == up[k]:
            continue
        if k not in up:
            status, detail = "fork only", f"fork={fork[k]!r}"
        elif k not in fork:
            status, detail = "upstream only", f"upstream={up[k]!r}"
        else:
            status, detail = "differs", f"fork={fork[k]!r} upstream={up[k]!r}"
        if any(fnmatch.fnmatchcase(k, p) for p in expected):
            out.append(Finding("config", f"{label}:{k}", status + " (documented)", detail))
        elif fork_base and up_base and _attributable(fork, fork_base, level, k) and _attributable(up, up_base, level, k):
            out.append(Finding("config", f"{label}:{k}", status + " (transformers)", detail))
        else:
            out.append(Finding("config", f"{label}:{k}", status, detail, attention=True))
    if not any(f.attention for f in out):
        equal = sum(1 for k in set(fork) & set(up) if fork[k] == up[k])
        drift = sum(1 for f in out if f.status.endswith("(transformers)"))
        documented = sum(1 for f in out if f.status.endswith("(documented)"))
        extra = "".join(f", {n} {what}" for n, what in ((drift, "differ only as transformers' own configs do"),
                                                          (documented, "documented")) if n)
        out.append(Finding("config", label, "ok", f"{equal} fields equal{extra}"))
    return out


def compare_state_dicts(fork_sd: Dict[str, Any], up_sd: Dict[str, Any]) -> List[Finding]:
    def fmt(v):
        return f"shape={tuple(v[0])} dtype={v[1]}"

    out = []
    for k in sorted(set(fork_sd) | set(up_sd)):
        if k not in up_sd:
            out.append(Finding("state_dict", k, "fork only", fmt(fork_sd[k]), attention=True))
        elif k not in fork_sd:
            out.append(Finding("state_dict", k, "upstream only", fmt(up_sd[k]), attention=True))
        elif list(fork_sd[k][0]) != list(up_sd[k][0]) or fork_sd[k][1] != up_sd[k][1]:
            out.append(Finding("state_dict", k, "differs", f"fork {fmt(fork_sd[k])}, upstream {fmt(up_sd[k])}",
                               attention=True))
    if not out:
        out.append(Finding("state_dict", "keys", "ok", f"{len(fork_sd)} keys, shapes and dtypes equal"))
    return out


def structural_parity(fork_dir, runner: UpstreamRunner, config_dict: Dict[str, Any], pin: Dict[str, Any],
                      has_config: bool, log: Log = log_stderr) -> Tuple[List[Finding], Dict[str, Any]]:
    log("  fork and upstream MiniCPMV on the meta device")
    fork = run.describe(fork_dir, config_dict, label="fork", is_upstream=False)
    try:
        up = runner.describe(config_dict)
    except UpstreamSideError as e:
        up = {"errors": {"import": str(e)}}
    findings = [Finding("parity", "upstream side", "info", f"{runner.where()}: {_side_note(up)}")]
    checks = [("config_defaults", "defaults", "defaults", ("import", "config defaults"))]
    if has_config:
        checks.append(("config_from_dict", "from config.json", "from_config", ("import", "config")))
    for key, label, level, stages in checks:
        err = next((f"{side} {s}: {d['errors'][s]}" for side, d in (("fork", fork), ("upstream", up))
                    for s in stages if s in d.get("errors", {})), None)
        if err or key not in fork or key not in up:
            findings.append(Finding("config", label, "error", err or "not produced", attention=True))
            continue
        findings += compare_config_fields(fork[key], up[key], pin, label, fork.get("base"), up.get("base"), level)
    if not has_config:  # said on the defaults row: nothing to compare from a config.json
        for f in findings:
            if f.section == "config" and f.item == "defaults" and f.status == "ok":
                f.detail += " (no config.json upstream: class defaults only; --config FILE)"
    err = next((f"{side} {s}: {d['errors'][s]}" for side, d in (("fork", fork), ("upstream", up))
                for s in ("import", "config", "state_dict") if s in d.get("errors", {})), None)
    if err or "state_dict" not in fork or "state_dict" not in up:
        findings.append(Finding("state_dict", "keys", "error", err or "not produced", attention=True))
    else:
        findings += compare_state_dicts(fork["state_dict"], up["state_dict"])
    return findings, {"fork": {k: fork.get(k) for k in ("versions", "errors", "shims")},
                      "upstream": {k: up.get(k) for k in ("versions", "errors", "shims")}}


# --------------------------------------------------------------------------------------
# numeric parity
# --------------------------------------------------------------------------------------
def fork_numeric(fork_dir, tiny: Dict[str, Any], weights: Dict[str, Any], data, mask, new_tokens: int,
                 fork_attn: Optional[str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The fork on the same tiny config and weights: the outputs :func:`upstream_run.run_numeric` gives."""
    import torch

    errors: Dict[str, str] = {}
    outputs: Dict[str, Any] = {}
    side = load_side(fork_dir, "fork", is_upstream=False)
    try:
        model = build_model(side, build_config(side, tiny, attn_implementation=fork_attn), is_upstream=False)
        res = model.load_state_dict(weights, strict=False)
        if res.missing_keys or res.unexpected_keys:
            errors["setup"] = f"fork missing {list(res.missing_keys)[:5]} unexpected {list(res.unexpected_keys)[:5]}"
            return outputs, errors
        model.eval()
        try:
            with torch.no_grad():
                out = model(copy.deepcopy(data), attention_mask=mask.clone(), output_attentions=True)
            outputs.update({"logits": out.logits, **run.attention_outputs(out, {})})
        except Exception as e:  # noqa: BLE001
            errors["forward"] = f"{type(e).__name__}: {e}"
        try:
            gen = model.generate(**run.generate_kwargs(copy.deepcopy(data), mask.clone(), new_tokens))
            outputs["generated"] = gen.sequences if hasattr(gen, "sequences") else gen
        except Exception as e:  # noqa: BLE001
            errors["generate"] = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001
        errors["setup"] = f"{type(e).__name__}: {e}"
    finally:
        unload_package(side.package)
    return outputs, errors


def _max_diff(pairs) -> Tuple[float, int, int]:
    """(largest |a - b| over the selections, blocks compared, non-finite differences). A NaN or
    inf on either side makes its difference non-finite: counted, never lost in ``max``."""
    import torch

    worst, n, bad = 0.0, 0, 0
    for a, b, sel in pairs:
        d = (a.float() - b.float()).abs()
        d = d[sel.expand(d.shape)] if hasattr(sel, "expand") else d[sel]
        if d.numel():
            finite = torch.isfinite(d)
            bad += int((~finite).sum())
            if bool(finite.any()):
                worst = max(worst, float(d[finite].max()))
        n += 1
    return worst, n, bad


def compare_numeric(fork: Dict[str, Any], up: Dict[str, Any], data, mask, atol: float) -> Dict[str, Finding]:
    """One finding per row of :data:`NUMERIC_ROWS` whose tensors both sides produced."""
    import torch

    real = mask.bool()
    sizes = [(int(h), int(w)) for per in data["tgt_sizes"] for h, w in per.tolist()]
    out: Dict[str, Finding] = {}

    def tensors(prefix):
        keys_f = sorted(k for k in fork if k.startswith(prefix))
        keys_u = sorted(k for k in up if k.startswith(prefix))
        return keys_f, keys_u

    def row(name, prefix, select):
        keys_f, keys_u = tensors(prefix)
        if not keys_f or not keys_u:
            return
        if keys_f != keys_u:
            out[name] = Finding("numeric", name, "differs", f"fork has {len(keys_f)} tensors, upstream {len(keys_u)}",
                                attention=True)
            return
        shapes = [(tuple(fork[k].shape), tuple(up[k].shape)) for k in keys_f]
        bad = [(k, s) for k, s in zip(keys_f, shapes) if s[0] != s[1]]
        if bad:
            out[name] = Finding("numeric", name, "differs", f"{bad[0][0]}: shape fork={bad[0][1][0]} "
                                f"upstream={bad[0][1][1]}", attention=True)
            return
        worst, n, nonfinite = _max_diff((fork[k], up[k], sel) for k in keys_f for sel in select(fork[k]))
        ok = worst <= atol and not nonfinite
        what = (f"{nonfinite} value(s) NaN or inf on one side (or both) at real positions; " if nonfinite else "")
        out[name] = Finding("numeric", name, "ok" if ok else "differs",
                            f"{what}max |fork - upstream| {worst:.2g} (atol {atol:g}) over {n} "
                            f"block{'s' * (n != 1)}, real positions",
                            attention=not ok)

    row("logits", "logits", lambda t: [real[:, :, None]])
    row("llm attention", "attn.llm.", lambda t: [real[:, None, :, None] & real[:, None, None, :]])
    row("vision attention", "attn.vision.",
        lambda t: [(slice(n, n + 1), slice(None), slice(0, h * w), slice(0, h * w)) for n, (h, w) in enumerate(sizes)])
    row("resampler attention", "attn.resampler",
        lambda t: [(slice(n, n + 1), slice(None), slice(None), slice(0, h * w)) for n, (h, w) in enumerate(sizes)])
    if "generated" in fork and "generated" in up:
        f, u = fork["generated"], up["generated"]
        if f.shape == u.shape and torch.equal(f, u):
            out["greedy generation"] = Finding("numeric", "greedy generation", "ok",
                                               f"{f.shape[1]} new tokens x {f.shape[0]} samples equal")
        else:
            where = "shape fork=%s upstream=%s" % (tuple(f.shape), tuple(u.shape))
            if f.shape == u.shape:
                i, t = [int(x) for x in (f != u).nonzero()[0]]
                where = f"sample {i} step {t}: fork {int(f[i, t])}, upstream {int(u[i, t])}"
            out["greedy generation"] = Finding("numeric", "greedy generation", "differs", where, attention=True)
    return out


def numeric_parity(fork_dir, runner: UpstreamRunner, config_dict: Dict[str, Any], atol: float = 1e-4,
                   seed: int = 0, fork_attn: Optional[str] = None, log: Log = log_stderr
                   ) -> Tuple[List[Finding], Dict[str, Any]]:
    tiny = run.tiny_config_dict(config_dict)
    data, mask = run.synthetic_inputs(tiny, seed)
    log("  upstream on the tiny config with random weights")
    try:
        weights, up_out, info = runner.numeric(tiny, data, mask, seed, NEW_TOKENS)
    except UpstreamSideError as e:
        weights, up_out, info = {}, {}, {"errors": {"setup": str(e)}}
    up_err = info.get("errors", {})
    fork_out, fork_err = {}, {}
    if weights:
        log("  the fork on the same weights and inputs")
        fork_out, fork_err = fork_numeric(fork_dir, tiny, weights, data, mask, NEW_TOKENS, fork_attn)
    crash = None
    try:
        rows = compare_numeric(fork_out, up_out, data, mask, atol)
    except Exception as e:  # noqa: BLE001 - e.g. outputs of unexpected layout
        rows, crash = {}, f"comparing the outputs failed: {type(e).__name__}: {e}"
    findings = []
    for name in NUMERIC_ROWS:
        if name in rows:
            findings.append(rows[name])
            continue
        stage = "generate" if name == "greedy generation" else "forward"
        reason = crash or next((f"{side} {s}: {e[s]}" for s in ("setup", stage) for side, e in
                                (("upstream", up_err), ("fork", fork_err)) if s in e), None)
        if reason is None:
            prefix = NUMERIC_PREFIXES[name]
            side = "upstream" if any(k.startswith(prefix) for k in fork_out) else "fork"
            reason = f"{side} produced no {name} tensors"
        findings.append(Finding("numeric", name, "error", reason, attention=True))
    return findings, {"upstream": {k: info.get(k) for k in ("versions", "errors", "shims")}, "fork_errors": fork_err}


# --------------------------------------------------------------------------------------
# both
# --------------------------------------------------------------------------------------
def run_parity(fork_dir, upstream_dir, config_dict: Dict[str, Any], pin: Dict[str, Any], structural: bool = True,
               numeric: bool = False, atol: float = 1e-4, seed: int = 0, fork_attn: Optional[str] = None,
               upstream_python=None, has_config: Optional[bool] = None, log: Log = log_stderr
               ) -> Tuple[List[Finding], Dict[str, Any]]:
    """The structural and/or numeric check; returns (findings, details for report.json)."""
    runner = UpstreamRunner(upstream_dir, upstream_python, log=log)
    has_config = bool(config_dict) if has_config is None else has_config
    findings: List[Finding] = []
    details: Dict[str, Any] = {"upstream_side": runner.where()}
    if structural:
        log("[4/5] structural parity (upstream's code runs: " + runner.where() + ")")
        f, details["structural"] = structural_parity(fork_dir, runner, config_dict, pin, has_config, log)
        findings += f
    else:
        findings.append(Finding("state_dict", "keys", "skipped", "--no-structural"))
    if numeric:
        log("[5/5] numeric parity on random weights")
        f, details["numeric"] = numeric_parity(fork_dir, runner, config_dict, atol, seed, fork_attn, log)
        findings += f
    else:
        findings.append(Finding("numeric", "logits", "skipped", "--numeric: logits, attention, generation"))
    return findings, details
