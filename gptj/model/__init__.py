"""A hand-built GPT-J with explicit tensor parallelism.

    from gptj.model import GPTJ, ModelConfig, ParallelContext
    model = GPTJ(ModelConfig.preset("tiny")).init_weights(seed=0)
"""

from .config import ConfigError, ModelConfig
from .model import GPTJ
from .parallel import ParallelContext

__all__ = ["GPTJ", "ConfigError", "ModelConfig", "ParallelContext"]
