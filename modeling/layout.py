"""How an image becomes vision slices: the one slice-layout type of the fork.

The image processor fills in the geometry (each slice's patch grid, resized pixel size and
box in the original image); an attention record adds where each slice's query tokens sit
in the LLM sequence (``token_span``) and which image of the sample it belongs to.
Nothing here imports anything but the standard library and numpy.
"""
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np


@dataclass
class SliceLayout:
    """One vision slice of one image: the overview ("source") image or a grid cell.

    ``box`` is the region of the *original* image it shows, in original pixel coordinates
    (x0, y0, x1, y1; floats, x1/y1 exclusive). ``tgt_size`` = (patch rows, patch cols);
    ``pixel_size`` = (width, height) the region is resized to.
    """

    index: int  # 0 = source image, then grid cells row by row
    kind: str  # "source" | "slice"
    tgt_size: Tuple[int, int]
    box: Tuple[float, float, float, float]
    grid_pos: Optional[Tuple[int, int]] = None  # (row, col) in the slice grid; None for the source
    pixel_size: Optional[Tuple[int, int]] = None
    image: int = 0  # image index within the sample
    token_span: Optional[Tuple[int, int]] = None  # [start, end) LLM positions of its query tokens

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SliceLayout":
        def pair(v):
            return tuple(v) if v is not None else None

        return cls(index=int(d["index"]), kind=d.get("kind", "source" if int(d["index"]) == 0 else "slice"),
                   tgt_size=tuple(int(x) for x in d["tgt_size"]), box=tuple(float(x) for x in d["box"]),
                   grid_pos=pair(d.get("grid_pos")), pixel_size=pair(d.get("pixel_size")),
                   image=int(d.get("image", 0)), token_span=pair(d.get("token_span")))


@dataclass
class ImageLayout:
    """How one image is cut: its size, the grid (cols, rows) or None, its slices in model order."""

    size: Tuple[int, int]  # (width, height) of the original image
    grid: Optional[Tuple[int, int]]  # (cols, rows); None when the image is not sliced
    slices: List[SliceLayout] = field(default_factory=list)
    index: int = 0  # image index within the sample

    @property
    def source(self) -> SliceLayout:
        return self.slices[0]

    @property
    def grid_slices(self) -> List[SliceLayout]:
        return self.slices[1:]

    @property
    def tgt_sizes(self) -> np.ndarray:
        return np.array([s.tgt_size for s in self.slices], dtype=np.int32).reshape(-1, 2)

    def to_dict(self) -> Dict[str, Any]:
        return {"index": self.index, "size": list(self.size), "grid": list(self.grid) if self.grid else None,
                "slices": [s.to_dict() for s in self.slices]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ImageLayout":
        return cls(size=tuple(int(x) for x in d["size"]), grid=tuple(d["grid"]) if d.get("grid") else None,
                   slices=[SliceLayout.from_dict(s) for s in d.get("slices", [])], index=int(d.get("index", 0)))
