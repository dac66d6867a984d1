"""The results archive of protocol v2: bench/eval/archive_v2.jsonl, one finished job per line, keyed by its id
(bench/eval/grid.py: arm, targets, lr, seed and task version are in it). It is what resumes the evaluation
across sessions and GPU machines, and the only input of the report.

    load(path)                         {id: record}; a later line with the same id wins
    fold(archive, sources)             append the records of SOURCES (jsonl files, or results folders of
                                       per-job JSON) whose id the archive lacks (or holds only as an error)
    export(results_dir, path)          a results folder → one jsonl (what a GPU call leaves in $OUT)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT = Path(__file__).with_name("archive_v2.jsonl")


def load(path: Path) -> dict:
    out = {}
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["job"]["id"]] = rec
    return out


def records(src: Path) -> list[dict]:
    src = Path(src)
    if src.is_dir():
        return [json.loads(f.read_text()) for f in sorted(src.glob("*.json")) if not f.name.startswith("_")]
    return list(load(src).values())


def _compact(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "traceback"} | ({"traceback": rec["traceback"][-600:]} if rec.get("traceback") else {})


def fold(archive: Path, sources: list[Path]) -> tuple[int, int]:
    """(records added, records already there). Written to a temporary name, then renamed."""
    have = load(archive)
    added, kept = [], 0
    for src in sources:
        for rec in records(src):
            old = have.get(rec["job"]["id"])
            if old is not None and not (old.get("error") and not rec.get("error")):
                kept += 1
                continue
            have[rec["job"]["id"]] = rec
            added.append(rec)
    if added:
        tmp = Path(str(archive) + ".tmp")
        tmp.write_text("".join(json.dumps(_compact(r), separators=(",", ":")) + "\n" for r in have.values()), encoding="utf-8")
        os.replace(tmp, archive)
    return len(added), kept


def export(results_dir: Path, path: Path) -> int:
    recs = records(results_dir)
    path.write_text("".join(json.dumps(_compact(r), separators=(",", ":")) + "\n" for r in recs), encoding="utf-8")
    return len(recs)
