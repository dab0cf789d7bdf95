"""Two hosts for real: torchrun's c10d rendezvous across two network namespaces on this machine
(10.77.0.1 and 10.77.0.2 on a veth pair, each with its own hostname and /etc/hosts), 2 nodes x 1
process, as a user with two machines would start it.

References: the final weights (fp32 Hugging Face export) of the same layout, seed and global batch
on one machine (torchrun with 2 processes on loopback), for replicas, for tensor parallel and for
the run whose worker on one host is SIGKILLed. The setups that
used to hang (a hostname resolving to loopback, restart counts that differ between the nodes)
must end within seconds with the one line that names cause and fix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.fixtures.netns import namespaces_unavailable, stop_group, two_hosts
from tests.test_fault_tolerance import RUN, _last_step, _logs, _torchrun, _worker_pid

ROOT = Path(__file__).resolve().parents[1]
WHY_NOT = namespaces_unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces here: {WHY_NOT}")

# Final weights in fp32, gathered to one file whatever the layout.
EXPORT = ["--set", "checkpoint.export_hf=true", "--set", "checkpoint.export_dtype=fp32"]
LIMIT_S = 120  # wall clock of one run (each takes about 10-30 s)
LOOPBACK_HOSTS = "127.0.0.1 localhost vm\n"  # both hosts named vm, resolving to loopback


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "hf" / "model.safetensors")


def _assert_equal_weights(want: Path, got: Path, what: str) -> None:
    a, b = _final_weights(want), _final_weights(got)
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        assert torch.equal(value, b[key]), (what, key)


def _one_machine_torchrun(tmp_path: Path, out: Path, args: list[str]) -> None:
    """The same job as 2 processes of one torchrun on this machine's loopback."""
    proc = _torchrun("run_finetuning.py", [*args, "--output-dir", str(out)], tmp_path / "log-one", 0)
    try:
        code = proc.wait(timeout=LIMIT_S)
    finally:
        stop_group(proc)
    assert code == 0, _logs(tmp_path / "log-one")[1][-3000:]


class TwoHostRun:
    """`torchrun --nnodes 2 --nproc-per-node 1` on each host, every process under LIMIT_S."""

    def __init__(self, hosts, log_dir: Path, args: list[str], *, local_addr: bool = True,
                 is_host: bool = False, env: dict[str, str] | None = None, max_restarts: int = 0):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs = []
        for i, host in enumerate(hosts):
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts[0].addr}:29500",
                        "--rdzv-id", "two-hosts", "--max-restarts", str(max_restarts), "--monitor-interval", "0.1"]
            if local_addr:
                torchrun += ["--local-addr", host.addr]
            if is_host and i == 0:  # the rendezvous endpoint's own node hosts the store
                torchrun += ["--rdzv-conf", "is_host=1"]
            variables = {key: value.replace("{interface}", host.interface) for key, value in (env or {}).items()}
            command = host.command(["env", *(f"{k}={v}" for k, v in variables.items()), *torchrun,
                                    "run_finetuning.py", *args])
            with open(log_dir / f"{host.hostname}-{i}.log", "w") as log:
                # its own session: stop_group ends the agent and its workers together
                self.procs.append(subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def wait(self) -> list[int]:
        """Exit codes once both agents end, or after LIMIT_S (then killed, codes -9)."""
        deadline = time.time() + LIMIT_S
        try:
            for proc in self.procs:
                proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.stop()
        return [proc.returncode for proc in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            stop_group(proc)

    def logs(self) -> str:
        return "\n".join(path.read_text() for path in sorted(self.log_dir.glob("*.log")))


def _run(hosts, log_dir: Path, args: list[str], **options) -> tuple[list[int], str]:
    run = TwoHostRun(hosts, log_dir, args, **options)
    codes = run.wait()
    return codes, run.logs()


@pytest.fixture(scope="module")
def one_machine_replicas(tmp_path_factory):
    """2 replicas on one machine: the reference of every replicas run here."""
    where = tmp_path_factory.mktemp("one-machine")
    _one_machine_torchrun(where, where / "run", [*RUN, *EXPORT])
    return where / "run"


def test_replicas_on_two_hosts_named_vm_match_one_machine(one_machine_replicas, tmp_path):
    """Both hosts called vm, resolving to 127.0.0.1 (as 127.0.1.1 does on many machines): with the
    three settings the loopback checks ask for, the job runs and ends with the one-machine run's
    weights, bit for bit."""
    out = tmp_path / "run"
    with two_hosts(("vm", "vm"), LOOPBACK_HOSTS) as hosts:
        codes, logs = _run(hosts, tmp_path / "log", [*RUN, *EXPORT, "--output-dir", str(out)],
                           is_host=True, env={"GLOO_SOCKET_IFNAME": "{interface}"})
    assert codes == [0, 0], logs[-4000:]
    assert "world 2 = tensor_parallel 1 x replicas 2" in logs
    _assert_equal_weights(one_machine_replicas, out, "2 replicas on two hosts vs one machine")


def test_tensor_parallel_across_two_hosts_matches_one_machine(tmp_path):
    args = [*RUN, *EXPORT, "--tensor-parallel", "2"]
    _one_machine_torchrun(tmp_path, tmp_path / "one", args)
    with two_hosts() as hosts:
        codes, logs = _run(hosts, tmp_path / "log", [*args, "--output-dir", str(tmp_path / "two")])
    assert codes == [0, 0], logs[-4000:]
    assert "world 2 = tensor_parallel 2 x replicas 1" in logs
    _assert_equal_weights(tmp_path / "one", tmp_path / "two", "TP 2 across two hosts vs one machine")


def _worker_of(run: TwoHostRun, host_index: int) -> int:
    """The first-attempt worker under the agent of host `host_index`."""
    agent = run.procs[host_index].pid  # `ip netns exec` and `unshare` exec: the agent keeps the pid
    victim = _worker_pid(agent, 0) or _worker_pid(agent, 1)
    assert victim is not None, "no worker found under the agent"
    return victim


def _wait_for_step(run: TwoHostRun, out: Path, at_step: int) -> int:
    """Wait until the metrics show `at_step`; returns the step they show."""
    deadline = time.time() + LIMIT_S
    while time.time() < deadline and all(p.poll() is None for p in run.procs):
        seen = _last_step(out / "metrics.jsonl")
        if seen >= at_step:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {at_step}:\n{run.logs()[-3000:]}")


def test_worker_killed_on_one_host_heals_bit_identical(one_machine_replicas, tmp_path):
    out = tmp_path / "run"
    args = [*RUN, *EXPORT, "--output-dir", str(out)]
    with two_hosts() as hosts:
        run = TwoHostRun(hosts, tmp_path / "log", args, max_restarts=2,
                         env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
        try:
            seen = _wait_for_step(run, out, at_step=4)  # after the checkpoint of step 3
            os.kill(_worker_of(run, 1), signal.SIGKILL)
            codes = run.wait()
        finally:
            run.stop()
    logs = run.logs()
    assert seen < 12, seen  # killed while training
    assert codes == [0, 0], logs[-4000:]
    assert "resumed from" in logs
    _assert_equal_weights(one_machine_replicas, out, f"worker on the second host killed at step {seen}")


def test_restart_counts_that_differ_end_with_the_store_variable_named(tmp_path):
    """Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the restarted workers used to wait for each
    other under different keys until the 30-minute store timeout.

    The counts differ when the other host's agent restarts its workers because a node rejoined,
    not because its own worker failed (only a failure counts). Its worker is frozen while the
    first host's worker is killed, so that it cannot fail first, and thawed once its agent is
    stopping it."""
    out = tmp_path / "run"
    args = [*RUN, "--set", "parallel.timeout_s=20", "--output-dir", str(out)]
    started = time.time()
    with two_hosts() as hosts:
        run = TwoHostRun(hosts, tmp_path / "log", args, max_restarts=1)
        try:
            _wait_for_step(run, out, at_step=4)
            survivor = _worker_of(run, 0)
            os.kill(survivor, signal.SIGSTOP)
            os.kill(_worker_of(run, 1), signal.SIGKILL)
            stopping = f"Sending process {survivor} closing signal SIGTERM"
            deadline = time.time() + LIMIT_S
            while stopping not in run.logs() and time.time() < deadline:
                time.sleep(0.05)
            os.kill(survivor, signal.SIGCONT)
            codes = run.wait()
        finally:
            run.stop()
    logs = run.logs()
    assert codes != [0, 0] and time.time() - started < LIMIT_S, logs[-4000:]
    assert "count restarts differently" in logs, logs[-4000:]
    assert "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on every node" in logs


def test_hostname_resolving_to_loopback_names_local_addr(tmp_path):
    """MASTER_ADDR is the rank-0 node's hostname, here loopback: the other node's ranks cannot
    reach the store. The check's line names --local-addr instead of a 30-minute hang."""
    args = [*RUN, "--set", "parallel.timeout_s=5", "--output-dir", str(tmp_path / "run")]
    with two_hosts(("vm", "vm"), LOOPBACK_HOSTS) as hosts:
        codes, logs = _run(hosts, tmp_path / "log", args, local_addr=False, is_host=True)
    assert codes != [0, 0], logs[-4000:]
    assert "a loopback address the other nodes cannot reach" in logs, logs[-4000:]
    assert "start torchrun on every node with --local-addr <that node's IP address>" in logs


def test_hostname_resolving_to_loopback_names_gloo_socket_ifname(tmp_path):
    """With --local-addr the store is reached, but gloo would listen on the hostname's loopback
    address: the line names the interface to set, per node."""
    args = [*RUN, "--set", "parallel.timeout_s=10", "--output-dir", str(tmp_path / "run")]
    with two_hosts(("vm", "vm"), LOOPBACK_HOSTS) as hosts:
        codes, logs = _run(hosts, tmp_path / "log", args, is_host=True)
        interfaces = [host.interface for host in hosts]
    assert codes == [1, 1], logs[-4000:]
    assert "ranks on other machines would connect to a loopback address" in logs, logs[-4000:]
    for interface in interfaces:
        assert f"GLOO_SOCKET_IFNAME={interface})" in logs
