#!/usr/bin/env python
"""Durability options for a capture's files (issue 17): N files of SIZE bytes written into a fresh folder
after ``os.sync()``, made durable each way, ROUNDS rounds interleaved, medians. Linux (sync_file_range, syncfs).

    python bench/bench_durability.py 210 1179648 /tmp 3     # SmolLM2 at 512 tokens: 7 x 30 files of 1.18 MB
"""

from __future__ import annotations

import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

LIBC = ctypes.CDLL(None, use_errno=True)
SYNC_FILE_RANGE_WRITE = 2


def paths(folder: str, n: int) -> list[str]:
    return [os.path.join(folder, f"f{i}.bin") for i in range(n)]


def write(path: str, data: np.ndarray) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def write_only(files, data, folder):
    for p in files:
        write(p, data)


def fdatasync_each(files, data, folder):
    for p in files:
        with open(p, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fdatasync(fh.fileno())


def fsync_each_at_end(files, data, folder):
    write_only(files, data, folder)
    for p in files:
        sync(p)


def threads_at_end(files, data, folder):
    write_only(files, data, folder)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(sync, files))


def range_then_sync(files, data, folder):
    for p in files:
        with open(p, "wb") as fh:
            fh.write(data)
            fh.flush()
            LIBC.sync_file_range(fh.fileno(), ctypes.c_int64(0), ctypes.c_int64(0), SYNC_FILE_RANGE_WRITE)
    for p in files:
        sync(p)


def one_syncfs(files, data, folder):
    write_only(files, data, folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        LIBC.syncfs(fd)
    finally:
        os.close(fd)


def sync_pool_as_closed(files, data, folder):
    """zkllm-hf's choice: each closed write's fdatasync handed to 4 sync threads at once."""
    with ThreadPoolExecutor(4) as pool:
        futures = []
        for p in files:
            write(p, data)
            futures.append(pool.submit(sync, p))
        for f in futures:
            f.result()


WAYS = {
    "write only, no durability": write_only,
    "write + fdatasync each (writer thread)": fdatasync_each,
    "fsync each at commit": fsync_each_at_end,
    "fdatasync on 8 threads at commit": threads_at_end,
    "sync_file_range, then fdatasync each": range_then_sync,
    "one syncfs at commit": one_syncfs,
    "4 sync threads as each write closes": sync_pool_as_closed,
}


def main() -> None:
    n, size, root, rounds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    data = np.random.default_rng(0).integers(0, 1 << 30, size // 4, dtype=np.int32)
    times: dict[str, list[float]] = {k: [] for k in WAYS}
    for _ in range(rounds):
        for name, way in WAYS.items():
            folder = tempfile.mkdtemp(dir=root)
            os.sync()
            t = time.perf_counter()
            way(paths(folder, n), data, folder)
            times[name].append(time.perf_counter() - t)
            shutil.rmtree(folder)
    for name, got in times.items():
        print(f"{name:<42} median {statistics.median(got):.3f} s  (min {min(got):.3f}, max {max(got):.3f})")


if __name__ == "__main__":
    main()
