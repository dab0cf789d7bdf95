"""Where the model meets data and hardware: distributed setup, training, optimizer sharding,
host offload, checkpoints, evaluation and the generation engine."""

from .project_imports import claim_project_packages

claim_project_packages()  # before any module here imports `data` or `config`
