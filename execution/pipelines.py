"""Old path of `execution.inference.pipelines`, kept for one release; import from there."""

from execution.inference.pipelines import *  # noqa: F401,F403
