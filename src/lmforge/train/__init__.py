"""Training: the one loop (loop.py) and what drives it: pre-training objectives (objectives.py, pretrain.py),
fine-tuning (finetune.py, lora.py), torchrun set-up (dist.py), run folders (runs.py), metrics and plots."""
