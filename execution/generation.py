"""Old path of `execution.inference.generation`, kept for one release; import from there."""

from execution.inference.generation import *  # noqa: F401,F403
