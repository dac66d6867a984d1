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

`version="v2"` (issue 25: tasks that leave room): 4–5-digit addition, 8–10 words to reverse, 20 pairs to
look up (VERSIONS); its own stream per task, so v1's items are unchanged.
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


# Difficulty of each task version (v1: the 2026-12-02 protocol, at ceiling for reverse and lookup;
# v2: issue 25's harder variants). The version is part of every result's key.
VERSIONS = {
    "v1": {"add_digits": (3, 3), "reverse_words": (4, 6), "lookup_pairs": 5},
    "v2": {"add_digits": (4, 5), "reverse_words": (8, 10), "lookup_pairs": 20},
}


def _number(rng: random.Random, digits: tuple[int, int]) -> int:
    d = digits[0] if digits[0] == digits[1] else rng.randint(*digits)  # v1 draws no digit count: its stream is unchanged
    return rng.randint(10 ** (d - 1), 10**d - 1)


def _add(rng: random.Random, v: dict) -> tuple[str, dict]:
    a, b = _number(rng, v["add_digits"]), _number(rng, v["add_digits"])
    return f"{a}+{b}", {"prompt": f"What is {a} + {b}? Reply with the number only.", "completion": str(a + b)}


def _reverse(rng: random.Random, v: dict) -> tuple[str, dict]:
    ws = rng.sample(WORDS, rng.randint(*v["reverse_words"]))
    return " ".join(ws), {"prompt": "Reverse the order of these words: " + " ".join(ws), "completion": " ".join(reversed(ws))}


def _lookup(rng: random.Random, v: dict) -> tuple[str, dict]:
    n = v["lookup_pairs"]
    keys = rng.sample(WORDS, n)
    vals = [f"{rng.randint(0, 99):02d}" for _ in keys]
    q = rng.randrange(n)
    ctx = ", ".join(f"{k}={v}" for k, v in zip(keys, vals))
    return f"{ctx}|{q}", {"prompt": f"{ctx}. What number is {keys[q]}?", "completion": vals[q]}


GENERATORS = {"add": _add, "reverse": _reverse, "lookup": _lookup}


def make_task(name: str, n_train: int, n_val: int, n_test: int, seed: int = 0, version: str = "v1") -> dict[str, list[dict]]:
    v = VERSIONS[version]
    rng = random.Random(f"surgeon-eval/{name}/{seed}" + ("" if version == "v1" else f"/{version}"))  # str seeds hash deterministically
    seen, out = set(), []
    need = n_test + n_val + n_train
    while len(out) < need:
        key, ex = GENERATORS[name](rng, v)
        if key in seen:
            continue
        seen.add(key)
        out.append(ex)
    return {"test": out[:n_test], "val": out[n_test : n_test + n_val], "train": out[n_test + n_val :]}


def make_tasks(n_train: int = 1200, n_val: int = 100, n_test: int = 200, seed: int = 0, names=TASKS, version: str = "v1") -> dict[str, dict[str, list[dict]]]:
    return {n: make_task(n, n_train, n_val, n_test, seed, version) for n in names}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
