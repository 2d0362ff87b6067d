"""Interactive attention viewer: one self-contained, offline HTML file written from a record.

:func:`write_viewer` turns an :class:`~..attention_record.AttentionRecord` (and, optionally, the
image it was captured on) into a single ``index.html``: no network, no CDN, no other file. The
data is embedded compactly and decoded in the page (vanilla JS, canvas):

* every LLM map is stored at the **image-token** level: for each clicked token (the row that
  produced it), each (layer choice, head choice) block holds the row's attention on the image's
  tokens, quantised to uint8 with one float32 scale per row; the resampler (head mean) is stored
  per slice as ``[queries, patches]`` (uint8 + one scale per query). The page multiplies the two
  and spreads every patch's mass over its cell of the slice's box (area weighting, exactly as
  ``attention_map.image_heatmap`` with ``interpolation="nearest"``) on a grid of at most
  ``GRID_SIDE`` px; so a heatmap equals ``image_heatmap``'s up to quantisation;
* the same query -> patch maps **through SigLIP** (``attention_map.compose_vision_rollout``: each
  slice's map times its SigLIP rollout over all captured vision layers), when the record holds
  vision layers ``0..k-1`` for every slice of the image: the ``#thruvision`` checkbox makes the
  LLM -> image kind equal ``image_heatmap(..., through_vision=True)`` and the resampler-query kind
  show where the query's content came from. Otherwise the checkbox is disabled and a note says
  why. Same size as the resampler data, inside the data budget;
* SigLIP patch maps (``attention_map.vision_attention``, head mean) per captured vision layer and
  slice, with query patches pooled in ``f x f`` blocks when needed (keys stay per patch);
* optional extra maps (``extra_kinds``, e.g. gradient relevancy) reduced to at most
  ``EXTRA_SIDE`` px on the long side, one per token;
* the image as a JPEG at most ``DISPLAY_SIDE`` px on the long side (at most 4:1, like the plots).

The reader clicks a generated token (``.token``) and picks the map kind (``#kind``), LLM layer
(``#layer``: each layer, mean, rollout) and head (``#head``: each head, mean, max), optionally
through SigLIP (``#thruvision``); the page draws the slice grid as thin lines (``#boxes``), zooms
(``#zoom``), shows the original beside the overlay (``#sidebyside``), blends the heat by value
(``#alpha`` is the opacity where the map peaks; where it is 0 the image shows unchanged, as in
``heat_overlay``), says what a colour means
(``#legendwords``) and shows the token's attention shares (image / text / special). Tokens are named
by the API's query row: "row N (predicts token X)". The token view (``#tokview``, BertViz-like) shows
the token's row over the text / special columns (``text_cols``; each LLM block's ``x`` rows, also in
the budget below), when the record captured those columns; else a note says so.

Budget (bounded memory, time and file size): the embedded data is at most ``MAX_DATA_BYTES``
(16 MiB before base64, which adds a third: a page of at most about 22 MiB). LLM blocks go in by
priority, each group whole: (1) every layer and the layer mean with heads averaged, and the
rollout; (2) every head and the head max with layers averaged; (3) every layer with the head max;
(4) every (layer, head) pair. A group that does not fit is left out and the page says so (as
does ``Viewer.notes``); if group 1 alone does not fit, the tokens are cut to what fits (at least
one, else :class:`ValueError` before any map is computed). Vision maps take at most
``VISION_BUDGET_BYTES`` of that (3 MiB; query patches pooled until they fit). At most
``MAX_TOKENS`` (1024) tokens are clickable. The rollout is only computed when the record holds
full square LLM maps and ``(layers + heads) x positions^2 x 8`` bytes stay within
``ROLLOUT_BUDGET_BYTES`` (1 GiB); so is the SigLIP rollout of the through-SigLIP maps
(``vision layers x patches^2 x 8`` bytes per slice). Work while building is one LLM layer at a time:
``heads x tokens x positions`` float64 values.

Real-size check (MiniCPM-V-2.6: 28 layers x 28 heads, 10 slices x 64 queries, 300 generated
tokens): ``scripts/bench_viewer.py`` (numbers in the README).
"""
from __future__ import annotations

import base64
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..attention_record import AttentionRecord, atomic_write_text
from ..capture import hook_name
from . import attention_map as am
from .html_safe import fill, page_file, text

__all__ = ["MAX_DATA_BYTES", "VISION_BUDGET_BYTES", "MAX_TOKENS", "DISPLAY_SIDE", "GRID_SIDE", "EXTRA_SIDE",
           "ROLLOUT_BUDGET_BYTES", "BUDGET", "Viewer", "build_viewer", "render_viewer", "write_viewer",
           "read_viewer_data", "view_record", "token_text"]

MAX_DATA_BYTES = 16 * 2**20
VISION_BUDGET_BYTES = 3 * 2**20
MAX_TOKENS = 1024
DISPLAY_SIDE = 512
GRID_SIDE = 256
EXTRA_SIDE = 64
ROLLOUT_BUDGET_BYTES = 2**30
BUILTIN_KINDS = ("llm", "resampler", "vision")
THROUGH_VISION_UNAVAILABLE = "through SigLIP unavailable"
BUDGET = (f"the viewer embeds at most {MAX_DATA_BYTES / 2**20:g} MiB of map data (uint8; "
          f"{VISION_BUDGET_BYTES / 2**20:g} MiB of it SigLIP maps) and at most {MAX_TOKENS} tokens; LLM "
          f"(layer, head) maps beyond that are left out, with a note in the page")


# ----------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------
def _byte_decoder() -> Dict[str, int]:
    """Inverse of the byte-level BPE alphabet (printable bytes map to themselves, the rest to
    256 + n in byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


_BYTES = _byte_decoder()


def token_text(tok: Optional[str]) -> str:
    """A token string as the reader would see it: byte-level BPE decoded (``Ġ`` -> space,
    ``Ċ`` -> newline); strings outside that alphabet (special tokens, SentencePiece) unchanged."""
    if not tok:
        return ""
    if all(c in _BYTES for c in tok):
        return bytes(_BYTES[c] for c in tok).decode("utf-8", errors="replace")
    return tok.replace("\u2581", " ")


def _quantise(a: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of ``a`` [..., C] (>= 0) to uint8 with one float32 scale (the row max) per row:
    ``value ~= q / 255 * scale``, error at most ``scale / 510``."""
    a = np.asarray(a, dtype=np.float64)
    scale = a.max(-1) if a.shape[-1] else np.zeros(a.shape[:-1])
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 0.0)
    q = np.rint(np.clip(a / np.where(scale > 0, scale, 1.0)[..., None], 0, 1) * 255)
    return q.astype(np.uint8), scale.astype(np.float32)


def _pool_rows(a: np.ndarray, h: int, w: int, f: int) -> np.ndarray:
    """Rows of ``a`` [h*w, C] (one per patch, row-major) averaged over ``f x f`` patch blocks:
    ``[ceil(h/f) * ceil(w/f), C]`` (block-row-major)."""
    if f == 1:
        return a
    g = a.reshape(h, w, -1)
    ry, rx = np.arange(0, h, f), np.arange(0, w, f)
    s = np.add.reduceat(np.add.reduceat(g, ry, axis=0), rx, axis=1)
    cy, cx = np.diff(np.append(ry, h)), np.diff(np.append(rx, w))
    return (s / (cy[:, None, None] * cx[None, :, None])).reshape(len(ry) * len(rx), -1)


def _shrink(m: np.ndarray, side: int) -> np.ndarray:
    """Block-mean a 2-D map down to at most ``side`` px on its long side."""
    H, W = m.shape
    fy, fx = max(1, -(-H // side)), max(1, -(-W // side))
    if fy == 1 and fx == 1:
        return m
    ry, rx = np.arange(0, H, fy), np.arange(0, W, fx)
    s = np.add.reduceat(np.add.reduceat(m, ry, axis=0), rx, axis=1)
    return s / (np.diff(np.append(ry, H))[:, None] * np.diff(np.append(rx, W))[None, :])


class _Blob:
    """Concatenated uint8 data and float32 scales; offsets go into the page's JSON."""

    def __init__(self):
        self.u8: List[bytes] = []
        self.f32: List[np.ndarray] = []
        self.n_u8 = 0
        self.n_f32 = 0

    def add(self, q: np.ndarray, scales: np.ndarray) -> Tuple[int, int]:
        at = (self.n_u8, self.n_f32)
        self.u8.append(np.ascontiguousarray(q, dtype=np.uint8).tobytes())
        self.f32.append(np.asarray(scales, dtype=np.float32).ravel())
        self.n_u8 += q.size
        self.n_f32 += scales.size
        return at

    def encode(self) -> Tuple[str, str]:
        f = np.concatenate(self.f32) if self.f32 else np.zeros(0, np.float32)
        return (base64.b64encode(b"".join(self.u8)).decode("ascii"),
                base64.b64encode(f.astype("<f4").tobytes()).decode("ascii"))


@dataclass
class Viewer:
    """What :func:`build_viewer` computed: ``data`` (the page's JSON), the binary blobs
    (base64), the notes on what was left out, and the JPEG of the image (base64 or None)."""

    data: Dict[str, Any]
    u8: str
    f32: str
    image_jpeg: Optional[str]
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def data_bytes(self) -> int:
        return len(self.u8) * 3 // 4 + len(self.f32) * 3 // 4


# ----------------------------------------------------------------------------------
# building the data
# ----------------------------------------------------------------------------------
def _clickable_tokens(record: AttentionRecord, layers: List[int]) -> Tuple[List[Tuple[int, int]], str]:
    """[(token position, row that produced it)] and a description; the rows must be captured in
    every selected LLM layer."""
    lay = record.layout
    captured = None
    for l in layers:
        name = hook_name("llm", l)
        t = record.tensors[name]
        rows = record.index.get(name, {}).get("rows")
        rows = set(range(t.shape[-2])) if rows is None else {int(r) for r in rows}
        captured = rows if captured is None else captured & rows
    n = len(lay.tokens)
    gen = [(p, p - 1) for p in range(max(1, int(lay.n_prompt)), n) if p - 1 in captured]
    if gen:
        return gen, "generated tokens (each shows the attention of the row that produced it)"
    if not captured:
        raise ValueError("the record's LLM layers share no captured query row; nothing to show")
    last = max(captured)
    return [(last, last)], f"no generated token was captured: showing query row {last} (its own token)"


def _n_positions(record: AttentionRecord) -> int:
    """Sequence length the LLM maps cover (the layout's tokens, or more if rows / columns say so)."""
    n = len(record.layout.tokens)
    for name in record.names("llm"):
        t, info = record.tensors[name], record.index.get(name, {})
        for key, size in (("rows", t.shape[1]), ("cols", t.shape[2])):
            pos = info.get(key)
            n = max(n, (max(pos) + 1 if pos else 0) if pos is not None else size)
    return n


def _image_slices(record: AttentionRecord, image: int):
    lay = record.layout
    out, n = [], 0
    for g, sl in enumerate(lay.slices):
        if sl.image != image:
            continue
        a, b = (int(v) for v in sl.token_span)
        out.append((g, sl, n, a, b))
        n += b - a
    return out, n


def _prepare_extras(extra_kinds, tokens) -> Dict[str, Dict[int, np.ndarray]]:
    """Validate ``extra_kinds`` = {name: {generated-token index: [H, W] map}} and shrink the maps."""
    out = {}
    for name, maps in (extra_kinds or {}).items():
        if not isinstance(name, str) or not name.strip() or name in BUILTIN_KINDS:
            raise ValueError(f"extra_kinds: expected a new kind name (not {BUILTIN_KINDS}), found {name!r}")
        if not isinstance(maps, dict):
            raise ValueError(f"extra_kinds[{name!r}]: expected {{token index: [H, W] map}}, found "
                             f"{type(maps).__name__}")
        got = {}
        for k, m in maps.items():
            if not isinstance(k, (int, np.integer)) or not 0 <= int(k) < len(tokens):
                raise ValueError(f"extra_kinds[{name!r}]: expected token indices 0..{len(tokens) - 1} (generated "
                                 f"tokens in order), found {k!r}")
            a = np.asarray(m.detach().cpu() if hasattr(m, "detach") else m, dtype=np.float64)
            if a.ndim != 2 or min(a.shape) < 1:
                raise ValueError(f"extra_kinds[{name!r}][{k}]: expected a 2-D [H, W] map over the image, found "
                                 f"shape {a.shape}")
            if not np.isfinite(a).all():
                raise ValueError(f"extra_kinds[{name!r}][{k}]: holds NaN or infinite values")
            got[int(k)] = _shrink(a, EXTRA_SIDE)
        out[name] = got
    return out


def _sink_positions(record: AttentionRecord, sinks, rows: List[int], layers: List[int]) -> Optional[List[int]]:
    """Known attention sinks: ``sinks`` (positions) or, when None, ``attention_map.find_sinks`` over
    the shown rows and layers (None if this version has no such function)."""
    if sinks is None:
        fn = getattr(am, "find_sinks", None)
        if fn is None:
            return None
        sinks = fn(record, rows, layers)
    out = sorted({int(p) for p in sinks})
    bad = [p for p in out if not 0 <= p < len(record.layout.tokens)]
    if bad:
        raise ValueError(f"sinks: positions {bad} are outside the record's {len(record.layout.tokens)} tokens")
    return out


def _display_jpeg(image, size: Tuple[int, int]) -> Optional[str]:
    if image is None:
        return None
    from PIL import Image

    from .plotting import display_image

    pic = display_image(image, DISPLAY_SIDE)
    if isinstance(image, Image.Image):
        got = image.size
    elif isinstance(image, (str, os.PathLike)):
        got = pic.size
    else:
        got = np.asarray(image).shape[1::-1]
    want, have = _display_size(size, DISPLAY_SIDE), _display_size(got, DISPLAY_SIDE)
    if abs(want[0] / want[1] - have[0] / have[1]) > 0.02 * want[0] / want[1] + 2.0 / min(want):
        raise ValueError(f"image: expected the record's image ({size[0]} x {size[1]} px, or a copy of the same "
                         f"shape), found {got[0]} x {got[1]} px")
    buf = io.BytesIO()
    pic.convert("RGB").save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _display_size(size: Tuple[int, int], side: int) -> Tuple[int, int]:
    w, h = float(size[0]), float(size[1])
    side = int(min(side, max(w, h)))
    if w >= h:
        return side, max(1, min(side, round(max(h * side / w, side / 4))))
    return max(1, min(side, round(max(w * side / h, side / 4)))), side


def _through_vision(record: AttentionRecord, image: int, slices, res_maps: List[np.ndarray]) -> List[np.ndarray]:
    """Each shown slice's query -> patch map ``[nq, h*w]`` composed with that slice's SigLIP
    rollout (``attention_map.compose_vision_rollout``: every captured vision layer, head mean,
    residual 0.5), as ``image_heatmap(..., through_vision=True)`` uses them. Raises ValueError
    with one line saying why the record cannot give them."""
    have = record.layers("vision")
    if not have:
        raise ValueError("the record has no SigLIP attention; capture stage 'vision' with all its layers")
    if have != list(range(len(have))):
        raise ValueError(f"the record has vision layers {have} only; capture all SigLIP layers (from 0)")
    n_max = max(m.shape[1] for m in res_maps)
    need = len(have) * n_max * n_max * 8
    if need > ROLLOUT_BUDGET_BYTES:
        raise ValueError(f"the SigLIP rollout of {len(have)} layers x {n_max} patches needs about "
                         f"{need / 2**30:.1f} GiB (budget {ROLLOUT_BUDGET_BYTES / 2**30:g} GiB)")
    res = np.zeros((len(slices), max(m.shape[0] for m in res_maps), n_max))
    for i, m in enumerate(res_maps):
        res[i, : m.shape[0], : m.shape[1]] = m
    out = am.compose_vision_rollout(record, res, [g for g, *_ in slices], image)
    got = [out[i, : m.shape[0], : m.shape[1]] for i, m in enumerate(res_maps)]
    for (_, sl, *_), m in zip(slices, got):
        if not np.isfinite(m).all() or m.min() < -1e-9:
            raise ValueError(f"the composed map of slice {sl.index} holds negative or non-finite values")
    return got


def build_viewer(record: AttentionRecord, image=None, *, image_index: int = 0, prompt: Optional[str] = None,
                 answer: Optional[str] = None, layers: Optional[Sequence[int]] = None,
                 max_tokens: Optional[int] = None, extra_kinds: Optional[Dict[str, Dict[int, Any]]] = None,
                 sinks=None, max_data_bytes: int = MAX_DATA_BYTES, progress: bool = False) -> Viewer:
    """Compute everything the page embeds (see the module doc for the budget).

    ``image``: PIL image, path or array of the captured image (or a copy of the same shape);
    None draws the maps on grey. ``layers``: LLM layers to offer (default all captured).
    ``max_tokens``: keep the first n clickable tokens. ``extra_kinds``: ``{kind name:
    {generated-token index: [H, W] map over the image}}`` (e.g. gradient relevancy), shown as
    more map kinds. ``sinks``: attention-sink positions (default ``attention_map.find_sinks``
    over the shown rows and layers); the page lists them with their mean share (layers and
    heads mean, over the shown tokens) and shows each map's share on them. The through-SigLIP maps
    (``data["through_vision"]``: per slice ``{u, f}`` like the resampler's) are embedded when the
    record allows them, else None with a note starting ``THROUGH_VISION_UNAVAILABLE``. Raises
    ValueError naming what is missing or over budget.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    lay = record.layout
    if lay is None:
        raise ValueError("the viewer needs the record's token layout, but record.layout is None")
    ims = {im.index: im for im in lay.images}
    if image_index not in ims:
        raise ValueError(f"the record's layout has no image {image_index}; images: {sorted(ims)}")
    W, H = (int(v) for v in ims[image_index].size)
    have = record.layers("llm")
    if not have:
        raise ValueError("the record has no LLM attention (llm.layers.*.attn); capture stage 'llm'")
    layers = have if layers is None else [have[l] if -len(have) <= l < 0 else int(l) for l in layers]
    missing = [l for l in layers if l not in have]
    if missing:
        raise ValueError(f"the record has no LLM layer(s) {missing}; captured LLM layers: {have}")
    tokens, token_desc = _clickable_tokens(record, layers)
    notes = []
    if len(tokens) > MAX_TOKENS:
        notes.append(f"{len(tokens)} tokens: only the first {MAX_TOKENS} are shown (MAX_TOKENS)")
        tokens = tokens[:MAX_TOKENS]
    if max_tokens is not None:
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens: expected at least 1, found {max_tokens}")
        if len(tokens) > int(max_tokens):
            notes.append(f"only the first {int(max_tokens)} of {len(tokens)} tokens are shown (max_tokens)")
            tokens = tokens[: int(max_tokens)]
    slices, N = _image_slices(record, image_index)
    if N == 0:
        raise ValueError(f"the record has no image tokens of image {image_index}")
    img_pos = np.concatenate([np.arange(a, b) for _, _, _, a, b in slices])
    extras = _prepare_extras(extra_kinds, tokens)
    blob = _Blob()

    # resampler: [Q, h*w] per slice (head mean)
    res_meta, res_maps = [], []
    for g, sl, n0, a, b in slices:
        m = am.resampler_query_maps(record, image_index, sl.index)  # [Q, h, w]
        if m.shape[0] < b - a:
            raise ValueError(f"resampler.attn has {m.shape[0]} queries, slice {sl.index} has {b - a} image tokens")
        h, w = (int(v) for v in sl.tgt_size)
        res_maps.append(m[: b - a].reshape(b - a, h * w))
        q, s = _quantise(res_maps[-1])
        u, f = blob.add(q, s)
        res_meta.append({"kind": sl.kind, "index": sl.index, "box": [float(v) for v in sl.box], "tgt": [h, w],
                         "grid_pos": list(sl.grid_pos) if sl.grid_pos else None, "n0": n0, "nq": b - a,
                         "u": u, "f": f})

    # through SigLIP: the same maps composed with each slice's SigLIP rollout (in the data budget)
    thru_meta = None
    try:
        thru = _through_vision(record, image_index, slices, res_maps)
    except ValueError as e:
        notes.append(f"{THROUGH_VISION_UNAVAILABLE}: {e}")
    else:
        thru_meta = [dict(zip(("u", "f"), blob.add(*_quantise(m)))) for m in thru]
    del res_maps

    # vision: per captured layer and slice, [query blocks, h*w]
    vis_layers, vis_meta, pool = record.layers("vision"), [], 1
    if vis_layers:
        cells = [(int(sl.tgt_size[0]), int(sl.tgt_size[1])) for _, sl, _, _, _ in slices]

        def vis_bytes(f, n_layers):
            return n_layers * sum((-(-h // f)) * (-(-w // f)) * h * w for h, w in cells)

        top = max(max(c) for c in cells)
        while pool < top and vis_bytes(pool, len(vis_layers)) > VISION_BUDGET_BYTES:
            pool += 1
        while len(vis_layers) > 1 and vis_bytes(pool, len(vis_layers)) > VISION_BUDGET_BYTES:
            vis_layers = vis_layers[1:]
        if vis_bytes(pool, len(vis_layers)) > VISION_BUDGET_BYTES:
            notes.append(f"SigLIP maps left out: even one layer pooled to one block per slice needs "
                         f"{vis_bytes(pool, 1):,} bytes > {VISION_BUDGET_BYTES:,}")
            vis_layers = []
        if len(vis_layers) < len(record.layers("vision")):
            notes.append(f"SigLIP: only the last {len(vis_layers)} captured layers fit the budget")
        if pool > 1:
            notes.append(f"SigLIP patch maps: query patches pooled in {pool} x {pool} blocks (the budget); "
                         f"keys per patch")
        for v in vis_layers:
            per = []
            for _, sl, _, _, _ in slices:
                h, w = (int(x) for x in sl.tgt_size)
                a = am.vision_attention(record, v, image_index, sl.index)  # [n, n]
                q, s = _quantise(_pool_rows(a, h, w, pool))
                u, f = blob.add(q, s)
                per.append({"u": u, "f": f})
            vis_meta.append({"layer": v, "slices": per})

    # extras
    extra_meta = {}
    for name, maps in extras.items():
        entries = {}
        for k, m in maps.items():
            lo, hi = float(m.min()), float(m.max())
            q = np.rint((m - lo) / (hi - lo) * 255).astype(np.uint8) if hi > lo else np.zeros(m.shape, np.uint8)
            u, f = blob.add(q, np.array([lo, hi], np.float32))
            entries[str(k)] = {"u": u, "f": f, "shape": list(m.shape)}
        extra_meta[name] = entries

    # LLM blocks: decide what fits before computing anything
    T = len(tokens)
    rows = [r for _, r in tokens]
    heads_per_layer = {}
    for l in layers:
        name = hook_name("llm", l)
        info, t = record.index.get(name, {}), record.tensors[name]
        red = info.get("reduce") or "none"
        heads_per_layer[l] = [red] if red != "none" else (
            list(range(t.shape[0])) if info.get("heads") is None else [int(x) for x in info["heads"]])
    head_sets = {tuple(v) for v in heads_per_layer.values()}
    same_heads = len(head_sets) == 1
    head_labels = list(next(iter(head_sets))) if same_heads else []
    per_head = same_heads and all(isinstance(x, int) for x in head_labels)
    L = _n_positions(record)
    n_heads_max = max(len(v) for v in heads_per_layer.values())
    rollout_need = (len(layers) + n_heads_max) * L * L * 8
    hr = ["mean", "max"] if same_heads and per_head else ["mean"]
    roll_ok = rollout_need <= ROLLOUT_BUDGET_BYTES
    if not roll_ok:
        notes.append(f"layer 'rollout' unavailable: needs about {rollout_need / 2**30:.1f} GiB for {L} positions "
                     f"(budget {ROLLOUT_BUDGET_BYTES / 2**30:g} GiB)")
    groups = [("layers with the head mean", [("mean", "mean")] + [(str(l), "mean") for l in layers]
               + ([("rollout", "mean")] if roll_ok else []))]
    if per_head:
        groups.append(("each head with the layer mean", [("mean", str(h)) for h in head_labels] + [("mean", "max")]))
        groups.append(("each layer with the head max", [(str(l), "max") for l in layers]
                       + ([("rollout", "max")] if roll_ok else [])))
        groups.append(("each (layer, head) pair", [(str(l), str(h)) for l in layers for h in head_labels]))
    elif not same_heads:
        notes.append("per-head maps left out: the captured layers keep different heads")
    else:
        notes.append(f"per-head maps unavailable: the record's heads were reduced ({head_labels[0]}) at capture")
    # the token view's columns: every non-image position (text and special tokens), in each block
    txt_pos = np.array([p for p in range(L) if p < len(lay.roles) and lay.roles[p] != "image"], dtype=np.int64)
    K = len(txt_pos)
    budget = int(max_data_bytes) - blob.n_u8 - 4 * blob.n_f32
    per_block = T * (N + K + 8)
    if per_block * len(groups[0][1]) > budget:
        fit = budget // ((N + K + 8) * len(groups[0][1]))
        if fit < 1:
            raise ValueError(f"viewer budget: {len(groups[0][1])} layer maps of {N} image tokens do not fit "
                             f"{max_data_bytes:,} bytes even for one token; pass fewer layers")
        notes.append(f"only the first {fit} of {T} tokens fit the data budget ({max_data_bytes / 2**20:g} MiB)")
        tokens, rows, T = tokens[:fit], rows[:fit], fit
        per_block = T * (N + K + 8)
    chosen, used = [], 0
    for gname, blocks in groups:
        need = per_block * len(blocks)
        if used + need <= budget:
            chosen += blocks
            used += need
        else:
            notes.append(f"left out to stay within the data budget: {gname} ({len(blocks)} maps x {T} tokens x "
                         f"{N} image + {K} text tokens = {need / 2**20:.1f} MiB)")
    want = set(chosen)
    sink_pos = _sink_positions(record, sinks, rows, layers)

    # compute, one layer at a time
    vec: Dict[Tuple[str, str], np.ndarray] = {}
    shares: Dict[Tuple[str, str], np.ndarray] = {}
    roles = ("image", "text", "special")
    acc = {}
    sink_acc = np.zeros(len(sink_pos or ()))

    txt_vec: Dict[Tuple[str, str], np.ndarray] = {}
    txt_ok = [bool(txt_pos.size)]

    def put(key, full, sh):  # full: [T, L] rows over all positions
        if key in want:
            vec[key] = full[:, img_pos]
            txt_vec[key] = full[:, txt_pos]
            shares[key] = sh

    def add(key, full, sh):
        if key in want:
            a = acc.setdefault(key, [0.0, 0.0])
            a[0] = a[0] + full
            a[1] = a[1] + sh

    def role_stack(w, cov):  # [..., T, 3 or 4]: image, text, special (and sink) shares
        rs = am.row_role_shares(w, cov, lay, rows)
        sink = w[..., sink_pos].sum(-1) if sink_pos else None
        if sink_pos and not cov[sink_pos].all():  # a sink's column was not captured: not measurable
            sink = np.full_like(sink, np.nan)
        cols = [rs[r] for r in roles] + ([sink] if sink_pos else [])
        return np.stack(cols, -1)

    any_head = any((k[1] not in ("mean", "max")) for k in want)
    for l in tqdm(layers, desc="viewer: LLM layers", disable=not progress, leave=False):
        w, cov, _ = am.llm_attention_rows(record, l, rows, heads=None, head_reduce=None)  # [Hk, T, L]
        miss = img_pos[~cov[img_pos]]
        if miss.size:
            raise ValueError(f"{hook_name('llm', l)} lacks the key columns of image {image_index}'s tokens "
                             f"(positions {miss[0]}..{miss[-1]}); capture cols including image tokens")
        if w.shape[-1] != L:
            raise ValueError(f"{hook_name('llm', l)}: rows span {w.shape[-1]} positions, expected {L}")
        txt_ok[0] = txt_ok[0] and bool(cov[txt_pos].all())
        for hn in hr:
            if (str(l), hn) not in want and ("mean", hn) not in want:
                continue
            red = w.mean(0) if hn == "mean" else w.max(0)
            sh = role_stack(red, cov)
            put((str(l), hn), red, sh)
            add(("mean", hn), red, sh)
            if hn == "mean" and sink_pos:
                sink_acc += red[:, sink_pos].mean(0)
        if per_head and any_head:
            sh_h = role_stack(w, cov)
            for i, h in enumerate(head_labels):
                put((str(l), str(h)), w[i], sh_h[i])
                add(("mean", str(h)), w[i], sh_h[i])
        del w
    for key, (img, sh) in acc.items():
        put(key, img / len(layers), sh / len(layers))
    for hn in hr:
        if ("rollout", hn) not in want:
            continue
        try:  # attention_map says what the record lacks (e.g. rows that are not a full square)
            R = am.llm_rollout(record, layers, None, hn)
        except ValueError as e:
            notes.append(f"layer 'rollout' unavailable: {e}")
            break
        if R.ndim != 2 or R.shape[0] <= max(rows) or R.shape[1] > L:
            raise ValueError(f"llm_rollout returned shape {list(R.shape)}; expected rows up to {max(rows)} "
                             f"of {L} positions")
        # a chat record's last token is never fed: the rollout covers the positions before it
        R = np.pad(R[rows], ((0, 0), (0, L - R.shape[1])))
        put(("rollout", hn), R, role_stack(R, np.ones(L, dtype=bool)))
        del R
    chosen = [k for k in chosen if k in vec]
    blocks = {}
    for key in chosen:
        q, s = _quantise(vec[key])
        u, f = blob.add(q, s)
        blocks[f"{key[0]}|{key[1]}"] = {"u": u, "f": f, "sh": _shares_json(shares[key])}
        if txt_ok[0]:  # the token view: the row over the text / special columns
            blocks[f"{key[0]}|{key[1]}"]["x"] = dict(zip(("u", "f"), blob.add(*_quantise(txt_vec[key]))))
    if not txt_ok[0]:
        notes.append("token view unavailable: the record lacks the LLM's text columns (capture cols='all')")
    u8, f32 = blob.encode()
    layer_opts = ["mean"] + [str(l) for l in layers] + ["rollout"]
    head_opts = ["mean", "max"] + ([str(h) for h in head_labels] if per_head else [])
    sink_list = None if sink_pos is None else [
        {"position": p, "token": token_text(lay.tokens[p]), "role": lay.roles[p],
         "share": round(float(sink_acc[i] / len(layers)), 4)} for i, p in enumerate(sink_pos)]
    data = {
        "format": "minicpmv-attn.viewer/1",
        "image_size": [W, H], "display": list(_display_size((W, H), DISPLAY_SIDE)), "grid_side": GRID_SIDE,
        "tokens": [{"pos": p, "row": r, "text": token_text(lay.tokens[p])} for p, r in tokens],
        "token_desc": token_desc, "n_image_tokens": N, "slices": res_meta,
        "text_cols": ([{"pos": int(p), "text": token_text(lay.tokens[p])} for p in txt_pos] if txt_ok[0] else None),
        "layers": layer_opts, "heads": head_opts, "blocks": blocks,
        "vision": {"pool": pool, "layers": vis_meta}, "through_vision": thru_meta,
        "extras": extra_meta, "sinks": sink_list, "notes": notes,
        "sink_image": [int(i) for i in np.nonzero(np.isin(img_pos, sink_pos or []))[0]],
        "prompt": prompt if prompt is not None else record.meta.get("prompt"),
        "answer": answer if answer is not None else record.meta.get("answer"),
    }
    return Viewer(data=data, u8=u8, f32=f32, image_jpeg=_display_jpeg(image, (W, H)), notes=notes,
                  seconds=time.time() - t0)


# ----------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------
def _script_json(obj) -> str:
    """JSON safe inside a <script> element."""
    s = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_viewer(viewer: Viewer, *, title: str = "Attention viewer", header_html: str = "",
                  footer_html: str = "") -> str:
    """The page as a string. ``header_html`` / ``footer_html``: trusted HTML put above and below
    the viewer (the main command puts its facts and its static plots there)."""
    esc = text
    d = viewer.data
    img = (f"<img id=photo alt='the image (downsampled)' src='data:image/jpeg;base64,{viewer.image_jpeg}'>"
           if viewer.image_jpeg else "<div id=photo class=noimg>no image given: maps drawn on grey</div>")
    notes = "".join(f"<li>{esc(n)}</li>" for n in viewer.notes)
    sinks = d.get("sinks")
    if sinks is None:
        sink_html = ("<p class=dim>Known sinks: not computed (no <code>attention_map.find_sinks</code> in this "
                     "version; pass <code>sinks=</code> to <code>write_viewer</code>).</p>")
    else:
        sink_html = "<p><b>Known sinks</b> (mean share over layers, heads and the shown tokens): " + (", ".join(
            f"{s['position']} {esc(repr(s['token']))} ({s['role']}" + (f", share {s['share']:.3f}" if s['share'] is not None
                                                                        else "") + ")" for s in sinks) or "none") + "</p>"
    prompt = d.get("prompt")
    answer = d.get("answer")
    qa = ((f"<p><b>Prompt:</b> <span id=prompt>{esc(prompt)}</span></p>" if prompt else "")
          + (f"<p><b>Answer:</b> <span id=answer>{esc(answer)}</span></p>" if answer else ""))
    thru_off = next((n for n in viewer.notes if n.startswith(THROUGH_VISION_UNAVAILABLE)), None)
    thru = ("<label title=\"" + esc(thru_off if thru_off else
                                     "follow the resampler's patches back through the SigLIP rollout (all vision "
                                     "layers, head mean): attention_map.image_heatmap's through_vision") +
            f"\"><input id=thruvision type=checkbox{' disabled' if thru_off else ''}> through SigLIP</label>")
    return fill(page_file("page.html"), {
        "TITLE": esc(title), "THRU": thru, "HEADER": header_html, "QA": qa, "PHOTO": img,
        "NOTES": f"<ul class=notes>{notes}</ul>" if notes else "", "SINKS": sink_html, "FOOTER": footer_html,
        "CSS": page_file("viewer.css"), "JS": page_file("viewer.js"), "DATA": _script_json(d), "U8": viewer.u8,
                        "F32": viewer.f32, "LUT": _lut()})


def _shares_json(a: np.ndarray) -> list:
    """Role shares rounded for the page; a share the record cannot give (its key columns were not
    captured, e.g. ``cols="image"``: NaN) is null, which JSON allows and the page shows as such."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(a), np.round(a, 4), None).tolist()


def _lut() -> str:
    """The inferno colour map as 256 x RGB hex (matplotlib, imported only here)."""
    from matplotlib import colormaps

    rgb = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    return rgb.tobytes().hex()


def write_viewer(record: AttentionRecord, image, path: str, *, title: str = "Attention viewer",
                 header_html: str = "", footer_html: str = "", **kwargs) -> Viewer:
    """Build the viewer of ``record`` on ``image`` (see :func:`build_viewer` for the options)
    and write it atomically to ``path`` (one self-contained HTML file). Returns the
    :class:`Viewer` (``notes``: what the budget left out)."""
    v = build_viewer(record, image, **kwargs)
    atomic_write_text(path, render_viewer(v, title=title, header_html=header_html, footer_html=footer_html))
    return v


def read_viewer_data(page: str) -> Dict[str, Any]:
    """The data embedded in a viewer page (its text): the JSON plus ``u8`` (uint8 array) and
    ``f32`` (float32 array) decoded, for checks and notebooks."""
    def between(tag):
        start = page.index(f'id="{tag}"')
        a = page.index(">", start) + 1
        return page[a: page.index("</script>", a)]

    data = json.loads(between("viewer-data"))
    data["u8"] = np.frombuffer(base64.b64decode(between("viewer-u8")), dtype=np.uint8)
    data["f32"] = np.frombuffer(base64.b64decode(between("viewer-f32")), dtype="<f4")
    return data


def view_record(record_path: str, image: Optional[str], out: str, *, max_tokens: Optional[int] = None,
                layers: Optional[str] = None, progress: bool = True) -> Tuple[str, Viewer]:
    """The ``view`` command: load the record at ``record_path`` (stem, ``.json`` or
    ``.safetensors``), draw its maps on ``image`` (only the image the user names: the path in the
    record's meta is never opened, since a record from someone else could name a private file
    that the page would then carry; without ``image`` the maps are drawn on grey, with a note) and
    write ``out/index.html``. Raises ``ToolError`` with one line naming the problem."""
    from ..attention_record import RecordError
    from ..capture import parse_index_list
    from .pipeline import ToolError, open_image

    try:
        rec = AttentionRecord.load(record_path)
    except (FileNotFoundError, RecordError) as e:
        raise ToolError(str(e)) from None
    if rec.layout is None:
        raise ToolError(f"record {record_path}: has no token layout; the viewer needs one")
    src, pic = image, None
    if src:
        try:
            pic = open_image(src)
        except (ValueError, OSError) as e:
            raise ToolError(f"--image {src}: {e}") from None
    try:
        layer_list = parse_index_list(layers, "layers")
        title = "Attention viewer: " + os.path.basename(record_path.rstrip("/"))
        path = os.path.join(os.path.abspath(out), "index.html")
        header = _facts_html(rec, os.path.basename(src) if src else None)
        v = write_viewer(rec, pic, path, title=title, header_html=header, layers=layer_list,
                         max_tokens=max_tokens, progress=progress)
    except ValueError as e:
        raise ToolError(str(e)) from None
    named = rec.meta.get("image")
    if not image and isinstance(named, str) and named:
        v.notes.append(f"no image given: the maps are drawn on grey (the record names {named!r}; pass --image to "
                       f"draw on it: the record's own path is never opened)")
    return path, v


def _facts_html(rec: AttentionRecord, image_name: Optional[str]) -> str:
    esc = text
    ims = rec.layout.images
    size = f" ({ims[0].size[0]} x {ims[0].size[1]} px)" if ims else ""
    model = rec.meta.get("model") or "?"
    return (f"<p><b>Model:</b> {esc(os.path.basename(str(model).rstrip('/')) or str(model))}<br>"
            f"<b>Image:</b> {esc(image_name or 'not given')}{esc(size)}<br>"
            f"<b>Captured:</b> {esc(', '.join(rec.names()[:6]) + (' ...' if len(rec.names()) > 6 else ''))}</p>")
