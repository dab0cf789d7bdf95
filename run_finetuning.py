"""The `gptj-finetune` command as a script beside the sources (`python run_finetuning.py --help`; torchrun takes it too)."""

import sys

from gptj.commands.finetune import main

if __name__ == "__main__":
    sys.exit(main())
