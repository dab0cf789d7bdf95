"""Log-probabilities of given tokens: the one scoring path of evaluation, the entailment
pipeline and the server's `echo` + `logprobs`.

Every score comes out of `token_logprobs`: final hidden states (ln_f output) through the
lm_head and a log-softmax in fp32, a few rows at a time, so a long prompt never holds its
[tokens, vocab] logits at once. Under tensor parallelism the vocab shards are gathered chunk
by chunk (every rank runs the same chunks) and every rank gets the same numbers.

    token_logprobs(model, hidden, targets, top_k)   hidden [N, d] -> log p(target) [N] (+ top-k)
    score_rows(model, rows, starts, top_k)          one forward over right-padded rows
    score_candidates(model, prompts, candidates, top_k, prefix=None)
                                                    every candidate continuation of every prompt,
                                                    the prompt prefilled once (see below)
    candidate_logprobs(model, prompts, candidates)  [N, K] summed log p(candidate k | prompt n)
    choose(model, prompts, candidates)              per prompt: summed log-likelihoods, the choice
                                                    log-probabilities and the chosen candidate
    continuation_logprobs(model, prompts, continuations)
                                                    summed log p(continuation | prompt), pairs

Candidates of one prompt are scored in one forward over a single row holding the prompt and
then every candidate, one after another: a candidate's tokens take the positions that follow
the prompt (as if it were alone after it) and attend to the prompt and to their own earlier
tokens only (`candidate_mask`). The prompt's keys and values are computed once for all of its
candidates, and every candidate's numbers are those of scoring it alone after the prompt.

A choice among candidates (a label, a guided choice) is decided by `choice_logprobs`: each
candidate's probability when the model must answer with one of the candidates, token by token
(its next-token probability renormalised over the tokens that continue some candidate there).
The summed log-likelihood alone favours shorter candidates whenever the model spreads its
probability: a model that puts at most 1.5% on any token loses ~4.2 nats per extra token.

With a prefix cache (`PrefixReuse`: the server's, or a pipeline's own), the full blocks of a
prompt already computed (the demonstrations of a few-shot prompt, say) are copied into a KV
cache row and only the rest of the prompt runs, then its candidates, behind the same mask; the
prompt's blocks are stored for the next call. Prompts of one call that share more blocks with
an earlier prompt of the call than the pool holds run in a later pass, after it stored them.

The server scores a prompt from the hidden states of the very prefill that fills its KV cache
(gptj/execution/inference/request_engine.py) with `token_logprobs` too, so its numbers and these agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptj.execution.inference.prefix_cache import PrefixCache
from gptj.model.kv_cache import StaticKVCache, kv_bytes_per_token

# fp32 logits per chunk: [rows, vocab] with rows = SCORE_CHUNK_ELEMENTS // vocab (166 rows of
# GPT-J's 50400-token vocabulary, 32 MiB).
SCORE_CHUNK_ELEMENTS = 1 << 23
# Scoring from a prefix cache holds every row's whole KV (its prefix copied in) during the
# forward: rows go in groups of at most this many bytes of it (a GPT-J 6B row of 300 tokens
# takes 0.27 GiB in fp32), a row alone when it is larger.
PREFIX_SCORING_KV_BYTES = 1 << 30


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
    device = model.device
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


def candidate_mask(groups: torch.Tensor, starts: list[int] | None = None, window: int | None = None) -> torch.Tensor:
    """Bool [B, 1, S, T] over rows laid out as prompt, candidate 1, candidate 2, ..., padding.

    groups [B, S]: 0 for a prompt token, k >= 1 for candidate k's tokens, -1 for padding.
    A query sees earlier keys of its own group, and a candidate's query sees the whole prompt
    as well; no real token sees padding. starts: per row, how many prompt tokens a KV cache
    already holds before the fed ones (a prefix cache's hit): row b's tokens sit at slots
    starts[b].. and the keys are its slots 0..window-1 (T = window). None: nothing cached,
    T = S. A padding query sees padding, or slot 0 (a prompt token) when cached: never an
    empty softmax row."""
    device, seq = groups.device, groups.shape[1]
    if starts is None:
        slots = torch.arange(seq, device=device)
        query_slot, key_slot, key_groups = slots[None, :], slots, groups
    else:
        first = torch.tensor(starts, device=device)[:, None]
        query_slot, key_slot = first + torch.arange(seq, device=device), torch.arange(window, device=device)
        fed = key_slot[None, :] - first  # [B, T]: the fed token a slot holds (< 0: cached prompt)
        key_groups = torch.where(fed < 0, 0, groups.gather(1, fed.clamp(0, seq - 1)))
        key_groups = key_groups.masked_fill(fed >= seq, -1)
    causal = key_slot[None, None, :] <= query_slot[:, :, None]
    query, key = groups.unsqueeze(2), key_groups.unsqueeze(1)
    prompt_key = (key == 0) & (query > 0)
    mask = causal & ((query == key) | prompt_key)
    if starts is not None:
        mask |= (query == -1) & (key_slot == 0)
    return mask.unsqueeze(1)


@dataclass
class PrefixReuse:
    """Where candidate scoring takes and leaves prompt blocks (prefix_cache.py): the pool, the
    LoRA adapter the prompts run under (a pool keeps each adapter's blocks apart), the dtype
    the KV is cached in (None: `model_cache_dtype`'s choice), and the byte limit of each store
    (a function, asked at the store: the server's KV budget less its row cache; None: the
    pool's own ceiling)."""

    pool: PrefixCache
    adapter: str | None = None
    cache_dtype: torch.dtype | None = None
    limit: Callable[[], int | None] | None = None


def _check_candidates(prompts: list[list[int]], candidates: list[list[list[int]]], context: int) -> None:
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    for i, (prompt, cands) in enumerate(zip(prompts, candidates)):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if not cands:
            raise ValueError(f"prompt {i} has no candidates")
        for k, cand in enumerate(cands):
            if not cand:
                raise ValueError(f"prompt {i}: candidate {k} is empty")
            if len(prompt) + len(cand) > context:
                raise ValueError(f"prompt {i} with candidate {k} takes {len(prompt) + len(cand)} tokens "
                                 f"but the model context is {context}")


@torch.inference_mode()
def score_candidates(model, prompts: list[list[int]], candidates: list[list[list[int]]], top_k: int = 0,
                     max_rows: int | None = None, prefix: PrefixReuse | None = None) -> list[list[TokenScores]]:
    """Scores of the tokens of candidates[n][k] after prompts[n], for every prompt n and
    candidate k (any number, any lengths), `max_rows` prompts per forward (None: all at once).
    Each prompt is one row: its tokens once, then all of its candidates behind a
    `candidate_mask`; rows are right-padded. The numbers equal `score_rows` of prompt +
    candidate, one candidate at a time. `prefix`: reuse and keep the prompts' full blocks in a
    prefix cache (module docstring)."""
    _check_candidates(prompts, candidates, model.config.max_positions)
    step = max_rows or max(1, len(prompts))
    out: list[list[TokenScores]] = []
    for start in range(0, len(prompts), step):
        part = prompts[start:start + step], candidates[start:start + step]
        out += _score_reusing(model, *part, top_k, prefix) if prefix is not None else _score_candidate_rows(model, *part, top_k)
    return out


def _score_reusing(model, prompts, candidates, top_k, prefix: PrefixReuse) -> list[list[TokenScores]]:
    """`_score_candidate_rows` from and into a prefix cache, in passes: a prompt that shares
    more leading blocks with an earlier prompt of this pass than the pool holds waits for the
    next pass, when they are stored."""
    pool = prefix.pool
    keys = [pool.block_keys(p, prefix.adapter) for p in prompts]
    out: list = [None] * len(prompts)
    for now in pool.passes(keys):
        for group in _kv_groups(model, now, prompts, candidates, prefix):
            scored = _score_candidate_rows(model, [prompts[i] for i in group], [candidates[i] for i in group],
                                           top_k, prefix, [keys[i] for i in group])
            for i, row in zip(group, scored):
                out[i] = row
    return out


def _kv_groups(model, rows: list[int], prompts, candidates, prefix: PrefixReuse) -> list[list[int]]:
    """`rows` in consecutive groups whose KV cache (rows x the longest row) stays within
    PREFIX_SCORING_KV_BYTES."""
    per_token = kv_bytes_per_token(model, prefix.cache_dtype)
    groups, group, longest = [], [], 0
    for i in rows:
        length = len(prompts[i]) + sum(map(len, candidates[i]))
        if group and (len(group) + 1) * max(longest, length) * per_token > PREFIX_SCORING_KV_BYTES:
            groups.append(group)
            group, longest = [], 0
        group.append(i)
        longest = max(longest, length)
    return groups + [group] if group else groups


def _score_candidate_rows(model, prompts, candidates, top_k, prefix: PrefixReuse | None = None,
                          keys: list[list[bytes]] | None = None) -> list[list[TokenScores]]:
    device = model.device
    starts, held = [0] * len(prompts), [[] for _ in prompts]
    if prefix is not None and any(keys):
        pool = prefix.pool
        for b, (prompt, row_keys) in enumerate(zip(prompts, keys)):
            held[b] = pool.take(row_keys)
            # The prompt's last token always runs: it predicts every candidate's first token.
            starts[b] = min(len(held[b]) * pool.block_size, len(prompt) - 1)
        pool.prompt_tokens += sum(map(len, prompts))
        pool.hit_tokens += sum(starts)
    else:
        prefix = None  # no prompt holds a full block: nothing to take or keep
    width = max(len(p) - s + sum(map(len, cands)) for p, s, cands in zip(prompts, starts, candidates))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    positions = torch.zeros(len(prompts), width, dtype=torch.long)
    groups = torch.full((len(prompts), width), -1, dtype=torch.long)
    # (row, index of the fed token whose hidden state predicts it, token) of every scored token.
    rows, at, targets, ends = [], [], [], []
    for b, (prompt, start, cands) in enumerate(zip(prompts, starts, candidates)):
        plen, fed = len(prompt), len(prompt) - start  # the prompt's tokens after the cached ones
        ids[b, :fed] = torch.tensor(prompt[start:])
        positions[b, :fed] = torch.arange(start, plen)
        groups[b, :fed] = 0
        offset = fed
        for k, cand in enumerate(cands, start=1):
            n = len(cand)
            ids[b, offset:offset + n] = torch.tensor(cand)
            positions[b, offset:offset + n] = torch.arange(plen, plen + n)  # as if alone after the prompt
            groups[b, offset:offset + n] = k
            # The first token is predicted by the prompt's last one, the others by their predecessor.
            at += [fed - 1] + list(range(offset, offset + n - 1))
            rows += [b] * n
            targets += cand
            offset += n
        ends.append(start + offset)
    # Padding keeps position 0 and token 0: no real token attends to it.
    ids, positions, groups = ids.to(device), positions.to(device), groups.to(device)
    if prefix is None:
        hidden = model.hidden_states(ids, position_ids=positions, attn_mask=candidate_mask(groups))
    else:
        cache = StaticKVCache.for_model(model, len(prompts), max(ends), dtype=prefix.cache_dtype)
        for b, blocks in enumerate(held):
            if starts[b]:
                cache.write_blocks(b, blocks)
        cache.extend(list(range(len(prompts))), starts, ends)
        hidden = model.hidden_states(ids, position_ids=positions, attn_mask=candidate_mask(groups, starts, max(ends)),
                                     kv_cache=cache)
        limit, size = prefix.limit() if prefix.limit else None, pool.block_size
        for b, row_keys in enumerate(keys):
            pool.store(row_keys, prefix.adapter, lambda j, b=b: cache.read_block(b, j * size, size), limit)
        del cache
    batch_index = torch.tensor(rows, dtype=torch.long, device=device)
    position = torch.tensor(at, dtype=torch.long, device=device)
    scores = token_logprobs(model, hidden[batch_index, position], torch.tensor(targets), top_k)
    out, offset = [], 0
    for cands in candidates:
        mine = []
        for cand in cands:
            part = slice(offset, offset + len(cand))
            mine.append(TokenScores(scores.logprobs[part],
                                    None if scores.top_ids is None else scores.top_ids[part],
                                    None if scores.top_logprobs is None else scores.top_logprobs[part]))
            offset += len(cand)
        out.append(mine)
    return out


def candidate_logprobs(model, prompts: list[list[int]], candidates: list[list[int]],
                       max_rows: int | None = None, prefix: PrefixReuse | None = None) -> torch.Tensor:
    """[N, K] summed log p(candidates[k] | prompts[n]) (fp32, CPU): the same K candidates (e.g.
    a task's labels) after every prompt, each prompt prefilled once (`score_candidates`)."""
    scored = score_candidates(model, prompts, [candidates] * len(prompts), max_rows=max_rows, prefix=prefix)
    if not scored:
        return torch.zeros(0, len(candidates))
    return torch.stack([torch.stack([s.logprobs.sum() for s in row]) for row in scored])


def choice_logprobs(candidates: list[list[int]], scores: list[TokenScores]) -> torch.Tensor:
    """[K] log P(candidate k | the answer is one of the candidates), from each candidate's token
    scores after the same prompt. Candidates sharing a prefix share its conditional
    distributions, so at every step the model's probability of the candidate's next token is
    renormalised over the next tokens of the candidates with the same prefix (a trie walk: the
    distribution constrained decoding samples from, summing to 1 over candidates none of
    which is a prefix of another). Duplicates are a ValueError."""
    if len({tuple(c) for c in candidates}) != len(candidates):
        raise ValueError("the candidates hold the same tokens twice")
    out = torch.zeros(len(candidates))
    for k, cand in enumerate(candidates):
        total = 0.0
        for t in range(len(cand)):
            # log p of every distinct next token among the candidates that share cand[:t].
            allowed = {}
            for j, other in enumerate(candidates):
                if len(other) > t and other[:t] == cand[:t]:
                    allowed.setdefault(other[t], scores[j].logprobs[t])
            total += float(scores[k].logprobs[t] - torch.logsumexp(torch.stack(list(allowed.values())), 0))
        out[k] = total
    return out


@dataclass
class Choice:
    """One prompt's candidates: summed log p(candidate | prompt) [K], log P(candidate | one of
    them) [K] (`choice_logprobs`), the index of the most likely by the latter, and every
    candidate's token scores (with the top_k tokens at each position when asked for)."""

    log_likelihoods: torch.Tensor
    logprobs: torch.Tensor
    best: int
    scores: list[TokenScores] | None = None


def choose(model, prompts: list[list[int]], candidates: list[list[list[int]]],
           max_rows: int | None = None, top_k: int = 0, prefix: PrefixReuse | None = None) -> list[Choice]:
    """For every prompt, its candidates scored from one prefill (`score_candidates`) and the
    choice among them (`choice_logprobs`; ties go to the first)."""
    out = []
    scored = score_candidates(model, prompts, candidates, top_k=top_k, max_rows=max_rows, prefix=prefix)
    for cands, scores in zip(candidates, scored):
        logprobs = choice_logprobs(cands, scores)
        out.append(Choice(torch.stack([s.logprobs.sum() for s in scores]), logprobs, int(logprobs.argmax()), scores))
    return out


def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]],
                          max_rows: int | None = None) -> torch.Tensor:
    """[N] summed log p(continuations[i] | prompts[i]) (fp32, CPU). Pairs that share a prompt
    are scored as that prompt's candidates (`score_candidates`, one prefill of it); `max_rows`
    distinct prompts per forward (None: all at once)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        if not p or not c:
            raise ValueError(f"pair {i}: the {'prompt' if not p else 'continuation'} is empty")
    groups: dict[tuple, list[int]] = {}  # prompt -> the pairs that continue it, in order
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    keys = list(groups)
    scored = score_candidates(model, [list(k) for k in keys],
                              [[list(continuations[i]) for i in groups[k]] for k in keys], max_rows=max_rows)
    sums = torch.zeros(len(prompts))
    for key, row in zip(keys, scored):
        for i, s in zip(groups[key], row):
            sums[i] = s.logprobs.sum()
    return sums
