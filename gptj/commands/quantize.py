"""Write a weight-only quantized copy of a GPT-J checkpoint (gptj-quantize).

    gptj-quantize --model runs/tiny --quantize int8 --output runs/tiny-int8
    gptj-quantize --model EleutherAI/gpt-j-6b --quantize int4 --group-size 128 --output gptj-int4

`gptj-generate --model OUTPUT` and `gptj-serve --model OUTPUT` load the result quantized as
written (gptj/execution/inference/quantized_checkpoints.py).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from gptj.model.quantized_linear import DEFAULT_GROUP_SIZE, GROUP_SIZES, GROUP_SIZES_TEXT, QUANTIZE_MODES

    p = argparse.ArgumentParser(
        prog="gptj-quantize", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write an int8 / int4 / w8a8 quantized copy of a GPT-J checkpoint, one tensor at a time.")
    what = p.add_argument_group("checkpoint")
    what.add_argument("--model", required=True, metavar="HF_ID_OR_DIR",
                      help="float checkpoint: HF directory or Hub id, or a gptj-finetune output dir")
    what.add_argument("--output", required=True, metavar="DIR", help="directory to write")
    what.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    how = p.add_argument_group("quantization")
    how.add_argument("--quantize", required=True, choices=QUANTIZE_MODES,
                     help="int8: one scale per output channel; int4: a scale and zero point per group; "
                          "w8a8: the int8 weights, lm_head kept float, activations quantized per token at run "
                          "time where the CPU has int8 dot products (AVX512-VNNI, AMX)")
    how.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES, metavar="N",
                     help=f"int4: input columns sharing one scale and zero point ({GROUP_SIZES_TEXT})")
    how.add_argument("--keep-head-float", action="store_true", help="leave lm_head in the checkpoint's dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gptj.errors import GPTJError
    from gptj.execution.inference.quantized_checkpoints import quantize_checkpoint

    w8a8 = args.quantize == "w8a8"
    try:
        out = quantize_checkpoint(args.model, args.output, 8 if w8a8 else int(args.quantize.removeprefix("int")),
                                  args.group_size, quantize_head=not (args.keep_head_float or w8a8),
                                  overwrite=args.overwrite, progress=not args.no_progress, int8_activations=w8a8)
    except GPTJError as err:  # bad input: one clear line, no stack trace
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
