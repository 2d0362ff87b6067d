"""Map captured attention back onto tokens, slices, patches and the original image.

Everything here reads an :class:`~.attention_record.AttentionRecord` (one sample)
and returns numpy arrays; nothing is plotted (see ``plotting.py``).

This module is the public face: it re-exports every name (private helpers too, so code that
imported them from here keeps working) of the four modules of the ``maps`` room
(``modeling/maps/``, the layer below both ``analysis`` and ``demo``) that own them, each with
its own docstring on the conventions it owns:

* ``image_geometry.py``: the token table (LLM position -> image, slice, resampler query),
  patch boxes on the original image, placing a slice's patch map into the image.
* ``rows.py``: the one row convention (:func:`resolve_rows`), reading layers / heads / rows
  of a captured tensor, :func:`llm_attention_rows`, attention rollout.
* ``shares.py``: shares per token role, attention sinks, a record at a glance.
* ``heatmap.py``: resampler query maps, :func:`image_heatmap` (optionally through the
  SigLIP rollout) and the vision tower's own patch maps.

Conventions for errors: whatever is missing (a stage, a layer, a head, a query row,
key columns, the layout) is named in a ``ValueError``, with how to capture it.
"""
from __future__ import annotations

from ..maps.heatmap import (  # noqa: F401  (re-exported, private helpers too)
    ImageHeatmap, _resampler, _slice_axis, _slice_pos, _vision_map, compose_vision_rollout,
    image_heatmap, place_token_weights, query_patch_map, resampler_query_maps, vision_attention,
    vision_patch_map, vision_received_map, vision_rollout,
)
from ..maps.image_geometry import (  # noqa: F401  (re-exported, private helpers too)
    ImageToken, _axis_weights, _need_layout, _patch_rc, find_slice, image_token_table,
    lookup_image_token, patch_box, patch_boxes, place_patch_map,
)
from ..maps.rows import (  # noqa: F401  (re-exported, private helpers too)
    HeadSel, LayerSel, _as_list, _f64, _fed_square, _idx, _positions, _reduce_heads, _select_heads,
    _seq_len, _span, _squeeze, _stage_layers, _tensor, fed_length, llm_attention_rows, llm_rollout,
    prompt_length, resolve_rows, rollout,
)
from ..maps.shares import (  # noqa: F401  (re-exported, private helpers too)
    RoleShares, SINK_FACTOR, Sink, SinkShares, _drop_sinks, _json_num, _layer_rows, _role_masks,
    find_sinks, format_record_summary, record_summary, role_shares, row_role_shares, sink_shares,
)

__all__ = [
    "ImageToken", "ImageHeatmap", "RoleShares",
    "image_token_table", "lookup_image_token", "find_slice", "patch_box", "patch_boxes",
    "place_patch_map", "llm_attention_rows", "rollout", "llm_rollout",
    "resampler_query_maps", "query_patch_map", "image_heatmap", "row_role_shares",
    "role_shares", "vision_attention", "vision_rollout", "vision_patch_map",
    "vision_received_map", "compose_vision_rollout", "prompt_length", "fed_length", "resolve_rows", "SinkShares", "Sink",
    "SINK_FACTOR", "find_sinks", "sink_shares", "record_summary", "format_record_summary",
]

_TAM_NAMES = ("token_activation_map", "token_activation_maps", "token_activation", "rank_gaussian_filter", "TAM_KIND")


def __getattr__(name):  # the Token Activation Map lives in maps/token_activation.py; re-exported lazily here
    if name in _TAM_NAMES:
        from ..maps import token_activation
        return getattr(token_activation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
