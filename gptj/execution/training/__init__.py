"""Training: the loop (`loop.py`: `train`), the sharded optimizer step and loss scaling,
checkpoints and resuming, evaluation, LoRA runs and the layout planner."""
