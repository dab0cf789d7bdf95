"""The pre-flight checks of a multi-node job, fed what torchrun gives its workers (environment,
hostnames, the records other ranks write into the job's store). The same checks run end to end
across two network namespaces in tests/test_multinode.py."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from datetime import timedelta

import pytest
import torch.distributed as dist

from gptj.execution.runtime import reachability as r
from tests.fixtures.distributed import free_port

NODE_A = r.RankRecord(rank=0, host="node-a", network="boot/ns-a", address="10.77.0.1", interface="eth0", restart=0)
NODE_B = r.RankRecord(rank=1, host="node-b", network="boot/ns-b", address="10.77.0.2", interface="eth1", restart=0)


def test_nodes_with_their_own_addresses_pass():
    assert r.find_problem([NODE_A, NODE_B], shared_store=True) is None


def test_hostnames_resolving_to_loopback_on_two_machines_name_each_interface():
    a = replace(NODE_A, host="vm", address="127.0.0.1")
    b = replace(NODE_B, host="vm", address="127.0.1.1")
    problem = r.find_problem([a, b], shared_store=False)
    assert problem == ("ranks on other machines would connect to a loopback address, where the hostname "
                       "resolves: rank 0 on vm at 127.0.0.1 (GLOO_SOCKET_IFNAME=eth0); rank 1 on vm at "
                       "127.0.1.1 (GLOO_SOCKET_IFNAME=eth1); set GLOO_SOCKET_IFNAME on those nodes as given, "
                       "or map each hostname to its node's IP address in /etc/hosts")
    # one node reached at loopback is enough; an unknown interface is said so
    problem = r.find_problem([replace(a, interface=""), NODE_B], shared_store=False)
    assert problem.startswith("ranks on other machines would connect to a loopback address")
    assert "rank 0 on vm at 127.0.0.1 (GLOO_SOCKET_IFNAME=<its interface towards the other nodes>)" in problem
    assert "rank 1" not in problem


def test_loopback_is_fine_when_every_rank_shares_the_network_stack():
    """Two torchrun agents on one machine (--nnodes 2 on 127.0.0.1) reach each other on loopback."""
    same = [replace(NODE_A, address="127.0.0.1"), replace(NODE_B, address="127.0.0.1", network=NODE_A.network)]
    assert r.find_problem(same, shared_store=True) is None


def test_nccl_ranks_publish_no_gloo_address():
    assert r.find_problem([replace(NODE_A, address=""), replace(NODE_B, address="")], shared_store=True) is None


def test_restart_counts_that_differ_name_the_store_variable_only_with_a_shared_store():
    records = [replace(NODE_A, restart=1), NODE_B, replace(NODE_B, rank=2)]
    problem = r.find_problem(records, shared_store=True)
    assert problem == ("the torchrun agents of this job count restarts differently (ranks 1, 2: 0; rank 0: 1), "
                       "and with the agent's store shared by every restart the ranks would wait for each other "
                       "under different keys: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on every node")
    assert r.find_problem(records, shared_store=False) is None  # a fresh store per attempt: no prefix


def test_master_addr_resolving_to_loopback_names_local_addr(monkeypatch):
    monkeypatch.setattr(r.socket, "gethostname", lambda: "vm")
    monkeypatch.setenv("MASTER_ADDR", "localhost")  # getfqdn() of a hostname mapped to 127.0.0.1
    hint = r.master_addr_hint()
    assert hint.startswith(": MASTER_ADDR localhost resolves to ")
    assert "on vm, a loopback address the other nodes cannot reach" in hint
    assert hint.endswith("start torchrun on every node with --local-addr <that node's IP address>")
    monkeypatch.setenv("MASTER_ADDR", "127.0.1.1")
    assert r.master_addr_hint().startswith(": MASTER_ADDR 127.0.1.1 is on vm, a loopback address")
    monkeypatch.setenv("MASTER_ADDR", "10.77.0.1")  # what --local-addr publishes
    assert r.master_addr_hint() == ""


def test_several_nodes_from_torchrun_sizes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert r.several_nodes()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert not r.several_nodes()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # not torchrun: no node count to go by
    assert not r.several_nodes()


def test_gloo_address_follows_the_interface_then_the_hostname():
    assert r.gloo_address("localhost", None) == "127.0.0.1"
    assert r.gloo_address("no-such-host.invalid", None) == "127.0.0.1"  # gloo's own fallback
    if r.interface_addresses().get("lo") == "127.0.0.1":
        assert r.gloo_address("some-hostname", "lo") == "127.0.0.1"


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timedelta(seconds=10),
                         wait_for_workers=False)


def _record_of(store, start: int, record: r.RankRecord) -> None:
    store.set(f"{r.PREFIX}/start-{start}/rank-{record.rank}", json.dumps(asdict(record)))


def test_check_in_ignores_records_of_an_earlier_start(store, monkeypatch):
    """A store shared by restarts keeps rank 1's record of the first start; at the second start,
    rank 0 must wait for rank 1's new record, and name it when it does not come."""
    monkeypatch.setenv("MASTER_ADDR", "10.77.0.1")  # as --local-addr publishes it (nothing is sent there)
    monkeypatch.setenv("MASTER_PORT", "29500")
    store.add(f"{r.PREFIX}/starts/rank-0", 1)  # rank 0's first start
    _record_of(store, 1, NODE_B)
    with pytest.raises(r.ReachabilityError, match=r"^rank 1 did not check in within 1 s \(rank 0 on .* waited at "
                                                   r"10.77.0.1:29500\); see their nodes' logs; a node that cannot "
                                                   r"reach this address needs --local-addr"):
        r.check_in(store, 0, 2, "gloo", shared_store=True, limit_s=1)


def test_check_in_compares_the_records_of_the_same_start(store, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    _record_of(store, 1, replace(NODE_B, restart=1, network="another machine"))
    with pytest.raises(r.ReachabilityError, match="count restarts differently .rank 0: 0; rank 1: 1."):
        r.check_in(store, 0, 2, "nccl", shared_store=True, limit_s=5)
    _record_of(store, 2, replace(NODE_B, network="another machine"))
    r.check_in(store, 0, 2, "nccl", shared_store=True, limit_s=5)  # second start: counts agree
