"""Accuracy on evaluation splits, two ways, with tensor parallelism and replicas.

- generate: greedy generation after the prompt (the reference method); the text up to EOS,
  stripped, must equal the expected answer. An output that is no label at all is wrong and
  also counted as an invalid generation.
- likelihood: each label's continuation (with its EOS, as trained) is scored after the
  prompt, every label from one prefill of it; the prediction is the label the model answers
  when it must answer with a label: the most likely by `choice_logprobs`, the product over the
  label's tokens of the next-token probability renormalised over the tokens that continue some
  label there. (The summed loss alone favours the label with fewer tokens whenever the model
  spreads its probability, e.g. LoRA on a random base whose frozen head caps every token at
  ~1.5%: a 2-token label then loses by ~4 nats whatever the input.)

Each replica evaluates its share of every split (`EvalData.shard`); the counts are summed over
the replicas, so every rank returns the same result. All ranks of a tensor-parallel group run
the same batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gptj.execution.inference.scoring import candidate_logprobs, choose
from gptj.model.parallel import all_reduce


def _prompts_and_labels(batch: dict) -> tuple[list[list[int]], list[list[int]]]:
    """The batch's prompts (unpadded) and the labels' tokens with their EOS."""
    prompts, lengths = batch["prompt_ids"], batch["prompt_lengths"]
    rows = [prompts[b, :lengths[b]].tolist() for b in range(len(lengths))]
    return rows, [list(map(int, c)) for c in batch["candidate_ids_eos"]]


def likelihood_choices(model, batch: dict, device: torch.device) -> np.ndarray:
    """Index of the label chosen for every prompt of the batch ([B] int): the most likely by
    choice probability (gptj.execution.inference.scoring.choose, the classification pipeline's
    and the server's decision)."""
    rows, labels = _prompts_and_labels(batch)
    return np.array([c.best for c in choose(model, rows, [labels] * len(rows))], dtype=np.int64)


def likelihood_scores(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Summed token loss [B, K] of every candidate after every prompt, all in one forward that
    prefills each prompt once (gptj.execution.inference.scoring.candidate_logprobs: the path the
    pipelines and the server score with)."""
    rows, labels = _prompts_and_labels(batch)
    return -candidate_logprobs(model, rows, labels).to(device)


def generated_answers(model, data, indices: np.ndarray, tokenizer, max_new_tokens: int,
                      batch_size: int) -> list[str]:
    from gptj.execution.inference.generation import generate

    prompts = [data.prompt(int(i)).tolist() for i in indices]
    results = generate(model, prompts, max_new_tokens=max_new_tokens,
                       eos_token_id=tokenizer.eos_id, batch_size=batch_size)
    answers = []
    for res in results:
        ids = list(res.token_ids)
        if tokenizer.eos_id in ids:
            ids = ids[:ids.index(tokenizer.eos_id)]
        answers.append(tokenizer.decode(ids).strip())
    return answers


@torch.no_grad()
def evaluate_split(model, data, tokenizer, device: torch.device, batch_size: int = 64,
                   use_generate: bool = True, use_likelihood: bool = True,
                   max_new_tokens: int | None = None, max_examples: int | None = None) -> dict[str, Any]:
    """Accuracy of `model` on one split (collective over the model's TP group and replicas)."""
    ctx = model.ctx
    if max_examples is not None and max_examples < len(data):
        data = data.select(np.arange(max_examples))
    mine = data.shard(ctx.replicas, ctx.replica_rank)
    # Similar lengths together: less padding in every batch.
    mine = mine.select(np.argsort(mine.prompt_lengths, kind="stable"))
    labels = data.labels
    classify = labels is not None
    use_likelihood = use_likelihood and classify
    k = len(labels) if classify else 0
    if max_new_tokens is None:
        longest = max((len(c) for c in data.candidates), default=0) if classify else 32
        max_new_tokens = longest + 2
    # counts: [n, correct_generate, correct_likelihood, invalid] then two confusion matrices
    # (true label x predicted label; the generate one has an extra "invalid" column).
    totals = np.zeros(4, dtype=np.int64)
    confusion_gen = np.zeros((k, k + 1), dtype=np.int64)
    confusion_lik = np.zeros((k, k), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(mine), batch_size):
            idx = np.arange(start, min(start + batch_size, len(mine)))
            batch = mine.batch(idx)
            truth = batch["label_ids"]
            totals[0] += len(idx)
            if use_generate:
                answers = generated_answers(model, mine, idx, tokenizer, max_new_tokens, batch_size)
                for answer, expected, t in zip(answers, batch["answers"], truth):
                    pred = labels.index(answer) if classify and answer in labels else -1
                    totals[1] += answer == expected
                    if classify:
                        totals[3] += pred < 0
                        confusion_gen[t, pred if pred >= 0 else k] += 1
            if use_likelihood:
                choice = likelihood_choices(model, batch, device)
                totals[2] += int((choice == truth).sum())
                np.add.at(confusion_lik, (truth, choice), 1)
    finally:
        model.train(was_training)
    flat = torch.from_numpy(np.concatenate([totals, confusion_gen.ravel(), confusion_lik.ravel()]))
    flat = flat.to(device)  # NCCL reduces device tensors only
    all_reduce(flat, ctx.replica_group, name="evaluation counts")  # int64 sum over the replicas
    flat = flat.cpu().numpy()
    totals = flat[:4]
    confusion_gen = flat[4:4 + k * (k + 1)].reshape(k, k + 1)
    confusion_lik = flat[4 + k * (k + 1):].reshape(k, k)
    n = int(totals[0])
    result = {
        "num_examples": n,
        "accuracy_generate": float(totals[1] / n) if use_generate and n else None,
        "accuracy_likelihood": float(totals[2] / n) if use_likelihood and n else None,
        "invalid_generations": int(totals[3]) if use_generate else None,
    }
    if classify:
        result["per_class"] = {
            name: {"count": int(confusion_lik[i].sum() if use_likelihood else confusion_gen[i].sum()),
                   "correct_generate": int(confusion_gen[i, i]) if use_generate else None,
                   "correct_likelihood": int(confusion_lik[i, i]) if use_likelihood else None,
                   "predicted_generate": int(confusion_gen[:, i].sum()) if use_generate else None,
                   "predicted_likelihood": int(confusion_lik[:, i].sum()) if use_likelihood else None}
            for i, name in enumerate(labels)}
        result["labels"] = list(labels)
        if use_generate:
            result["confusion_generate"] = confusion_gen.tolist()  # last column: invalid
        if use_likelihood:
            result["confusion_likelihood"] = confusion_lik.tolist()
    return result


def evaluate(model, splits: dict, tokenizer, device: torch.device, **options) -> dict[str, dict]:
    """`evaluate_split` for every named split."""
    return {name: evaluate_split(model, data, tokenizer, device, **options) for name, data in splits.items()}
