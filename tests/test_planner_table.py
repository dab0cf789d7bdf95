"""The planner's table shows every row of device memory that its total sums, so each line adds up."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from gptj.execution.training import planner
from gptj.execution.training.planner_table import device_cells


def table(*argv) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        planner.main(list(argv))
    return out.getvalue().splitlines()


@pytest.mark.parametrize("argv", [
    ["--machine", "h100-80gb-x8"],
    ["--machine", "gpu-24gb-x1", "--lora-rank", "8"],
    ["--machine", "gpu-12gb-x1", "--lora-rank", "8", "--quantize", "int4"],
])
def test_every_line_adds_up_to_its_total(argv):
    lines = table("--model", "gptj-6b", "--seq", "1024", *argv)
    header = lines[1].split()
    assert header[1:9] == ["weights", "grads", "optim", "activ", "logits", "temp", "reserved", "total"]
    machine = planner.MACHINES[argv[1]]
    rows = [line.split() for line in lines[2:] if line.startswith("tp")]
    assert rows
    for cells in rows:
        values = [float(c) for c in cells[1:9]]
        assert values[6] == round(machine.reserved / planner.GiB, 1)
        # Rounded to 0.1 each: seven cells may miss their rounded sum by 0.35 at most.
        assert abs(sum(values[:7]) - values[7]) <= 0.35 + 1e-9, cells


def test_the_cells_are_exactly_what_the_total_sums():
    result = planner.plan(planner.load_model_config("gptj-6b"), planner.MACHINES["gpu-24gb-x1"], 1024, 1, 128,
                          "bf16", lora=planner.LoraPlan(8, planner.LORA_TARGETS, "int4"))
    for row in result["layouts"]:
        cells = device_cells(row)
        assert sum(cells[:-1]) == pytest.approx(row["device_total"]) and cells[-1] == row["device_total"]
        assert cells[6] == row["device_bytes"]["reserved"]
        assert cells[5] >= row["device_bytes"]["dequantize_transient"]  # a dequantized weight is counted


def test_docs_table_is_the_planners_output():
    planning = (Path(__file__).resolve().parents[1] / "docs" / "planning.md").read_text()
    rows = re.findall(r"^\| [^|]+ \| `(tp1xr1[^`]*)` \|(.*)\|$", planning, flags=re.M)
    assert len(rows) == 5
    for layout, cells in rows:
        argv = ["--machine", "h100-80gb-x1", "--seq", "1024", "--micro-batch", "1"]
        if "lora8" in layout:
            argv += ["--lora-rank", "8"]
        for quantized in ("int8", "int4"):
            if layout.endswith(quantized):
                argv += ["--quantize", quantized]
        printed = next(line.split() for line in table(*argv) if line.split()[0] == layout)
        assert [c.strip() for c in cells.split("|")] == printed[1:10], layout
