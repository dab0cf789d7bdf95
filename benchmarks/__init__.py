"""Benchmarks: this project and Hugging Face transformers on the same work, in one run.

`python -m benchmarks.run_all` measures the machine's limits, then training, generation and the
data layer, and prints ours / theirs / ratio / fraction of the machine's limit.
"""
