"""Shared by training and inference: hardware detection and defaults, distributed setup,
the one model loader, host offload, input checks that run before any work, and the
project-import guard."""
