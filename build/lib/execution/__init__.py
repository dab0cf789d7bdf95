"""Where the model meets data and hardware: distributed setup, training, optimizer sharding,
host offload, checkpoints, evaluation and the generation engine."""
