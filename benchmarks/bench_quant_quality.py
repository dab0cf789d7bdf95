"""Quality of quantization on a fine-tuned model: int8 / int4 / w8a8 against the float model.

    python -m benchmarks.bench_quant_quality --model runs/tiny            # after python run_finetuning.py
    python -m benchmarks.bench_quant_quality --model DIR --split validation_mismatched --json

For every variant (fp32; int8; int4 with groups of 32, 64, 128; int8 with lm_head left in fp32)
on the task's validation split:
greedy label accuracy, agreement of the greedy answers with fp32's, and perplexity on the
held-out validation text (prompt + true label + EOS) with its change against fp32
(gptj/execution/inference/quant_quality.py has the definitions).

Then with bf16 activations, against the bf16 model: int8 weights and w8a8 (int8 weights, int8
activations per token through int8 x int8 on every row, whichever path this CPU would pick), both
with lm_head in bf16 so that the difference between them is the activations' quantization. Besides
the columns above: `kl`, the mean KL divergence KL(bf16 || variant) of the next-token
distributions over every position of the held-out text (`logits_kl`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"fp32": (None, 128), "int8": ("int8", 128), "int4 g32": ("int4", 32), "int4 g64": ("int4", 64),
            "int4 g128": ("int4", 128)}


def logits_kl(reference, model, rows: list[list[int]], batch_size: int = 32) -> float:
    """Mean over every position of `rows` of KL(p_reference || p_model), the next-token
    distributions from each model's logits (computed in fp32). Rows are right-padded per batch;
    the model is causal, so padding changes no real position's logits."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for begin in range(0, len(rows), batch_size):
            chunk = rows[begin:begin + batch_size]
            ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
            mask = torch.zeros(ids.shape, dtype=torch.bool)
            for i, row in enumerate(chunk):
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
            p = torch.log_softmax(reference.logits(ids).float(), dim=-1)[mask]
            q = torch.log_softmax(model.logits(ids).float(), dim=-1)[mask]
            total += float((p.exp() * (p - q)).sum())
            count += int(mask.sum())
    return total / max(count, 1)


def bf16_variants(model_bf16) -> dict:
    """{"bf16", "int8, lm_head bf16", "w8a8"} built from the bf16 model in memory; w8a8 runs
    int8 x int8 on every call (quantized_model.force_cpu_path) so that its numbers are the
    same on every CPU."""
    from gptj.execution.runtime.model_loading import load_model
    from gptj.model.quantized_linear import INT8_ACTIVATIONS, QuantSpec
    from gptj.model.quantized_model import force_cpu_path

    w8a8 = load_model(model_bf16, quantize=QuantSpec.parse("w8a8")).model
    return {"bf16": model_bf16,
            "int8, lm_head bf16": load_model(model_bf16, quantize=QuantSpec(8, quantize_head=False)).model,
            "w8a8": force_cpu_path(w8a8, INT8_ACTIVATIONS)}


def compare_bf16(models: dict, evals, tok, max_examples: int | None = None) -> dict:
    """compare_models against "bf16", with each variant's `kl` against it added."""
    from gptj.execution.inference.quant_quality import compare_models, heldout_rows

    results = compare_models(models, evals, tok, reference="bf16", max_examples=max_examples)
    if max_examples is not None and max_examples < len(evals):
        import numpy as np

        evals = evals.select(np.arange(max_examples))
    rows, _ = heldout_rows(evals)
    for name, model in models.items():
        results[name]["kl"] = logits_kl(models["bf16"], model, rows)
    return results


def run(model: str, task: str = "mnli", dataset: str = "bundled:mnli_sample", split: str = "validation_matched",
        max_examples: int | None = None) -> dict:
    import gptj.data as data
    from gptj.execution.inference.pipelines import load_model_and_tokenizer
    from gptj.execution.inference.quant_quality import compare_models
    from gptj.execution.runtime.model_loading import load_model
    from gptj.model.quantized_linear import QuantizationError, QuantSpec

    models, tok = {}, None
    for name, (quantize, group) in VARIANTS.items():
        try:
            # fp32 activations throughout: the comparison is against the fp32 model.
            models[name], tok = load_model_and_tokenizer(model, precision="fp32", quantize=quantize,
                                                         group_size=group)
        except QuantizationError as err:  # e.g. a group larger than a shard's width
            print(f"skipping {name}: {err}", file=sys.stderr)
    # The lm_head decision: int8 blocks with a float lm_head, from the fp32 model in memory.
    models["int8, lm_head fp32"] = load_model(models["fp32"], quantize=QuantSpec(8, quantize_head=False)).model
    evals = data.build_eval_data(task, dataset, tok, split, progress=False, verbose=False)
    results = compare_models(models, evals, tok, reference="fp32", max_examples=max_examples)
    model_bf16, _ = load_model_and_tokenizer(model, precision="bf16")
    bf16 = compare_bf16(bf16_variants(model_bf16), evals, tok, max_examples)
    return {"model": model, "split": split, "results": results, "bf16_results": bf16}


def print_report(report: dict) -> None:
    print(f"{report['model']} on {report['split']}:")
    print("| weights | accuracy | agreement with fp32 | perplexity, all tokens (change) | perplexity, label tokens (change) |")
    print("|---|---|---|---|---|")
    for name, r in report["results"].items():
        print(f"| {name} | {100 * r['accuracy']:.1f}% | {100 * r['agreement']:.1f}% | "
              f"{r['perplexity']:.2f} ({100 * r['perplexity_change']:+.2f}%) | "
              f"{r['label_perplexity']:.4f} ({100 * r['label_perplexity_change']:+.2f}%) |")
    print("\nbf16 activations, against the bf16 model:")
    print("| weights | accuracy | agreement with bf16 | KL(bf16 \\|\\| variant) per token | perplexity (change) |")
    print("|---|---|---|---|---|")
    for name, r in report["bf16_results"].items():
        print(f"| {name} | {100 * r['accuracy']:.1f}% | {100 * r['agreement']:.1f}% | {r['kl']:.2e} | "
              f"{r['perplexity']:.2f} ({100 * r['perplexity_change']:+.2f}%) |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a fine-tuned model (HF dir or run_finetuning.py output dir)")
    p.add_argument("--task", default="mnli")
    p.add_argument("--dataset", default="bundled:mnli_sample")
    p.add_argument("--split", default="validation_matched")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    report = run(args.model, args.task, args.dataset, args.split, args.max_examples)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
