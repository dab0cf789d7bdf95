"""Log-probabilities of given tokens: the one scoring path of evaluation, the entailment
pipeline and the server's `echo` + `logprobs`.

Every score comes out of `token_logprobs`: final hidden states (ln_f output) through the
lm_head and a log-softmax in fp32, a few rows at a time, so a long prompt never holds its
[tokens, vocab] logits at once. Under tensor parallelism the vocab shards are gathered chunk
by chunk (every rank runs the same chunks) and every rank gets the same numbers.

    token_logprobs(model, hidden, targets, top_k)   hidden [N, d] -> log p(target) [N] (+ top-k)
    score_rows(model, rows, starts, top_k)          one forward over right-padded rows
    continuation_logprobs(model, prompts, continuations)
                                                    summed log p(continuation | prompt)

The server scores a prompt from the hidden states of the very prefill that fills its KV cache
(gptj/execution/inference/request_engine.py) with `token_logprobs` too, so its numbers and these agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# fp32 logits per chunk: [rows, vocab] with rows = SCORE_CHUNK_ELEMENTS // vocab (166 rows of
# GPT-J's 50400-token vocabulary, 32 MiB).
SCORE_CHUNK_ELEMENTS = 1 << 23


@dataclass
class TokenScores:
    """Scores of N tokens, on the CPU: log p of each target, and the top_k most likely tokens
    at each position with their log-probabilities ([N, k]; None when top_k is 0)."""

    logprobs: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None

    def entries(self) -> list[tuple[float, list[tuple[int, float]]]]:
        """(log p(target), [(token, log p), ...] best first) per position, as plain numbers."""
        values = self.logprobs.tolist()
        if self.top_ids is None:
            return [(v, []) for v in values]
        tops = [list(zip(ids, lps)) for ids, lps in zip(self.top_ids.tolist(), self.top_logprobs.tolist())]
        return list(zip(values, tops))

    def greedy(self) -> bool:
        """Whether every target is the most likely token at its position (as lm-eval decides:
        the target's log-probability equals the best one; needs top_k >= 1)."""
        if self.top_logprobs is None:
            raise ValueError("greedy() needs the top-1 token: score with top_k >= 1")
        return bool((self.logprobs >= self.top_logprobs[:, 0]).all())


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, top_k: int = 0) -> TokenScores:
    """log p(targets[i]) from hidden[i] ([N, d] final hidden states), through the lm_head and an
    fp32 log-softmax over the real vocabulary, at most SCORE_CHUNK_ELEMENTS logits at a time.
    The target's value and the top-k values are read from the same log-softmax, so a target
    that is the most likely token has exactly the top-1 value."""
    vocab = model.config.vocab_size
    if not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [0, {vocab}], got {top_k}")
    rows = max(1, SCORE_CHUNK_ELEMENTS // vocab)
    targets = targets.to(hidden.device)
    values, top_ids, top_values = [], [], []
    for start in range(0, hidden.shape[0], rows):
        logp = model.logits_from_hidden(hidden[start:start + rows]).float().log_softmax(-1)
        values.append(logp.gather(-1, targets[start:start + rows, None])[:, 0].cpu())
        if top_k:
            best = torch.topk(logp, top_k, dim=-1)
            top_ids.append(best.indices.cpu())
            top_values.append(best.values.cpu())
    if not values:  # no positions: empty results of the right shapes
        empty = torch.zeros(0, top_k)
        return TokenScores(torch.zeros(0), empty.long() if top_k else None, empty if top_k else None)
    return TokenScores(torch.cat(values), torch.cat(top_ids) if top_k else None,
                       torch.cat(top_values) if top_k else None)


def _check_rows(rows: list[list[int]], starts: list[int], context: int) -> None:
    if len(rows) != len(starts):
        raise ValueError(f"{len(rows)} rows but {len(starts)} start positions")
    for i, (row, start) in enumerate(zip(rows, starts)):
        if len(row) > context:
            raise ValueError(f"row {i} has {len(row)} tokens but the model context is {context}")
        if not 1 <= start <= len(row):
            raise ValueError(f"row {i}: scoring starts at token {start}, expected 1..{len(row)} "
                             "(the first token has no prediction)")


@torch.inference_mode()
def score_rows(model, rows: list[list[int]], starts: list[int], top_k: int = 0) -> list[TokenScores]:
    """Scores of tokens rows[i][starts[i]:] given the tokens before them, for every row, from
    one forward over the right-padded batch (padding comes after every real token, so plain
    causal attention is exact) and `token_logprobs` over the scored positions only."""
    _check_rows(rows, starts, model.config.max_positions)
    device = model.embed.weight.device
    ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    hidden = model.hidden_states(ids.to(device))
    # Position t predicts token t + 1: row i's scored tokens are predicted at starts[i]-1 .. len-2.
    which = [(i, t) for i, (row, start) in enumerate(zip(rows, starts)) for t in range(start - 1, len(row) - 1)]
    batch_index = torch.tensor([i for i, _ in which], dtype=torch.long, device=device)
    position = torch.tensor([t for _, t in which], dtype=torch.long, device=device)
    targets = ids.to(device)[batch_index, position + 1]
    scores = token_logprobs(model, hidden[batch_index, position], targets, top_k)
    out, offset = [], 0
    for row, start in zip(rows, starts):
        n = len(row) - start
        part = slice(offset, offset + n)
        out.append(TokenScores(scores.logprobs[part],
                               None if scores.top_ids is None else scores.top_ids[part],
                               None if scores.top_logprobs is None else scores.top_logprobs[part]))
        offset += n
    return out


def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]],
                          max_rows: int | None = None) -> torch.Tensor:
    """[N] summed log p(continuations[i] | prompts[i]) (fp32, CPU), `max_rows` rows per forward
    (None: all at once)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        if not p or not c:
            raise ValueError(f"pair {i}: the {'prompt' if not p else 'continuation'} is empty")
    step = max_rows or max(1, len(prompts))
    sums = []
    for start in range(0, len(prompts), step):
        chunk_p, chunk_c = prompts[start:start + step], continuations[start:start + step]
        rows = [list(p) + list(c) for p, c in zip(chunk_p, chunk_c)]
        scored = score_rows(model, rows, [len(p) for p in chunk_p])
        sums.extend(s.logprobs.sum() for s in scored)
    return torch.stack(sums) if sums else torch.zeros(0)
