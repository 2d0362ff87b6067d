"""Fine-tuning with attention outputs: data, losses, LoRA, checkpoints, the loop (tools; never shipped)."""
