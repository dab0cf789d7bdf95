"""Faults in long runs: damaged checkpoints, failed writes, a killed rank, a hung rank.

References: an uninterrupted run of the same configuration (losses and final tensors must be
exactly equal), the bytes of a checkpoint shard actually written, the file on disk.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptj.execution.training import checkpoint as ckpt
from gptj.execution.training.loop import train
from tests.fixtures.distributed import free_port, run_distributed
from tests.fixtures.os_faults import refuse_writes_in
from tests.fixtures.training import parameters_of, read_metrics, small_config

ROOT = Path(__file__).resolve().parents[1]
EVERY_2 = {"training.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 5, "checkpoint.at_end": True}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step run with checkpoints at steps 2, 4 and 6: the reference for every resume here."""
    out = tmp_path_factory.mktemp("reference")
    result = train(small_config(out, **EVERY_2))
    return out, result.losses, parameters_of(result.model)


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out, ckpt.checkpoint_root(out)


def _truncate(directory):
    shard = ckpt.rank_file(directory, 0)
    shard.write_bytes(shard.read_bytes()[:-1000])
    return f"{shard.name} has [0-9,]+ bytes, meta.json records [0-9,]+"


def _flip_a_master_weight_bit(shard: Path) -> str:
    """Flip one bit inside the first fp32 master-weight tensor; return its name. The size and
    the safetensors header stay valid, so only the checksum can tell."""
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    key = sorted(k for k in header if k.startswith("optimizer.") and k.endswith(".master"))[0]
    begin, end = header[key]["data_offsets"]
    data[8 + header_len + (begin + end) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return key


def _edit(directory):
    shard = ckpt.rank_file(directory, 0)
    _flip_a_master_weight_bit(shard)
    return f"{shard.name} does not match the xxh3_128 checksum"


def _remove_shard(directory):
    ckpt.rank_file(directory, 0).unlink()
    return "rank-00000.safetensors is missing"


def _garble_meta(directory):
    (directory / ckpt.META_FILE).write_text('{"format_version": 2, "step": ')
    return "cannot read .*meta.json"


@pytest.mark.parametrize("damage", [_truncate, _edit, _remove_shard, _garble_meta])
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_used(finished_run, tmp_path, damage,
                                                                      capsys):
    reference, losses, final = finished_run
    out, root = _copy(reference, tmp_path)
    newest = ckpt.step_dir(root, 6)
    expected_message = damage(newest)
    if damage is _edit:  # the damage is real: safetensors alone reads the altered weights
        from safetensors.torch import load_file

        altered = load_file(ckpt.rank_file(newest, 0))
        intact = load_file(ckpt.rank_file(ckpt.step_dir(ckpt.checkpoint_root(reference), 6), 0))
        assert [k for k in intact if not torch.equal(intact[k], altered[k])] != []

    resumed = train(small_config(out, **EVERY_2, resume="auto"))
    err = capsys.readouterr().err
    assert "checkpoint step-00000006 is damaged" in err
    assert re.search(expected_message, err), err
    assert resumed.losses == losses[4:]  # steps 5 and 6 again, from step 4, exactly
    assert [m["loss"] for m in read_metrics(out)] == losses
    for name, value in parameters_of(resumed.model).items():
        assert torch.equal(value, final[name]), name
    # the damaged one is set aside, the new step 6 is whole
    assert (root / "damaged-step-00000006").is_dir()
    assert ckpt.verify_shard(newest, 0, ckpt.read_meta(newest))


def test_a_second_damage_of_one_step_keeps_both_damaged_copies(finished_run, tmp_path, capsys):
    out, root = _copy(finished_run[0], tmp_path)
    marks = []
    for damage in (_truncate, _edit):  # damaged, set aside, step 6 written again, damaged again
        newest = ckpt.step_dir(root, 6)
        damage(newest)
        marks.append(ckpt.rank_file(newest, 0).read_bytes())
        train(small_config(out, **EVERY_2, resume="auto"))
    kept = sorted(p.name for p in root.iterdir() if p.name.startswith("damaged-"))
    assert kept == ["damaged-step-00000006", "damaged-step-00000006.2"]
    assert [ckpt.rank_file(root / name, 0).read_bytes() for name in kept] == marks
    assert "moved the damaged step-00000006 to damaged-step-00000006.2" in capsys.readouterr().err
    assert [step for step, _ in ckpt.list_checkpoints(root)] == [2, 4, 6]


def test_no_valid_checkpoint_left_is_one_error_naming_them(finished_run, tmp_path):
    out, root = _copy(finished_run[0], tmp_path)
    _truncate(ckpt.step_dir(root, 2))
    _edit(ckpt.step_dir(root, 4))
    _garble_meta(ckpt.step_dir(root, 6))
    with pytest.raises(ckpt.CheckpointLoadError,
                       match="no valid checkpoint left .*step-00000006, step-00000004, step-00000002 are damaged"):
        train(small_config(out, **EVERY_2, resume="auto"))
    assert [s for s, _ in ckpt.step_dirs(root)] == [2, 4, 6]  # nothing moved or removed


def _failing_writer(real, step, after_bytes=2000):
    """A shard writer that runs out of space in the middle of checkpoint `step`'s shard."""
    def write(tensors, file, metadata):
        if f"step-{step:08d}" in str(file):
            real(tensors, file, metadata)
            with open(file, "r+b") as f:
                f.truncate(after_bytes)  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        real(tensors, file, metadata)
    return write


def test_failed_write_stops_with_path_and_bytes_and_keeps_the_old_checkpoints(finished_run, tmp_path,
                                                                              monkeypatch):
    losses = finished_run[1]
    run = {"training.steps": 3, "checkpoint.every": 1, "checkpoint.keep": 5}
    monkeypatch.setattr(ckpt, "_write_shard", _failing_writer(ckpt._write_shard, step=2))
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        train(small_config(tmp_path, **run))
    message = str(info.value)
    assert "\n" not in message
    assert "step-00000002.partial/rank-00000.safetensors: [Errno 28] No space left on device" in message
    root = ckpt.checkpoint_root(tmp_path)
    assert [s for s, _ in ckpt.step_dirs(root)] == [1]
    assert not any(p.name.endswith(".partial") for p in root.iterdir())
    # the bytes named are what the shard really takes (step 1's shard has the same tensors)
    needed = int(re.search(r"needs about ([0-9,]+) bytes", message).group(1).replace(",", ""))
    written = ckpt.rank_file(ckpt.step_dir(root, 1), 0).stat().st_size + 4000  # + meta.json
    assert written - 4000 <= needed <= 1.1 * written

    monkeypatch.undo()
    resumed = train(small_config(tmp_path, **run, resume=True))
    assert resumed.losses == losses[1:3]  # step 1 was intact and loads exactly


def test_failed_write_can_let_training_continue(finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckpt, "_write_shard", _failing_writer(ckpt._write_shard, step=2))
    result = train(small_config(tmp_path, **{"training.steps": 3, "checkpoint.every": 1,
                                             "checkpoint.keep": 5, "checkpoint.at_end": True,
                                             "checkpoint.on_error": "continue"}))
    assert result.losses == finished_run[1][:3] and result.final_step == 3
    assert "training continues" in capsys.readouterr().out
    assert [s for s, _ in ckpt.step_dirs(ckpt.checkpoint_root(tmp_path))] == [1, 3]


def test_a_writer_bug_is_a_write_error_too_not_a_hang(tmp_path, monkeypatch, capsys):
    def broken(tensors, file, metadata):
        raise ValueError("tensor 'x' is not contiguous")

    monkeypatch.setattr(ckpt, "_write_shard", broken)
    with pytest.raises(ckpt.CheckpointWriteError, match="rank 0, writing .*: an error .see that rank's log"):
        train(small_config(tmp_path, **{"training.steps": 1, "checkpoint.at_end": True}))
    assert "ValueError: tensor 'x' is not contiguous" in capsys.readouterr().err
    assert ckpt.step_dirs(ckpt.checkpoint_root(tmp_path)) == []


def test_file_checksum_is_xxh3_128_of_the_whole_file(tmp_path):
    import xxhash

    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    # chunks that do not divide the file: the streamed digest must equal the one-shot digest
    assert ckpt.file_checksum(tmp_path / "f", chunk_bytes=4096) == xxhash.xxh3_128(data).hexdigest()


def test_real_io_errors_of_the_writer_carry_errno_and_path(tmp_path):
    target = tmp_path / "no-such-dir" / "rank-00000.safetensors"
    with pytest.raises(OSError) as info:
        ckpt._write_shard({"x": torch.zeros(4)}, target, {})
    assert info.value.errno == errno.ENOENT and str(target) in str(info.value)


@pytest.mark.parametrize("code, name", [(errno.EACCES, "EACCES"), (errno.ENOSPC, "ENOSPC")])
def test_unwritable_directory_is_one_error(tmp_path, monkeypatch, code, name):
    train(small_config(tmp_path, **{"training.steps": 1, "checkpoint.at_end": True}))
    root = ckpt.checkpoint_root(tmp_path)
    refuse_writes_in(monkeypatch, root, code)  # as a read-only (or full) directory would, even for root
    with pytest.raises(ckpt.CheckpointWriteError, match=f"creating .*step-00000002.partial: .*{name}"):
        train(small_config(tmp_path, **{"training.steps": 2, "checkpoint.at_end": True}, resume=True))
    monkeypatch.undo()
    assert [s for s, _ in ckpt.step_dirs(root)] == [1]
    assert ckpt.read_meta(ckpt.latest_checkpoint(root))["step"] == 1  # the old checkpoint is intact


def test_resume_auto_option_and_gpu_preset_defaults():
    import gptj.commands.finetune as run_finetuning
    from gptj.execution.training.config import load_config

    assert run_finetuning.build_config(run_finetuning.parse_args(["--resume", "auto"])).resume == "auto"
    assert run_finetuning.build_config(run_finetuning.parse_args(["--resume"])).resume is True
    assert load_config("tiny").resume is False
    for preset in ("gptj-6b-mnli", "gptj-6b-mnli-1gpu-offload", "gptj-6b-mnli-8gpu", "gptj-6b-mnli-multinode"):
        config = load_config(preset)
        assert config.resume == "auto" and config.parallel.timeout_s == 1800, preset
        assert config.checkpoint.on_error == "stop", preset


# ---- two ranks: agreement on the checkpoint to load and on a failed write ---------------------


def _two_rank_faults(rank, world_size, output_dir):
    import torch.distributed as dist

    from gptj.model.hf import gather_hf_tensors

    out = Path(output_dir)
    base = {"training.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 5, "checkpoint.at_end": True}
    first = train(small_config(out, **base))
    weights = gather_hf_tensors(first.model)
    root = ckpt.checkpoint_root(out)
    if rank == 1:  # only rank 1's shard of step 4 is altered: both ranks must fall back
        _flip_a_master_weight_bit(ckpt.rank_file(ckpt.step_dir(root, 4), 1))
    dist.barrier()
    resumed = train(small_config(out, **base, resume=True))
    resumed_weights = gather_hf_tensors(resumed.model)

    # rank 1 alone runs out of space at step 5: both ranks raise the same error, none hangs
    real = ckpt._write_shard
    if rank == 1:
        ckpt._write_shard = _failing_writer(real, step=5)
    more = {"training.steps": 6, "checkpoint.every": 1, "checkpoint.keep": 5, "checkpoint.at_end": True}
    try:
        train(small_config(out, **more, resume=True))
        stop_message = None
    except ckpt.CheckpointWriteError as err:
        stop_message = str(err)
    after_stop = [s for s, _ in ckpt.step_dirs(root)]
    go_on = train(small_config(out, **more, resume=True, **{"checkpoint.on_error": "continue"}))
    ckpt._write_shard = real
    return {"first": first.losses, "resumed": resumed.losses, "stop": stop_message,
            "resume_equal": all(torch.equal(resumed_weights[k], v) for k, v in weights.items()),
            "after_stop": after_stop, "go_on_step": go_on.final_step,
            "final": [s for s, _ in ckpt.step_dirs(root)]}


def test_two_ranks_agree_on_fallback_and_on_a_failed_write(tmp_path):
    results = run_distributed(_two_rank_faults, 2, str(tmp_path / "run"))
    for rank, res in enumerate(results):
        assert res["resumed"] == res["first"][2:], rank  # both fell back to step 2, exactly
        assert res["resume_equal"], rank
        assert res["stop"] is not None and "rank 1, writing" in res["stop"], rank
        assert "step-00000005.partial/rank-00001.safetensors" in res["stop"], rank
        assert res["after_stop"] == [2, 4], rank  # the failed step left nothing, the old ones stay
        assert res["go_on_step"] == 6 and res["final"] == [2, 4, 6], rank
    assert results[0]["stop"] == results[1]["stop"]


# ---- torchrun: a rank killed with SIGKILL, a rank that hangs ----------------------------------


RUN = ["--steps", "12", "--global-batch-size", "8", "--micro-batch-size", "4", "--checkpoint-every", "3",
       "--resume", "auto",
       "--set", "model.shape={hidden_size: 64, num_heads: 4, rotary_dim: 8}",
       "--set", "logging.progress=false", "--set", "logging.tensorboard=false",
       "--set", "training.threads=1", "--set", "eval.at_end=false",
       "--set", "checkpoint.export_hf=false", "--set", "checkpoint.keep=5"]


def _torchrun(script, args, log_dir: Path, max_restarts: int) -> subprocess.Popen:
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", script, *args]
    # Its own session, so that a failing test can end the agent and its workers together.
    return subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=open(log_dir / "stdout", "w"),  # noqa: SIM115
                            stderr=open(log_dir / "stderr", "w"), start_new_session=True)  # noqa: SIM115


@pytest.fixture
def launched():
    """Collects torchrun processes; any still running at the end of the test are killed."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _logs(log_dir: Path) -> tuple[str, str]:
    return (log_dir / "stdout").read_text(), (log_dir / "stderr").read_text()


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0  # not there yet, or a line being written


def _worker_pid(agent_pid: int, rank: int) -> int | None:
    """The first-attempt worker process of `rank` started by the torchrun agent."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent_pid and env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == "0":
            return int(entry.name)
    return None


def _final_tensors(out: Path, step: int) -> dict:
    from safetensors.torch import load_file

    directory = ckpt.step_dir(ckpt.checkpoint_root(out), step)
    return {r: load_file(ckpt.rank_file(directory, r)) for r in (0, 1)}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_rank_killed_mid_training_restarts_and_ends_bit_identical(tmp_path, launched):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    proc = _torchrun("run_finetuning.py", [*RUN, "--output-dir", str(reference)], tmp_path / "log-ref", 0)
    launched.append(proc)
    assert proc.wait(timeout=400) == 0, _logs(tmp_path / "log-ref")[1][-3000:]

    rng = random.Random()
    rank, at_step = rng.randint(0, 1), rng.randint(4, 8)  # after the first checkpoint (step 3)
    what = f"rank {rank} killed at step {at_step}"
    proc = _torchrun("run_finetuning.py", [*RUN, "--output-dir", str(killed)], tmp_path / "log-kill", 3)
    launched.append(proc)
    victim, deadline = None, time.time() + 400
    while proc.poll() is None and time.time() < deadline:
        seen = _last_step(killed / "metrics.jsonl")
        if victim is None and seen >= at_step:
            victim = _worker_pid(proc.pid, rank)
            assert victim is not None, what
            os.kill(victim, signal.SIGKILL)
            what += f" (metrics showed step {seen})"
            assert seen < 12, what  # still training
        time.sleep(0.02)
    assert proc.wait(timeout=60) == 0, (what, _logs(tmp_path / "log-kill")[1][-3000:])
    stdout, _ = _logs(tmp_path / "log-kill")
    assert victim is not None and "resumed from" in stdout, (what, stdout[-2000:])

    assert [m["loss"] for m in read_metrics(killed)] == [m["loss"] for m in read_metrics(reference)], what
    want, got = _final_tensors(reference, 12), _final_tensors(killed, 12)
    for r in (0, 1):
        assert want[r].keys() == got[r].keys()
        for key, value in want[r].items():
            assert torch.equal(value, got[r][key]), (what, r, key)


HANG = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import gptj.execution.training.loop as training
import gptj.commands.finetune as run_finetuning

real = training.accumulate_gradients
calls = []

def hang_on_rank_1(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        # Stuck for good (as in a dead filesystem or a driver). SIGTERM from torchrun still ends
        # it at once, so the test does not wait out torchrun's 30 s grace period.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(600)
    return real(*args, **kwargs)

training.accumulate_gradients = hang_on_rank_1
sys.exit(run_finetuning.main())
"""


def test_hung_rank_ends_the_job_naming_the_collective(tmp_path, launched):
    script = tmp_path / "hang.py"
    script.write_text(HANG.format(root=str(ROOT)))
    started = time.time()
    proc = _torchrun(str(script), [*RUN, "--output-dir", str(tmp_path / "run"), "--set", "parallel.timeout_s=4"],
                     tmp_path / "log", 0)
    launched.append(proc)
    returncode = proc.wait(timeout=300)
    elapsed = time.time() - started
    _, stderr = _logs(tmp_path / "log")
    assert returncode != 0
    assert "collective training loss (replicas) timed out (rank 0, group of 2 ranks)" in stderr, stderr[-3000:]
    assert elapsed < 200  # the hang alone would last 600 s


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_checkpointed_step(tmp_path, launched):
    """Ctrl-C in a terminal reaches the whole process group: torchrun and both ranks (and torchrun
    forwards it once more). Every rank finishes the step, the checkpoint holds both shards."""
    out = tmp_path / "run"
    args = [*RUN, "--steps", "100000", "--checkpoint-every", "1000", "--output-dir", str(out)]
    proc = _torchrun("run_finetuning.py", args, tmp_path / "log", 0)
    launched.append(proc)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and _last_step(out / "metrics.jsonl") < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    stdout, stderr = _logs(tmp_path / "log")
    found = re.search(r"stopped by Ctrl-C \(SIGINT\) at step (\d+); checkpoint", stdout)
    assert found, (stdout[-2000:], stderr[-3000:])
    step = int(found.group(1))
    latest = ckpt.latest_checkpoint(ckpt.checkpoint_root(out))
    assert ckpt.read_meta(latest)["step"] == step == _last_step(out / "metrics.jsonl") >= 3
    assert all(ckpt.rank_file(latest, r).is_file() for r in (0, 1))
    # torchrun's agent prints its own SignalException traceback for the Ctrl-C; the ranks none.
    assert stderr.count("Traceback") == stderr.count("multiprocessing.api.SignalException: Process")
    assert "run_finetuning.py" not in stderr and "aborted" not in stderr, stderr[-3000:]
