"""surgeon-train: fine-tune only the factors of a surgeon split folder.

    surgeon train SPLIT_DIR --data train.jsonl --out SPLIT_DIR_TRAINED --steps 200

A plugin: it adds `train` to the surgeon CLI through the entry-point group `surgeon.commands`;
the core never imports it. Python API:

    from surgeon_train import TrainOptions, train_files
    summary = train_files("split-dir", "train.jsonl", "trained-dir", TrainOptions(steps=100))
"""

import importlib

__version__ = "0.1.0"

# imported on first use: the core CLI loads this package's entry point at every start, and torch /
# transformers must not be imported just to print `surgeon --help`
_LAZY = {"DataError": "data", "Packed": "data", "load_jsonl": "data", "pack": "data", "tokenize": "data",
         "TrainOptions": "loop", "evaluate": "loop", "train": "loop", "train_files": "loop"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"surgeon_train.{_LAZY[name]}"), name)
    raise AttributeError(name)

__all__ = ["DataError", "Packed", "TrainOptions", "evaluate", "load_jsonl", "pack", "tokenize", "train", "train_files"]
