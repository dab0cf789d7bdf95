"""Classification speed: MNLI validation pairs classified per second, 0-shot and 5-shot.

Every pair is classified by likelihood over MNLI's labels (" entailment", " neutral",
" contradiction", each followed by EOS), and every row decides the label by the same rule:
the label the model is likeliest to answer when it must answer with one of them
(gptj.execution.inference.scoring.choice_logprobs). Rows, each in its own process with the
same torch threads (--threads):

    (int8 / int4 rows quantize the weights and run the activations in `--precision auto`'s
    choice, as a user's would: bf16 where the CPU multiplies it natively, else fp32)

    ours PRECISION         ClassificationPipeline: each pair's prompt prefilled once for all
                           of its labels, --batch pairs per forward, without a prefix cache;
                           5-shot also with one ("prefix-cached": the demonstrations' full
                           blocks run once, each pair runs only its prompt after them)
    server PRECISION cN    run_server.py's POST /v1/classify, one pair per request, N clients
                           at once (1 and 16): the engine batches the requests of a step
    transformers DTYPE     GPTJForCausalLM the usual way: one sequence per (pair, label),
                           prompt + label + EOS, right-padded batches of --batch pairs, the
                           log-softmax of the full logits
    ctranslate2 TYPE       Generator.score_batch of the same sequences (when the ctranslate2
                           package is installed; the checkpoint is converted first, untimed)

`agreement`: the share of pairs whose label equals the reference's (the first transformers
row: fp32 unless --transformers names another), and the largest difference of a label's
probability from the reference's.
Each row classifies the first --pairs pairs that fit the context, for at most --time-limit
seconds per case (after two warm-up pairs); pairs/s counts the pairs it did.

Model: bench-small with random weights and the bundled tokenizer, written once as a Hugging
Face checkpoint that every row loads; --model DIR for a real checkpoint (6B: pick rows with
--rows and precisions with --precisions; the reference needs transformers fp32's memory).
Data: MNLI validation_matched (../shared/data/mnli when present, else the bundled sample).
5-shot: 5 fixed demonstrations (training pairs of median length, the labels in turn), each as
prompt + label on its own line, before every pair.

    python -m benchmarks.bench_classify                         # bench-small
    python -m benchmarks.bench_classify --model DIR --precisions int8,int4 --json out.json
    python -m benchmarks.bench_classify --quick                 # the tiny shape, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_training import run_worker  # noqa: E402

SHARED_MNLI = ROOT.parent / "shared" / "data" / "mnli"
SHOTS = (0, 5)
CONCURRENCY = (1, 16)
ROWS = ("ours", "server", "transformers", "ctranslate2")
CT2_TYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}
WARMUP_PAIRS = 2
STARTUP_S = 300  # a worker's allowance beyond its cases' time limits (loading, converting, a server start)


# ---- data: the pairs and the prompts (no torch) ------------------------------------------------


def mnli_rows(split: str, count: int | None = None) -> list[dict]:
    import gptj.data as data

    if SHARED_MNLI.is_dir():
        source, split = str(SHARED_MNLI), {"train": "train_sample"}.get(split, split)
    else:
        source = "bundled:mnli_sample"
    rows, _ = data.load_examples("mnli", source, split=split, verbose=False)
    return rows[:count] if count else rows


def demonstrations(rows: list[dict], labels: list[str], shots: int) -> list[dict]:
    """`shots` fixed training pairs of typical length: the labels in turn, each the first pair
    of that label whose length is within 20% of the median (the shortest ones would understate
    what a shared prefix saves)."""
    length = sorted(len(r["premise"] + r["hypothesis"]) for r in rows)[len(rows) // 2]
    typical = [r for r in rows if abs(len(r["premise"] + r["hypothesis"]) - length) <= 0.2 * length]
    by_label = {name: [r for r in typical if r["label"] == name] for name in labels}
    return [by_label[labels[i % len(labels)]][i // len(labels)] for i in range(shots)]


def task_spec(shots: int, train: list[dict]) -> dict:
    """MNLI as /v1/classify's inline task, the demonstrations written into its prompt."""
    import gptj.data as data

    mnli = data.load_task("mnli")
    labels = list(mnli.labels)
    lines = [mnli.render_prompt(d) + mnli.target(d) + "\n" for d in demonstrations(train, labels, shots)]
    prefix = "".join(lines).replace("{", "{{").replace("}", "}}")
    return {"prompt": prefix + mnli.prompt_template, "target": mnli.target_template, "labels": labels}


def build_cases(tokenizer, context: int, pairs: int, shots=SHOTS) -> dict:
    """{"0-shot": {"task", "rows"}, ...}: the first `pairs` validation pairs whose prompt and
    longest label fit the context in every case."""
    from gptj.serving.scoring import inline_task

    train = mnli_rows("train", 2000)
    specs = {f"{k}-shot": task_spec(k, train) for k in shots}
    tasks = {name: inline_task(spec) for name, spec in specs.items()}
    longest = {name: max(map(len, tokenizer.encode([t.target({"label": x}) for x in t.labels]))) + 1
               for name, t in tasks.items()}
    chosen, skipped, longest_prompt = [], 0, 0
    for row in mnli_rows("validation_matched"):
        pair = {"premise": row["premise"], "hypothesis": row["hypothesis"]}
        lengths = {name: len(tokenizer.encode([t.render_prompt({**pair, "label": ""})])[0]) for name, t in tasks.items()}
        if any(lengths[name] + longest[name] > context for name in tasks):
            skipped += 1
            continue
        chosen.append(pair)
        longest_prompt = max(longest_prompt, max(lengths[n] + longest[n] for n in tasks))
        if len(chosen) == pairs:
            break
    return {"cases": {name: {"task": spec, "rows": chosen} for name, spec in specs.items()},
            "skipped_too_long": skipped, "longest_sequence": longest_prompt}


# ---- the checkpoint every row loads --------------------------------------------------------------


def write_random_checkpoint(directory: Path, preset: str) -> None:
    """A Hugging Face GPT-J checkpoint of `preset` with seeded random weights (fp32) and the
    bundled tokenizer's files, written once."""
    import torch
    import transformers

    from gptj.data import bundled
    from gptj.model import ModelConfig

    torch.manual_seed(0)
    model = transformers.GPTJForCausalLM(ModelConfig.preset(preset).to_hf()).eval()
    partial = directory.with_name(directory.name + ".partial")
    model.save_pretrained(partial)
    for f in bundled.tokenizer_dir("tiny").iterdir():
        shutil.copy(f, partial / f.name)
    partial.rename(directory)


# ---- the rows (each runs in a worker process) ----------------------------------------------------


def case_inputs(spec: dict, case: dict, tok):
    """(task, label names, prompts' token ids, labels' token ids + EOS) of one case."""
    from gptj.serving.scoring import inline_task

    task = inline_task(case["task"])
    labels = list(task.labels)
    prompts = tok.encode([task.render_prompt({**row, "label": ""}) for row in case["rows"]])
    label_ids = [ids + [tok.eos_id] for ids in tok.encode([task.target({"label": x}) for x in labels])]
    return task, labels, prompts, label_ids


def timed_chunks(n: int, size: int, time_limit: float, run) -> dict:
    """run(start, stop) -> each pair's label probabilities, chunk by chunk until `n` pairs or
    the time limit."""
    run(0, min(WARMUP_PAIRS, n))
    probabilities, start = [], time.perf_counter()
    while len(probabilities) < n and time.perf_counter() - start < time_limit:
        probabilities += run(len(probabilities), min(n, len(probabilities) + size))
    seconds = time.perf_counter() - start
    return {"pairs": len(probabilities), "seconds": seconds, "pairs_per_s": len(probabilities) / seconds,
            **answers(probabilities)}


def answers(probabilities: list[list[float]]) -> dict:
    """The labels (the most probable, ties to the first) and the probabilities themselves."""
    labels = [max(range(len(p)), key=lambda k: (p[k], -k)) for p in probabilities]
    return {"labels": labels, "probabilities": probabilities}


def label_probabilities(label_ids, token_logprobs) -> list[float]:
    """Each label's probability from the labels' token log-probabilities (the pipeline's rule)."""
    import torch

    from gptj.execution.inference.scoring import TokenScores, choice_logprobs

    return choice_logprobs(label_ids, [TokenScores(torch.tensor(v)) for v in token_logprobs]).exp().tolist()


def row_ours(spec: dict, precision: str) -> dict:
    from gptj.execution.inference.classification import ClassificationPipeline
    from gptj.execution.inference.pipelines import load_model_and_tokenizer

    quantize = precision if precision in ("int8", "int4") else None
    model, tok = load_model_and_tokenizer(spec["model"], spec["tokenizer"], "auto" if quantize else precision, "cpu",
                                          quantize=quantize)
    out = {}
    for name, case in spec["cases"].items():
        task, labels, prompts, _ = case_inputs(spec, case, tok)
        # Without a prefix cache (every prompt whole: the comparison with the peers), and for a
        # few-shot case with one, warmed by the warm-up pairs (the demonstrations run once).
        for cached in (False, True) if name != "0-shot" else (False,):
            clf = ClassificationPipeline(model, tok, task=task, batch_size=spec["batch"], prefix_cache=cached)

            def run(a, b, clf=clf, rows=case["rows"], labels=labels):
                return [[r["probabilities"][x] for x in labels] for r in clf.classify(rows[a:b])]

            result = timed_chunks(len(case["rows"]), spec["batch"], spec["time_limit"], run)
            if cached:
                pool = clf.prefix_cache
                done = prompts[:result["pairs"]]
                # Tokens a pair runs with a warm cache: its prompt after the full blocks every
                # prompt shares (the demonstrations', up to the block that holds the pair's start).
                keys = [pool.block_keys(p, None) for p in done]
                shared = next((j for j in range(min(map(len, keys))) if len({k[j] for k in keys}) > 1),
                              min(map(len, keys)))
                after = [len(p) - min(shared * pool.block_size, len(p) - 1) for p in done]
                result.update(hit_rate=pool.hit_rate, prompt_tokens=sum(map(len, prompts)) / len(prompts),
                              tokens_run=sum(after) / max(1, len(after)))
            out[name + (" prefix-cached" if cached else "")] = result
    return out


def row_transformers(spec: dict, precision: str) -> dict:
    import torch
    import transformers

    import gptj.data as data

    tok = data.load_tokenizer(spec["tokenizer"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = transformers.GPTJForCausalLM.from_pretrained(spec["model"], dtype=dtype).eval()
    vocab = model.config.vocab_size
    out = {}
    for name, case in spec["cases"].items():
        _, labels, prompts, label_ids = case_inputs(spec, case, tok)
        longest = max(map(len, prompts)) + max(map(len, label_ids))
        # The pairs of one batch: --batch, fewer when their fp32 logits would pass 512 MiB (the
        # log-softmax holds a second copy).
        size = max(1, min(spec["batch"], (1 << 29) // (len(labels) * longest * vocab * 4)))

        @torch.inference_mode()
        def run(a, b, prompts=prompts, label_ids=label_ids):
            seqs = [(p, lab) for p in prompts[a:b] for lab in label_ids]
            width = max(len(p) + len(lab) for p, lab in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for j, (p, lab) in enumerate(seqs):
                ids[j, :len(p) + len(lab)] = torch.tensor(p + lab)
                mask[j, :len(p) + len(lab)] = 1
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            scores = [logp[j, len(p) - 1 + torch.arange(len(lab)), torch.tensor(lab)].tolist()
                      for j, (p, lab) in enumerate(seqs)]
            k = len(label_ids)
            return [label_probabilities(label_ids, scores[i * k:(i + 1) * k]) for i in range(b - a)]

        out[name] = timed_chunks(len(prompts), size, spec["time_limit"], run)
    return out


def ctranslate2_source(spec: dict) -> str:
    """The checkpoint as CTranslate2's converter takes it: its tokenizer must hold as many tokens
    as the model's vocabulary (the bundled tokenizer's 1024 do not), so a smaller one is padded
    with tokens no text encodes to, in a copy whose other files are links."""
    from tokenizers import Tokenizer

    model_dir = Path(spec["model"])
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tokenizer_file = Path(spec["tokenizer"]) / "tokenizer.json"
    if not tokenizer_file.is_file():
        return str(model_dir)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    missing = vocab - tokenizer.get_vocab_size()
    if missing <= 0:
        return str(model_dir)
    copy = Path(spec["work"]) / "ctranslate2-source"
    copy.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if not (copy / f.name).exists():
            (copy / f.name).symlink_to(f.resolve())
    for f in Path(spec["tokenizer"]).glob("*token*.json"):
        (copy / f.name).unlink(missing_ok=True)
        shutil.copy(f, copy / f.name)
    tokenizer.add_special_tokens([f"<|unused_{i}|>" for i in range(missing)])
    (copy / "tokenizer.json").unlink()
    tokenizer.save(str(copy / "tokenizer.json"))
    return str(copy)


def row_ctranslate2(spec: dict, precision: str) -> dict:
    import ctranslate2

    import gptj.data as data

    converted = Path(spec["work"]) / "ctranslate2"
    earlier = Path(f"{spec['model']}-ct2-int8")  # benchmarks/bench_6b.py's int8 conversion, when there
    if precision == "int8" and (earlier / "model.bin").is_file():
        converted = earlier
    elif not converted.is_dir():  # once per run, untimed
        converter = ctranslate2.converters.TransformersConverter(ctranslate2_source(spec))
        converter.convert(str(converted), force=True)
    vocab_file = converted / "vocabulary.json"
    if vocab_file.is_file():
        vocabulary = json.loads(vocab_file.read_text())
    else:
        vocabulary = (converted / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    generator = ctranslate2.Generator(str(converted), device="cpu", compute_type=CT2_TYPES[precision],
                                      intra_threads=spec["threads"], inter_threads=1)
    tok = data.load_tokenizer(spec["tokenizer"])
    out = {}
    for name, case in spec["cases"].items():
        _, labels, prompts, label_ids = case_inputs(spec, case, tok)

        def run(a, b, prompts=prompts, label_ids=label_ids):
            seqs = [(p, lab) for p in prompts[a:b] for lab in label_ids]
            results = generator.score_batch([[vocabulary[t] for t in p + lab] for p, lab in seqs],
                                            max_batch_size=len(seqs), max_input_length=0)  # 0: no cut
            # log_probs[i] scores token i + 1: the label's tokens start after the prompt's last.
            scores = [r.log_probs[len(p) - 1:len(p) - 1 + len(lab)] for r, (p, lab) in zip(results, seqs)]
            k = len(label_ids)
            return [label_probabilities(label_ids, scores[i * k:(i + 1) * k]) for i in range(b - a)]

        out[name] = timed_chunks(len(prompts), spec["batch"], spec["time_limit"], run)
    return out


def start_server(spec: dict, precision: str) -> tuple[subprocess.Popen, str]:
    from benchmarks.bench_serving import wait_until_healthy
    from gptj.serving.server import free_port

    port = free_port()
    command = [sys.executable, "run_server.py", "--port", str(port), "--log-level", "warning",
               "--model", spec["model"], "--tokenizer", spec["tokenizer"], "--threads", str(spec["threads"]),
               "--max-batch-size", str(max(CONCURRENCY)), "--max-queue", "1024",
               "--max-model-len", str(spec["max_model_len"])]
    if precision in ("int8", "int4"):
        command += ["--precision", "auto", "--quantize", precision]
    else:
        command += ["--precision", precision]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, wait_until_healthy(proc, f"http://127.0.0.1:{port}", STARTUP_S)


async def classify_level(url: str, task: dict, rows: list[dict], labels: list[str], concurrency: int,
                         time_limit: float) -> dict:
    """Each pair in its own POST /v1/classify, `concurrency` at a time; no new request after
    the time limit. Pairs/s over the pairs answered, in order from the first."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def one(row):
            resp = await http.post(f"{url}/v1/classify", json={"task": task, "input": row})
            resp.raise_for_status()
            return [resp.json()["results"][0]["probabilities"][x] for x in labels]

        await asyncio.gather(*(one(r) for r in rows[:WARMUP_PAIRS]))
        start = time.perf_counter()

        async def gated(row):
            async with gate:
                return None if time.perf_counter() - start > time_limit else await one(row)

        answered = await asyncio.gather(*(gated(r) for r in rows))
        seconds = time.perf_counter() - start
    count = sum(a is not None for a in answered)
    # Labels of the pairs from the first on (a pair sent late may have found the time up).
    done = answered[:answered.index(None)] if None in answered else answered
    return {"pairs": count, "seconds": seconds, "pairs_per_s": count / seconds, **answers(done)}


def row_server(spec: dict, precision: str) -> dict:
    proc, url = start_server(spec, precision)
    try:
        out = {}
        for name, case in spec["cases"].items():
            labels = case["task"]["labels"]
            for c in CONCURRENCY:
                out[f"{name} c{c}"] = asyncio.run(classify_level(url, case["task"], case["rows"], labels, c,
                                                                 spec["time_limit"]))
        return out
    finally:
        proc.terminate()
        proc.wait(30)


ROW_RUNNERS = {"ours": row_ours, "server": row_server, "transformers": row_transformers, "ctranslate2": row_ctranslate2}


def worker(argv: list[str]) -> int:
    import torch

    spec_file, kind, precision = argv
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    result = {"row": kind, "precision": precision, "cases": ROW_RUNNERS[kind](spec, precision)}
    print(json.dumps(result))
    return 0


# ---- the run --------------------------------------------------------------------------------------


def ctranslate2_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ctranslate2") is not None


def ctranslate2_types() -> set[str]:
    """The compute types CTranslate2 runs on this CPU (bfloat16 needs a CPU it runs fast)."""
    import ctranslate2

    return set(ctranslate2.get_supported_compute_types("cpu"))


def planned_rows(rows: list[str], precisions: list[str], server_precision: str, native_bf16: bool,
                 ct2_types=frozenset(), reference: list[str] | None = None) -> list[tuple]:
    """(row, precision) in the order they run; the reference (the first transformers row:
    fp32 unless `reference` names others) first."""
    plan = []
    if "transformers" in rows:
        plan += [("transformers", p) for p in reference or ["fp32"] + (["bf16"] if native_bf16 else [])]
    if "ours" in rows:
        plan += [("ours", p) for p in precisions]
    if "server" in rows:
        plan.append(("server", server_precision))
    if "ctranslate2" in rows:
        plan += [("ctranslate2", p) for p in precisions
                 if CT2_TYPES.get(p) in ct2_types and (p != "bf16" or native_bf16)]
    return plan


def agreement(measured: dict, reference: dict) -> dict:
    """The share of the pairs both rows did whose labels agree, and the largest difference of
    a label's probability between them."""
    n = min(len(measured["labels"]), len(reference["labels"]))
    same = sum(a == b for a, b in zip(measured["labels"][:n], reference["labels"][:n]))
    gap = max((abs(a - b) for p, q in zip(measured["probabilities"][:n], reference["probabilities"][:n])
               for a, b in zip(p, q)), default=None)
    return {"agreement": same / n if n else None, "compared": n, "max_probability_diff": gap}


def summarise(results: list[dict]) -> dict:
    """Per case: every row's pairs/s and agreement with transformers fp32, and the ratios of
    ours (the best pipeline row) to transformers and ctranslate2 (their best rows)."""
    reference = next((r for r in results if r["row"] == "transformers" and "error" not in r), None)
    table, ratios = [], {}
    cases = sorted({name.split(" ")[0] for r in results if "error" not in r for name in r["cases"]})
    for case in cases:
        best = {}
        for r in results:
            if "error" in r:
                continue
            for name, m in r["cases"].items():
                if name.split(" ")[0] != case:
                    continue
                label = f"{r['row']} {r['precision']}" + name[len(case):]
                line = {"case": case, "row": label, "pairs": m["pairs"], "pairs_per_s": m["pairs_per_s"]}
                if reference is not None:
                    line.update(agreement(m, reference["cases"][case]))
                table.append(line)
                if "tokens_run" in m:
                    line.update({k: m[k] for k in ("hit_rate", "prompt_tokens", "tokens_run")})
                    plain = r["cases"].get(case)
                    if plain:  # the same pipeline and precision without the cache
                        ratios[f"{case} {r['precision']} prefix-cached/uncached"] = m["pairs_per_s"] / plain["pairs_per_s"]
                        ratios[f"{case} {r['precision']} prompt tokens/tokens run with the cache"] = \
                            m["prompt_tokens"] / m["tokens_run"]
                elif r["row"] != "server":  # the peers' best against ours without a prefix cache
                    best[r["row"]] = max(best.get(r["row"], 0.0), m["pairs_per_s"])
        for other in ("transformers", "ctranslate2"):
            if "ours" in best and best.get(other):
                ratios[f"{case} ours/{other}"] = best["ours"] / best[other]
    return {"table": table, "ratios": ratios}


def print_report(report: dict) -> None:
    print(f"{report['cpu']} | {report['capability']}")
    print(f"model {report['model']} | threads {report['threads']} | {report['pairs']} pairs asked, "
          f"{report['skipped_too_long']} longer than the context skipped | time limit {report['time_limit_s']} s a case")
    print(f"| case | row | pairs | pairs/s | labels as transformers {report['reference']} | largest probability difference |")
    print("|---|---|---|---|---|---|")
    for line in report["table"]:
        agree = "-" if line.get("agreement") is None else f"{100 * line['agreement']:.1f}% of {line['compared']}"
        gap = "-" if line.get("max_probability_diff") is None else f"{line['max_probability_diff']:.1e}"
        row = line["row"] + (f" (hit rate {100 * line['hit_rate']:.0f}%, {line['tokens_run']:.0f} of "
                             f"{line['prompt_tokens']:.0f} prompt tokens run)" if "tokens_run" in line else "")
        print(f"| {line['case']} | {row} | {line['pairs']} | {line['pairs_per_s']:.2f} | {agree} | {gap} |")
    for name, value in report["ratios"].items():
        print(f"{name}: {value:.2f}x")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['row']} {r['precision']}: {r['error']}")


def run(args) -> dict:
    import gptj.data as data
    from benchmarks.machine import capability, describe
    from gptj.execution.runtime.hardware import detect

    hardware = detect()
    threads = args.threads or hardware.physical_cores
    native_bf16 = hardware.cpu_bf16 is not None and not args.quick  # bf16 rows where the CPU runs it natively
    work = Path(tempfile.mkdtemp(prefix="bench_classify_"))
    try:
        model_dir, preset = args.model, "tiny" if args.quick else "bench-small"
        if model_dir is None:
            model_dir = str(work / preset)
            write_random_checkpoint(Path(model_dir), preset)
        tokenizer = args.tokenizer or model_dir
        context = json.loads((Path(model_dir) / "config.json").read_text())["n_positions"]
        chosen = build_cases(data.load_tokenizer(tokenizer), context, args.pairs)
        spec = {"model": model_dir, "tokenizer": tokenizer, "threads": threads, "batch": args.batch,
                "time_limit": args.time_limit, "work": str(work), "cases": chosen["cases"],
                "max_model_len": min(context, -(-chosen["longest_sequence"] // 64) * 64)}
        spec_file = work / "spec.json"
        spec_file.write_text(json.dumps(spec))
        precisions = args.precisions.split(",") if args.precisions else (
            ["fp32"] if args.quick else ["fp32"] + (["bf16"] if native_bf16 else []) + ["int8", "int4"])
        rows = args.rows.split(",")
        if "ctranslate2" in rows and not ctranslate2_installed():
            rows.remove("ctranslate2")
            print("ctranslate2 is not installed (pip install ctranslate2): its rows are left out", file=sys.stderr)
        plan = planned_rows(rows, precisions, args.server_precision or precisions[0], native_bf16,
                            ctranslate2_types() if "ctranslate2" in rows else set(),
                            args.transformers.split(",") if args.transformers else None)
        budget = args.time_limit * len(SHOTS) * len(CONCURRENCY) + STARTUP_S
        results = []
        for kind, precision in plan:
            print(f"  {kind} {precision} ...", file=sys.stderr, flush=True)
            results.append(run_worker("benchmarks.bench_classify", [str(spec_file), kind, precision],
                                      {"row": kind, "precision": precision}, budget))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"cpu": describe(), "capability": capability(), "model": args.model or f"random:{preset}",
              "threads": threads, "pairs": args.pairs, "skipped_too_long": chosen["skipped_too_long"],
              "time_limit_s": args.time_limit, "batch": args.batch, "results": results}
    report["reference"] = next((r["precision"] for r in results if r["row"] == "transformers" and "error" not in r),
                               "-")
    report.update(summarise(results))
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", metavar="DIR", help="a Hugging Face GPT-J checkpoint (default: bench-small, random)")
    p.add_argument("--tokenizer", metavar="DIR", help="default: the checkpoint's own")
    p.add_argument("--rows", default=",".join(ROWS), help=f"which rows (default: {','.join(ROWS)})")
    p.add_argument("--precisions", help="ours' precisions, comma-separated (default: fp32[,bf16 where native],int8,int4)")
    p.add_argument("--transformers", metavar="PRECISIONS",
                   help="transformers' precisions, the first the reference of agreement (default: fp32[,bf16 "
                        "where native]; at 6B fp32 needs 24 GiB: bf16)")
    p.add_argument("--server-precision", help="the server's precision (default: the first of --precisions)")
    p.add_argument("--pairs", type=int, default=256, help="validation pairs per case")
    p.add_argument("--batch", type=int, default=16, help="pairs per forward (ours, transformers, ctranslate2)")
    p.add_argument("--threads", type=int, help="torch threads of every row (default: the physical cores)")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per row and case")
    p.add_argument("--quick", action="store_true", help="the tiny shape, 6 pairs, fp32 only: a smoke run")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.time_limit = min(args.pairs, 6), min(args.time_limit, 60.0)
    report = run(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
