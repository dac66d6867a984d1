"""The disk's floor beside the split: how fast this machine's disk reads the checkpoint and writes a
split's bytes, measured on the same files and disk, and the split's time as a ratio to it.

    python bench/bench_io_floor.py --model /tmp/b7/model --scratch /tmp/b7 [--methods milora,pissa]
        [--root DIR[,NAME=VALUE...][:M1+M2]]...   # as root (page cache dropped before every cold measurement)

Floors, each from a cold page cache:
  (a) read: every shard, `--depth` threads of `--chunk`-byte positioned reads in file order;
  (b) write: as many bytes as the split writes (`--write-bytes`, default: the checkpoint's size times
      1.095, a 7B rank-64 split's ratio), `--depth` threads of pwrite, then fsync;
  (c) both at once; the job's I/O floor is the better of (c) and (a) + (b), reads then writes.
Then, for each surgeon tree in --root (default: this one) and each method, the whole CLI split cold
(`python -m surgeon split MODEL --method M --rank 64 --target all-linear --device cuda`), with its
wall and pipeline time, the pipeline over floor (c), and the sha256 of every output file but the run
log, xxh3-128 over names and bytes (equal digests = byte-identical output; digest_unstamped leaves out
the manifest and the listing too, which record the source files' mtime, so it compares across machines
where the checkpoint was built anew); NAME=VALUE after a
tree sets the split's environment (e.g. SURGEON_EARLY_READ=0), :M1+M2 limits that tree to these methods. One JSON object; also $OUT/bench_io_floor.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_all(files: list[Path], depth: int, chunk: int) -> tuple[float, int]:
    jobs = [(f, off, min(chunk, f.stat().st_size - off)) for f in files for off in range(0, f.stat().st_size, chunk)]
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    local = threading.local()

    def one(job) -> int:
        f, off, n = job
        if not hasattr(local, "buf"):
            local.buf = bytearray(chunk)
        return os.preadv(fds[f], [memoryview(local.buf)[:n]], off)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(depth) as pool:
        got = sum(pool.map(one, jobs))
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return dt, got


def write_all(dest: Path, nbytes: int, depth: int, chunk: int, files: int = 2) -> tuple[float, int]:
    """nbytes of incompressible data into `files` files, pwrite from `depth` threads, then fsync each."""
    block = os.urandom(chunk)
    per = -(-nbytes // files)
    paths = [dest / f"floor-{i}.bin" for i in range(files)]
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for p in paths]
    jobs = [(fd, off, min(chunk, per - off)) for fd in fds for off in range(0, per, chunk)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(depth) as pool:
        done = sum(pool.map(lambda j: os.pwrite(j[0], memoryview(block)[: j[2]], j[1]), jobs))
        list(pool.map(os.fsync, fds))
    dt = time.perf_counter() - t0
    for fd, p in zip(fds, paths):
        os.close(fd)
        p.unlink()
    return dt, done


def floors(files: list[Path], scratch: Path, write_bytes: int, depth: int, chunk: int) -> dict:
    out: dict = {"read_GB": round(sum(f.stat().st_size for f in files) / 1e9, 2), "write_GB": round(write_bytes / 1e9, 2)}
    out["dropped_caches"] = drop_caches()
    r, n = read_all(files, depth, chunk)
    out["a_read_s"], out["a_read_GBps"] = round(r, 2), round(n / r / 1e9, 2)
    drop_caches()
    w, m = write_all(scratch, write_bytes, depth, chunk)
    out["b_write_s"], out["b_write_GBps"] = round(w, 2), round(m / w / 1e9, 2)
    drop_caches()
    res: dict = {}
    t0 = time.perf_counter()
    tr = threading.Thread(target=lambda: res.update(r=read_all(files, depth, chunk)))
    tw = threading.Thread(target=lambda: res.update(w=write_all(scratch, write_bytes, depth, chunk)))
    tr.start(), tw.start()
    tr.join(), tw.join()
    both = time.perf_counter() - t0
    out["c_both_s"] = round(both, 2)
    out["c_read_GBps_alongside"] = round(res["r"][1] / res["r"][0] / 1e9, 2)
    out["c_write_GBps_alongside"] = round(res["w"][1] / res["w"][0] / 1e9, 2)
    out["c_total_GBps"] = round((res["r"][1] + res["w"][1]) / both / 1e9, 2)
    # the job must read and write: at best both at once, or one after the other where mixing costs more
    out["serial_s"] = round(r + w, 2)
    out["floor_s"] = max(out["a_read_s"], out["b_write_s"], min(out["c_both_s"], out["serial_s"]))
    return out


SOURCE_STAMPED = {"surgeon.run.json", "surgeon.json", ".surgeon.files"}  # the manifest records the source files' mtime


def output_digests(out: Path) -> tuple[str, str]:
    """(every file but the run log, every file but SOURCE_STAMPED), one read of the output."""
    try:
        import xxhash

        full, unstamped = xxhash.xxh3_128(), xxhash.xxh3_128()
    except ImportError:
        full, unstamped = hashlib.sha256(), hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "surgeon.run.json":
            hs = (full,) if p.name in SOURCE_STAMPED else (full, unstamped)
            for h in hs:
                h.update(p.relative_to(out).as_posix().encode() + b"\0")
            with open(p, "rb") as f:
                while block := f.read(64 << 20):
                    for h in hs:
                        h.update(block)
    return full.hexdigest(), unstamped.hexdigest()


def import_seconds(stderr: str) -> float:
    """Total import time from `python -X importtime`'s report: the top-level modules' cumulative times."""
    total = 0
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            _, cum, name = line.split("|")
            if cum.strip().isdigit() and not name.startswith("  ") and name.strip() and name[1:2] != " ":
                total += int(cum)
    return round(total / 1e6, 2)


def timed_split(root: Path, model: Path, out: Path, method: str, extra: list[str], env: dict, device: str = "cuda") -> dict:
    """The whole CLI, cold, with where its wall time went: imports (-X importtime), before the split
    began (interpreter, imports, arguments), the split's own setup / pipeline / finish (its run log),
    and after the run log (content listing, rename, fsyncs, exit)."""
    if out.exists():  # a fresh output each time: replacing one first reads it whole (surgeon checks what it deletes)
        shutil.rmtree(out)
    drop_caches()
    cmd = [sys.executable, "-X", "importtime", "-m", "surgeon", "split", str(model), "--method", method, "--rank", "64",
           *([] if "--target" in extra else ["--target", "all-linear"]), "--device", device, "--out", str(out), "--overwrite", "--quiet", *extra]
    t0, w0 = time.perf_counter(), time.time()
    proc = subprocess.run(cmd, cwd=root, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **env, "PYTHONPATH": f"{root}:{root}/plugins/surgeon-train:{os.environ.get('PYTHONPATH', '')}"})
    wall, w1 = time.perf_counter() - t0, time.time()
    if proc.returncode:
        raise RuntimeError(f"split exited {proc.returncode}: " + "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:"))[-2000:])
    log = out / "surgeon.run.json"
    run = json.loads(log.read_text())
    logged = log.stat().st_mtime - w0  # process start to the run log written
    inside = run["seconds"] + (run.get("setup_seconds") or 0) + (run.get("finish_seconds") or 0)
    return {"wall_s": round(wall, 2), "pipeline_s": run["seconds"], "setup_s": run.get("setup_seconds"),
            "finish_s": run.get("finish_seconds"), "imports_s": import_seconds(proc.stderr),
            "before_split_s": round(logged - inside, 2), "after_log_s": round(w1 - log.stat().st_mtime, 2),
            "read_GBps": round(run["bytes_read"] / run["seconds"] / 1e9, 2),
            "written_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
            "stage_seconds": run.get("stage_seconds"), **dict(zip(("digest", "digest_unstamped"), output_digests(out)))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--scratch", required=True, type=Path, help="a folder on the same disk, for the write floor and the split outputs")
    ap.add_argument("--write-bytes", type=float, default=0, help="bytes the write floor writes (default: 1.095 x the checkpoint)")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=64 << 20)
    ap.add_argument("--methods", default="", help="comma-separated: time these splits too (needs CUDA)")
    ap.add_argument("--device", default="cuda", help="the splits' --device (cpu: the same breakdown on a machine without a GPU)")
    ap.add_argument("--split-args", default="", help="extra arguments for each split, e.g. '--target q_proj'")
    ap.add_argument("--root", action="append", default=[], help="surgeon tree to time, DIR[,NAME=VALUE...] (repeatable; default: this one)")
    args = ap.parse_args()
    files = sorted(args.model.glob("*.safetensors"))
    args.scratch.mkdir(parents=True, exist_ok=True)
    write_bytes = int(args.write_bytes) or int(sum(f.stat().st_size for f in files) * 1.095)
    res: dict = {"floors": floors(files, args.scratch, write_bytes, args.depth, args.chunk), "splits": {}}
    print(json.dumps(res["floors"]), flush=True)
    floor = res["floors"]["floor_s"]
    for spec in args.root or [str(HERE)]:
        spec, _, only = spec.partition(":")
        for m in filter(None, args.methods.split(",")):
            if only and m not in only.split("+"):
                continue
            root, *envs = spec.split(",")
            key = f"{Path(root).name} {m} {' '.join(envs)}".strip()
            r = timed_split(Path(root).resolve(), args.model, args.scratch / "out", m, args.split_args.split(),
                            dict(e.split("=", 1) for e in envs), args.device)
            r["pipeline_over_floor"] = round(r["pipeline_s"] / floor, 2)
            r["wall_over_floor"] = round(r["wall_s"] / floor, 2)
            res["splits"][key] = r
            print(key, json.dumps({k: v for k, v in r.items() if k != "stage_seconds"}), flush=True)
    text = json.dumps(res, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_io_floor.json").write_text(text)


if __name__ == "__main__":
    main()
