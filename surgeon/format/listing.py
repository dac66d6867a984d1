"""What a finished output holds, by content: the hidden `.surgeon.files` that `--overwrite` trusts.

    write_listing(folder)          # after every file is written, before the rename into place
    unlisted_reason(folder)        # None when every file is listed and unchanged, else why not

One line per file: its xxh3-128 content hash (streamed, 1 MiB at a time), its size, a mark and its
relative POSIX path. The mark says what surgeon allows to differ later:
  `=`  nothing: the bytes must be the ones listed (every file of split, absorb and export);
  `+`  more bytes after the listed ones (train's metrics.jsonl, which a run appends to between saves);
  `~`  anything, or no file: the run log (surgeon.run.json, timings that differ from run to run, so
       that the listing of a resumed run equals an uninterrupted one's byte for byte), and train's
       files while a save rewrites them.
A folder holding a file that is not listed, or whose bytes differ (a trained adapter copied in, a
hand-edited README.md), is not surgeon's to delete, and the first such file is named.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

FILES = ".surgeon.files"  # the listing itself
WORK = ".surgeon"  # a run's bookkeeping inside its work folder (plan, journals): not listed
HEADER = "# surgeon file listing v2: xxh3-128 size mark path"
CHUNK = 1 << 20
EXACT, GROWS, TEMP = "=", "+", "~"


def tree(folder: Path) -> list[str]:
    """Every file of an output (links not followed), as sorted relative POSIX paths, but the listing
    itself and the run's bookkeeping."""
    rel = (q.relative_to(folder).as_posix() for q in folder.rglob("*") if q.is_file() or q.is_symlink())
    return sorted(f for f in rel if f not in (FILES, f"{FILES}.tmp") and not f.startswith(f"{WORK}/"))


def content_hash(path: Path, limit: int | None = None) -> str:
    """xxh3-128 of a file's bytes (of its first `limit` bytes), read in 1 MiB pieces; a link hashes
    its target's name, never what it points to."""
    h = xxhash.xxh3_128()
    if path.is_symlink():
        h.update(b"link:" + os.fsencode(os.readlink(path)))
        return h.hexdigest()
    left = limit
    with open(path, "rb", buffering=0) as f:
        while left is None or left > 0:
            piece = f.read(CHUNK if left is None else min(CHUNK, left))
            if not piece:
                break
            h.update(piece)
            if left is not None:
                left -= len(piece)
    return h.hexdigest()


def seeded_cache(folder: Path, hashes: dict[Path, tuple[tuple[int, int, int], str]]) -> dict:
    """write_listing's cache, filled with the content hashes a writer computed while it wrote these
    files (ShardSetWriter.content_hashes, keyed by inode, size and modification time at its close):
    a file whose key changed since is hashed again from its bytes."""
    cache = {}
    for path, (key, digest) in hashes.items():
        st = path.lstat()
        if (st.st_ino, st.st_size, st.st_mtime_ns) == key:
            cache[path.relative_to(folder).as_posix()] = (key, digest)
    return cache


def write_listing(folder: Path, marks: dict[str, str] | None = None, cache: dict | None = None) -> None:
    """Record every file `folder` holds with its content hash (written whole, then renamed).
    marks: relative path -> GROWS or TEMP for the files surgeon itself may change later; cache: kept
    by a caller that lists the same folder again, so that a file whose inode, size and modification
    time are unchanged is not read twice."""
    marks, cache = marks or {}, {} if cache is None else cache
    files, lines = tree(folder), [HEADER]
    for rel in files:
        if marks.get(rel) == TEMP:  # no hash: the listing stays the same whatever the file holds
            lines.append(f"- 0 {TEMP} {rel}")
            continue
        p = folder / rel
        st = p.lstat()
        size, key = (0 if p.is_symlink() else st.st_size), (st.st_ino, st.st_size, st.st_mtime_ns)
        if cache.get(rel, (None,))[0] != key:
            cache[rel] = (key, content_hash(p))
        lines.append(f"{cache[rel][1]} {size} {marks.get(rel, EXACT)} {rel}")
    empty = xxhash.xxh3_128().hexdigest()  # a log not yet begun is listed as empty, a temporary not yet made as anything
    lines += [f"{empty} 0 {m} {rel}" if m == GROWS else f"- 0 {m} {rel}" for rel, m in sorted(marks.items()) if rel not in files]
    _save(folder, lines)


def _save(folder: Path, lines: list[str]) -> None:
    tmp = folder / f"{FILES}.tmp"  # written whole, then renamed: a kill leaves the old listing or the new
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, folder / FILES)


def relist_one(folder: Path, rel: str) -> None:
    """After surgeon itself rewrote one file of a finished output (push --regenerate-card's card):
    that file's entry only, so that nothing else is blessed. No-op without a content listing."""
    listed = read_listing(folder)
    if isinstance(listed, str):
        return
    p = folder / rel
    listed[rel] = (content_hash(p), p.stat().st_size, listed.get(rel, ("", 0, EXACT))[2])
    lines = [HEADER] + [f"{h} {n} {m} {r}" for r, (h, n, m) in sorted(listed.items())]
    _save(folder, lines)


def read_listing(folder: Path) -> dict[str, tuple[str, int, str]] | str:
    """{path: (hash, size, mark)}, or why there is none to trust (missing, names only, damaged)."""
    try:
        lines = (folder / FILES).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return f"{folder} holds no list of the files surgeon wrote ({FILES})"
    except (OSError, UnicodeDecodeError) as e:
        return f"{folder / FILES} cannot be read ({e})"
    if not lines or lines[0] != HEADER:
        return (f"{folder} was written by an older surgeon, whose {FILES} lists names only, so changed files cannot be "
                "told apart; delete it yourself if nothing in it is worth keeping")
    listed = {}
    for ln in lines[1:]:
        parts = ln.split(" ", 3)
        if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in (EXACT, GROWS, TEMP):
            return f"{folder / FILES} is damaged (line {ln[:60]!r})"
        listed[parts[3]] = (parts[0], int(parts[1]), parts[2])
    return listed


def unlisted_reason(folder: Path) -> str | None:
    """Why --overwrite must not delete this folder: the first file surgeon did not write, or that
    changed since it did (None when every file is listed and unchanged)."""
    listed = read_listing(folder)
    if isinstance(listed, str):
        return listed
    found: list[tuple[str, str]] = []
    for rel in tree(folder):
        why = _file_reason(folder / rel, listed.get(rel))
        if why:
            found.append((rel, why))
            if len(found) == 4:
                break
    if not found:
        return None
    (rel, why), others = found[0], [r for r, _ in found[1:3]]
    also = f" (also {', '.join(others)}{' and more' if len(found) > 3 else ''})" if others else ""
    return f"{folder} holds {rel}, {why}{also}; move it out first"


def _file_reason(path: Path, entry: tuple[str, int, str] | None) -> str | None:
    if entry is None:
        return "which surgeon did not write"
    digest, size, mark = entry
    if mark == TEMP:
        return None
    have = 0 if path.is_symlink() else path.lstat().st_size
    if have != size and not (mark == GROWS and have > size):
        return "which changed since surgeon wrote it (its size differs)"
    if content_hash(path, size if mark == GROWS else None) != digest:
        return "which changed since surgeon wrote it (its content differs)"
    return None
