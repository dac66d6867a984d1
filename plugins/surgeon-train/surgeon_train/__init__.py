"""surgeon-train: fine-tune only the factors of a surgeon split folder.

    surgeon train SPLIT_DIR --data train.jsonl --out SPLIT_DIR_TRAINED --steps 200

A plugin: it adds `train` to the surgeon CLI through the entry-point group `surgeon.commands`;
the core never imports it. Python API:

    from surgeon_train import TrainOptions, train_files
    summary = train_files("split-dir", "train.jsonl", "trained-dir", TrainOptions(steps=100))
"""

from surgeon_train.data import DataError, Packed, load_jsonl, pack, tokenize
from surgeon_train.loop import TrainOptions, evaluate, train, train_files

__version__ = "0.1.0"

__all__ = ["DataError", "Packed", "TrainOptions", "evaluate", "load_jsonl", "pack", "tokenize", "train", "train_files"]
