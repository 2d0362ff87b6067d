"""An attention record: captured attention tensors plus the layout needed to read them.

A record describes ONE sample (one row of a batch). It holds

* ``tensors``: ``{hook name: tensor}``. Hook names are stable:
  ``llm.layers.{i}.attn`` -> [H', R, C] (heads kept or 1 after a reduction,
  query rows, key columns), ``vision.layers.{i}.attn`` -> [S, H', P, P] (S = this
  sample's slices, P = the patch count of its largest slice; smaller slices are zero
  past their own), ``resampler.attn`` -> [S, H', Q, P]; a sample without images has none.
* ``index``: per tensor, how its axes map back to the sequence:
  ``rows`` (LLM positions of the query rows, or ``None`` for all), ``cols`` (LLM
  key positions, or ``None`` for all), ``heads`` (kept head ids, or ``None`` for
  all), ``reduce`` (``"none"``, ``"mean"``, ``"max"``).
* ``layout``: a :class:`TokenLayout` (token strings, roles, image bounds, per image
  its slices with patch grids and boxes in original pixel coordinates).

A record does not depend on the batch it was captured in (:func:`records_from_capture`):
positions count from the sample's first real token, as when it runs alone, and the batch's
padding (left padding, an ended answer's padding, padded patches) is cut.

Records save to ``<stem>.safetensors`` + ``<stem>.json`` (both written atomically)
and load back identical.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .capture import (ROLES, STAGES, hook_sort_key, left_padding, pad_llm_columns, parse_hook_name, special_token_ids,
                      token_roles)
from .layout import ImageLayout, SliceLayout
RECORD_FORMAT = "minicpmv-attn.record/1"


@dataclass
class TokenLayout:
    input_ids: List[int]
    tokens: List[str]
    roles: List[str]  # per position: "text" | "image" | "special"
    image_bound: List[Tuple[int, int]]
    images: List[ImageLayout] = field(default_factory=list)
    n_prompt: int = 0  # positions >= n_prompt are generated tokens
    padding: int = 0  # left padding positions (role "special", token "<pad>"); 0 in records made
    # by records_from_capture (they cut it), kept for records and layouts made otherwise

    def __post_init__(self):
        n = len(self.input_ids)
        if len(self.tokens) != n or len(self.roles) != n:
            raise ValueError(
                f"TokenLayout: input_ids, tokens and roles must have one entry per position; "
                f"got {n}, {len(self.tokens)}, {len(self.roles)}"
            )
        bad = sorted({r for r in self.roles if r not in ROLES})
        if bad:
            raise ValueError(f"TokenLayout: unknown roles {bad}; expected one of {ROLES}")

    @property
    def slices(self) -> List[SliceLayout]:
        """All slices of the sample in model order (image by image, source first)."""
        return [s for im in self.images for s in im.slices]

    def positions(self, role: str) -> List[int]:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        return [i for i, r in enumerate(self.roles) if r == role]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TokenLayout":
        images = [ImageLayout.from_dict(im) for im in d.get("images", [])]
        return cls(
            input_ids=list(d["input_ids"]), tokens=list(d["tokens"]), roles=list(d["roles"]),
            image_bound=[tuple(b) for b in d["image_bound"]], images=images,
            n_prompt=d.get("n_prompt", 0), padding=d.get("padding", 0),
        )


@contextlib.contextmanager
def atomic_writer(path: str):
    """Open a temporary file beside ``path`` for binary writing; on leaving the block it is
    flushed, synced, given the usual permissions (0666 less the umask) and renamed over
    ``path``. An exception removes it and leaves ``path`` as it was: readers see the old file
    or the new one, never half of one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename.

    Readers see the old file or the new one, never half of one; the file gets the
    usual permissions (0666 less the umask).
    """
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class RecordError(ValueError):
    """An attention record that is damaged or does not agree with itself (names the file and field)."""


def _stem(path: str) -> str:
    for ext in (".safetensors", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


@dataclass
class AttentionRecord:
    """Captured attention of one sample, with the layout to read it (see module doc)."""

    tensors: Dict[str, torch.Tensor]
    index: Dict[str, Dict[str, Any]]
    layout: Optional[TokenLayout] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"no captured tensor {name!r}; this record has {sorted(self.tensors)}") from None

    def names(self, stage: Optional[str] = None) -> List[str]:
        """Hook names in natural order (layers numerically), optionally of one stage."""
        names = sorted(self.tensors, key=hook_sort_key)
        return [n for n in names if stage is None or parse_hook_name(n)[0] == stage]

    def layers(self, stage: str = "llm") -> List[int]:
        """The captured layer ids of ``stage``."""
        return [parse_hook_name(n)[1] for n in self.names(stage)]

    def llm_layers(self) -> List[int]:
        return self.layers("llm")

    def __repr__(self) -> str:
        """One line: each stage's layers and a tensor shape, the tokens and images; never the values."""
        parts = []
        for stage in STAGES:
            names = self.names(stage)
            if names:
                t = self.tensors[names[0]]
                dtype = str(t.dtype).replace("torch.", "")
                ids = self.layers(stage)
                span = (f"layers {ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2
                        else f"layers {ids}") if stage != "resampler" else "1 map"
                parts.append(f"{stage}: {span} {list(t.shape)} {dtype}")
        lay = self.layout
        if lay is not None:
            roles = {r: lay.roles.count(r) for r in ROLES}
            parts.append(f"{len(lay.tokens)} tokens ({lay.n_prompt} prompt, "
                         + ", ".join(f"{n} {r}" for r, n in roles.items() if n) + f"), {len(lay.images)} image(s)")
        return f"AttentionRecord({'; '.join(parts) or 'empty'})"

    # -- persistence -------------------------------------------------------------------
    def save(self, path: str) -> Tuple[str, str]:
        """Save to ``<stem>.safetensors`` and ``<stem>.json``; returns both paths."""
        from safetensors.torch import save as st_save

        stem = _stem(path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        payload = {
            "format": RECORD_FORMAT,
            "index": self.index,
            "layout": self.layout.to_dict() if self.layout is not None else None,
            "meta": self.meta,
            "dtypes": {k: str(v.dtype) for k, v in tensors.items()},
        }
        atomic_write_bytes(stem + ".safetensors", st_save(tensors) if tensors else st_save({}))
        atomic_write_text(stem + ".json", json.dumps(payload, indent=1))
        return stem + ".safetensors", stem + ".json"

    @classmethod
    def load(cls, path: str) -> "AttentionRecord":
        """Load ``<stem>.json`` + ``<stem>.safetensors`` and validate them (:meth:`validate`):
        a damaged or hand-edited record is refused with one line naming the file and field."""
        from safetensors.torch import load_file

        stem = _stem(path)
        for p in (stem + ".json", stem + ".safetensors"):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"attention record: missing file {p}")
        try:
            with open(stem + ".json", encoding="utf-8") as f:
                payload = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise RecordError(f"attention record: {stem}.json is not valid JSON ({type(e).__name__}: "
                              f"{str(e)[:120]})") from None
        if not isinstance(payload, dict) or payload.get("format") != RECORD_FORMAT:
            got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise RecordError(f"attention record: {stem}.json has format {got!r}, expected {RECORD_FORMAT!r}")
        for key, kind in (("index", dict), ("meta", dict)):
            if not isinstance(payload.get(key, {}), kind):
                raise RecordError(f"attention record: {stem}.json field {key!r} must be an object, got "
                                  f"{type(payload.get(key)).__name__}")
        try:
            tensors = load_file(stem + ".safetensors")
        except Exception as e:  # safetensors raises its own error types
            raise RecordError(f"attention record: {stem}.safetensors is not readable ({str(e)[:120]})") from None
        if payload.get("layout"):
            problem = layout_problem(payload["layout"])
            if problem:
                raise RecordError(f"attention record: {stem}.json field 'layout' is malformed: {problem}")
        try:
            layout = TokenLayout.from_dict(payload["layout"]) if payload.get("layout") else None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise RecordError(f"attention record: {stem}.json field 'layout' is malformed "
                              f"({type(e).__name__}: {str(e)[:120]})") from None
        record = cls(tensors=dict(tensors), index=payload.get("index", {}), layout=layout,
                     meta=payload.get("meta", {}))
        record.validate(f"{stem}.safetensors")
        return record

    def validate(self, where: str = "attention record") -> None:
        """Check tensors against the index and layout: hook names, one index entry per tensor,
        floating dtypes, finite probabilities in [0, 1], ranks, head / row / column / slice
        counts that agree with the index and the layout, row and column positions inside the
        layout's sequence, and rows that are distributions (sum 1 over all keys; at most 1 over
        a subset of key columns such as ``cols="image"``, which cannot say more). Raises
        :class:`RecordError`."""
        names = set(self.tensors)
        if set(self.index) != names:
            raise RecordError(f"{where}: index entries {sorted(set(self.index) - names)} have no tensor and tensors "
                              f"{sorted(names - set(self.index))} have no index entry")
        n_slices = len(self.layout.slices) if self.layout is not None and self.layout.images else None
        first_vision = None
        def order(n):
            try:
                return hook_sort_key(n)
            except ValueError:
                return (len(STAGES), 0)

        for name in sorted(self.tensors, key=order):
            t = self.tensors[name]
            try:
                stage, _ = parse_hook_name(name)
            except ValueError as e:
                raise RecordError(f"{where}: {e}") from None
            info = self.index[name]
            if not isinstance(info, dict):
                raise RecordError(f"{where}: index[{name!r}] must be an object, got {type(info).__name__}")
            if not t.is_floating_point():
                raise RecordError(f"{where}: {name} has dtype {t.dtype}; attention probabilities are floating")
            want_rank = 3 if stage == "llm" else 4
            if t.dim() != want_rank:
                raise RecordError(f"{where}: {name} has shape {list(t.shape)}; expected {want_rank} dimensions")
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise RecordError(f"{where}: {name} holds NaN or infinite values")
            if t.numel() and (float(t.min()) < -1e-3 or float(t.max()) > 1 + 1e-3):
                raise RecordError(f"{where}: {name} holds values outside [0, 1] ({float(t.min()):.3g} .. "
                                  f"{float(t.max()):.3g}); not attention probabilities")
            heads, reduce = info.get("heads"), info.get("reduce", "none")
            h_axis = 0 if stage == "llm" else 1
            if reduce not in ("none", "mean", "max"):
                raise RecordError(f"{where}: index[{name!r}]['reduce'] is {reduce!r}, expected none/mean/max")
            if reduce != "none" and t.shape[h_axis] != 1:
                raise RecordError(f"{where}: {name} is head-reduced ({reduce}) but has {t.shape[h_axis]} heads")
            if reduce == "none" and heads is not None and (not isinstance(heads, list) or len(heads) != t.shape[h_axis]):
                raise RecordError(f"{where}: {name} has {t.shape[h_axis]} heads but index lists heads {heads!r}")
            if stage == "llm":
                rows, cols = info.get("rows"), info.get("cols")
                if rows is not None and (not isinstance(rows, list) or len(rows) != t.shape[1]):
                    raise RecordError(f"{where}: {name} has {t.shape[1]} rows but index lists "
                                      f"{len(rows) if isinstance(rows, list) else rows!r}")
                if cols is not None and (not isinstance(cols, list) or len(cols) > t.shape[2]):
                    raise RecordError(f"{where}: {name} has {t.shape[2]} columns but index lists "
                                      f"{len(cols) if isinstance(cols, list) else cols!r}")
                if self.layout is not None and cols is None and t.shape[2] > len(self.layout.tokens):
                    raise RecordError(f"{where}: {name} has {t.shape[2]} columns but the layout has "
                                      f"{len(self.layout.tokens)} tokens")
                n_pos = len(self.layout.tokens) if self.layout is not None else (t.shape[2] if cols is None else None)
                _check_positions(where, name, "rows", rows, n_pos)
                _check_positions(where, name, "cols", cols, n_pos)
                padding = int(self.layout.padding) if self.layout is not None else 0
                real = [i for i, p in enumerate(rows if rows is not None else range(t.shape[1])) if p >= padding]
                _check_distributions(where, name, t, reduce, cols is not None, real)
            else:
                if n_slices is not None and t.shape[0] != n_slices:
                    raise RecordError(f"{where}: {name} holds {t.shape[0]} slices but the layout has {n_slices}")
                if first_vision is not None and t.shape[0] != first_vision[1]:
                    raise RecordError(f"{where}: {name} holds {t.shape[0]} slices but {first_vision[0]} holds "
                                      f"{first_vision[1]}")
                first_vision = first_vision or (name, t.shape[0])
                for i in range(t.shape[0]):  # rows past a slice's real patches are padding (zero)
                    real = None if stage == "vision" else list(range(t.shape[2]))
                    if stage == "vision" and n_slices:
                        h, w = self.layout.slices[i].tgt_size
                        real = list(range(min(t.shape[2], int(h) * int(w))))
                    _check_distributions(where, f"{name} slice {i}", t[i], reduce, False, real)

    def equals(self, other: "AttentionRecord") -> bool:
        if set(self.tensors) != set(other.tensors):
            return False
        for k, v in self.tensors.items():
            o = other.tensors[k]
            if v.dtype != o.dtype or v.shape != o.shape or not torch.equal(v.cpu(), o.cpu()):
                return False
        return (
            json.loads(json.dumps(self.index)) == json.loads(json.dumps(other.index))
            and (self.layout.to_dict() if self.layout else None) == (other.layout.to_dict() if other.layout else None)
            and json.loads(json.dumps(self.meta)) == json.loads(json.dumps(other.meta))
        )


# --------------------------------------------------------------------------------------
# a saved token layout, checked before it is read (hand-edited records)
# --------------------------------------------------------------------------------------
MAX_LAYOUT_PIXELS = 1 << 20  # an image side or a slice's patch rows/cols: far above any real one


def _got(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _span_problem(v: Any, n: int) -> bool:
    return not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x, 0, n) for x in v) and v[0] <= v[1])


def _slice_problem(sl: Any, at: str, n: int) -> Optional[str]:
    if not isinstance(sl, dict):
        return f"{at}: expected an object, got {_got(sl)}"
    tgt, box, span = sl.get("tgt_size"), sl.get("box"), sl.get("token_span")
    if not (isinstance(tgt, (list, tuple)) and len(tgt) == 2 and all(_is_int(x, 1, MAX_LAYOUT_PIXELS) for x in tgt)):
        return f"{at}.tgt_size: expected [rows, cols] of positive integers, got {_got(tgt)}"
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in box)
            and box[0] < box[2] and box[1] < box[3]):
        return f"{at}.box: expected 4 finite numbers x0 < x1, y0 < y1, got {_got(box)}"
    if span is not None and _span_problem(span, n):
        return f"{at}.token_span: expected [start, end) within the {n} positions, got {_got(span)}"
    for key in ("index", "image"):
        if key in sl and not _is_int(sl[key], 0, MAX_LAYOUT_PIXELS):
            return f"{at}.{key}: expected a non-negative integer, got {_got(sl[key])}"
    return None


def layout_problem(d: Any) -> Optional[str]:
    """What is wrong with a saved layout (``"layout.<field>: expected ..., got ..."``), or None.

    Types and ranges the readers rely on: integer ids, string tokens, ``0 <= padding <= n_prompt
    <= positions``, image bounds and token spans inside the sequence, positive image sizes and
    patch grids, finite slice boxes. Checked on the JSON before it is turned into a layout."""
    if not isinstance(d, dict):
        return f"layout: expected an object, got {_got(d)}"
    ids, tokens = d.get("input_ids"), d.get("tokens")
    for key, value in (("input_ids", ids), ("tokens", tokens), ("roles", d.get("roles")),
                       ("image_bound", d.get("image_bound")), ("images", d.get("images", []))):
        if not isinstance(value, list):
            return f"layout.{key}: expected a list, got {_got(value)}"
    n = len(ids)
    bad = next((i for i, v in enumerate(ids) if not _is_int(v, 0, 2 ** 63 - 1)), None)
    if bad is not None:
        return f"layout.input_ids[{bad}]: expected an integer token id, got {_got(ids[bad])}"
    bad = next((i for i, v in enumerate(tokens) if not isinstance(v, str)), None)
    if bad is not None:
        return f"layout.tokens[{bad}]: expected a string, got {_got(tokens[bad])}"
    n_prompt, padding = d.get("n_prompt", 0), d.get("padding", 0)
    if not _is_int(n_prompt, 1 if n else 0, n):
        return f"layout.n_prompt: expected an integer from {1 if n else 0} to {n} (the positions), got {_got(n_prompt)}"
    if not _is_int(padding, 0, n_prompt):
        return f"layout.padding: expected an integer from 0 to {n_prompt} (n_prompt), got {_got(padding)}"
    for i, b in enumerate(d["image_bound"]):
        if _span_problem(b, n):
            return f"layout.image_bound[{i}]: expected [start, end) with 0 <= start <= end <= {n}, got {_got(b)}"
    for i, im in enumerate(d["images"]):
        at = f"layout.images[{i}]"
        if not isinstance(im, dict):
            return f"{at}: expected an object, got {_got(im)}"
        size, grid, slices = im.get("size"), im.get("grid"), im.get("slices", [])
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(x, 1, MAX_LAYOUT_PIXELS)
                                                                            for x in size)):
            return f"{at}.size: expected [width, height] of positive integers, got {_got(size)}"
        if grid and not (isinstance(grid, (list, tuple)) and len(grid) == 2 and all(_is_int(x, 1, 1 << 10)
                                                                                   for x in grid)):
            return f"{at}.grid: expected [cols, rows] of positive integers or null, got {_got(grid)}"
        if not isinstance(slices, list):
            return f"{at}.slices: expected a list, got {_got(slices)}"
        for j, sl in enumerate(slices):
            problem = _slice_problem(sl, f"{at}.slices[{j}]", n)
            if problem:
                return problem
    return None


def _check_positions(where: str, name: str, what: str, positions, n_pos: Optional[int]) -> None:
    """The index's row / column positions: distinct integers in [0, n_pos) (the layout's length)."""
    if positions is None:
        return
    bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, int) or p < 0
           or (n_pos is not None and p >= n_pos)]
    if bad:
        span = f"0..{n_pos - 1}" if n_pos is not None else "non-negative integers"
        raise RecordError(f"{where}: index[{name!r}][{what!r}] holds {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                          f"expected positions {span} of the record's sequence")
    if len(set(positions)) != len(positions):
        raise RecordError(f"{where}: index[{name!r}][{what!r}] lists a position twice")


def _check_distributions(where: str, name: str, t: torch.Tensor, reduce: str, subset: bool,
                         real_rows: Optional[Sequence[int]]) -> None:
    """Each softmax row of ``t`` ([heads, rows, keys]) sums to 1 over its keys (within the stored
    dtype's rounding): exactly so for the ``real_rows`` (padding rows may be zero; None: not known,
    so any row may be zero but not all) when every key
    column was kept, at most 1 when ``subset`` (a selection of columns); for ``reduce="max"``
    (the heads' maximum) at least 1 and at most the head count. Never all-ones or all-zero rows."""
    if not t.numel():
        return
    tol = max(1e-3, 2 * torch.finfo(t.dtype).eps)
    sums = t.detach().double().sum(-1)  # [heads, rows]
    if reduce != "max" and float(sums.max()) > 1 + tol:
        raise RecordError(f"{where}: {name} has rows summing to {float(sums.max()):.4g} over its keys; attention "
                          f"rows are distributions (sum 1)")
    if subset:
        return
    if real_rows is None:  # which rows are padding is unknown: zero rows may be padding, but not every row
        ok = (sums - 1).abs() <= tol if reduce != "max" else sums >= 1 - tol
        zero = sums <= tol
        if not bool((ok | zero).all()) or not bool(ok.any()):
            odd = ~(ok | zero)
            bad = sums[odd][0] if bool(odd.any()) else sums.flatten()[0]
            raise RecordError(f"{where}: {name} has query rows summing to {float(bad):.4g} over all its keys; "
                              f"attention rows are distributions (sum 1; padding rows 0)")
        return
    if not len(real_rows):
        return
    real = sums[:, torch.as_tensor(list(real_rows), dtype=torch.long)]
    low = float(real.min())
    if reduce == "max":
        if low < 1 - tol:
            raise RecordError(f"{where}: {name} (head max) has rows summing to {low:.4g}; the heads' maximum of "
                              f"distributions sums to at least 1")
    elif low < 1 - tol:
        raise RecordError(f"{where}: {name} has query rows summing to {low:.4g} over all its keys; attention rows "
                          f"are distributions (sum 1)")


def layout_for_sample(ids: Sequence[int], tokens: Sequence[str], n_prompt: int, padding: int,
                      image_bound: Sequence[Sequence[int]], images: Sequence[Any], special_ids=(),
                      valid: Optional[Sequence[bool]] = None) -> TokenLayout:
    """TokenLayout of one sample; ``images`` = the processor's slice layouts of its images."""
    bounds = [(int(a), int(b)) for a, b in image_bound]
    ok = torch.ones(len(ids), dtype=torch.bool) if valid is None else torch.tensor(list(valid), dtype=torch.bool)
    ok[:padding] = False
    codes = token_roles(torch.tensor([list(ids)], dtype=torch.long), [bounds], ok[None], set(special_ids))[0]
    roles = [ROLES[c] for c in codes.tolist()]
    layouts, k = [], 0
    for i, im in enumerate(images or []):
        if not isinstance(im, ImageLayout):  # a dict, or a copy of the class from another remote-code module
            im = ImageLayout.from_dict(im if isinstance(im, dict) else im.to_dict())
        slices = []
        for j, sl in enumerate(im.slices):
            if k >= len(bounds):
                raise ValueError(f"image {i} slice {j}: no image_bound row left for it ({len(bounds)} rows)")
            slices.append(replace(sl, image=i, index=j, token_span=bounds[k]))
            k += 1
        layouts.append(replace(im, index=i, slices=slices))
    return TokenLayout(input_ids=[int(t) for t in ids], tokens=list(tokens), roles=roles, image_bound=bounds,
                       images=layouts, n_prompt=int(n_prompt), padding=int(padding))


def answer_lengths(new_ids, eos_ids=None) -> List[int]:
    """New tokens per sample that belong to its answer (``new_ids`` [B, n_new]).

    ``generate`` pads an answer that ended before the batch's with ``pad_token_id`` (0). With
    ``eos_ids`` (the terminator ids) an answer runs through its first terminator (all of it when
    there is none); without them it runs through its last non-zero token."""
    new_ids = torch.as_tensor(new_ids).detach().cpu()
    out = []
    for row in new_ids.tolist():
        if eos_ids:
            ends = [i for i, t in enumerate(row) if t in set(eos_ids)]
            out.append(ends[0] + 1 if ends else len(row))
        else:
            nonzero = [i for i, t in enumerate(row) if t != 0]
            out.append(nonzero[-1] + 1 if nonzero else 0)
    return out


def _sample_llm(t: torch.Tensor, info: Dict[str, Any], pad: int, length: int, fed: int, wanted=None):
    """One sample's LLM map [H', R, C] (its row of the batch tensor) in its own positions.

    Rows and listed columns keep the positions ``pad .. pad + fed - 1`` (rows: only those in
    ``wanted``, the sample's own when rows were chosen per sample) and are re-based by ``-pad``;
    full-width columns keep ``pad .. pad + length - 1`` (the sample's tokens)."""
    rows, cols = info.get("rows"), info.get("cols")
    pos = range(t.shape[1]) if rows is None else rows
    wanted = None if wanted is None else set(wanted)
    keep_rows = [i for i, p in enumerate(pos) if pad <= p < pad + fed and (wanted is None or p in wanted)]
    if len(keep_rows) != t.shape[1]:
        t = t[:, keep_rows]
    if rows is not None:
        info["rows"] = [int(pos[i]) - pad for i in keep_rows]
    if cols is None:
        return t[:, :, pad:pad + length]
    keep_cols = [j for j, c in enumerate(cols) if pad <= c < pad + fed]
    info["cols"] = [int(cols[j]) - pad for j in keep_cols]
    return t[:, :, keep_cols]


def _sample_patches(name: str, t: torch.Tensor, patches: int) -> torch.Tensor:
    """One sample's vision [S, H', P, P] / resampler [S, H', Q, P] slices cut to ``patches`` (its
    largest slice's real patch count), as a batch of its slices alone would give. What is cut
    is padding, which the capture leaves at exactly 0; anything else there is an error."""
    if parse_hook_name(name)[0] == "vision":
        kept = t[..., :patches, :patches]
        rest = (t[..., patches:, :], t[..., :patches, patches:])
    else:
        kept, rest = t[..., :patches], (t[..., patches:],)
    if any(r.numel() and bool(r.ne(0).any()) for r in rest):
        raise RuntimeError(f"{name}: padded patches past the sample's {patches} real ones hold non-zero "
                           f"attention; the capture's patch mask was not applied")
    return kept


def records_from_capture(tensors: Dict[str, torch.Tensor], index: Dict[str, Dict[str, Any]], prompt_ids,
                         new_ids=None, attention_mask=None, image_bound=None, tgt_sizes=None, slice_layouts=None,
                         tokenizer=None, meta=None, eos_ids=None) -> List[AttentionRecord]:
    """Split a batch capture into one :class:`AttentionRecord` per sample, with its layout.

    A sample's record is the one a batch of that sample alone gives (same names, shapes, index
    and layout): the batch's padding is dropped. Its positions count from its first real token
    (the left padding of ``attention_mask`` is cut from the layout, the LLM rows and key columns,
    and ``rows`` / ``cols`` / ``image_bound`` are re-based); an answer that ended before the
    batch's keeps only its own tokens (``answer_lengths`` with ``eos_ids``), with no row or
    listed column for its last token (never fed alone); vision and resampler tensors hold only
    its slices, cut to its largest slice's real patches; a sample without images has none.
    This works on the output of ``generate`` with a spec (``captured``, ``capture_index``,
    ``sequences``) as on ``chat``'s. ``meta``: a dict for every record, or one per sample.
    """
    prompt_ids = prompt_ids.detach().cpu()
    B, n_prompt = prompt_ids.shape
    new_ids = torch.zeros((B, 0), dtype=prompt_ids.dtype) if new_ids is None else new_ids.detach().cpu()
    full = torch.cat([prompt_ids, new_ids.to(prompt_ids.dtype)], 1)
    pads = left_padding(torch.ones_like(prompt_ids) if attention_mask is None else attention_mask)
    answers = answer_lengths(new_ids, eos_ids)
    special = special_token_ids(tokenizer)
    sizes = [[(int(h), int(w)) for h, w in (t.tolist() if isinstance(t, torch.Tensor) else t)] if t is not None else []
             for t in (tgt_sizes or [[]] * B)]
    records, offset = [], 0
    for b in range(B):
        pad, n_answer = pads[b], answers[b]
        ids = full[b, pad:n_prompt + n_answer].tolist()
        length = len(ids)
        # rows and listed columns: the positions fed; an answer that ended early had its last
        # token fed only because the batch went on
        fed = length - 1 if n_answer < new_ids.shape[1] else length
        tokens = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [str(t) for t in ids]
        tokens = [t if t is not None else "" for t in tokens]
        bound = image_bound[b] if image_bound is not None else []
        bound = bound.tolist() if isinstance(bound, torch.Tensor) else bound
        bound = [(int(a) - pad, int(e) - pad) for a, e in bound]
        layout = layout_for_sample(ids, tokens, n_prompt - pad, 0, bound,
                                   (slice_layouts[b] if slice_layouts is not None else []), special)
        n_slices = len(sizes[b])
        patches = max((h * w for h, w in sizes[b]), default=0)
        rec_tensors, rec_index = {}, {}
        for name, t in tensors.items():
            info = dict(index.get(name, {}))
            if parse_hook_name(name)[0] == "llm":
                if info.get("cols") is not None:
                    info["cols"] = info["cols"][b]
                wanted = info.pop("sample_rows", None)
                rec_tensors[name] = _sample_llm(t[b], info, pad, length, fed, None if wanted is None else wanted[b])
            elif n_slices:
                rec_tensors[name] = _sample_patches(name, t[offset:offset + n_slices], patches)
            else:
                continue  # no image: no vision or resampler map, as when it runs alone
            rec_index[name] = info
        offset += n_slices
        records.append(AttentionRecord(tensors=rec_tensors, index=rec_index, layout=layout,
                                       meta=dict((meta[b] if isinstance(meta, list) else meta) or {}, sample=b)))
    return records


MODEL_INPUT_KEYS = ("input_ids", "pixel_values", "tgt_sizes", "image_bound", "attention_mask")


def replay_capture(model, model_inputs: Dict[str, Any], new_ids: torch.Tensor, spec, tokenizer):
    """``(tensors, index)`` captured by one forward pass over prompt + answer (after beam search).

    The last new token is never fed during generation, so it is not replayed either: rows
    and columns come out as ``generate``'s online capture lays them out.
    """
    prompt = model_inputs["input_ids"]
    new_ids = new_ids.to(prompt.device)  # the prompt's device: model.device can be an offload placeholder
    n_prompt, n_new = prompt.shape[1], new_ids.shape[1]
    prompt_mask = model_inputs.get("attention_mask")
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt)
    fed = new_ids[:, :-1]
    ids = torch.cat([prompt, fed], 1)
    answers = torch.tensor(answer_lengths(new_ids, model._terminator_ids(tokenizer)), device=fed.device)
    in_answer = torch.arange(fed.shape[1], device=fed.device)[None] < answers[:, None]  # not generate's padding
    mask = torch.cat([prompt_mask.to(fed.dtype), in_answer.to(fed.dtype)], 1)
    data = {"input_ids": ids, "pixel_values": model_inputs.get("pixel_values"),
            "tgt_sizes": model_inputs.get("tgt_sizes"), "image_bound": model_inputs.get("image_bound"),
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions=spec, special_token_ids=special_token_ids(tokenizer),
                    prompt_length=n_prompt)
    return pad_llm_columns(out.captured, out.capture_index, n_prompt + n_new), out.capture_index


def chat_records(model, result, spec, replay: bool, inputs, prompts: Sequence[str], tokenizer):
    """``(answers, records)`` of one ``chat`` call, one :class:`AttentionRecord` per conversation:
    from ``generate``'s online capture, or (beam search) by replaying the chosen answers."""
    model_inputs = {k: inputs[k] for k in MODEL_INPUT_KEYS if k in inputs}
    if replay:
        sequences = result.sequences if hasattr(result, "sequences") else result
        texts = model._decode_text(sequences, tokenizer)
        tensors, index = replay_capture(model, model_inputs, sequences, spec, tokenizer)
    else:
        texts, sequences, tensors, index = result.text, result.sequences, result.captured, result.capture_index
    records = records_from_capture(
        tensors, index, prompt_ids=model_inputs["input_ids"], new_ids=sequences,
        attention_mask=model_inputs.get("attention_mask"), image_bound=model_inputs.get("image_bound"),
        tgt_sizes=model_inputs.get("tgt_sizes"), slice_layouts=inputs.get("slice_layouts"), tokenizer=tokenizer,
        eos_ids=model._terminator_ids(tokenizer),
        meta=[{"prompt": p, "answer": a, "spec": spec.describe(), "replayed": replay,
               "model": str(getattr(model.config, "_name_or_path", ""))} for p, a in zip(prompts, texts)])
    return texts, records
