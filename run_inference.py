"""The `gptj-generate` command as a script beside the sources (`python run_inference.py --help`; torchrun takes it too)."""

import sys

from gptj.commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
