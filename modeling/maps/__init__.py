"""The attention maps of one record: the room below both ``analysis`` (the tools) and ``demo``.

* ``image_geometry``: token table, patch boxes, placing a patch map into the original image;
* ``rows``: the row convention, reading LLM rows, attention rollout;
* ``shares``: shares per token role, attention sinks, a record at a glance;
* ``heatmap``: resampler maps, LLM -> image heatmaps (optionally through SigLIP), SigLIP maps;
* ``relevancy``: gradient-weighted relevancy maps;
* ``describe``: one-line descriptions of a heatmap.

The public names are re-exported from ``minicpmv_attn.analysis.attention_map`` and
``minicpmv_attn.analysis.relevancy``, where the README shows them.
"""
