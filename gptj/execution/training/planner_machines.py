"""The machines the layout planner plans for: memory, bandwidths and matmul speed per device."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
GB = 1e9


@dataclass(frozen=True)
class Machine:
    name: str
    devices_per_node: int
    nodes: int
    device_memory: float  # bytes per device
    host_memory: float  # bytes per node
    intra_bandwidth: float  # bytes/s per device inside a node (NVLink)
    inter_bandwidth: float  # bytes/s per device across nodes (InfiniBand)
    host_link_bandwidth: float  # bytes/s per device between host and device (PCIe)
    matmul_flops: float  # bf16 dense FLOP/s per device
    reserved: float  # bytes per device the runtime keeps (CUDA context, allocator slack)
    shared_host: bool = False  # CPU: "device" and host memory are the same RAM

    @property
    def devices(self) -> int:
        return self.devices_per_node * self.nodes


def h100_machine(nodes: int, per_node: int) -> Machine:
    return Machine(
        name=f"h100-80gb-{'x' + str(per_node) if nodes == 1 else f'{nodes}x{per_node}'}",
        devices_per_node=per_node, nodes=nodes, device_memory=80 * GiB,  # 81,559 MiB usable on an H100 80GB
        host_memory=(2000 if per_node == 8 else 240) * GB,
        intra_bandwidth=(450 if per_node > 1 else 0) * GB, inter_bandwidth=50 * GB,
        host_link_bandwidth=25 * GB, matmul_flops=989e12, reserved=3 * GiB,
    )


MACHINES = {
    "h100-80gb-x1": h100_machine(1, 1),
    "h100-80gb-x8": h100_machine(1, 8),
    "h100-80gb-8x8": h100_machine(8, 8),
    # One 24 GB / 12 GB GPU (L4 / RTX 4090 class, RTX 3060 class): the LoRA presets' targets.
    "gpu-24gb-x1": Machine(
        name="gpu-24gb-x1", devices_per_node=1, nodes=1, device_memory=24 * GiB, host_memory=64 * GB,
        intra_bandwidth=0.0, inter_bandwidth=0.0, host_link_bandwidth=25 * GB, matmul_flops=121e12,
        reserved=1 * GiB,
    ),
    "gpu-12gb-x1": Machine(
        name="gpu-12gb-x1", devices_per_node=1, nodes=1, device_memory=12 * GiB, host_memory=32 * GB,
        intra_bandwidth=0.0, inter_bandwidth=0.0, host_link_bandwidth=12 * GB, matmul_flops=50e12,
        reserved=1 * GiB,
    ),
    "cpu-24gb": Machine(
        name="cpu-24gb", devices_per_node=1, nodes=1, device_memory=24 * GiB, host_memory=24 * GiB,
        intra_bandwidth=0.0, inter_bandwidth=0.0, host_link_bandwidth=20 * GB, matmul_flops=2e12,
        reserved=0.5 * GiB, shared_host=True,
    ),
}
