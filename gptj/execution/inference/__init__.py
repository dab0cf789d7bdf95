"""Inference: the request engine (where a token is chosen), its offline driver,
sampling, token scoring, the pipelines, quantized checkpoints and the CLI options."""
