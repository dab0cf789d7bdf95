"""Data layer: tasks -> text-to-text -> tokens -> numpy batches. Uses numpy, never torch.

Typical use::

    import gptj.data as data
    task = data.load_task("mnli")                      # or a path to a task YAML file
    tok = data.load_tokenizer("bundled:tiny")          # or a directory / Hub id
    train = data.build_train_data(task, "bundled:mnli_sample", tok, sequence_length=128)
    sampler = data.TrainSampler(train.num_rows, global_batch_size=32, micro_batch_size=8,
                                num_replicas=1, replica_index=0, seed=0)
    loader = data.BatchLoader(train, sampler)
    for micro_batch in loader.next_step():             # grad_accum micro-batches
        ...
    evals = data.build_eval_data(task, "bundled:mnli_sample", tok, "validation_matched")
    for batch in evals.shard(num_replicas, replica_index).batches(16):
        ...

Training batch contract (`TrainData.batch(indices)`, B rows, S = sequence_length):

    input_ids       int64   [B, S]  tokens row[:-1]; pad id where there is no token
    labels          int64   [B, S]  tokens row[1:] (the next token of each input position)
    loss_mask       float32 [B, S]  1 where labels[b, s] is trained on, else 0 (always 0 on
                                    padding). loss_mask="all": every real label (the reference
                                    recipe); "target": only the target tokens and the EOS after
                                    them. With keep_boundaries, a label that starts the next
                                    example is never trained on.
    position_ids    int64   [B, S]  0..S-1; packed with keep_boundaries: restart at 0 at each
                                    example start and at the row start
    segment_ids     int32   [B, S]  0 on padding; packed with keep_boundaries: 1, 2, ... per
                                    example in the row; otherwise 1 on every real token
    attention_mask  int64   [B, S]  1 on real tokens, 0 on padding (== segment_ids > 0)

Attention rule covering every layout: query i may attend key j iff j <= i and
segment_ids[i] == segment_ids[j] != 0. Without keep_boundaries (packed, as in the reference)
that is plain causal attention over the whole row; with padding it hides the pad tokens.

Evaluation batch (`EvalData.batch(indices)` / `EvalData.batches(batch_size)`):

    prompt_ids         int64 [B, P]  prompts right-padded with the pad id, P = longest in batch
    prompt_lengths     int64 [B]
    label_ids          int64 [B]     index into task.labels; -1 for open-ended tasks
    answers            list[str]     expected answer (label name, e.g. "entailment")
    example_index      int64 [B]     position of the example in the loaded split
    candidate_ids      list of int64 arrays, one per label: tokens of the continuation
                       (" entailment"), or None for open-ended tasks
    candidate_ids_eos  the same, each followed by EOS
"""

from .errors import DataError, LoadSummary
from .packing import EvalData, TrainData
from .pipeline import build_eval_data, build_train_data, load_examples
from .sampler import BatchLoader, TrainSampler
from .tasks import Task, builtin_task_names, load_task
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BatchLoader",
    "DataError",
    "EvalData",
    "LoadSummary",
    "Task",
    "Tokenizer",
    "TrainData",
    "TrainSampler",
    "build_eval_data",
    "build_train_data",
    "builtin_task_names",
    "load_examples",
    "load_task",
    "load_tokenizer",
]
