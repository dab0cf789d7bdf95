"""GPT-J built by hand: fine-tune and serve with every byte accounted for.

The layers are subpackages, and imports only point downwards:

    gptj.model       the model as plain modules, every collective, the shard table (imports no other layer)
    gptj.data        tasks -> tokens -> numpy batches (numpy only, never torch)
    gptj.config      YAML presets and the loader that validates them
    gptj.execution   runtime/ (shared by both sides), training/, inference/
    gptj.serving     the OpenAI-compatible HTTP server (nothing imports it but the commands)
    gptj.commands    the command lines: gptj-finetune, gptj-generate, gptj-serve

This file imports nothing, so `import gptj.data` stays free of torch.
"""
