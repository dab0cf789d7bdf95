"""LoRA and full fine-tuning on the same small 2-label task: for each run the training loss,
the generated answers and the likelihood answers tell the same story.

The labels are " negative" (two tokens of the tiny tokenizer) and " positive" (one). LoRA on the
tiny random base cannot make any token likely: the frozen ln_f and lm_head cap every token's
probability at a few percent, so its loss stays near 4.4 nats while its greedy answers are
right. The summed log-likelihood of a label then costs ~4 nats per extra token and picks the
one-token label for every input; the choice probability (the label the model answers when it
must answer with a label) agrees with generation.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import gptj.data as datalib
from gptj.execution.inference.scoring import score_rows
from gptj.execution.training.evaluation import likelihood_scores
from gptj.execution.training.loop import train
from tests.fixtures.training import read_metrics, small_config

GOOD = ["great", "wonderful", "lovely", "excellent", "superb"]
BAD = ["awful", "terrible", "boring", "dreadful", "dull"]
THINGS = ["film", "movie", "story", "plot", "cast", "ending", "script"]


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)
    for split, count in (("train", 240), ("validation", 40)):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(count):
                label = ("negative", "positive")[i % 2]
                word = rng.choice(GOOD if label == "positive" else BAD)
                f.write(json.dumps({"text": f"the {rng.choice(THINGS)} was {word}", "label": label}) + "\n")
    task = root / "sentiment.yml"
    task.write_text('prompt: "review: {text} sentiment:"\ntarget: " {label}"\n'
                    "fields: {text: text, label: label}\nlabels: [negative, positive]\neval_splits: [validation]\n")
    return str(task), str(root)


def _run(out, task, source, lora_rank):
    return train(small_config(out, **{
        "data.task": task, "data.dataset": source, "data.sequence_length": 24, "lora.rank": lora_rank,
        "training.steps": 120, "training.global_batch_size": 16, "training.micro_batch_size": 16,
        "optimizer.lr": 3e-3, "schedule.warmup_steps": 10, "eval.at_end": True, "eval.max_examples": None}))


@pytest.fixture(scope="module")
def runs(sentiment, tmp_path_factory):
    task, source = sentiment
    return {name: _run(tmp_path_factory.mktemp(name), task, source, rank) for name, rank in (("full", 0), ("lora", 8))}


def _target_loss(model, evals) -> float:
    """Mean -log p over the label and EOS tokens of every validation row, through the scoring
    path (what the training loss measures with loss_mask "target")."""
    batch = evals.batch(np.arange(len(evals)))
    rows, starts = [], []
    for b in range(len(evals)):
        prompt = batch["prompt_ids"][b, :batch["prompt_lengths"][b]].tolist()
        rows.append(prompt + list(map(int, batch["candidate_ids_eos"][batch["label_ids"][b]])))
        starts.append(len(prompt))
    return -torch.cat([s.logprobs for s in score_rows(model, rows, starts)]).mean().item()


def test_loss_generate_and_likelihood_agree_for_lora_and_full_fine_tuning(runs, sentiment):
    task, source = sentiment
    tok = datalib.load_tokenizer("bundled:tiny")
    assert [len(tok.encode([f" {label}"])[0]) for label in ("negative", "positive")] == [2, 1]
    evals = datalib.build_eval_data(task, source, tok, "validation", progress=False)
    for name, run in runs.items():
        result = run.eval["validation"]
        # Generation and likelihood pick the same label for every example, and the right one.
        assert result["accuracy_generate"] >= 0.95, name
        assert result["accuracy_likelihood"] >= 0.95, name
        assert np.array(result["confusion_generate"])[:, :2].tolist() == result["confusion_likelihood"], name
        # The loss the run reports is the loss of the label tokens the likelihood path scores.
        model = run.model.eval()
        reported = np.mean([m["loss"] for m in read_metrics(run.output_dir)[-10:]])
        scored = _target_loss(model, evals)
        assert scored == pytest.approx(reported, rel=0.1, abs=0.02), name
    full_loss, lora_loss = (_target_loss(runs[n].model, evals) for n in ("full", "lora"))
    assert full_loss < 0.1 and lora_loss > 3.0  # LoRA's frozen random head keeps every token unlikely
    # That is why the summed log-likelihood alone (the old decision) fails LoRA only: it picks
    # the one-token label for every input.
    batch = evals.batch(np.arange(len(evals)))
    summed = likelihood_scores(runs["lora"].model, batch, torch.device("cpu")).argmin(1).numpy()
    assert summed.tolist() == [1] * len(evals)
    summed_full = likelihood_scores(runs["full"].model, batch, torch.device("cpu")).argmin(1).numpy()
    assert summed_full.tolist() == batch["label_ids"].tolist()
