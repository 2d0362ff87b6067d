"""MiniCPM-V-2.6 image processor: slicing, resizing, normalisation, patch layout.

Behaviour is upstream's (``openbmb/MiniCPM-V-2_6`` ``image_processing_minicpmv.py``), same
config keys and same pixels; the fork adds:

* :func:`slice_layout` -- the slicing plan of an image (grid, every slice's patch grid and
  its box in the original image), the single source of truth for both the pixels and the
  attention-to-pixel mapping;
* input hardening: every PIL mode (L, P, RGBA, LA, CMYK, 1, 16-bit ``I;16``/``I``, ``F``) is
  converted to RGB without crashing, 16-bit data is scaled to 8 bits instead of clipped to
  white, images above ``max_image_pixels`` are refused with a clear error, and
  :func:`load_image` reports missing / empty / truncated / non-image files by name
  (:class:`ImageLoadError`, a ``ValueError``).

Output of ``processor(images)`` (as upstream): ``pixel_values`` = per sample a list of
``[3, patch, patch * n_patches]`` arrays (source image first, then the grid slices row by
row, ``reshape_by_patch`` layout), ``image_sizes`` = per sample the ``(width, height)`` of
each image, ``tgt_sizes`` = per sample an ``[n_slices, 2]`` array of (patch rows, patch
cols) (``[]`` for a sample without images).
"""
# fork: image_processing_minicpmv (rewritten file)
from __future__ import annotations

import io
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .layout import ImageLayout, SliceLayout  # fork: image_processing_minicpmv (one slice-layout type)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageLoadError",
    "ImageLayout",
    "ImageTooLargeError",
    "MiniCPMVBatchFeature",
    "MiniCPMVImageProcessor",
    "SliceLayout",
    "best_slice_grid",
    "load_image",
    "reshape_by_patch",
    "slice_layout",
    "to_rgb",
]

# PIL's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

BICUBIC = PIL.Image.Resampling.BICUBIC if hasattr(PIL.Image, "Resampling") else PIL.Image.BICUBIC


class ImageLoadError(ValueError):
    """An image file (or buffer) cannot be read: missing, empty, not an image, truncated."""


class ImageTooLargeError(ValueError):
    """An image has more pixels than the processor's ``max_image_pixels``."""


# ----------------------------------------------------------------------------- geometry


def _ensure_divide(length: float, patch_size: int) -> int:
    """Nearest multiple of ``patch_size`` (Python rounding), at least ``patch_size``."""
    return max(round(length / patch_size) * patch_size, patch_size)


def _best_resize(size: Tuple[float, float], scale_resolution: int, patch_size: int,
                 allow_upscale: bool = False) -> Tuple[int, int]:
    """(w, h) with area about ``scale_resolution**2`` (only shrinking unless allowed), sides multiples of the patch."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return _ensure_divide(width, patch_size), _ensure_divide(height, patch_size)


def _refine_size(size: Tuple[int, int], grid: Tuple[int, int], scale_resolution: int, patch_size: int,
                 allow_upscale: bool = False) -> Tuple[int, int]:
    """Size of the whole image before it is cut into the grid: every cell gets the best resize of a cell."""
    width, height = size
    cols, rows = grid
    cell_w = _ensure_divide(width, cols) / cols
    cell_h = _ensure_divide(height, rows) / rows
    best_w, best_h = _best_resize((cell_w, cell_h), scale_resolution, patch_size, allow_upscale=allow_upscale)
    return best_w * cols, best_h * rows


def best_slice_grid(image_size: Tuple[int, int], max_slice_nums: int = 9, scale_resolution: int = 448,
                    never_split: bool = False) -> Optional[Tuple[int, int]]:
    """Upstream's grid choice: (cols, rows), or None when the image is not sliced.

    The slice count is about area / scale_resolution**2 (capped at ``max_slice_nums``);
    among the factorisations of that count and its neighbours, the grid whose log aspect
    ratio is closest to the image's wins (first one on ties).
    """
    width, height = int(image_size[0]), int(image_size[1])
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1 or never_split:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    best, best_err = (1, 1), float("inf")
    for n in counts:
        for m in range(1, n + 1):
            if n % m:
                continue
            err = abs(log_ratio - math.log(m / (n // m)))
            if err < best_err:
                best, best_err = (m, n // m), err
    return best


def slice_layout(image_size: Tuple[int, int], max_slice_nums: int = 9, scale_resolution: int = 448,
                 patch_size: int = 14, slice_mode: bool = True) -> ImageLayout:
    """The slices upstream feeds the model for an image of ``image_size = (width, height)``.

    Returns the source image and every grid slice, in model order (source first, then the
    grid row by row), each with its ``tgt_size`` (patch rows, cols), its resized pixel size
    and its ``box`` in original-image pixels: the source covers the whole image, grid cell
    (r, c) covers ``[c*W/cols, (c+1)*W/cols) x [r*H/rows, (r+1)*H/rows)`` (the image is resized
    uniformly to the refine size and cut into equal cells, so a cell's share of the original
    is exactly that). The boxes of the grid slices tile the image.
    """
    width, height = int(image_size[0]), int(image_size[1])
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1 x 1 pixels, got {width} x {height}")
    whole = (0.0, 0.0, float(width), float(height))
    if not slice_mode:
        # Upstream feeds the image as is (no resize); unfold drops a partial last patch.
        pw, ph = (width // patch_size) * patch_size, (height // patch_size) * patch_size
        src = SliceLayout(index=0, kind="source", tgt_size=(height // patch_size, width // patch_size),
                          box=(0.0, 0.0, float(pw), float(ph)), pixel_size=(pw, ph))
        return ImageLayout((width, height), None, [src])
    grid = best_slice_grid((width, height), max_slice_nums, scale_resolution)
    if grid is None:
        sw, sh = _best_resize((width, height), scale_resolution, patch_size, allow_upscale=True)
        src = SliceLayout(index=0, kind="source", tgt_size=(sh // patch_size, sw // patch_size), box=whole,
                          pixel_size=(sw, sh))
        return ImageLayout((width, height), None, [src])
    sw, sh = _best_resize((width, height), scale_resolution, patch_size)
    slices = [SliceLayout(index=0, kind="source", tgt_size=(sh // patch_size, sw // patch_size), box=whole,
                          pixel_size=(sw, sh))]
    cols, rows = grid
    rw, rh = _refine_size((width, height), grid, scale_resolution, patch_size, allow_upscale=True)
    cw, ch = rw // cols, rh // rows
    for r in range(rows):
        for c in range(cols):
            box = (c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows)
            slices.append(SliceLayout(index=len(slices), kind="slice", tgt_size=(ch // patch_size, cw // patch_size),
                                      box=box, grid_pos=(r, c), pixel_size=(cw, ch)))
    return ImageLayout((width, height), (cols, rows), slices)


def reshape_by_patch(image: np.ndarray, patch_size: int = 14) -> np.ndarray:
    """[C, H, W] -> [C, patch, patch * n]: patches in row-major order, each patch's columns contiguous.

    Element ``[c, i, p * patch + j]`` is pixel ``[c, pr * patch + i, pc * patch + j]`` of patch
    ``p = pr * (W // patch) + pc`` (what upstream's ``unfold``-based version produces; a
    partial last row/column of patches is dropped as ``unfold`` does).
    """
    c, h, w = image.shape
    hp, wp = h // patch_size, w // patch_size
    x = image[:, :hp * patch_size, :wp * patch_size]
    x = x.reshape(c, hp, patch_size, wp, patch_size).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(x.reshape(c, patch_size, hp * wp * patch_size))


# ----------------------------------------------------------------------------- image input


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)!r}"
    name = getattr(source, "name", None)
    if isinstance(name, (str, os.PathLike)):
        return f"image file {os.fspath(name)!r}"
    return "image data" if isinstance(source, (bytes, bytearray, memoryview)) else "image file object"


def _check_pixels(size: Tuple[int, int], limit: Optional[int], what: str) -> None:
    if limit is not None and limit > 0 and size[0] * size[1] > limit:
        raise ImageTooLargeError(
            f"{what} is {size[0]} x {size[1]} = {size[0] * size[1]:,} pixels, above the limit of "
            f"{int(limit):,} pixels (max_image_pixels); downscale it or raise the limit"
        )


# Magic numbers of common formats: a file starting with one is an image with a broken header.
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def load_image(source: Union[str, os.PathLike, bytes, bytearray, Any],
               max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Open and fully decode an image from a path, bytes or a binary file object.

    Returns the decoded PIL image in its own mode (convert with :func:`to_rgb`). Raises
    :class:`ImageLoadError` naming the file when it is missing, a directory, unreadable,
    empty (0 bytes), not an image, or truncated/corrupt, and :class:`ImageTooLargeError`
    when the header announces more than ``max_pixels`` pixels (checked before decoding).
    Nothing is written anywhere.
    """
    what = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ImageLoadError(f"{what} cannot be read: no such file")
        if os.path.isdir(path):
            raise ImageLoadError(f"{what} cannot be read: it is a directory")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageLoadError(f"{what} cannot be read: {e.strerror or e}") from e
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        try:
            data = source.read()
        except (OSError, ValueError) as e:
            raise ImageLoadError(f"{what} cannot be read: {e}") from e
        if not isinstance(data, (bytes, bytearray)):
            raise ImageLoadError(f"{what} cannot be read: it is not opened in binary mode")
    else:
        raise TypeError(f"load_image expects a path, bytes or a binary file object, got {type(source).__name__}")
    if len(data) == 0:
        raise ImageLoadError(f"{what} is empty (0 bytes)")
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except PIL.Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{what} cannot be read: {e}") from e
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if data.startswith(_IMAGE_SIGNATURES):
            raise ImageLoadError(f"{what} cannot be read: its header is truncated/corrupt ({len(data)} bytes)") from e
        raise ImageLoadError(f"{what} cannot be read: not a recognised image format ({len(data)} bytes)") from e
    _check_pixels(image.size, max_pixels, what)
    try:
        image.load()
    except PIL.Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{what} cannot be read: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise ImageLoadError(f"{what} is truncated/corrupt: {e}") from e
    return image


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _to_uint8(values: np.ndarray, full_scale: Optional[float]) -> np.ndarray:
    """Scale to 0..255: by ``full_scale`` (value that maps to 255) or, if None, by the data's own range."""
    a = values.astype(np.float64)
    if full_scale is None:
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    else:
        a = a * (255.0 / full_scale)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _high_depth_to_l(image: PIL.Image.Image) -> PIL.Image.Image:
    """16-bit / 32-bit integer / float single-channel image -> 8-bit 'L', scaled, not clipped."""
    a = np.asarray(image)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        out = _to_uint8(a, 65535.0)
    elif mode == "I":
        # 32-bit container: 16-bit PNGs open as 'I' on older Pillow. 0..255 data is kept,
        # 0..65535 data is scaled as 16 bits, anything else by its own range.
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 255:
            out = a.astype(np.uint8)
        elif lo >= 0 and hi <= 65535:
            out = _to_uint8(a, 65535.0)
        else:
            out = _to_uint8(a, None)
    else:  # "F": 0..1 or 0..255 data kept on its scale, anything else by its own range
        finite = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1.0:
            out = _to_uint8(finite, 1.0)
        elif lo >= 0 and hi <= 255:
            out = _to_uint8(finite, 255.0)
        else:
            out = _to_uint8(finite, None)
    return PIL.Image.fromarray(out)


def to_rgb(image: PIL.Image.Image, alpha_background: Optional[Sequence[int]] = None) -> PIL.Image.Image:
    """Any PIL image -> RGB.

    Upstream does ``image.convert("RGB")``; that is kept for every mode where it is sound
    (so pixels equal upstream's), including dropping alpha, unless ``alpha_background``
    (an RGB colour) is given, in which case transparent images are composited on it.
    16-bit and 32-bit single-channel images (where ``convert`` clips everything above 255
    to white) are scaled to 8 bits first.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _high_depth_to_l(image).convert("RGB")
    has_alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info)
    if has_alpha and alpha_background is not None:
        rgba = image.convert("RGBA")
        bg = PIL.Image.new("RGBA", rgba.size, tuple(int(v) for v in alpha_background)[:3] + (255,))
        return PIL.Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert an image of mode {mode!r} to RGB: {e}") from e


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """numpy image (HWC, CHW with 1 or 3 channels, or HW) -> PIL, like upstream's ``to_pil_image``.

    Floats are taken as 0..1 (x255, clipped); uint16 is scaled to 8 bits (upstream wraps it).
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3):  # channels first -> last, as upstream decides it
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"cannot interpret an array of shape {tuple(np.asarray(array).shape)} as an image")
    if np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.nan_to_num(a) * 255, 0, 255).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = _to_uint8(a, 65535.0)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    else:
        a = a.astype(np.uint8)
    return PIL.Image.fromarray(a)


def _is_single_image(x) -> bool:
    return isinstance(x, (PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike, bytes, bytearray))


# ----------------------------------------------------------------------------- batch feature


def _map_nested(fn, value):
    if isinstance(value, list):
        return [_map_nested(fn, v) for v in value]
    return fn(value)


class MiniCPMVBatchFeature(BatchFeature):
    """BatchFeature whose values may be nested lists (one entry per sample / image / slice).

    ``convert_to_tensors`` and ``.to(...)`` walk lists; non-tensor entries (e.g. slice
    layouts) are left alone. ``.to(dtype)`` casts floating tensors only, ``.to(device)``
    moves every tensor (as upstream's ``MiniCPMVBatchFeature``).
    """

    def __init__(self, data: Optional[Dict[str, Any]] = None, tensor_type=None):
        super().__init__(data)
        self.convert_to_tensors(tensor_type=tensor_type)

    def convert_to_tensors(self, tensor_type=None, skip_tensor_conversion=None):
        """Nested lists to tensors; ``skip_tensor_conversion`` (transformers >= 5.1) keys are left as is."""
        if tensor_type is None:
            return self
        kind = str(getattr(tensor_type, "value", tensor_type))
        if kind not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {tensor_type!r}")

        def convert(v):
            if isinstance(v, (np.ndarray, tuple)) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                arr = np.asarray(v)
                return torch.from_numpy(np.ascontiguousarray(arr)) if kind == "pt" else arr
            if isinstance(v, torch.Tensor) and kind == "np":
                return v.detach().cpu().numpy()
            return v

        skip = {"slice_layouts"} | set(skip_tensor_conversion or ())
        for key in list(self.keys()):
            if key in skip:
                continue
            self.data[key] = _map_nested(convert, self.data[key])
        return self

    def to(self, *args, **kwargs) -> "MiniCPMVBatchFeature":
        device = kwargs.get("device")
        if device is None and len(args) > 0:
            arg = args[0]
            if isinstance(arg, torch.dtype):
                pass
            elif isinstance(arg, (str, int, torch.device)):
                device = arg
            else:
                raise ValueError(f"Attempting to cast a BatchFeature to type {arg}. This is not supported.")

        def cast(v):
            if isinstance(v, torch.Tensor):
                if torch.is_floating_point(v):
                    return v.to(*args, **kwargs)
                if device is not None:
                    return v.to(device=device)
            elif isinstance(v, tuple):
                return tuple(cast(x) for x in v)
            return v

        self.data = {k: _map_nested(cast, v) for k, v in self.data.items()}
        return self


# ----------------------------------------------------------------------------- processor


class MiniCPMVImageProcessor(BaseImageProcessor):
    """Upstream's ``MiniCPMVImageProcessor`` (same config keys, same pixels), hardened.

    Config keys: ``max_slice_nums`` (9), ``scale_resolution`` (448), ``patch_size`` (14),
    ``use_image_id`` (False), ``image_feature_size`` (64; the resampler's query count),
    ``norm_mean`` / ``norm_std`` ([0.5]*3), ``slice_mode`` (True), ``version`` (2.0), the marker
    strings ``im_start``, ``im_end``, ``slice_start``, ``slice_end``, ``unk``, ``im_id_start``,
    ``im_id_end``; fork additions ``max_image_pixels`` (refuse larger images) and
    ``alpha_background`` (None = drop alpha like upstream; an RGB colour = composite on it).
    ``max_image_pixels`` None or 0 disables the size check.

    With ``slice_mode=False`` the image is fed as is, without resizing (upstream's behaviour):
    only its top-left ``floor(W/14)*14 x floor(H/14)*14`` pixels are seen.
    """

    model_input_names = ["pixel_values"]
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __init__(self, max_slice_nums: int = 9, scale_resolution: int = 448, patch_size: int = 14, **kwargs):
        self.max_slice_nums = int(max_slice_nums)
        self.scale_resolution = int(scale_resolution)
        self.patch_size = int(patch_size)
        self.use_image_id = bool(kwargs.pop("use_image_id", False))
        self.image_feature_size = int(kwargs.pop("image_feature_size", 64))
        self.im_start_token = kwargs.pop("im_start", "<image>")
        self.im_end_token = kwargs.pop("im_end", "</image>")
        self.slice_start_token = kwargs.pop("slice_start", "<slice>")
        self.slice_end_token = kwargs.pop("slice_end", "</slice>")
        self.unk_token = kwargs.pop("unk", "<unk>")
        self.im_id_start = kwargs.pop("im_id_start", "<image_id>")
        self.im_id_end = kwargs.pop("im_id_end", "</image_id>")
        self.slice_mode = bool(kwargs.pop("slice_mode", True))
        self.norm_mean = [float(v) for v in kwargs.pop("norm_mean", [0.5, 0.5, 0.5])]
        self.norm_std = [float(v) for v in kwargs.pop("norm_std", [0.5, 0.5, 0.5])]
        self.version = kwargs.pop("version", 2.0)
        self.max_image_pixels = kwargs.pop("max_image_pixels", type(self).max_image_pixels)
        alpha = kwargs.pop("alpha_background", None)
        self.alpha_background = list(alpha) if alpha is not None else None
        # stale keys of other transformers versions are not ours to keep
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        if self.max_slice_nums < 1 or self.scale_resolution < 1 or self.patch_size < 1:
            raise ValueError("max_slice_nums, scale_resolution and patch_size must be positive")

    # ---- slicing (upstream's method names)

    def _max_slices(self, max_slice_nums) -> int:
        n = self.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        if n < 1:
            raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
        return n

    def get_sliced_grid(self, image_size, max_slice_nums=None, nerver_split=False) -> Optional[List[int]]:
        grid = best_slice_grid(_size_tuple(image_size), self._max_slices(max_slice_nums), self.scale_resolution,
                               never_split=nerver_split)
        return list(grid) if grid is not None else None

    def get_slice_layout(self, image_size, max_slice_nums=None) -> ImageLayout:
        """:func:`slice_layout` with this processor's settings."""
        return slice_layout(_size_tuple(image_size), self._max_slices(max_slice_nums), self.scale_resolution,
                            self.patch_size, self.slice_mode)

    def get_grid_placeholder(self, grid) -> str:
        if grid is None:
            return ""
        one = self.slice_start_token + self.unk_token * self.image_feature_size + self.slice_end_token
        cols, rows = int(grid[0]), int(grid[1])
        return "\n".join(one * cols for _ in range(rows))

    def get_image_id_placeholder(self, idx=0) -> str:
        return f"{self.im_id_start}{idx}{self.im_id_end}"

    def get_slice_image_placeholder(self, image_size, image_idx=0, max_slice_nums=None, use_image_id=None) -> str:
        """The text that stands for one image: optional image id, the source image's query
        tokens, then (slice mode) one ``<slice>`` block per grid cell, rows joined by newlines."""
        grid = self.get_sliced_grid(image_size, max_slice_nums)
        placeholder = self.im_start_token + self.unk_token * self.image_feature_size + self.im_end_token
        use_image_id = self.use_image_id if use_image_id is None else bool(use_image_id)
        if use_image_id:
            placeholder = self.get_image_id_placeholder(image_idx) + placeholder
        if self.slice_mode:
            placeholder += self.get_grid_placeholder(grid)
        return placeholder

    def get_sliced_images(self, image: PIL.Image.Image, max_slice_nums=None) -> List[PIL.Image.Image]:
        """Source image then grid slices (row by row), as PIL images."""
        layout = self.get_slice_layout(image.size, max_slice_nums)
        return self._cut(image, layout)

    def _cut(self, image: PIL.Image.Image, layout: ImageLayout) -> List[PIL.Image.Image]:
        if not self.slice_mode:
            return [image]
        src = layout.source
        out = [image.resize(src.pixel_size, resample=BICUBIC)]
        if layout.grid is not None:
            cols, rows = layout.grid
            cw, ch = layout.slices[1].pixel_size
            refine = image.resize((cw * cols, ch * rows), resample=BICUBIC)
            for s in layout.grid_slices:
                r, c = s.grid_pos
                out.append(refine.crop((c * cw, r * ch, (c + 1) * cw, (r + 1) * ch)))
        return out

    def reshape_by_patch(self, image: np.ndarray) -> np.ndarray:
        return reshape_by_patch(image, self.patch_size)

    # ---- input conversion

    def to_pil_image(self, image, rescale=None) -> PIL.Image.Image:
        if isinstance(image, PIL.Image.Image):
            return image
        if isinstance(image, (str, os.PathLike, bytes, bytearray)):
            return load_image(image, max_pixels=self.max_image_pixels)
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray):
            if rescale is False and np.issubdtype(image.dtype, np.floating):
                image = image.astype(np.uint8)
            return _array_to_pil(image)
        raise TypeError(
            f"invalid image type {type(image).__name__}: expected a PIL image, numpy array, torch tensor or a path"
        )

    def to_rgb(self, image) -> PIL.Image.Image:
        """Any supported input -> RGB PIL image, after the pixel-count check."""
        pil = self.to_pil_image(image)
        _check_pixels(pil.size, self.max_image_pixels, "image")
        if pil.size[0] < 1 or pil.size[1] < 1:
            raise ValueError(f"image has no pixels ({pil.size[0]} x {pil.size[1]})")
        return to_rgb(pil, self.alpha_background)

    def _normalize(self, rgb: PIL.Image.Image) -> np.ndarray:
        """RGB image -> float32 [3, H, W]: /255, (x - mean) / std (float32 throughout, as upstream)."""
        a = np.asarray(rgb, dtype=np.uint8).astype(np.float32) / 255
        mean = np.asarray(self.norm_mean, dtype=np.float32)
        std = np.asarray(self.norm_std, dtype=np.float32)
        a = (a - mean) / std
        return np.ascontiguousarray(a.transpose(2, 0, 1))

    # ---- main entry

    def __call__(self, images, **kwargs) -> MiniCPMVBatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(self, images, do_pad: bool = True, max_slice_nums: Optional[int] = None,
                   return_tensors=None, **kwargs) -> MiniCPMVBatchFeature:
        """``images``: one image, a list of images (one sample) or a list of lists (a batch;
        ``None`` / ``[]`` for a sample without images). An image is a PIL image, a numpy array,
        a torch tensor, or a path / bytes (read with :func:`load_image`)."""
        images_list = self.batch_images(images)
        pixel_values, image_sizes, tgt_sizes = [], [], []
        for sample in images_list:
            if not sample:
                pixel_values.append([])
                image_sizes.append([])
                tgt_sizes.append([])
                continue
            pv, sizes, tgts = [], [], []
            for image in sample:
                rgb = self.to_rgb(image)
                layout = self.get_slice_layout(rgb.size, max_slice_nums)
                sizes.append(tuple(rgb.size))
                for geometry, piece in zip(layout.slices, self._cut(rgb, layout)):
                    arr = self._normalize(piece)
                    pv.append(self.reshape_by_patch(arr))
                    tgts.append((arr.shape[1] // self.patch_size, arr.shape[2] // self.patch_size))
                    if tgts[-1][0] * tgts[-1][1] == 0:
                        raise ValueError(f"image {rgb.size} gives an empty slice {arr.shape[1:]} "
                                         f"(smaller than one {self.patch_size}-pixel patch)")
            pixel_values.append(pv)
            image_sizes.append(sizes)
            tgt_sizes.append(np.array(tgts, dtype=np.int32).reshape(-1, 2))
        return MiniCPMVBatchFeature(
            data={"pixel_values": pixel_values, "image_sizes": image_sizes, "tgt_sizes": tgt_sizes},
            tensor_type=return_tensors,
        )

    @staticmethod
    def batch_images(images) -> List[List[Any]]:
        """Normalise the accepted layouts to a list (per sample) of lists of images."""
        if images is None:
            return [[]]
        if _is_single_image(images):
            return [[images]]
        images = list(images)
        if not images:
            return [[]]
        if _is_single_image(images[0]):
            bad = [i for i, x in enumerate(images) if not _is_single_image(x)]
            if bad:
                raise TypeError(f"images: mixing single images and lists (entry {bad[0]}); "
                                "pass one list of images, or a list of lists for a batch")
            return [images]
        out = []
        for s, sample in enumerate(images):
            if sample is None:
                out.append([])
            elif _is_single_image(sample):
                raise TypeError(f"images: sample {s} is a single image among lists; wrap it in a list")
            else:
                out.append(list(sample))
        return out


def _size_tuple(image_size) -> Tuple[int, int]:
    if isinstance(image_size, torch.Tensor):
        image_size = image_size.tolist()
    w, h = image_size
    return int(w), int(h)
