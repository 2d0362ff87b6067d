"""Keeping in step with upstream and with transformers (tools; never shipped as remote code).

* ``pin``: the pin (``UPSTREAM.json``, installed as ``minicpmv_attn.patches``): load, compare
  upstream files with it, write a new one; obtaining an upstream copy.
* ``inventory``: the AST symbol inventory of a module, the diff of two, the pinned snapshot of upstream's.
* ``loader``: a folder of flat remote code loaded as a fresh package, with upstream's shims.
* ``parity``: structural (meta device) and numeric (random weights) parity fork vs upstream; upstream's
  side runs here or in another interpreter (``--upstream-python``).
* ``upstream_run``: what runs on upstream's side (its code is executed), in-process or as a script.
* ``transformers_check``: the installed transformers vs its pinned snapshot.
* ``diff``: the whole diff (``run_diff``) and the transformers-only check.
* ``report``: findings and the summary table.
* ``install``: install the fork's remote code into a checkpoint folder, and restore it.
* ``transformers_sweep``: the compatibility sweep over transformers releases and CI's canary.
* ``common``: progress logs, hashes, JSON reading, the package folder.
"""
