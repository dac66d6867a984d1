"""Forgetting measures that are not task data: general text for perplexity, and general questions.

general_text.txt (committed, 13 kB) joins three English texts shipped with numpy and CPython, so the
same bytes are read on every machine: numpy/ma/README.rst ("A guide to masked arrays in NumPy",
P. Gerard-Marchant, BSD-3-Clause, numpy's licence), section A "History of the software" of CPython's
LICENSE.txt (PSF), and the Zen of Python (CPython's `this` module).

PROBES: 30 general questions, each with the keywords of a correct answer (any of them, as a whole
word, counts). The untrained SmolLM2-135M-Instruct gets a share of them right; fine-tuning that
forgets loses some, and "changed" counts answers that differ from the untrained model's at all.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from pathlib import Path

GENERAL_TEXT = Path(__file__).with_name("general_text.txt")

PROBES: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("How many days are there in a week?", ("7", "seven")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the boiling point of water in Celsius?", ("100",)),
    ("What is 2 plus 3?", ("5", "five")),
    ("Name a fruit that is yellow.", ("banana", "bananas", "lemon", "lemons", "pineapple", "mango")),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("What language is spoken in Spain?", ("spanish", "castilian")),
    ("What do bees make?", ("honey",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What gas do plants take in from the air?", ("carbon", "co2")),
    ("What is the freezing point of water in Celsius?", ("0", "zero")),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the chemical symbol for water?", ("h2o",)),
    ("How many continents are there on Earth?", ("7", "seven")),
    ("What is the capital of Italy?", ("rome",)),
    ("What animal is known as the king of the jungle?", ("lion",)),
    ("How many hours are in a day?", ("24", "twenty")),
    ("What is the opposite of hot?", ("cold",)),
    ("What do cows drink?", ("water",)),
    ("Which ocean is the largest?", ("pacific",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the main language spoken in Brazil?", ("portuguese",)),
    ("How many months are in a year?", ("12", "twelve")),
    ("What star is at the center of our solar system?", ("sun",)),
    ("What is frozen water called?", ("ice",)),
    ("Who painted the Mona Lisa?", ("leonardo", "vinci")),
    ("What is 10 minus 4?", ("6", "six")),
]


def general_text() -> tuple[str, str]:
    txt = GENERAL_TEXT.read_text(encoding="utf-8")
    return txt, hashlib.sha256(txt.encode()).hexdigest()


def _words(s: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]", " ", s.lower()).split()


def probe_correct(answers: list[str]) -> float:
    """Share of the probes answered with one of their keywords."""
    return sum(any(k in _words(a) for k in keys) for a, (_, keys) in zip(answers, PROBES)) / max(1, len(answers))


def probe_drift(answers: list[str], ref: list[str]) -> tuple[float, float]:
    """(share of answers that changed, 1 - mean difflib similarity) against the untrained answers."""
    changed = sum(a != b for a, b in zip(answers, ref)) / len(ref)
    sim = sum(difflib.SequenceMatcher(None, a, b).ratio() for a, b in zip(answers, ref)) / len(ref)
    return changed, 1.0 - sim
