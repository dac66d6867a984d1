"""Three synthetic but non-trivial tasks, generated deterministically, with held-out splits.

    from bench.eval.tasks import make_tasks
    tasks = make_tasks(n_train=1200, n_val=100, n_test=200, seed=0)   # {name: {"train": [...], "val": [...], "test": [...]}}

Every example is {"prompt": ..., "completion": ...} (the trainer's prompt/completion JSONL form).
The splits of a task never share an input: each input is drawn once from one seeded stream and
dealt out in order (test first, then val, then train), duplicates skipped. Scoring is exact match of
the greedy answer after `normalize` (case, surrounding space and final punctuation ignored);
`lenient` also counts an answer that merely contains the expected one as whole words (for the
untrained model, which answers in sentences).

  add      "What is 347 + 589? Reply with the number only."                  -> "936"
           three-digit addition (carries): arithmetic the 135M model half knows.
  reverse  "Reverse the order of these words: lamp river stone cloud"       -> "cloud stone river lamp"
           4 to 6 words from WORDS: copying under a reordering rule.
  lookup   "kiwi=41, lamp=07, moss=93, reed=15, yarn=62. What number is lamp?" -> "07"
           5 pairs, keys from WORDS, two-digit values: in-context retrieval.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

WORDS = (
    "apple river stone cloud lamp table garden window bridge candle forest mirror pencil rabbit ocean "
    "basket castle desert engine feather guitar hammer island jacket kettle ladder magnet needle orange "
    "pillow rocket saddle tunnel violin wallet anchor barrel carpet dragon falcon glove harbor iron "
    "jungle lemon meadow nest orchid parrot quilt ribbon shovel tiger umbrella valley wheel yacht zebra "
    "acorn bottle canyon dolphin eagle fountain goose helmet igloo jewel koala lantern marble napkin "
    "otter pepper quartz raven spider thistle tulip walnut willow badger cactus daisy ember ferry "
    "granite hazel ivory jasmine kayak lobster maple nutmeg olive pebble radish salmon timber velvet "
    "beacon cherry copper cotton crystal donkey flute ginger honey locket mango mosquito oyster panther "
    "peanut pigeon planet puppet saffron sparrow squid turnip vessel weasel whistle camel comet fern"
).split()

TASKS = ("add", "reverse", "lookup")


def normalize(s: str) -> str:
    s = s.strip().lower()
    s = re.sub(r"[\s]+", " ", s)
    return s.strip(" .!?,;:\"'")


def exact(answer: str, expected: str) -> bool:
    return normalize(answer) == normalize(expected)


def lenient(answer: str, expected: str) -> bool:
    """Expected answer as a whole-word run inside the answer (what an untrained chat model gets credit for)."""
    a, e = normalize(answer), normalize(expected)
    return re.search(r"(?<![\w])" + re.escape(e) + r"(?![\w])", a) is not None


def _add(rng: random.Random) -> tuple[str, dict]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"{a}+{b}", {"prompt": f"What is {a} + {b}? Reply with the number only.", "completion": str(a + b)}


def _reverse(rng: random.Random) -> tuple[str, dict]:
    ws = rng.sample(WORDS, rng.randint(4, 6))
    return " ".join(ws), {"prompt": "Reverse the order of these words: " + " ".join(ws), "completion": " ".join(reversed(ws))}


def _lookup(rng: random.Random) -> tuple[str, dict]:
    keys = rng.sample(WORDS, 5)
    vals = [f"{rng.randint(0, 99):02d}" for _ in keys]
    q = rng.randrange(5)
    ctx = ", ".join(f"{k}={v}" for k, v in zip(keys, vals))
    return f"{ctx}|{q}", {"prompt": f"{ctx}. What number is {keys[q]}?", "completion": vals[q]}


GENERATORS = {"add": _add, "reverse": _reverse, "lookup": _lookup}


def make_task(name: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(f"surgeon-eval/{name}/{seed}")  # str seeds hash deterministically (sha512)
    seen, out = set(), []
    need = n_test + n_val + n_train
    while len(out) < need:
        key, ex = GENERATORS[name](rng)
        if key in seen:
            continue
        seen.add(key)
        out.append(ex)
    return {"test": out[:n_test], "val": out[n_test : n_test + n_val], "train": out[n_test + n_val :]}


def make_tasks(n_train: int = 1200, n_val: int = 100, n_test: int = 200, seed: int = 0, names=TASKS) -> dict[str, dict[str, list[dict]]]:
    return {n: make_task(n, n_train, n_val, n_test, seed) for n in names}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
