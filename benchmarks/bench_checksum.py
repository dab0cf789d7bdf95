"""Throughput of the checksums a checkpoint shard could carry, and of verifying a shard file.

Each hash runs over the same in-memory buffer in 8 MiB chunks (as `file_checksum` reads a
file); GB/s = buffer bytes / best of `repeats` wall times. The file figure runs
`gptj.execution.training.checkpoint.file_checksum` over a temporary file of the same size, read back from the
page cache (a cold read is bounded by the disk instead).

    python benchmarks/bench_checksum.py [--mib 512] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from gptj.execution.training.checkpoint import file_checksum  # noqa: E402

CHUNK = 8 << 20


def _chunked(update, buffer: memoryview) -> None:
    for start in range(0, len(buffer), CHUNK):
        update(buffer[start:start + CHUNK])


def _crc32(buffer: memoryview) -> None:
    value = 0
    for start in range(0, len(buffer), CHUNK):
        value = zlib.crc32(buffer[start:start + CHUNK], value)


def hashes() -> dict:
    import xxhash

    return {
        "xxh3_128 (used)": lambda b: _chunked(xxhash.xxh3_128().update, b),
        "crc32 (zlib)": _crc32,
        "sha256": lambda b: _chunked(hashlib.sha256().update, b),
        "blake2b": lambda b: _chunked(hashlib.blake2b().update, b),
    }


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(mib: int = 512, repeats: int = 3) -> dict:
    data = os.urandom(1 << 20) * mib
    view = memoryview(data)
    results = {name: len(data) / best_seconds(lambda fn=fn: fn(view), repeats) / 1e9
               for name, fn in hashes().items()}
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        results["file_checksum (xxh3_128, page cache)"] = (
            len(data) / best_seconds(lambda: file_checksum(f.name), repeats) / 1e9)
    return {"machine": describe(), "load_average": os.getloadavg(), "bytes": len(data),
            "gb_per_s": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512, help="buffer size in MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.mib, args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['machine']}; load average {result['load_average'][0]:.2f}; "
          f"{result['bytes'] / 2**20:.0f} MiB, best of {args.repeats}")
    for name, rate in result["gb_per_s"].items():
        print(f"  {name:38s} {rate:6.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
