"""The planner's table: one line per layout, every summed row of device memory shown, so that
each line's cells add up to its total; and why nothing fits when no layout does."""

from __future__ import annotations

GiB = 2**30


# Table columns of the device bytes; "temp" and "reserved" complete them, so that each row's
# cells add up to its total.
TABLE_COLUMNS = (("weights", "weights"), ("grads", "gradients"), ("optim", "optimizer"),
                 ("activ", "activations"), ("logits", "logits"))


def device_cells(row: dict) -> list[float]:
    """Bytes per device as the table shows them: the shown rows, the peak of the temporaries
    (backward's or the optimizer step's, plus a dequantized weight), reserved, and the total."""
    dev = row["device_bytes"]
    shown = [dev[key] for _, key in TABLE_COLUMNS]
    temp = row["device_total"] - sum(shown) - dev["reserved"]
    return [*shown, temp, dev["reserved"], row["device_total"]]


def format_table(result: dict) -> str:
    names = [name for name, _ in TABLE_COLUMNS] + ["temp", "reserved", "total"]
    lines = [
        f"{result['parameters'] / 1e9:.2f} B parameters, seq {result['seq']}, micro-batch "
        f"{result['micro_batch']}, global batch {result['global_batch']}, {result['precision']}, "
        f"machine {result['machine']['name']}",
        f"{'layout':34s} " + " ".join(f"{n:>8s}" for n in names)
        + f" {'host/dev':>9s} {'TP comm':>8s} {'DP comm':>8s} {'host io':>8s} {'est s':>7s}  fits",
    ]
    for r in result["layouts"]:
        comm = r["comm_bytes_per_step"]
        cells = [*device_cells(r), r["host_bytes_per_device"], comm["tensor_parallel"], comm["replicas"], comm["host"]]
        lines.append(f"{r['layout']:34s} " + " ".join(f"{c / GiB:8.1f}" for c in cells[:8])
                     + f" {cells[8] / GiB:9.1f} " + " ".join(f"{c / GiB:8.1f}" for c in cells[9:])
                     + f" {r['estimated_seconds']['step']:7.2f}  " + ("yes" if r["fits"] else "no: " + "; ".join(r["problems"])))
    lines.append("(GiB per device; temp = the larger of backward's and the optimizer step's temporaries, plus a "
                 "dequantized weight for a quantized base; reserved = CUDA context and allocator slack; total = "
                 "their sum; comm = GiB sent+received per device per optimizer step; est s = rough step time)")
    lines.append(f"KV cache for inference: {result['kv_cache_bytes_per_token'] / 2**20:.2f} MiB per token (all layers, "
                 "divide by tensor parallel)")
    lines.append(f"recommended: {result['recommended'] or 'nothing fits: ' + why_nothing_fits(result)}")
    return "\n".join(lines)


def why_nothing_fits(result: dict) -> str:
    """The real reason no layout fits: the batch split when that alone rules out layouts that
    would otherwise fit, else how many layouts each kind of problem rules out."""
    rows = result["layouts"]
    if not rows:
        return "no layout for this machine"
    batch_only = [r["layout"] for r in rows
                  if r["problems"] and all(p.startswith("global batch") for p in r["problems"])]
    if batch_only:
        return (f"global batch {result['global_batch']} is not a multiple of micro-batch "
                f"{result['micro_batch']} x replicas in the {len(batch_only)} layout(s) that would "
                f"otherwise fit ({', '.join(batch_only[:3])}{', ...' if len(batch_only) > 3 else ''})")
    kinds = {"memory": lambda p: p.startswith("needs"),
             "the batch split": lambda p: p.startswith("global batch"),
             "the tensor-parallel split": lambda p: "not divisible by tp" in p or "spans nodes" in p}
    counts = {k: sum(any(test(p) for p in r["problems"]) for r in rows) for k, test in kinds.items()}
    return ", ".join(f"{k} rules out {n}" for k, n in counts.items() if n) + f" of {len(rows)} layouts"
