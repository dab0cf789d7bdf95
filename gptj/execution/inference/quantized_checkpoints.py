"""Write a weight-only quantized copy of a GPT-J checkpoint, one tensor at a time.

    gptj-quantize --model runs/tiny --quantize int8 --output runs/tiny-int8
    gptj-quantize --model EleutherAI/gpt-j-6b --quantize int4 --group-size 128 --output gptj-int4

(the command line: gptj/commands/quantize.py)

The output holds safetensors with the Hugging Face tensor names (a quantized weight `X.weight`
becomes `X.weight.qweight`, `X.weight.scales` and, for int4, `X.weight.zeros`), the source's
config.json plus a `quantization` section, and the source's tokenizer files. `run_inference.py
--model OUTPUT` and the pipelines load it directly, at any tensor-parallel size whose shards the
int4 groups tile. The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


def quantize_checkpoint(
    source: str, output: str | Path, bits: int, group_size: int = 128, quantize_head: bool = True,
    overwrite: bool = False, progress: bool = True, int8_activations: bool = False,
) -> Path:
    """Quantize the float checkpoint `source` (HF dir / Hub id / run dir) into `output`
    (`int8_activations`: w8a8, stored as int8 and marked to quantize activations when loaded)."""
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

    spec = QuantSpec(bits, group_size, quantize_head, int8_activations)
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
