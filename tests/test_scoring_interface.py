"""Scoring reaches the model through GPTJ's interface (config, device, hidden_states,
logits_from_hidden), never through its embedding: a model that exposes the interface alone
scores exactly as the model it stands for."""

from __future__ import annotations

import pytest
import torch

from gptj.execution.inference.scoring import score_candidates, score_rows
from gptj.model import GPTJ, ModelConfig


class InterfaceOnly:
    """A GPTJ seen through its public interface: its modules (the embedding among them) hidden."""

    HIDDEN = ("embed", "blocks", "ln_f", "lm_head")

    def __init__(self, model: GPTJ):
        self._model = model

    def __getattr__(self, name):
        if name in self.HIDDEN:
            raise AttributeError(f"the model's {name} is not part of its interface")
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def model() -> GPTJ:
    return GPTJ(ModelConfig.preset("tiny")).init_weights(seed=5).eval()


def test_rows_score_the_same_through_the_interface(model):
    rows, starts = [[5, 9, 11, 40, 2], [7, 7, 3]], [2, 1]
    want = score_rows(model, rows, starts, top_k=3)
    got = score_rows(InterfaceOnly(model), rows, starts, top_k=3)
    for a, b in zip(want, got):
        assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.top_ids, b.top_ids)


def test_candidates_score_the_same_through_the_interface(model):
    prompts, candidates = [[5, 9, 11], [4]], [[[40, 2], [8]], [[1, 2, 3]]]
    want = score_candidates(model, prompts, candidates)
    got = score_candidates(InterfaceOnly(model), prompts, candidates)
    for row_a, row_b in zip(want, got):
        for a, b in zip(row_a, row_b):
            assert torch.equal(a.logprobs, b.logprobs)
