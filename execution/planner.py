"""Old path of `execution.training.planner`, kept for one release; import from there."""

from execution.training.planner import *  # noqa: F401,F403
from execution.training.planner import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
