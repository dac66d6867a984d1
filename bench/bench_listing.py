"""What the content listing costs at the end of a split: hashing the written files again (cold, after
the writer's early writeback dropped them from the page cache) against the hashes the writer computed
while it wrote them (issue 29).

    python bench/bench_listing.py --dir /tmp/bl --gb 2        # CPU is enough: this is disk and hashing

Writes `--gb` GB of bf16 tensors in order with ShardSetWriter (as split does: fadvise DONTNEED after
each tensor), then times write_listing (a) seeded from ShardSetWriter.content_hashes and (b) reading
every file, after dropping the files' pages (fadvise DONTNEED; no root needed). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from surgeon.format import listing  # noqa: E402
from surgeon.format.writer import OutTensor, ShardSetWriter, plan_shards  # noqa: E402


def drop_pages(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd) if os.access(p, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--gb", type=float, default=2.0)
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    a.dir.mkdir(parents=True)
    n = max(1, int(a.gb * 1e9 / (4096 * 4096 * 2)))
    plan = [OutTensor(f"w{i}", "BF16", (4096, 4096)) for i in range(n)]
    w = ShardSetWriter(a.dir, plan_shards(plan, 1 << 30))
    t = torch.randn(4096, 4096).bfloat16()
    t0 = time.perf_counter()
    for s in plan:
        w.write(s.name, t)
    w.sync()
    w.close()
    write_s = time.perf_counter() - t0
    hashes = w.content_hashes()
    drop_pages(a.dir)
    t0 = time.perf_counter()
    listing.write_listing(a.dir, cache=listing.seeded_cache(a.dir, hashes))
    seeded_s, seeded = time.perf_counter() - t0, (a.dir / listing.FILES).read_text()
    drop_pages(a.dir)
    t0 = time.perf_counter()
    listing.write_listing(a.dir)
    read_s = time.perf_counter() - t0
    same = seeded == (a.dir / listing.FILES).read_text()
    gb = sum(s.nbytes for s in plan) / 1e9
    print(json.dumps({"GB": round(gb, 2), "files": len(hashes), "write_with_hash_s": round(write_s, 2), "listing_seeded_s": round(seeded_s, 3),
                      "listing_read_cold_s": round(read_s, 2), "read_GBps": round(gb / read_s, 2), "identical_listing": same}))
    shutil.rmtree(a.dir)


if __name__ == "__main__":
    main()
