"""Pre-flight checks of a job on several nodes: before the first collective, every rank tells the
others where it will be reached, and every rank stops with one line where that cannot work.

What hangs without these checks (each until the store or collective timeout, 30 min by default):
- MASTER_ADDR (torchrun publishes the rank-0 node's --local-addr, else its hostname) resolves to
  a loopback address: ranks of the other nodes knock on their own machine.
- The hostname resolves to a loopback address (127.0.1.1 on many hosts): gloo binds there, so
  ranks on the other nodes cannot connect to this one.
- Restart counts differ between nodes (each node's torchrun agent counts its own restarts) while
  the agent's store is shared by every attempt: the ranks look for each other under different
  key prefixes.
- A rank that never arrives (it cannot reach MASTER_ADDR, or died while starting).

The ranks meet in the job's key-value store (the one the process group is then built on): each
writes one record (`RankRecord`) and waits a short while for everyone else's. `find_problem`
judges the complete table; it is a plain function of the records, so it can be tested alone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch.distributed as dist

from gptj.model.parallel import CollectiveError

PREFIX = "gptj/preflight"
SHARED_STORE_FIX = "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on every node"
LOCAL_ADDR_FIX = "start torchrun on every node with --local-addr <that node's IP address>"


class ReachabilityError(CollectiveError):
    """Ranks that could not reach each other, found before the first collective (one line)."""


@dataclass
class RankRecord:
    rank: int
    host: str          # hostname, for the messages
    network: str       # which network stack (machine + network namespace): loopback reaches only it
    address: str       # where gloo will listen and the other ranks connect to
    interface: str     # the interface of this node's address towards MASTER_ADDR ("" when unknown)
    restart: int       # TORCHELASTIC_RESTART_COUNT of this rank's torchrun agent


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:  # a name, not an address
        return False


def resolve(host: str) -> list[str]:
    """Every address `host` resolves to here (empty when it does not)."""
    try:
        return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)))
    except (OSError, UnicodeError):
        return []


def network_stack() -> str:
    """Names this machine's network namespace: two ranks share loopback only when equal."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/net")
        return f"{boot}/{ns.st_dev}:{ns.st_ino}"
    except OSError:  # not Linux: the hostname is the best guess
        return socket.gethostname()


def _bindable(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def interface_addresses() -> dict[str, str]:
    """IPv4 address of each interface, by name (Linux; empty elsewhere)."""
    try:
        import fcntl
    except ImportError:
        return {}
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue  # no IPv4 address
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def gloo_address(hostname: str, ifname: str | None) -> str:
    """The address gloo listens on, chosen as gloo does: the interface GLOO_SOCKET_IFNAME names,
    else the first address the hostname resolves to that can be bound, else 127.0.0.1."""
    if ifname:
        return interface_addresses().get(ifname.split(",")[0], ifname)
    for address in resolve(hostname):
        if _bindable(address):
            return address
    return "127.0.0.1"


def interface_towards(host: str, port: int) -> str:
    """The interface of the local address that packets to `host` leave from ("" when unknown or
    loopback). A UDP connect only picks the route; it sends nothing."""
    addresses = [a for a in resolve(host) if ":" not in a]
    if not addresses:
        return ""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addresses[0], port))
            local = s.getsockname()[0]
    except OSError:
        return ""
    if is_loopback(local):
        return ""
    return next((name for name, address in interface_addresses().items() if address == local), "")


def this_rank(rank: int, backend: str) -> RankRecord:
    env = os.environ
    hostname = socket.gethostname()
    master = env.get("MASTER_ADDR", "")
    address = gloo_address(hostname, env.get("GLOO_SOCKET_IFNAME")) if backend == "gloo" else ""
    return RankRecord(rank=rank, host=hostname, network=network_stack(), address=address,
                      interface=interface_towards(master, int(env.get("MASTER_PORT", "29500"))) if master else "",
                      restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def find_problem(records: list[RankRecord], shared_store: bool) -> str | None:
    """The first reason why these ranks (one record each, every rank of the job) would hang
    together, as one line naming the cause and the fix; None when they can work."""
    nodes: dict[str, list[RankRecord]] = {}  # ranks by network stack: loopback reaches only their own
    for record in records:
        nodes.setdefault(record.network, []).append(record)
    looped = [group for group in nodes.values() if group[0].address and is_loopback(group[0].address)]
    if looped and len(nodes) > 1:
        where = "; ".join(
            f"{_ranks([r.rank for r in group])} on {group[0].host} at {group[0].address} (GLOO_SOCKET_IFNAME="
            f"{group[0].interface or '<its interface towards the other nodes>'})" for group in looped)
        return (f"ranks on other machines would connect to a loopback address, where the hostname "
                f"resolves: {where}; set GLOO_SOCKET_IFNAME on those nodes as given, or map each hostname "
                f"to its node's IP address in /etc/hosts")
    restarts = {}
    for record in records:
        restarts.setdefault(record.restart, []).append(record.rank)
    if shared_store and len(restarts) > 1:
        counts = "; ".join(f"{_ranks(ranks)}: {count}" for count, ranks in sorted(restarts.items()))
        return (f"the torchrun agents of this job count restarts differently ({counts}), and with the "
                f"agent's store shared by every restart the ranks would wait for each other under "
                f"different keys: {SHARED_STORE_FIX}")
    return None


def master_addr_hint() -> str:
    """Why the other nodes cannot reach MASTER_ADDR when it resolves to loopback here ("" otherwise)."""
    master = os.environ.get("MASTER_ADDR", "")
    looped = [a for a in ([master] if is_loopback(master) else resolve(master)) if is_loopback(a)]
    if not looped:
        return ""
    resolved = "is" if looped[0] == master else f"resolves to {looped[0]}"
    return (f": MASTER_ADDR {master} {resolved} on {socket.gethostname()}, a loopback address the other "
            f"nodes cannot reach (torchrun publishes the rank-0 node's --local-addr, else its hostname); "
            f"{LOCAL_ADDR_FIX}")


def several_nodes() -> bool:
    """More than one node in the job (torchrun: WORLD_SIZE counts them all, LOCAL_WORLD_SIZE this one's)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def connect_store(is_master: bool, world_size: int, limit_s: float) -> dist.TCPStore:
    """The job's store at MASTER_ADDR:MASTER_PORT, or a one-line error after `limit_s`."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        return dist.TCPStore(host, port, world_size, is_master=is_master, timeout=timedelta(seconds=limit_s),
                             wait_for_workers=False)
    except (RuntimeError, ValueError) as err:  # DistNetworkError, DistStoreError are RuntimeErrors
        detail = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ReachabilityError(
            f"rank {os.environ.get('RANK', '?')} on {socket.gethostname()} cannot reach the job's store at "
            f"{host}:{port} within {limit_s:.0f} s ({detail})" + (master_addr_hint() or
            f"; check that the other nodes can connect to {host} (its firewall, --local-addr)")) from None


def check_in(store, rank: int, world_size: int, backend: str, shared_store: bool, limit_s: float) -> None:
    """Publish this rank's record, wait up to `limit_s` for every other rank's, and raise
    ReachabilityError naming cause and fix when they are missing or could not work together."""
    # A store shared by restarts still holds the records of earlier attempts: count this rank's
    # starts, and look only at records of the same start (every rank restarts together).
    start = store.add(f"{PREFIX}/starts/rank-{rank}", 1)
    where = f"{PREFIX}/start-{start}"
    store.set(f"{where}/rank-{rank}", json.dumps(asdict(this_rank(rank, backend))))
    keys = [f"{where}/rank-{r}" for r in range(world_size)]
    deadline = time.monotonic() + limit_s
    while True:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise ReachabilityError(
                f"{_ranks(missing)} did not check in within {limit_s:.0f} s (rank {rank} on "
                f"{socket.gethostname()} waited at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}); "
                f"see their nodes' logs" + (master_addr_hint() or
                "; a node that cannot reach this address needs --local-addr <the rank-0 node's IP address>"))
        time.sleep(0.05)
    records = [RankRecord(**json.loads(store.get(key))) for key in keys]
    problem = find_problem(records, shared_store)
    if problem is not None:
        raise ReachabilityError(problem)
