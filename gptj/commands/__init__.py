"""The command lines: `gptj-finetune`, `gptj-generate`, `gptj-serve` (also `python run_*.py` beside the sources)."""
