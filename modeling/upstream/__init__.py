"""Keeping in step with upstream and with transformers (tools; never shipped as remote code)."""
