"""The embedded default: a tiny seeded MiniCPM-V-2.6 and its tokenizer, built locally (never shipped)."""
