"""Where --data comes from: a JSONL file (read here), or anything the `datasets` library reads.

    surgeon train SPLIT --data train.jsonl                 # read line by line, errors name the line
    surgeon train SPLIT --data train.parquet               # datasets' parquet builder (also .json, .csv, .arrow)
    surgeon train SPLIT --data ./my_dataset_dir            # a folder of data files, or one from save_to_disk
    surgeon train SPLIT --data org/name --data-split "train[:2000]" --columns prompt=question,completion=answer

Every record must be in one of the formats of surgeon/records.py (text, prompt/completion, messages,
alpaca, sharegpt; see surgeon_train.data); a dataset with other column names is mapped with
--columns FIELD=COLUMN,…. `datasets` (an optional
extra, `pip install 'surgeon-train[datasets]'`) is imported only for the sources that need it; a Hub
id is resolved by datasets itself (its cache, HF_DATASETS_OFFLINE / HF_HUB_OFFLINE honoured).
"""

from __future__ import annotations

from surgeon.format import datafiles
from surgeon.format.datafiles import FIELDS
from surgeon_train.data import DataError


def parse_columns(spec: str | None) -> dict[str, str] | None:
    """"prompt=question,completion=answer" → {"prompt": "question", "completion": "answer"}."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        field, sep, col = part.partition("=")
        if not sep or field.strip() not in FIELDS or not col.strip():
            raise DataError(f"--columns {spec!r}: give FIELD=COLUMN pairs separated by commas, FIELD one of {', '.join(FIELDS)}.")
        out[field.strip()] = col.strip()
    return out


def load_records(source, split: str = "train", columns: dict[str, str] | None = None, fmt: str | None = None) -> list[tuple[int, dict]]:
    """(number, record) pairs from a JSONL path, a datasets-readable file or folder, or a Hub id
    (surgeon.format.datafiles, shared with `surgeon split --calibrate`)."""
    return datafiles.load_records(source, split, columns, fmt)
