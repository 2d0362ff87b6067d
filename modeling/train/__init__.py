"""Fine-tuning with attention outputs: data, losses, LoRA, checkpoints, the loop (tools; never shipped).

What ``scripts/finetune_attention.py`` runs, importable for notebooks and tests:

* :mod:`.data`: the JSONL data set, the built-in examples, examples -> model inputs.
* :mod:`.model`: loading the model, the LLM layer selection, activation checkpointing, peft LoRA.
* :mod:`.losses`: ``LossConfig``, the box grounding KL and the teacher distillation KL.
* :mod:`.forward`: one example through the model (LM + attention loss), answer-row records.
* :mod:`.checkpoints`: save / find / restore checkpoints (weights, optimizer, RNG state).
* :mod:`.loop`: ``TrainConfig``, ``train`` (resumable) and ``evaluate``.
* :mod:`.figures`: before / after heatmaps of the answer rows' attention.
* :mod:`.run`: one run as the command line does it (``FinetuneOptions``, ``run_finetune``).

peft, tqdm and matplotlib are imported only where used.
"""
