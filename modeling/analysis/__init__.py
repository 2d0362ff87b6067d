"""From captured attention to pixels, plots, reports and dataset extraction (tools; never shipped)."""
