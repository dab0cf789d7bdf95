"""Where the model meets data and hardware, in three parts: `runtime/` (what both sides share:
the one model loader, hardware and defaults, distributed setup, host offload, input checks),
`training/` (the loop, the optimizer step, checkpoints, evaluation, LoRA runs, the planner) and
`inference/` (the request engine where every token is chosen, its offline driver, sampling,
scoring, the pipelines, quantized checkpoints)."""
