"""What weight-only quantization costs in quality, measured against the float model.

For each model on one evaluation split (every model sees the same examples):

- `accuracy`: greedy generation of the label equals the expected answer (the reference method
  of gptj/execution/training/evaluation.py);
- `agreement`: the fraction of examples whose greedy answer equals the float model's answer;
- `perplexity`: exp of the mean token loss over held-out text, here every validation example as
  it is trained (prompt, its true label, EOS), all tokens after the first; `label_perplexity`:
  the same over the label and EOS tokens only (what a target-only fine-tune learned).

    report = compare_models({"fp32": model, "int8": q8, "int4": q4}, split, tokenizer)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gptj.execution.training.evaluation import generated_answers


def heldout_rows(data) -> tuple[list[list[int]], list[int]]:
    """Each example of an EvalData as trained: prompt + true label + EOS (label tasks only),
    and the prompt lengths (where the label starts)."""
    if data.candidates_eos is None:
        raise ValueError("held-out text needs a task with labels")
    prompts = [data.prompt(i).tolist() for i in range(len(data))]
    rows = [p + data.candidates_eos[int(data.label_ids[i])].tolist() for i, p in enumerate(prompts)]
    return rows, [len(p) for p in prompts]


@torch.inference_mode()
def perplexity(model, rows: list[list[int]], starts: list[int] | None = None, batch_size: int = 32) -> float:
    """exp(mean next-token loss) over the tokens of each row from position starts[i] on
    (default 1: every token after the first)."""
    device = model.device
    starts = starts or [1] * len(rows)
    total, count = 0.0, 0
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin:begin + batch_size]
        width = max(len(r) for r in chunk)
        ids = np.zeros((len(chunk), width), dtype=np.int64)
        segments = np.zeros_like(ids)
        scored = np.zeros((len(chunk), width - 1), dtype=np.float32)
        for i, row in enumerate(chunk):
            ids[i, :len(row)] = row
            segments[i, :len(row)] = 1
            scored[i, max(starts[begin + i], 1) - 1:len(row) - 1] = 1.0  # position j predicts token j+1
        ids_t, seg_t = torch.from_numpy(ids).to(device), torch.from_numpy(segments).to(device)
        losses = model.token_losses(ids_t[:, :-1], ids_t[:, 1:], segment_ids=seg_t[:, :-1])
        mask = torch.from_numpy(scored).to(device)
        total += float((losses * mask).sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))


def compare_models(models: dict, data, tokenizer, reference: str | None = None,
                   batch_size: int = 32, max_examples: int | None = None) -> dict[str, dict]:
    """{name: accuracy, agreement (with `reference`, default the first model), perplexity,
    perplexity_change (relative to the reference)} on one split."""
    if max_examples is not None and max_examples < len(data):
        data = data.select(np.arange(max_examples))
    reference = reference or next(iter(models))
    longest = max(len(c) for c in data.candidates) if data.candidates else 30
    rows, label_starts = heldout_rows(data)
    indices = np.arange(len(data))
    out: dict[str, dict] = {}
    for name, model in models.items():
        answers = generated_answers(model, data, indices, tokenizer, longest + 2, batch_size)
        out[name] = {"answers": answers, "perplexity": perplexity(model, rows, batch_size=batch_size),
                     "label_perplexity": perplexity(model, rows, label_starts, batch_size),
                     "accuracy": float(np.mean([a == e for a, e in zip(answers, data.answers)]))}
    base = out[reference]
    for result in out.values():
        result["agreement"] = float(np.mean([a == b for a, b in zip(result["answers"], base["answers"])]))
        result["perplexity_change"] = result["perplexity"] / base["perplexity"] - 1.0
        result["label_perplexity_change"] = result["label_perplexity"] / base["label_perplexity"] - 1.0
        result["num_examples"] = len(data)
    return {name: {k: v for k, v in result.items() if k != "answers"} for name, result in out.items()}
