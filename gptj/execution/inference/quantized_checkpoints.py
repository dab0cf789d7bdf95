"""Write a weight-only quantized copy of a GPT-J checkpoint, one tensor at a time.

    python -m gptj.execution.inference.quantized_checkpoints --model runs/tiny --bits 8 --output runs/tiny-int8
    python -m gptj.execution.inference.quantized_checkpoints --model EleutherAI/gpt-j-6b --bits 4 --group-size 128 --output gptj-int4

The output holds safetensors with the Hugging Face tensor names (a quantized weight `X.weight`
becomes `X.weight.qweight`, `X.weight.scales` and, for int4, `X.weight.zeros`), the source's
config.json plus a `quantization` section, and the source's tokenizer files. `run_inference.py
--model OUTPUT` and the pipelines load it directly, at any tensor-parallel size whose shards the
int4 groups tile. The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


def quantize_checkpoint(
    source: str, output: str | Path, bits: int, group_size: int = 128, quantize_head: bool = True,
    overwrite: bool = False, progress: bool = True,
) -> Path:
    """Quantize the float checkpoint `source` (HF dir / Hub id / run dir) into `output`."""
    from tqdm import tqdm

    from gptj.execution.inference.pipelines import resolve_model_dir
    from gptj.model import ParallelContext
    from gptj.model.hf import (
        CheckpointError,
        CheckpointReader,
        ShardedSafetensorsWriter,
        read_checkpoint_info,
        read_config_json,
        replace_directory,
        resolve_checkpoint,
    )
    from gptj.model.quantized_linear import QuantSpec
    from gptj.model.quantized_model import check_layout, quantize_hf_tensor, quantized_hf_names
    from gptj.model.sharding import hf_shapes

    spec = QuantSpec(bits, group_size, quantize_head)
    spec.check()
    directory = resolve_checkpoint(resolve_model_dir(str(source)))
    info = read_checkpoint_info(directory)
    config = info.config
    if info.quantization is not None:
        raise CheckpointError(f"{directory} is already quantized; quantize the float checkpoint instead")
    check_layout(config, ParallelContext.single(), spec)
    output = Path(output)
    if output.resolve() == directory.resolve():
        raise CheckpointError(f"--output {output} is the source directory; choose another")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise CheckpointError(f"{output} exists and is not empty; pass --overwrite to replace it")
    reader = CheckpointReader(directory, config)
    reader.check()

    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    targets = quantized_hf_names(config, spec)
    writer = ShardedSafetensorsWriter(tmp)
    names = list(hf_shapes(config))
    for name in tqdm(names, desc=f"quantizing to {spec.name}", unit="tensor", disable=not progress,
                     file=sys.stderr):
        tensor = reader(name, None, 0, 0)
        if name in targets:
            for part, value in quantize_hf_tensor(name, tensor, spec).items():
                writer.add(part, value)
        else:
            writer.add(name, tensor)
        del tensor
    writer.close()
    values = read_config_json(directory)
    values["quantization"] = spec.to_dict()
    (tmp / "config.json").write_text(json.dumps(values, indent=2))
    for file in TOKENIZER_FILES:
        if (directory / file).is_file():
            shutil.copy2(directory / file, tmp / file)
    replace_directory(tmp, output)
    return output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gptj.execution.inference.quantized_checkpoints",
        description="Write a weight-only int8 / int4 quantized copy of a GPT-J checkpoint.",
    )
    p.add_argument("--model", required=True, metavar="HF_ID_OR_DIR",
                   help="float checkpoint: HF directory or Hub id, or a run_finetuning.py output dir")
    p.add_argument("--bits", type=int, required=True, choices=[8, 4])
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256],
                   help="int4: input columns sharing one scale and zero point (default 128)")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--keep-head-float", action="store_true", help="leave lm_head in the checkpoint's dtype")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        out = quantize_checkpoint(args.model, args.output, args.bits, args.group_size,
                                  quantize_head=not args.keep_head_float, overwrite=args.overwrite,
                                  progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
