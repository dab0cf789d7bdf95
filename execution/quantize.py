"""Old path of `execution.inference.quantized_checkpoints`, kept for one release; import from there."""

from execution.inference.quantized_checkpoints import *  # noqa: F401,F403
from execution.inference.quantized_checkpoints import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
