"""The `gptj-serve` command as a script beside the sources (`python run_server.py --help`; torchrun takes it too)."""

import sys

from gptj.commands.serve import main

if __name__ == "__main__":
    sys.exit(main())
