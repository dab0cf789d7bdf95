"""Quality of weight-only quantization on a fine-tuned model: int8 / int4 against the float model.

    python -m benchmarks.bench_quant_quality --model runs/tiny            # after python run_finetuning.py
    python -m benchmarks.bench_quant_quality --model DIR --split validation_mismatched --json

For every variant (fp32; int8; int4 with groups of 32, 64, 128; int8 with lm_head left in fp32)
on the task's validation split:
greedy label accuracy, agreement of the greedy answers with fp32's, and perplexity on the
held-out validation text (prompt + true label + EOS) with its change against fp32
(gptj/execution/inference/quant_quality.py has the definitions).
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
    return {"model": model, "split": split, "results": results}


def print_report(report: dict) -> None:
    print(f"{report['model']} on {report['split']}:")
    print("| weights | accuracy | agreement with fp32 | perplexity, all tokens (change) | perplexity, label tokens (change) |")
    print("|---|---|---|---|---|")
    for name, r in report["results"].items():
        print(f"| {name} | {100 * r['accuracy']:.1f}% | {100 * r['agreement']:.1f}% | "
              f"{r['perplexity']:.2f} ({100 * r['perplexity_change']:+.2f}%) | "
              f"{r['label_perplexity']:.4f} ({100 * r['label_perplexity_change']:+.2f}%) |")


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
