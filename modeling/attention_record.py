"""An attention record: captured attention tensors plus the layout needed to read them.

A record describes ONE sample (one row of a batch). It holds

* ``tensors``: ``{hook name: tensor}``. Hook names are stable:
  ``llm.layers.{i}.attn`` -> [H', R, C] (heads kept or 1 after a reduction,
  query rows, key columns), ``vision.layers.{i}.attn`` -> [S, H', P, P] (S = this
  sample's slices, P = padded patch count), ``resampler.attn`` -> [S, H', Q, P].
* ``index``: per tensor, how its axes map back to the sequence:
  ``rows`` (LLM positions of the query rows, or ``None`` for all), ``cols`` (LLM
  key positions, or ``None`` for all), ``heads`` (kept head ids, or ``None`` for
  all), ``reduce`` (``"none"``, ``"mean"``, ``"max"``).
* ``layout``: a :class:`TokenLayout` (token strings, roles, image bounds, per image
  its slices with patch grids and boxes in original pixel coordinates).

Records save to ``<stem>.safetensors`` + ``<stem>.json`` (both written atomically)
and load back identical.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

ROLES = ("text", "image", "special")
RECORD_FORMAT = "minicpmv-attn.record/1"


@dataclass
class SliceLayout:
    """One vision slice of one image: the overview ("source") image or a grid cell."""

    image: int  # image index within the sample
    index: int  # 0 = source image, then grid cells row by row
    kind: str  # "source" | "slice"
    tgt_size: Tuple[int, int]  # patch rows, patch cols
    box: Tuple[float, float, float, float]  # x0, y0, x1, y1 in original image pixels
    token_span: Tuple[int, int]  # [start, end) LLM positions of its query tokens
    grid_pos: Optional[Tuple[int, int]] = None  # (row, col) in the slice grid; None for source


@dataclass
class ImageLayout:
    index: int
    size: Tuple[int, int]  # width, height of the original image
    grid: Optional[Tuple[int, int]]  # (cols, rows) of the slice grid, None if unsliced
    slices: List[SliceLayout] = field(default_factory=list)


@dataclass
class TokenLayout:
    input_ids: List[int]
    tokens: List[str]
    roles: List[str]  # per position: "text" | "image" | "special"
    image_bound: List[Tuple[int, int]]
    images: List[ImageLayout] = field(default_factory=list)
    n_prompt: int = 0  # positions >= n_prompt are generated tokens
    padding: int = 0  # left padding positions (role "special", token "<pad>")

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
        images = []
        for im in d.get("images", []):
            slices = [
                SliceLayout(
                    image=s["image"], index=s["index"], kind=s["kind"],
                    tgt_size=tuple(s["tgt_size"]), box=tuple(s["box"]),
                    token_span=tuple(s["token_span"]),
                    grid_pos=tuple(s["grid_pos"]) if s.get("grid_pos") is not None else None,
                )
                for s in im["slices"]
            ]
            images.append(ImageLayout(index=im["index"], size=tuple(im["size"]),
                                      grid=tuple(im["grid"]) if im.get("grid") else None,
                                      slices=slices))
        return cls(
            input_ids=list(d["input_ids"]), tokens=list(d["tokens"]), roles=list(d["roles"]),
            image_bound=[tuple(b) for b in d["image_bound"]], images=images,
            n_prompt=d.get("n_prompt", 0), padding=d.get("padding", 0),
        )


def _atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    _atomic_write_bytes(path, text.encode("utf-8"))


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
        def key(n):
            parts = n.split(".")
            return (parts[0], int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1)
        names = sorted(self.tensors, key=key)
        return [n for n in names if stage is None or n.split(".")[0] == stage]

    def llm_layers(self) -> List[int]:
        return [int(n.split(".")[2]) for n in self.names("llm")]

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
        _atomic_write_bytes(stem + ".safetensors", st_save(tensors) if tensors else st_save({}))
        atomic_write_text(stem + ".json", json.dumps(payload, indent=1))
        return stem + ".safetensors", stem + ".json"

    @classmethod
    def load(cls, path: str) -> "AttentionRecord":
        from safetensors.torch import load_file

        stem = _stem(path)
        for p in (stem + ".json", stem + ".safetensors"):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"attention record: missing file {p}")
        with open(stem + ".json", encoding="utf-8") as f:
            try:
                payload = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"attention record: {stem}.json is not valid JSON ({e})") from None
        if payload.get("format") != RECORD_FORMAT:
            raise ValueError(
                f"attention record: {stem}.json has format {payload.get('format')!r}, expected {RECORD_FORMAT!r}"
            )
        tensors = load_file(stem + ".safetensors")
        layout = TokenLayout.from_dict(payload["layout"]) if payload.get("layout") else None
        return cls(tensors=dict(tensors), index=payload["index"], layout=layout, meta=payload.get("meta", {}))

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
